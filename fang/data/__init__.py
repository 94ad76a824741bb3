"""Data in: fetching the model and corpus, the corpus and its calibration sets, calibration sources
(topics), and the lm-eval task folder (BIG-bench, next-sentence)."""
