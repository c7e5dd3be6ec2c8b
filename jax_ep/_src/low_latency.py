"""Low-latency (decoding) dispatch and combine: API, checks, hooks, autodiff.

Backward rules (docs/contract.md, "Autodiff"): dispatch's is a unit-weight
combine; combine's is a dispatch of the output gradient scaled per selection,
plus the weights' gradient. With `return_recv_hook=True` the op is split into
a send half and a receive half (`RecvHook`); split ops are for inference and
not differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep._src import checks
from jax_ep._src.backend import LowLatencyBackend
from jax_ep._src.fp8 import check_fp8_hidden
from jax_ep._src.handles import LowLatencyDispatched, LowLatencyHandle
from jax_ep._src.nograd import no_gradient
from jax_ep._src.runtime import Buffer

_HOOK_NO_GRAD = ("jax_ep.{op}: return_recv_hook=True splits the op for "
                 "inference and is not differentiable; call it without hooks "
                 "to differentiate")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecvHook:
  """The receive half of a split low-latency op.

  `hook(*after)` issues the receive and returns the op's result. Arrays in
  `after` (e.g. the outputs of compute placed between send and receive) are
  tied to the receive with `lax.optimization_barrier`, which pins it after
  that compute in XLA's schedule. XLA drops from the barrier arrays that
  nothing else uses (and then never computes them): pass arrays the program
  goes on to use. A pytree: it may cross `jit` boundaries.
  """

  pending: Any
  receive: Any = dataclasses.field(metadata=dict(static=True))

  def __call__(self, *after):
    pending = self.pending
    if after:
      pending, _ = lax.optimization_barrier((pending, after))
    return self.receive(pending)


@dataclasses.dataclass(frozen=True)
class _DispatchSend:
  """The send half of a dispatch on `backend`; its result is the pending
  value of a hook."""
  backend: LowLatencyBackend
  num_ranks: int
  num_experts: int
  max_tokens: int
  use_fp8: bool
  round_scale: bool
  use_ue8m0: bool

  def __call__(self, x, topk_idx):
    return self.backend.dispatch_send(
        x, topk_idx, num_ranks=self.num_ranks, num_experts=self.num_experts,
        max_tokens=self.max_tokens, use_fp8=self.use_fp8,
        round_scale=self.round_scale, use_ue8m0=self.use_ue8m0)


@dataclasses.dataclass(frozen=True)
class _DispatchReceive:
  send: _DispatchSend
  num_tokens: int
  num_topk: int
  hidden: int
  zero_padding: bool

  def __call__(self, pending) -> LowLatencyDispatched:
    s = self.send
    return s.backend.dispatch_receive(
        pending, num_ranks=s.num_ranks, num_experts=s.num_experts,
        max_tokens=s.max_tokens, num_tokens=self.num_tokens,
        num_topk=self.num_topk, hidden=self.hidden, use_fp8=s.use_fp8,
        round_scale=s.round_scale, use_ue8m0=s.use_ue8m0,
        zero_padding=self.zero_padding)

  def whole(self, x, topk_idx) -> LowLatencyDispatched:
    """Both halves at once, for `x` and `topk_idx` of this receive's sizes
    (the backend may run them as one kernel)."""
    s = self.send
    return s.backend.dispatch(
        x, topk_idx, num_ranks=s.num_ranks, num_experts=s.num_experts,
        max_tokens=s.max_tokens, use_fp8=s.use_fp8,
        round_scale=s.round_scale, use_ue8m0=s.use_ue8m0,
        zero_padding=self.zero_padding)


def low_latency_dispatch(buffer: Buffer, x: jax.Array, topk_idx: jax.Array, *,
                         num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, use_fp8: bool = True,
                         round_scale: bool = False, use_ue8m0: bool = False,
                         return_recv_hook: bool = False,
                         zero_padding: bool = True):
  """Sends one row per (token, expert) into that expert's slots.

  Call inside `jax.shard_map` over `buffer.axis_name`; shapes are per rank.

  Args:
    buffer: the `jax_ep.Buffer` of the EP axis (R ranks).
    x: `bf16[T, H]` tokens, T <= Tmax.
    topk_idx: `int32[T, K]` expert ids, `-1` for none; ids outside `[-1, E)`
      select nothing. A token listing an expert twice gets one row for it.
    num_max_dispatch_tokens_per_rank: Tmax, static; each local expert has
      `R * Tmax` slots, which can never overflow.
    num_experts: E, a multiple of R.
    use_fp8: cast to e4m3 per token per 128 channels before sending.
    round_scale: round fp8 scales up to powers of two.
    use_ue8m0: send the scales as packed UE8M0 exponents (implies round_scale;
      H must be a multiple of 512).
    return_recv_hook: return a `RecvHook` instead of the result; the result
      comes from calling it (not differentiable).
    zero_padding: zero the rows (and scales) past each expert's count. With
      False the kernels leave them as they were, which saves writing all
      `E * Tmax` rows per call (most of them padding); the reference always
      zeros.

  Returns:
    a `LowLatencyDispatched`, or a `RecvHook` that returns one. Differentiable
    in `x` with `use_fp8=False` (the backward is a unit-weight combine).
  """
  op = "low_latency_dispatch"
  buffer.check_call_site(op)
  num_ranks = buffer.num_ranks
  max_tokens = checks.positive_int(op, "num_max_dispatch_tokens_per_rank",
                                   num_max_dispatch_tokens_per_rank)
  num_experts = checks.experts(op, num_experts, num_ranks)
  checks.array(op, "x", x, ndim=2, dtypes=(jnp.bfloat16,))
  checks.row_bytes(op, "x", x)
  num_tokens, hidden = x.shape
  checks.has_tokens(op, num_tokens)
  if num_tokens > max_tokens:
    raise ValueError(
        f"jax_ep.{op}: x has {num_tokens} tokens but "
        f"num_max_dispatch_tokens_per_rank is {max_tokens}")
  checks.topk_idx(op, topk_idx, num_tokens, num_experts)
  if use_fp8:
    check_fp8_hidden(op, hidden, use_ue8m0)
  elif round_scale or use_ue8m0:
    raise ValueError(
        f"jax_ep.{op}: round_scale and use_ue8m0 need use_fp8=True")
  if not isinstance(zero_padding, bool):
    raise TypeError(
        f"jax_ep.{op}: zero_padding must be a bool, got {zero_padding!r}")
  send = _DispatchSend(buffer.low_latency_backend(op), num_ranks, num_experts,
                       max_tokens, use_fp8, round_scale, use_ue8m0)
  receive = _DispatchReceive(send, num_tokens, topk_idx.shape[1], hidden,
                             zero_padding)
  if return_recv_hook:
    x = no_gradient(x, _HOOK_NO_GRAD.format(op=op))
    return RecvHook(send(x, topk_idx), receive)
  if use_fp8:
    x = no_gradient(x, f"jax_ep.{op}: the fp8 cast is not differentiable; "
                    "use use_fp8=False to differentiate")
  return _ll_dispatch(send, receive, x, topk_idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ll_dispatch(send, receive, x, topk_idx):
  del send  # the receive's
  return receive.whole(x, topk_idx)


def _ll_dispatch_fwd(send, receive, x, topk_idx):
  out = _ll_dispatch(send, receive, x, topk_idx)
  return out, (out.handle, topk_idx)


def _ll_dispatch_bwd(send, receive, residual, g):
  del receive
  handle, topk_idx = residual
  if send.use_fp8:  # no_gradient has refused any gradient that needs this
    return None, None
  d_x = _weighted_combine(_Combine(send.backend), g.x, topk_idx,
                          _first_selections(topk_idx), handle)
  return d_x, None


_ll_dispatch.defvjp(_ll_dispatch_fwd, _ll_dispatch_bwd)


def _first_selections(topk_idx):
  """f32[T, K]: 1 where k is the first column choosing its expert, else 0."""
  k = topk_idx.shape[1]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [k, j]: j < k
  repeated = ((topk_idx[:, :, None] == topk_idx[:, None, :]) & earlier).any(-1)
  return (~repeated).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Combine:
  """Both halves of a combine on `backend`."""
  backend: LowLatencyBackend
  zero_copy: bool = False

  def send(self, y, topk_idx, topk_weights, handle):
    return self.backend.combine_send(y, topk_idx, topk_weights, handle,
                                     zero_copy=self.zero_copy)

  def receive(self, pending):
    return self.backend.combine_receive(pending)

  __call__ = receive


def _weighted_combine(combine: _Combine, y, topk_idx, topk_weights, handle):
  """Both halves at once (the backend may run them as one kernel)."""
  return combine.backend.combine(y, topk_idx, topk_weights, handle,
                                 zero_copy=combine.zero_copy)


def low_latency_combine(buffer: Buffer, y: jax.Array, topk_idx: jax.Array,
                        topk_weights: jax.Array, handle: LowLatencyHandle, *,
                        zero_copy: bool = False,
                        return_recv_hook: bool = False):
  """Weighted sum of each token's expert outputs, back on its own rank.

  `out[t] = sum_k w[t, k] * y[slot of (t, expert k)]`, skipping -1, in fp32:
  each rank sums its experts' terms in k order, then the source adds the
  ranks' sums in rank order and rounds once to bf16. Each term's multiply
  and add may be fused into one FMA (the kernels fuse every term; XLA may
  fuse some on the reference backend), so a result can differ from a strict
  evaluation within fp32's error bound: one bf16 step at a rounding tie, or
  a few steps of a tiny result where terms cancel. Each backend is bitwise
  repeatable.

  Args:
    buffer: the `jax_ep.Buffer` of the dispatch.
    y: `bf16[L, R*Tmax, H]` expert outputs in the dispatch's slot order.
    topk_idx: `int32[T, K]`, the ids given to the dispatch.
    topk_weights: `f32[T, K]` router weights.
    handle: `LowLatencyDispatched.handle`.
    zero_copy: NVSHMEM puts read `y` in place instead of a copy staged in
      the heap (a kernel option: NVLink peers never need the staging; the
      reference backend has none to skip).
    return_recv_hook: return a `RecvHook` instead of the result.

  Returns:
    `bf16[T, H]`, or a `RecvHook` that returns it. Differentiable in `y` and
    `topk_weights` without hooks.
  """
  op = "low_latency_combine"
  buffer.check_call_site(op)
  checks.handle(op, handle, LowLatencyHandle, "low_latency_dispatch",
                buffer.num_ranks)
  num_local = handle.num_experts // handle.num_ranks
  checks.array(op, "y", y, ndim=3, dtypes=(jnp.bfloat16,),
               shape=(num_local, handle.num_ranks * handle.max_tokens,
                      handle.hidden))
  checks.topk_idx(op, topk_idx, handle.num_tokens, handle.num_experts)
  checks.topk_weights(op, topk_weights, topk_idx.shape)
  if topk_weights is None:
    raise ValueError(f"jax_ep.{op}: topk_weights is required")
  if not isinstance(zero_copy, bool):
    raise TypeError(f"jax_ep.{op}: zero_copy must be a bool, got {zero_copy!r}")
  combine = _Combine(buffer.low_latency_backend(op), zero_copy)
  if return_recv_hook:
    y, topk_weights = no_gradient((y, topk_weights), _HOOK_NO_GRAD.format(op=op))
    return RecvHook(combine.send(y, topk_idx, topk_weights, handle), combine)
  return _ll_combine(combine, y, topk_idx, topk_weights, handle)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ll_combine(combine, y, topk_idx, topk_weights, handle):
  return _weighted_combine(combine, y, topk_idx, topk_weights, handle)


def _ll_combine_fwd(combine, y, topk_idx, topk_weights, handle):
  out = _ll_combine(combine, y, topk_idx, topk_weights, handle)
  return out, (y, topk_idx, topk_weights, handle)


def _ll_combine_bwd(combine, residual, g):
  y, topk_idx, topk_weights, handle = residual
  d_y, d_weights = _combine_grads(combine, g, y, topk_idx, topk_weights,
                                  handle)
  return d_y, None, d_weights, None


def _combine_grads(combine: _Combine, g, y, topk_idx, topk_weights,
                   handle: LowLatencyHandle):
  """Cotangents of `y` and `topk_weights` from three low-latency ops on the
  combine's own backend, so no XLA collective runs (ranks may share a GPU):

  1. a bf16 dispatch of `g` puts `g[t]` at the forward's slots (the packing
     is deterministic, so the slots agree);
  2. a dispatch of each token's weights and expert ids, their bits carried
     in bf16 columns, tells each slot its token's routing: there
     `d_y = bf16(g[t] * w_sum)`, `w_sum` the fp32 sum in k order of the
     token's weights for that expert, and the dot `<g[t], y[slot]>` is taken
     in fp32;
  3. a combine brings the dots home: each dot, split into three bf16 pieces
     that sum back to it exactly, goes in the columns of every k choosing
     that expert, with weight 1 on each expert's first k. Every column gets
     one term, so the combine's fp32 sums are exact.
  """
  num_tokens, topk = topk_idx.shape
  num_local, slots, _ = y.shape
  send = _DispatchSend(combine.backend, handle.num_ranks, handle.num_experts,
                       handle.max_tokens, False, False, False)

  def dispatch(rows):
    receive = _DispatchReceive(send, num_tokens, topk, rows.shape[1], True)
    return receive.whole(rows, topk_idx).x

  g_at_slots = dispatch(g)
  # One low-latency op at a time: the second dispatch starts once the first
  # has landed.
  routing, g_at_slots = lax.optimization_barrier(
      (_bits_as_bf16(topk_weights, topk_idx), g_at_slots))
  slot_routing = dispatch(routing)
  slot_weights = _bf16_as_bits(slot_routing[..., :2 * topk], jnp.float32)
  slot_ids = _bf16_as_bits(slot_routing[..., 2 * topk:4 * topk], jnp.int32)
  expert = (lax.axis_index(combine.backend.axis_name) * num_local +
            jnp.arange(num_local))
  chosen = ((slot_ids == expert[:, None, None]) &
            (handle.src_index < slots)[..., None])  # [L, S, K]
  g_at_slots = g_at_slots.astype(jnp.float32)
  w_sum = jnp.where(chosen, slot_weights, 0.0).sum(-1)
  d_y = (g_at_slots * w_sum[..., None]).astype(y.dtype)

  dots = jnp.einsum("lsh,lsh->ls", g_at_slots, y.astype(jnp.float32))
  pieces = jnp.where(chosen[..., None], _exact_bf16_pieces(dots)[:, :, None],
                     0).reshape(num_local, slots, 3 * topk)
  summed = _weighted_combine(
      combine, _pad_columns(pieces.astype(jnp.bfloat16)), topk_idx,
      _first_selections(topk_idx),
      dataclasses.replace(handle, hidden=_padded_columns(3 * topk)))
  summed = summed[:, :3 * topk].astype(jnp.float32).reshape(num_tokens, topk, 3)
  return d_y, summed[..., 0] + (summed[..., 1] + summed[..., 2])


def _padded_columns(n: int) -> int:
  """The low-latency kernels move rows of a multiple of 8 bf16 (16 bytes)."""
  return -(-n // 8) * 8


def _pad_columns(rows):
  width = rows.shape[-1]
  pad = [(0, 0)] * (rows.ndim - 1) + [(0, _padded_columns(width) - width)]
  return jnp.pad(rows, pad)


def _bits_as_bf16(*arrays):
  """`[T, K]` 32-bit arrays as bf16 columns `[T, pad8(2K + 2K + ...)]`."""
  columns = [lax.bitcast_convert_type(a, jnp.bfloat16).reshape(a.shape[0], -1)
             for a in arrays]
  return _pad_columns(jnp.concatenate(columns, axis=-1))


def _bf16_as_bits(columns, dtype):
  """Inverse of `_bits_as_bf16` for one array: `[..., 2K]` bf16 -> `[..., K]`."""
  return lax.bitcast_convert_type(
      columns.reshape(*columns.shape[:-1], -1, 2), dtype)


def _exact_bf16_pieces(x):
  """`f32[...]` -> `f32[..., 3]` of bf16 values with `p0 + (p1 + p2) == x`.

  Each piece holds the next 8 bits of the 24-bit significand, cut by masking
  the f32 bits: a round trip through a bf16 convert would not do, because
  XLA's GPU compiler drops f32 -> bf16 -> f32 pairs as excess precision
  (--xla_allow_excess_precision, on by default), which left the dots
  rounded to bf16 on the GPU. Exact for |x| from about 2^-100 (below, the
  last piece can fall under the smallest normal bf16, which XLA may flush)
  to f32's largest finite value; inf and NaN go whole in the first piece.
  """
  def top_bits(v):  # the bf16 value with v's sign, exponent and 7 top bits
    bits = lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return lax.bitcast_convert_type(bits, jnp.float32)
  finite = jnp.isfinite(x)
  hi = jnp.where(finite, top_bits(x), x)
  rest = jnp.where(finite, x - hi, 0.0)
  mid = top_bits(rest)
  return jnp.stack([hi, mid, rest - mid], axis=-1)


_ll_combine.defvjp(_ll_combine_fwd, _ll_combine_bwd)
