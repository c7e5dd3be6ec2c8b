"""The "cuda" backend of `get_dispatch_layout` (this module is the
`backend.LayoutBackend`): the FFI call of its kernel, target
jax_ep_get_dispatch_layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep._src import native
from jax_ep._src import sizes

_TARGET = "jax_ep_get_dispatch_layout"


def limits() -> tuple[int, int]:
  """The most ranks and experts the layout kernel takes."""
  limit = sizes.limits()
  return limit["max_ranks"], limit["max_normal_experts"]


def takes(num_ranks: int, num_experts: int) -> bool:
  """Whether the layout kernel takes R = `num_ranks` and E = `num_experts`."""
  max_ranks, max_experts = limits()
  return num_ranks <= max_ranks and num_experts <= max_experts


def get_dispatch_layout(
    topk_idx: jax.Array, *, num_experts: int, num_ranks: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-rank and per-expert counts of this shard's routing, on the GPU.

  Same contract as `jax_ep._src.reference.layout.get_dispatch_layout`. Call
  per shard (inside `jax.shard_map`): shapes are per device. The public op
  has checked the arguments; here only the kernel's limits are.

  Args:
    topk_idx: `int32[T, K]` expert ids, `1 <= K <= 32`; `-1` selects nothing;
      ids outside `[-1, E)` select nothing and are counted in `num_invalid`.
    num_experts: E, a multiple of `num_ranks`, at most 1024.
    num_ranks: R, the EP size the layout is computed for, at most 64.

  Returns:
    `(num_tokens_per_rank int32[R], num_tokens_per_expert int32[E],
    is_token_in_rank bool[T, R], num_invalid int32[])`.
  """
  op = "get_dispatch_layout"
  if not takes(num_ranks, num_experts):
    max_ranks, max_experts = limits()
    raise ValueError(
        f"jax_ep.{op}: the CUDA kernel supports num_experts <= {max_experts} "
        f"and num_ranks <= {max_ranks}, got {num_experts} and {num_ranks}; "
        "use backend='reference'")
  if not native.register_targets():
    raise RuntimeError(
        f"jax_ep.{op}: the CUDA kernels are unavailable (jax_ep._jax_ep: "
        f"{native.unavailable_reason()})")
  num_tokens = topk_idx.shape[0]
  out_types = (
      jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
      jax.ShapeDtypeStruct((num_experts,), jnp.int32),
      jax.ShapeDtypeStruct((num_tokens, num_ranks), jnp.bool_),
      jax.ShapeDtypeStruct((), jnp.int32),
  )
  return tuple(jax.ffi.ffi_call(_TARGET, out_types)(
      topk_idx, num_experts=np.int64(num_experts),
      num_ranks=np.int64(num_ranks)))
