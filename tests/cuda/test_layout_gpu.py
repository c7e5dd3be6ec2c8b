"""GPU tests of the CUDA get_dispatch_layout kernel.

The kernel runs under `jax.jit` inside `jax.shard_map` over every local GPU
(axis "ep"), each shard with its own random routing, and every output element
is compared with the reference backend and with `layout_model`, a plain loop
written from docs/contract.md. The kernel's `num_ranks` is the logical EP
size the layout is computed for; it need not match the number of GPUs. Inputs
are fresh random routings (conftest's `seed`; JAX_EP_TEST_SEED replays a
failure).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gpu_testing import GPUS, NEEDS_KERNELS
from jax_ep._src import native
from jax_ep._src.cuda import layout as cuda_layout
from jax_ep._src.reference import layout as reference_layout



pytestmark = NEEDS_KERNELS

OUTPUT_NAMES = ("num_tokens_per_rank", "num_tokens_per_expert",
                "is_token_in_rank", "num_invalid")
INT32 = np.iinfo(np.int32)


def layout_model(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
  """The layout of one shard, one (t, k) entry at a time."""
  num_tokens, num_topk = topk_idx.shape
  experts_per_rank = num_experts // num_ranks
  per_expert = np.zeros(num_experts, np.int32)
  in_rank = np.zeros((num_tokens, num_ranks), np.bool_)
  invalid = 0
  for t in range(num_tokens):
    for k in range(num_topk):
      expert = int(topk_idx[t, k])
      if expert == -1:
        continue
      if not 0 <= expert < num_experts:
        invalid += 1
        continue
      per_expert[expert] += 1
      in_rank[t, expert // experts_per_rank] = True
  per_rank = in_rank.sum(0).astype(np.int32)
  return per_rank, per_expert, in_rank, np.int32(invalid)


def random_topk(rng: np.random.Generator, num_tokens: int, num_topk: int,
                num_experts: int) -> np.ndarray:
  """Skewed routing with duplicates, -1 entries and some invalid ids."""
  ids = rng.integers(0, num_experts, (num_tokens, num_topk), dtype=np.int32)
  ids[rng.random(num_tokens) < 0.7, 0] = 0  # a hot expert
  if num_topk > 1:
    twice = rng.random(num_tokens) < 0.1
    ids[twice, 1] = ids[twice, 0]  # the same expert twice in a token
  ids[rng.random(ids.shape) < 0.1] = -1
  invalid = rng.random(ids.shape) < 0.01
  bad_ids = np.array(
      [-5, -2, num_experts, num_experts + 3, INT32.min, INT32.max], np.int32)
  ids[invalid] = rng.choice(bad_ids, int(invalid.sum()))
  return ids


@functools.cache
def sharded(impl, num_experts: int, num_ranks: int):
  """`impl` under jit + shard_map over every GPU, compiled once per shape.

  The outputs get a leading shard axis (is_token_in_rank: the shards'
  rows concatenated).
  """
  mesh = Mesh(np.array(GPUS), ("ep",))

  def per_shard(idx):
    per_rank, per_expert, in_rank, invalid = impl(
        idx, num_experts=num_experts, num_ranks=num_ranks)
    return per_rank[None], per_expert[None], in_rank, invalid[None]

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"),
                               out_specs=(P("ep"),) * 4))


def run_sharded(impl, topk_idx: np.ndarray, num_experts: int, num_ranks: int):
  """Runs `impl` on each GPU's rows of topk_idx; numpy outputs."""
  outputs = sharded(impl, num_experts, num_ranks)(jnp.asarray(topk_idx))
  return tuple(np.asarray(x) for x in outputs)


def model_sharded(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
  shards = [layout_model(rows, num_experts, num_ranks)
            for rows in np.split(topk_idx, len(GPUS))]
  per_rank, per_expert, in_rank, invalid = zip(*shards)
  return (np.stack(per_rank), np.stack(per_expert), np.concatenate(in_rank),
          np.stack(invalid))


def assert_layouts_equal(got, want, *, against: str, context: str) -> None:
  for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True):
    np.testing.assert_array_equal(
        g, w, strict=True, err_msg=f"{name} differs from {against} ({context})")


def check_kernel(topk_idx: np.ndarray, num_experts: int, num_ranks: int,
                 context: str) -> None:
  got = run_sharded(cuda_layout.get_dispatch_layout, topk_idx, num_experts,
                    num_ranks)
  assert_layouts_equal(got, model_sharded(topk_idx, num_experts, num_ranks),
                       against="the numpy model", context=context)
  if topk_idx.shape[0] == 0:
    # The reference cannot reshape its empty [0, K, E] selection mask (its
    # reshape(..., R, -1) is ambiguous on size 0); the model covers T = 0.
    return
  reference = run_sharded(reference_layout.get_dispatch_layout, topk_idx,
                          num_experts, num_ranks)
  assert_layouts_equal(got, reference, against="the reference backend",
                       context=context)


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
@pytest.mark.parametrize("num_experts", [8, 256])
@pytest.mark.parametrize("num_topk", [1, 8])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 128, 4096])
def test_matches_reference_and_model(seed, num_tokens, num_topk, num_experts,
                                     num_ranks):
  rng = np.random.default_rng(seed)
  # Two calls of one compiled executable: the second may replay a command
  # buffer and reuses output memory holding the first call's results.
  for call in range(2):
    topk_idx = random_topk(rng, num_tokens * len(GPUS), num_topk, num_experts)
    check_kernel(topk_idx, num_experts, num_ranks,
                 f"seed={seed}, call {call}, T={num_tokens}, K={num_topk}, "
                 f"E={num_experts}, R={num_ranks}")


# Partial last expert block (E=12), several rank blocks (R=64), the largest
# sizes the kernel supports, T*K not a multiple of 4 (scalar tail of the
# vector loads) and L=1.
@pytest.mark.parametrize("num_tokens,num_topk,num_experts,num_ranks", [
    (4097, 3, 12, 4),
    (1000, 8, 256, 64),
    (513, 32, 1024, 64),
    (33, 5, 16, 16),
    (5, 32, 32, 1),
])
def test_edge_sizes(seed, num_tokens, num_topk, num_experts, num_ranks):
  rng = np.random.default_rng(seed)
  topk_idx = random_topk(rng, num_tokens * len(GPUS), num_topk, num_experts)
  check_kernel(topk_idx, num_experts, num_ranks,
               f"seed={seed}, T={num_tokens}, K={num_topk}, E={num_experts}, "
               f"R={num_ranks}")


def test_handcrafted():
  # E=8 on R=2 ranks: experts 0-3 on rank 0, 4-7 on rank 1.
  topk_idx = np.array([
      [0, 0, -1],  # expert 0 twice: counts 2 for expert 0, 1 for rank 0
      [5, -1, 9],  # 9 is invalid
      [-7, 3, 7],  # -7 is invalid
      [-1, -1, -1],  # selects nothing
  ], np.int32)
  want = (
      np.array([2, 2], np.int32),
      np.array([2, 0, 0, 1, 0, 1, 0, 1], np.int32),
      np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.bool_),
      np.int32(2),
  )
  got = run_sharded(cuda_layout.get_dispatch_layout,
                    np.tile(topk_idx, (len(GPUS), 1)), 8, 2)
  shards = len(GPUS)
  want_sharded = (np.tile(want[0], (shards, 1)), np.tile(want[1], (shards, 1)),
                  np.tile(want[2], (shards, 1)), np.full(shards, want[3]))
  assert_layouts_equal(got, want_sharded, against="the expected values",
                       context="handcrafted")


def _raw_call(topk_idx, out_types, num_experts, num_ranks):
  """The FFI target without the Python-side checks of cuda_layout."""
  assert native.register_targets()
  return jax.ffi.ffi_call("jax_ep_get_dispatch_layout", out_types)(
      topk_idx, num_experts=np.int64(num_experts),
      num_ranks=np.int64(num_ranks))


def _out_types(num_tokens, num_experts, num_ranks):
  return (jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
          jax.ShapeDtypeStruct((num_experts,), jnp.int32),
          jax.ShapeDtypeStruct((num_tokens, num_ranks), jnp.bool_),
          jax.ShapeDtypeStruct((), jnp.int32))


def test_handler_rejects_mismatched_results():
  topk_idx = jnp.zeros((16, 2), jnp.int32, device=GPUS[0])
  out_types = list(_out_types(16, 8, 2))
  out_types[0] = jax.ShapeDtypeStruct((3,), jnp.int32)
  want = r"num_tokens_per_rank must have shape \[2\], got \[3\]"
  with pytest.raises(jax.errors.JaxRuntimeError, match=want):
    jax.block_until_ready(jax.jit(
        lambda x: _raw_call(x, tuple(out_types), 8, 2))(topk_idx))


def test_kernel_rejects_unsupported_sizes():
  topk_idx = jnp.zeros((16, 2), jnp.int32, device=GPUS[0])
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r"num_experts must be in \[1, 1024\], got 2048"):
    jax.block_until_ready(jax.jit(
        lambda x: _raw_call(x, _out_types(16, 2048, 2), 2048, 2))(topk_idx))
