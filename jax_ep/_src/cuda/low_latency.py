"""The "cuda" backend of the low-latency ops (`CudaLowLatency`, at the
end) and the FFI calls of its kernels: dispatch and combine whole, one
kernel each (targets jax_ep_low_latency_dispatch, jax_ep_low_latency_combine),
or their send and receive halves (jax_ep_low_latency_dispatch_send,
jax_ep_low_latency_dispatch_recv, jax_ep_low_latency_combine_send,
jax_ep_low_latency_combine_recv), which receive hooks use.

A send half returns a ticket (uint32[2], the call's sequence number, made on
the device) that its receive half takes: the receive reads the buffer set the
send filled. Between them no SM waits, so compute placed there overlaps the
peers' sends (over NVLink the send kernel moves the rows itself, which leaves
less to hide than with RDMA puts). Every rank must issue the same sends in
the same order. Two buffer sets alternate: a send waits until every peer has
received the call that last used its set, so at most two sends may wait for
their receives (a third times out with a message). XLA orders the halves by
data dependence only, so independent low-latency ops in one program may run
sends before receives. Needs this process's NVSHMEM heap
(`nvshmem.open_heap`), sized with `sizes.ll_buffer_bytes`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep._src import native
from jax_ep._src import sizes
from jax_ep._src.cuda import nvshmem
from jax_ep._src.cuda.varying import mark_varying
from jax_ep._src.fp8 import FP8_DTYPE, GROUP
from jax_ep._src.handles import LowLatencyDispatched, LowLatencyHandle

_TICKET = jax.ShapeDtypeStruct((2,), jnp.uint32)


def check_shapes(op: str, num_ll_bytes: int, *, max_tokens: int,
                 hidden: int, topk: int, num_experts: int,
                 num_ranks: int) -> None:
  """Trace-time refusal of shapes the kernels or the heap cannot take."""
  limit = sizes.limits()
  checked = (
      ("num_max_dispatch_tokens_per_rank", max_tokens,
       limit["max_low_latency_tokens"]),
      ("num_ranks * num_max_dispatch_tokens_per_rank", num_ranks * max_tokens,
       limit["max_low_latency_slots_per_expert"]),
      ("the EP size", num_ranks, limit["max_ranks"]),
      ("num_experts", num_experts, limit["max_low_latency_experts"]),
      ("topk", topk, limit["max_topk"]),
  )
  for name, value, most in checked:
    if value > most:
      raise ValueError(f"jax_ep.{op}: the low-latency kernels need {name} "
                       f"<= {most}, got {value}")
  need = sizes.ll_buffer_bytes(max_tokens, hidden, num_experts)
  if need > num_ll_bytes:
    raise ValueError(
        f"jax_ep.{op}: the Buffer's num_ll_bytes ({num_ll_bytes}) is "
        f"too small for Tmax={max_tokens}, H={hidden}, E={num_experts}, which "
        f"need {need}: size it with jax_ep.ll_buffer_bytes for the largest "
        "shapes you run")


def _call(target: str, out_types, *args, **attrs):
  if not native.register_targets():
    raise RuntimeError(f"jax_ep {target}: the CUDA extension is missing: "
                       f"{native.unavailable_reason()}")
  return jax.ffi.ffi_call(target, out_types, has_side_effect=True)(*args, **attrs)


def shape_attr(*, num_tokens: int, max_tokens: int, hidden: int,
               num_topk: int, num_experts: int, num_ranks: int) -> dict:
  """The `shape` struct attribute (csrc low_latency::Shape) of one dispatch
  and the combine that returns it."""
  return {k: np.int64(v) for k, v in dict(
      num_tokens=num_tokens, max_tokens=max_tokens, hidden=hidden,
      num_topk=num_topk, num_experts=num_experts, num_ranks=num_ranks).items()}


def dispatch_send(x, topk_idx, *, shape: dict, options: dict, use_fp8: bool,
                  round_scale: bool) -> jax.Array:
  """Sends each token (cast to fp8 when asked) to its experts' ranks."""
  return _call("jax_ep_low_latency_dispatch_send", _TICKET, x, topk_idx,
               shape=shape, options=options, use_fp8=bool(use_fp8),
               round_scale=bool(round_scale))


def _dispatched_types(shape: dict, use_fp8: bool, use_ue8m0: bool):
  """The receive's outputs: recv_x, recv_scales (a placeholder without
  fp8), count, src_index, slot."""
  num_ranks, hidden = int(shape["num_ranks"]), int(shape["hidden"])
  num_local = int(shape["num_experts"]) // num_ranks
  slots = num_ranks * int(shape["max_tokens"])
  if not use_fp8:
    x_type, scales_type = jnp.bfloat16, jax.ShapeDtypeStruct((0,), jnp.uint8)
  elif use_ue8m0:
    x_type = FP8_DTYPE
    scales_type = jax.ShapeDtypeStruct((num_local, slots, hidden // (4 * GROUP)),
                                       jnp.int32)
  else:
    x_type = FP8_DTYPE
    scales_type = jax.ShapeDtypeStruct((num_local, slots, hidden // GROUP),
                                       jnp.float32)
  per_slot = jax.ShapeDtypeStruct((num_local, slots), jnp.int32)
  return (jax.ShapeDtypeStruct((num_local, slots, hidden), x_type),
          scales_type, jax.ShapeDtypeStruct((num_local,), jnp.int32),
          per_slot, per_slot)


def dispatch(x, topk_idx, *, axis_name: str, shape: dict, options: dict,
             use_fp8: bool, round_scale: bool, use_ue8m0: bool,
             zero_padding: bool):
  """Both halves in one kernel; returns what `dispatch_recv` returns."""
  x, scales, count, src_index, slot = mark_varying(axis_name, _call(
      "jax_ep_low_latency_dispatch",
      _dispatched_types(shape, use_fp8, use_ue8m0), x, topk_idx, shape=shape,
      options=options, use_fp8=bool(use_fp8), round_scale=bool(round_scale),
      use_ue8m0=bool(use_ue8m0), zero_padding=bool(zero_padding)))
  return x, (scales if use_fp8 else None), count, src_index, slot


def dispatch_recv(ticket, x, topk_idx, *, axis_name: str, shape: dict,
                  options: dict, use_fp8: bool, round_scale: bool,
                  use_ue8m0: bool, zero_padding: bool):
  """Packs the received rows, casting this rank's own from `x` (the send's
  `x` and `topk_idx`); returns `(x, scales or None, count, src_index, slot)`
  with the shapes of `LowLatencyDispatched`."""
  x, scales, count, src_index, slot = mark_varying(axis_name, _call(
      "jax_ep_low_latency_dispatch_recv",
      _dispatched_types(shape, use_fp8, use_ue8m0), ticket, x, topk_idx,
      shape=shape, options=options, use_fp8=bool(use_fp8),
      round_scale=bool(round_scale), use_ue8m0=bool(use_ue8m0),
      zero_padding=bool(zero_padding)))
  return x, (scales if use_fp8 else None), count, src_index, slot


def combine_send(y, src_index, *, shape: dict, options: dict,
                 zero_copy: bool) -> jax.Array:
  """Sends every received row's expert output back to its source rank."""
  return _call("jax_ep_low_latency_combine_send", _TICKET, y, src_index,
               shape=shape, options=options, zero_copy=bool(zero_copy))


def _combined_type(topk_idx, shape: dict):
  return jax.ShapeDtypeStruct((topk_idx.shape[0], int(shape["hidden"])),
                              jnp.bfloat16)


def combine(y, handle: LowLatencyHandle, topk_idx, topk_weights, *,
            axis_name: str, shape: dict, options: dict,
            zero_copy: bool) -> jax.Array:
  """Both halves in one kernel; returns what `combine_recv` returns."""
  return mark_varying(axis_name, _call(
      "jax_ep_low_latency_combine", _combined_type(topk_idx, shape), y,
      handle.src_index, handle.slot, topk_idx,
      topk_weights.astype(jnp.float32), shape=shape, options=options,
      zero_copy=bool(zero_copy)))


def combine_recv(ticket, y, handle: LowLatencyHandle, topk_idx, topk_weights,
                 *, axis_name: str, shape: dict, options: dict) -> jax.Array:
  """Sums each token's weighted expert outputs (the reference's order),
  reading this rank's experts' rows from `y` in place."""
  return mark_varying(axis_name, _call(
      "jax_ep_low_latency_combine_recv", _combined_type(topk_idx, shape),
      ticket, y, handle.slot, topk_idx, topk_weights.astype(jnp.float32),
      shape=shape, options=options))


@dataclasses.dataclass(frozen=True)
class CudaLowLatency:
  """The "cuda" backend of the low-latency ops (`backend.LowLatencyBackend`):
  this process's NVSHMEM heap and how the kernels use it. A send's pending
  value is its ticket (with, for combine, what the receive needs)."""

  axis_name: str
  heap: nvshmem.NvshmemHeap  # may be larger than asked: a process has one
  num_ll_bytes: int  # what the Buffer asked for, and all its ops may use
  force_put: bool  # NVSHMEM puts even to peers that P2P stores reach
  timeout_s: float
  op: str = "low_latency"  # the public op named in error messages

  @property
  def _options(self) -> dict:
    """The `options` struct attribute (csrc low_latency::Options)."""
    return dict(force_put=bool(self.force_put),
                timeout_ns=np.int64(round(self.timeout_s * 1e9)))

  def _shape(self, **sizes) -> dict:
    """The `shape` attribute, once the kernels' limits and the heap's size
    are checked for it."""
    check_shapes(self.op, self.num_ll_bytes, max_tokens=sizes["max_tokens"],
                 hidden=sizes["hidden"], topk=sizes["num_topk"],
                 num_experts=sizes["num_experts"],
                 num_ranks=sizes["num_ranks"])
    return shape_attr(**sizes)

  def dispatch_send(self, x, topk_idx, *, num_ranks: int, num_experts: int,
                    max_tokens: int, use_fp8: bool, round_scale: bool,
                    use_ue8m0: bool):
    shape = self._shape(num_tokens=x.shape[0], max_tokens=max_tokens,
                        hidden=x.shape[1], num_topk=topk_idx.shape[1],
                        num_experts=num_experts, num_ranks=num_ranks)
    ticket = dispatch_send(x, topk_idx, shape=shape, options=self._options,
                           use_fp8=use_fp8,
                           round_scale=_rounds_scales(round_scale, use_ue8m0))
    # The receive casts this rank's own rows from x.
    return ticket, x, topk_idx

  def dispatch_receive(self, pending, *, num_ranks: int, num_experts: int,
                       max_tokens: int, num_tokens: int, num_topk: int,
                       hidden: int, use_fp8: bool, round_scale: bool,
                       use_ue8m0: bool,
                       zero_padding: bool) -> LowLatencyDispatched:
    shape = shape_attr(num_tokens=num_tokens, max_tokens=max_tokens,
                       hidden=hidden, num_topk=num_topk,
                       num_experts=num_experts, num_ranks=num_ranks)
    ticket, x, topk_idx = pending
    return _dispatched(shape, *dispatch_recv(
        ticket, x, topk_idx, axis_name=self.axis_name, shape=shape,
        options=self._options, use_fp8=use_fp8,
        round_scale=_rounds_scales(round_scale, use_ue8m0),
        use_ue8m0=use_ue8m0,
        zero_padding=zero_padding))

  def dispatch(self, x, topk_idx, *, num_ranks: int, num_experts: int,
               max_tokens: int, use_fp8: bool, round_scale: bool,
               use_ue8m0: bool, zero_padding: bool) -> LowLatencyDispatched:
    shape = self._shape(num_tokens=x.shape[0], max_tokens=max_tokens,
                        hidden=x.shape[1], num_topk=topk_idx.shape[1],
                        num_experts=num_experts, num_ranks=num_ranks)
    return _dispatched(shape, *dispatch(
        x, topk_idx, axis_name=self.axis_name, shape=shape,
        options=self._options, use_fp8=use_fp8,
        round_scale=_rounds_scales(round_scale, use_ue8m0),
        use_ue8m0=use_ue8m0,
        zero_padding=zero_padding))

  def combine_send(self, y, topk_idx, topk_weights, handle: LowLatencyHandle,
                   *, zero_copy: bool):
    shape = self._shape(**_combine_sizes(handle, topk_idx))
    ticket = combine_send(y, handle.src_index, shape=shape,
                          options=self._options, zero_copy=zero_copy)
    # A pytree (a hook's pending value may cross jit): the handle's sizes
    # are static. The receive reads this rank's tokens' rows from y.
    return ticket, y, topk_idx, topk_weights, handle

  def combine_receive(self, pending):
    ticket, y, topk_idx, topk_weights, handle = pending
    return combine_recv(ticket, y, handle, topk_idx, topk_weights,
                        axis_name=self.axis_name,
                        shape=shape_attr(**_combine_sizes(handle, topk_idx)),
                        options=self._options)

  def combine(self, y, topk_idx, topk_weights, handle: LowLatencyHandle, *,
              zero_copy: bool):
    return combine(y, handle, topk_idx, topk_weights,
                   axis_name=self.axis_name,
                   shape=self._shape(**_combine_sizes(handle, topk_idx)),
                   options=self._options, zero_copy=zero_copy)


def _rounds_scales(round_scale: bool, use_ue8m0: bool) -> bool:
  """Whether the kernels' fp8 cast rounds scales to powers of two: UE8M0
  scales keep only the exponent, so they are always rounded."""
  return round_scale or use_ue8m0


def _dispatched(shape: dict, x, scales, count, src_index,
                slot) -> LowLatencyDispatched:
  """A receive's outputs with the handle of the dispatch of `shape`."""
  handle = LowLatencyHandle(src_index, slot, int(shape["num_ranks"]),
                            int(shape["num_experts"]), int(shape["max_tokens"]),
                            int(shape["num_tokens"]), int(shape["hidden"]))
  return LowLatencyDispatched(x, scales, count, handle)


def _combine_sizes(handle: LowLatencyHandle, topk_idx) -> dict:
  """A combine's shape is its dispatch's."""
  return dict(num_tokens=handle.num_tokens, max_tokens=handle.max_tokens,
              hidden=handle.hidden, num_topk=topk_idx.shape[1],
              num_experts=handle.num_experts, num_ranks=handle.num_ranks)
