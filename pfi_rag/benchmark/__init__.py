"""The silent-failure benchmark: planted failures with ground truth, probe detection scores,
and the privacy/utility trade-off (`pfi-rag bench silent-failures`)."""
