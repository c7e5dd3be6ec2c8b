"""Gradients of a small MoE layer through jax_ep equal those of a dense MoE.

See `moe_models`. Gradients w.r.t. the tokens, the router and every expert
weight (and the forward output) must agree to f32 rounding (rtol 1e-5).

Each side's forward output and gradients come from one jitted program (a
compile each; compiling is what these tests cost). Both MoEs run at EP 2 and
8, the normal one with K = 2 and K = 3 (K only changes how many rows each
token sends, which test_grads.py covers at every EP size);
multiprocess_worker.py checks its gradients at EP 4, over two processes.
EP 1 (every expert on the one rank) composes the same VJPs, which
test_grads.py checks at EP 1 exactly: dispatch's, combine's and both
low-latency ops'.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ep_testing import EP, Ep, assert_close, context
from moe_models import (HIDDEN, NUM_EXPERTS, TOKENS, choose_experts,
                        dense_ll_moe, dense_moe, ep_ll_moe, ep_moe)

F32 = np.float32


def _params(rng, num_ranks, ffn):
  n = num_ranks * TOKENS
  x = rng.standard_normal((n, HIDDEN), dtype=F32)
  w_router = rng.standard_normal((HIDDEN, NUM_EXPERTS), dtype=F32) * F32(0.5)
  w1 = rng.standard_normal((NUM_EXPERTS, HIDDEN, ffn), dtype=F32) * F32(0.3)
  w2 = rng.standard_normal((NUM_EXPERTS, ffn, HIDDEN), dtype=F32) * F32(0.3)
  probe = rng.standard_normal((n, HIDDEN), dtype=F32)
  return x, w_router, w1, w2, probe


def _compare(got, want, names, ctx, atol_rel=1e-5):
  for g, w, name in zip(got, want, names):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, f"{name} [{ctx}]"
    assert np.abs(w).max() > 0, f"{name} [{ctx}]: zero gradient tests nothing"
    assert_close(g, w, name, ctx, rtol=1e-5,
                 atol=atol_rel * np.abs(w).max())


def _output_and_grads(moe, probe, argnums):
  """jit: (params..., topk_idx) -> (moe(params), d sum(moe * probe)/d
  params[argnums])."""

  def run(*args):
    *params, idx = args
    loss = lambda *params: jnp.sum(moe(*params, idx) * probe)  # noqa: E731
    return moe(*params, idx), jax.grad(loss, argnums=argnums)(*params)

  return jax.jit(run)


@pytest.mark.parametrize("num_ranks,topk", [(2, 2), (8, 3)])
def test_moe_gradients_match_dense(seed, rng, num_ranks, topk):
  ep = Ep(num_ranks)
  x, w_router, w1, w2, probe = _params(rng, num_ranks, ffn=8)
  idx = np.asarray(jax.jit(choose_experts, static_argnums=2)(x, w_router,
                                                             topk))
  layer = ep.sharded(lambda *a: ep_moe(ep.buffer, *a),
                     in_specs=(EP, P(), EP, EP, EP), per_rank=False)
  argnums = (0, 1, 2, 3)
  with ep.active():
    put = (ep.put(x), ep.put(w_router, P()), ep.put(w1), ep.put(w2),
           ep.put(idx))
    got_out, got = _output_and_grads(layer, probe, argnums)(*put)
  want_out, want = _output_and_grads(dense_moe, probe, argnums)(
      x, w_router, w1, w2, idx)
  ctx = context(seed, R=num_ranks, topk=topk)
  _compare([got_out], [want_out], ["out (forward)"], ctx)
  _compare(got, want, ("d_x", "d_router", "d_w1", "d_w2"), ctx)


# EP 1 and 4: the LL VJPs of test_grads.py (exact, against the dense model)
# run them.
@pytest.mark.parametrize("num_ranks", [2, 8])
def test_low_latency_moe_gradients_match_dense(seed, rng, num_ranks):
  """K = 2: every sum of two terms is the same in any order. But the LL path
  rounds to bf16, and XLA may contract a multiply-add into an FMA on one side
  and not the other: a bf16 rounding tie can then flip one term by one bf16
  step (seen: 9.4e-5 on a gradient whose largest entry is 2.4, and 0.0156,
  one step of a term in [2, 4), on d_x whose largest entry is 10.2 with
  seed 6627139056751090528 at R = 8), so entries may differ by one bf16
  step (2^-7) of the largest (a wrong gradient is off by O(1))."""
  ep = Ep(num_ranks)
  n = num_ranks * TOKENS
  x = rng.standard_normal((n, HIDDEN), dtype=F32)
  w_router = rng.standard_normal((HIDDEN, NUM_EXPERTS), dtype=F32)
  a, b, c = (rng.standard_normal((NUM_EXPERTS, HIDDEN), dtype=F32)
             for _ in range(3))
  probe = rng.standard_normal((n, HIDDEN), dtype=F32)
  idx = np.asarray(jax.jit(choose_experts, static_argnums=2)(x, w_router, 2))
  layer = ep.sharded(lambda *args: ep_ll_moe(ep.buffer, *args),
                     in_specs=(EP, P(), EP, EP, EP, EP), per_rank=False)
  argnums = (0, 1, 2, 3, 4)
  with ep.active():
    _, got = _output_and_grads(layer, probe, argnums)(
        ep.put(x), ep.put(w_router, P()), ep.put(a), ep.put(b), ep.put(c),
        ep.put(idx))
  _, want = _output_and_grads(dense_ll_moe, probe, argnums)(
      x, w_router, a, b, c, idx)
  _compare(got, want, ("d_x", "d_router", "d_a", "d_b", "d_c"),
           context(seed, R=num_ranks), atol_rel=2.0**-7)
