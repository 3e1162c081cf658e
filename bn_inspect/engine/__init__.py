"""Hooks and dispatch capture, exact per-channel moments and their merge, reduced axes, fused kernels."""
