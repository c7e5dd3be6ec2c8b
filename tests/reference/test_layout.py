"""get_dispatch_layout against the dense model, every routing kind and EP size."""

import pytest

import dense_model as dm
import jax_ep
from ep_testing import ROUTINGS, assert_same, flat
from specs import RANKS


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_layout_matches_dense_model(problem, num_ranks, kind):
  p = problem(num_ranks, "tiny")
  idx = p.routing(kind)
  got = p.run(lambda i: jax_ep.get_dispatch_layout(p.buffer, i,
                                                   p.shape.experts), flat(idx))
  want = dm.layout(idx, p.shape.experts)
  ctx = p.context(routing=kind)
  assert isinstance(got, jax_ep.Layout)
  assert_same(got.num_tokens_per_rank, want.num_tokens_per_rank,
              "num_tokens_per_rank", ctx)
  assert_same(got.num_tokens_per_expert, want.num_tokens_per_expert,
              "num_tokens_per_expert", ctx)
  assert_same(got.is_token_in_rank, want.is_token_in_rank, "is_token_in_rank",
              ctx)
  assert_same(got.num_invalid, want.num_invalid, "num_invalid", ctx)
  assert_same(got.num_tokens_per_node, want.num_tokens_per_node,
              "num_tokens_per_node", ctx)
  if kind == "invalid":
    assert want.num_invalid.sum() > 0, ctx  # the case tests what it says


@pytest.mark.parametrize("spec", ["ci", "dsv3_cut"])
def test_layout_benchmark_shapes(problem, spec):
  p = problem(8, spec)
  idx = p.routing("hot")
  got = p.run(lambda i: jax_ep.get_dispatch_layout(p.buffer, i,
                                                   p.shape.experts), flat(idx))
  want = dm.layout(idx, p.shape.experts)
  ctx = p.context(spec=spec)
  for field in ("num_tokens_per_rank", "num_tokens_per_expert",
                "is_token_in_rank", "num_invalid", "num_tokens_per_node"):
    assert_same(getattr(got, field), getattr(want, field), field, ctx)


@pytest.mark.parametrize("num_ranks,ranks_per_node",
                         [(2, 1), (4, 1), (4, 2), (8, 2), (8, 4)])
def test_layout_counts_each_token_once_per_node(problem, num_ranks,
                                                ranks_per_node):
  """num_tokens_per_node across nodes: a token with experts on several
  ranks of one node counts once for it (DeepEP's num_tokens_per_rdma_rank)."""
  p = problem(num_ranks, "small", ranks_per_node=ranks_per_node)
  idx = p.routing("invalid")
  got = p.run(lambda i: jax_ep.get_dispatch_layout(p.buffer, i,
                                                   p.shape.experts), flat(idx))
  want = dm.layout(idx, p.shape.experts, ranks_per_node=ranks_per_node)
  ctx = p.context(ranks_per_node=ranks_per_node)
  num_nodes = num_ranks // ranks_per_node
  assert got.num_tokens_per_node.shape == (num_ranks, num_nodes)
  assert_same(got.num_tokens_per_node, want.num_tokens_per_node,
              "num_tokens_per_node", ctx)
  # Fewer than the per-rank counts summed wherever a token has two ranks of
  # one node: the case tests what it says.
  per_rank = want.num_tokens_per_rank.reshape(num_ranks, num_nodes, -1)
  if ranks_per_node > 1:
    assert (want.num_tokens_per_node < per_rank.sum(-1)).any(), ctx
