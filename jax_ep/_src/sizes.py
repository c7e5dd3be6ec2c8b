"""The kernels' limits and the buffer bytes their calls need, as csrc defines
them once (csrc/common/limits.h, csrc/intranode/call_layout.h,
csrc/low_latency/heap_layout.h, csrc/internode/exchange_layout.h), read from the module `jax_ep._jax_ep_sizes`.

Every install builds that module, with or without CUDA, so the sizing helpers
(`jax_ep.nvl_buffer_bytes`, `jax_ep.ll_buffer_bytes`,
`jax_ep.rdma_buffer_bytes`, and `jax_ep.buffer_sizes`, which gives a
`Buffer` all it needs in one call) answer on a CPU-only
install too. It is read on first use, not at import: the reference backend
runs without it.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_ep._src import native
from jax_ep._src.fp8 import FP8_DTYPE, GROUP


def limits() -> dict[str, int]:
  """The largest sizes the kernels take, by their C++ names in snake case:
  `max_topk` (every kernel), `max_ranks` (every kernel but the internode
  exchange, whose EP size is `max_internode_ranks`), `max_normal_experts`
  (`get_dispatch_layout` and the intranode kernels), and the low-latency
  kernels' `max_low_latency_experts`, `max_low_latency_tokens` (Tmax) and
  `max_low_latency_slots_per_expert` (R * Tmax)."""
  return native.sizes_module().limits()


def intranode_data_bytes(num_tokens: int, num_ranks: int, num_topk: int,
                         row_bytes: int, scale_row_bytes: int,
                         combine_row_bytes: int) -> int:
  """Data-region bytes that an intranode dispatch (rows of `row_bytes` plus
  `scale_row_bytes`, top-`num_topk`) and a combine (rows of
  `combine_row_bytes`) of `num_tokens` tokens over `num_ranks` ranks need."""
  return native.sizes_module().intranode_data_bytes(
      int(num_tokens), int(num_ranks), int(num_topk), int(row_bytes),
      int(scale_row_bytes), int(combine_row_bytes))


def nvl_buffer_bytes(num_tokens: int, hidden: int, topk: int,
                     num_ranks: int, dtype=jnp.bfloat16) -> int:
  """Data-region bytes (`create_peer_buffers(..., num_bytes)`) that
  intranode `dispatch`, cached dispatch and `combine` need for these per-rank
  shapes.

  Args:
    num_tokens: T, tokens per rank.
    hidden: H, channels per token.
    topk: K.
    num_ranks: R.
    dtype: dtype of the dispatched rows: bf16 (f16, f32), or
      `float8_e4m3fn` for fp8 rows with f32 scales `[T, H/128]`. Combine is
      sized for `y` of `max(2, itemsize)` bytes per channel.

  Returns:
    Bytes: a slot of T rows (with their routing) for each of the R - 1 peers,
    plus an int32 [R, T] scratch array. The capacity M does not matter: rows
    past it are never sent.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(FP8_DTYPE):
    row_bytes, scale_bytes = hidden, hidden // GROUP * 4
    combine_bytes = 2 * hidden
  else:
    row_bytes = hidden * dtype.itemsize
    scale_bytes, combine_bytes = 0, hidden * max(2, dtype.itemsize)
  return intranode_data_bytes(num_tokens, num_ranks, topk, row_bytes,
                              scale_bytes, combine_bytes)


def ll_buffer_bytes(max_tokens: int, hidden: int, num_experts: int) -> int:
  """Bytes of NVSHMEM heap that low-latency calls of these shapes need: two
  buffer sets of E*Tmax message, combine-row and staging slots (the layout of
  `SetLayout` in csrc/low_latency/heap_layout.h; the number of ranks does not
  matter, L * R = E)."""
  return native.sizes_module().ll_heap_bytes(
      int(max_tokens), int(hidden), int(num_experts))


def exchange_row_bytes(*row_bytes: int) -> int:
  """Bytes of one exchanged row that packs rows of these byte widths side by
  side (`cuda/internode.py`), padded to a multiple of 16."""
  total = sum(int(b) for b in row_bytes)
  return max(16, -(-total // 16) * 16)


def rdma_buffer_bytes(num_tokens: int, hidden: int, topk: int,
                      num_ranks: int, ranks_per_node: int = 1,
                      dtype=jnp.bfloat16) -> int:
  """Bytes of NVSHMEM heap (`Buffer(num_rdma_bytes=...)`) that the internode
  `dispatch`, cached dispatch and `combine` need for these per-rank shapes.

  Args:
    num_tokens: T, tokens per rank.
    hidden: H, channels per token.
    topk: K.
    num_ranks: R.
    ranks_per_node: G; the exchange runs between the N = R / G nodes.
    dtype: dtype of the dispatched rows, as for `nvl_buffer_bytes`; combine
      is sized for `y` of `max(2, itemsize)` bytes per channel.

  Returns:
    Bytes: the flags, and the slots of the larger leg, each slot of the
    widest exchanged row (a dispatched row with its scales, top-k ids and
    weights, or a combine row), twice (what arrives and this rank's staging
    of what it sends): N * T slots for the network leg (each node's rows of
    this rank's tokens), and with G > 1 G * N * T = R * T for the leg inside
    the node (each local rank's rows of every forwarded token). The capacity
    M does not matter. This holds whole calls; a smaller region works too
    (down to one token's slots), each call then going in pieces of the
    tokens that fit, a round of the exchange's protocol each: at large EP
    sizes it bounds the memory (2 R T rows are 30 GB per rank at T = 4096,
    H = 7168, EP256).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(FP8_DTYPE):
    row, scales, combine_row = hidden, hidden // GROUP * 4, 2 * hidden
  else:
    row, scales = hidden * dtype.itemsize, 0
    combine_row = hidden * max(2, dtype.itemsize)
  widest = max(exchange_row_bytes(row, scales, 4 * topk, 4 * topk),
               exchange_row_bytes(combine_row))
  region = native.sizes_module().exchange_region_bytes
  num_nodes = int(num_ranks) // int(ranks_per_node)
  legs = [(num_nodes, int(num_tokens))]
  if ranks_per_node > 1:
    legs.append((int(ranks_per_node), num_nodes * int(num_tokens)))
  return max(region(size, tokens, widest) for size, tokens in legs)


def buffer_sizes(num_tokens: int, hidden: int, topk: int, num_ranks: int, *,
                 ranks_per_node: int | None = None, dtype=jnp.bfloat16,
                 ll_max_tokens: int | None = None,
                 num_experts: int | None = None) -> dict[str, int]:
  """The `Buffer` byte arguments for the largest shapes you run, in one call:
  `jax_ep.Buffer(mesh, "ep", ranks_per_node=G, **buffer_sizes(...))`.

  Args:
    num_tokens, hidden, topk, num_ranks, dtype: of the normal ops, as for
      `nvl_buffer_bytes`.
    ranks_per_node: G. None or R (one node): the intranode kernels'
      `num_nvl_bytes`; G < R: the internode kernels' `num_rdma_bytes`.
    ll_max_tokens, num_experts: with both, also the low-latency kernels'
      `num_ll_bytes` for Tmax = ll_max_tokens.

  Returns:
    `{"num_nvl_bytes" or "num_rdma_bytes": ..., ["num_ll_bytes": ...]}`.
  """
  per_node = ranks_per_node or num_ranks
  if per_node >= num_ranks:
    out = {"num_nvl_bytes": nvl_buffer_bytes(num_tokens, hidden, topk,
                                             num_ranks, dtype)}
  else:
    out = {"num_rdma_bytes": rdma_buffer_bytes(num_tokens, hidden, topk,
                                               num_ranks, per_node, dtype)}
  if (ll_max_tokens is None) != (num_experts is None):
    raise ValueError("jax_ep.buffer_sizes: pass both ll_max_tokens and "
                     "num_experts for the low-latency heap, or neither")
  if ll_max_tokens is not None:
    out["num_ll_bytes"] = ll_buffer_bytes(ll_max_tokens, hidden, num_experts)
  return out
