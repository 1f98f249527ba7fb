"""Triton kernels of the memory (fused reads) and the vectorised cache selection."""
