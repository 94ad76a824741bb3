"""Evaluation: perplexity and zero-shot accuracy of a model, paired statistics, the sweep and bias-study
reports, the one-screen summary, and the task screen."""
