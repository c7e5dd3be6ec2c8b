"""The "cuda" backend of the normal ops on one node (`CudaIntranode`, at the
end) and the FFI calls of its NVLink kernels: dispatch, cached dispatch and
combine (targets jax_ep_intranode_dispatch, jax_ep_intranode_cached_dispatch,
jax_ep_intranode_combine).

Needs the peer buffers of every EP device (`peer_buffers.create_peer_buffers`)
to exist before the first call runs; dispatch and combine push rows into the
buffers' data region, sized with `sizes.nvl_buffer_bytes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep._src import native
from jax_ep._src import sizes
from jax_ep._src.config import OVERLAP_NUM_SMS, Config
from jax_ep._src.cuda import peer_buffers
from jax_ep._src.cuda.varying import mark_varying
from jax_ep._src.handles import DispatchHandle
from jax_ep._src.reference.normal import ReferenceNormal

_DISPATCH_TARGET = "jax_ep_intranode_dispatch"
_CACHED_DISPATCH_TARGET = "jax_ep_intranode_cached_dispatch"
_COMBINE_TARGET = "jax_ep_intranode_combine"
# The dtypes whose rows the combine kernel sums.
COMBINE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _check_buffers(op: str, buffers, num_ranks: int, needed: int) -> None:
  if buffers is None or not hasattr(buffers, "num_bytes"):
    raise TypeError(
        f"jax_ep.{op}: buffers must be the PeerBuffers of the EP devices "
        f"(peer_buffers.create_peer_buffers), got {type(buffers)}")
  if buffers.num_ranks != num_ranks:
    raise ValueError(
        f"jax_ep.{op}: the NVLink buffers are for {buffers.num_ranks} ranks, "
        f"the call for {num_ranks}")
  if buffers.num_bytes < needed:
    raise ValueError(
        f"jax_ep.{op}: the NVLink buffers hold {buffers.num_bytes} bytes but "
        f"this call needs {needed}; size the Buffer's num_nvl_bytes with "
        "jax_ep.nvl_buffer_bytes(num_tokens, hidden, topk, num_ranks, dtype) "
        "for the largest shapes you run")


def _check_limits(op: str, num_ranks: int, num_experts: int) -> None:
  limit = sizes.limits()
  max_experts, max_ranks = limit["max_normal_experts"], limit["max_ranks"]
  if num_experts > max_experts or num_ranks > max_ranks:
    raise ValueError(
        f"jax_ep.{op}: the intranode CUDA kernels support num_experts <= "
        f"{max_experts} and an EP size <= {max_ranks}, got num_experts="
        f"{num_experts} on {num_ranks} ranks; use a Buffer with "
        "backend='reference' for more")


# The kernels' own default: the SM budget of kernels beside computation.
BUDGET_CONFIG = Config(num_sms=OVERLAP_NUM_SMS)


def _tuning(op: str, config: Config, timeout_s: float) -> dict[str, np.int64]:
  """The kernels' tuning attribute (csrc intranode::Tuning). `Config` checked
  its fields when it was made; only the timeout and an unresolved automatic
  grid are left to check."""
  if not config.num_sms:
    raise ValueError(
        f"jax_ep.{op}: config.num_sms is 0 (automatic); the kernels take the "
        "grid the Buffer resolves (Buffer.num_sms)")
  if not timeout_s > 0:
    raise ValueError(f"jax_ep.{op}: timeout_s must be > 0, got {timeout_s!r}")
  return dict(num_sms=np.int64(config.num_sms),
              nvl_send_warps=np.int64(config.nvl_send_warps),
              nvl_chunk=np.int64(config.nvl_chunk),
              timeout_ns=np.int64(round(timeout_s * 1e9)),
              nvl_copy_engine=np.int64(config.nvl_copy_engine))


def _recv_row_types(rows, capacity: int):
  """Result types of recv_x and recv_scales (`[M, 0]` f32 when no scales)."""
  scales = rows[1] if len(rows) == 2 else None
  return (jax.ShapeDtypeStruct((capacity, rows[0].shape[1]), rows[0].dtype),
          jax.ShapeDtypeStruct((capacity, 0 if scales is None else
                                scales.shape[1]),
                               jnp.float32 if scales is None else
                               scales.dtype))


def _scales_arg(rows) -> jax.Array:
  return rows[1] if len(rows) == 2 else jnp.zeros((rows[0].shape[0], 0),
                                                  jnp.float32)


def dispatch(rows, topk_idx: jax.Array, topk_weights: jax.Array | None, *,
             axis_name: str, num_ranks: int, num_experts: int, capacity: int,
             expert_alignment: int, buffers, timeout_s: float,
             config: Config = BUDGET_CONFIG, op: str = "intranode_dispatch"):
  """Fresh intranode dispatch on the NVLink kernels, per shard.

  Same contract and results (bit for bit) as
  `jax_ep._src.reference.normal.dispatch`; call inside `jax.shard_map` on
  every rank, in the same order as the other intranode calls. The public op
  has checked the arguments; here only what the kernels add is: their
  limits, the buffers' size and the timeout.

  Args:
    rows: `(x[T, H],)` (any dtype, rows a multiple of 4 bytes) or fp8
      `(e4m3[T, H], f32 scales[T, H/128])`: sent as bytes.
    topk_idx: `int32[T, K]`, `-1` (or any id outside `[0, E)`) selects
      nothing, `K <= 32`.
    topk_weights: optional `f32[T, K]`.
    axis_name: the EP axis: the results are marked varying over it (the
      rank itself comes from the device's peer buffers).
    num_ranks, num_experts, capacity, expert_alignment: R, E (a multiple of
      R, <= 1024), M, alignment of the per-expert counts.
    buffers: the `PeerBuffers` of the EP devices; their data region must hold
      `sizes.nvl_buffer_bytes` for these shapes.
    timeout_s: per wait for a peer, then the kernel reports and traps.
    config: how the kernels use the GPU: `num_sms` blocks, `nvl_send_warps`
      pushing warps per block, `nvl_chunk` tokens per arrival flag (0: about
      four chunks per pushing warp, or two per receiving warp with the copy
      engines), and `nvl_copy_engine` (move every token's row and routing to
      each peer with the GPU's copy engines, leaving every warp to receive;
      sends all T rows, so best when most tokens go to every peer, as at R=2).
    op: the op named in error messages (the public op that calls this).

  Returns:
    `(recv_rows, recv_topk_idx int32[M, K], recv_topk_weights f32[M, K] or
    None, num_tokens_per_expert int32[E/R], handle)`, `recv_rows` a tuple like
    `rows` with `M` rows.
  """
  rows = tuple(rows)
  num_tokens, num_topk = topk_idx.shape
  _check_limits(op, num_ranks, num_experts)
  tuning = _tuning(op, config, timeout_s)
  row_bytes = [r.shape[1] * r.dtype.itemsize for r in rows] + [0]
  native.require_targets(op)
  _check_buffers(op, buffers, num_ranks, sizes.intranode_data_bytes(
      num_tokens, num_ranks, num_topk, row_bytes[0], row_bytes[1], 0))
  weights = (topk_weights if topk_weights is not None else
             jnp.zeros(topk_idx.shape, jnp.float32))
  out_types = _recv_row_types(rows, capacity) + (
      jax.ShapeDtypeStruct((capacity, num_topk), jnp.int32),
      jax.ShapeDtypeStruct((capacity, num_topk), jnp.float32),
      jax.ShapeDtypeStruct((num_experts // num_ranks,), jnp.int32),
      jax.ShapeDtypeStruct((capacity,), jnp.int32),
      jax.ShapeDtypeStruct((num_ranks, num_tokens), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.int32),
  )
  # Side effect: every call is one protocol round on every rank.
  call = jax.ffi.ffi_call(_DISPATCH_TARGET, out_types, has_side_effect=True)
  (recv_x, recv_scales, recv_idx, recv_weights, per_expert, src_index,
   recv_row, num_recv) = call(
       rows[0], _scales_arg(rows), topk_idx, weights,
       num_ranks=np.int64(num_ranks), num_experts=np.int64(num_experts),
       capacity=np.int64(capacity),
       expert_alignment=np.int64(expert_alignment), tuning=tuning)
  (recv_x, recv_scales, recv_idx, recv_weights, per_expert, src_index,
   recv_row, num_recv) = mark_varying(axis_name, (
       recv_x, recv_scales, recv_idx, recv_weights, per_expert, src_index,
       recv_row, num_recv))
  handle = DispatchHandle(src_index, recv_row, num_recv, num_ranks,
                          num_tokens, capacity, num_experts)
  recv_rows = (recv_x,) if len(rows) == 1 else (recv_x, recv_scales)
  return (recv_rows, recv_idx,
          recv_weights if topk_weights is not None else None, per_expert,
          handle)


def cached_dispatch(rows, handle: DispatchHandle, *, axis_name: str, buffers,
                    timeout_s: float, config: Config = BUDGET_CONFIG,
                    op: str = "intranode_cached_dispatch"):
  """Intranode dispatch that replays `handle`'s routing, per shard (the
  backward of combine): no routing input, no counting.

  The same rows (bit for bit) as `jax_ep._src.reference.normal.dispatch`
  with `handle=`: row `handle.recv_row[s, t]` of the result is token t of
  rank s; rows from `min(num_recv_tokens, M)` on are zero.

  Args:
    rows: `(x[T, H],)` or fp8 `(e4m3[T, H], f32 scales[T, H/128])`, T the
      handle's.
    handle: the `DispatchHandle` of a dispatch over the same ranks.
    axis_name: the EP axis (results vary over it).
    buffers, timeout_s, config, op: as `dispatch`.

  Returns:
    `recv_rows`, a tuple like `rows` of `M` rows.
  """
  rows = tuple(rows)
  num_tokens = handle.num_tokens
  tuning = _tuning(op, config, timeout_s)
  row_bytes = [r.shape[1] * r.dtype.itemsize for r in rows] + [0]
  num_ranks, capacity = handle.num_ranks, handle.capacity
  native.require_targets(op)
  _check_buffers(op, buffers, num_ranks, sizes.intranode_data_bytes(
      num_tokens, num_ranks, 0, row_bytes[0], row_bytes[1], 0))
  call = jax.ffi.ffi_call(_CACHED_DISPATCH_TARGET,
                          _recv_row_types(rows, capacity),
                          has_side_effect=True)
  recv_x, recv_scales = mark_varying(axis_name, call(
      rows[0], _scales_arg(rows), handle.recv_row, handle.num_recv_tokens,
      num_ranks=np.int64(num_ranks), capacity=np.int64(capacity), tuning=tuning))
  return (recv_x,) if len(rows) == 1 else (recv_x, recv_scales)


def combine(y: jax.Array, handle: DispatchHandle, *, axis_name: str, buffers,
            timeout_s: float, bias: jax.Array | None = None,
            out_dtype=jnp.float32, config: Config = BUDGET_CONFIG,
            op: str = "intranode_combine") -> jax.Array:
  """Intranode combine on the NVLink kernels, per shard.

  With the defaults, the same result (bit for bit) as
  `jax_ep._src.reference.normal.combine`: `f32[T, C]`, the sum in fp32 and
  rank order of the rows every rank received for each token. With `bias`
  (`f32[T, C]`) and `out_dtype=y.dtype` it returns
  `(sum + bias).astype(y.dtype)`, rounded once in the kernel.

  Args:
    y: `bf16[M, C]` or `f32[M, C]`, rows as the dispatch delivered them.
    handle: the dispatch's `DispatchHandle` (kernel or reference made).
    axis_name: the EP axis (results vary over it).
    buffers: the EP devices' `PeerBuffers`.
    bias: optional `f32[T, C]`.
    out_dtype: `float32` or `y.dtype`.
    timeout_s, op: as `dispatch`.
    config: as `dispatch`, but combine ignores `nvl_copy_engine` and always
      pushes with warps (the rows an owner needs are not at static places).
  """
  num_tokens, num_ranks = handle.num_tokens, handle.num_ranks
  if bias is None:
    bias = jnp.zeros((num_tokens, 0), jnp.float32)
  tuning = _tuning(op, config, timeout_s)
  native.require_targets(op)
  _check_buffers(op, buffers, num_ranks, sizes.intranode_data_bytes(
      num_tokens, num_ranks, 0, 0, 0, y.shape[1] * y.dtype.itemsize))
  call = jax.ffi.ffi_call(
      _COMBINE_TARGET,
      jax.ShapeDtypeStruct((num_tokens, y.shape[1]), out_dtype),
      has_side_effect=True)
  return mark_varying(axis_name, call(y, handle.recv_row, bias,
                                  num_ranks=np.int64(num_ranks), tuning=tuning))


@dataclasses.dataclass(frozen=True)
class CudaIntranode:
  """The "cuda" backend of the normal ops on one node
  (`backend.NormalBackend`): the NVLink peer buffers and the kernels'
  tuning. Rows the combine kernel cannot sum go to `fallback` (recorded with
  `fall_back`, `Buffer.fall_back`)."""

  axis_name: str
  # One PeerBuffers per EP group. The kernels find a device's own through
  # the extension; the first group's sizes (every group's) bound the calls.
  groups: tuple[Any, ...]
  config: Config
  timeout_s: float
  fallback: ReferenceNormal
  fall_back: Callable[[str, str], None]
  op: str = "dispatch"  # the public op named in error messages

  @classmethod
  def open(cls, axis_name: str, groups, num_bytes: int, config: Config, *,
           timeout_s: float, fall_back) -> CudaIntranode:
    """Makes (or reuses) every EP group's peer buffers (collective)."""
    return cls(axis_name, tuple(peer_buffers.group_peer_buffers(g, num_bytes)
                                for g in groups),
               config, timeout_s, ReferenceNormal(axis_name), fall_back)

  def close(self) -> None:
    for buffers in self.groups:
      buffers.close()

  def _tuning(self) -> dict:
    return dict(buffers=self.groups[0], config=self.config,
                timeout_s=self.timeout_s, op=self.op)

  def dispatch(self, rows, topk_idx, topk_weights, *, num_ranks: int,
               num_experts: int, capacity: int, expert_alignment: int):
    return dispatch(rows, topk_idx, topk_weights, axis_name=self.axis_name,
                    num_ranks=num_ranks, num_experts=num_experts,
                    capacity=capacity, expert_alignment=expert_alignment,
                    **self._tuning())

  def cached_dispatch(self, rows, handle: DispatchHandle):
    return cached_dispatch(rows, handle, axis_name=self.axis_name,
                           **self._tuning())

  def combine(self, y, handle: DispatchHandle, bias, out_dtype):
    if y.dtype not in COMBINE_DTYPES:
      self.fall_back(
          self.op, f"it combines {jnp.dtype(y.dtype).name} rows, and the "
          "combine kernel sums bfloat16 and float32 rows")
      return self.fallback.combine(y, handle, bias, out_dtype)
    return combine(y, handle, axis_name=self.axis_name, bias=bias,
                   out_dtype=out_dtype, **self._tuning())
