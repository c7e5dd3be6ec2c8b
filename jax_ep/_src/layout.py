"""`get_dispatch_layout`: who receives which token, counted per rank and expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep._src import checks
from jax_ep._src.handles import Layout
from jax_ep._src.runtime import Buffer


def get_dispatch_layout(buffer: Buffer, topk_idx: jax.Array,
                        num_experts: int) -> Layout:
  """Counts this rank's routing per destination rank and per expert.

  Call inside `jax.shard_map` over `buffer.axis_name`. Runs the CUDA layout
  kernel on the "cuda" backend where R <= 64 and E <= 1024, else the
  reference (a listed fallback, `Buffer.fallbacks()`).

  Args:
    buffer: the `jax_ep.Buffer` of the EP axis (R ranks).
    topk_idx: `int32[T, K]` expert ids; `-1` selects nothing; ids outside
      `[-1, E)` select nothing and are counted in `Layout.num_invalid`.
    num_experts: E, a multiple of R.

  Returns:
    a `Layout` (`num_tokens_per_rank[R]`, `num_tokens_per_expert[E]`,
    `is_token_in_rank[T, R]`, `num_invalid`, `num_tokens_per_node[N]`).
  """
  op = "get_dispatch_layout"
  buffer.check_call_site(op)
  num_experts = checks.experts(op, num_experts, buffer.num_ranks)
  checks.topk_idx(op, topk_idx, None, num_experts)
  per_rank, per_expert, in_rank, invalid = (
      buffer.layout_backend(op, num_experts).get_dispatch_layout(
          topk_idx, num_experts=num_experts, num_ranks=buffer.num_ranks))
  # Each backend's is_token_in_rank gives the node counts the same way.
  topology = buffer.topology
  in_node = in_rank.reshape(in_rank.shape[0], topology.num_nodes,
                            topology.ranks_per_node).any(-1)
  return Layout(per_rank, per_expert, in_rank, invalid,
                in_node.sum(0, dtype=jnp.int32))
