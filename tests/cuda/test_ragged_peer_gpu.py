"""The benchmark's ragged_all_to_all peer computes a real MoE round trip.

With identity experts, dispatch then combine must give each token its rows
times the sum of its weights (-1 choices weigh nothing). ragged_all_to_all
runs in one process on GPUs only (docs/measuring.md), so this is a GPU test.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench import ragged
from gpu_testing import GPUS, NEEDS_GPU



pytestmark = NEEDS_GPU


@pytest.mark.parametrize("experts", [len(GPUS), 64])
def test_ragged_round_trip(seed, experts):
  ranks, tokens, hidden, topk = len(GPUS), 128, 256, 4
  topk = min(topk, experts)
  rng = np.random.default_rng(seed)
  n = ranks * tokens
  x = rng.standard_normal((n, hidden)).astype(np.float32)
  idx = np.stack([rng.permutation(experts)[:topk] for _ in range(n)])
  idx[rng.random(idx.shape) < 0.1] = -1
  idx[: n // 2, 0] = 0  # skew
  idx = idx.astype(np.int32)
  w = rng.random(idx.shape, dtype=np.float32)
  mesh = jax.sharding.Mesh(np.array(GPUS), ("ep",))

  def round_trip(x, idx, w):
    r = ragged.routes(idx, num_experts=experts, num_ranks=ranks,
                      axis_name="ep")
    y = ragged.dispatch(x, idx, r, num_ranks=ranks, axis_name="ep")
    return ragged.combine(y, idx, w, r, axis_name="ep")

  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
  out = jax.jit(jax.shard_map(round_trip, mesh=mesh, in_specs=P("ep"),
                              out_specs=P("ep")))(put(x), put(idx), put(w))
  want = x * np.where(idx >= 0, w, 0).sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5,
                             err_msg=f"seed={seed}")
