"""Low-latency dispatch and combine against the dense model, and their hooks.

Every slot of every local expert is compared, empty ones included; `y` for
combine is random in every slot, so reading an empty slot would show.

Dispatch is compared bit for bit. Combine is too, except on rounding ties:
XLA:CPU fuses `partial + w * y` into fused multiply-adds, so its fp32 sums may
differ from the dense model's (separately rounded products, k order) by an
ulp or two, which can tip a bf16 rounding that sits on a tie. Such elements
(well under 1%) may be one bf16 step off; see `ep_testing.assert_bf16_sum`.
Where every product is exact (weights 1 and 0) the comparison is exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dense_model as dm
from gpu_testing import NEEDS_GPU
import jax_ep
from jax_ep._src import low_latency
from ep_testing import (BF16, FP8_MODES, ROUTINGS, assert_bf16_sum,
                        assert_same, flat)
from specs import RANKS, params

F32 = np.float32


def check_ll_dispatched(got, want: dm.LowLatencyDispatch, ctx, *, fp8,
                        num_tokens, hidden):
  assert isinstance(got, jax_ep.LowLatencyDispatched), ctx
  if fp8:  # scales first: a wrong scale explains wrong rows
    assert_same(got.scales, want.rows[1], "scales", ctx)
  else:
    assert got.scales is None, ctx
  assert_same(got.x, want.rows[0], "x", ctx)
  assert_same(got.recv_count, want.count, "recv_count", ctx)
  h = got.handle
  assert isinstance(h, jax_ep.LowLatencyHandle), ctx
  assert_same(h.src_index, want.src_index, "handle.src_index", ctx)
  assert_same(h.slot, want.slot, "handle.slot", ctx)
  assert (h.num_ranks, h.max_tokens, h.num_tokens, h.hidden) == (
      want.count.shape[0], want.max_tokens, num_tokens, hidden), ctx


def ll_dispatch(p, max_tokens, **kwargs):
  return lambda x, i: jax_ep.low_latency_dispatch(
      p.buffer, x, i, num_max_dispatch_tokens_per_rank=max_tokens,
      num_experts=p.shape.experts, **kwargs)


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_ll_dispatch_matches_dense_model(problem, num_ranks, kind):
  p = problem(num_ranks, "small")
  max_tokens = p.shape.tokens + (0 if num_ranks in (1, 4) else 2)  # T <= Tmax
  idx, x = p.routing(kind), p.ll_tokens()
  got = p.run(ll_dispatch(p, max_tokens, use_fp8=False), flat(x), flat(idx))
  want = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                 max_tokens=max_tokens)
  check_ll_dispatched(got, want, p.context(routing=kind, Tmax=max_tokens),
                      fp8=False, num_tokens=p.shape.tokens,
                      hidden=p.shape.hidden)


# Each fp8 mode at one EP size, each EP size with one mode (every pair is a
# program of its own). test_fp8.py checks the cast itself in every mode; the
# hook tests below run fp8_ue8m0 at EP 2 and 4, test_ll_benchmark_shapes
# fp8 at EP 8, multiprocess_worker.py fp8_round_scale and fp8_ue8m0.
LL_FP8_CASES = [(1, "fp8_round_scale_ue8m0"), (2, "fp8"),
                (4, "fp8_round_scale"), (8, "fp8_ue8m0")]


@pytest.mark.parametrize("num_ranks,mode", LL_FP8_CASES)
def test_ll_dispatch_fp8(problem, num_ranks, mode):
  p = problem(num_ranks, "ue8m0")
  max_tokens = p.shape.tokens + 1
  idx, x = p.routing("duplicates"), p.ll_tokens()
  got = p.run(ll_dispatch(p, max_tokens, **FP8_MODES[mode]), flat(x),
              flat(idx))
  want = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                 max_tokens=max_tokens, **FP8_MODES[mode])
  check_ll_dispatched(got, want, p.context(mode=mode), fp8=True,
                      num_tokens=p.shape.tokens, hidden=p.shape.hidden)
  if "ue8m0" in mode:
    assert got.scales.dtype == np.int32
    assert got.scales.shape[-1] == p.shape.hidden // 512


def check_ll_combined(got, y, idx, w, routes, ctx, what="out"):
  total, abs_sum = dm.low_latency_combine_f32(y, idx, w, routes)
  assert got.dtype == BF16 and got.shape == total.shape, ctx
  assert_bf16_sum(got, total, abs_sum, idx.shape[-1], what, ctx)


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_ll_combine_matches_dense_model(problem, num_ranks, kind):
  p = problem(num_ranks, "small")
  max_tokens = p.shape.tokens + 1
  idx, x, w = p.routing(kind), p.ll_tokens(), p.weights()
  y = p.expert_outputs(max_tokens)
  zero_copy = bool(num_ranks % 2)

  def body(x, i, w, y):
    d = ll_dispatch(p, max_tokens, use_fp8=False)(x, i)
    return jax_ep.low_latency_combine(p.buffer, y[0], i, w, d.handle,
                                      zero_copy=zero_copy)

  got = p.run(body, flat(x), flat(idx), flat(w), y)
  routes = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                   max_tokens=max_tokens)
  check_ll_combined(got, y, idx, w, routes, p.context(routing=kind,
                                                      zero_copy=zero_copy))


@pytest.mark.parametrize("kind", ["distinct", "duplicates", "invalid"])
@pytest.mark.parametrize("num_ranks", [1, 4, 8])
def test_ll_round_trip_counts_each_expert_once(problem, num_ranks, kind):
  """combine(dispatch(x), w=1) == x * (number of distinct valid experts)."""
  p = problem(num_ranks, "small")
  idx, x = p.routing(kind), p.dyadic_rows(bits=3)
  ones = dm.first_selections(idx)  # a duplicate's second slot gets weight 0

  def body(x, i, w):
    d = ll_dispatch(p, p.shape.tokens, use_fp8=False)(x, i)
    return jax_ep.low_latency_combine(p.buffer, d.x, i, w, d.handle)

  got = p.run(body, flat(x), flat(idx), flat(ones))
  n = np.array([[len({int(e) for e in row if 0 <= e < p.shape.experts})
                 for row in rank] for rank in idx])
  want = (x.astype(F32) * n[..., None] + F32(0)).astype(BF16)
  assert_same(got, want, "combine(dispatch(x))", p.context(routing=kind))


# ---------------------------------------------------------------- hooks


# Every pair of (EP size, mode), (EP size, after), (mode, after).
@pytest.mark.parametrize("num_ranks,mode,after", [
    (2, "bf16", "none"), (2, "fp8_ue8m0", "arrays"), (4, "bf16", "arrays"),
    (4, "fp8_ue8m0", "none")])
def test_ll_dispatch_hook_gives_the_same_result(problem, num_ranks, mode,
                                                after):
  p = problem(num_ranks, "ue8m0")
  idx, x = p.routing("hot"), p.ll_tokens()
  seen = {}

  def body(x, i):
    plain = ll_dispatch(p, p.shape.tokens, **FP8_MODES[mode])(x, i)
    hook = ll_dispatch(p, p.shape.tokens, return_recv_hook=True,
                       **FP8_MODES[mode])(x, i)
    seen["hook"] = hook
    overlap = jnp.tanh(x.astype(jnp.float32)) * 2  # "compute in between"
    hooked = hook(overlap, x) if after == "arrays" else hook()
    return plain, hooked, overlap

  plain, hooked, _ = p.run(body, flat(x), flat(idx))
  ctx = p.context(mode=mode, after=after)
  assert isinstance(seen["hook"], jax_ep.RecvHook), ctx
  want = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                 max_tokens=p.shape.tokens, **FP8_MODES[mode])
  for got in (plain, hooked):
    check_ll_dispatched(got, want, ctx, fp8=mode != "bf16",
                        num_tokens=p.shape.tokens, hidden=p.shape.hidden)


@pytest.mark.parametrize("after", ["none", "arrays"])
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ll_combine_hook_gives_the_same_result(problem, num_ranks, after):
  p = problem(num_ranks, "small")
  idx, x, w = p.routing("duplicates"), p.ll_tokens(), p.weights()
  y = p.expert_outputs(p.shape.tokens)
  seen = {}

  def body(x, i, w, y):
    d = ll_dispatch(p, p.shape.tokens, use_fp8=False)(x, i)
    plain = jax_ep.low_latency_combine(p.buffer, y[0], i, w, d.handle)
    hook = jax_ep.low_latency_combine(p.buffer, y[0], i, w, d.handle,
                                      return_recv_hook=True)
    seen["hook"] = hook
    hooked = hook(jnp.cos(w), y) if after == "arrays" else hook()
    return plain, hooked

  plain, hooked = p.run(body, flat(x), flat(idx), flat(w), y)
  ctx = p.context(after=after)
  assert isinstance(seen["hook"], jax_ep.RecvHook), ctx
  routes = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                   max_tokens=p.shape.tokens)
  check_ll_combined(plain, y, idx, w, routes, ctx)
  assert_same(hooked, plain, "out (hook) vs out (no hook)", ctx)


def test_hook_pins_receive_after_the_given_compute(problem):
  """hook(after) ties the receive to `after` (optimization_barrier); a hook
  crosses a jit boundary as a pytree."""
  p = problem(2, "small")
  idx, x = p.routing("distinct"), p.ll_tokens()

  def body(x, i):
    hook = ll_dispatch(p, p.shape.tokens, use_fp8=False,
                       return_recv_hook=True)(x, i)
    hook = jax.jit(lambda h: h)(hook)  # a pytree through jit
    return hook(jnp.sin(x.astype(jnp.float32))).x

  jaxpr = str(p.trace(body, flat(x), flat(idx)))
  assert "optimization_barrier" in jaxpr
  got = p.run(body, flat(x), flat(idx))
  want = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                 max_tokens=p.shape.tokens)
  assert_same(got, want.rows[0], "x", p.context())


@pytest.mark.parametrize("spec", params("dsv3_ll_cut", "dsv3_ll"))
def test_ll_benchmark_shapes(problem, spec):
  p = problem(8 if "ci" in spec.tags else 2, spec.shape)
  idx, x, w = p.routing("hot"), p.ll_tokens(), p.weights()

  def body(x, i, w):
    d = ll_dispatch(p, p.shape.tokens, use_fp8=True)(x, i)
    y = jax_ep.per_token_cast_back(d.x, d.scales)
    return d, jax_ep.low_latency_combine(p.buffer, y, i, w, d.handle)

  got, out = p.run(body, flat(x), flat(idx), flat(w))
  want = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                 max_tokens=p.shape.tokens, use_fp8=True)
  ctx = p.context(spec=spec.name)
  check_ll_dispatched(got, want, ctx, fp8=True, num_tokens=p.shape.tokens,
                      hidden=p.shape.hidden)
  y = dm.per_token_cast_back(*want.rows)
  check_ll_combined(out, y, idx, w, want, ctx)


@pytest.mark.parametrize("how", [
    "eager", "jit", pytest.param("jit-gpu", marks=NEEDS_GPU)])
def test_combine_backward_carries_dots_home_exactly(how):
  """low_latency_combine's backward brings each f32 dot <g[t], y[slot]> home
  through a bf16 combine as three bf16 pieces: they must be bf16 values and
  sum back to the dot exactly, across the exponent range, eagerly and
  compiled (where XLA may drop convert pairs)."""
  rng = np.random.default_rng(0)
  n = 200_000
  dots = (rng.choice([-1.0, 1.0], n) * rng.uniform(1.0, 2.0, n) *
          np.exp2(rng.integers(-100, 127, n))).astype(np.float32)
  dots = np.concatenate([dots, np.float32([
      0.0, -0.0, 1.0, -3.0, np.inf, -np.inf, np.nan, 2.0**-100,
      np.finfo(np.float32).eps, float(jnp.finfo(jnp.bfloat16).max),
      np.finfo(np.float32).max, -np.finfo(np.float32).max])])
  split = low_latency._exact_bf16_pieces
  dots_in = jnp.asarray(dots)
  if how == "jit-gpu":  # XLA's GPU compiler drops f32 -> bf16 -> f32 pairs
    dots_in = jax.device_put(dots_in, jax.devices("gpu")[0])
  pieces = np.asarray((split if how == "eager" else jax.jit(split))(dots_in))
  np.testing.assert_array_equal(
      pieces, pieces.astype(jnp.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(
      pieces[:, 0] + (pieces[:, 1] + pieces[:, 2]), dots)
