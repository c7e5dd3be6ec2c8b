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
from ep_testing import BF16, ROUTINGS, assert_same, flat
from specs import RANKS, params


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


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_matches_dense_model(problem, num_ranks, kind):
  p = problem(num_ranks, "tiny")
  idx, x, w = p.routing(kind), p.rows(BF16), p.weights()
  got = p.run(lambda x, i, w: jax_ep.dispatch(
      p.buffer, x, i, w, num_experts=p.shape.experts), flat(x), flat(idx),
              flat(w))
  want = dm.dispatch([x], idx, w, num_experts=p.shape.experts)
  check_dispatched(got, want, p.context(routing=kind))


# Every row dtype once, EP 2 and 8 (the bf16 rows of the tests above run at
# every EP size, with weights).
@pytest.mark.parametrize("num_ranks,dtype", [
    pytest.param(2, np.float16, id="2-f16"),
    pytest.param(8, np.float32, id="8-f32"),
    pytest.param(8, BF16, id="8-bf16")])
def test_dispatch_dtypes_without_weights(problem, num_ranks, dtype):
  p = problem(num_ranks, "small")
  idx, x = p.routing("duplicates"), p.rows(dtype)
  got = p.run(lambda x, i: jax_ep.dispatch(
      p.buffer, x, i, num_experts=p.shape.experts), flat(x), flat(idx))
  want = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  check_dispatched(got, want, p.context(dtype=dtype), with_weights=False)


@pytest.mark.parametrize("kind", ["distinct", "hot", "invalid"])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_dispatch_fp8(problem, num_ranks, kind):
  p = problem(num_ranks, "small")
  idx, x, w = p.routing(kind), p.rows(np.float32), p.weights()
  q, s = dm.per_token_cast_to_fp8(x * 10)
  got = p.run(lambda q, s, i, w: jax_ep.dispatch(
      p.buffer, (q, s), i, w, num_experts=p.shape.experts), flat(q), flat(s),
              flat(idx), flat(w))
  want = dm.dispatch([q, s], idx, w, num_experts=p.shape.experts)
  check_dispatched(got, want, p.context(routing=kind), fp8=True)


def _capacities(counts, num_ranks, num_tokens):
  top = int(counts.max())
  return {"one": 1, "half": max(1, top // 2), "max-1": max(1, top - 1),
          "max": max(1, top), "default": None,
          "above-default": num_ranks * num_tokens + 3}


# Each capacity at one or two EP sizes, each EP size at two capacities, one
# of them dropping rows (each pair compiles a program of its own).
@pytest.mark.parametrize("num_ranks,which", [
    (1, "one"), (1, "default"), (2, "half"), (2, "above-default"),
    (4, "max-1"), (4, "default"), (8, "max"), (8, "one")])
def test_dispatch_capacity(problem, num_ranks, which):
  """Rows past the capacity are dropped (never written), counts stay true."""
  p = problem(num_ranks, "tiny", auto=True)  # checkify: see Ep
  idx, x, w = p.routing("hot"), p.rows(BF16), p.weights()
  counts = dm.dispatch([x], idx, w, num_experts=p.shape.experts).num_tokens
  capacity = _capacities(counts, num_ranks, p.shape.tokens)[which]

  def body(x, i, w):
    d = jax_ep.dispatch(p.buffer, x, i, w, num_experts=p.shape.experts,
                        capacity=capacity)
    jax_ep.check_capacity(d)
    return d

  with p.active():
    err, got = checkify.checkify(p.sharded(body))(flat(x), flat(idx), flat(w))
  got = jax.tree.map(np.asarray, got)
  want = dm.dispatch([x], idx, w, num_experts=p.shape.experts,
                     capacity=capacity)
  ctx = p.context(capacity=capacity, counts=counts.tolist())
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
def test_check_capacity_names_count_under_jit(problem, on_handle):
  """check_capacity on the Dispatched or its handle, checkify around jit."""
  p = problem(4, "tiny", auto=True)  # checkify: see Ep
  idx, x = p.routing("one_expert"), p.rows(BF16)
  counts = dm.dispatch([x], idx, None, num_experts=p.shape.experts).num_tokens
  assert counts.max() == 4 * p.shape.tokens

  def body(x, i):
    d = jax_ep.dispatch(p.buffer, x, i, num_experts=p.shape.experts,
                        capacity=3)
    jax_ep.check_capacity(d.handle if on_handle else d)
    return d.x

  with p.active():
    err, _ = jax.jit(checkify.checkify(p.sharded(body)))(flat(x), flat(idx))
  message = err.get()
  assert message is not None, p.context()
  assert f"{4 * p.shape.tokens} rows were sent to this rank" in message, message


@pytest.mark.parametrize("alignment", [1, 2, 3, 16])
def test_dispatch_expert_alignment(problem, alignment):
  p = problem(4, "small")
  idx, x, w = p.routing("hot"), p.rows(BF16), p.weights()
  got = p.run(lambda x, i, w: jax_ep.dispatch(
      p.buffer, x, i, w, num_experts=p.shape.experts,
      expert_alignment=alignment), flat(x), flat(idx), flat(w))
  want = dm.dispatch([x], idx, w, num_experts=p.shape.experts,
                     expert_alignment=alignment)
  check_dispatched(got, want, p.context(alignment=alignment))
  assert (want.num_tokens_per_expert % alignment == 0).all()


# Every pair of (EP size, rows), (EP size, capacity) and (rows, capacity).
@pytest.mark.parametrize("num_ranks,fp8,capacity", [
    pytest.param(1, False, 5, id="1-bf16-overflow"),
    pytest.param(1, True, None, id="1-fp8-default"),
    pytest.param(2, False, None, id="2-bf16-default"),
    pytest.param(2, True, 5, id="2-fp8-overflow"),
    pytest.param(8, False, 5, id="8-bf16-overflow"),
    pytest.param(8, True, None, id="8-fp8-default")])
def test_cached_dispatch(problem, num_ranks, fp8, capacity):
  """dispatch(x2, handle=h) sends x2 along x1's routes, with no routing."""
  p = problem(num_ranks, "small")
  idx, x1, w = p.routing("duplicates"), p.rows(np.float32), p.weights()
  x2 = p.rows() * 3
  if fp8:
    rows1 = list(dm.per_token_cast_to_fp8(x1))
    rows2 = list(dm.per_token_cast_to_fp8(x2))
  else:
    rows1, rows2 = [x1.astype(BF16)], [x2.astype(BF16)]

  def body(i, w, *rows):
    rows1, rows2 = rows[:len(rows) // 2], rows[len(rows) // 2:]
    pack = (lambda r: tuple(r)) if fp8 else (lambda r: r[0])
    first = jax_ep.dispatch(p.buffer, pack(rows1), i, w,
                            num_experts=p.shape.experts, capacity=capacity)
    return first, jax_ep.dispatch(p.buffer, pack(rows2), handle=first.handle)

  first, again = p.run(body, flat(idx), flat(w),
                       *[flat(r) for r in rows1 + rows2])
  ctx = p.context(fp8=fp8, capacity=capacity)
  check_dispatched(first, dm.dispatch(
      rows1, idx, w, num_experts=p.shape.experts, capacity=capacity), ctx,
                   fp8=fp8)
  want = dm.dispatch(rows2, idx, w, num_experts=p.shape.experts,
                     capacity=capacity)
  check_dispatched(again, want, ctx + " (cached)", fp8=fp8, cached=True)


@pytest.mark.parametrize("spec", params("ci", "dsv3_cut", "dsv3"))
def test_dispatch_benchmark_shapes(problem, spec):
  p = problem(8 if "ci" in spec.tags else 2, spec.shape)
  idx, x, w = p.routing("hot"), p.rows(BF16), p.weights()
  got = p.run(lambda x, i, w: jax_ep.dispatch(
      p.buffer, x, i, w, num_experts=p.shape.experts), flat(x), flat(idx),
              flat(w))
  want = dm.dispatch([x], idx, w, num_experts=p.shape.experts)
  check_dispatched(got, want, p.context(spec=spec.name))
