"""GPU tests of the low-latency dispatch and combine kernels, against the
pure-JAX reference, bit for bit (every output and every handle field).

The LL kernels use NVSHMEM, which needs one process per GPU, so each test
launches ll_worker.py as two processes, one GPU each, and reads what they
print:

* every case of `ll_worker.CASES`, on fresh inputs twice: T in {1, 3, 128}
  (Tmax = T or 128), H in {2048, 4096, 7168}, K in {1, 8}, E in {2, 288};
  -1, repeated and out-of-range ids, skewed routing; bf16, fp8, round_scale,
  UE8M0; hooks; zero_copy; zero_padding off. Once per transport.
* 1000 jitted dispatch/combine pairs with fresh routings, enqueued back to
  back, on values whose combine sums are exact: every output equal to the
  reference's; run twice: the same sha256 both times.
* Gradients through a bf16 dispatch, an expert and a combine: the VJPs run
  the kernels (dispatch's is a combine, combine's a bf16 dispatch) and
  equal the reference backend's.
* Normal and low-latency ops in one program, on their kernels, equal to the
  reference backend's.
* A rank that never calls: the other's dispatch names its rank and phase and
  fails instead of hanging.
"""

from __future__ import annotations

import pathlib
import re

import pytest

import ll_worker as worker
from gpu_testing import GPUS, NEEDS_KERNELS, launch_per_gpu

pytestmark = NEEDS_KERNELS + [
    pytest.mark.skipif(len(GPUS) < 2, reason="needs 2 GPUs, one process each")
]
WORKER = pathlib.Path(worker.__file__).resolve()
REPEAT_STEPS = 1000


@pytest.mark.parametrize("transport", ["auto", "put"])
def test_kernels_match_reference(capfd, seed, transport):
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--transport", transport],
      timeout=240)
  report = f"seed={seed}, transport={transport}: {report}"
  assert code == 0, report
  for i in range(2):
    for case in worker.CASES:
      assert f"worker {i}/2: {case.name()} passed" in out, report


def test_repeated_pairs_are_bitwise_repeatable(capfd, seed):
  """Identical inputs give identical bits, launch after launch."""
  digests = []
  for _ in range(2):
    code, out, report = launch_per_gpu(
        capfd, [str(WORKER), "--seed", str(seed), "--repeat",
                str(REPEAT_STEPS)], timeout=180)
    report = f"seed={seed}: {report}"
    assert code == 0, report
    for i in range(2):
      assert f"worker {i}/2: repeat {REPEAT_STEPS} passed" in out, report
    digests.append(sorted(re.findall(
        rf"worker (\d)/2: repeat {REPEAT_STEPS} sha256 ([0-9a-f]{{64}})",
        out)))
    assert len(digests[-1]) == 2, report
  assert digests[0] == digests[1], f"seed={seed}: {digests}"


def test_vjps_on_the_kernels_match_the_reference(capfd, seed):
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--grads"], timeout=180)
  report = f"seed={seed}: {report}"
  assert code == 0, report
  for i in range(2):
    for case in worker.GRAD_CASES:
      assert f"worker {i}/2: grads {case.name()} passed" in out, report


def test_normal_and_low_latency_ops_mix_in_one_program(capfd, seed):
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--mixed"], timeout=180)
  report = f"seed={seed}: {report}"
  assert code == 0, report
  for i in range(2):
    assert f"worker {i}/2: mixed {worker.MIXED_CASE.name()} passed" in out, (
        report)


def test_a_missing_rank_times_out_with_a_report(capfd, seed):
  code, _, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--timeout"], timeout=120)
  assert code not in (0, 3), f"dispatch returned: {report}"
  assert code != 124, f"dispatch hung instead of timing out: {report}"
  assert re.search(r"jax_ep low_latency_dispatch timeout: rank 0, phase "
                   r"'[^']+'", report), report
