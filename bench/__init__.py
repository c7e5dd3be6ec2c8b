"""jax_ep benchmarks: `python -m bench --help`."""
