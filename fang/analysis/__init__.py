"""Analysis of the dense model on a calibration set, computed once and shared by every method and
sparsity: the capture store, token clusters, Taylor scores, neuron groups, the sparsity allocation,
ICA maps, GPrune modules and neuron attribution, with their Zarr stores."""
