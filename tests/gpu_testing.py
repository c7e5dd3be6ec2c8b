"""What the GPU tests share: the local GPUs, their skip marks, and a launch of
one process per GPU that returns a report of every process's output."""

from __future__ import annotations

import sys

import jax
import pytest

from jax_ep._src import launch
from jax_ep._src import native


def _local_gpus() -> list[jax.Device]:
  try:
    return jax.devices("gpu")
  except RuntimeError:  # no GPU backend in this jaxlib or on this machine
    return []


GPUS = _local_gpus()
NEEDS_GPU = [pytest.mark.gpu,
             pytest.mark.skipif(not GPUS, reason="needs a CUDA GPU")]
NEEDS_KERNELS = NEEDS_GPU + [
    pytest.mark.skipif(native.extension() is None,
                       reason=f"jax_ep._jax_ep: {native.unavailable_reason()}")
]
# NVLink multicast stays off (DEVICE.md); no preallocation, so that the peer
# buffers fit beside JAX's memory in each child.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
             "NVSHMEM_DISABLE_NVLS": "1",
             "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def launch_per_gpu(capfd, args: list[str], *, timeout: float,
                   num_ranks: int | None = None):
  """Runs `python *args` as joined processes, one per local GPU, or
  `num_ranks` of them spread evenly over the GPUs (a multiple of them).

  Returns `(exit code, stdout of all processes, a report for failures)`.
  """
  num_ranks = num_ranks or len(GPUS)
  code = launch.launch([sys.executable, *args], num_ranks, platform="gpu",
                       devices_per_process=1, timeout=timeout, env=CHILD_ENV,
                       ranks_per_gpu=num_ranks // len(GPUS))
  out, err = capfd.readouterr()
  report = (f"exit code {code}\n--- stdout ---\n{out}\n--- stderr ---\n"
            f"{err[-20000:]}")
  return code, out, report


def every_worker(message: str, num_ranks: int | None = None) -> list[str]:
  """The line `message` printed by each process of `launch_per_gpu`, as the
  workers print it: "worker i/n: <message>"."""
  n = num_ranks or len(GPUS)
  return [f"worker {i}/{n}: {message}" for i in range(n)]
