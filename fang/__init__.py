"""fang: post-training structured pruning of LLMs with Function-Aware Neuron Grouping."""

__version__ = "0.1.0"
