"""What the GPU tests share: the local GPUs, their skip marks, the EP sizes of
the multi-rank tests, and a launch of one process per rank that returns a
report of every process's output."""

from __future__ import annotations

import re
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
# EP sizes of the multi-rank tests beyond one process per GPU: several ranks
# share each GPU (`jax_ep.launch --ranks-per-gpu`), which checks the
# multi-rank paths on a one-GPU machine. The GPU time-slices between them.
SHARED_RANKS = (2, 4, 8)
# Dispatch/combine pairs per run of the pressure tests (`-m pressure`, run
# twice each), sized so that both families' runs and the sanitizers fit one
# 10-minute device call beside the build (scripts/gpu_check.sh). Measured on
# one H200: two runs of 10,000 pairs took 246 s (intranode) and 203-219 s
# (low-latency) at R = 2; two of 200 took 37 and 32 s at R = 8, where
# time-slicing 8 ranks makes a pair some 35 ms.
PRESSURE_PAIRS = {2: 7_500, 8: 200}


def multi_rank_sizes(sizes=SHARED_RANKS) -> list[int]:
  """The EP sizes a multi-rank test runs at: one process per local GPU (when
  there are 2 or more), and each of `sizes` above the GPU count that is a
  multiple of it (then several processes share each GPU)."""
  if not GPUS:
    return []
  n = len(GPUS)
  return sorted({n} - {1} | {r for r in sizes if r > n and r % n == 0})


# NVLink multicast stays off (docs/processes.md); no preallocation, so that
# the peer buffers fit beside JAX's memory in each child.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
             "NVSHMEM_DISABLE_NVLS": "1",
             "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def launch_per_gpu(capfd, args: list[str], *, timeout: float,
                   num_ranks: int | None = None):
  """Runs `python *args` as joined processes, one per local GPU, or
  `num_ranks` of them: one per GPU on the first ones, or (a multiple of the
  GPUs) spread evenly over them.

  Returns `(exit code, stdout of all processes, a report for failures)`.
  """
  num_ranks = num_ranks or len(GPUS)
  code = launch.launch([sys.executable, *args], num_ranks, platform="gpu",
                       devices_per_process=1, timeout=timeout, env=CHILD_ENV,
                       ranks_per_gpu=max(1, num_ranks // len(GPUS)))
  out, err = capfd.readouterr()
  report = (f"exit code {code}\n--- stdout ---\n{out}\n--- stderr ---\n"
            f"{err[-20000:]}")
  return code, out, report


def every_worker(message: str, num_ranks: int | None = None) -> list[str]:
  """The line `message` printed by each process of `launch_per_gpu`, as the
  workers print it: "worker i/n: <message>"."""
  n = num_ranks or len(GPUS)
  return [f"worker {i}/{n}: {message}" for i in range(n)]


def assert_missing_rank_times_out(capfd, worker, seed: int,
                                  num_ranks: int = 2) -> str:
  """Launches `worker --seed seed --timeout` as `num_ranks` processes, in
  which rank 1 never calls: the run must fail, neither hang nor return.
  Returns the report, which holds the kernel's timeout message."""
  code, _, report = launch_per_gpu(
      capfd, [str(worker), "--seed", str(seed), "--timeout"], timeout=120,
      num_ranks=num_ranks)
  assert code not in (0, 3), f"dispatch returned: {report}"
  assert code != 124, f"dispatch hung instead of timing out: {report}"
  return report


def repeat_digests(capfd, args: list[str], *, num_ranks: int, steps: int,
                   timeout: float) -> list[tuple[str, str]]:
  """Launches a worker's `--repeat steps` run (`args` its command line) as
  `num_ranks` processes; each must pass and print the sha256 of its
  outputs. Returns the (rank, sha256) pairs, sorted: two runs with the same
  seed must return the same."""
  code, out, report = launch_per_gpu(capfd, [*args, "--repeat", str(steps)],
                                     timeout=timeout, num_ranks=num_ranks)
  report = f"{' '.join(args)}, R={num_ranks}: {report}"
  assert code == 0, report
  for line in every_worker(f"repeat {steps} passed", num_ranks):
    assert line in out, report
  digests = sorted(re.findall(
      rf"worker (\d+)/{num_ranks}: repeat {steps} sha256 ([0-9a-f]{{64}})",
      out))
  assert len(digests) == num_ranks, report
  return digests
