"""Shared helpers of the jax_ep tests: meshes, sharded runs, inputs, checks.

`Problem` (conftest's `problem` fixture) bundles what most tests set up: an
EP mesh of CPU ranks, a per-rank shape, and the inputs drawn for them.
"""

from __future__ import annotations

import contextlib

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from bench.shapes import Shape
from specs import SPECS

BF16 = np.dtype(ml_dtypes.bfloat16)
EP = P("ep")


def cpu_devices(n: int) -> list[jax.Device]:
  devices = jax.devices("cpu")
  if len(devices) < n:
    pytest.skip(f"needs {n} CPU devices, found {len(devices)}")
  return devices[:n]


class Ep:
  """An EP mesh of `num_ranks` CPU devices and its reference `Buffer`.

  The mesh axis is Explicit (`jax.make_mesh`'s default) unless `auto`: JAX
  0.11's checkify fails on any `checkify.check` inside `shard_map` over an
  Explicit axis (or under `jax.set_mesh`), so the `check_capacity` tests use
  an Auto axis and no mesh context.
  """

  def __init__(self, num_ranks: int, *, auto: bool = False, **buffer_kwargs):
    self.num_ranks = num_ranks
    self.auto = auto
    axis_type = jax.sharding.AxisType.Auto if auto else \
        jax.sharding.AxisType.Explicit
    self.mesh = jax.make_mesh((num_ranks,), ("ep",),
                              devices=cpu_devices(num_ranks),
                              axis_types=(axis_type,))
    buffer_kwargs.setdefault("backend", "reference")
    self.buffer = jax_ep.Buffer(self.mesh, "ep", **buffer_kwargs)

  def put(self, a, spec=EP):
    return jax.device_put(a, NamedSharding(self.mesh, spec))

  def sharded(self, body, in_specs=EP, out_specs=EP, per_rank=True):
    """jit(shard_map(body)); inputs are resharded to `in_specs` inside the jit.

    With `per_rank`, every output leaf gets a leading axis, so the global
    result has shape [R, ...]: index r is what rank r returned.
    """
    if per_rank:
      inner = lambda *a: jax.tree.map(lambda v: v[None], body(*a))
    else:
      inner = body
    mapped = jax.shard_map(inner, mesh=self.mesh, in_specs=in_specs,
                           out_specs=out_specs)
    specs, auto = in_specs, self.auto

    @jax.jit
    def run(*args):
      if not auto:  # Auto axes reshard by themselves
        spec_list = specs if isinstance(specs, tuple) else (specs,) * len(args)
        args = [jax.reshard(a, s) for a, s in zip(args, spec_list)]
      return mapped(*args)

    return run

  def run(self, body, *args, in_specs=EP, out_specs=EP, per_rank=True):
    """Runs `body` per rank on global arrays; returns numpy leaves."""
    with self.active():
      out = self.sharded(body, in_specs, out_specs, per_rank)(*args)
    return jax.tree.map(np.asarray, out)

  def trace(self, body, *args, in_specs=EP, out_specs=EP):
    """Traces (does not compile) `body` under shard_map; for error tests."""
    with self.active():
      return jax.make_jaxpr(self.sharded(body, in_specs, out_specs))(*args)

  @contextlib.contextmanager
  def active(self):
    """`jax.set_mesh` for an Explicit mesh; nothing for an Auto one."""
    if self.auto:
      yield
    else:
      with jax.set_mesh(self.mesh):
        yield


# ---------------------------------------------------------------- inputs

ROUTINGS = ("distinct", "duplicates", "hot", "one_expert", "invalid",
            "empty_rank", "none")


def routing(rng: np.random.Generator, num_ranks: int, num_tokens: int,
            num_topk: int, num_experts: int, kind: str) -> np.ndarray:
  """int32[R, T, K] expert ids of one of the `ROUTINGS` kinds.

  distinct: K distinct experts per token, ~15% of entries -1.
  duplicates: drawn with replacement, and a third of the tokens (token 0 of
    every rank at least) repeat one.
  hot: like distinct but ~90% of tokens also pick expert 0 (a hot expert).
  one_expert: every token picks the same expert in one random column, -1
    elsewhere.
  invalid: like distinct, with ~20% of entries (and entry [0, 0] of every
    rank) outside [-1, E).
  empty_rank: no token picks an expert of the last rank (with R=1: none at
    all).
  none: all -1.
  """
  shape = (num_ranks, num_tokens, num_topk)
  num_local = num_experts // num_ranks

  def distinct(pool):
    keys = rng.random((num_ranks * num_tokens, len(pool)))
    picks = np.asarray(pool)[np.argsort(keys, axis=1)[:, :num_topk]]
    return picks.reshape(shape)

  if kind == "none":
    return np.full(shape, -1, np.int32)
  if kind == "one_expert":
    idx = np.full(shape, -1, np.int64)
    expert = rng.integers(num_experts)
    cols = rng.integers(num_topk, size=(num_ranks, num_tokens))
    np.put_along_axis(idx, cols[..., None], expert, axis=-1)
    return idx.astype(np.int32)
  if kind == "empty_rank":
    pool = list(range(num_experts - num_local)) if num_ranks > 1 else []
    if len(pool) < num_topk:
      idx = np.full(shape, -1, np.int64)
      if pool:
        idx[..., 0] = rng.choice(pool, size=shape[:2])
    else:
      idx = distinct(pool)
    idx = np.where(rng.random(shape) < 0.15, -1, idx)
    return idx.astype(np.int32)
  if kind == "duplicates":
    idx = rng.integers(-1, num_experts, size=shape)
    if num_topk > 1:
      rep = rng.random(shape[:2]) < 1 / 3
      src = rng.integers(num_topk, size=shape[:2])
      dst = (src + 1 + rng.integers(num_topk - 1, size=shape[:2])) % num_topk
      rows = np.nonzero(rep)
      idx[rows + (dst[rows],)] = idx[rows + (src[rows],)]
      idx[:, 0, :2] = rng.integers(num_experts, size=(num_ranks, 1))  # sure
    return idx.astype(np.int32)
  idx = distinct(list(range(num_experts)))
  if kind == "hot":
    hot = rng.random(shape[:2]) < 0.9
    has = (idx == 0).any(-1)
    cols = rng.integers(num_topk, size=shape[:2])
    rows = np.nonzero(hot & ~has)
    idx[rows + (cols[rows],)] = 0
  idx = np.where(rng.random(shape) < 0.15, -1, idx)
  if kind == "invalid":
    bad = np.array([-2, -7, -2**31, num_experts, num_experts + 3, 2**31 - 1,
                    4 * num_experts])
    idx = np.where(rng.random(shape) < 0.2,
                   bad[rng.integers(len(bad), size=shape)], idx)
    idx[:, 0, 0] = bad[rng.integers(len(bad), size=num_ranks)]  # one at least
  elif kind not in ("distinct", "hot"):
    raise ValueError(kind)
  return idx.astype(np.int32)


def normal(rng, shape, dtype=np.float32):
  """Random normal values in `dtype` (never all zeros)."""
  return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def dyadic(rng, shape, dtype=BF16, bits=4, span=4):
  """Values k / 2**bits with |k| <= span * 2**bits: exact in bf16 sums."""
  k = rng.integers(-span * 2**bits, span * 2**bits + 1, size=shape)
  k = np.where(k == 0, 1, k)  # no zeros, so nothing hides in padding
  return (k / 2**bits).astype(dtype)


def weights(rng, shape):
  """Router-like f32 weights in (0, 1], with a few negatives for coverage."""
  w = rng.random(shape, dtype=np.float32) + np.float32(1e-3)
  return np.where(rng.random(shape) < 0.1, -w, w).astype(np.float32)


def flat(a):
  """[R, T, ...] -> [R*T, ...] (the global layout sharded over 'ep')."""
  a = np.asarray(a)
  return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


# Low-latency dispatch modes, by name.
FP8_MODES = {
    "bf16": dict(use_fp8=False),
    "fp8": dict(use_fp8=True),
    "fp8_round_scale": dict(use_fp8=True, round_scale=True),
    "fp8_ue8m0": dict(use_fp8=True, use_ue8m0=True),
    "fp8_round_scale_ue8m0": dict(use_fp8=True, round_scale=True,
                                  use_ue8m0=True),
}


def ll_tokens(rng, num_ranks, num_tokens, hidden):
  """bf16 rows with per-token magnitudes from 2^-12 to 2^12; one zero row."""
  x = normal(rng, (num_ranks, num_tokens, hidden)) * np.exp2(
      rng.integers(-12, 13, size=(num_ranks, num_tokens, 1))).astype(np.float32)
  x[0, 0] = 0.0  # amax floor
  return x.astype(BF16)


class Problem(Ep):
  """An `Ep` of `num_ranks` CPU ranks, a per-rank `shape` (a `Shape` or a
  name in `specs.SPECS`), and the test's random inputs for them.

  Every input is drawn from `rng` (seeded with the test's `seed`) in the
  order the test asks for it, so a seed replays all of them. Inputs are per
  rank, [R, ...]; `flat` gives the global array.
  """

  def __init__(self, seed: int, rng: np.random.Generator, num_ranks: int,
               shape: Shape | str, **ep_kwargs):
    super().__init__(num_ranks, **ep_kwargs)
    self.seed = seed
    self.rng = rng
    self.shape = SPECS[shape].shape if isinstance(shape, str) else shape

  def routing(self, kind: str) -> np.ndarray:
    """int32[R, T, K] expert ids of one of the `ROUTINGS` kinds."""
    s = self.shape
    return routing(self.rng, self.num_ranks, s.tokens, s.topk, s.experts,
                   kind)

  def rows(self, dtype=np.float32, num_rows: int | None = None) -> np.ndarray:
    """dtype[R, num_rows, H] random normal rows; num_rows defaults to T
    (tokens, biases, cotangents of the output)."""
    num_rows = self.shape.tokens if num_rows is None else num_rows
    return normal(self.rng, (self.num_ranks, num_rows, self.shape.hidden),
                  dtype)

  def dyadic_rows(self, dtype=BF16, bits: int = 4) -> np.ndarray:
    """dtype[R, T, H] of `dyadic` values: sums of them are exact."""
    return dyadic(self.rng, (self.num_ranks, self.shape.tokens,
                             self.shape.hidden), dtype, bits=bits)

  def weights(self, num_rows: int | None = None) -> np.ndarray:
    """f32[R, num_rows, K] router-like `weights`; num_rows defaults to T."""
    num_rows = self.shape.tokens if num_rows is None else num_rows
    return weights(self.rng, (self.num_ranks, num_rows, self.shape.topk))

  def ll_tokens(self) -> np.ndarray:
    """bf16[R, T, H] tokens of a low-latency dispatch (`ll_tokens`)."""
    return ll_tokens(self.rng, self.num_ranks, self.shape.tokens,
                     self.shape.hidden)

  def expert_outputs(self, max_tokens: int) -> np.ndarray:
    """bf16[R, L, R*max_tokens, H]: low-latency expert outputs (or their
    cotangents), random in every slot, empty ones too, so reading an empty
    slot would show."""
    s = self.shape
    return normal(self.rng, (self.num_ranks, s.experts // self.num_ranks,
                             self.num_ranks * max_tokens, s.hidden), BF16)

  def context(self, **params) -> str:
    """`context` of the test's seed, R and `params`."""
    return context(self.seed, R=self.num_ranks, **params)


# ---------------------------------------------------------------- checks


def _bits(a: np.ndarray) -> np.ndarray:
  """Floats (numpy and ml_dtypes) as their bit patterns; others unchanged."""
  a = np.asarray(a)
  if a.dtype.kind in "biu":
    return a
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32,
                 8: np.uint64}[a.dtype.itemsize])


def assert_same(got, want, what: str, ctx: str) -> None:
  """Exact equality of shape, dtype and every element's bits (so -0 != +0).

  The message names `what`, the context (seed and parameters) and the first
  mismatching positions.
  """
  got, want = np.asarray(got), np.asarray(want)
  head = f"{what} [{ctx}]"
  assert got.shape == want.shape, f"{head}: shape {got.shape} != {want.shape}"
  assert got.dtype == want.dtype, f"{head}: dtype {got.dtype} != {want.dtype}"
  bad = _bits(got) != _bits(want)
  if bad.any():
    where = np.argwhere(bad)[:8]
    detail = ", ".join(
        f"{tuple(int(i) for i in w)}: got {got[tuple(w)]!r} want "
        f"{want[tuple(w)]!r}" for w in where)
    raise AssertionError(
        f"{head}: {int(bad.sum())} of {bad.size} elements differ; first: "
        f"{detail}")


def _bf16_ulp(v: np.ndarray) -> np.ndarray:
  """Spacing of bf16 numbers at |v| (normal range)."""
  _, exponent = np.frexp(np.maximum(np.abs(v.astype(np.float64)), 2.0**-126))
  return np.ldexp(1.0, exponent - 8)


def assert_bf16_sum(got, want_f32, abs_sum, num_terms: int, what: str,
                    ctx: str) -> None:
  """`got` (bf16) is `want_f32` rounded once to bf16, except where another
  fp32 evaluation of the same sum may round the other way.

  XLA:CPU contracts `acc + w * y` into fused multiply-adds (it does so in the
  LL combine), which moves an fp32 sum by up to the fp32 evaluation error
  bound `(num_terms + 1) * 2^-24 * abs_sum`. So an element that differs from
  round(want_f32) must be the bf16 rounding of some value within that bound
  of want_f32: near a rounding tie that is the neighbouring bf16 value; where
  the terms cancel (a sum far smaller than abs_sum) it can be several bf16
  steps of the tiny result. Everywhere else: exact bits.
  """
  got = np.asarray(got)
  want = want_f32.astype(BF16)
  bad = _bits(got) != _bits(want)
  if not bad.any():
    return
  g = got[bad].astype(np.float64)
  exact32 = want_f32[bad].astype(np.float64)
  slack = (num_terms + 1) * 2.0**-24 * abs_sum[bad]
  ok = np.abs(g - exact32) <= slack + 0.5 * _bf16_ulp(g) * 1.01
  if not ok.all():
    where = np.argwhere(bad)[~ok][:8]
    detail = ", ".join(
        f"{tuple(int(i) for i in p)}: got {got[tuple(p)]!r} want "
        f"{want[tuple(p)]!r} (fp32 {want_f32[tuple(p)]!r})" for p in where)
    raise AssertionError(
        f"{what} [{ctx}]: {int((~ok).sum())} elements differ by more than an "
        f"fp32 evaluation order can explain; first: {detail}")
  assert bad.mean() < 0.01, (
      f"{what} [{ctx}]: {int(bad.sum())} of {bad.size} elements sit on a "
      "rounding tie; too many for chance")


def assert_close(got, want, what: str, ctx: str, *, rtol: float,
                 atol: float = 0.0) -> None:
  np.testing.assert_allclose(np.asarray(got, np.float64),
                             np.asarray(want, np.float64), rtol=rtol,
                             atol=atol, err_msg=f"{what} [{ctx}]")


def context(seed: int, **params) -> str:
  extra = ", ".join(f"{k}={v}" for k, v in params.items())
  return f"seed={seed} (rerun with JAX_EP_TEST_SEED={seed}){', ' + extra if extra else ''}"

