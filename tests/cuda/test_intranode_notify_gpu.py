"""GPU tests of the NVLink peer buffers and the intranode notify step.

* One process driving every local GPU: peer buffers over all of them (peer
  access), get_dispatch_layout (CUDA kernel) + notify under jit inside
  shard_map, on fresh skewed routings with -1 entries, checked against a
  numpy model; then 200 back-to-back rounds in one program (lax.scan) and
  repeated jitted calls, every result checked (sequence numbers and slot
  parity).
* One process per GPU: intranode_notify_worker.py launched twice by
  `jax_ep._src.launch.launch` (peer buffers through CUDA IPC).
* Timeout: in a subprocess, only rank 0 calls notify; the kernel must print
  its rank and phase and the process must fail, not hang.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import intranode_notify_worker as worker
from gpu_testing import (CHILD_ENV, GPUS, NEEDS_KERNELS, every_worker,
                         launch_per_gpu)
from jax_ep._src import runtime
from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import peer_buffers



pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(worker.__file__).resolve()
NUM_TOPK = 8
# Environment of the processes these tests start: NVLink multicast stays off
# (docs/processes.md), and no preallocation, since this process already
# holds most of the GPUs' memory.


def _notify_alone(num_ranks: int, num_experts: int):
  """notify on the last GPU alone, outside shard_map."""
  device = GPUS[-1]
  per_rank = jax.device_put(np.zeros(num_ranks, np.int32), device)
  per_expert = jax.device_put(np.zeros(num_experts, np.int32), device)
  return jax.block_until_ready(jax.jit(
      lambda a, b: intranode.notify(a, b, num_ranks=num_ranks,
                                    num_experts=num_experts,
                                    timeout_s=runtime.DEFAULT_TIMEOUT_S))(
                                        per_rank, per_expert))


@pytest.fixture(scope="module")
def mesh():
  buffers = peer_buffers.create_peer_buffers(GPUS, 1 << 20)
  yield Mesh(np.array(GPUS), (worker.EP,))
  buffers.close()


# First in the file, before the module's `mesh` fixture creates the buffers.
def test_notify_without_buffers_fails_clearly():
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match="none were created for this device"):
    _notify_alone(1, 4)


# Before the tests that run notify on every device: a failed side-effecting
# call leaves an error token that JAX re-raises at exit unless a later call
# on the device replaces it.
def test_buffers_of_another_size_are_refused(mesh):
  del mesh
  num_ranks = len(GPUS) + 1
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=f"created for {len(GPUS)} ranks"):
    _notify_alone(num_ranks, 4 * num_ranks)


def _check(counts, recv, topk, num_experts, alignment, what):
  want_counts, want_recv = worker.expected(topk, num_experts, alignment)
  num_ranks = len(GPUS)
  np.testing.assert_array_equal(
      np.asarray(counts),
      np.broadcast_to(want_counts, (num_ranks,) + want_counts.shape),
      strict=True, err_msg=f"count_matrix ({what})")
  np.testing.assert_array_equal(np.asarray(recv), want_recv, strict=True,
                                err_msg=f"recv_tokens_per_expert ({what})")


@pytest.mark.parametrize("experts_per_rank", [1, 8, 128])
@pytest.mark.parametrize("alignment", [1, 128])
@pytest.mark.parametrize("num_tokens", [0, 1, 512])
def test_notify_matches_model(mesh, seed, experts_per_rank, alignment,
                              num_tokens):
  rng = np.random.default_rng(seed)
  num_experts = experts_per_rank * len(GPUS)
  step = worker.notify_step(mesh, num_experts, alignment)
  num_topk = min(NUM_TOPK, num_experts)  # the layout needs K <= E
  for call in range(3):
    topk = worker.random_routing(rng, len(GPUS), num_tokens, num_topk,
                                 num_experts)
    counts, recv = step(topk.reshape(-1, num_topk))
    _check(counts, recv, topk, num_experts, alignment,
           f"seed={seed}, call {call}, E={num_experts}, align={alignment}, "
           f"T={num_tokens}")


def test_200_rounds_in_one_program(mesh, seed):
  rng = np.random.default_rng(seed)
  num_experts, alignment, rounds = 32 * len(GPUS), 4, 200
  topk = np.stack([
      worker.random_routing(rng, len(GPUS), 96, NUM_TOPK, num_experts)
      for _ in range(rounds)
  ])  # [N, R, T, K]
  flat = topk.reshape(rounds, -1, NUM_TOPK)
  counts, recv = worker.notify_scan(mesh, num_experts, alignment)(flat)
  counts, recv = np.asarray(counts), np.asarray(recv)
  for i in range(rounds):
    _check(counts[i], recv[i], topk[i], num_experts, alignment,
           f"seed={seed}, round {i} of the scan")


def test_200_repeated_jitted_calls(mesh, seed):
  rng = np.random.default_rng(seed)
  num_experts = 16 * len(GPUS)
  steps = {a: worker.notify_step(mesh, num_experts, a) for a in (1, 8)}
  results = []
  for i in range(200):
    alignment = (1, 8)[i % 2]
    topk = worker.random_routing(rng, len(GPUS), 64, NUM_TOPK, num_experts)
    results.append((topk, alignment,
                    steps[alignment](topk.reshape(-1, NUM_TOPK))))
  for i, (topk, alignment, (counts, recv)) in enumerate(results):
    _check(counts, recv, topk, num_experts, alignment,
           f"seed={seed}, call {i}")


def test_one_process_per_gpu(capfd, seed):
  if len(GPUS) < 2:
    pytest.skip("needs 2 GPUs")
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--mode", "multiprocess",
              "--steps", "40"], timeout=150)
  report = f"seed={seed}: {report}"
  assert code == 0, report
  for line in every_worker("40 notify steps passed"):
    assert line in out, report


def test_a_missing_rank_times_out_with_a_report(seed):
  if len(GPUS) < 2:
    pytest.skip("needs 2 GPUs")
  env = {**os.environ, **CHILD_ENV}
  try:
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--seed", str(seed), "--mode",
         "timeout"], capture_output=True, text=True, timeout=120, env=env)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"notify hung instead of timing out: {e}")
  report = (f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr[-20000:]}")
  assert proc.returncode != 0, report
  assert ("jax_ep intranode_notify timeout: rank 0, phase 'wait for the "
          "peers' count slots', peer 1") in proc.stdout + proc.stderr, report


def test_creating_twice_is_refused(mesh):
  del mesh
  with pytest.raises(ValueError, match="already created"):
    peer_buffers.create_peer_buffers(GPUS[:1], 1024)


def test_buffer_bytes():
  assert peer_buffers.buffer_bytes(1000, 2) > 1024
  # The control region: counters, count slots and 4096 arrival flags (8
  # bytes) per rank.
  control = peer_buffers.buffer_bytes(1 << 20, 8) - (1 << 20)
  assert 8 * 4096 * 8 <= control < (1 << 19)
