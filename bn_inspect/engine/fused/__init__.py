"""The fused eval batch-norm path on CUDA: one Triton kernel normalizes and reduces in a single read."""
