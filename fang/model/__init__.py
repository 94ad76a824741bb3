"""The model: loading checkpoints, iterating decoder blocks over calibration data, physically shrinking
blocks, and the pruned-checkpoint format (with the modeling code it ships)."""
