"""Autodiff of the ops: check_grads, exact backward rules, refused gradients.

`jax.test_util.check_grads(..., modes=("rev",), order=1)` checks each VJP
against finite differences (the ops are linear, so `eps=1` is exact up to
rounding). The backward rules are also compared bit for bit with the dense
model's transposes: dispatch's is combine, combine's is a cached dispatch,
LL dispatch's is a unit-weight LL combine (docs/contract.md, "Autodiff").
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import dense_model as dm
import jax_ep
from ep_testing import BF16, assert_same, flat

F32 = np.float32
REV = dict(order=1, modes=("rev",), eps=1.0)


def sharded(p, body):
  """Global-array function of a per-rank body (outputs concatenated)."""
  return p.sharded(body, per_rank=False)


def put(p, a):
  """A per-rank input [R, ...] as the global array, sharded over the ranks."""
  return p.put(flat(a))


def jitted_vjp(f, num_primals):
  """jit: (primals..., others..., cotangent) -> (f(primals, others), the VJP
  of f in its first `num_primals` arguments at the cotangent). One program,
  the forward and the backward (eagerly, jax.vjp of a jitted f compiles two);
  check_grads and the refusal tests below take the eager path."""

  @jax.jit
  def run(*args):
    *args, cotangent = args
    primals, others = args[:num_primals], args[num_primals:]
    out, vjp = jax.vjp(lambda *a: f(*a, *others), *primals)
    return out, vjp(cotangent)

  return run


def dispatched_rows_and_weights(p, capacity):
  """Global (x, topk_weights, topk_idx) -> the dispatch's (x, topk_weights)."""
  def body(x, w, i):
    d = jax_ep.dispatch(p.buffer, x, i, w, num_experts=p.shape.experts,
                        capacity=capacity)
    return d.x, d.topk_weights

  return sharded(p, body)


# ---------------------------------------------------------------- check_grads


# Every pair of (routing, capacity), each EP size, both routings and both
# capacities at EP 4.
@pytest.mark.parametrize("num_ranks,kind,capacity", [
    pytest.param(1, "duplicates", None, id="1-duplicates-default"),
    pytest.param(2, "invalid", 4, id="2-invalid-overflow"),
    pytest.param(4, "duplicates", 4, id="4-duplicates-overflow"),
    pytest.param(4, "invalid", None, id="4-invalid-default")])
def test_check_grads_dispatch(problem, num_ranks, kind, capacity):
  p = problem(num_ranks, "tiny")
  idx, x, w = (put(p, a) for a in (p.routing(kind), p.rows(), p.weights()))

  f = dispatched_rows_and_weights(p, capacity)
  with p.active():
    check_grads(lambda x, w: f(x, w, idx), (x, w), **REV)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_check_grads_cached_dispatch(problem, num_ranks):
  p = problem(num_ranks, "tiny")
  idx, x1, x2 = (put(p, a) for a in (p.routing("hot"), p.rows(), p.rows()))

  def body(x2, x1, i):
    h = jax_ep.dispatch(p.buffer, x1, i, num_experts=p.shape.experts,
                        capacity=7).handle
    return jax_ep.dispatch(p.buffer, x2, handle=h).x

  f = sharded(p, body)
  with p.active():
    check_grads(lambda x2: f(x2, x1, idx), (x2,), **REV)


# Each bias form and EP size, and both bias forms at EP 4.
@pytest.mark.parametrize("num_ranks,bias", [
    (1, "none"), (2, "array"), (4, "tuple"), (4, "array")])
def test_check_grads_combine(problem, num_ranks, bias):
  p = problem(num_ranks, "tiny")
  m = num_ranks * p.shape.tokens
  idx, x, y, w = (put(p, a) for a in (
      p.routing("duplicates"), p.rows(), p.rows(num_rows=m),
      p.weights(num_rows=m)))
  biases = [put(p, p.rows())
            for _ in range({"none": 0, "array": 1, "tuple": 2}[bias])]

  def body(x, i, y, w, *b):
    h = jax_ep.dispatch(p.buffer, x, i, num_experts=p.shape.experts).handle
    return jax_ep.combine(p.buffer, y, h, w, bias=None if not b else (
        b[0] if bias == "array" else tuple(b)))

  f = sharded(p, body)
  with p.active():
    check_grads(lambda y, w, *b: f(x, idx, y, w, *b), (y, w, *biases), **REV)


# No finite-difference check of low_latency_combine: its output is bf16, and
# a bf16 rounding of the output moves the finite differences by more than any
# useful tolerance (a clean-clone run failed at rtol 3e-2).
# test_low_latency_combine_vjp checks its VJP exactly against the dense model.


# ---------------------------------------------------------------- exact VJPs


# Each EP size once, the capacity dropping rows at two of them.
@pytest.mark.parametrize("num_ranks,capacity", [
    pytest.param(1, 5, id="1-overflow"), pytest.param(2, None, id="2-default"),
    pytest.param(4, 5, id="4-overflow"), pytest.param(8, None, id="8-default")])
def test_dispatch_vjp_is_combine(problem, num_ranks, capacity):
  p = problem(num_ranks, "tiny")
  idx, x, w = p.routing("duplicates"), p.rows(BF16), p.weights()
  routes = dm.dispatch([x], idx, w, num_experts=p.shape.experts,
                       capacity=capacity)
  m = routes.capacity
  g_x = p.rows(BF16, num_rows=m)  # padding rows too
  g_w = p.weights(num_rows=m)

  f = dispatched_rows_and_weights(p, capacity)
  with p.active():
    _, (d_x, d_w) = jitted_vjp(f, 2)(put(p, x), put(p, w), put(p, idx),
                                     (put(p, g_x), put(p, g_w)))
  ctx = p.context(capacity=capacity)
  want_x = dm.combine(g_x, routes).reshape(-1, p.shape.hidden)
  assert_same(np.asarray(d_x), want_x, "d_x", ctx)
  masked = np.where(routes.topk_idx >= 0, g_w, F32(0))
  want_w = dm.combine(masked, routes).reshape(-1, p.shape.topk)
  assert_same(np.asarray(d_w), want_w, "d_topk_weights", ctx)


# Each EP size once, each bias dtype at two of them.
@pytest.mark.parametrize("num_ranks,bias_dtype", [
    pytest.param(1, BF16, id="1-bf16"), pytest.param(2, F32, id="2-f32"),
    pytest.param(4, BF16, id="4-bf16"), pytest.param(8, F32, id="8-f32")])
def test_combine_vjp_is_cached_dispatch(problem, num_ranks, bias_dtype):
  capacity = 6
  p = problem(num_ranks, "tiny")
  idx, x = p.routing("hot"), p.rows(BF16)
  y, w = p.rows(BF16, num_rows=capacity), p.weights(num_rows=capacity)
  b, g_out, g_w = p.rows(bias_dtype), p.rows(BF16), p.weights()

  def body(y, w, b, x, i):
    h = jax_ep.dispatch(p.buffer, x, i, num_experts=p.shape.experts,
                        capacity=capacity).handle
    return jax_ep.combine(p.buffer, y, h, w, bias=b)

  f = sharded(p, body)
  with p.active():
    _, (d_y, d_w, d_b) = jitted_vjp(f, 3)(
        *[put(p, a) for a in (y, w, b, x, idx)], (put(p, g_out), put(p, g_w)))
  ctx = p.context(bias=bias_dtype)
  want = dm.dispatch([g_out, g_w], idx, None, num_experts=p.shape.experts,
                     capacity=capacity)
  assert_same(np.asarray(d_y), flat(want.rows[0]), "d_y", ctx)
  assert_same(np.asarray(d_w), flat(want.rows[1]), "d_topk_weights", ctx)
  assert_same(np.asarray(d_b), flat(g_out.astype(F32).astype(bias_dtype)),
              "d_bias", ctx)


# Every EP size with two routings, each routing at two EP sizes.
@pytest.mark.parametrize("num_ranks,kind", [
    (1, "duplicates"), (1, "invalid"), (2, "distinct"), (2, "hot"),
    (4, "duplicates"), (4, "hot"), (8, "distinct"), (8, "invalid")])
def test_low_latency_dispatch_vjp_is_transpose(problem, num_ranks, kind):
  """d_x = bf16(fp32 sum, owner rank order then k order, of g over the slots
  of the token's distinct experts); empty slots of g are never read."""
  p = problem(num_ranks, "small")
  max_tokens = p.shape.tokens + 2
  idx, x, g = p.routing(kind), p.rows(BF16), p.expert_outputs(max_tokens)

  def body(x, i):
    return jax_ep.low_latency_dispatch(
        p.buffer, x, i, num_max_dispatch_tokens_per_rank=max_tokens,
        num_experts=p.shape.experts, use_fp8=False).x

  f = sharded(p, body)
  with p.active():
    recv, (d_x,) = jitted_vjp(f, 1)(put(p, x), put(p, idx), put(p, g))
  routes = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                   max_tokens=max_tokens)
  ctx = p.context(routing=kind)
  want = dm.low_latency_combine(g, idx, dm.first_selections(idx), routes)
  d_x = np.asarray(d_x).reshape(x.shape)
  assert_same(d_x, want, "d_x", ctx)
  # <dispatch(x), g> == <x, d_x>, in f64, up to d_x's bf16 rounding.
  lhs = np.sum(np.asarray(recv).astype(np.float64) *
               g.reshape(np.asarray(recv).shape).astype(np.float64))
  rhs = np.sum(x.astype(np.float64) * d_x.astype(np.float64))
  slack = 2.0**-8 * np.sum(np.abs(x.astype(np.float64) * d_x.astype(
      np.float64))) + 1e-30
  assert abs(lhs - rhs) <= slack, f"<f(x), g> {lhs} != <x, f^T g> {rhs} [{ctx}]"


# Every EP size with two routings, each routing at two or three EP sizes.
@pytest.mark.parametrize("num_ranks,kind", [
    (1, "distinct"), (1, "invalid"), (2, "duplicates"), (2, "distinct"),
    (4, "invalid"), (4, "duplicates"), (8, "duplicates"), (8, "invalid")])
def test_low_latency_combine_vjp(problem, num_ranks, kind):
  """d_y[l, slot of t] = bf16(g[t] * sum of t's weights for l), 0 in empty
  slots; d_w[t, k] = <g[t], y[slot of (t, k)]>, 0 where k selects nothing."""
  p = problem(num_ranks, "small")
  max_tokens = p.shape.tokens + 1
  idx, x, w = p.routing(kind), p.rows(BF16), p.weights()
  y, g = p.expert_outputs(max_tokens), p.rows(BF16)

  def body(y, w, x, i):
    d = jax_ep.low_latency_dispatch(
        p.buffer, x, i, num_max_dispatch_tokens_per_rank=max_tokens,
        num_experts=p.shape.experts, use_fp8=False)
    return jax_ep.low_latency_combine(p.buffer, y, i, w, d.handle)

  f = sharded(p, body)
  with p.active():
    _, (d_y, d_w) = jitted_vjp(f, 2)(*[put(p, a) for a in (y, w, x, idx, g)])
  d_y = np.asarray(d_y).reshape(y.shape)
  d_w = np.asarray(d_w).reshape(w.shape)
  routes = dm.low_latency_dispatch(x, idx, num_experts=p.shape.experts,
                                   max_tokens=max_tokens)
  want_y, want_w, bound_w = dm.low_latency_combine_vjp(g, y, idx, w, routes)
  ctx = p.context(routing=kind)
  assert_same(d_y, want_y, "d_y", ctx)
  selects = (idx >= 0) & (idx < p.shape.experts)
  assert_same(d_w[~selects], np.zeros((~selects).sum(), F32),
              "d_topk_weights (no selection)", ctx)
  err = np.abs(d_w.astype(np.float64) - want_w)
  assert (err <= bound_w).all(), (
      f"d_topk_weights [{ctx}]: max error {err.max()}")


# ---------------------------------------------------------------- refusals


def _grad(p, body, x, idx):
  f = sharded(p, body)
  with p.active():
    return jax.grad(lambda x: jnp.sum(f(x, idx)))(x)


def _trace_grad(p, body, x, idx):
  """Traces (does not compile) the gradient: refusals come while tracing."""
  f = sharded(p, body)
  with p.active():
    return jax.make_jaxpr(jax.grad(lambda x: jnp.sum(f(x, idx))))(x)


FP8_ROWS = "jax_ep.dispatch: fp8 rows are not differentiable; dispatch bf16 " \
    "rows to train through dispatch"
LL_FP8 = "jax_ep.low_latency_dispatch: the fp8 cast is not differentiable; " \
    "use use_fp8=False to differentiate"
HOOK = ("jax_ep.{op}: return_recv_hook=True splits the op for inference and "
        "is not differentiable; call it without hooks to differentiate")


def _refusal_setup(problem):
  """Two ranks, and a routing and f32 x put on them."""
  p = problem(2, "small")
  return p, put(p, p.routing("distinct")), put(p, p.rows())


def _ll(p, x, i, **kwargs):
  return jax_ep.low_latency_dispatch(
      p.buffer, x.astype(jnp.bfloat16), i,
      num_max_dispatch_tokens_per_rank=p.shape.tokens,
      num_experts=p.shape.experts, **kwargs)


@pytest.mark.parametrize("case", ["fp8_dispatch", "fp8_dispatch_scales_only",
                                  "fp8_cached_dispatch", "ll_fp8",
                                  "ll_dispatch_hook", "ll_combine_hook"])
def test_refused_gradients_raise(problem, case):
  p, idx, x = _refusal_setup(problem)

  def body(x, i):
    if case.startswith("fp8"):
      pair = jax_ep.per_token_cast_to_fp8(x)
      if case == "fp8_cached_dispatch":
        h = jax_ep.dispatch(p.buffer, x, i, num_experts=p.shape.experts).handle
        d = jax_ep.dispatch(p.buffer, pair, handle=h)
      else:
        d = jax_ep.dispatch(p.buffer, pair, i, num_experts=p.shape.experts)
      if case == "fp8_dispatch_scales_only":
        return d.scales.sum(-1)
      return d.x.astype(jnp.float32).sum(-1) * d.scales.sum(-1)
    if case == "ll_fp8":
      return _ll(p, x, i).scales.sum((0, 2))
    if case == "ll_dispatch_hook":
      return _ll(p, x, i, use_fp8=False,
                 return_recv_hook=True)().x.astype(jnp.float32).sum((0, 2))
    d = _ll(p, x, i, use_fp8=False)
    w = jnp.ones(i.shape, jnp.float32)
    hook = jax_ep.low_latency_combine(p.buffer, d.x, i, w, d.handle,
                                      return_recv_hook=True)
    return hook().astype(jnp.float32).sum(-1)

  message = {"ll_fp8": LL_FP8,
             "ll_dispatch_hook": HOOK.format(op="low_latency_dispatch"),
             "ll_combine_hook": HOOK.format(op="low_latency_combine")}.get(
                 case, FP8_ROWS)
  with pytest.raises(TypeError, match=message.replace("(", r"\(")):
    _trace_grad(p, body, x, idx)


@pytest.mark.parametrize("case", ["fp8_dispatch", "ll_fp8", "ll_hooks"])
def test_non_differentiable_ops_pass_when_not_differentiated(problem, case):
  """fp8 rows and hooks are fine inside a gradient that does not reach them."""
  p, idx, x = _refusal_setup(problem)
  const = jax.lax.stop_gradient

  def body(x, i):
    if case == "fp8_dispatch":
      d = jax_ep.dispatch(p.buffer, jax_ep.per_token_cast_to_fp8(const(x)), i,
                          num_experts=p.shape.experts)
      side = d.scales.sum()
    elif case == "ll_fp8":
      side = _ll(p, const(x), i).scales.sum()
    else:
      d = _ll(p, const(x), i, use_fp8=False, return_recv_hook=True)()
      w = jnp.ones(i.shape, jnp.float32)
      side = jax_ep.low_latency_combine(p.buffer, d.x, i, w, d.handle,
                                        return_recv_hook=True)().sum()
    return (x * x).sum(-1) + const(side.astype(jnp.float32)) * 0

  g = _grad(p, body, x, idx)
  assert_same(np.asarray(g), np.asarray(x) * 2, "grad", p.context(case=case))
