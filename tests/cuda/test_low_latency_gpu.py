"""GPU tests of the low-latency dispatch and combine kernels, against the
dense model (every output and handle field, bit for bit) and, where each rank
has its own GPU, the pure-JAX reference.

The LL kernels use NVSHMEM, which needs one process per rank, so each test
launches ll_worker.py through `gpu_testing.launch_per_gpu` and reads what its
processes print. The tests run at R = the GPUs (one process each; one GPU
is R = 1, where every row stays on the GPU) and, but where sizes are named
below, at 2, 4 and 8 where those are multiples of the GPUs
(`gpu_testing.multi_rank_sizes`): several ranks then share each GPU, which
time-slices between them, and NCCL refuses the reference's collectives, so
the dense model is the only oracle. Test ids name R.

* Each transport ("auto", "put") in one launch per R: the cases on fresh
  inputs twice, `ll_worker.CASES` where each rank has its own GPU and on
  "auto" at R = 2, else `ll_worker.SHARED_CASES` (every mode, small shapes):
  T from 1 to 128 (Tmax = T, T + 1 to 10, or 128), H from 256 to 7168 (fp8
  scale rows that are not whole 16 bytes among them), K from 1 to 8, E from
  R to 288; -1, repeated and out-of-range ids, skewed routing; bf16, fp8,
  round_scale, UE8M0; hooks; zero_copy; zero_padding off. The "auto" launch
  then runs, since a launch costs 10-20 s:
  - the VJPs straight out of the ops against the dense model: a bf16
    dispatch's (the combine kernels) and a combine's (two dispatches and a
    combine on the kernels); where each rank has its own GPU, also
    gradients through a dispatch, an expert and a combine equal to the
    reference backend's;
  - normal and low-latency ops in one program, on their kernels.
* 1000 jitted dispatch/combine pairs at R = the GPUs with fresh routings,
  enqueued back to back, on values whose combine sums are exact: every
  output equal to the dense model's; run twice: the same sha256 both times.
  Pressure (marked `pressure`; scripts/gpu_check.sh runs it in a call of its
  own): the same with gpu_testing.PRESSURE_PAIRS pairs (7,500 at R = 2, 200
  at R = 8).
* A rank that never calls (R = 2: one GPU each, or sharing one): the other's
  dispatch names its rank and phase and fails instead of hanging.
"""

from __future__ import annotations

import pathlib
import re

import pytest

import ll_worker as worker
from gpu_testing import (GPUS, NEEDS_KERNELS, PRESSURE_PAIRS,
                         assert_missing_rank_times_out, every_worker,
                         launch_per_gpu, multi_rank_sizes, repeat_digests)

pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(worker.__file__).resolve()
# One process per GPU (1 without GPUs, where every test skips), then ranks
# sharing each GPU.
PER_GPU = max(len(GPUS), 1)
SIZES = sorted({PER_GPU, *multi_rank_sizes()})
# --repeat pairs per run at R = the GPUs; the pressure runs where ranks share
# a GPU take gpu_testing.PRESSURE_PAIRS.
REPEAT_STEPS = 1000


def _ranks_id(num_ranks: int) -> str:
  return f"R{num_ranks}"


def run_worker(capfd, seed, num_ranks: int, args: list[str],
               passed: list[str], *, timeout: float) -> str:
  """Runs ll_worker.py with `args` as `num_ranks` processes; each must exit
  0 and print "worker i/R: <p> passed" for every `p` of `passed`. Returns
  stdout."""
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), *args], timeout=timeout,
      num_ranks=num_ranks)
  report = f"seed={seed}, R={num_ranks}, {' '.join(args)}: {report}"
  assert code == 0, report
  for name in passed:
    for line in every_worker(f"{name} passed", num_ranks):
      assert line in out, report
  return out


@pytest.mark.parametrize("num_ranks", SIZES, ids=_ranks_id)
@pytest.mark.parametrize("transport", ["auto", "put"])
def test_kernels_match_the_dense_model(capfd, seed, transport, num_ranks):
  """The cases on `transport`; on "auto" the VJPs and the mixed program in
  the same launch."""
  # Where ranks share a GPU, every call is slower (time-slicing) and the
  # host's dense model of a case grows with R: the subset, but at R = 2 on
  # "auto".
  every_case = num_ranks <= len(GPUS) or (num_ranks == 2 and
                                          transport == "auto")
  cases = worker.CASES if every_case else worker.SHARED_CASES
  args = ["--transport", transport, "--cases",
          "all" if every_case else "shared"]
  passed = [case.at(num_ranks).name() for case in cases]
  if transport == "auto":
    args += ["--grads", "--mixed"]
    passed += [f"grads {case.at(num_ranks).name()}"
               for case in worker.GRAD_CASES]
    passed.append(f"mixed {worker.MIXED_CASE.at(num_ranks).name()}")
  # Bounds for a hang, well above a run (a minute or two expected).
  run_worker(capfd, seed, num_ranks, args, passed,
             timeout=360 if every_case else 240)


@pytest.mark.parametrize("num_ranks, steps", [
    pytest.param(PER_GPU, REPEAT_STEPS,
                 id=f"{_ranks_id(PER_GPU)}-{REPEAT_STEPS}"),
    *[pytest.param(r, PRESSURE_PAIRS[r], marks=pytest.mark.pressure,
                   id=f"{_ranks_id(r)}-{PRESSURE_PAIRS[r]}")
      for r in multi_rank_sizes() if r in PRESSURE_PAIRS]])
def test_repeated_pairs_hash_the_same_twice(capfd, seed, num_ranks, steps):
  """Identical inputs give identical bits, launch after launch."""
  # Launch and compile, then 10 ms a pair per rank (a pair takes 5 ms at
  # R = 2 sharing a GPU, 35 at R = 8).
  run = lambda: repeat_digests(capfd, [str(WORKER), "--seed", str(seed)],
                               num_ranks=num_ranks, steps=steps,
                               timeout=90 + steps * num_ranks / 100)
  first = run()
  assert run() == first, f"seed={seed}, R={num_ranks}: two runs differ"


@pytest.mark.parametrize("num_ranks", [2], ids=_ranks_id)
def test_a_missing_rank_times_out_with_a_report(capfd, seed, num_ranks):
  """Rank 1 never calls (one GPU each, or sharing one)."""
  report = assert_missing_rank_times_out(capfd, WORKER, seed, num_ranks)
  assert re.search(r"jax_ep low_latency_dispatch timeout: rank 0, phase "
                   r"'[^']+'", report), report
