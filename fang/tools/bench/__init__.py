"""Benchmarks (`fang bench`): stage cost against the compute floor, the memory footprint, inference speed of pruned models.

Three parts, each usable alone (the `bench` stage runs them and writes JSON, Markdown and a
fragment of docs/results.md):

- pipeline: the wall time and peak RSS of every stage (the latest artifacts/timings.jsonl entry per
  stage and arguments) next to the compute floor measured in the same bench run: one plain
  forward pass and one forward+backward of the dense model over the calibration tokens, scaled
  per token when only a subsample is measured. Targets are checked as ratios against that floor.
- memory: the bytes per token and layer of the capture store (from its arrays' shapes and dtypes),
  its measured compression ratio, and an estimate for LLaMA-2-7B at 128 x 2048 calibration tokens
  whose formulas and inputs are written out so the numbers can be checked by hand.
- inference: prefill and greedy-decode tokens/s of every pruned model against the dense one,
  measured interleaved in one run (median of repeats), with parameter counts and checkpoint sizes.
"""
