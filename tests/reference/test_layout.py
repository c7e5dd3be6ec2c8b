"""get_dispatch_layout against the dense model, every routing kind and EP size."""

import numpy as np
import pytest

import dense_model as dm
import jax_ep
from ep_testing import ROUTINGS, Ep, assert_same, context, flat, routing
from specs import RANKS, SPECS


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_layout_matches_dense_model(seed, num_ranks, kind):
  shape = SPECS["tiny"].shape
  rng = np.random.default_rng(seed)
  ep = Ep(num_ranks)
  idx = routing(rng, num_ranks, shape.tokens, shape.topk, shape.experts, kind)
  got = ep.run(lambda i: jax_ep.get_dispatch_layout(ep.buffer, i,
                                                    shape.experts), flat(idx))
  want = dm.layout(idx, shape.experts)
  ctx = context(seed, R=num_ranks, routing=kind)
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
def test_layout_benchmark_shapes(seed, spec):
  shape = SPECS[spec].shape
  rng = np.random.default_rng(seed)
  ep = Ep(8)
  idx = routing(rng, 8, shape.tokens, shape.topk, shape.experts, "hot")
  got = ep.run(lambda i: jax_ep.get_dispatch_layout(ep.buffer, i,
                                                    shape.experts), flat(idx))
  want = dm.layout(idx, shape.experts)
  ctx = context(seed, spec=spec)
  for field in ("num_tokens_per_rank", "num_tokens_per_expert",
                "is_token_in_rank", "num_invalid"):
    assert_same(getattr(got, field), getattr(want, field), field, ctx)
