"""The public API on the "cuda" backend, on every local GPU in one process.

`get_dispatch_layout` must go through the CUDA kernel (its custom call is in
the compiled program) and agree with the reference backend; ops without a
kernel yet warn and give the reference's exact results on the GPUs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from gpu_testing import GPUS, NEEDS_KERNELS



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


def _run(mesh, fn, *args):
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"),
                                  out_specs=P("ep")))
  args = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in args]
  return sharded, sharded(*args), args


def test_auto_backend_is_cuda_on_gpus():
  assert jax_ep.Buffer(_mesh(), "ep").backend == "cuda"


def test_layout_runs_the_kernel_and_matches_the_reference(seed):
  mesh = _mesh()
  rng = np.random.default_rng(seed)
  idx = _routing(rng, TOKENS * len(GPUS))
  results = {}
  for backend in ("cuda", "reference"):
    buffer = jax_ep.Buffer(mesh, "ep", backend=backend)

    def layout(i, buffer=buffer):
      out = jax_ep.get_dispatch_layout(buffer, i, EXPERTS)
      return jax.tree.map(lambda a: a[None] if a.ndim == 0 else a, out)

    fn, out, args = _run(mesh, layout, idx)
    hlo = fn.lower(*args).as_text()
    assert ("jax_ep_get_dispatch_layout" in hlo) == (backend == "cuda"), backend
    results[backend] = jax.tree.map(np.asarray, out)
  for name in ("num_tokens_per_rank", "num_tokens_per_expert",
               "is_token_in_rank", "num_invalid"):
    np.testing.assert_array_equal(
        getattr(results["cuda"], name), getattr(results["reference"], name),
        err_msg=f"{name} (seed={seed})")
  assert results["cuda"].num_invalid.sum() == (idx == EXPERTS + 3).sum()


def test_ops_without_kernels_warn_and_match_the_reference(seed):
  mesh = _mesh()
  rng = np.random.default_rng(seed)
  n = TOKENS * len(GPUS)
  x = jnp.asarray(rng.standard_normal((n, HIDDEN)), jnp.bfloat16)
  idx = _routing(rng, n)
  w = rng.random(idx.shape, dtype=np.float32)
  outs = {}
  for backend in ("cuda", "reference"):
    buffer = jax_ep.Buffer(mesh, "ep", backend=backend)

    def round_trip(x, i, w, buffer=buffer):
      d = jax_ep.dispatch(buffer, x, i, w, num_experts=EXPERTS)
      return d.x, jax_ep.combine(buffer, d.x, d.handle)

    if backend == "cuda":
      with pytest.warns(UserWarning, match="no CUDA kernel yet"):
        _, out, _ = _run(mesh, round_trip, x, idx, w)
    else:
      _, out, _ = _run(mesh, round_trip, x, idx, w)
    outs[backend] = [np.asarray(o) for o in out]
  for got, want in zip(outs["cuda"], outs["reference"]):
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
