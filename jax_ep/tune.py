"""`python -m jax_ep.tune [...]`: see `jax_ep._src.tune`."""

import sys

from jax_ep._src.tune import main as main

if __name__ == "__main__":
  sys.exit(main())
