"""Intranode (NVLink) kernels: the notify step (FFI jax_ep_intranode_notify).

Needs the peer buffers of every EP device (`peer_buffers.create_peer_buffers`)
to exist before the first call runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep._src import checks
from jax_ep._src import native

_NOTIFY_TARGET = "jax_ep_intranode_notify"
# The control region's limits (csrc/runtime/peer_buffers.cuh).
MAX_RANKS = 64
MAX_EXPERTS = 1024
DEFAULT_TIMEOUT_S = 10.0


def notify(num_tokens_per_rank: jax.Array, num_tokens_per_expert: jax.Array,
           *, num_ranks: int, num_experts: int, expert_alignment: int = 1,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[jax.Array, jax.Array]:
  """Exchanges every rank's dispatch counts over NVLink (collective).

  Call per shard inside `jax.shard_map` over the EP axis, on every rank, the
  same number of times in the same order: each call is one round of the
  protocol in csrc/intranode/notify.cu. The rank of a shard is the rank its
  device was given in `create_peer_buffers`.

  Args:
    num_tokens_per_rank: `int32[R]`, this rank's tokens per destination rank
      (from `get_dispatch_layout`).
    num_tokens_per_expert: `int32[E]`, this rank's (token, expert) selections
      per expert (from `get_dispatch_layout`).
    num_ranks: R, the EP size the peer buffers were created for.
    num_experts: E, a multiple of R, at most 1024.
    expert_alignment: each entry of `recv_tokens_per_expert` is rounded up to
      a multiple of this.
    timeout_s: how long one rank waits for the others before the kernel
      prints its rank and phase and traps (the process then fails).

  Returns:
    `(count_matrix int32[R, R], recv_tokens_per_expert int32[E/R])`:
    `count_matrix[s, d]` is the number of tokens rank s sends to rank d (the
    same on every rank); `recv_tokens_per_expert[l]` is the number of
    selections of this rank's local expert l over all source ranks, rounded
    up to `expert_alignment`.
  """
  op = "intranode_notify"
  num_ranks = checks.positive_int(op, "num_ranks", num_ranks)
  num_experts = checks.experts(op, num_experts, num_ranks)
  expert_alignment = checks.positive_int(op, "expert_alignment",
                                         expert_alignment)
  if num_ranks > MAX_RANKS or num_experts > MAX_EXPERTS:
    raise ValueError(
        f"jax_ep.{op}: supports num_ranks <= {MAX_RANKS} and num_experts <= "
        f"{MAX_EXPERTS}, got {num_ranks} and {num_experts}")
  if not timeout_s > 0:
    raise ValueError(f"jax_ep.{op}: timeout_s must be > 0, got {timeout_s!r}")
  checks.array(op, "num_tokens_per_rank", num_tokens_per_rank, ndim=1,
               dtypes=(jnp.int32,), shape=(num_ranks,))
  checks.array(op, "num_tokens_per_expert", num_tokens_per_expert, ndim=1,
               dtypes=(jnp.int32,), shape=(num_experts,))
  if not native.register_targets():
    raise RuntimeError(
        f"jax_ep.{op}: the CUDA kernels are unavailable (jax_ep._jax_ep: "
        f"{native.unavailable_reason()})")
  out_types = (
      jax.ShapeDtypeStruct((num_ranks, num_ranks), jnp.int32),
      jax.ShapeDtypeStruct((num_experts // num_ranks,), jnp.int32),
  )
  # Side effect: every call is one protocol round on every rank, so XLA must
  # neither drop nor merge calls.
  call = jax.ffi.ffi_call(_NOTIFY_TARGET, out_types, has_side_effect=True)
  return tuple(call(
      num_tokens_per_rank, num_tokens_per_expert,
      num_ranks=np.int64(num_ranks), num_experts=np.int64(num_experts),
      expert_alignment=np.int64(expert_alignment),
      timeout_ns=np.int64(round(timeout_s * 1e9))))
