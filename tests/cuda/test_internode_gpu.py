"""GPU tests of the internode dispatch and combine across N nodes of G ranks
(`Buffer(ranks_per_node=G)`: rows cross the NVSHMEM exchange between nodes
and are forwarded inside them, csrc/internode/exchange.cu), against the
dense model, bit for bit.

NVSHMEM needs one process per rank, so each test launches
internode_worker.py through `gpu_testing.launch_per_gpu` at the topologies
(N, G) of `TOPOLOGIES` whose R = N * G `gpu_testing.multi_rank_sizes` allows
(R = the GPUs, or ranks sharing the GPUs): on a one-GPU machine all of them.
NCCL refuses collectives between ranks that share a GPU, so the dense model
is the oracle (tests/workers/test_worker_oracles.py checks it against the
reference on CPUs).

* Every case of intranode_worker's `multiprocess_cases` on fresh inputs:
  T from 1 to 300, H from 256 to 7168 (fp8 scale rows of 8 and 12 bytes), K
  from 1 to 8; -1, repeated and out-of-range ids, skewed routing, capacity
  overflow, expert alignment; bf16 and fp8 dispatch, cached dispatch,
  combine of f32 and bf16 rows with a bias; then the VJPs of dispatch (a
  combine, summed node by node) and of combine (a cached dispatch), with
  capacity overflow and skew. At (2, 2) also with a region of a fifth of
  what whole calls need (the larger calls go in pieces) and chunks of 96
  tokens per arrival flag (`Config.rdma_chunk`).
* The low-latency kernels at the same topologies on `ll_transport="put"`
  (ll_worker.py `--ranks-per-node G --transport put --grads --mixed`):
  their VJPs, and one program of internode and low-latency ops whose
  regions share the one NVSHMEM heap. The LL kernels send every row by
  NVSHMEM puts whatever the nodes; their every mode and shape is
  test_low_latency_gpu.py's.
* 200 jitted dispatch/combine pairs on fresh routings at (N, G) = (2, 1) and
  (2, 2), back to back: every output equal to the dense model's; run twice,
  the same sha256.
* A rank that never calls (R = 2): the other's dispatch names its rank,
  phase and peer and fails instead of hanging.
"""

from __future__ import annotations

import pathlib

import pytest

import internode_worker as worker
import intranode_worker
import ll_worker
from gpu_testing import (NEEDS_KERNELS, assert_missing_rank_times_out,
                         every_worker, launch_per_gpu, multi_rank_sizes,
                         repeat_digests)

pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(worker.__file__).resolve()
REPEAT_PAIRS = 200
# (N nodes, G ranks per node): G = 1 (one GPU per node, PCIe boxes), 2 and 4
# (GB200 trays).
TOPOLOGIES = [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4)]


def _runnable(topologies):
  return [pytest.param(n, g, id=f"N{n}-G{g}") for n, g in topologies
          if n * g in multi_rank_sizes()]


@pytest.mark.parametrize("num_nodes,ranks_per_node,region_share,rdma_chunk", [
    *[pytest.param(*p.values, 1.0, 0, id=p.id) for p in _runnable(TOPOLOGIES)],
    *[pytest.param(*p.values, 0.2, 96, id=f"{p.id}-pieces-chunk96")
      for p in _runnable([(2, 2)])]])
def test_ops_match_the_dense_model(capfd, seed, num_nodes, ranks_per_node,
                                   region_share, rdma_chunk):
  num_ranks = num_nodes * ranks_per_node
  steps = len(intranode_worker.multiprocess_cases(num_ranks))
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--steps", str(steps),
              "--ranks-per-node", str(ranks_per_node), "--region-share",
              str(region_share), "--rdma-chunk", str(rdma_chunk)],
      timeout=300, num_ranks=num_ranks)
  report = (f"seed={seed}, N={num_nodes}, G={ranks_per_node}, region share "
            f"{region_share}, rdma_chunk {rdma_chunk}: {report}")
  assert code == 0, report
  for what in (f"{steps} internode steps", "internode VJPs"):
    for line in every_worker(f"{what} passed", num_ranks):
      assert line in out, report


@pytest.mark.parametrize("num_nodes,ranks_per_node", _runnable(TOPOLOGIES))
def test_low_latency_ops_across_nodes(capfd, seed, num_nodes, ranks_per_node):
  num_ranks = num_nodes * ranks_per_node
  code, out, report = launch_per_gpu(
      capfd, [str(pathlib.Path(ll_worker.__file__).resolve()), "--seed",
              str(seed), "--ranks-per-node", str(ranks_per_node),
              "--transport", "put", "--grads", "--mixed"],
      timeout=240, num_ranks=num_ranks)
  report = f"seed={seed}, N={num_nodes}, G={ranks_per_node}: {report}"
  assert code == 0, report
  passed = [f"grads {c.at(num_ranks).name()}" for c in ll_worker.GRAD_CASES]
  passed.append(f"mixed {ll_worker.MIXED_CASE.at(num_ranks).name()}")
  for what in passed:
    for line in every_worker(f"{what} passed", num_ranks):
      assert line in out, report


@pytest.mark.parametrize("num_nodes,ranks_per_node",
                         _runnable([(2, 1), (2, 2)]))
def test_repeated_pairs_hash_the_same_twice(capfd, seed, num_nodes,
                                            ranks_per_node):
  num_ranks = num_nodes * ranks_per_node
  args = [str(WORKER), "--seed", str(seed), "--ranks-per-node",
          str(ranks_per_node)]
  run = lambda: repeat_digests(capfd, args, num_ranks=num_ranks,
                               steps=REPEAT_PAIRS, timeout=300)
  first = run()
  assert run() == first, f"seed={seed}, N={num_nodes}, G={ranks_per_node}"


def test_a_missing_rank_times_out_with_a_report(capfd, seed):
  report = assert_missing_rank_times_out(capfd, WORKER, seed)
  assert ("jax_ep internode exchange timeout: rank 0, phase 'wait for a "
          "peer's chunk', peer 1") in report, report
