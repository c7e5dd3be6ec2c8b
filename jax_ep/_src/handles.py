"""Results and handles of the ops: pytree dataclasses, arrays as leaves.

Sizes are static fields (aux data), so a handle can cross `jit` boundaries and
be saved as a `custom_vjp` residual. All arrays are per EP rank: they are what
one shard sees inside `shard_map`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

_static = functools.partial(dataclasses.field, metadata=dict(static=True))


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class Layout:
  """Output of `get_dispatch_layout`, for this rank's tokens.

  Attributes:
    num_tokens_per_rank: int32[R], tokens with at least one expert on rank r.
    num_tokens_per_expert: int32[E], (token, k) selections of expert e.
    is_token_in_rank: bool[T, R].
    num_invalid: int32 scalar, topk entries outside [-1, E) (they select
      nothing; a diagnostic, never an error at run time).
    num_tokens_per_node: int32[N], tokens with at least one expert on node
      n (N = R / the Buffer's ranks_per_node; each token once per node, the
      rows an internode dispatch sends over the network).
  """

  num_tokens_per_rank: jax.Array
  num_tokens_per_expert: jax.Array
  is_token_in_rank: jax.Array
  num_invalid: jax.Array
  num_tokens_per_node: jax.Array


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
  """What combine and a cached dispatch need to retrace a dispatch.

  Attributes:
    src_index: int32[M], for each received row, `s * T + t` (source rank s,
      token t), or `R * T` for padding rows.
    recv_row: int32[R, T], the row where token t of rank s landed here, or `M`
      where it was not sent here or was dropped by the capacity.
    num_recv_tokens: int32 scalar, rows that should have been received (the
      true count, which exceeds `capacity` on overflow).
    num_ranks, num_tokens, capacity, num_experts: static sizes R, T, M, E.
    explicit_axis: static; the EP mesh axis is of type `AxisType.Explicit`
      (`check_capacity` refuses it: checkify cannot report through it).
  """

  src_index: jax.Array
  recv_row: jax.Array
  num_recv_tokens: jax.Array
  num_ranks: int = _static()
  num_tokens: int = _static()
  capacity: int = _static()
  num_experts: int = _static()
  explicit_axis: bool = _static(default=False)


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class Dispatched:
  """Output of `dispatch` on this rank (M = capacity rows).

  Attributes:
    x: [M, H] received rows, ordered by source rank then token; rows past the
      valid count are zero. bf16/f32 as sent, or float8_e4m3fn for fp8 input.
    scales: f32[M, H/128] for fp8 input, else None; zero past the valid count.
    topk_idx: int32[M, K], the local expert id (e - rank*L) where the source's
      choice e lives on this rank, else -1; padding rows are all -1.
    topk_weights: f32[M, K], the source's weights where `topk_idx` >= 0, else
      0; None when dispatch got no weights.
    num_recv_tokens: int32 scalar, true number of received rows (> M on
      overflow).
    num_recv_tokens_per_expert: int32[L], (row, k) selections per local expert over
      every row sent here (dropped rows included), each rounded up to
      `expert_alignment`.
    handle: the `DispatchHandle` for combine and cached dispatch.
  """

  x: jax.Array
  scales: jax.Array | None
  topk_idx: jax.Array | None
  topk_weights: jax.Array | None
  num_recv_tokens: jax.Array
  num_recv_tokens_per_expert: jax.Array | None
  handle: DispatchHandle


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
  """What `low_latency_combine` needs to bring the expert outputs back.

  Attributes:
    src_index: int32[L, R*Tmax], for each slot of each local expert,
      `s * Tmax + t` (source rank s, token t), or `R * Tmax` for empty slots.
    slot: int32[L, R*Tmax], indexed by `s * Tmax + t`: the slot of that token
      in local expert l, or `R * Tmax` where the token did not select it.
    num_ranks, num_experts, max_tokens, num_tokens, hidden: static R, E,
      Tmax, T, H.
  """

  src_index: jax.Array
  slot: jax.Array
  num_ranks: int = _static()
  num_experts: int = _static()
  max_tokens: int = _static()
  num_tokens: int = _static()
  hidden: int = _static()


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class LowLatencyDispatched:
  """Output of `low_latency_dispatch` on this rank.

  Attributes:
    x: [L, R*Tmax, H] rows per local expert, packed at the front
      (`[0, recv_count)`), grouped by source rank in rank order, then by token;
      zero past the count. float8_e4m3fn with fp8, else bf16.
    scales: with fp8, f32[L, R*Tmax, H/128], or with UE8M0 int32[L, R*Tmax,
      H/512] (four exponent bytes per int32, little-endian); else None.
    recv_count: int32[L], received rows per local expert.
    handle: the `LowLatencyHandle` for `low_latency_combine`.
  """

  x: jax.Array
  scales: jax.Array | None
  recv_count: jax.Array
  handle: LowLatencyHandle
