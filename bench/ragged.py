"""The `jax.lax.ragged_all_to_all` MoE pipeline, as MaxText builds it.

Dispatch sends one row per (token, expert) pair: the pairs are sorted by
expert, each rank learns how many rows every other rank sends it (an
`all_gather` of the per-destination sizes), and one `ragged_all_to_all` moves
the rows into a worst-case `[R*T*K, H]` buffer. Combine runs the reverse
`ragged_all_to_all` back into the sorted pairs, unsorts them with a gather and
sums each token's K weighted rows in fp32.

docs/measuring.md, "Machines": in several processes XLA refuses it unless
`--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true`, and with
that flag a run did not finish in 400 s; it does not run on the CPU. The
benchmark therefore times it in one process driving every local GPU.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def routes(topk_idx, *, num_experts: int, num_ranks: int, axis_name: str):
  """Sort order of the (token, k) pairs and the ragged transfer's sizes."""
  experts = jnp.where(topk_idx >= 0, topk_idx, num_experts).reshape(-1)
  order = jnp.argsort(experts, stable=True)
  per_rank = num_experts // num_ranks
  dest = jnp.where(experts < num_experts, experts // per_rank, num_ranks)
  send_sizes = (dest[:, None] == jnp.arange(num_ranks)).sum(0, dtype=jnp.int32)
  all_sizes = lax.all_gather(send_sizes, axis_name)  # [src, dst]
  rank = lax.axis_index(axis_name)
  before = jnp.arange(num_ranks)[:, None] < rank
  return dict(
      order=order,
      send_sizes=send_sizes,
      input_offsets=_exclusive_cumsum(send_sizes),
      recv_sizes=all_sizes[:, rank],
      output_offsets=jnp.where(before, all_sizes, 0).sum(0, dtype=jnp.int32),
      # Where each source put the rows it sent here, for the way back.
      source_offsets=(jnp.cumsum(all_sizes, axis=1) - all_sizes)[:, rank],
  )


def dispatch(x, topk_idx, r, *, num_ranks: int, axis_name: str):
  """Rows of the pairs this rank's experts need, grouped by source: [R*T*K, H]."""
  num_pairs = topk_idx.size
  rows = jnp.take(x, r["order"] // topk_idx.shape[1], axis=0)
  out = jnp.zeros((num_ranks * num_pairs, x.shape[1]), x.dtype)
  return lax.ragged_all_to_all(rows, out, r["input_offsets"], r["send_sizes"],
                               r["output_offsets"], r["recv_sizes"],
                               axis_name=axis_name)


def combine(y, topk_idx, topk_weights, r, *, axis_name: str):
  """Sends the rows back into sorted-pair order and sums each token's K."""
  num_tokens, topk = topk_idx.shape
  recv_offsets = jnp.cumsum(r["recv_sizes"]) - r["recv_sizes"]
  back = jnp.zeros((num_tokens * topk, y.shape[1]), y.dtype)
  back = lax.ragged_all_to_all(y, back, recv_offsets, r["recv_sizes"],
                               r["source_offsets"], r["send_sizes"],
                               axis_name=axis_name)
  inverse = jnp.argsort(r["order"])
  pairs = jnp.take(back, inverse, axis=0).reshape(num_tokens, topk, -1)
  weights = jnp.where(topk_idx >= 0, topk_weights, 0.0)[..., None]
  return (pairs.astype(jnp.float32) * weights).sum(1).astype(y.dtype)
