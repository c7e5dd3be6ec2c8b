"""Times the intranode dispatch and combine kernels (one process, every GPU).

A jitted `lax.scan` of N calls per program (what a model sees, launches
included); the per-call time is the program's wall time / N, median over
repetitions. The pure-JAX reference runs the same scans as the baseline.

    python scripts/time_intranode.py [--tokens 4096 --hidden 7168 --topk 8
        --experts 256 --calls 20 --reps 10 --num-sms 24]

Logical bandwidth (DESIGN.md §8): bytes of all received rows (local ones
included) / time; link: bytes of rows received from another GPU / time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import peer_buffers
from jax_ep._src.reference import normal as reference

EP = "ep"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--hidden", type=int, default=7168)
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--calls", type=int, default=20)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--num-sms", type=int, default=intranode.DEFAULT_NUM_SMS)
  args = ap.parse_args()
  gpus = jax.devices("gpu")
  R, T, H, K, E = len(gpus), args.tokens, args.hidden, args.topk, args.experts
  M = R * T
  mesh = Mesh(np.array(gpus), (EP,))
  buffers = peer_buffers.create_peer_buffers(
      gpus, intranode.intranode_buffer_bytes(T, H, K, R, M))
  rng = np.random.default_rng(0)
  # Uniform routing, as DeepEP's tests draw it (random scores, top-k).
  scores = rng.random((R * T, E)).astype(np.float32)
  topk = np.argsort(-scores, axis=1)[:, :K].astype(np.int32)
  sharding = NamedSharding(mesh, P(EP))
  x = jax.device_put(jnp.asarray(rng.standard_normal((R * T, H)),
                                 jnp.bfloat16), sharding)
  idx = jax.device_put(topk, sharding)
  w = jax.device_put(rng.random((R * T, K)).astype(np.float32), sharding)
  kw = dict(axis_name=EP, num_ranks=R, num_experts=E, capacity=M,
            expert_alignment=1)

  def kernel_dispatch(x, idx, w):
    return intranode.dispatch((x,), idx, w, buffers=buffers,
                              num_sms=args.num_sms, **kw)

  def reference_dispatch(x, idx, w):
    return reference.dispatch((x,), idx, w, **kw)

  def kernel_combine(y, h):
    return intranode.combine(y, h, axis_name=EP, buffers=buffers,
                             out_dtype=y.dtype, num_sms=args.num_sms)

  def reference_combine(y, h):
    return reference.combine(y, h, axis_name=EP).astype(y.dtype)

  def dispatch_program(fn):
    def per_shard(x, idx, w):
      # The carry (always 0) makes each call depend on the previous one, so
      # XLA can neither hoist nor reorder them.
      def body(c, _):
        rows, _, _, _, h = fn(x, idx + c, w)
        return c + (rows[0][0, 0] * 0).astype(jnp.int32), None
      c, _ = lax.scan(body, idx[0, 0] * 0, None, length=args.calls)
      return c[None]
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                                 out_specs=P(EP)))

  def combine_program(dispatch_fn, combine_fn):
    def per_shard(x, idx, w):
      rows, _, _, _, h = dispatch_fn(x, idx, w)
      y = rows[0]

      def body(c, _):
        out = combine_fn(y, dataclasses.replace(h, recv_row=h.recv_row + c))
        return c + (out[0, 0] * 0).astype(jnp.int32), None
      c, _ = lax.scan(body, idx[0, 0] * 0, None, length=args.calls)
      return c[None]
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                                 out_specs=P(EP)))

  def timed(program, n_extra_dispatch=0):
    jax.block_until_ready(program(x, idx, w))  # compile + warm up
    jax.block_until_ready(program(x, idx, w))
    times = []
    for _ in range(args.reps):
      start = time.perf_counter()
      jax.block_until_ready(program(x, idx, w))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  # Received rows: per rank, sum over sources of tokens selecting it.
  local = topk.reshape(R, T, K) // (E // R)
  recv_rows = sum(int((local[s] == d).any(-1).sum())
                  for s in range(R) for d in range(R))
  link_rows = sum(int((local[s] == d).any(-1).sum())
                  for s in range(R) for d in range(R) if s != d)
  row_bytes = H * 2
  records = []
  for impl, d_fn, c_fn in (("jax_ep", kernel_dispatch, kernel_combine),
                           ("reference", reference_dispatch,
                            reference_combine)):
    t_d = timed(dispatch_program(d_fn)) / args.calls
    t_dc = timed(combine_program(d_fn, c_fn))
    one = timed(combine_program(d_fn, lambda y, h: y[:T] * 0))  # 1 dispatch
    t_c = max(t_dc - one, 0.0) / args.calls
    for op, t in (("dispatch", t_d), ("combine", t_c)):
      per_rank = recv_rows / R * row_bytes
      records.append(dict(
          op=op, impl=impl, dtype="bf16", tokens=T, hidden=H, topk=K,
          experts=E, ranks=R, num_sms=args.num_sms if impl == "jax_ep" else None,
          time_us=round(t * 1e6, 1),
          logical_gbps=round(per_rank / t / 1e9, 1),
          link_gbps=round(link_rows / R * row_bytes / t / 1e9, 1),
          device=gpus[0].device_kind))
      print(json.dumps(records[-1]), flush=True)
  buffers.close()


if __name__ == "__main__":
  main()
