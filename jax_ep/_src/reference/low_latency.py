"""Reference low-latency dispatch and combine (docs/contract.md), per shard.

Each op is split in two like the kernels' hooks: a send half that moves data
between ranks (`all_gather` / `all_to_all`) and a receive half that only
touches local memory. Slots are addressed by `s * Tmax + t` (source rank s,
token t); a token's rows are gathered, never scattered.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep._src.fp8 import per_token_cast_to_fp8
from jax_ep._src.handles import LowLatencyDispatched, LowLatencyHandle
from jax_ep._src.reference.normal import gather_rows, local_expert_ids, packed_sources


def _slot_rows(src_index, num_tokens: int, max_tokens: int, num_ranks: int):
  """Maps slot sources `s * Tmax + t` to all-gathered rows `s * T + t`."""
  valid = src_index < num_ranks * max_tokens
  row = (src_index // max_tokens) * num_tokens + src_index % max_tokens
  return jnp.where(valid, row, num_ranks * num_tokens)


def dispatch_send(x, topk_idx, *, axis_name: str, use_fp8: bool,
                  round_scale: bool, use_ue8m0: bool):
  """Casts (with fp8) and moves every rank's rows and ids to every rank."""
  rows = per_token_cast_to_fp8(x, round_scale=round_scale,
                               use_ue8m0=use_ue8m0) if use_fp8 else (x,)
  return (tuple(lax.all_gather(r, axis_name, tiled=True) for r in rows),
          lax.all_gather(topk_idx, axis_name, tiled=True))


def dispatch_receive(pending, *, axis_name: str, num_ranks: int,
                     num_experts: int, max_tokens: int):
  """Packs the rows of each local expert; returns `(rows, count, handle)`."""
  rows, idx = pending
  num_tokens = idx.shape[0] // num_ranks
  num_local = num_experts // num_ranks
  slots = num_ranks * max_tokens
  local = local_expert_ids(idx, lax.axis_index(axis_name), num_local)
  local = jnp.pad(local.reshape(num_ranks, num_tokens, idx.shape[1]),
                  ((0, 0), (0, max_tokens - num_tokens), (0, 0)),
                  constant_values=-1).reshape(slots, idx.shape[1])
  selects = (local == jnp.arange(num_local)[:, None, None]).any(-1)  # [L, S]
  src_index, slot, count = jax.vmap(packed_sources, in_axes=(0, None))(
      selects, slots)
  row = _slot_rows(src_index, num_tokens, max_tokens, num_ranks).reshape(-1)
  recv = tuple(gather_rows(r, row).reshape(num_local, slots, -1) for r in rows)
  handle = LowLatencyHandle(src_index, slot, num_ranks, num_experts,
                            max_tokens, num_tokens, rows[0].shape[-1])
  return recv, count, handle


def _expert_rows(handle: LowLatencyHandle, local, num_tokens: int):
  """Flat row `l * S + slot` in `y[L*S, H]` of each (source token, k), or L*S."""
  num_ranks, max_tokens = handle.num_ranks, handle.max_tokens
  slots = num_ranks * max_tokens
  num_local = handle.slot.shape[0]
  source = (jnp.arange(num_ranks)[:, None] * max_tokens +
            jnp.arange(num_tokens)).reshape(-1, 1)
  slot = handle.slot[jnp.maximum(local, 0), source]  # [R*T, K]
  valid = (local >= 0) & (slot < slots)
  return jnp.where(valid, local * slots + slot, num_local * slots)


def combine_send(y, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                 axis_name: str):
  """Weighted sums of this rank's expert rows per source token, sent home.

  Each rank sums, in fp32 and in k order, `w[t, k] * y[row of (t, k)]` over
  the k whose expert it holds; returns the f32[R, T, H] partials received
  from every rank (by rank).
  """
  num_ranks = handle.num_ranks
  num_tokens = topk_idx.shape[0]
  num_local = y.shape[0]
  table = y.reshape(-1, y.shape[-1])
  local = local_expert_ids(lax.all_gather(topk_idx, axis_name, tiled=True),
                           lax.axis_index(axis_name), num_local)
  weights = lax.all_gather(topk_weights, axis_name, tiled=True)
  rows = _expert_rows(handle, local, num_tokens)
  partial = jnp.zeros((num_ranks * num_tokens, y.shape[-1]), jnp.float32)
  for k in range(local.shape[1]):
    # A zero weight where k has no row here: w * 0 would be -0 for w < 0,
    # which XLA may keep as the sum when it folds away the `0 +`.
    weight = jnp.where(rows[:, k] < table.shape[0], weights[:, k], 0.0)
    partial = partial + weight[:, None] * gather_rows(
        table, rows[:, k]).astype(jnp.float32)
  partial = partial.reshape(num_ranks, num_tokens, y.shape[-1])
  return lax.all_to_all(partial, axis_name, 0, 0)


def combine_receive(partials, dtype):
  """Sums the per-rank partials in rank order and rounds once to `dtype`."""
  total = partials[0]
  for source in range(1, partials.shape[0]):
    total = total + partials[source]
  return total.astype(dtype)


@dataclasses.dataclass(frozen=True)
class ReferenceLowLatency:
  """The "reference" backend of the low-latency ops
  (`backend.LowLatencyBackend`). A send's pending value is what its
  collectives moved; the receive touches local memory only."""

  axis_name: str

  def dispatch_send(self, x, topk_idx, *, num_ranks: int, num_experts: int,
                    max_tokens: int, use_fp8: bool, round_scale: bool,
                    use_ue8m0: bool):
    del num_ranks, num_experts, max_tokens  # the receive's to apply
    return dispatch_send(x, topk_idx, axis_name=self.axis_name,
                         use_fp8=use_fp8, round_scale=round_scale,
                         use_ue8m0=use_ue8m0)

  def dispatch_receive(self, pending, *, num_ranks: int, num_experts: int,
                       max_tokens: int, num_tokens: int, num_topk: int,
                       hidden: int, use_fp8: bool, round_scale: bool,
                       use_ue8m0: bool,
                       zero_padding: bool) -> LowLatencyDispatched:
    del num_tokens, num_topk, hidden, round_scale, use_ue8m0  # in `pending`
    del zero_padding  # the reference always zeros the padding
    recv, count, handle = dispatch_receive(
        pending, axis_name=self.axis_name, num_ranks=num_ranks,
        num_experts=num_experts, max_tokens=max_tokens)
    return LowLatencyDispatched(recv[0], recv[1] if use_fp8 else None, count,
                                handle)

  def combine_send(self, y, topk_idx, topk_weights, handle: LowLatencyHandle,
                   *, zero_copy: bool):
    del zero_copy  # a kernel option: the reference stages nothing
    return combine_send(y, topk_idx, topk_weights, handle,
                        axis_name=self.axis_name)

  def combine_receive(self, pending):
    return combine_receive(pending, jnp.bfloat16)

  def dispatch(self, x, topk_idx, *, num_ranks: int, num_experts: int,
               max_tokens: int, use_fp8: bool, round_scale: bool,
               use_ue8m0: bool, zero_padding: bool) -> LowLatencyDispatched:
    sizes = dict(num_ranks=num_ranks, num_experts=num_experts,
                 max_tokens=max_tokens)
    pending = self.dispatch_send(x, topk_idx, use_fp8=use_fp8,
                                 round_scale=round_scale, use_ue8m0=use_ue8m0,
                                 **sizes)
    return self.dispatch_receive(
        pending, num_tokens=x.shape[0], num_topk=topk_idx.shape[1],
        hidden=x.shape[1], use_fp8=use_fp8, round_scale=round_scale,
        use_ue8m0=use_ue8m0, zero_padding=zero_padding, **sizes)

  def combine(self, y, topk_idx, topk_weights, handle: LowLatencyHandle, *,
              zero_copy: bool):
    return self.combine_receive(self.combine_send(
        y, topk_idx, topk_weights, handle, zero_copy=zero_copy))
