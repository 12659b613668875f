"""Tools that stand apart from training: the memory model and benchmarking helpers."""
