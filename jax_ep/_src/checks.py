"""Trace-time argument checks shared by the ops.

Every failure names the op, the argument, what was expected and what came.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# The API's bound on K, on every backend (docs/contract.md): the kernels'
# kMaxTopk (csrc/common/limits.h), which a test holds equal. A Python constant
# so that the reference backend checks it without the compiled sizes module.
MAX_TOPK = 32
ROW_ALIGN_BYTES = 16  # rows move in 16-byte vectors
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                jnp.dtype(jnp.float32))


def _describe(x) -> str:
  return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def array(op: str, name: str, x, *, ndim: int, dtypes, shape=None) -> None:
  """Checks rank, dtype and (where given, None = any) dims of an array."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"jax_ep.{op}: {name} must be an array, got {type(x)}")
  dtypes = tuple(jnp.dtype(d) for d in dtypes)
  if x.ndim != ndim:
    raise ValueError(
        f"jax_ep.{op}: {name} must have {ndim} dimensions, got {_describe(x)}")
  if jnp.dtype(x.dtype) not in dtypes:
    raise TypeError(
        f"jax_ep.{op}: {name} must have dtype in "
        f"{[d.name for d in dtypes]}, got {_describe(x)}")
  if shape is not None:
    for axis, (want, got) in enumerate(zip(shape, x.shape)):
      if want is not None and want != got:
        raise ValueError(
            f"jax_ep.{op}: {name} must have shape "
            f"{['*' if w is None else w for w in shape]}, got {_describe(x)} "
            f"(axis {axis})")


def positive_int(op: str, name: str, value) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < 1:
    raise ValueError(f"jax_ep.{op}: {name} must be a positive int, got {value!r}")
  return int(value)


def experts(op: str, num_experts, num_ranks: int) -> int:
  num_experts = positive_int(op, "num_experts", num_experts)
  if num_experts % num_ranks:
    raise ValueError(
        f"jax_ep.{op}: num_experts ({num_experts}) must be a multiple of the "
        f"EP size ({num_ranks})")
  return num_experts


def topk_idx(op: str, idx, num_tokens: int, num_experts: int) -> int:
  """Checks int32[T, K] ids; returns K."""
  array(op, "topk_idx", idx, ndim=2, dtypes=(jnp.int32,),
        shape=(num_tokens, None))
  k = idx.shape[1]
  if not 1 <= k <= min(MAX_TOPK, num_experts):
    raise ValueError(
        f"jax_ep.{op}: topk_idx has K={k} columns; K must be in "
        f"[1, {min(MAX_TOPK, num_experts)}] (at most {MAX_TOPK} and at most "
        f"num_experts={num_experts})")
  return k


def topk_weights(op: str, weights, shape) -> None:
  if weights is not None:
    array(op, "topk_weights", weights, ndim=2, dtypes=(jnp.float32,),
          shape=shape)


def row_bytes(op: str, name: str, x, align: int = ROW_ALIGN_BYTES) -> None:
  nbytes = x.shape[-1] * jnp.dtype(x.dtype).itemsize
  if nbytes % align:
    raise ValueError(
        f"jax_ep.{op}: a row of {name} is {nbytes} bytes ({_describe(x)}); "
        f"rows must be a multiple of {align} bytes")


def handle(op: str, value, cls: type, producer: str, num_ranks: int):
  """Checks that `value` is a `cls` made by `producer` for `num_ranks` ranks."""
  if not isinstance(value, cls):
    raise TypeError(
        f"jax_ep.{op}: handle must be the {cls.__name__} of a {producer}, got "
        f"{type(value)}")
  if value.num_ranks != num_ranks:
    raise ValueError(
        f"jax_ep.{op}: handle is for {value.num_ranks} ranks, the Buffer for "
        f"{num_ranks}")
  return value


def has_tokens(op: str, num_tokens: int) -> None:
  """Rejects T = 0: shard shapes are static, so no rank would have work."""
  if num_tokens == 0:
    raise ValueError(
        f"jax_ep.{op}: x has no tokens (T = 0 on every rank); call it with "
        "T >= 1 or skip the layer")
