"""The intranode notify step on GPUs: shared test code and a worker script.

Imported by test_intranode_notify_gpu.py (one process driving every GPU) and
run as a script by it:

    python intranode_notify_worker.py --seed N --mode multiprocess
        one process of a `jax_ep._src.launch.launch` group (one GPU each):
        peer buffers through CUDA IPC, layout + notify on fresh routings,
        each process checks the shards it holds; prints "... passed".
    python intranode_notify_worker.py --seed N --mode timeout
        one process, at least 2 GPUs: only rank 0 calls notify, with a short
        timeout, so its wait for rank 1 must time out; the kernel prints the
        rank and phase and traps, and this process must exit non-zero.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import traceback

# Run as a script: tests/support first, where repo_paths puts the repository
# and the other test folders on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "support"))
import repo_paths  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep._src import runtime
from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import layout as cuda_layout

EP = "ep"


def random_routing(rng: np.random.Generator, num_ranks: int, num_tokens: int,
                   num_topk: int, num_experts: int) -> np.ndarray:
  """int32[R, T, K]: skewed routing with -1 entries, a hot expert, repeats,
  and sometimes a rank that no token selects."""
  ids = rng.integers(0, num_experts, (num_ranks, num_tokens, num_topk),
                     dtype=np.int32)
  hot = int(rng.integers(num_experts))
  ids[rng.random((num_ranks, num_tokens)) < 0.6, 0] = hot
  ids[rng.random(ids.shape) < 0.15] = -1
  if num_ranks > 1 and rng.random() < 0.3:
    experts_per_rank = num_experts // num_ranks
    ids[ids >= num_experts - experts_per_rank] = -1  # the last rank gets none
  return ids


def expected(topk: np.ndarray, num_experts: int, alignment: int):
  """count_matrix int32[R, R] and recv_tokens_per_expert int32[R, L] from
  topk int32[R, T, K], one token at a time."""
  num_ranks = topk.shape[0]
  local = num_experts // num_ranks
  counts = np.zeros((num_ranks, num_ranks), np.int64)
  per_expert = np.zeros((num_ranks, num_experts), np.int64)
  for s in range(num_ranks):
    for row in topk[s]:
      valid = row[(row >= 0) & (row < num_experts)]
      np.add.at(per_expert[s], valid, 1)
      for d in set((valid // local).tolist()):
        counts[s, d] += 1
  recv = per_expert.sum(0).reshape(num_ranks, local)
  recv = -(-recv // alignment) * alignment
  return counts.astype(np.int32), recv.astype(np.int32)


def _per_shard(idx, *, num_ranks, num_experts, alignment, timeout_s):
  per_rank, per_expert, _, _ = cuda_layout.get_dispatch_layout(
      idx, num_experts=num_experts, num_ranks=num_ranks)
  return intranode.notify(per_rank, per_expert, num_ranks=num_ranks,
                          num_experts=num_experts, expert_alignment=alignment,
                          timeout_s=timeout_s)


@functools.cache
def notify_step(mesh: Mesh, num_experts: int, alignment: int,
                timeout_s: float = runtime.DEFAULT_TIMEOUT_S):
  """jit(shard_map(layout + notify)): topk int32[R*T, K] (sharded over ranks)
  -> (count_matrix int32[R, R, R], recv int32[R, L]), rank-major."""
  num_ranks = mesh.devices.size

  def per_shard(idx):
    counts, recv = _per_shard(idx, num_ranks=num_ranks,
                              num_experts=num_experts, alignment=alignment,
                              timeout_s=timeout_s)
    return counts[None], recv[None]

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                               out_specs=(P(EP), P(EP))))


@functools.cache
def notify_scan(mesh: Mesh, num_experts: int, alignment: int):
  """N back-to-back notify rounds in one program (lax.scan): topk
  int32[N, R*T, K] -> (int32[N, R, R, R], int32[N, R, L])."""
  num_ranks = mesh.devices.size

  def per_shard(idx):
    def body(carry, step_idx):
      counts, recv = _per_shard(
          step_idx, num_ranks=num_ranks, num_experts=num_experts,
          alignment=alignment, timeout_s=runtime.DEFAULT_TIMEOUT_S)
      return carry, (counts[None], recv[None])

    _, out = lax.scan(body, None, idx)
    return out

  spec = P(None, EP)
  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=spec,
                               out_specs=(spec, spec)))


def global_array(mesh: Mesh, a: np.ndarray, spec) -> jax.Array:
  return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec),
                                      lambda index: a[index])


def check_local_shards(got: jax.Array, want: np.ndarray, what: str) -> int:
  """Compares this process's shards of `got` with `want`; returns how many."""
  n = 0
  for shard in got.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index],
                                  strict=True,
                                  err_msg=f"{what}, shard {shard.index}")
    n += 1
  return n


def run_multiprocess(seed: int, steps: int) -> None:
  from jax_ep._src.cuda import peer_buffers  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  num_ranks = len(devices)
  mesh = Mesh(np.array(devices), (EP,))
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  with peer_buffers.create_peer_buffers(devices, 1 << 20) as buffers:
    print(f"{who}: {buffers}", flush=True)
    rng = np.random.default_rng(seed)  # the same draws on every process
    for step in range(steps):
      num_experts = num_ranks * int(rng.choice([1, 4, 32]))
      alignment = int(rng.choice([1, 4, 128]))
      num_tokens = int(rng.choice([0, 1, 64, 300]))
      num_topk = min(4, num_experts)  # the layout needs K <= E
      topk = random_routing(rng, num_ranks, num_tokens, num_topk, num_experts)
      counts, recv = notify_step(mesh, num_experts, alignment)(
          global_array(mesh, topk.reshape(-1, num_topk), P(EP)))
      want_counts, want_recv = expected(topk, num_experts, alignment)
      what = (f"{who}, seed={seed}, step {step}, E={num_experts}, "
              f"align={alignment}, T={num_tokens}")
      check_local_shards(counts, np.broadcast_to(
          want_counts, (num_ranks,) + want_counts.shape), what + ", counts")
      check_local_shards(recv, want_recv, what + ", recv")
    jax.block_until_ready((counts, recv))
    # Every process must be done with the buffers before any frees them.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("jax_ep notify test done")
  print(f"{who}: {steps} notify steps passed", flush=True)


def run_timeout(seed: int) -> None:
  """Rank 0 alone calls notify: its wait for rank 1 must time out."""
  del seed
  from jax_ep._src.cuda import peer_buffers  # pylint: disable=g-import-not-at-top
  gpus = jax.devices("gpu")[:2]
  peer_buffers.create_peer_buffers(gpus, 1 << 16)
  num_experts = 8
  per_rank = jax.device_put(np.array([3, 4], np.int32), gpus[0])
  per_expert = jax.device_put(np.arange(num_experts, dtype=np.int32), gpus[0])
  call = jax.jit(functools.partial(intranode.notify, num_ranks=2,
                                   num_experts=num_experts, timeout_s=0.5))
  out = call(per_rank, per_expert)
  jax.block_until_ready(out)
  print("notify returned without a timeout", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--mode", choices=("multiprocess", "timeout"),
                      required=True)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args(argv)
  try:
    if args.mode == "multiprocess":
      import jax_ep.launch  # pylint: disable=g-import-not-at-top
      jax_ep.launch.initialize()
      run_multiprocess(args.seed, args.steps)
    else:
      run_timeout(args.seed)
      return 3  # no timeout is a failure too
  except BaseException:  # pylint: disable=broad-except
    # Exit now: at a normal exit jax.distributed's shutdown would wait for
    # the other processes, which may be blocked in a collective.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
