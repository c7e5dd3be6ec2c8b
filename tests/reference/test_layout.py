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
                "is_token_in_rank", "num_invalid"):
    assert_same(getattr(got, field), getattr(want, field), field, ctx)
