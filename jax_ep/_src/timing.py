"""The one timing method: every benchmark (bench/harness.py) and the tuner
(`jax_ep.tune`) time with it.

`time_dispatch` and `time_combine` time the normal ops of a `Buffer` this
way. The op runs `iters` times inside one jitted `fori_loop` within `shard_map`
over the EP axis "ep" (each iteration's input depends on the last output, so
nothing is hoisted or overlapped), the loop is timed with the host clock
around `block_until_ready`, and the per-call time is the loop's time over the
iterations. That is repeated `reps` times after `warmup` runs; the median is
reported. Every process runs the same loop; the collectives keep the ranks
in lockstep.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_ep._src import normal


def chained_loop(step: Callable, iters: int, mesh,
                 unroll: int = 1) -> Callable:
  """Jitted `iters` calls of the per-shard `step(carry) -> out` in `shard_map`.

  Each call's input depends on the last call's output: the first element of
  the output's first leaf is written into the carry's first leaf (2-D).
  `unroll` calls run per iteration of XLA's while loop.
  """
  def body(_, carry):
    out = step(carry)
    leaves, tree = jax.tree.flatten(carry)
    first = jax.tree.leaves(out)[0]
    link = first.reshape(-1)[:1].astype(leaves[0].dtype).reshape(1, 1)
    leaves[0] = lax.dynamic_update_slice(leaves[0], link, (0, 0))
    return jax.tree.unflatten(tree, leaves)

  loop = lambda carry: lax.fori_loop(0, iters, body, carry, unroll=unroll)
  return jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=P("ep"),
                               out_specs=P("ep")))


def time_per_call(step: Callable, carry, mesh, *, iters: int, reps: int,
                  warmup: int) -> float:
  """Median seconds per call of `step` over `reps` timed loops."""
  return time_loop(chained_loop(step, iters, mesh), carry, iters=iters,
                   reps=reps, warmup=warmup)


def time_loop(loop: Callable, carry, *, iters: int, reps: int,
              warmup: int) -> float:
  """Median seconds per call of a `chained_loop` of `iters` calls over
  `reps` timed runs, after `warmup` runs."""
  for _ in range(warmup):
    jax.block_until_ready(loop(carry))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(loop(carry))
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def random_routing(rng: np.random.Generator, tokens: int, topk: int,
                   experts: int) -> np.ndarray:
  """Distinct random experts per token, as a softmax router's top-k gives."""
  scores = rng.random((tokens, experts))
  return np.argsort(-scores, axis=1)[:, :topk].astype(np.int32)


def time_dispatch(buffer, inputs, mesh, *, num_experts: int, iters: int,
                  reps: int, warmup: int) -> float:
  """Median seconds per `dispatch` of the global `inputs` (rows, topk_idx,
  topk_weights; rows a tuple for fp8) on `buffer`."""
  step = lambda carry: normal.dispatch(buffer, *carry,
                                       num_experts=num_experts).x
  return time_per_call(step, inputs, mesh, iters=iters, reps=reps,
                       warmup=warmup)


def time_combine(buffer, inputs, mesh, *, num_experts: int, iters: int,
                 reps: int, warmup: int) -> float:
  """Median seconds per `combine` of bf16 rows on `buffer`, with the handle
  of one (untimed) `dispatch` of the global `inputs` (x, topk_idx,
  topk_weights)."""
  def rows_and_handle(*inputs):
    d = normal.dispatch(buffer, *inputs, num_experts=num_experts)
    return d.x, jax.tree.map(lambda a: a[None], d.handle)  # a rank axis

  carry = jax.jit(jax.shard_map(rows_and_handle, mesh=mesh, in_specs=P("ep"),
                                out_specs=P("ep")))(*inputs)

  def step(carry):
    y, handle = carry
    return normal.combine(buffer, y, jax.tree.map(lambda a: a[0], handle))

  return time_per_call(step, carry, mesh, iters=iters, reps=reps,
                       warmup=warmup)
