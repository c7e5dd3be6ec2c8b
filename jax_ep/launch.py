"""`python -m jax_ep.launch -n N -- CMD ...`: see `jax_ep._src.launch`."""

import sys

from jax_ep._src.launch import initialize as initialize
from jax_ep._src.launch import launch as launch
from jax_ep._src.launch import main as main
from jax_ep._src.launch import ranks_per_gpu as ranks_per_gpu

if __name__ == "__main__":
  sys.exit(main())
