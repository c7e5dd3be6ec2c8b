"""Normal combine against the dense model, bit for bit.

Combine's order is fixed (fp32, rank order, bias last, one rounding), so the
dense model, which sums in that order with numpy fp32, must give the same
bits: every comparison here is exact. `y` is random in every row, padding
included, so a combine that read padding rows would fail.
"""

import jax
import numpy as np
import pytest

import dense_model as dm
import jax_ep
from bench.shapes import Shape
from jax_ep._src.reference import normal as reference_normal
from ep_testing import BF16, ROUTINGS, assert_same, flat
from specs import RANKS

F32 = np.float32


def run_combine(p, x, idx, y, *, row_weights=None, biases=None,
                capacity=None, bias_as=tuple):
  """Dispatches x, then combines the given y (and weights, biases) back."""
  num_biases = 0 if biases is None else len(biases)

  def body(x, i, y, *rest):
    d = jax_ep.dispatch(p.buffer, x, i, num_experts=p.shape.experts,
                        capacity=capacity)
    w = rest[0] if row_weights is not None else None
    b = rest[len(rest) - num_biases:] if num_biases else ()
    bias = None if biases is None else (b[0] if bias_as is None else
                                        bias_as(b))
    return jax_ep.combine(p.buffer, y, d.handle, topk_weights=w, bias=bias)

  args = [flat(x), flat(idx), flat(y)]
  if row_weights is not None:
    args.append(flat(row_weights))
  args += [flat(b) for b in (biases or ())]
  return p.run(body, *args)


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_combine_of_negative_zeros_starts_at_the_first_rank(problem,
                                                            num_ranks):
  """The sum starts at rank 0's term, not at a +0, and a rank that did not
  keep the token adds +0: rows of -0 sum to -0 exactly where every rank kept
  the token (at R = 1: where it was kept), else to +0."""
  p = problem(num_ranks, "tiny")
  idx, x = p.routing("distinct"), p.rows(BF16)
  y = np.full((num_ranks, num_ranks * p.shape.tokens, p.shape.hidden), -0.0,
              BF16)
  out = run_combine(p, x, idx, y)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  want = dm.combine(y, routes)
  assert_same(out, want, "out", p.context())
  kept_by_all = (routes.recv_row < routes.capacity).all(0)  # [R(src), T]
  assert (np.signbit(want.astype(F32)).all(-1) == kept_by_all).all()


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_combine_matches_dense_model(problem, num_ranks, kind):
  p = problem(num_ranks, "tiny")
  idx, x = p.routing(kind), p.rows(BF16)
  m = num_ranks * p.shape.tokens
  y, row_w, bias = p.rows(BF16, num_rows=m), p.weights(num_rows=m), p.rows()
  out, out_w = run_combine(p, x, idx, y, row_weights=row_w, biases=[bias],
                           bias_as=None)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  ctx = p.context(routing=kind)
  assert_same(out, dm.combine(y, routes, biases=[bias]), "out", ctx)
  assert_same(out_w, dm.combine(row_w, routes), "weights", ctx)


BIASES = {
    "none": (None, []),
    "f32": (None, [F32]),
    "bf16": (None, [BF16]),
    "tuple_f32_bf16": (tuple, [F32, BF16]),
    "list_bf16_bf16": (list, [BF16, BF16]),
}


# Each bias form once, at EP 2 or 4 (each pair compiles a program of its own).
@pytest.mark.parametrize("num_ranks,bias", [
    (2, "none"), (4, "f32"), (2, "bf16"), (4, "tuple_f32_bf16"),
    (2, "list_bf16_bf16")])
def test_combine_bias(problem, num_ranks, bias):
  p = problem(num_ranks, "small")
  idx, x = p.routing("duplicates"), p.rows(BF16)
  y = p.rows(BF16, num_rows=num_ranks * p.shape.tokens)
  bias_as, dtypes = BIASES[bias]
  biases = [p.rows(d) * 4 for d in dtypes]
  out = run_combine(p, x, idx, y, biases=biases or None, bias_as=bias_as)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  assert_same(out, dm.combine(y, routes, biases=biases), "out",
              p.context(bias=bias))


@pytest.mark.parametrize("num_ranks", [4, 8])
def test_combine_f32_rows_sum_in_rank_order(problem, num_ranks):
  """f32 rows keep every bit of the fp32 sum: its order shows."""
  p = problem(num_ranks, "small")
  idx, x = p.routing("distinct"), p.rows(F32)
  # Magnitudes spread over 2^-10 .. 2^10: f32 addition is far from exact.
  y = p.rows(num_rows=num_ranks * p.shape.tokens)
  y *= np.exp2(p.rng.integers(-10, 11, size=y.shape)).astype(F32)
  bias = p.rows()
  out = run_combine(p, x, idx, y, biases=[bias], bias_as=None)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  assert_same(out, dm.combine(y, routes, biases=[bias]), "out", p.context())


def test_combine_rounds_once_after_fp32_sum_in_rank_order(problem):
  """Hand-made rows whose sum differs in any other order or precision."""
  num_ranks, tokens = 4, 3
  p = problem(num_ranks, Shape(tokens=tokens, hidden=8, topk=3, experts=4))
  idx = p.routing("distinct")  # L = 1
  idx[0, 0] = [0, 1, 2]  # token 0 of rank 0 -> row 0 of ranks 0, 1, 2
  x, y = p.rows(BF16), p.rows(BF16, num_rows=num_ranks * tokens)
  y[:3, 0, 0] = [2.0**25, 1.0, -2.0**25]  # fp32, rank order: 0 (else 1)
  y[:3, 0, 1] = [1.0, 2.0**-8, 2.0**-8]   # fp32: 1 + 2^-7 (bf16 steps: 1)
  y[:3, 0, 2] = [1.0, 2.0**-9, 0.0]       # rounds to 1 once
  out = run_combine(p, x, idx, y)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  ctx = p.context()
  assert (routes.recv_row[:3, 0, 0] == 0).all() and \
      routes.recv_row[3, 0, 0] == num_ranks * tokens
  assert_same(out[0, 0, :3], np.array([0.0, 1.0 + 2.0**-7, 1.0], BF16),
              "probe values", ctx)
  assert_same(out, dm.combine(y, routes), "out", ctx)


# (R, G, y's dtype): nodes of G ranks; G = R is one node, G = 1 rounds
# nothing extra. Every layout once, each dtype at several, both at (4, 2).
NODE_LAYOUTS = [(2, 1, F32), (4, 1, BF16), (4, 2, BF16), (4, 2, F32),
                (8, 2, BF16), (8, 4, F32)]


@pytest.mark.parametrize("num_ranks,ranks_per_node,dtype", [
    pytest.param(r, g, d, id=f"{r}-{g}-{'f32' if d is F32 else 'bf16'}")
    for r, g, d in NODE_LAYOUTS])
def test_combine_across_nodes_sums_node_by_node(problem, num_ranks,
                                                ranks_per_node, dtype):
  """With ranks_per_node < R each node's partial is rounded to y's dtype
  before the node partials are summed (docs/contract.md): the reference
  equals the dense model's node-by-node order bit for bit, weights too."""
  p = problem(num_ranks, "small", ranks_per_node=ranks_per_node)
  assert p.buffer.topology.num_nodes == num_ranks // ranks_per_node
  idx, x = p.routing("hot"), p.rows(BF16)
  m = num_ranks * p.shape.tokens
  y = p.rows(num_rows=m)
  y = (y * np.exp2(p.rng.integers(-8, 9, size=y.shape))).astype(dtype)
  row_w, bias = p.weights(num_rows=m), p.rows()
  out, out_w = run_combine(p, x, idx, y, row_weights=row_w, biases=[bias],
                           bias_as=None)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts)
  ctx = p.context(ranks_per_node=ranks_per_node)
  assert_same(out, dm.combine(y, routes, biases=[bias],
                              ranks_per_node=ranks_per_node), "out", ctx)
  assert_same(out_w, dm.combine(row_w, routes, ranks_per_node=ranks_per_node),
              "weights", ctx)


def test_combine_across_nodes_rounds_each_node_once(problem):
  """Hand-made bf16 rows whose node-by-node sum differs from the one-node
  sum: 4 ranks on 2 nodes of 2, token 0 of rank 0 kept by every rank."""
  num_ranks, tokens = 4, 3
  shape = Shape(tokens=tokens, hidden=8, topk=4, experts=4)
  results = {}
  for ranks_per_node in (4, 2):
    p = problem(num_ranks, shape, ranks_per_node=ranks_per_node)
    idx = p.routing("distinct")  # L = 1
    idx[0, 0] = [0, 1, 2, 3]  # token 0 of rank 0 -> row 0 of every rank
    x = p.rows(BF16)
    y = np.zeros((num_ranks, num_ranks * tokens, 8), BF16)
    # One node: 1 + 3 * 2^-8, a tie between bf16 steps, to even: 1 + 2^-6.
    # Two nodes: node 0's 1 + 2^-8 rounds (a tie, to even) to 1, node 1's
    # 2^-7 is exact, and 1 + 2^-7 is a bf16 value.
    y[:, 0, 0] = [1.0, 2.0**-8, 2.0**-8, 2.0**-8]
    results[ranks_per_node] = run_combine(p, x, idx, y)[0, 0, 0]
    routes = dm.dispatch([x], idx, None, num_experts=4)
    assert_same(run_combine(p, x, idx, y),
                dm.combine(y, routes, ranks_per_node=ranks_per_node), "out",
                p.context(ranks_per_node=ranks_per_node))
  assert float(results[4]) == 1.0 + 2.0**-6
  assert float(results[2]) == 1.0 + 2.0**-7


@pytest.mark.parametrize("dtype", [BF16, np.float16, F32],
                         ids=["bf16", "f16", "f32"])
def test_node_partials_round_like_a_cast_when_compiled(rng, dtype):
  """The node partial's rounding (`round_to`) equals a cast to y's dtype
  and back, under jit too (where XLA may drop a convert pair), over the
  exponent range: subnormals, ties, overflow to inf."""
  n = 100_000
  with np.errstate(over="ignore"):  # f32 and f16 overflow to inf, as meant
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-150, 128, n)))
    x = np.concatenate([x.astype(F32), F32([
        0.0, -0.0, np.inf, -np.inf, 1.0 + 2.0**-8, 65520.0, 2.0**-25])])
    want = x.astype(dtype).astype(F32)
  got = np.asarray(jax.jit(lambda v: reference_normal.round_to(v, dtype))(x))
  assert_same(got, want, f"round_to {np.dtype(dtype).name}", "")


def _ranks_receiving(idx, experts, num_ranks, recv_row=None, capacity=None):
  """int[R, T]: ranks that receive (and keep) each token, from ids alone."""
  n = np.zeros(idx.shape[:2], np.int64)
  for s, t in np.ndindex(*idx.shape[:2]):
    owners = {dm.owner(int(e), experts, num_ranks) for e in idx[s, t]} - {None}
    if recv_row is not None:
      owners = {r for r in owners if recv_row[r, s, t] < capacity}
    n[s, t] = len(owners)
  return n


@pytest.mark.parametrize("kind", ["distinct", "duplicates", "hot", "invalid"])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_combine_of_dispatch_is_x_times_receiving_ranks(problem, num_ranks,
                                                        kind):
  """combine(dispatch(x)) == x * #ranks holding the token; weights come back."""
  p = problem(num_ranks, "tiny")
  idx = p.routing(kind)
  x = p.dyadic_rows()  # x*8 exact
  w = p.weights()

  def body(x, i, w):
    d = jax_ep.dispatch(p.buffer, x, i, w, num_experts=p.shape.experts)
    return jax_ep.combine(p.buffer, d.x, d.handle, d.topk_weights)

  out, out_w = p.run(body, flat(x), flat(idx), flat(w))
  n = _ranks_receiving(idx, p.shape.experts, num_ranks)
  ctx = p.context(routing=kind)
  want = (x.astype(F32) * n[..., None] + F32(0)).astype(BF16)  # +0, not -0
  assert_same(out, want, "combine(dispatch(x))", ctx)
  valid = (idx >= 0) & (idx < p.shape.experts)
  assert_same(out_w, np.where(valid, w, F32(0)), "weights", ctx)


@pytest.mark.parametrize("kind", ["distinct", "duplicates", "invalid"])
@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_weighted_round_trip_is_x_times_sum_of_weights(problem, num_ranks,
                                                       kind):
  """Each rank scales its rows by their received weights' sum; combine gives
  x * sum over the token's valid k of w (docs/contract.md, "Round trips").
  Dyadic f32 values keep every product and sum exact."""
  p = problem(num_ranks, "tiny")
  idx, x = p.routing(kind), p.dyadic_rows(F32)
  # Positive weights: no sum is zero, so no -0 (whose sign combine leaves
  # unspecified) can appear.
  w = p.rng.integers(1, 9, size=idx.shape).astype(F32) / 4

  def body(x, i, w):
    d = jax_ep.dispatch(p.buffer, x, i, w, num_experts=p.shape.experts)
    y = d.x * d.topk_weights.sum(-1, keepdims=True)
    return jax_ep.combine(p.buffer, y, d.handle)

  got = p.run(body, flat(x), flat(idx), flat(w))
  valid = (idx >= 0) & (idx < p.shape.experts)
  total = np.where(valid, w, F32(0)).sum(-1, keepdims=True)
  want = (x * total + F32(0)).astype(F32)
  assert_same(got, want, "combine(w-scaled dispatch(x))",
              p.context(routing=kind))


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_combine_after_capacity_overflow(problem, num_ranks):
  """Dropped rows add nothing; kept rows add exactly as without overflow."""
  p = problem(num_ranks, "tiny")
  idx, x = p.routing("hot"), p.dyadic_rows()
  counts = dm.dispatch([x], idx, None, num_experts=p.shape.experts).num_tokens
  capacity = max(1, int(counts.max()) // 2)
  y = p.rows(BF16, num_rows=capacity)
  out = run_combine(p, x, idx, y, capacity=capacity)
  routes = dm.dispatch([x], idx, None, num_experts=p.shape.experts,
                       capacity=capacity)
  ctx = p.context(capacity=capacity)
  assert counts.max() > capacity, ctx
  assert_same(out, dm.combine(y, routes), "out", ctx)

  def identity(x, i):
    d = jax_ep.dispatch(p.buffer, x, i, num_experts=p.shape.experts,
                        capacity=capacity)
    return jax_ep.combine(p.buffer, d.x, d.handle)

  out = p.run(identity, flat(x), flat(idx))
  n = _ranks_receiving(idx, p.shape.experts, num_ranks, routes.recv_row,
                       capacity)
  assert_same(out, (x.astype(F32) * n[..., None] + F32(0)).astype(BF16),
              "combine(dispatch(x)) with drops", ctx)
