"""The "reference" backend of `get_dispatch_layout` (this module is the
`backend.LayoutBackend`): compares and sums, no scatters."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def get_dispatch_layout(topk_idx: jax.Array, *, num_experts: int,
                        num_ranks: int):
  """Per-rank and per-expert counts of this shard's routing.

  Returns `(num_tokens_per_rank int32[R], num_tokens_per_expert int32[E],
  is_token_in_rank bool[T, R], num_invalid int32[])`; see `Layout`.
  """
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  selects = topk_idx[..., None] == experts  # [T, K, E]; -1 and bad ids: none
  num_tokens_per_expert = selects.sum((0, 1), dtype=jnp.int32)
  per_rank = selects.reshape(*topk_idx.shape, num_ranks,
                             num_experts // num_ranks).any(-1)
  is_token_in_rank = per_rank.any(1)  # [T, R]
  num_tokens_per_rank = is_token_in_rank.sum(0, dtype=jnp.int32)
  num_invalid = ((topk_idx < -1) | (topk_idx >= num_experts)).sum(
      dtype=jnp.int32)
  return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, num_invalid
