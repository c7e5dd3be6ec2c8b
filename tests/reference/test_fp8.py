"""per_token_cast_to_fp8 / per_token_cast_back against the dense model.

The cast is part of the contract (docs/contract.md, jax_ep/_src/fp8.py): every
fp8 path must produce the same bits, eager or jitted, so scales and values are
compared exactly, and the round trip is checked against e4m3's error bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dense_model as dm
import jax_ep
from ep_testing import BF16, assert_same, context, normal
from gpu_testing import NEEDS_GPU
from jax_ep._src import fp8

F32 = np.float32
MODES = {
    "plain": dict(),
    "round_scale": dict(round_scale=True),
    "ue8m0": dict(use_ue8m0=True),
    "round_scale_ue8m0": dict(round_scale=True, use_ue8m0=True),
}


def spread(rng, shape, dtype):
  """Rows with magnitudes from 2^-20 to 2^14 per 128-channel group, a zero
  group and a group below the amax floor."""
  scale = np.exp2(rng.integers(-20, 15, size=(*shape[:-1], shape[-1] // 128,
                                             1))).astype(F32)
  x = (normal(rng, (*shape[:-1], shape[-1] // 128, 128)) * scale)
  x = x.reshape(shape)
  x.reshape(-1, 128)[0] = 0.0
  x.reshape(-1, 128)[1] = normal(rng, (128,)) * F32(1e-6)
  return x.astype(dtype)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [BF16, np.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("mode", list(MODES))
def test_cast_matches_dense_model(seed, rng, mode, dtype, jit):
  x = spread(rng, (3, 7, 1024), dtype)
  cast = lambda x: jax_ep.per_token_cast_to_fp8(x, **MODES[mode])
  q, s = (jax.jit(cast) if jit else cast)(jnp.asarray(x))
  want_q, want_s = dm.per_token_cast_to_fp8(x, **MODES[mode])
  ctx = context(seed, mode=mode, dtype=dtype, jit=jit)
  assert_same(np.asarray(s), want_s, "scales", ctx)
  assert_same(np.asarray(q), want_q, "q", ctx)


def _scales_to_invert(rng) -> np.ndarray:
  """Every mantissa at the exponents of 2^-23, 1 and 2^100 (the casts'
  scales sit between 2^-23 and 2^30), then random normal values."""
  mantissas = np.arange(1 << 23, dtype=np.uint32)
  exact = [((np.uint32(127 + e) << 23) | mantissas).view(F32)
           for e in (-23, 0, 100)]
  random = (np.abs(normal(rng, (1 << 22,))) *
            np.exp2(rng.integers(-120, 120, 1 << 22)).astype(F32)).astype(F32)
  return np.concatenate(exact + [random[random > np.finfo(F32).tiny]])


@pytest.mark.parametrize("platform", [
    "cpu", pytest.param("gpu", marks=NEEDS_GPU)])
def test_reciprocal_is_correctly_rounded(rng, platform):
  """The cast's `1 / scale` is IEEE's on every backend (XLA's f32 division
  on GPUs is not: it differed in 2,168,081 of 16M on an H200)."""
  scales = _scales_to_invert(rng)
  on_device = jax.device_put(scales, jax.devices(platform)[0])
  got = np.asarray(jax.jit(fp8._reciprocal)(on_device))  # pylint: disable=protected-access
  want = F32(1) / scales
  bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
  assert bad.size == 0, (
      f"{bad.size} of {scales.size} reciprocals differ on {platform}, e.g. "
      f"1/{scales[bad[0]]!r}: got {got[bad[0]]!r}, want {want[bad[0]]!r}")


def _values_to_round(rng) -> np.ndarray:
  """Every finite e4m3 value and every midpoint between neighbours, each
  with its f32 neighbours (ties and near-ties), the tie past 448, zeros and
  f32's tiniest, then random values from 2^-14 to 2^8."""
  grid = np.arange(256, dtype=np.uint8).view(fp8.FP8_DTYPE).astype(F32)
  grid = np.sort(grid[np.isfinite(grid)])
  special = np.array([460, 464, -464, 0, -0.0, 1e-30, -1e-30], F32)
  bits = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, special]).view(
      np.uint32)
  near = np.concatenate([bits - 1, bits, bits + 1]).view(F32)
  near = near[np.abs(near) <= 464]  # past 464 e4m3 has NaN (0 - 1 ulp too)
  random = normal(rng, (1 << 22,)) * np.exp2(
      rng.integers(-14, 9, 1 << 22)).astype(F32)
  return np.concatenate([near, random]).astype(F32)


@pytest.mark.parametrize("platform", [
    "cpu", pytest.param("gpu", marks=NEEDS_GPU)])
def test_e4m3_rounding_is_nearest_even(rng, platform):
  """XLA's f32 -> e4m3 convert, which the cast uses, rounds to nearest even
  on every backend, as the kernels' cvt.rn does."""
  values = _values_to_round(rng)
  on_device = jax.device_put(values, jax.devices(platform)[0])
  got = np.asarray(jax.jit(lambda v: v.astype(fp8.FP8_DTYPE))(on_device))
  want = values.astype(fp8.FP8_DTYPE)
  bad = np.flatnonzero(got.view(np.uint8) != want.view(np.uint8))
  assert bad.size == 0, (
      f"{bad.size} of {values.size} values round differently on {platform}, "
      f"e.g. {values[bad[0]]!r}: got {got[bad[0]]!r}, want {want[bad[0]]!r}")


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_scale_is_amax_times_inverse_448(jit, rows):
  """amax = 6304: amax / 448 and amax * f32(1/448) round differently.

  fp8.py specifies the product (the same bits on every path, kernels
  included), eager or jitted, whatever the shape: an eager division used to
  give the quotient for one row and the product (XLA's rewrite) for several.
  """
  x = np.zeros((rows, 128), F32)
  x[:, 0] = 6304.0  # 0x1.8ap+12
  want = F32(6304.0) * (F32(1.0) / F32(448.0))
  assert want != F32(6304.0) / F32(448.0)  # the case is a probe
  cast = jax.jit(jax_ep.per_token_cast_to_fp8) if jit else \
      jax_ep.per_token_cast_to_fp8
  got = np.asarray(cast(jnp.asarray(x))[1])
  assert_same(got[:, 0], np.full(rows, want), "scale",
              f"amax=6304, jit={jit}, rows={rows}")


@pytest.mark.parametrize("mode", list(MODES))
def test_cast_back_matches_dense_model(seed, rng, mode):
  x = spread(rng, (5, 512), np.float32)
  q, s = dm.per_token_cast_to_fp8(x, **MODES[mode])
  ctx = context(seed, mode=mode)
  for dtype in (BF16, np.float32):
    got = np.asarray(jax_ep.per_token_cast_back(jnp.asarray(q), jnp.asarray(s),
                                                dtype=dtype))
    assert_same(got, dm.per_token_cast_back(q, s, dtype), f"back {dtype}", ctx)


@pytest.mark.parametrize("mode", list(MODES))
def test_round_trip_error_bound(seed, rng, mode):
  """|x - back(cast(x))| <= |x| / 16 + scale / 1024 (e4m3: 3 mantissa bits,
  subnormal step 2^-9), and the amax of each group maps to <= 448."""
  x = spread(rng, (6, 512), np.float32)
  q, s = jax.jit(lambda x: jax_ep.per_token_cast_to_fp8(x, **MODES[mode]))(x)
  back = np.asarray(jax_ep.per_token_cast_back(q, s, dtype=jnp.float32))
  scale = np.asarray(s)
  if scale.dtype == np.int32:
    scale = dm.ue8m0_unpack(scale)
  per_elem = np.repeat(scale, 128, axis=-1).astype(np.float64)
  err = np.abs(back.astype(np.float64) - x)
  # Half an e4m3 step (2^-4 relative, 2^-10 absolute below 2^-6), widened
  # by 2^-12 for the f32 roundings of 1/scale, x * (1/scale) and q * scale.
  bound = (np.abs(x) * 2.0**-4 + per_elem * 2.0**-10) * (1 + 2.0**-12)
  ctx = context(seed, mode=mode)
  assert (err <= bound).all(), (
      f"round trip [{ctx}]: worst excess {np.max(err - bound)} at "
      f"{np.unravel_index(np.argmax(err - bound), err.shape)}")
  assert np.isfinite(np.asarray(q).astype(F32)).all(), ctx
  assert (np.abs(np.asarray(q).astype(F32)) <= 448).all(), ctx
  if mode != "plain":  # powers of two
    mantissa, _ = np.frexp(scale)
    assert (mantissa == 0.5).all(), ctx
  big = np.abs(x).reshape(6, 4, 128).max(-1) > 1e-4
  amax_q = np.abs(np.asarray(q).astype(F32)).reshape(6, 4, 128).max(-1)
  if mode == "plain":  # amax itself lands on (or next to) 448
    assert (amax_q[big] >= 416).all(), ctx
  else:
    assert (amax_q[big] >= 208).all(), ctx


def test_ue8m0_holds_the_round_scale_exponents(seed, rng):
  x = jnp.asarray(spread(rng, (4, 1024), np.float32))
  q1, s1 = jax_ep.per_token_cast_to_fp8(x, round_scale=True)
  q2, s2 = jax_ep.per_token_cast_to_fp8(x, use_ue8m0=True)
  ctx = context(seed)
  assert_same(np.asarray(q2), np.asarray(q1), "q", ctx)
  assert s2.dtype == jnp.int32 and s2.shape == (4, 2), ctx
  assert_same(dm.ue8m0_unpack(np.asarray(s2)), np.asarray(s1), "scales", ctx)
  assert_same(np.asarray(s2), dm.ue8m0_pack(np.asarray(s1)), "packed", ctx)


@pytest.mark.parametrize("hidden,kwargs,limit", [
    (64, {}, 128), (200, {}, 128), (256, dict(use_ue8m0=True), 512),
    (640, dict(use_ue8m0=True), 512)])
def test_cast_rejects_bad_hidden(hidden, kwargs, limit):
  with pytest.raises(ValueError, match=rf"per_token_cast_to_fp8: the hidden "
                     rf"size must be a multiple of {limit} for fp8.*got {hidden}"):
    jax_ep.per_token_cast_to_fp8(jnp.ones((2, hidden)), **kwargs)


def test_cast_back_rejects_bad_scales():
  q, s = jax_ep.per_token_cast_to_fp8(jnp.ones((2, 256)))
  with pytest.raises(TypeError, match="scales must be float32 or packed UE8M0 "
                     "int32, got bfloat16"):
    jax_ep.per_token_cast_back(q, s.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"scales \(2, 1\) do not match q "
                     r"\(2, 256\) \(one scale per 128 channels\)"):
    jax_ep.per_token_cast_back(q, s[:, :1])
