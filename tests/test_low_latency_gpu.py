"""GPU tests of the low-latency dispatch and combine kernels, against the
pure-JAX reference, bit for bit (every output and every handle field).

The LL kernels use NVSHMEM, which needs one process per GPU, so each test
launches ll_worker.py as one process per local GPU (R of them; one GPU is
R = 1, where every row stays on the GPU) and reads what they print:

* every case of `ll_worker.CASES`, on fresh inputs twice: T from 1 to 128
  (Tmax = T, T + 1 to 10, or 128), H from 256 to 7168 (fp8 scale rows that
  are not whole 16 bytes among them), K from 1 to 8, E from R to 288;
  -1, repeated and out-of-range ids, skewed routing; bf16, fp8, round_scale,
  UE8M0; hooks; zero_copy; zero_padding off. Once per transport.
* 1000 jitted dispatch/combine pairs with fresh routings, enqueued back to
  back, on values whose combine sums are exact: every output equal to the
  dense model's; run twice: the same sha256 both times.
* Gradients through a bf16 dispatch, an expert and a combine: the VJPs run
  the kernels (dispatch's is a combine, combine's a bf16 dispatch) and
  equal the reference backend's.
* Normal and low-latency ops in one program, on their kernels, equal to the
  dense model's and the reference backend's.
* A rank that never calls: the other's dispatch names its rank and phase and
  fails instead of hanging (2 GPUs and more).
"""

from __future__ import annotations

import pathlib
import re

import pytest

import ll_worker as worker
from gpu_testing import GPUS, NEEDS_KERNELS, every_worker, launch_per_gpu

pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(worker.__file__).resolve()
REPEAT_STEPS = 1000


def run_worker(capfd, seed, args: list[str], passed: list[str], *,
               timeout: float) -> str:
  """Runs ll_worker.py with `args`, one process per GPU; each must exit 0
  and print "worker i/R: <p> passed" for every `p` of `passed`. Returns
  stdout."""
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), *args], timeout=timeout)
  report = f"seed={seed}, {' '.join(args)}: {report}"
  assert code == 0, report
  for name in passed:
    for line in every_worker(f"{name} passed"):
      assert line in out, report
  return out


@pytest.mark.parametrize("transport", ["auto", "put"])
def test_kernels_match_reference(capfd, seed, transport):
  run_worker(capfd, seed, ["--transport", transport],
             [case.at(len(GPUS)).name() for case in worker.CASES],
             timeout=240)


def test_repeated_pairs_are_bitwise_repeatable(capfd, seed):
  """Identical inputs give identical bits, launch after launch."""
  digests = []
  for _ in range(2):
    out = run_worker(capfd, seed, ["--repeat", str(REPEAT_STEPS)],
                     [f"repeat {REPEAT_STEPS}"], timeout=180)
    digests.append(sorted(re.findall(
        rf"worker (\d+)/{len(GPUS)}: repeat {REPEAT_STEPS} sha256 "
        r"([0-9a-f]{64})", out)))
    assert len(digests[-1]) == len(GPUS), f"seed={seed}: {out}"
  assert digests[0] == digests[1], f"seed={seed}: {digests}"


def test_vjps_on_the_kernels_match_the_reference(capfd, seed):
  run_worker(capfd, seed, ["--grads"],
             [f"grads {case.at(len(GPUS)).name()}"
              for case in worker.GRAD_CASES],
             timeout=180)


def test_normal_and_low_latency_ops_mix_in_one_program(capfd, seed):
  run_worker(capfd, seed, ["--mixed"],
             [f"mixed {worker.MIXED_CASE.at(len(GPUS)).name()}"], timeout=180)


@pytest.mark.skipif(len(GPUS) < 2, reason="needs 2 GPUs, one process each")
def test_a_missing_rank_times_out_with_a_report(capfd, seed):
  code, _, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--timeout"], timeout=120)
  assert code not in (0, 3), f"dispatch returned: {report}"
  assert code != 124, f"dispatch hung instead of timing out: {report}"
  assert re.search(r"jax_ep low_latency_dispatch timeout: rank 0, phase "
                   r"'[^']+'", report), report
