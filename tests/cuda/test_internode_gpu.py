"""GPU tests of the internode dispatch and combine across nodes of one rank
(`Buffer(ranks_per_node=1)`: every row crosses the NVSHMEM exchange,
csrc/internode/exchange.cu), against the dense model, bit for bit.

NVSHMEM needs one process per rank, so each test launches
internode_worker.py through `gpu_testing.launch_per_gpu`: at R = the GPUs
(2 or more) and at 2, 4 and 8 ranks sharing the GPUs
(`gpu_testing.multi_rank_sizes`), i.e. (N, G) = (2, 1), (4, 1), (8, 1) on a
one-GPU machine. NCCL refuses collectives between ranks that share a GPU, so
the dense model is the oracle (tests/workers/test_worker_oracles.py checks
it against the reference on CPUs).

* Every case of intranode_worker's `multiprocess_cases` on fresh inputs:
  T from 1 to 300, H from 256 to 7168 (fp8 scale rows of 8 and 12 bytes), K
  from 1 to 8; -1, repeated and out-of-range ids, skewed routing, capacity
  overflow, expert alignment; bf16 and fp8 dispatch, cached dispatch,
  combine of f32 and bf16 rows with a bias.
* 200 jitted dispatch/combine pairs on fresh routings at R = 2, back to back:
  every output equal to the dense model's; run twice, the same sha256.
* A rank that never calls (R = 2): the other's dispatch names its rank,
  phase and peer and fails instead of hanging.
"""

from __future__ import annotations

import pathlib
import re

import pytest

import internode_worker as worker
import intranode_worker
from gpu_testing import NEEDS_KERNELS, every_worker, launch_per_gpu
from gpu_testing import multi_rank_sizes

pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(worker.__file__).resolve()
REPEAT_PAIRS = 200


@pytest.mark.parametrize("num_ranks", multi_rank_sizes(),
                         ids=lambda r: f"R{r}")
def test_ops_match_the_dense_model(capfd, seed, num_ranks):
  steps = len(intranode_worker.multiprocess_cases(num_ranks))
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--steps", str(steps)],
      timeout=300, num_ranks=num_ranks)
  report = f"seed={seed}, R={num_ranks}: {report}"
  assert code == 0, report
  for line in every_worker(f"{steps} internode steps passed", num_ranks):
    assert line in out, report


def test_repeated_pairs_hash_the_same_twice(capfd, seed):
  digests = []
  for _ in range(2):
    code, out, report = launch_per_gpu(
        capfd, [str(WORKER), "--seed", str(seed), "--repeat",
                str(REPEAT_PAIRS)], timeout=300, num_ranks=2)
    report = f"seed={seed}: {report}"
    assert code == 0, report
    for line in every_worker(f"repeat {REPEAT_PAIRS} passed", 2):
      assert line in out, report
    digests.append(sorted(re.findall(
        rf"worker (\d+)/2: repeat {REPEAT_PAIRS} sha256 ([0-9a-f]{{64}})",
        out)))
  assert len(digests[0]) == 2 and digests[0] == digests[1], digests


def test_a_missing_rank_times_out_with_a_report(capfd, seed):
  code, _, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--timeout"], timeout=120,
      num_ranks=2)
  assert code not in (0, 3), f"dispatch returned: {report}"
  assert code != 124, f"dispatch hung instead of timing out: {report}"
  assert ("jax_ep internode exchange timeout: rank 0, phase 'wait for a "
          "node's chunk', peer 1") in report, report
