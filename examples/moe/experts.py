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
def _move_rows(x: jax.Array, index: jax.Array, inverse: jax.Array):
  """`x[index]` (zero rows where `index` is out of range) for a one-to-one
  map between the rows it picks and the rows it fills; its gradient is the
  gather along `inverse`, the map the other way.

  Autodiff of a gather is a scatter-add, slow on GPUs; the transpose of a
  one-to-one map is its inverse map, which is again a gather.
  """
  return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _move_rows_fwd(x, index, inverse):
  return _move_rows(x, index, inverse), (index, inverse)


def _move_rows_bwd(residual, g):
  index, inverse = residual
  return jnp.take(g, inverse, axis=0, mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _sorted_pairs(topk_idx: jax.Array, num_local: int):
  """The (row, choice) pairs sorted by local expert, those with no local
  expert last: `(expert of each sorted pair (num_local for none), order,
  its inverse, pairs per local expert)`."""
  rows, k = topk_idx.shape
  key = jnp.where(topk_idx >= 0, topk_idx, num_local).reshape(-1)
  iota = lax.iota(jnp.int32, rows * k)
  sorted_key, order = lax.sort((key, iota), num_keys=1, is_stable=True)
  inverse = jnp.argsort(order).astype(jnp.int32)
  ends = jnp.searchsorted(sorted_key, jnp.arange(1, num_local + 1),
                          side="left").astype(jnp.int32)
  return sorted_key, order, inverse, jnp.diff(ends, prepend=0).astype(
      jnp.int32)


def grouped_experts(x: jax.Array, topk_idx: jax.Array,
                    topk_weights: jax.Array, w_in: jax.Array,
                    w_out: jax.Array,
                    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu
                    ) -> jax.Array:
  """Runs the local experts on the rows a dispatch delivered, through
  `jax.lax.ragged_dot` over the pairs sorted by expert.

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
  # Pairs with no local expert sort last into a dummy group L that
  # ragged_dot leaves out (masked to 0 below).
  sorted_key, order, inverse, group_sizes = _sorted_pairs(topk_idx, num_local)
  pairs = jnp.broadcast_to(x[:, None], (rows, k, x.shape[1])).reshape(
      rows * k, -1)
  xs = _move_rows(pairs, order, inverse)
  h = lax.ragged_dot(xs, w_in.astype(x.dtype), group_sizes,
                     preferred_element_type=jnp.float32)
  h = activation(h).astype(x.dtype)
  o = lax.ragged_dot(h, w_out.astype(x.dtype), group_sizes,
                     preferred_element_type=jnp.float32)
  o = jnp.where((sorted_key < num_local)[:, None], o, 0.0)
  o = _move_rows(o, inverse, order).reshape(rows, k, -1)
  return jnp.einsum("mkh,mk->mh", o, topk_weights)


def padded_experts(x: jax.Array, topk_idx: jax.Array,
                   topk_weights: jax.Array, w_in: jax.Array,
                   w_out: jax.Array, *, slots: int,
                   activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu):
  """`grouped_experts` as two batched GEMMs over an expert-major layout:
  each local expert's pairs fill its `slots` rows of an `[L, slots, H]`
  block (zero rows after them), which a GPU runs as dense batched matmuls
  instead of `ragged_dot`'s grouped loop.

  Returns:
    `(f32[M, H] as grouped_experts, int32 pairs past `slots`)`: a pair that
    does not fit in its expert's slots is dropped (it adds nothing), and
    counted.
  """
  rows, k = topk_idx.shape
  num_local = w_in.shape[0]
  n = rows * k
  sorted_key, order, inverse, sizes = _sorted_pairs(topk_idx, num_local)
  starts = jnp.cumsum(sizes) - sizes
  slot = lax.iota(jnp.int32, slots)
  # Slot (l, c) holds sorted pair starts[l] + c; sorted pair p sits in slot
  # (its expert, p - starts[its expert]): one map and its inverse.
  slot_pair = jnp.where(slot < sizes[:, None], starts[:, None] + slot,
                        n).reshape(-1)
  expert = jnp.minimum(sorted_key, num_local - 1)
  offset = lax.iota(jnp.int32, n) - starts[expert]
  pair_slot = jnp.where((sorted_key < num_local) & (offset < slots),
                        expert * slots + offset, num_local * slots)
  pairs = jnp.broadcast_to(x[:, None], (rows, k, x.shape[1])).reshape(n, -1)
  xs = _move_rows(_move_rows(pairs, order, inverse), slot_pair, pair_slot)
  xs = xs.reshape(num_local, slots, -1)
  h = jnp.einsum("lch,lhf->lcf", xs, w_in.astype(x.dtype),
                 preferred_element_type=jnp.float32)
  h = activation(h).astype(x.dtype)
  o = jnp.einsum("lcf,lfh->lch", h, w_out.astype(x.dtype),
                 preferred_element_type=jnp.float32)
  o = _move_rows(o.reshape(num_local * slots, -1), pair_slot, slot_pair)
  o = _move_rows(o, inverse, order).reshape(rows, k, -1)
  dropped = jnp.maximum(sizes - slots, 0).sum()
  return jnp.einsum("mkh,mk->mh", o, topk_weights), dropped


def expert_slots(rows: int, topk: int, num_local: int, factor: float) -> int:
  """Slots per local expert for `padded_experts`: `factor` times the mean
  pairs per expert (rows * topk / L), rounded up to a multiple of 8, at
  most every pair."""
  mean = rows * topk / num_local
  return max(8, min(rows * topk, -(-math.ceil(factor * mean) // 8) * 8))


def local_experts(x, topk_idx, topk_weights, w_in, w_out, *,
                  slots_factor: float | None, activation=jax.nn.gelu):
  """The local experts as the layer's config asks: `ragged_dot`
  (`slots_factor` None) or batched GEMMs over `expert_slots(...,
  slots_factor)` slots per expert. Returns `(f32[M, H], int32 pairs
  dropped)`."""
  if slots_factor is None:
    return (grouped_experts(x, topk_idx, topk_weights, w_in, w_out,
                            activation), jnp.zeros((), jnp.int32))
  slots = expert_slots(x.shape[0], topk_idx.shape[1], w_in.shape[0],
                       slots_factor)
  return padded_experts(x, topk_idx, topk_weights, w_in, w_out, slots=slots,
                        activation=activation)
