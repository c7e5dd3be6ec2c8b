"""jax_ep.overlap and the automatic SM grid (Config.num_sms = 0) on CPUs.

The streams themselves need a GPU (bench/overlap.py measures them); here:
what `overlap` returns and differentiates, with its compute_on path taken as
on the cuda backend (XLA:CPU ignores the stream annotations), which ops see
themselves traced beside computation, and the grid each case gets.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from ep_testing import Ep, assert_same, routing
from jax_ep._src import overlap as overlap_lib
from jax_ep._src.config import ALONE_NUM_SMS, OVERLAP_NUM_SMS

R, T, H, E, K = 2, 8, 32, 8, 2


@dataclasses.dataclass
class StreamsBuffer:
  """A Buffer as `overlap` sees one on the cuda backend; the ops inside use
  the reference Buffer."""
  backend: str = "cuda"


def _layer(ep, streams: bool):
  """jit(shard_map): (x, idx, a, b) -> (combine(dispatch(x)) * 2,
  relu(a) @ b), the two parts through `overlap`, and where each part was
  traced."""
  seen = {}
  buffer = StreamsBuffer() if streams else ep.buffer

  def comm(x, idx):
    seen["comm"] = overlap_lib.beside_compute()
    d = jax_ep.dispatch(ep.buffer, x, idx, num_experts=E)
    return jax_ep.combine(ep.buffer, d.x * 2, d.handle)

  def compute(a, b):
    seen["compute"] = overlap_lib.beside_compute()
    return jnp.where(a > 0, a, 0) @ b  # jnp.where: a nested jit

  def body(x, idx, a, b):
    return jax_ep.overlap(buffer, lambda: comm(x, idx), lambda: compute(a, b))

  return ep.sharded(body, per_rank=False), seen


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((R * T, H)).astype(np.float32)
  idx = routing(rng, R, T, K, E, "hot").reshape(R * T, K)
  a = rng.standard_normal((R * H, H)).astype(np.float32)
  b = rng.standard_normal((R * H, H)).astype(np.float32)
  return x, idx.astype(np.int32), a, b


@pytest.mark.parametrize("streams", [False, True], ids=["reference", "streams"])
def test_overlap_returns_both_parts_and_their_gradients(streams):
  ep = Ep(R)
  layer, seen = _layer(ep, streams)
  x, idx, a, b = _inputs(seed=3)

  def parts(x, idx, a, b):
    d = jax_ep.dispatch(ep.buffer, x, idx, num_experts=E)
    return (jax_ep.combine(ep.buffer, d.x * 2, d.handle),
            jnp.where(a > 0, a, 0) @ b)

  separate = ep.sharded(parts, per_rank=False)

  def loss(f):
    def scalar(x, a, b):
      y, z = f(x, idx, a, b)
      return jnp.sum(y * y) + jnp.sum(jnp.sin(z))
    return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2)))

  with ep.active():
    got, want = layer(x, idx, a, b), separate(x, idx, a, b)
    got_grad, want_grad = loss(layer)(x, a, b), loss(separate)(x, a, b)
    hlo = jax.jit(layer).lower(x, idx, a, b).as_text()
  for g, w, what in zip(got, want, ("combined", "relu(a) @ b")):
    assert_same(np.asarray(g), np.asarray(w), what, f"streams={streams}")
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6,
                               atol=1e-6)
  assert seen == {"comm": streams, "compute": False}
  # Only the two calls carry XLA's stream annotation, not the operations
  # inside them (a nested jit so marked fails to compile on GPUs).
  assert hlo.count("_xla_stream_annotation") == (2 if streams else 0)


def test_the_automatic_grid_follows_where_the_kernels_run():
  auto = jax_ep.Config()
  assert auto.num_sms == 0
  assert auto.resolved_num_sms(beside_compute=True, sm_count=132) == \
      OVERLAP_NUM_SMS == 24
  assert auto.resolved_num_sms(beside_compute=False, sm_count=132) == \
      ALONE_NUM_SMS == 64
  # A GPU with fewer SMs than the alone grid: all of them, kept even.
  assert auto.resolved_num_sms(beside_compute=False, sm_count=33) == 32
  assert auto.resolved_num_sms(beside_compute=False, sm_count=None) == 64
  fixed = jax_ep.Config(num_sms=20)
  assert {fixed.resolved_num_sms(beside_compute=b, sm_count=132)
          for b in (False, True)} == {20}


def test_a_reference_buffer_has_no_kernel_grid():
  ep = Ep(R)
  assert ep.buffer.num_sms() is None
  assert ep.buffer.num_sms(beside_compute=True) is None


@pytest.mark.parametrize("streams", [False, True], ids=["reference", "streams"])
def test_a_jax_ep_op_in_compute_is_refused(streams):
  # It would run beside comm's ops on another stream: two jax_ep ops at once.
  ep = Ep(R)
  buffer = StreamsBuffer() if streams else ep.buffer
  x, idx, _, _ = _inputs(seed=4)

  def body(x, idx):
    def dispatched():
      return jax_ep.dispatch(ep.buffer, x, idx, num_experts=E).x
    return jax_ep.overlap(buffer, lambda: x * 2, dispatched)

  with ep.active(), pytest.raises(ValueError, match=r"jax_ep\.dispatch: "
                                  r"called inside jax_ep\.overlap's compute"):
    ep.sharded(body, per_rank=False)(x, idx)
  # The same op in comm runs, and an op after the overlap is traced as
  # usual again.
  def after(x, idx):
    out, _ = jax_ep.overlap(buffer, lambda: jax_ep.dispatch(
        ep.buffer, x, idx, num_experts=E).x.sum(), lambda: x * 2)
    return out + jax_ep.dispatch(ep.buffer, x, idx, num_experts=E).x.sum()

  with ep.active():
    ep.sharded(after)(x, idx)
