"""The public API on the "cuda" backend, on every local GPU in one process.

`get_dispatch_layout`, `dispatch` and `combine` must go through their CUDA
kernels (the custom calls are in the compiled program) and agree bit for bit
with the reference backend, gradients of a small MoE included (fp8 rows of
any width too). What the kernels do not cover (combine of f16 rows, normal
ops across nodes) falls back to the reference: a FallbackWarning once, an
entry in `Buffer.fallbacks()`, and the reference's exact results.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from gpu_testing import GPUS, NEEDS_KERNELS
from jax_ep._src import sizes



pytestmark = NEEDS_KERNELS

TOKENS, HIDDEN, TOPK, EXPERTS = 256, 512, 8, 64


def _mesh():
  return jax.sharding.Mesh(np.array(GPUS), ("ep",))


def _routing(rng, n):
  idx = np.stack([rng.permutation(EXPERTS)[:TOPK] for _ in range(n)])
  idx[rng.random(idx.shape) < 0.1] = -1
  idx[: n // 2, 0] = 0  # a hot expert
  idx[rng.random(idx.shape) < 0.01] = EXPERTS + 3  # counted, selects nothing
  return idx.astype(np.int32)


def _run(mesh, fn, *args, in_specs=None):
  in_specs = in_specs or (P("ep"),) * len(args)
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                                  out_specs=P("ep")))
  args = [jax.device_put(a, NamedSharding(mesh, spec))
          for a, spec in zip(args, in_specs)]
  return sharded, sharded(*args), args


def _bitwise_equal(got, want) -> bool:
  bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
  return np.array_equal(np.asarray(got).view(bits), np.asarray(want).view(bits))


def test_auto_backend_is_cuda_on_gpus():
  assert jax_ep.Buffer(_mesh(), "ep").backend == "cuda"


def _layouts(mesh, idx, experts):
  """`get_dispatch_layout` of `idx` on a cuda and a reference Buffer: per
  backend, the Layout (as NumPy), the Buffer, whether the program called the
  kernel, and the FallbackWarnings raised."""
  results = {}
  for backend in ("cuda", "reference"):
    buffer = jax_ep.Buffer(mesh, "ep", backend=backend)

    def layout(i, buffer=buffer):
      out = jax_ep.get_dispatch_layout(buffer, i, experts)
      return jax.tree.map(lambda a: a[None] if a.ndim == 0 else a, out)

    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", jax_ep.FallbackWarning)
      fn, out, args = _run(mesh, layout, idx)
    results[backend] = (
        jax.tree.map(np.asarray, out), buffer,
        "jax_ep_get_dispatch_layout" in fn.lower(*args).as_text(),
        [w for w in caught if issubclass(w.category, jax_ep.FallbackWarning)])
  return results


def test_layout_runs_the_kernel_and_matches_the_reference(seed):
  idx = _routing(np.random.default_rng(seed), TOKENS * len(GPUS))
  results = _layouts(_mesh(), idx, EXPERTS)
  assert results["cuda"][2] and not results["reference"][2]
  got, want = results["cuda"][0], results["reference"][0]
  for name in ("num_tokens_per_rank", "num_tokens_per_expert",
               "is_token_in_rank", "num_invalid", "num_tokens_per_node"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name),
                                  err_msg=f"{name} (seed={seed})")
  assert got.num_invalid.sum() == (idx == EXPERTS + 3).sum()


def test_layout_past_the_kernel_falls_back_to_the_reference(seed):
  """E past the layout kernel's 1024 (or R past its 64, which the internode
  ops serve): a listed fallback, the reference's counts."""
  experts = sizes.limits()["max_normal_experts"] * 2
  idx = np.random.default_rng(seed).integers(
      -1, experts, (TOKENS * len(GPUS), TOPK), dtype=np.int32)
  results = _layouts(_mesh(), idx, experts)
  (got, buffer, kernel, warned), want = results["cuda"], results["reference"][0]
  assert not kernel and warned
  assert buffer.fallbacks() == (jax_ep.Fallback(
      "get_dispatch_layout", "the layout kernel takes num_ranks <= "
      f"{sizes.limits()['max_ranks']} and num_experts <= {experts // 2}, "
      f"got {len(GPUS)} and {experts}"),), buffer.fallbacks()
  jax.tree.map(np.testing.assert_array_equal, got, want)


_BUFFERS = []


@pytest.fixture(scope="module", autouse=True)
def _free_nvl_buffers():
  """The next test modules make their own peer buffers on these GPUs."""
  yield
  for buffer in _BUFFERS:
    buffer.close()


def _nvl_buffer(mesh, backend):
  nvl = jax_ep.nvl_buffer_bytes(TOKENS, HIDDEN, TOPK, len(GPUS))
  _BUFFERS.append(jax_ep.Buffer(mesh, "ep", backend=backend,
                                num_nvl_bytes=nvl if backend == "cuda" else None))
  return _BUFFERS[-1]


def _moe_inputs(seed):
  rng = np.random.default_rng(seed)
  n = TOKENS * len(GPUS)
  x = jnp.asarray(rng.standard_normal((n, HIDDEN)), jnp.bfloat16)
  idx = _routing(rng, n)
  w = rng.random(idx.shape, dtype=np.float32)
  scale = jnp.asarray(rng.standard_normal((EXPERTS // len(GPUS) * len(GPUS),)),
                      jnp.float32)
  return x, idx, w, scale


def _tiny_moe(buffer):
  """dispatch -> a per-expert scale weighted by the router -> combine; fp8
  dispatch and a cached dispatch too."""
  def forward(x, i, w, scale):
    d = jax_ep.dispatch(buffer, x, i, w, num_experts=EXPERTS,
                        capacity=len(GPUS) * TOKENS * 3 // 4)
    local = scale.reshape(len(GPUS), -1)[buffer.rank()]
    gain = jnp.where(d.topk_idx >= 0, d.topk_weights * local[
        jnp.maximum(d.topk_idx, 0)], 0.0).sum(-1, keepdims=True)
    y = (d.x.astype(jnp.float32) * gain).astype(jnp.bfloat16)
    out = jax_ep.combine(buffer, y, d.handle)
    q = jax_ep.dispatch(buffer, jax_ep.per_token_cast_to_fp8(x), i,
                        num_experts=EXPERTS)
    again = jax_ep.dispatch(buffer, x * 2, handle=d.handle).x
    return out, q.x, q.scales, again, d.handle.recv_row
  return forward


def test_dispatch_and_combine_run_the_kernels_and_match_the_reference(seed):
  mesh = _mesh()
  args = _moe_inputs(seed)
  outs = {}
  for backend in ("cuda", "reference"):
    fn, out, placed = _run(mesh, _tiny_moe(_nvl_buffer(mesh, backend)), *args,
                           in_specs=(P("ep"), P("ep"), P("ep"), P()))
    hlo = fn.lower(*placed).as_text()
    for target in ("jax_ep_intranode_dispatch", "jax_ep_intranode_combine",
                   "jax_ep_intranode_cached_dispatch"):
      assert (target in hlo) == (backend == "cuda"), (backend, target)
    outs[backend] = [np.asarray(o) for o in out]
  for k, (got, want) in enumerate(zip(outs["cuda"], outs["reference"])):
    assert _bitwise_equal(got, want), f"output {k}"


def test_moe_gradients_match_the_reference_backend(seed):
  mesh = _mesh()
  args = _moe_inputs(seed)
  grads = {}
  for backend in ("cuda", "reference"):
    forward = _tiny_moe(_nvl_buffer(mesh, backend))

    def loss(x, i, w, scale, forward=forward):
      out = forward(x, i, w, scale)[0]
      return jax.lax.psum(jnp.sum(out.astype(jnp.float32) ** 2), "ep")

    def grad(x, i, w, scale, loss=loss):
      d_x, d_w, d_scale = jax.grad(loss, argnums=(0, 2, 3))(x, i, w, scale)
      return d_x, d_w, d_scale[None]  # each rank's share of d_scale

    fn = jax.jit(jax.shard_map(grad, mesh=mesh,
                               in_specs=(P("ep"), P("ep"), P("ep"), P()),
                               out_specs=P("ep")))
    placed = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in args[:3]]
    placed.append(jax.device_put(args[3], NamedSharding(mesh, P())))
    if backend == "cuda":
      hlo = fn.lower(*placed).as_text()
      assert "jax_ep_intranode_cached_dispatch" in hlo  # combine's backward
    grads[backend] = [np.asarray(g) for g in fn(*placed)]
  # The communication is bitwise equal (the test above); the elementwise math
  # around it may fuse differently in the two programs (FMA contraction), so
  # the gradients agree to rounding.
  for name, got, want in zip(("d_x", "d_weights", "d_scale"), grads["cuda"],
                             grads["reference"]):
    got, want = got.astype(np.float32), want.astype(np.float32)
    differ = int((got != want).sum())
    np.testing.assert_allclose(
        got, want, rtol=1e-2 if name == "d_x" else 1e-5, atol=1e-6,
        err_msg=f"{name}, seed={seed}: {differ} of {got.size} elements differ")


def test_cuda_dispatch_without_nvl_bytes_says_what_to_pass():
  mesh = _mesh()
  buffer = jax_ep.Buffer(mesh, "ep", backend="cuda")
  x = jnp.zeros((TOKENS * len(GPUS), HIDDEN), jnp.bfloat16)
  idx = jnp.zeros((TOKENS * len(GPUS), TOPK), jnp.int32)
  with pytest.raises(ValueError, match="num_nvl_bytes=jax_ep.nvl_buffer_bytes"):
    _run(mesh, lambda x, i: jax_ep.dispatch(buffer, x, i,
                                            num_experts=EXPERTS).x, x, idx)


def test_num_sms_above_the_gpus_is_refused_at_buffer_creation():
  sms = GPUS[0].core_count
  with pytest.raises(ValueError, match=(
      f"config.num_sms is {sms + sms % 2 + 2} but the GPUs have {sms} SMs")):
    jax_ep.Buffer(_mesh(), "ep", backend="cuda", num_nvl_bytes=1 << 20,
                  config=jax_ep.Config(num_sms=sms + sms % 2 + 2))


def test_low_latency_ops_without_the_heap_raise():
  mesh = _mesh()
  buffer = jax_ep.Buffer(mesh, "ep", backend="cuda")
  n = 16 * len(GPUS)
  x = jnp.zeros((n, HIDDEN), jnp.bfloat16)
  idx = jnp.zeros((n, TOPK), jnp.int32)
  with pytest.raises(ValueError, match="num_ll_bytes=jax_ep.ll_buffer_bytes"):
    _run(mesh, lambda x, i: jax_ep.low_latency_dispatch(
        buffer, x, i, num_experts=EXPERTS,
        num_max_dispatch_tokens_per_rank=16).x, x, idx)


@pytest.mark.parametrize("hidden", [128, 256, 384, 640])
def test_fp8_rows_with_narrow_scale_rows_run_the_kernels(seed, hidden):
  """fp8 scale rows of 4 * H/128 bytes, not a multiple of 16 here or there:
  the fresh and the cached dispatch run their kernels (no fallback) and equal
  the reference."""
  mesh = _mesh()
  rng = np.random.default_rng(seed)
  n = TOKENS * len(GPUS)
  x = jnp.asarray(rng.standard_normal((n, hidden)), jnp.float32)
  q, s = jax_ep.per_token_cast_to_fp8(x * 10)
  q2, s2 = jax_ep.per_token_cast_to_fp8(x * 3)
  idx = _routing(rng, n)
  outs = {}
  for backend in ("cuda", "reference"):
    buffer = _nvl_buffer(mesh, backend)

    def both(q, s, q2, s2, i, buffer=buffer):
      d = jax_ep.dispatch(buffer, (q, s), i, num_experts=EXPERTS)
      again = jax_ep.dispatch(buffer, (q2, s2), handle=d.handle)
      return d.x, d.scales, again.x, again.scales

    fn, out, placed = _run(mesh, both, q, s, q2, s2, idx)
    hlo = fn.lower(*placed).as_text()
    for target in ("jax_ep_intranode_dispatch",
                   "jax_ep_intranode_cached_dispatch"):
      assert (target in hlo) == (backend == "cuda"), (backend, target)
    assert buffer.fallbacks() == (), buffer.fallbacks()
    outs[backend] = out
  for k, (got, want) in enumerate(zip(outs["cuda"], outs["reference"])):
    assert _bitwise_equal(got, want), f"output {k}, seed={seed}"


def test_a_fallback_warns_once_and_is_listed(seed):
  """f16 rows dispatch on the kernel, but their combine (which the kernel
  does not sum) runs the reference: one FallbackWarning, one entry in
  `Buffer.fallbacks()`, the reference's bits."""
  mesh = _mesh()
  rng = np.random.default_rng(seed)
  n = TOKENS * len(GPUS)
  x = jnp.asarray(rng.standard_normal((n, HIDDEN)), jnp.float16)
  idx = _routing(rng, n)
  buffer = _nvl_buffer(mesh, "cuda")

  def round_trip(buffer):
    def run(x, i):
      d = jax_ep.dispatch(buffer, x, i, num_experts=EXPERTS)
      return jax_ep.combine(buffer, d.x * 2, d.handle)
    return run

  with pytest.warns(jax_ep.FallbackWarning, match="combine .*float16"):
    _, got, _ = _run(mesh, round_trip(buffer), x, idx)
  assert buffer.fallbacks() == (jax_ep.Fallback(
      "combine", "it combines float16 rows, and the combine kernel sums "
      "bfloat16 and float32 rows"),)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jax_ep.FallbackWarning)
    _run(mesh, round_trip(buffer), x[: n // 2], idx[: n // 2])  # quiet
  assert len(buffer.fallbacks()) == 1
  _, want, _ = _run(mesh, round_trip(_nvl_buffer(mesh, "reference")), x, idx)
  assert _bitwise_equal(got, want), f"seed={seed}"


@pytest.mark.skipif(len(GPUS) < 2, reason="needs 2 GPUs to simulate 2 nodes")
def test_ops_across_nodes_in_one_process_fall_back_and_match_the_reference(
    seed):
  """Across nodes (simulated: one rank per node) driven by one process, the
  internode kernels (NVSHMEM: one process per rank) cannot run: the normal
  ops warn, list the fallback and run the reference."""
  mesh = _mesh()
  rng = np.random.default_rng(seed)
  n = 16 * len(GPUS)
  x = jnp.asarray(rng.standard_normal((n, HIDDEN)), jnp.bfloat16)
  idx = _routing(rng, n)
  outs = {}
  for backend in ("cuda", "reference"):
    buffer = jax_ep.Buffer(mesh, "ep", backend=backend, ranks_per_node=1)

    def round_trip(x, i, buffer=buffer):
      d = jax_ep.dispatch(buffer, x, i, num_experts=EXPERTS)
      return d.x, jax_ep.combine(buffer, d.x, d.handle)

    if backend == "cuda":
      with pytest.warns(jax_ep.FallbackWarning,
                        match="need one process per rank"):
        _, out, _ = _run(mesh, round_trip, x, idx)
      assert [f.op for f in buffer.fallbacks()] == ["dispatch", "combine"]
    else:
      _, out, _ = _run(mesh, round_trip, x, idx)
      assert buffer.fallbacks() == ()
    outs[backend] = out
  for got, want in zip(outs["cuda"], outs["reference"]):
    assert _bitwise_equal(got, want)
