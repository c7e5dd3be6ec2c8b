"""Probe: does XLA on this machine compute jax_ep's fp8 cast (fp8.py) the
way the low-latency kernels do: `1 / scale` correctly rounded, and f32 ->
e4m3 rounded to nearest even? Prints, per backend, how many reciprocals
differ from IEEE division and how many conversions differ from ml_dtypes.

Written for the one-in-3e7 fp8 mismatch of the low-latency repeat test
(issue 4): the kernels use IEEE division and the hardware cvt; a GPU backend
whose division is approximate would explain it. Run on an H200 (jax 0.11.2,
2026-11-23): XLA's GPU `1/s` differed from IEEE in 2,168,081 of 16,000,000,
its f32 -> e4m3 in 0; the CPU's in 0 and 0. fp8.py now computes the
reciprocal exactly (`_reciprocal`).

Then `jax_ep.per_token_cast_to_fp8` itself on bf16 rows, as the MoE
example's fp8 dispatch calls it, in several GPU programs (alone, fused with
the f32 -> bf16 convert, eagerly) against the CPU's: how many e4m3 values
and scales differ, and the first few that do; then the same for the cast
without `_exactly_f32`'s rounding of bf16 input. Written for the DeepSeek-V3
layer's GPU test (issue 17), whose fp8 output on random bf16 rows differed
from the dense layer's in 1.7% of the elements (by up to 0.086). On an
H200 (2026-12-02) every program matched the CPU: these small programs keep
the f32 -> bf16 rounding; the layer's did not (XLA's excess precision:
with --xla_allow_excess_precision=false, or with `_exactly_f32`, the layer
matched).

    python3 scripts/fp8_cast_probe.py
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_ep import per_token_cast_to_fp8
from jax_ep._src import fp8

F32 = np.float32
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def main() -> None:
  rng = np.random.default_rng(0)
  n = 16_000_000
  scales = (np.abs(rng.standard_normal(n)).astype(F32) *
            np.exp2(rng.integers(-20, 20, n)).astype(F32) + F32(1e-6))
  values = np.clip(rng.standard_normal(n).astype(F32) *
                   np.exp2(rng.integers(-12, 9, n)).astype(F32), -448, 448)
  for platform in ("gpu", "cpu"):
    device = jax.devices(platform)[0]
    inverse = np.asarray(jax.jit(lambda s: 1.0 / s)(
        jax.device_put(scales, device)))
    q = np.asarray(jax.jit(lambda v: v.astype(jnp.float8_e4m3fn))(
        jax.device_put(values, device)))
    print(f"{platform}: 1/s differs from IEEE in "
          f"{np.count_nonzero(inverse != F32(1) / scales)} of {n}; f32->e4m3 "
          f"differs from ml_dtypes in "
          f"{np.count_nonzero(q.view(np.uint8) != values.astype(E4M3).view(np.uint8))}"
          f" of {n}", flush=True)

  rows = rng.standard_normal((16384, 256)).astype(F32)
  bf16 = np.asarray(jnp.asarray(rows, jnp.bfloat16))
  for cast_name, cast_fn in (("per_token_cast_to_fp8", per_token_cast_to_fp8),
                             ("the cast without _exactly_f32",
                              unrounded_cast)):
    cast = jax.jit(cast_fn)
    want_q, want_s = (np.asarray(a) for a in cast(jax.device_put(
        bf16, jax.devices("cpu")[0])))
    gpu = jax.devices("gpu")[0]
    for name, (q, s) in (
        ("alone", cast(jax.device_put(bf16, gpu))),
        ("fused with the f32 -> bf16 convert", jax.jit(
            lambda x, f=cast_fn: f(x.astype(jnp.bfloat16)))(
                jax.device_put(rows, gpu))),
        ("eagerly", cast_fn(jax.device_put(bf16, gpu)))):
      q, s = np.asarray(q), np.asarray(s)
      bad = np.argwhere(q.view(np.uint8) != want_q.view(np.uint8))
      print(f"{cast_name} of bf16 rows on the GPU, {name}: "
            f"{len(bad)} of {q.size} e4m3 values and "
            f"{np.count_nonzero(s != want_s)} of {s.size} scales differ from "
            "the CPU's", flush=True)
      for r, c in bad[:3]:
        x = F32(bf16[r, c])
        print(f"  [{r}, {c}]: x {x!r}, scale {want_s[r, c // 128]!r}, GPU "
              f"{F32(q[r, c])!r}, CPU {F32(want_q[r, c])!r}", flush=True)


def unrounded_cast(x):
  """The cast as fp8.py wrote it before `_exactly_f32`."""
  groups = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, fp8.GROUP)
  scale = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1),
                      fp8.AMAX_FLOOR) * jnp.float32(1.0 / fp8.FP8_MAX)
  q = (groups * fp8._reciprocal(scale)[..., None]).astype(fp8.FP8_DTYPE)  # pylint: disable=protected-access
  return q.reshape(x.shape), scale


if __name__ == "__main__":
  main()
