"""One process of a multi-process jax_ep test (run by test_multiprocess.py).

    python multiprocess_worker.py --seed N [--checks layout,dispatch,...]

Started N times by `jax_ep._src.launch.launch`; `jax_ep.launch.initialize()`
joins the processes. Every process builds the same global inputs from the
shared seed, runs the ops over an EP mesh of all devices of all processes,
and checks the shards it can address against the dense model. Any mismatch
raises, so the process exits non-zero and the launcher stops the others.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time
import traceback

# Run as a script: tests/support first, where repo_paths puts the repository
# and the other test folders on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "support"))
import repo_paths  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

import jax_ep.launch  # pylint: disable=g-import-not-at-top

jax_ep.launch.initialize()  # first, before any other JAX call

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dense_model as dm
import jax_ep
import moe_models
from jax_ep._src import exchange
from ep_testing import (BF16, assert_bf16_sum, assert_close, assert_same,
                        context, flat, normal, routing, weights)

CHECKS = ("layout", "dispatch", "combine", "low_latency", "grads")  # default
EP = P("ep")
T, H, K, E = 6, 128, 4, 16  # per rank; H allows fp8


class Run:
  """The EP mesh over every device of every process, and its helpers."""

  def __init__(self, seed: int):
    self.seed = seed
    self.mesh = jax.make_mesh((jax.device_count(),), ("ep",))
    self.num_ranks = jax.device_count()
    self.ctx = context(seed, process=jax.process_index(),
                       processes=jax.process_count(), R=self.num_ranks)

  @functools.cached_property
  def buffer(self) -> jax_ep.Buffer:
    """Made on first use, so that check_setup sees the first Buffer made."""
    return jax_ep.Buffer(self.mesh, "ep", backend="reference")

  def put(self, a, spec=EP):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, spec),
                                        lambda index: a[index])

  def call(self, body, *args, in_specs=EP, per_rank=True):
    """jit(shard_map(body)) on global numpy inputs; returns global arrays."""
    inner = (lambda *a: jax.tree.map(lambda v: v[None], body(*a))) \
        if per_rank else body
    mapped = jax.shard_map(inner, mesh=self.mesh, in_specs=in_specs,
                           out_specs=EP)
    specs = in_specs if isinstance(in_specs, tuple) else (in_specs,) * len(args)
    with jax.set_mesh(self.mesh):
      return jax.jit(mapped)(*[self.put(a, s) for a, s in zip(args, specs)])

  def check(self, got, want, what, compare=None, extra=None):
    """Compares this process's shards of `got` with `want[shard index]`.

    `compare(got_shard, want_shard, extra_shard, what, ctx)` replaces the
    exact comparison when given (`extra` is sliced like `want`).
    """
    assert got.shape == want.shape, f"{what} [{self.ctx}]: {got.shape} != " \
        f"{want.shape}"
    seen = 0
    for shard in got.addressable_shards:
      name = f"{what} (shard {shard.index})"
      if compare is None:
        assert_same(np.asarray(shard.data), want[shard.index], name, self.ctx)
      else:
        compare(np.asarray(shard.data), want[shard.index],
                None if extra is None else extra[shard.index], name, self.ctx)
      seen += 1
    assert seen == len(jax.local_devices()), (what, seen)


def check_layout(run: Run, rng):
  idx = routing(rng, run.num_ranks, T, K, E, "invalid")
  got = run.call(lambda i: jax_ep.get_dispatch_layout(run.buffer, i, E),
                 flat(idx))
  want = dm.layout(idx, E)
  for field in ("num_tokens_per_rank", "num_tokens_per_expert",
                "is_token_in_rank", "num_invalid", "num_tokens_per_node"):
    run.check(getattr(got, field), getattr(want, field), field)


def _check_dispatched(run, got, want, fp8=False):
  run.check(got.x, want.rows[0], "x")
  if fp8:
    run.check(got.scales, want.rows[1], "scales")
  run.check(got.topk_idx, want.topk_idx, "topk_idx")
  run.check(got.topk_weights, want.topk_weights, "topk_weights")
  run.check(got.num_recv_tokens, want.num_tokens, "num_recv_tokens")
  run.check(got.num_recv_tokens_per_expert, want.num_tokens_per_expert,
            "num_recv_tokens_per_expert")
  run.check(got.handle.src_index, want.src_index, "handle.src_index")
  run.check(got.handle.recv_row, want.recv_row, "handle.recv_row")


def check_dispatch(run: Run, rng):
  r = run.num_ranks
  for kind, capacity in (("duplicates", None), ("hot", 5)):
    idx = routing(rng, r, T, K, E, kind)
    x = normal(rng, (r, T, H), BF16)
    w = weights(rng, idx.shape)
    got = run.call(lambda x, i, w: jax_ep.dispatch(
        run.buffer, x, i, w, num_experts=E, capacity=capacity,
        expert_alignment=2), flat(x), flat(idx), flat(w))
    _check_dispatched(run, got, dm.dispatch([x], idx, w, num_experts=E,
                                            capacity=capacity,
                                            expert_alignment=2))
  # fp8 rows, and a cached dispatch of other rows along the same routes.
  x1 = normal(rng, (r, T, H)) * 7
  q, s = dm.per_token_cast_to_fp8(x1)
  x2 = normal(rng, (r, T, H), BF16)

  def body(q, s, x2, i, w):
    first = jax_ep.dispatch(run.buffer, (q, s), i, w, num_experts=E)
    return first, jax_ep.dispatch(run.buffer, x2, handle=first.handle).x

  first, again = run.call(body, flat(q), flat(s), flat(x2), flat(idx), flat(w))
  _check_dispatched(run, first, dm.dispatch([q, s], idx, w, num_experts=E),
                    fp8=True)
  run.check(again, dm.dispatch([x2], idx, w, num_experts=E).rows[0],
            "cached x")


def check_combine(run: Run, rng):
  r = run.num_ranks
  idx = routing(rng, r, T, K, E, "duplicates")
  x = normal(rng, (r, T, H), BF16)
  y = normal(rng, (r, r * T, H), BF16)
  row_w = weights(rng, (r, r * T, K))
  biases = [normal(rng, x.shape), normal(rng, x.shape, BF16)]

  def body(x, i, y, w, b0, b1):
    d = jax_ep.dispatch(run.buffer, x, i, num_experts=E)
    out, out_w = jax_ep.combine(run.buffer, y, d.handle, w, bias=(b0, b1))
    identity = jax_ep.combine(run.buffer, d.x, d.handle)
    return out, out_w, identity

  out, out_w, identity = run.call(body, flat(x), flat(idx), flat(y),
                                  flat(row_w), *[flat(b) for b in biases])
  routes = dm.dispatch([x], idx, None, num_experts=E)
  run.check(out, dm.combine(y, routes, biases=biases), "combine out")
  run.check(out_w, dm.combine(row_w, routes), "combine weights")
  run.check(identity, dm.combine(routes.rows[0], routes),
            "combine(dispatch(x))")


def check_low_latency(run: Run, rng):
  r = run.num_ranks
  max_tokens = T + 1
  idx = routing(rng, r, T, K, E, "duplicates")
  x = normal(rng, (r, T, 512), BF16)
  w = weights(rng, idx.shape)
  y = normal(rng, (r, E // r, r * max_tokens, 512), BF16)
  for mode in (dict(use_fp8=False), dict(use_fp8=True, round_scale=True),
               dict(use_fp8=True, use_ue8m0=True)):

    def body(x, i, w, y, mode=mode):
      d = jax_ep.low_latency_dispatch(
          run.buffer, x, i, num_max_dispatch_tokens_per_rank=max_tokens,
          num_experts=E, **mode)
      hook = jax_ep.low_latency_dispatch(
          run.buffer, x, i, num_max_dispatch_tokens_per_rank=max_tokens,
          num_experts=E, return_recv_hook=True, **mode)
      out = jax_ep.low_latency_combine(run.buffer, y[0], i, w, d.handle)
      return d, hook(jnp.sin(w)), out

    d, hooked, out = run.call(body, flat(x), flat(idx), flat(w), y)
    want = dm.low_latency_dispatch(x, idx, num_experts=E,
                                   max_tokens=max_tokens, **mode)
    for name, got in (("", d), (" (hook)", hooked)):
      run.check(got.x, want.rows[0], f"ll x{name} {mode}")
      if mode["use_fp8"]:
        run.check(got.scales, want.rows[1], f"ll scales{name} {mode}")
      run.check(got.recv_count, want.count, f"ll recv_count{name}")
      run.check(got.handle.src_index, want.src_index, f"ll src_index{name}")
    total, abs_sum = dm.low_latency_combine_f32(y, idx, w, want)
    run.check(out, total, "ll combine", extra=abs_sum,
              compare=lambda g, t, a, what, ctx: assert_bf16_sum(
                  g, t, a, K, what, ctx))


def check_grads(run: Run, rng):
  r = run.num_ranks
  # dispatch's VJP is combine: exact.
  idx = routing(rng, r, T, K, E, "duplicates")
  x = normal(rng, (r, T, H), BF16)
  w = weights(rng, idx.shape)
  g_x = normal(rng, (r, r * T, H), BF16)
  g_w = weights(rng, (r, r * T, K))
  mapped = jax.shard_map(
      lambda x, w, i: (lambda d: (d.x, d.topk_weights))(jax_ep.dispatch(
          run.buffer, x, i, w, num_experts=E)),
      mesh=run.mesh, in_specs=EP, out_specs=EP)

  @jax.jit  # one program (eagerly, each op of the VJP compiles on its own)
  def dispatch_vjp(x, w, i, g_x, g_w):
    return jax.vjp(lambda x, w: mapped(x, w, i), x, w)[1]((g_x, g_w))

  with jax.set_mesh(run.mesh):
    d_x, d_w = dispatch_vjp(*[run.put(flat(a)) for a in (x, w, idx, g_x, g_w)])
  routes = dm.dispatch([x], idx, w, num_experts=E)
  run.check(d_x, flat(dm.combine(g_x, routes)), "d_x (dispatch)")
  masked = np.where(routes.topk_idx >= 0, g_w, np.float32(0))
  run.check(d_w, flat(dm.combine(masked, routes)), "d_weights (dispatch)")

  # A small MoE: gradients through jax_ep == dense gradients.
  n = r * moe_models.TOKENS
  xs = rng.standard_normal((n, moe_models.HIDDEN), dtype=np.float32)
  wr = rng.standard_normal((moe_models.HIDDEN, moe_models.NUM_EXPERTS),
                           dtype=np.float32)
  w1 = rng.standard_normal((moe_models.NUM_EXPERTS, moe_models.HIDDEN, 8),
                           dtype=np.float32) * np.float32(0.3)
  w2 = rng.standard_normal((moe_models.NUM_EXPERTS, 8, moe_models.HIDDEN),
                           dtype=np.float32) * np.float32(0.3)
  probe = rng.standard_normal((n, moe_models.HIDDEN), dtype=np.float32)
  local = lambda a: jax.device_put(a, jax.local_devices()[0])
  topk = np.asarray(jax.jit(moe_models.choose_experts, static_argnums=2)(
      local(xs), local(wr), 2))
  layer = jax.shard_map(lambda *a: moe_models.ep_moe(run.buffer, *a),
                        mesh=run.mesh, in_specs=(EP, P(), EP, EP, EP),
                        out_specs=EP)
  with jax.set_mesh(run.mesh):
    got = jax.jit(jax.grad(
        lambda x, wr, w1, w2, i, p: jnp.sum(layer(x, wr, w1, w2, i) * p),
        argnums=(0, 1, 2, 3)))(run.put(xs), run.put(wr, P()), run.put(w1),
                                 run.put(w2), run.put(topk), run.put(probe))
  want = jax.jit(jax.grad(
      lambda *a: jnp.sum(moe_models.dense_moe(*a, topk) * probe),
      argnums=(0, 1, 2, 3)))(*[local(a) for a in (xs, wr, w1, w2)])
  for g, wt, name in zip(got, want, ("x", "router", "w1", "w2")):
    wt = np.asarray(wt)
    scale = np.abs(wt).max()
    run.check(g, wt, f"moe d_{name}", compare=lambda a, b, _, what, ctx: (
        assert_close(a, b, what, ctx, rtol=1e-5, atol=1e-5 * scale)))


def check_setup(run: Run, rng):
  """Creating Buffers compiles and runs no XLA program, so no collective
  (NCCL refuses processes that share a GPU): their exchanges go through the
  jax.distributed key-value store. The hosts are still found (one here),
  and an exchange that a process never joins names it when it times out."""
  del rng
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event.startswith("/jax/core/compile"):
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    buffers = [jax_ep.Buffer(run.mesh, "ep", backend="reference")
               for _ in range(3)]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiled, f"{compiled} [{run.ctx}]"
  assert all(b.topology.ranks_per_node == run.num_ranks for b in buffers)
  # A process that never arrives is named (this desynchronizes the exchange
  # numbering, so it comes last).
  if jax.process_index() == 0:
    try:
      exchange.allgather("probe that process 1 skips", b"", timeout_s=2)
    except RuntimeError as e:
      assert "for process 1's probe that process 1 skips" in str(e), e
    else:
      raise AssertionError(f"no timeout [{run.ctx}]")
  else:
    time.sleep(5)  # alive, but never calls


def check_selftest_failure(run: Run, rng):
  """For the harness's own test: process 1 fails while the others wait in a
  collective, which only the launcher's kill ends."""
  del rng
  if jax.process_index() == 1:
    raise AssertionError(f"deliberate failure in process 1 [{run.ctx}]")
  run.call(lambda x: jax.lax.psum(x, "ep"), np.ones((run.num_ranks, 1)))
  time.sleep(600)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--checks", default=",".join(CHECKS))
  args = parser.parse_args(argv)
  run = Run(args.seed)
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  print(f"{who}: {len(jax.local_devices())} local of {run.num_ranks} devices, "
        f"{run.ctx}", flush=True)
  for name in args.checks.split(","):
    start = time.monotonic()
    rng = np.random.default_rng([args.seed, len(name)])
    if name == "selftest_failure":  # fail like any user program would
      check_selftest_failure(run, rng)
    try:
      globals()[f"check_{name}"](run, rng)
    except BaseException:  # pylint: disable=broad-except
      # Exit now: at a normal exit, jax.distributed's shutdown would wait
      # for the other processes, which may be blocked in a collective.
      traceback.print_exc()
      print(f"{who}: {name} FAILED", flush=True)
      sys.stderr.flush()
      os._exit(1)
    print(f"{who}: {name} ok ({time.monotonic() - start:.1f} s)", flush=True)
  print(f"{who}: all checks passed", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
