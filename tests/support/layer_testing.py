"""What the example layers' tests share: a layer's gradients under its mesh,
and their comparison with a dense model's, leaf by leaf."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def compare_gradients(moe, x, mesh, dense_loss: Callable,
                      cotangent: np.ndarray, *, rtol=1e-4, atol=1e-5) -> None:
  """The layer's gradients of `sum(moe(x) * cotangent)` (parameters and x)
  equal `jax.grad(dense_loss)(params, x)`'s within the tolerances, and none
  of the dense ones is all zero (every parameter takes part)."""

  @nnx.jit
  def layer_grads(moe, x):
    loss = lambda moe, x: jnp.sum(moe(x) * cotangent)  # noqa: E731
    return nnx.grad(loss, argnums=(0, 1))(moe, x)

  with jax.set_mesh(mesh):
    d_params, d_x = layer_grads(moe, x)
  got = jax.device_get((nnx.to_pure_dict(d_params), d_x))
  params = jax.device_get(nnx.to_pure_dict(nnx.state(moe, nnx.Param)))
  want = jax.grad(dense_loss, argnums=(0, 1))(params, np.asarray(x))
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
  for (path, g), (_, w) in zip(flat_got, flat_want):
    name = "d_x" if not path[1:] else jax.tree_util.keystr(path[1:])
    assert np.abs(w).max() > 0, name
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)
