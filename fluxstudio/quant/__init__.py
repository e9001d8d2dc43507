"""Tensor quantizers: one fp32 tensor in, the bytes or tensors of one low-precision format out."""
