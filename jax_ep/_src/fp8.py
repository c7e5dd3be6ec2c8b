"""Per-token FP8 (e4m3) casts with one scale per 128 channels.

The cast every fp8 path uses, kernels included, bit for bit:
  amax  = max(|x|) over the 128 channels, floored at 1e-4
  scale = amax * f32(1 / 448)   (448 is the largest e4m3 value; a product,
                                 not a division: XLA rewrites division by a
                                 constant into this product anyway)
  with round_scale: scale = the next power of two >= scale
  q     = e4m3(x * (1 / scale)) (round to nearest even)
With UE8M0 the (power-of-two) scales travel as their biased exponent bytes,
four channel groups packed little-endian into one int32.

The arithmetic is IEEE f32, as in the kernels and the tests' dense model,
`1 / scale` correctly rounded included. XLA's f32 division on GPUs is not
correctly rounded (on an H200 it differed from IEEE in 2,168,081 of 16M
reciprocals, scripts/fp8_cast_probe.py), so this module computes the
reciprocal by exact integer division (`_reciprocal`) on every backend. A
bf16 or f16 `x` is rounded to its dtype again before the cast
(`_exactly_f32`): inside a larger GPU program XLA may skip the rounding of
an f32 -> bf16 convert, and the DeepSeek-V3 layer's fp8 cast then saw
unrounded values (issue 17).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128  # channels per scale
AMAX_FLOOR = 1e-4
_UE8M0_PER_WORD = 4


def _round_up_pow2(scale: jax.Array) -> jax.Array:
  """Smallest power of two >= scale, exactly (scale is a positive normal f32)."""
  bits = lax.bitcast_convert_type(scale, jnp.uint32)
  exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
  return lax.bitcast_convert_type(exponent << 23, jnp.float32)


def _reciprocal(scale: jax.Array) -> jax.Array:
  """`1 / scale`, correctly rounded (scale a positive normal f32), on every
  backend: the mantissa quotient 2^47 / m by 24 steps of restoring integer
  division, rounded to nearest (a tie would need m to divide 2^48, i.e. a
  power of two, whose reciprocal is exact). Other values take XLA's division.
  """
  bits = lax.bitcast_convert_type(scale, jnp.uint32)
  biased = bits >> 23
  mantissa = (bits & 0x7FFFFF) | 0x800000
  remainder = jnp.full_like(bits, 1 << 23)
  quotient = jnp.zeros_like(bits)
  for _ in range(24):
    remainder = remainder << 1
    bit = remainder >= mantissa
    remainder = jnp.where(bit, remainder - mantissa, remainder)
    quotient = (quotient << 1) | bit.astype(jnp.uint32)
  quotient = quotient + (2 * remainder > mantissa).astype(jnp.uint32)
  # 1 / 2^k (mantissa 2^23) is 2^24 in these units; the sum below carries a
  # quotient that rounded up to 2^24 into the exponent.
  quotient = jnp.where(mantissa == 0x800000, jnp.uint32(1 << 24), quotient)
  exact = ((jnp.uint32(253) - biased) << 23) + quotient - jnp.uint32(1 << 23)
  normal = (biased >= 1) & (biased <= 252)
  return jnp.where(normal, lax.bitcast_convert_type(exact, jnp.float32),
                   1.0 / scale)


def _exactly_f32(x: jax.Array) -> jax.Array:
  """`x` in f32 with no more precision than its own dtype. XLA (its default
  xla_allow_excess_precision) may drop a f32 -> bf16 -> f32 round trip, so a
  bf16 `x` made by converting f32 values can reach the cast unrounded inside
  a larger program; reduce_precision rounds it again (a no-op on values
  already in the dtype)."""
  wide = x.astype(jnp.float32)
  if x.dtype not in (jnp.bfloat16, jnp.float16):  # IEEE-like narrower types
    return wide
  info = jnp.finfo(x.dtype)
  return lax.reduce_precision(wide, exponent_bits=info.nexp,
                              mantissa_bits=info.nmant)


def _pack_ue8m0(scale: jax.Array) -> jax.Array:
  exponent = lax.bitcast_convert_type(scale, jnp.uint32) >> 23
  exponent = exponent.reshape(*exponent.shape[:-1], -1, _UE8M0_PER_WORD)
  shifts = jnp.arange(_UE8M0_PER_WORD, dtype=jnp.uint32) * 8
  word = jnp.bitwise_or.reduce(exponent << shifts, axis=-1)
  return lax.bitcast_convert_type(word, jnp.int32)


def _unpack_ue8m0(packed: jax.Array) -> jax.Array:
  word = lax.bitcast_convert_type(packed, jnp.uint32)
  shifts = jnp.arange(_UE8M0_PER_WORD, dtype=jnp.uint32) * 8
  exponent = (word[..., None] >> shifts) & 0xFF
  exponent = exponent.reshape(*packed.shape[:-1], -1)
  return lax.bitcast_convert_type(exponent << 23, jnp.float32)


def check_fp8_hidden(op: str, hidden: int, use_ue8m0: bool) -> None:
  group = GROUP * (_UE8M0_PER_WORD if use_ue8m0 else 1)
  if hidden % group:
    raise ValueError(
        f"jax_ep.{op}: the hidden size must be a multiple of {group} for fp8"
        f"{' with UE8M0 scales' if use_ue8m0 else ''}, got {hidden}")


def per_token_cast_to_fp8(x: jax.Array, *, round_scale: bool = False,
                          use_ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
  """Casts `x[..., H]` to e4m3 with one scale per token per 128 channels.

  Args:
    x: float array whose last axis (H) is a multiple of 128 (512 with UE8M0).
    round_scale: round each scale up to a power of two.
    use_ue8m0: return the scales as packed UE8M0 exponents (implies
      `round_scale`).

  Returns:
    `(q, scales)`: `q` float8_e4m3fn[..., H]; `scales` f32[..., H/128] such
    that `x ~= q * scales` per group, or int32[..., H/512] with UE8M0.
  """
  check_fp8_hidden("per_token_cast_to_fp8", x.shape[-1], use_ue8m0)
  groups = _exactly_f32(x).reshape(*x.shape[:-1], -1, GROUP)
  amax = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1), AMAX_FLOOR)
  scale = amax * jnp.float32(1.0 / FP8_MAX)
  if round_scale or use_ue8m0:
    scale = _round_up_pow2(scale)
  q = (groups * _reciprocal(scale)[..., None]).astype(FP8_DTYPE).reshape(
      x.shape)
  return q, (_pack_ue8m0(scale) if use_ue8m0 else scale)


def per_token_cast_back(q: jax.Array, scales: jax.Array,
                        dtype=jnp.bfloat16) -> jax.Array:
  """Inverse of `per_token_cast_to_fp8`: `q * scale` per group, in `dtype`.

  `scales` is f32[..., H/128], or packed UE8M0 int32[..., H/512].
  """
  if scales.dtype == jnp.int32:
    scales = _unpack_ue8m0(scales)
  elif scales.dtype != jnp.float32:
    raise TypeError(
        "jax_ep.per_token_cast_back: scales must be float32 or packed UE8M0 "
        f"int32, got {scales.dtype}")
  if scales.shape[-1] * GROUP != q.shape[-1]:
    raise ValueError(
        f"jax_ep.per_token_cast_back: scales {scales.shape} do not match "
        f"q {q.shape} (one scale per {GROUP} channels)")
  groups = q.astype(jnp.float32).reshape(*q.shape[:-1], -1, GROUP)
  return (groups * scales[..., None]).reshape(q.shape).astype(dtype)
