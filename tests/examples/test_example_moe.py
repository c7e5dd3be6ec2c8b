"""Smoke tests of the Flax MoE example (examples/moe) on CPU devices.

The EP layer is checked against a dense model of the same layer written here
(every expert on every token, weighted by a dense gate, no dispatch): outputs
and gradients. Then a few training steps in-process, and the demo command
over two processes through the launcher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep._src import launch as launch_lib
from layer_testing import compare_gradients
from repo_paths import REPO

EXAMPLE = REPO / "examples" / "moe"
if str(EXAMPLE) not in sys.path:
  sys.path.insert(0, str(EXAMPLE))
import experts as moe_experts  # noqa: E402  (examples/moe/experts.py)
import main as moe_main  # noqa: E402  (examples/moe/main.py)
import model as moe_model  # noqa: E402  (examples/moe/model.py)

HIDDEN, TOKENS_PER_RANK = 64, 24


def _buffer(ranks: int) -> jax_ep.Buffer:
  if len(jax.devices()) < ranks:
    pytest.skip(f"needs {ranks} devices")
  mesh = jax.make_mesh((ranks,), ("ep",), devices=jax.devices()[:ranks],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  return jax_ep.Buffer(mesh, "ep", backend="reference")


def _layer(seed: int, ranks: int, dtype, *, capacity_factor=None):
  """An EP MoE layer (2 experts per rank, top-3, shared expert) and tokens.

  The router favours expert 0 for about half of the tokens (rank 0 is hot).
  """
  buffer = _buffer(ranks)
  with jax.set_mesh(buffer.mesh):
    moe = nnx.jit(lambda: moe_model.MoE(
        buffer, hidden=HIDDEN, ffn=96, num_experts=2 * ranks, topk=3,
        shared_ffn=32, capacity_factor=capacity_factor, dtype=dtype,
        rngs=nnx.Rngs(seed % 2**31)))()
  moe.router[...] = moe.router[...].at[:, 0].add(0.5)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((ranks * TOKENS_PER_RANK, HIDDEN), np.float32)
  x = jax.device_put(x, NamedSharding(buffer.mesh, P("ep", None)))
  return buffer, moe, x


def _dense_moe(params: dict, x, *, topk: int, dtype):
  """The MoE layer without EP: every expert on every token, gated densely.

  Operands are rounded to `dtype` and multiplied in f32, as the layer does
  (the CPU has no bf16 x bf16 -> f32 dot, so round first, then multiply).
  """
  hi = jax.lax.Precision.HIGHEST
  rounded = lambda a: a.astype(dtype).astype(jnp.float32)  # noqa: E731
  x = rounded(x)
  logits = jnp.dot(x, params["router"], precision=hi)
  weights, idx = jax.lax.top_k(jax.nn.softmax(logits, -1), topk)
  weights = weights / weights.sum(-1, keepdims=True)
  gate = jnp.einsum("tk,tke->te", weights,
                    jax.nn.one_hot(idx, params["router"].shape[1]))
  h = jnp.einsum("th,ehf->tef", x, rounded(params["w_in"]), precision=hi)
  o = jnp.einsum("tef,efh->teh", rounded(jax.nn.gelu(h)),
                 rounded(params["w_out"]), precision=hi)
  routed = jnp.einsum("teh,te->th", o, gate).astype(dtype)
  up = rounded(params["shared"]["up"]["kernel"])
  down = rounded(params["shared"]["down"]["kernel"])
  shared = jnp.dot(rounded(jax.nn.gelu(jnp.dot(x, up, precision=hi))),
                   down, precision=hi)
  return routed + shared.astype(dtype)


# Each EP size and dtype once (a layer compiles its own programs); the
# gradient and capacity tests below run f32 at EP 4 too.
@pytest.mark.parametrize("ranks,dtype,tol", [
    pytest.param(2, jnp.bfloat16, 3e-2, id="2-bf16"),
    pytest.param(4, jnp.float32, 2e-5, id="4-f32")])
def test_ep_layer_matches_dense(seed, ranks, dtype, tol):
  buffer, moe, x = _layer(seed, ranks, dtype)
  assert moe.w_in[...].sharding.spec[0] == "ep"  # each rank holds E/R experts
  with jax.set_mesh(buffer.mesh):
    out = nnx.jit(lambda m, x: m(x))(moe, x)
  params = jax.device_get(nnx.to_pure_dict(nnx.state(moe, nnx.Param)))
  want = jax.jit(_dense_moe, static_argnames=("topk", "dtype"))(
      params, np.asarray(x), topk=moe.topk, dtype=dtype)
  assert out.dtype == dtype and out.shape == x.shape
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_ep_layer_gradients_match_dense(seed):
  buffer, moe, x = _layer(seed, 4, jnp.float32)
  cotangent = np.random.default_rng(seed + 1).standard_normal(
      x.shape, np.float32)

  @jax.jit  # a compile or two, where eagerly each op compiles on its own
  def dense_loss(params, x):
    return jnp.sum(_dense_moe(params, x, topk=moe.topk, dtype=jnp.float32)
                   * cotangent)

  compare_gradients(moe, x, buffer.mesh, dense_loss, cotangent)


def test_capacity_overflow_is_counted(seed):
  buffer, moe, x = _layer(seed, 4, jnp.float32, capacity_factor=0.5)
  with jax.set_mesh(buffer.mesh):
    out = nnx.jit(lambda m, x: m(x))(moe, x)
  assert np.isfinite(np.asarray(out)).all()
  assert int(moe.dropped_rows[...]) > 0


@pytest.mark.parametrize("max_groups", [1, 2, 3])
def test_group_limited_route_keeps_the_best_groups(seed, max_groups):
  """Each token's K experts lie in its max_groups best groups (by the sum
  of their two best probabilities), and are its top-K there; with every
  group kept the router is the plain top-K."""
  rng = np.random.default_rng(seed)
  num_groups, per_group, topk = 4, 8, 4
  x = rng.standard_normal((64, 16), np.float32)
  router = rng.standard_normal((16, num_groups * per_group), np.float32)
  idx, w = moe_model.route(x, router, topk, num_groups=num_groups,
                           max_groups=max_groups)
  idx, w = np.asarray(idx), np.asarray(w)
  probs = np.asarray(jax.nn.softmax(
      jnp.dot(x, router, precision=jax.lax.Precision.HIGHEST), axis=-1))
  grouped = probs.reshape(-1, num_groups, per_group)
  score = np.sort(grouped, -1)[..., -2:].sum(-1)
  for t in range(x.shape[0]):
    kept = set(np.argsort(-score[t], kind="stable")[:max_groups])
    allowed = [e for e in range(num_groups * per_group)
               if e // per_group in kept]
    want = sorted(allowed, key=lambda e: -probs[t, e])[:topk]
    assert sorted(idx[t]) == sorted(want), (t, idx[t], want)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  plain = moe_model.route(x, router, topk)
  every = moe_model.route(x, router, topk, num_groups=num_groups,
                          max_groups=num_groups)
  for a, b in zip(plain, every):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_node_limited_routing_bounds_the_network_rows(seed):
  """8 ranks on 4 nodes of 2: with max_nodes = M each token's rows go to at
  most M nodes, so the (token, node) pairs get_dispatch_layout counts, the
  rows an internode dispatch sends over the network, are at most M * T and
  grow with M."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((8,), ("ep",), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  buffer = jax_ep.Buffer(mesh, "ep", backend="reference", ranks_per_node=2)
  rng = np.random.default_rng(seed)
  tokens, experts, topk = 32, 32, 8
  x = jax.device_put(rng.standard_normal((8 * tokens, 16), np.float32),
                     NamedSharding(mesh, P("ep", None)))
  router = rng.standard_normal((16, experts), np.float32)

  def node_rows(max_nodes):
    def per_rank(x):
      idx, _ = moe_model.route(x, router, topk, num_groups=4,
                               max_groups=max_nodes)
      layout = jax_ep.get_dispatch_layout(buffer, idx, experts)
      return layout.num_tokens_per_node.sum()[None]
    return np.asarray(jax.jit(jax.shard_map(
        per_rank, mesh=mesh, in_specs=P("ep", None), out_specs=P("ep")))(x))

  rows = {m: node_rows(m) for m in (1, 2, 4)}
  for m, per_rank_rows in rows.items():
    assert (per_rank_rows <= m * tokens).all(), (m, per_rank_rows)
  assert (rows[1] == tokens).all()  # every token has some expert
  assert rows[1].sum() < rows[2].sum() < rows[4].sum(), rows


def test_capacity_helper():
  assert moe_experts.capacity(4, 100, 8, 2, None) == 400
  # 8 experts on 2 ranks, top-2: P(a token reaches a rank) = 1 - C(4,2)/C(8,2)
  rows = 2 * 256 * (1 - math.comb(4, 2) / math.comb(8, 2))
  assert moe_experts.capacity(2, 256, 8, 2, 1.0) == -(-math.ceil(rows) // 8) * 8
  assert moe_experts.capacity(2, 256, 8, 2, 10.0) == 512  # never above R*T


def test_deepseek_v3_layer_trains_and_resumes_from_a_checkpoint(tmp_path):
  """Two steps of the DeepSeek-V3 layer with fp8 dispatch on 2 ranks, saved
  by Orbax; a second run restores step 2 (the gate's bias included) and
  trains steps 3 and 4."""
  ranks = 2
  _buffer(ranks)
  cfg = moe_main.get_config(
      steps=2, tokens_per_rank=32, hidden=128, ffn=64, shared_ffn=64,
      num_experts=8, topk=2, layer="deepseek_v3", num_groups=4, topk_groups=2,
      route_scale=2.5, fp8_dispatch=True, log_every=1,
      checkpoint_dir=str(tmp_path), checkpoint_every=1)
  run = lambda cfg: moe_main.train(cfg, backend="reference",  # noqa: E731
                                   devices=jax.devices()[:ranks],
                                   log=lines.append)
  lines = []
  first = run(cfg)
  assert first["first_step"] == 1 and len(first["losses"]) == 2
  assert first["model_tflops_per_device"] > 0
  second = run(dataclasses.replace(cfg, steps=4))
  assert second["first_step"] == 3 and len(second["losses"]) == 2
  assert np.isfinite(first["losses"] + second["losses"]).all()
  assert any("restored step 2" in line for line in lines)
  with pytest.raises(ValueError, match="raise --steps"):
    run(cfg)


def test_demo_two_processes_loss_falls(capfd, tmp_path):
  """The `make demo` command, shortened: 2 processes, 1 device each. The
  default layer's training loop (train(), its metrics and log lines) runs
  here; the DeepSeek-V3 layer's in this process, in the checkpoint test
  above."""
  metrics_path = tmp_path / "metrics.json"
  code = launch_lib.launch(
      [sys.executable, str(EXAMPLE / "main.py"), "--steps", "15",
       "--metrics_out", str(metrics_path)], 2, timeout=240)
  out = capfd.readouterr().out
  assert code == 0, out
  metrics = json.loads(metrics_path.read_text())
  losses = metrics["losses"]
  assert metrics["processes"] == 2 and metrics["ranks"] == 2
  assert len(losses) == 15 and np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.85 * losses[0], losses
  assert metrics["tokens_per_s"] > 0 and metrics["dropped_rows"] == 0
  assert metrics["backend"] == "reference"
  assert "tokens/s" in out, out
