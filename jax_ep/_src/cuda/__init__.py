"""Calls into the CUDA kernels of `jax_ep._jax_ep`, one module per op family."""
