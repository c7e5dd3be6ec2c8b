"""`python -m bench.experts`: the routed experts' compute on one GPU, as the
example's DeepSeek-V3 layer runs it between dispatch and combine
(examples/moe/experts.py), in model TFLOP/s.

Default shape: the one-H200 training preset (examples/moe/configs/gpu.py):
M = 4096 received rows, top-8 of L = 64 local experts (R = 1: every pair
is local), H = 2048, SwiGLU experts of width F = 1024 (w_in [L, H, 2F],
w_out [L, F, H]), bf16 with f32 accumulation, random distinct experts per
row (a balanced router).

Ops, each timed forward ("_fwd") and forward + backward of the sum of
the output in every input ("_train"):
  expert_gemms   the two projections alone. impl "ragged_dot": over the
                 n = M K pairs sorted by expert (`jax.lax.ragged_dot` with
                 the group sizes); impl "slots F": batched GEMMs over an
                 [L, slots, H] block, slots = `expert_slots(M, K, L, F)`
                 (`padded_experts`' layout, filled as it fills it).
  local_experts  what the layer runs: the GEMMs plus sorting the pairs by
                 expert, moving rows into place and back, and the weighted
                 sum (`experts.local_experts` with slots_factor None for
                 "ragged_dot", F for "slots F").

`tflops` counts the model's FLOPs: 6 n H F forward (three H x F matrices
per pair) and 18 n H F for train (each GEMM's two gradients), n the routed
pairs; padding slots do work that is not counted. The note gives the pairs
dropped for want of a slot.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench import harness

# The example's modules import each other by name (it runs as a script).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "examples" / "moe"))
import dsv3  # pylint: disable=g-import-not-at-top
import experts  # pylint: disable=g-import-not-at-top


def _inputs(rng, rows: int, topk: int, num_local: int, hidden: int,
            ffn: int):
  idx = harness.random_routing(rng, rows, topk, num_local)
  w = rng.random(idx.shape, dtype=np.float32)
  x = rng.standard_normal((rows, hidden), dtype=np.float32)
  w_in = rng.standard_normal((num_local, hidden, 2 * ffn),
                             dtype=np.float32) / np.sqrt(hidden)
  w_out = rng.standard_normal((num_local, ffn, hidden),
                              dtype=np.float32) / np.sqrt(ffn)
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  return bf16(x), jnp.asarray(idx), jnp.asarray(w), bf16(w_in), bf16(w_out)


def _gemms_ragged(group_sizes, xs, w_in, w_out):
  """The two projections over the pairs `xs` sorted by expert."""
  h = lax.ragged_dot(xs, w_in, group_sizes,
                     preferred_element_type=jnp.float32)
  h = dsv3.swiglu(h).astype(xs.dtype)
  return lax.ragged_dot(h, w_out, group_sizes,
                        preferred_element_type=jnp.float32)


def _gemms_batched(xs, w_in, w_out):
  """The two projections over `xs` = the [L, slots, H] block as
  [L * slots, H]."""
  xs = xs.reshape(w_in.shape[0], -1, xs.shape[-1])
  h = jnp.einsum("lch,lhf->lcf", xs, w_in,
                 preferred_element_type=jnp.float32)
  h = dsv3.swiglu(h).astype(xs.dtype)
  return jnp.einsum("lcf,lfh->lch", h, w_out,
                    preferred_element_type=jnp.float32)


def _time(fn, args, *, iters: int, reps: int, warmup: int) -> dict[str, float]:
  """Seconds per call of `fn(*args)` forward, and forward + backward (the
  gradient of its output's sum in every argument), each in loops of `iters`
  chained calls in one jit (`harness.time_per_call`, on a mesh of one GPU;
  the first argument 2-D)."""
  mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
  args = jax.device_put(args, NamedSharding(mesh, P("ep")))
  forward = lambda a: fn(*a)
  train = lambda a: jax.grad(lambda *a: jnp.sum(fn(*a)),
                             argnums=tuple(range(len(a))))(*a)
  loops = dict(iters=iters, reps=reps, warmup=warmup)
  return {"fwd": harness.time_per_call(forward, args, mesh, **loops),
          "train": harness.time_per_call(train, args, mesh, **loops)}


def run(*, tokens: int, topk: int, experts_local: int, hidden: int,
        ffn: int, slots_factors, iters: int, reps: int, warmup: int,
        seed: int) -> list[harness.Record]:
  rng = np.random.default_rng(seed)
  x, idx, w, w_in, w_out = _inputs(rng, tokens, topk, experts_local, hidden,
                                   ffn)
  pairs = int((np.asarray(idx) >= 0).sum())
  flops = {"fwd": 6 * pairs * hidden * ffn,
           "train": 18 * pairs * hidden * ffn}
  records = []

  def record(op, impl, seconds: dict[str, float], note=None):
    for phase, s in seconds.items():
      records.append(harness.Record(
          op=f"{op}_{phase}", impl=impl, dtype="bf16", tokens=tokens,
          hidden=hidden, topk=topk, experts=experts_local, ranks=1,
          num_sms=None, time_us=s * 1e6, logical_gbps=None, link_gbps=None,
          tflops=flops[phase] / s / 1e12, note=note))
      harness.print_row(records[-1])

  loops = dict(iters=iters, reps=reps, warmup=warmup)
  # ragged_dot's GEMMs on the pairs sorted by expert (sorted untimed).
  _, order, _, sizes = experts._sorted_pairs(idx, experts_local)  # pylint: disable=protected-access
  xs = jnp.repeat(x, topk, axis=0)[order]
  record("expert_gemms", "ragged_dot",
         _time(functools.partial(_gemms_ragged, sizes), (xs, w_in, w_out),
               **loops))
  layer = lambda factor: lambda x, w_in, w_out: experts.local_experts(
      x, idx, w, w_in, w_out, slots_factor=factor,
      activation=dsv3.swiglu)[0]
  record("local_experts", "ragged_dot", _time(layer(None), (x, w_in, w_out),
                                              **loops))
  for factor in slots_factors:
    slots = experts.expert_slots(tokens, topk, experts_local, factor)
    full = np.minimum(np.asarray(sizes), slots)
    block = np.zeros((experts_local, slots, hidden), np.float32)
    for l, n in enumerate(full):  # random rows, as the layout would fill
      block[l, :n] = rng.standard_normal((n, hidden))
    block = jnp.asarray(block.reshape(-1, hidden), jnp.bfloat16)
    dropped = int((np.asarray(sizes) - full).sum())
    impl = f"slots {factor:g}"
    note = f"{slots} slots per expert; {dropped} of {pairs} pairs dropped"
    record("expert_gemms", impl,
           _time(_gemms_batched, (block, w_in, w_out), **loops), note)
    record("local_experts", impl,
           _time(layer(factor), (x, w_in, w_out), **loops), note)
  return records


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.experts",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096,
                      help="received rows M")
  parser.add_argument("--topk", type=int, default=8)
  parser.add_argument("--experts", type=int, default=64,
                      help="local experts L")
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--ffn", type=int, default=1024)
  parser.add_argument("--slots-factors", type=lambda s: [float(v) for v in
                                                        s.split(",")],
                      default=[1.0, 1.25])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON path (default "
                      "bench/results/<date>_<device>_experts.json)")
  args = parser.parse_args(argv)
  harness.print_header()
  records = run(tokens=args.tokens, topk=args.topk,
                experts_local=args.experts, hidden=args.hidden, ffn=args.ffn,
                slots_factors=args.slots_factors, iters=args.iters,
                reps=args.reps, warmup=args.warmup, seed=args.seed)
  harness.save_records(records, args.out, "experts")


if __name__ == "__main__":
  main()
