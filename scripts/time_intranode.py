"""Times the intranode dispatch and combine kernels (one process, every GPU).

A jitted `lax.scan` of N calls per program (what a model sees, launches
included); the per-call time is the program's wall time / N, median over
repetitions. The pure-JAX reference runs the same scans as the baseline.

    python scripts/time_intranode.py [--tokens 4096 --hidden 7168 --topk 8
        --experts 256 --calls 20 --reps 10 --fp8
        --tunings 24:8:0,24:12:0] [--no-reference]

Each tuning is num_sms:send_warps:chunk_tokens (0: automatic chunks).

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
from jax_ep._src.fp8 import FP8_DTYPE, per_token_cast_to_fp8
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
  ap.add_argument("--tunings", default="24:8:0")
  ap.add_argument("--fp8", action="store_true")
  ap.add_argument("--no-reference", action="store_true")
  args = ap.parse_args()
  tunings = [dict(zip(("num_sms", "send_warps", "chunk_tokens"),
                      map(int, t.split(":")))) for t in args.tunings.split(",")]
  gpus = jax.devices("gpu")
  R, T, H, K, E = len(gpus), args.tokens, args.hidden, args.topk, args.experts
  M = R * T
  mesh = Mesh(np.array(gpus), (EP,))
  buffers = peer_buffers.create_peer_buffers(
      gpus, intranode.intranode_buffer_bytes(
          T, H, K, R, FP8_DTYPE if args.fp8 else jnp.bfloat16))
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

  def rows_of(x):
    return per_token_cast_to_fp8(x) if args.fp8 else (x,)

  def kernel_fns(tuning):
    def dispatch(rows, idx, w):
      return intranode.dispatch(rows, idx, w, buffers=buffers, **kw, **tuning)

    def combine(y, h):
      return intranode.combine(y, h, axis_name=EP, buffers=buffers,
                               out_dtype=y.dtype, **tuning)

    def cached(rows, h):
      return intranode.cached_dispatch(rows, h, axis_name=EP, buffers=buffers,
                                       **tuning)
    return dispatch, combine, cached

  def reference_dispatch(rows, idx, w):
    return reference.dispatch(rows, idx, w, **kw)

  def reference_combine(y, h):
    return reference.combine(y, h, axis_name=EP).astype(y.dtype)

  def reference_cached(rows, h):
    return reference.dispatch(rows, handle=h, **kw)[0]

  def dispatch_program(fn):
    def per_shard(x, idx, w):
      x_rows = rows_of(x)  # the fp8 cast stays out of the timed loop
      # The carry (always 0) makes each call depend on the previous one, so
      # XLA can neither hoist nor reorder them.
      def body(c, _):
        rows, _, _, _, h = fn(x_rows, idx + c, w)
        return c + (rows[0][0, 0] * 0).astype(jnp.int32), None
      c, _ = lax.scan(body, idx[0, 0] * 0, None, length=args.calls)
      return c[None]
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                                 out_specs=P(EP)))

  def combine_program(dispatch_fn, combine_fn):
    def per_shard(x, idx, w):
      rows, _, _, _, h = dispatch_fn(rows_of(x), idx, w)
      y = rows[0].astype(jnp.bfloat16)

      def body(c, _):
        out = combine_fn(y, dataclasses.replace(h, recv_row=h.recv_row + c))
        return c + (out[0, 0] * 0).astype(jnp.int32), None
      c, _ = lax.scan(body, idx[0, 0] * 0, None, length=args.calls)
      return c[None]
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                                 out_specs=P(EP)))

  def cached_program(dispatch_fn, cached_fn):
    def per_shard(x, idx, w):
      x_rows = rows_of(x)
      _, _, _, _, h = dispatch_fn(x_rows, idx, w)

      def body(c, _):
        rows = cached_fn(x_rows, dataclasses.replace(h, recv_row=h.recv_row + c))
        return c + (rows[0][0, 0] * 0).astype(jnp.int32), None
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
  row_bytes = H + H // 128 * 4 if args.fp8 else H * 2
  records = []
  dtype = "fp8" if args.fp8 else "bf16"
  impls = [("jax_ep", t, *kernel_fns(t)) for t in tunings]
  if not args.no_reference:
    impls.append(("reference", None, reference_dispatch, reference_combine,
                  reference_cached))
  for impl, tuning, d_fn, c_fn, cached_fn in impls:
    t_d = timed(dispatch_program(d_fn)) / args.calls
    one = timed(combine_program(d_fn, lambda y, h: y[:T] * 0))  # 1 dispatch
    t_cached = max(timed(cached_program(d_fn, cached_fn)) - one, 0) / args.calls
    t_c = max(timed(combine_program(d_fn, c_fn)) - one, 0.0) / args.calls
    for op, t, rb in (("dispatch", t_d, row_bytes),
                      ("cached_dispatch", t_cached, row_bytes),
                      ("combine", t_c, H * 2)):
      records.append(dict(
          op=op, impl=impl, dtype="bf16" if op == "combine" else dtype,
          tokens=T, hidden=H, topk=K, experts=E, ranks=R, **(tuning or {}),
          time_us=round(t * 1e6, 1),
          logical_gbps=round(recv_rows / R * rb / t / 1e9, 1),
          link_gbps=round(link_rows / R * rb / t / 1e9, 1),
          device=gpus[0].device_kind))
      print(json.dumps(records[-1]), flush=True)
  buffers.close()


if __name__ == "__main__":
  main()
