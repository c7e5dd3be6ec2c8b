"""Normal (training / prefill) dispatch and combine: API, checks, autodiff.

The backward of dispatch is combine with the handle, the backward of combine
is a cached dispatch, for the rows and for the top-k weights
(docs/contract.md, "Autodiff").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jax_ep._src import checks
from jax_ep._src.backend import NormalBackend
from jax_ep._src.fp8 import FP8_DTYPE, GROUP
from jax_ep._src.handles import DispatchHandle, Dispatched
from jax_ep._src.nograd import no_gradient
from jax_ep._src.runtime import Buffer


@dataclasses.dataclass(frozen=True)
class _Route:
  """Static parameters of one dispatch, shared by its forward and backward."""
  backend: NormalBackend
  num_ranks: int
  num_experts: int
  capacity: int
  expert_alignment: int


def _token_rows(op: str, x) -> tuple[tuple[jax.Array, ...], bool]:
  """Validates bf16/f16/f32 `x[T, H]` or fp8 `(e4m3[T, H], f32[T, H/128])`."""
  if isinstance(x, (tuple, list)):
    if len(x) != 2:
      raise TypeError(
          f"jax_ep.{op}: fp8 x must be a pair (e4m3[T, H], f32 scales"
          f"[T, H/{GROUP}]), got a sequence of {len(x)}")
    q, scales = x
    checks.array(op, "x[0] (fp8 rows)", q, ndim=2, dtypes=(FP8_DTYPE,))
    if q.shape[1] % GROUP:
      raise ValueError(
          f"jax_ep.{op}: fp8 x has hidden size {q.shape[1]}; it must be a "
          f"multiple of {GROUP}")
    checks.array(op, "x[1] (fp8 scales)", scales, ndim=2,
                 dtypes=(jnp.float32,), shape=(q.shape[0], q.shape[1] // GROUP))
    checks.row_bytes(op, "x", q)
    return (q, scales), True
  if getattr(x, "dtype", None) == FP8_DTYPE:
    raise TypeError(
        f"jax_ep.{op}: x is float8_e4m3fn rows without their scales; fp8 x "
        f"is the pair (e4m3[T, H], f32 scales[T, H/{GROUP}]) that "
        "jax_ep.per_token_cast_to_fp8 returns")
  checks.array(op, "x", x, ndim=2, dtypes=checks.FLOAT_DTYPES)
  checks.row_bytes(op, "x", x)
  return (x,), False


def dispatch(buffer: Buffer, x, topk_idx: jax.Array | None = None,
             topk_weights: jax.Array | None = None, *,
             num_experts: int | None = None, capacity: int | None = None,
             expert_alignment: int = 1,
             handle: DispatchHandle | None = None) -> Dispatched:
  """Sends each token to every rank that holds one of its experts.

  Call inside `jax.shard_map` over `buffer.axis_name`; shapes are per rank.

  Args:
    buffer: the `jax_ep.Buffer` of the EP axis (R ranks).
    x: tokens, `bf16[T, H]` (f16 and f32 also work), or fp8
      `(float8_e4m3fn[T, H], f32 scales[T, H/128])` as made by
      `per_token_cast_to_fp8`. Rows must be a multiple of 16 bytes.
    topk_idx: `int32[T, K]` expert ids, `-1` for no selection, K <= 32. Ids
      outside `[-1, E)` select nothing (`get_dispatch_layout` counts them).
    topk_weights: optional `f32[T, K]` router weights, sent along.
    num_experts: E, a multiple of R; expert e lives on rank `e // (E/R)`.
    capacity: M, rows received per rank (static). Default `R*T`, which can
      never overflow. Rows past M are dropped, never written;
      `Dispatched.num_recv_tokens` still counts them (see `check_capacity`).
    expert_alignment: round each of `num_recv_tokens_per_expert` up to
      this.
    handle: the handle of an earlier dispatch: sends `x` along the same routes
      without routing work (a cached dispatch); then pass neither `topk_idx`
      nor `topk_weights` nor sizes, and the result carries only `x`,
      `scales`, `num_recv_tokens` and `handle`.

  Returns:
    a `Dispatched`. Differentiable in `x` (bf16/f16/f32) and `topk_weights`;
    fp8 rows are not differentiable (a gradient into them raises).
  """
  op = "dispatch"
  buffer.check_call_site(op)
  rows, fp8 = _token_rows(op, x)
  num_tokens = rows[0].shape[0]
  checks.has_tokens(op, num_tokens)
  if fp8:
    rows = no_gradient(rows, f"jax_ep.{op}: fp8 rows are not differentiable; "
                       "dispatch bf16 rows to train through dispatch")
  backend = buffer.normal_backend(op)
  if handle is not None:
    handle = checks.handle(op, handle, DispatchHandle, "dispatch",
                           buffer.num_ranks)
    if topk_idx is not None or topk_weights is not None or num_experts is not None \
        or capacity is not None or expert_alignment != 1:
      raise ValueError(
          f"jax_ep.{op}: a cached dispatch (handle=...) takes only x; "
          "topk_idx, topk_weights, num_experts, capacity and expert_alignment "
          "come from the handle")
    if num_tokens != handle.num_tokens:
      raise ValueError(
          f"jax_ep.{op}: x has {num_tokens} tokens but the handle was made for "
          f"{handle.num_tokens}")
    recv = _cached_dispatch(backend, rows, handle)
    return Dispatched(recv[0], recv[1] if fp8 else None, None, None,
                      handle.num_recv_tokens, None, handle)

  if topk_idx is None or num_experts is None:
    raise ValueError(
        f"jax_ep.{op}: a fresh dispatch needs topk_idx and num_experts "
        "(or pass handle= for a cached dispatch)")
  num_ranks = buffer.num_ranks
  num_experts = checks.experts(op, num_experts, num_ranks)
  num_topk = checks.topk_idx(op, topk_idx, num_tokens, num_experts)
  checks.topk_weights(op, topk_weights, (num_tokens, num_topk))
  capacity = num_ranks * num_tokens if capacity is None else capacity
  capacity = checks.positive_int(op, "capacity", capacity)
  expert_alignment = checks.positive_int(op, "expert_alignment",
                                         expert_alignment)
  route = _Route(backend, num_ranks, num_experts, capacity, expert_alignment)
  recv, recv_idx, recv_weights, per_expert, handle = _dispatch(
      route, rows, topk_idx, topk_weights)
  mesh = buffer.mesh
  if mesh.axis_types[mesh.axis_names.index(buffer.axis_name)] == (
      jax.sharding.AxisType.Explicit):
    handle = dataclasses.replace(handle, explicit_axis=True)
  return Dispatched(recv[0], recv[1] if fp8 else None, recv_idx, recv_weights,
                    handle.num_recv_tokens, per_expert, handle)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(route: _Route, rows, topk_idx, topk_weights):
  return route.backend.dispatch(
      rows, topk_idx, topk_weights, num_ranks=route.num_ranks,
      num_experts=route.num_experts, capacity=route.capacity,
      expert_alignment=route.expert_alignment)


def _dispatch_fwd(route, rows, topk_idx, topk_weights):
  out = _dispatch(route, rows, topk_idx, topk_weights)
  _, recv_idx, _, _, handle = out
  return out, (handle, recv_idx)


def _dispatch_bwd(route, residual, g):
  handle, recv_idx = residual
  g_rows, _, g_weights, _, _ = g
  d_rows = _rows_cotangent(route.backend, g_rows, handle)
  d_weights = None
  if g_weights is not None:
    d_weights = route.backend.combine(
        jnp.where(recv_idx >= 0, g_weights, 0.0), handle, None, jnp.float32)
  return d_rows, None, d_weights


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def _rows_cotangent(backend: NormalBackend, g_rows, handle):
  """Combine of the received rows' cotangent; fp8 rows (q, scales) get none:
  `no_gradient` has refused any gradient that would need it."""
  if len(g_rows) == 2:
    return (None, None)
  return (backend.combine(g_rows[0], handle, None, g_rows[0].dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cached_dispatch(backend: NormalBackend, rows, handle):
  return backend.cached_dispatch(rows, handle)


def _cached_dispatch_fwd(backend, rows, handle):
  return backend.cached_dispatch(rows, handle), handle


def _cached_dispatch_bwd(backend, handle, g):
  return _rows_cotangent(backend, g, handle), None


_cached_dispatch.defvjp(_cached_dispatch_fwd, _cached_dispatch_bwd)


def _biases(op: str, bias, shape) -> tuple[jax.Array, ...]:
  if bias is None:
    return ()
  biases = tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
  for i, b in enumerate(biases):
    checks.array(op, f"bias[{i}]" if len(biases) > 1 else "bias", b, ndim=2,
                 dtypes=checks.FLOAT_DTYPES, shape=shape)
  return biases


def combine(buffer: Buffer, y: jax.Array, handle: DispatchHandle,
            topk_weights: jax.Array | None = None,
            bias: jax.Array | Sequence[jax.Array] | None = None):
  """Brings expert outputs back to their tokens and sums them.

  `out[t] = sum over ranks r that received t of y_r[row of t on r] + bias[t]`,
  accumulated in fp32 in rank order and rounded once to `y.dtype`: bitwise
  repeatable, the same bits on every backend. The sum starts at rank 0's term
  (a rank that did not receive t adds +0), so at R = 1 a -0 stays -0.
  Combine does not apply expert weights: weight each row first.

  Args:
    buffer: the `jax_ep.Buffer` the dispatch ran on.
    y: `[M, H]` rows in the order dispatch delivered them (bf16; f16/f32 also
      work). Padding rows are ignored.
    handle: `Dispatched.handle`.
    topk_weights: optional `f32[M, K]` per-row weights, summed the same way
      (in fp32), which makes combine the transpose of dispatch for weights.
    bias: optional `[T, H]` array, or a sequence of them, added in fp32
      before rounding.

  Returns:
    `out[T, H]` in `y.dtype`, or `(out, f32[T, K] weights)` when
    `topk_weights` is given. Differentiable in `y`, `topk_weights`, `bias`.
  """
  op = "combine"
  buffer.check_call_site(op)
  handle = checks.handle(op, handle, DispatchHandle, "dispatch",
                         buffer.num_ranks)
  checks.array(op, "y", y, ndim=2, dtypes=checks.FLOAT_DTYPES,
               shape=(handle.capacity, None))
  checks.row_bytes(op, "y", y)
  checks.topk_weights(op, topk_weights, (handle.capacity, None))
  biases = _biases(op, bias, (handle.num_tokens, y.shape[1]))
  # Biases enter in fp32, so autodiff casts their cotangent back by itself.
  bias_sum = sum(b.astype(jnp.float32) for b in biases) if biases else None
  out, out_weights = _combine(buffer.normal_backend(op), y, handle,
                              topk_weights, bias_sum)
  return out if topk_weights is None else (out, out_weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(backend: NormalBackend, y, handle, topk_weights, bias):
  out = backend.combine(y, handle, bias, y.dtype)
  out_weights = None
  if topk_weights is not None:
    out_weights = backend.combine(topk_weights, handle, None, jnp.float32)
  return out, out_weights


def _combine_fwd(backend, y, handle, topk_weights, bias):
  # The bias's presence travels as a None/array leaf: residuals hold no bools.
  bias_marker = None if bias is None else jnp.zeros((), jnp.float32)
  return (_combine(backend, y, handle, topk_weights, bias),
          (handle, bias_marker))


def _combine_bwd(backend, residual, g):
  handle, bias_marker = residual
  g_out, g_weights = g
  d_y, = backend.cached_dispatch((g_out,), handle)
  d_weights = None
  if g_weights is not None:
    d_weights, = backend.cached_dispatch((g_weights,), handle)
  d_bias = None if bias_marker is None else g_out.astype(jnp.float32)
  return d_y, None, d_weights, d_bias


_combine.defvjp(_combine_fwd, _combine_bwd)


def check_capacity(dispatched: Dispatched | DispatchHandle) -> None:
  """Turns a capacity overflow into an error, under `checkify.checkify`.

  Call it on a `Dispatched` (or its handle) inside the checkified function;
  `checkify.checkify(f)(...)` then returns an error naming the true row count
  and the capacity when rows were dropped. With jax 0.11, checkify works
  through `shard_map` over mesh axes of type `AxisType.Auto` only: an
  `Explicit` axis (`jax.make_mesh`'s default) is refused with a ValueError
  that says so, and under `jax.set_mesh` JAX's own error is all there is.
  """
  handle = getattr(dispatched, "handle", dispatched)
  if handle.explicit_axis:
    raise ValueError(
        "jax_ep.check_capacity: the Buffer's mesh axis is of type "
        "AxisType.Explicit (jax.make_mesh's default), and checkify cannot "
        "report an error out of shard_map over such axes (jax 0.11). Make "
        "the mesh with axis_types=(jax.sharding.AxisType.Auto,), or compare "
        "dispatched.num_recv_tokens with the capacity yourself")
  checkify.check(
      handle.num_recv_tokens <= handle.capacity,
      "jax_ep.dispatch: {count} rows were sent to this rank but capacity is "
      f"{handle.capacity}; rows past the capacity were dropped. Raise capacity",
      count=handle.num_recv_tokens)
