"""The "cuda" backend of the normal ops across nodes (`CudaInternode`, at the
end) and the FFI call of its kernel, the row exchange (target
jax_ep_internode_exchange, csrc/internode/exchange.cu).

The exchange is the network leg: each rank sends rows to the ranks with its
local index on the other nodes (its team), each row to a node at most once,
over NVSHMEM. With one rank per node (G = 1) the team is every rank, and the
ops are the reference's with its collectives replaced by exchanges that
move only the rows a rank needs:

- dispatch packs each token's row (and scales), top-k ids and weights into
  one exchanged row, sent to every rank that holds one of its experts; the
  receiver then places the rows as the reference does
  (`reference.normal.dispatch_from_sources`);
- cached dispatch first tells each source which of its tokens this rank
  kept (an exchange of empty rows: the masks are the message), then
  exchanges the rows;
- combine sends each kept row back to its token's rank, which sums them
  in node order (`reference.normal.sum_by_node`).

So the results equal the reference's bit for bit. Several ranks per node
(G > 1, where rows are forwarded over NVLink inside the node) are not built
yet: `Buffer` runs the reference there (docs/internode.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep._src import native
from jax_ep._src import sizes
from jax_ep._src.cuda import nvshmem
from jax_ep._src.cuda.varying import mark_varying
from jax_ep._src.handles import DispatchHandle
from jax_ep._src.reference import normal as reference

_EXCHANGE_TARGET = "jax_ep_internode_exchange"


def _as_bytes(a: jax.Array) -> jax.Array:
  """`a[X, ...]` as `uint8[X, bytes]`."""
  return lax.bitcast_convert_type(a, jnp.uint8).reshape(a.shape[0], -1)


def _from_bytes(b: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
  """`uint8[X, bytes]` as rows of `like` (`[?, *tail]`, its dtype)."""
  itemsize = jnp.dtype(like.dtype).itemsize
  tail = like.shape[1:]
  if itemsize > 1:
    b = b.reshape(b.shape[0], -1, itemsize)
  return lax.bitcast_convert_type(b, like.dtype).reshape(b.shape[0], *tail)


def pack(arrays) -> jax.Array:
  """Rows of `arrays` (each `[X, ...]`) side by side as bytes, padded to a
  multiple of 16: `uint8[X, B]`."""
  parts = [_as_bytes(a) for a in arrays]
  width = sizes.exchange_row_bytes(*(p.shape[1] for p in parts))
  used = sum(p.shape[1] for p in parts)
  if width > used:
    parts.append(jnp.zeros((parts[0].shape[0], width - used), jnp.uint8))
  return jnp.concatenate(parts, axis=1)


def unpack(packed: jax.Array, likes) -> tuple[jax.Array, ...]:
  """`pack`'s inverse: the arrays of shapes and dtypes `likes` (first axis
  ignored) from `uint8[X, B]`."""
  out, start = [], 0
  for like in likes:
    width = int(np.prod(like.shape[1:], dtype=np.int64)) * jnp.dtype(
        like.dtype).itemsize
    out.append(_from_bytes(packed[:, start:start + width], like))
    start += width
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class CudaInternode:
  """The "cuda" backend of the normal ops across nodes of one rank each
  (`backend.NormalBackend`): this process's NVSHMEM heap, of which the
  exchange may use `num_rdma_bytes`."""

  axis_name: str
  heap: nvshmem.NvshmemHeap
  num_rdma_bytes: int
  ranks_per_node: int
  timeout_s: float
  op: str = "dispatch"  # the public op named in error messages

  def exchange(self, rows: jax.Array, src_row: jax.Array):
    """Sends row `src_row[m, t]` of `rows` (`uint8[X, B]`; -1: none) to slot
    `[my node, t]` of node m's rank with this local index. Returns what the
    nodes sent here: `(uint8[N, T, B], bool[N, T])`, zero rows where nothing
    came."""
    num_nodes, num_tokens = src_row.shape
    need = native.sizes_module().exchange_region_bytes(
        num_nodes, num_tokens, rows.shape[1])
    if need > self.num_rdma_bytes:
      raise ValueError(
          f"jax_ep.{self.op}: the Buffer's num_rdma_bytes "
          f"({self.num_rdma_bytes}) is too small for {num_tokens} tokens of "
          f"{rows.shape[1]} exchanged bytes over {num_nodes} nodes, which "
          f"need {need}: size it with jax_ep.rdma_buffer_bytes(num_tokens, "
          "hidden, topk, num_ranks, ranks_per_node, dtype) for the largest "
          "shapes you run")
    if not native.register_targets():
      raise RuntimeError(f"jax_ep.{self.op}: the CUDA kernels are unavailable "
                         f"(jax_ep._jax_ep: {native.unavailable_reason()})")
    call = jax.ffi.ffi_call(
        _EXCHANGE_TARGET,
        (jax.ShapeDtypeStruct((num_nodes, num_tokens, rows.shape[1]),
                              jnp.uint8),
         jax.ShapeDtypeStruct((num_nodes, num_tokens), jnp.int32)),
        has_side_effect=True)
    recv, mask = mark_varying(self.axis_name, call(
        rows, src_row.astype(jnp.int32),
        ranks_per_node=np.int64(self.ranks_per_node),
        timeout_ns=np.int64(round(self.timeout_s * 1e9))))
    return recv, mask != 0

  def dispatch(self, rows, topk_idx, topk_weights, *, num_ranks: int,
               num_experts: int, capacity: int, expert_alignment: int):
    num_tokens, topk = topk_idx.shape
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    dest = jnp.where(valid, topk_idx // (num_experts // num_ranks), -1)
    to_rank = (dest[:, :, None] == jnp.arange(num_ranks)).any(1)  # [T, R]
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    src_row = jnp.where(to_rank.T, tokens, -1)
    weights = (jnp.zeros((num_tokens, topk), jnp.float32)
               if topk_weights is None else topk_weights.astype(jnp.float32))
    sent = tuple(rows) + (topk_idx.astype(jnp.int32), weights)
    recv, mask = self.exchange(pack(sent), src_row)
    flat = recv.reshape(num_ranks * num_tokens, -1)
    *rows_all, topk_all, weights_all = unpack(flat, sent)
    topk_all = jnp.where(mask.reshape(-1, 1), topk_all, -1)
    return reference.dispatch_from_sources(
        tuple(rows_all), topk_all,
        None if topk_weights is None else weights_all,
        rank=lax.axis_index(self.axis_name), num_ranks=num_ranks,
        num_experts=num_experts, capacity=capacity,
        expert_alignment=expert_alignment)

  def cached_dispatch(self, rows, handle: DispatchHandle):
    kept = handle.recv_row < handle.capacity  # [R, T]: (s, t) kept here
    # The masks are the message: which of this rank's tokens each rank kept.
    _, asked = self.exchange(jnp.zeros((1, 16), jnp.uint8),
                             jnp.where(kept, 0, -1))
    tokens = jnp.arange(handle.num_tokens, dtype=jnp.int32)
    recv, _ = self.exchange(pack(rows), jnp.where(asked, tokens, -1))
    rows_all = unpack(recv.reshape(handle.num_ranks * handle.num_tokens, -1),
                      rows)
    return tuple(reference.gather_rows(r, handle.src_index) for r in rows_all)

  def combine(self, y, handle: DispatchHandle, bias, out_dtype):
    src_row = jnp.where(handle.recv_row < handle.capacity, handle.recv_row, -1)
    recv, _ = self.exchange(pack((y,)), src_row)
    (back,) = unpack(recv.reshape(handle.num_ranks * handle.num_tokens, -1),
                     (y,))
    back = back.reshape(handle.num_ranks, handle.num_tokens, *y.shape[1:])
    total = reference.sum_by_node(back, self.ranks_per_node)
    if bias is not None:
      total = total + bias
    return total.astype(out_dtype)
