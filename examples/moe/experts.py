"""The routed experts' compute on one EP rank, and the capacity helper:
what both MoE layers of this example (`model.py`'s toy MoE and `dsv3.py`'s
DeepSeek-V3 layer) run between `jax_ep.dispatch` and `jax_ep.combine`."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def capacity(num_ranks: int, num_tokens: int, num_experts: int, topk: int,
             factor: float | None) -> int:
  """Rows one rank may receive: `factor` times the uniform-routing mean.

  A token of another rank lands on this rank when one of its K distinct
  experts is among the L local ones: with probability
  `1 - C(E-L, K) / C(E, K)` under uniform routing. `None` gives `R*T`, the
  most a rank can receive, so that nothing is ever dropped.
  """
  worst = num_ranks * num_tokens
  if factor is None:
    return worst
  local = num_experts // num_ranks
  p_hit = 1.0 - math.comb(num_experts - local, topk) / math.comb(
      num_experts, topk)
  rows = math.ceil(factor * worst * p_hit)
  return max(1, min(worst, -(-rows // 8) * 8))


@jax.custom_vjp
def _permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array):
  """`x[perm]` for a permutation `perm`; its gradient is a gather too.

  Autodiff of a gather is a scatter-add, slow on GPUs; the transpose of a
  permutation is the inverse permutation, which is again a gather.
  """
  return jnp.take(x, perm, axis=0)


def _permute_rows_fwd(x, perm, inverse):
  return jnp.take(x, perm, axis=0), (perm, inverse)


def _permute_rows_bwd(residual, g):
  perm, inverse = residual
  return jnp.take(g, inverse, axis=0), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def grouped_experts(x: jax.Array, topk_idx: jax.Array,
                    topk_weights: jax.Array, w_in: jax.Array,
                    w_out: jax.Array,
                    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu
                    ) -> jax.Array:
  """Runs the local experts on the rows a dispatch delivered.

  Args:
    x: `[M, H]` received rows (`Dispatched.x`).
    topk_idx: `int32[M, K]` local expert ids, `-1` where the source's choice
      lives on another rank and on padding rows (`Dispatched.topk_idx`).
    topk_weights: `f32[M, K]` router weights, 0 where `topk_idx` is -1.
    w_in: `[L, H, F]` and w_out: `[L, F, H]`, this rank's experts.
    activation: applied between the two projections.

  Returns:
    `f32[M, H]`: per row, the sum over its local choices k of
    `topk_weights[k] * expert_k(x)`; rows with no local choice are 0.
  """
  rows, k = topk_idx.shape
  num_local = w_in.shape[0]
  # One (row, choice) pair per entry; pairs with no local expert sort last
  # into a dummy group L that ragged_dot leaves out (masked to 0 below).
  key = jnp.where(topk_idx >= 0, topk_idx, num_local).reshape(-1)
  iota = lax.iota(jnp.int32, rows * k)
  sorted_key, order = lax.sort((key, iota), num_keys=1, is_stable=True)
  inverse = jnp.argsort(order).astype(jnp.int32)
  ends = jnp.searchsorted(sorted_key, jnp.arange(1, num_local + 1),
                          side="left").astype(jnp.int32)
  group_sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)

  pairs = jnp.broadcast_to(x[:, None], (rows, k, x.shape[1])).reshape(
      rows * k, -1)
  xs = _permute_rows(pairs, order, inverse)
  h = lax.ragged_dot(xs, w_in.astype(x.dtype), group_sizes,
                     preferred_element_type=jnp.float32)
  h = activation(h).astype(x.dtype)
  o = lax.ragged_dot(h, w_out.astype(x.dtype), group_sizes,
                     preferred_element_type=jnp.float32)
  o = jnp.where((sorted_key < num_local)[:, None], o, 0.0)
  o = _permute_rows(o, inverse, order).reshape(rows, k, -1)
  return jnp.einsum("mkh,mk->mh", o, topk_weights)
