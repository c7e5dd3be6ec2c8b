"""The DeepSeek-V3 MoE layer of the MoE example (examples/moe/dsv3.py) on
CPU ranks (reference backend) against a dense computation of the same layer
written here (every expert on every token, weighted by the gate's choices,
no dispatch): outputs and gradients, bf16 and fp8 dispatch, the bias
update, dropped rows. On one GPU (marked gpu) the same outputs and
gradients with dispatch and combine on the intranode kernels (R = 1)."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from ep_testing import cpu_devices
from gpu_testing import NEEDS_KERNELS
from layer_testing import compare_gradients
from repo_paths import REPO

EXAMPLE = REPO / "examples" / "moe"
if str(EXAMPLE) not in sys.path:
  sys.path.insert(0, str(EXAMPLE))
import dsv3  # noqa: E402  (examples/moe/dsv3.py)
import dsv3_gate  # noqa: E402  (examples/moe/dsv3_gate.py)


HIDDEN, TOKENS_PER_RANK = 256, 16
HI = jax.lax.Precision.HIGHEST


def _config(ranks: int, **overrides) -> dsv3.MoEConfig:
  """16 experts in 4 groups (2 kept), top-3, one shared expert."""
  del ranks  # 16 experts split over 1, 2 or 4 ranks
  gate = dsv3_gate.GateConfig(num_experts=16, topk=3, num_groups=4,
                              topk_groups=2)
  return dataclasses.replace(
      dsv3.MoEConfig(hidden=HIDDEN, expert_ffn=64, shared_ffn=64, gate=gate,
                     dtype="float32"), **overrides)


def _layer(seed: int, ranks: int, cfg: dsv3.MoEConfig, gpu: bool = False):
  """The layer on `ranks` CPU devices (reference backend) or GPUs (the
  kernels), and its input."""
  if gpu:
    mesh = jax.make_mesh((ranks,), ("ep",), devices=jax.devices("gpu")[:ranks])
    # Room for the largest rows the layer moves (f32 combines).
    nvl = jax_ep.nvl_buffer_bytes(TOKENS_PER_RANK, HIDDEN, cfg.gate.topk,
                                  ranks, jnp.float32)
    buffer = jax_ep.Buffer(mesh, "ep", backend="cuda", num_nvl_bytes=nvl)
  else:
    mesh = jax.make_mesh((ranks,), ("ep",), devices=cpu_devices(ranks))
    buffer = jax_ep.Buffer(mesh, "ep", backend="reference")
  with jax.set_mesh(mesh):
    moe = nnx.jit(lambda: dsv3.DeepSeekMoE(buffer, cfg,
                                           rngs=nnx.Rngs(seed % 2**31)))()
  rng = np.random.default_rng(seed)
  _set_bias(moe, rng.normal(size=cfg.gate.num_experts) * 0.05)
  x = rng.standard_normal((ranks * TOKENS_PER_RANK, HIDDEN), np.float32)
  return buffer, moe, jax.device_put(x, NamedSharding(mesh, P("ep", None)))


def _set_bias(moe, bias) -> None:
  """Sets the gate's bias, replicated over the layer's mesh."""
  moe.gate_bias[...] = jax.device_put(
      np.asarray(bias, np.float32), NamedSharding(moe.buffer.mesh, P()))


def _bias(moe) -> np.ndarray:
  return np.asarray(jax.device_get(moe.gate_bias[...]))


def fp8_round_trip(a):
  """Rows cast to fp8 and back, as the fp8 dispatch delivers them."""
  return jax_ep.per_token_cast_back(
      *jax_ep.per_token_cast_to_fp8(a)).astype(a.dtype)


def _dense(params: dict, bias, x, cfg: dsv3.MoEConfig, cast=None):
  """The layer without EP. Operands rounded to the dtype, products in f32;
  the routed experts see `cast(x)` (default: fp8 and back with fp8
  dispatch, else x)."""
  dtype = jnp.dtype(cfg.dtype)
  rounded = lambda a: a.astype(dtype).astype(jnp.float32)  # noqa: E731
  x = rounded(x)
  if cast is None:
    cast = ((lambda a: fp8_round_trip(a.astype(dtype)).astype(jnp.float32))
            if cfg.fp8_dispatch else (lambda a: a))
  idx, weights = dsv3_gate.gate(x, params["gate_weight"], bias, cfg.gate)
  gates = jnp.einsum("tk,tke->te", weights,
                     jax.nn.one_hot(idx, cfg.gate.num_experts))
  h = jnp.einsum("th,ehf->tef", cast(x), rounded(params["w_gate_up"]),
                 precision=HI)
  o = jnp.einsum("tef,efh->teh", rounded(dsv3.swiglu(h)),
                 rounded(params["w_down"]), precision=HI)
  routed = jnp.einsum("teh,te->th", o, gates).astype(dtype)
  up = rounded(params["shared"]["gate_up"]["kernel"])
  down = rounded(params["shared"]["down"]["kernel"])
  shared = jnp.dot(rounded(dsv3.swiglu(jnp.dot(x, up, precision=HI))), down,
                   precision=HI)
  return routed + shared.astype(dtype)


def _params(moe):
  return jax.device_get(nnx.to_pure_dict(nnx.state(moe, nnx.Param)))


@pytest.mark.parametrize("ranks,dtype,fp8,slots,tol,gpu", [
    (2, "float32", False, None, 2e-5, False),
    (4, "bfloat16", False, 64.0, 3e-2, False),
    (2, "bfloat16", True, None, 3e-2, False),
    *[pytest.param(1, "bfloat16", fp8, slots, 3e-2, True,
                   marks=NEEDS_KERNELS, id=f"gpu-{rows}-{experts}")
      for fp8, rows in ((False, "bf16"), (True, "fp8"))
      for slots, experts in ((None, "ragged"), (64.0, "slots"))]])
@pytest.mark.parametrize("overlap", [False, True],
                         ids=["one_batch", "two_micro_batches"])
def test_layer_matches_dense(seed, ranks, dtype, fp8, slots, tol, gpu,
                             overlap):
  """Outputs (experts through ragged_dot, or batched GEMMs with room for
  every pair; the tokens as one batch or as two overlapped micro-batches);
  the gate's load over the global batch, and the bias update it drives. f32
  matmuls at full precision (GPUs default to TF32, where the layer's and
  the dense gate could pick different experts at a near tie)."""
  cfg = _config(ranks, dtype=dtype, fp8_dispatch=fp8,
                expert_slots_factor=slots, overlap_micro_batches=overlap)
  buffer, moe, x = _layer(seed, ranks, cfg, gpu)
  assert moe.w_gate_up[...].sharding.spec[0] == "ep"
  with jax.set_mesh(buffer.mesh), jax.default_matmul_precision("highest"):
    out = nnx.jit(lambda m, x: m(x))(moe, x)
    want = _dense(_params(moe), _bias(moe), np.asarray(x), cfg)
  assert out.dtype == jnp.dtype(dtype) and out.shape == x.shape
  assert int(moe.dropped_rows[...]) == 0
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want, np.float32), rtol=tol, atol=tol)
  with jax.default_matmul_precision("highest"):
    idx, _ = dsv3_gate.gate(np.asarray(x).astype(dtype), _params(moe)[
        "gate_weight"], _bias(moe), cfg.gate)
  load = np.asarray(moe.load[...])
  np.testing.assert_array_equal(
      load, np.asarray(dsv3_gate.expert_load(idx, cfg.gate.num_experts)))
  bias = _bias(moe)
  with jax.set_mesh(buffer.mesh):
    moe.rebalance()
  step = np.float32(cfg.bias_rate) * np.sign(load.mean() - load)
  np.testing.assert_array_equal(_bias(moe), bias + step.astype(np.float32))


@pytest.mark.parametrize("gpu", [
    False, pytest.param(True, marks=NEEDS_KERNELS, id="gpu")])
@pytest.mark.parametrize("overlap", [False, True],
                         ids=["one_batch", "two_micro_batches"])
def test_layer_gradients_match_dense(seed, gpu, overlap):
  """f32 layer with fp8 dispatch: the rows' gradient comes back through the
  combine of their cotangents (the dense layer's cast passes it straight
  through), the weights' through the dispatch's VJP, the gate's and the
  experts' as usual; the tokens as one batch or as two overlapped
  micro-batches. On a GPU (R = 1) with f32 matmuls at full precision, as
  the dense layer's (GPUs default to TF32)."""
  ranks = 1 if gpu else 2
  cfg = _config(ranks, fp8_dispatch=True, overlap_micro_batches=overlap)
  buffer, moe, x = _layer(seed, ranks, cfg, gpu)
  cotangent = np.random.default_rng(seed + 1).standard_normal(
      x.shape, np.float32)
  bias = _bias(moe)

  def dense_loss(params, x):
    straight = lambda a: a + jax.lax.stop_gradient(fp8_round_trip(a) - a)  # noqa: E731
    return jnp.sum(_dense(params, bias, x, cfg, straight) * cotangent)

  with jax.default_matmul_precision("highest"):
    compare_gradients(moe, x, buffer.mesh, dense_loss, cotangent)


def test_dropped_rows_are_counted(seed):
  cfg = _config(4, capacity_factor=0.25)
  buffer, moe, x = _layer(seed, 4, cfg)
  with jax.set_mesh(buffer.mesh):
    out = nnx.jit(lambda m, x: m(x))(moe, x)
  assert np.isfinite(np.asarray(out)).all()
  assert int(moe.dropped_rows[...]) > 0
