"""Normal dispatch (fresh and cached) against the dense model, every element.

Covers bf16/f16/f32 rows, fp8 `(q, scales)` rows, with and without weights,
every routing kind (-1 entries, bad ids, duplicates, a hot expert, one expert
for all, an empty rank, nothing routed), capacity overflow and
`check_capacity`, expert alignment and the handle's contents.
"""

import jax
import numpy as np
import pytest
from jax.experimental import checkify

import dense_model as dm
import jax_ep
from ep_testing import (BF16, ROUTINGS, Ep, assert_same, context, flat, normal,
                        routing, weights)
from specs import RANKS, SPECS, params


def check_dispatched(got, want: dm.Dispatch, ctx, *, fp8=False,
                     with_weights=True, cached=False):
  """Every output of `got` (per rank, leading axis R) against the model."""
  assert isinstance(got, jax_ep.Dispatched), ctx
  assert_same(got.x, want.rows[0], "x", ctx)
  if fp8:
    assert_same(got.scales, want.rows[1], "scales", ctx)
  else:
    assert got.scales is None, ctx
  if cached:
    assert got.topk_idx is None and got.topk_weights is None, ctx
    assert got.num_recv_tokens_per_expert is None, ctx
  else:
    assert_same(got.topk_idx, want.topk_idx, "topk_idx", ctx)
    if with_weights:
      assert_same(got.topk_weights, want.topk_weights, "topk_weights", ctx)
    else:
      assert got.topk_weights is None, ctx
    assert_same(got.num_recv_tokens_per_expert, want.num_tokens_per_expert,
                "num_recv_tokens_per_expert", ctx)
  assert_same(got.num_recv_tokens, want.num_tokens, "num_recv_tokens", ctx)
  handle = got.handle
  assert isinstance(handle, jax_ep.DispatchHandle), ctx
  assert_same(handle.num_recv_tokens, want.num_tokens, "handle.num_recv_tokens",
              ctx)
  assert_same(handle.src_index, want.src_index, "handle.src_index", ctx)
  assert_same(handle.recv_row, want.recv_row, "handle.recv_row", ctx)
  assert handle.capacity == want.capacity, ctx
  assert handle.num_ranks == want.recv_row.shape[0], ctx
  assert handle.num_tokens == want.recv_row.shape[2], ctx


def make_inputs(rng, num_ranks, shape, kind, dtype=BF16):
  idx = routing(rng, num_ranks, shape.tokens, shape.topk, shape.experts, kind)
  x = normal(rng, (num_ranks, shape.tokens, shape.hidden), dtype)
  w = weights(rng, idx.shape)
  return x, idx, w


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_matches_dense_model(seed, num_ranks, kind):
  shape = SPECS["tiny"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks)
  x, idx, w = make_inputs(rng, num_ranks, shape, kind)
  got = ep.run(lambda x, i, w: jax_ep.dispatch(
      ep.buffer, x, i, w, num_experts=shape.experts), flat(x), flat(idx),
               flat(w))
  want = dm.dispatch([x], idx, w, num_experts=shape.experts)
  check_dispatched(got, want, context(seed, R=num_ranks, routing=kind))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("num_ranks", [2, 8])
def test_dispatch_dtypes_without_weights(seed, num_ranks, dtype):
  shape = SPECS["small"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks)
  x, idx, _ = make_inputs(rng, num_ranks, shape, "duplicates", dtype)
  got = ep.run(lambda x, i: jax_ep.dispatch(
      ep.buffer, x, i, num_experts=shape.experts), flat(x), flat(idx))
  want = dm.dispatch([x], idx, None, num_experts=shape.experts)
  check_dispatched(got, want, context(seed, R=num_ranks, dtype=dtype),
                   with_weights=False)


@pytest.mark.parametrize("kind", ["distinct", "hot", "invalid"])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_fp8(seed, num_ranks, kind):
  shape = SPECS["small"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks)
  x, idx, w = make_inputs(rng, num_ranks, shape, kind, np.float32)
  q, s = dm.per_token_cast_to_fp8(x * 10)
  got = ep.run(lambda q, s, i, w: jax_ep.dispatch(
      ep.buffer, (q, s), i, w, num_experts=shape.experts), flat(q), flat(s),
               flat(idx), flat(w))
  want = dm.dispatch([q, s], idx, w, num_experts=shape.experts)
  check_dispatched(got, want, context(seed, R=num_ranks, routing=kind),
                   fp8=True)


def _capacities(counts, num_ranks, num_tokens):
  top = int(counts.max())
  return {"one": 1, "half": max(1, top // 2), "max-1": max(1, top - 1),
          "max": max(1, top), "default": None,
          "above-default": num_ranks * num_tokens + 3}


@pytest.mark.parametrize("which", ["one", "half", "max-1", "max", "default",
                                   "above-default"])
@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_dispatch_capacity(seed, num_ranks, which):
  """Rows past the capacity are dropped (never written), counts stay true."""
  shape = SPECS["tiny"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks, auto=True)  # checkify: see Ep
  x, idx, w = make_inputs(rng, num_ranks, shape, "hot")
  counts = dm.dispatch([x], idx, w, num_experts=shape.experts).num_tokens
  capacity = _capacities(counts, num_ranks, shape.tokens)[which]

  def body(x, i, w):
    d = jax_ep.dispatch(ep.buffer, x, i, w, num_experts=shape.experts,
                        capacity=capacity)
    jax_ep.check_capacity(d)
    return d

  with ep.active():
    err, got = checkify.checkify(ep.sharded(body))(flat(x), flat(idx), flat(w))
  got = jax.tree.map(np.asarray, got)
  want = dm.dispatch([x], idx, w, num_experts=shape.experts,
                     capacity=capacity)
  ctx = context(seed, R=num_ranks, capacity=capacity, counts=counts.tolist())
  check_dispatched(got, want, ctx)
  overflow = capacity is not None and counts.max() > capacity
  message = err.get()
  if overflow:
    assert message is not None, f"check_capacity missed an overflow [{ctx}]"
    assert "rows past the capacity were dropped" in message, message
    assert f"capacity is {capacity}" in message, message
    with pytest.raises(checkify.JaxRuntimeError, match="Raise capacity"):
      err.throw()
  else:
    assert message is None, f"check_capacity false alarm [{ctx}]: {message}"
  if which == "one" and counts.max() > 1:
    assert overflow  # the parameter tests what it says


@pytest.mark.parametrize("on_handle", [False, True])
def test_check_capacity_names_count_under_jit(seed, on_handle):
  """check_capacity on the Dispatched or its handle, checkify around jit."""
  shape = SPECS["tiny"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(4, auto=True)  # checkify: see Ep
  x, idx, _ = make_inputs(rng, 4, shape, "one_expert")
  counts = dm.dispatch([x], idx, None, num_experts=shape.experts).num_tokens
  assert counts.max() == 4 * shape.tokens

  def body(x, i):
    d = jax_ep.dispatch(ep.buffer, x, i, num_experts=shape.experts,
                        capacity=3)
    jax_ep.check_capacity(d.handle if on_handle else d)
    return d.x

  with ep.active():
    err, _ = jax.jit(checkify.checkify(ep.sharded(body)))(flat(x), flat(idx))
  message = err.get()
  assert message is not None, context(seed)
  assert f"{4 * shape.tokens} rows were sent to this rank" in message, message


@pytest.mark.parametrize("alignment", [1, 2, 3, 16])
def test_dispatch_expert_alignment(seed, alignment):
  shape = SPECS["small"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(4)
  x, idx, w = make_inputs(rng, 4, shape, "hot")
  got = ep.run(lambda x, i, w: jax_ep.dispatch(
      ep.buffer, x, i, w, num_experts=shape.experts,
      expert_alignment=alignment), flat(x), flat(idx), flat(w))
  want = dm.dispatch([x], idx, w, num_experts=shape.experts,
                     expert_alignment=alignment)
  check_dispatched(got, want, context(seed, alignment=alignment))
  assert (want.num_tokens_per_expert % alignment == 0).all()


@pytest.mark.parametrize("capacity", [None, 5], ids=["default", "overflow"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_cached_dispatch(seed, num_ranks, fp8, capacity):
  """dispatch(x2, handle=h) sends x2 along x1's routes, with no routing."""
  shape = SPECS["small"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks)
  x1, idx, w = make_inputs(rng, num_ranks, shape, "duplicates", np.float32)
  x2 = normal(rng, x1.shape) * 3
  if fp8:
    rows1 = list(dm.per_token_cast_to_fp8(x1))
    rows2 = list(dm.per_token_cast_to_fp8(x2))
  else:
    rows1, rows2 = [x1.astype(BF16)], [x2.astype(BF16)]

  def body(i, w, *rows):
    rows1, rows2 = rows[:len(rows) // 2], rows[len(rows) // 2:]
    pack = (lambda r: tuple(r)) if fp8 else (lambda r: r[0])
    first = jax_ep.dispatch(ep.buffer, pack(rows1), i, w,
                            num_experts=shape.experts, capacity=capacity)
    return first, jax_ep.dispatch(ep.buffer, pack(rows2), handle=first.handle)

  first, again = ep.run(body, flat(idx), flat(w),
                        *[flat(r) for r in rows1 + rows2])
  ctx = context(seed, R=num_ranks, fp8=fp8, capacity=capacity)
  check_dispatched(first, dm.dispatch(rows1, idx, w, num_experts=shape.experts,
                                      capacity=capacity), ctx, fp8=fp8)
  want = dm.dispatch(rows2, idx, w, num_experts=shape.experts,
                     capacity=capacity)
  check_dispatched(again, want, ctx + " (cached)", fp8=fp8, cached=True)


@pytest.mark.parametrize("spec", params("ci", "dsv3_cut", "dsv3"))
def test_dispatch_benchmark_shapes(seed, spec):
  shape = spec.shape
  num_ranks = 8 if "ci" in spec.tags else 2
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks)
  x, idx, w = make_inputs(rng, num_ranks, shape, "hot")
  got = ep.run(lambda x, i, w: jax_ep.dispatch(
      ep.buffer, x, i, w, num_experts=shape.experts), flat(x), flat(idx),
               flat(w))
  want = dm.dispatch([x], idx, w, num_experts=shape.experts)
  check_dispatched(got, want, context(seed, spec=spec.name, R=num_ranks))
