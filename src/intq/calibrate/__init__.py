"""Observing tensors (streaming statistics) and choosing ranges from them (minmax, n-sigma, percentile, MSE, entropy)."""
