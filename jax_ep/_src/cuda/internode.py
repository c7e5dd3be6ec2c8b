"""The "cuda" backend of the normal ops across nodes (`CudaInternode`, at the
end) and the FFI call of its kernel, the row exchange (target
jax_ep_internode_exchange, csrc/internode/exchange.cu).

An exchange runs within a team: the network leg between this rank and the
ranks with its local index on the other nodes (a row crosses to a node at
most once), or the NVLink leg between the ranks of its node. Rank q is local
rank q % G of node q // G. The ops are the reference's with its collectives
replaced by exchanges that move only the rows a rank needs:

- dispatch packs each token's row (and scales), top-k ids and weights into
  one exchanged row and sends it over the network to each node that holds
  one of its experts, to the rank with the sender's local index there (the
  forwarder); each forwarder sends the rows it received on to the ranks of
  its node that need them. The receiver then has every source's rows at
  fixed places and places them as the reference does
  (`reference.normal.dispatch_from_sources`);
- cached dispatch first sends the requests the other way (exchanges of
  empty rows: the masks are the message), each forwarder asking the
  sources for what its node's ranks kept, then the rows as in dispatch;
- combine goes the reverse way: each rank sends the rows it kept to the
  tokens' forwarders on its node, which sum them in rank order and round to
  the row dtype (the node's partial), then send the partials over the
  network to the tokens' ranks, which sum them in node order
  (`reference.normal.sum_by_node`).

So the results equal the reference's bit for bit. With one rank per node
(G = 1) the NVLink leg is skipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep._src import native
from jax_ep._src import sizes
from jax_ep._src.config import OVERLAP_NUM_SMS, Config
from jax_ep._src.cuda.varying import mark_varying
from jax_ep._src.handles import DispatchHandle
from jax_ep._src.reference import normal as reference

_EXCHANGE_TARGET = "jax_ep_internode_exchange"


def check_num_ranks(op: str, num_ranks: int) -> None:
  """Refuses, at trace time, an EP size past the exchange's flags."""
  most = sizes.limits()["max_internode_ranks"]
  if num_ranks > most:
    raise ValueError(
        f"jax_ep.{op}: the internode kernels serve an EP size <= {most}, "
        f"got {num_ranks}")


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
  """The "cuda" backend of the normal ops across nodes
  (`backend.NormalBackend`): the part of this process's NVSHMEM heap the
  exchange may use (`num_rdma_bytes`; the Buffer owns the heap), and the
  topology's G."""

  axis_name: str
  num_rdma_bytes: int
  ranks_per_node: int
  timeout_s: float
  num_sms: int = OVERLAP_NUM_SMS  # the blocks an exchange's kernels may use
  rdma_chunk: int = Config().rdma_chunk  # tokens per arrival flag, at least
  op: str = "dispatch"  # the public op named in error messages

  def exchange(self, rows: jax.Array, src_row: jax.Array, *,
               within_node: bool = False):
    """Sends row `src_row[i, t]` of `rows` (`uint8[X, B]`; -1: none) to slot
    `[my index, t]` of team member i: of the ranks with this local index, one
    per node (the network leg), or `within_node` of the ranks of this node.
    Returns what the members sent here: `(uint8[Z, T, B], bool[Z, T])`, zero
    rows where nothing came.

    Where a whole call's slots do not fit the region (`num_rdma_bytes` below
    what `jax_ep.rdma_buffer_bytes` gives for these shapes), the tokens go in
    consecutive pieces of the most that fit, a kernel call each: the region
    bounds the memory, and each piece costs a round of the protocol."""
    check_num_ranks(self.op, lax.axis_size(self.axis_name))
    team_size, num_tokens = src_row.shape
    piece = self._tokens_per_call(team_size, num_tokens, rows.shape[1])
    parts = [self._exchange_call(rows, src_row[:, t:t + piece], within_node)
             for t in range(0, num_tokens, piece)]
    if len(parts) == 1:
      return parts[0]
    return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))

  def _tokens_per_call(self, team_size: int, num_tokens: int,
                       row_bytes: int) -> int:
    """The most of `num_tokens` whose exchange fits the region."""
    need = lambda t: native.sizes_module().exchange_region_bytes(
        team_size, t, row_bytes)
    fits = lambda t: need(t) <= self.num_rdma_bytes
    if fits(num_tokens):
      return num_tokens
    if not fits(1):
      raise ValueError(
          f"jax_ep.{self.op}: the Buffer's num_rdma_bytes "
          f"({self.num_rdma_bytes}) is too small for one token of "
          f"{row_bytes} exchanged bytes between {team_size} ranks, which "
          f"needs {need(1)}: size it with jax_ep.rdma_buffer_bytes(num_tokens, "
          "hidden, topk, num_ranks, ranks_per_node, dtype) for the largest "
          "shapes you run (a smaller region sends each call in pieces)")
    low, high = 1, num_tokens  # fits(low), not fits(high)
    while high - low > 1:
      mid = (low + high) // 2
      low, high = (mid, high) if fits(mid) else (low, mid)
    return low

  def _exchange_call(self, rows: jax.Array, src_row: jax.Array,
                     within_node: bool):
    """One call of the exchange kernel (`exchange`'s contract) whose slots
    fit the region."""
    team_size, num_tokens = src_row.shape
    native.require_targets(self.op)
    call = jax.ffi.ffi_call(
        _EXCHANGE_TARGET,
        (jax.ShapeDtypeStruct((team_size, num_tokens, rows.shape[1]),
                              jnp.uint8),
         jax.ShapeDtypeStruct((team_size, num_tokens), jnp.int32)),
        has_side_effect=True)
    recv, mask = mark_varying(self.axis_name, call(
        rows, src_row.astype(jnp.int32),
        team_stride=np.int64(1 if within_node else self.ranks_per_node),
        ranks_per_node=np.int64(self.ranks_per_node),
        num_sms=np.int64(self.num_sms),
        rdma_chunk=np.int64(self.rdma_chunk),
        timeout_ns=np.int64(round(self.timeout_s * 1e9))))
    return recv, mask != 0

  def _by_forwarder(self, a: jax.Array) -> jax.Array:
    """`a[R, T, ...]` by source rank as `[G, N * T, ...]` by forwarder: the
    slots of local rank g (source m * G + g's token t at m * T + t)."""
    G = self.ranks_per_node
    R, T = a.shape[:2]
    a = a.reshape(R // G, G, T, *a.shape[2:]).swapaxes(0, 1)
    return a.reshape(G, R // G * T, *a.shape[3:])

  def _to_rank_order(self, a: jax.Array, num_tokens: int) -> jax.Array:
    """`_by_forwarder`'s inverse, flattened: `[G, N * T, ...]` as
    `[R * T, ...]`, source q's token t at q * T + t."""
    G = self.ranks_per_node
    N = a.shape[1] // num_tokens
    a = a.reshape(G, N, num_tokens, *a.shape[2:]).swapaxes(0, 1)
    return a.reshape(N * G * num_tokens, *a.shape[3:])

  def dispatch(self, rows, topk_idx, topk_weights, *, num_ranks: int,
               num_experts: int, capacity: int, expert_alignment: int):
    check_num_ranks(self.op, num_ranks)
    G = self.ranks_per_node
    num_nodes = num_ranks // G
    num_tokens, topk = topk_idx.shape
    num_local = num_experts // num_ranks
    weights = (jnp.zeros((num_tokens, topk), jnp.float32)
               if topk_weights is None else topk_weights.astype(jnp.float32))
    sent = tuple(rows) + (topk_idx.astype(jnp.int32), weights)
    # The network leg: each token once to each node that holds one of its
    # experts, to the rank with this local index there.
    to_node = _holds(topk_idx, num_experts, num_local * G, num_nodes)
    recv, came = self.exchange(
        pack(sent), jnp.where(to_node.T, jnp.arange(num_tokens), -1))
    table = recv.reshape(num_nodes * num_tokens, -1)
    came = came.reshape(-1)
    if G > 1:
      # The NVLink leg: each received token on to the ranks of this node
      # that hold one of its experts.
      slot_topk = jnp.where(came[:, None], unpack(table, sent)[-2], -1)
      first = lax.axis_index(self.axis_name) // G * G * num_local
      to_local = _holds(slot_topk - first, G * num_local, num_local, G)
      recv, came = self.exchange(
          table, jnp.where(to_local.T, jnp.arange(table.shape[0]), -1),
          within_node=True)
      table = self._to_rank_order(recv, num_tokens)
      came = self._to_rank_order(came, num_tokens)
    *rows_all, topk_all, weights_all = unpack(table, sent)
    topk_all = jnp.where(came[:, None], topk_all, -1)
    return reference.dispatch_from_sources(
        tuple(rows_all), topk_all,
        None if topk_weights is None else weights_all,
        rank=lax.axis_index(self.axis_name), num_ranks=num_ranks,
        num_experts=num_experts, capacity=capacity,
        expert_alignment=expert_alignment)

  def cached_dispatch(self, rows, handle: DispatchHandle):
    G, T = self.ranks_per_node, handle.num_tokens
    num_nodes = handle.num_ranks // G
    kept = handle.recv_row < handle.capacity  # [R, T]: (q, t) kept here
    # Requests go the other way first; the masks are the message.
    nothing = jnp.zeros((1, 16), jnp.uint8)
    wanted = kept
    if G > 1:
      # Each forwarder learns which of its slots its node's ranks kept.
      _, asked = self.exchange(nothing,
                               jnp.where(self._by_forwarder(kept), 0, -1),
                               within_node=True)
      wanted = asked.any(0).reshape(num_nodes, T)
    _, wanted_here = self.exchange(nothing, jnp.where(wanted, 0, -1))
    recv, _ = self.exchange(pack(rows),
                            jnp.where(wanted_here, jnp.arange(T), -1))
    table = recv.reshape(num_nodes * T, -1)
    if G > 1:
      recv, _ = self.exchange(
          table, jnp.where(asked, jnp.arange(table.shape[0]), -1),
          within_node=True)
      table = self._to_rank_order(recv, T)
    return tuple(reference.gather_rows(r, handle.src_index)
                 for r in unpack(table, rows))

  def combine(self, y, handle: DispatchHandle, bias, out_dtype):
    G, T = self.ranks_per_node, handle.num_tokens
    num_nodes = handle.num_ranks // G
    rows_of = jnp.where(handle.recv_row < handle.capacity, handle.recv_row, -1)
    if G > 1:
      # The NVLink leg: each kept row to its token's forwarder on this node,
      # which sums its node's rows in rank order and rounds once: the
      # partial that crosses the network.
      recv, came = self.exchange(pack((y,)), self._by_forwarder(rows_of),
                                 within_node=True)
      (parts,) = unpack(recv.reshape(-1, recv.shape[-1]), (y,))
      parts = parts.reshape(G, num_nodes * T, *y.shape[1:])
      y = reference.sum_by_node(parts, None).astype(y.dtype)
      slots = jnp.arange(num_nodes * T).reshape(num_nodes, T)
      rows_of = jnp.where(came.any(0).reshape(num_nodes, T), slots, -1)
    recv, _ = self.exchange(pack((y,)), rows_of)
    (back,) = unpack(recv.reshape(num_nodes * T, -1), (y,))
    back = back.reshape(num_nodes, T, *y.shape[1:])
    total = reference.sum_by_node(back, None)  # the partials in node order
    if bias is not None:
      total = total + bias
    return total.astype(out_dtype)


def _holds(topk_idx: jax.Array, num_experts: int, per_member: int,
           num_members: int) -> jax.Array:
  """`bool[T, num_members]`: whether a token selects one of the experts of
  member j, which holds experts [j * per_member, (j + 1) * per_member); ids
  outside [0, num_experts) select nothing."""
  valid = (topk_idx >= 0) & (topk_idx < num_experts)
  member = jnp.where(valid, topk_idx // per_member, -1)
  return (member[:, :, None] == jnp.arange(num_members)).any(1)
