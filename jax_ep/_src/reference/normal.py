"""Reference normal dispatch and combine (docs/contract.md), per shard.

Dispatch all-gathers every rank's rows and routing, then each rank gathers the
rows it receives into a packed buffer; combine gathers each source's rows back
into `[R, T, H]`, swaps them with one `all_to_all` and sums in rank order
(node by node when the EP axis spans several nodes).
Only gathers with precomputed indices touch rows: scatters with computed
indices were 60x slower on GPUs (docs/measuring.md, "Machines").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep._src.handles import DispatchHandle


def local_expert_ids(topk_idx: jax.Array, rank, num_local: int) -> jax.Array:
  """Local id (e - rank*L) where expert e lives on `rank`, else -1."""
  local = topk_idx - rank * num_local
  return jnp.where((local >= 0) & (local < num_local), local, -1)


def gather_rows(table: jax.Array, index: jax.Array, fill=0) -> jax.Array:
  """`table[index]` along axis 0; out-of-range indices give `fill` rows."""
  return jnp.take(table, index, axis=0, mode="fill", fill_value=fill)


def packed_sources(selected: jax.Array, capacity: int):
  """Packs the true entries of `selected[N]` in order into `capacity` slots.

  Returns `(src_index int32[capacity], slot_of int32[N], count)`: the source
  of each slot (N where empty), the slot of each entry (`capacity` where it is
  not selected or does not fit) and the number of true entries.
  """
  n = selected.shape[0]
  ranks = jnp.cumsum(selected, dtype=jnp.int32)
  targets = jnp.arange(1, capacity + 1, dtype=jnp.int32)
  src_index = jnp.searchsorted(ranks, targets, side="left").astype(jnp.int32)
  slot = ranks - 1
  slot_of = jnp.where(selected & (slot < capacity), slot, capacity)
  count = ranks[-1] if n else jnp.int32(0)
  return src_index, slot_of, count


def dispatch(rows, topk_idx, topk_weights, *, axis_name: str, num_ranks: int,
             num_experts: int, capacity: int, expert_alignment: int):
  """Fresh dispatch of `rows` (a tuple of [T, C] arrays sent together).

  Returns `(recv_rows, recv_topk_idx, recv_topk_weights,
  num_tokens_per_expert, handle)`; see `Dispatched`.
  """
  gather = lambda a: lax.all_gather(a, axis_name, tiled=True)
  return dispatch_from_sources(
      tuple(gather(r) for r in rows), gather(topk_idx),
      None if topk_weights is None else gather(topk_weights),
      rank=lax.axis_index(axis_name), num_ranks=num_ranks,
      num_experts=num_experts, capacity=capacity,
      expert_alignment=expert_alignment)


def dispatch_from_sources(rows_all, topk_all, weights_all, *, rank,
                          num_ranks: int, num_experts: int, capacity: int,
                          expert_alignment: int):
  """`dispatch`'s result from what every source sent this rank: `rows_all`
  (a tuple of [R*T, C]), `topk_all` and `weights_all` ([R*T, K]), source s's
  token t at row s*T + t. A token whose routing selects nothing here may
  come with any row, as long as its top-k ids do not select this rank
  (e.g. all -1)."""
  num_tokens = topk_all.shape[0] // num_ranks
  num_local = num_experts // num_ranks
  local = local_expert_ids(topk_all, rank, num_local)
  src_index, recv_row, num_recv = packed_sources((local >= 0).any(-1), capacity)
  handle = DispatchHandle(src_index, recv_row.reshape(num_ranks, num_tokens),
                          num_recv, num_ranks, num_tokens, capacity,
                          num_experts)
  recv_rows = tuple(gather_rows(r, src_index) for r in rows_all)
  recv_topk_idx = gather_rows(local, src_index, fill=-1)
  recv_topk_weights = None
  if weights_all is not None:
    recv_topk_weights = jnp.where(recv_topk_idx >= 0,
                                  gather_rows(weights_all, src_index), 0.0)
  per_expert = (local[..., None] == jnp.arange(num_local)).sum(
      (0, 1), dtype=jnp.int32)
  per_expert = -(-per_expert // expert_alignment) * expert_alignment
  return recv_rows, recv_topk_idx, recv_topk_weights, per_expert, handle


def cached_dispatch(rows, handle: DispatchHandle, *, axis_name: str):
  """Sends `rows` (tuple of [T, C] arrays) along a previous dispatch's routes."""
  return tuple(
      gather_rows(lax.all_gather(r, axis_name, tiled=True), handle.src_index)
      for r in rows)


def combine(y: jax.Array, handle: DispatchHandle, *, axis_name: str,
            ranks_per_node: int | None = None):
  """Sum over ranks, in fp32, of the rows each sent back.

  Returns f32[T, C]; the caller adds biases and rounds once.
  """
  send = gather_rows(y, handle.recv_row.reshape(-1))
  send = send.reshape(handle.num_ranks, handle.num_tokens, *y.shape[1:])
  return sum_by_node(lax.all_to_all(send, axis_name, 0, 0), ranks_per_node)


def sum_by_node(back: jax.Array, ranks_per_node: int | None) -> jax.Array:
  """combine's sum of `back[R, T, C]` (rank q's row of each token, +0 where
  q kept none), f32[T, C].

  On one node (`ranks_per_node` None or R) the sum goes in rank order. With
  G = `ranks_per_node` < R ranks per node, each node's G rows are summed in
  rank order and rounded to `back.dtype` (the partial that crosses the
  network), then the node partials are summed in node order
  (docs/contract.md).
  """
  num_ranks = back.shape[0]
  per_node = ranks_per_node or num_ranks
  if per_node == num_ranks:
    return _sum_in_order(list(back))
  return _sum_in_order([
      round_to(_sum_in_order(list(back[first:first + per_node])), back.dtype)
      for first in range(0, num_ranks, per_node)])


def _sum_in_order(terms) -> jax.Array:
  """`((t_0 + t_1) + ...)` in fp32, starting at t_0 (a -0 stays -0)."""
  total = terms[0].astype(jnp.float32)
  for term in terms[1:]:
    total = total + term.astype(jnp.float32)
  return total


def round_to(x: jax.Array, dtype) -> jax.Array:
  """f32 `x` rounded to `dtype` (to nearest even), kept in f32.

  Not `x.astype(dtype).astype(f32)`: XLA drops such convert pairs as excess
  precision (--xla_allow_excess_precision, on by default on GPUs).
  `reduce_precision` stays, but flushes what is subnormal in the narrow
  type; f16's subnormals (multiples of 2^-24) are rounded on their own.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return x
  info = jnp.finfo(dtype)
  rounded = lax.reduce_precision(x, info.nexp, info.nmant)
  if dtype == jnp.bfloat16:  # its subnormals are f32's: nothing flushed
    return rounded
  step = float(info.smallest_subnormal)
  subnormal = jnp.round(x / step) * step
  return jnp.where(jnp.abs(x) < float(info.smallest_normal), subnormal,
                   rounded)


@dataclasses.dataclass(frozen=True)
class ReferenceNormal:
  """The "reference" backend of the normal ops (`backend.NormalBackend`).
  `ranks_per_node` (None or R: one node) sets combine's order of sums."""

  axis_name: str
  ranks_per_node: int | None = None

  def dispatch(self, rows, topk_idx, topk_weights, *, num_ranks: int,
               num_experts: int, capacity: int, expert_alignment: int):
    return dispatch(rows, topk_idx, topk_weights, axis_name=self.axis_name,
                    num_ranks=num_ranks, num_experts=num_experts,
                    capacity=capacity, expert_alignment=expert_alignment)

  def cached_dispatch(self, rows, handle: DispatchHandle):
    return cached_dispatch(rows, handle, axis_name=self.axis_name)

  def combine(self, y, handle: DispatchHandle, bias, out_dtype):
    total = combine(y, handle, axis_name=self.axis_name,
                    ranks_per_node=self.ranks_per_node)
    if bias is not None:
      total = total + bias
    return total.astype(out_dtype)
