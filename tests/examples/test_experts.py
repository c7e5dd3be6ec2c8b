"""The MoE example's two expert computations (examples/moe/experts.py): the
padded expert-major one (batched GEMMs) equals the ragged one, outputs and
gradients, and counts the pairs that do not fit."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_paths import REPO

EXAMPLE = REPO / "examples" / "moe"
if str(EXAMPLE) not in sys.path:
  sys.path.insert(0, str(EXAMPLE))
import experts  # noqa: E402  (examples/moe/experts.py)

ROWS, K, L, H, F = 40, 3, 4, 32, 24


def _inputs(rng):
  x = jnp.asarray(rng.standard_normal((ROWS, H)), jnp.float32)
  idx = rng.integers(-1, L, (ROWS, K)).astype(np.int32)
  idx[:12, 0] = 2  # a hot expert
  w = jnp.asarray(np.where(idx >= 0, rng.random((ROWS, K)), 0), jnp.float32)
  w_in = jnp.asarray(rng.standard_normal((L, H, F)) / np.sqrt(H), jnp.float32)
  w_out = jnp.asarray(rng.standard_normal((L, F, H)) / np.sqrt(F),
                      jnp.float32)
  return x, jnp.asarray(idx), w, w_in, w_out


def test_padded_equals_ragged_with_room(rng):
  x, idx, w, w_in, w_out = _inputs(rng)
  slots = int(max((np.asarray(idx) == e).sum() for e in range(L)))

  def padded(x, w, w_in, w_out):
    return experts.padded_experts(x, idx, w, w_in, w_out, slots=slots)

  def ragged(x, w, w_in, w_out):
    return experts.grouped_experts(x, idx, w, w_in, w_out)

  got, dropped = jax.jit(padded)(x, w, w_in, w_out)
  assert int(dropped) == 0
  np.testing.assert_allclose(got, jax.jit(ragged)(x, w, w_in, w_out),
                             rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.standard_normal((ROWS, H)), jnp.float32)
  padded_out = lambda *a: padded(*a)[0]  # noqa: E731
  grads = [jax.jit(jax.grad(lambda *a, f=f: (f(*a) * cot).sum(),
                            argnums=(0, 1, 2, 3)))(x, w, w_in, w_out)
           for f in (padded_out, ragged)]
  for name, g, want in zip(("d_x", "d_w", "d_w_in", "d_w_out"), *grads):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("slots", [1, 4, 8])
def test_pairs_past_the_slots_are_dropped_and_counted(rng, slots):
  x, idx, w, w_in, w_out = _inputs(rng)
  sizes = np.array([(np.asarray(idx) == e).sum() for e in range(L)])
  got, dropped = experts.padded_experts(x, idx, w, w_in, w_out, slots=slots)
  assert int(dropped) == np.maximum(sizes - slots, 0).sum()
  # Kept pairs are each expert's first `slots` in row-major (row, k) order.
  keep = np.zeros(idx.shape, bool)
  for e in range(L):
    rows, ks = np.nonzero(np.asarray(idx) == e)
    keep[rows[:slots], ks[:slots]] = True
  want = experts.grouped_experts(x, jnp.where(keep, idx, -1), w, w_in, w_out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expert_slots():
  assert experts.expert_slots(4096, 8, 32, 1.25) == 1280
  assert experts.expert_slots(10, 2, 4, 100.0) == 20  # at most every pair
  assert experts.expert_slots(1, 1, 8, 1.0) == 8
