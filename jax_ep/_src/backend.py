"""The seam between the public ops and what runs them.

A public op (`layout.py`, `normal.py`, `low_latency.py`) validates its
arguments once, then asks its `Buffer` for the backend of its family
(`Buffer.layout_backend(op)`, `.normal_backend(op)`,
`.low_latency_backend(op)`) and calls it. Each family has two backends with
the same methods and the same results, bit for bit (docs/contract.md):

  family        "reference" (pure JAX)         "cuda" (FFI calls to kernels)
  layout        reference/layout.py            cuda/layout.py
  normal        reference/normal.py            cuda/intranode.py
  low-latency   reference/low_latency.py       cuda/low_latency.py

A "cuda" backend owns what its kernels need (peer buffers, the NVSHMEM heap,
the tuning) and builds the `ffi_call`s; their handlers are in `xla_ffi/` and
the kernels in `csrc/`, in files named after the family. Every
method runs per shard, inside `jax.shard_map` over the EP axis, on arguments
the op has already checked.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from jax_ep._src.handles import DispatchHandle, LowLatencyDispatched, LowLatencyHandle


class LayoutBackend(Protocol):

  def get_dispatch_layout(self, topk_idx: jax.Array, *, num_experts: int,
                          num_ranks: int) -> tuple[jax.Array, ...]:
    """`(num_tokens_per_rank[R], num_tokens_per_expert[E],
    is_token_in_rank[T, R], num_invalid[])`, the fields of `Layout`."""


class NormalBackend(Protocol):

  def dispatch(self, rows: tuple[jax.Array, ...], topk_idx: jax.Array,
               topk_weights: jax.Array | None, *, num_ranks: int,
               num_experts: int, capacity: int, expert_alignment: int):
    """Fresh dispatch of `rows` (`(x,)`, or fp8 `(q, scales)`): returns
    `(recv_rows, recv_topk_idx, recv_topk_weights or None,
    num_recv_tokens_per_expert, handle)`."""

  def cached_dispatch(self, rows: tuple[jax.Array, ...],
                      handle: DispatchHandle) -> tuple[jax.Array, ...]:
    """`rows` along `handle`'s routes (a tuple like `rows`)."""

  def combine(self, y: jax.Array, handle: DispatchHandle,
              bias: jax.Array | None, out_dtype) -> jax.Array:
    """fp32 sum in rank order of every rank's rows of each token, plus the
    f32 `bias`, rounded once to `out_dtype` (f32 or y's dtype)."""


class LowLatencyBackend(Protocol):
  """Each op whole, or in two halves; the pending value of a send is opaque
  to the caller and goes to the matching receive unchanged (`RecvHook`)."""

  axis_name: str  # the EP axis

  def dispatch_send(self, x: jax.Array, topk_idx: jax.Array, *,
                    num_ranks: int, num_experts: int, max_tokens: int,
                    use_fp8: bool, round_scale: bool,
                    use_ue8m0: bool) -> Any:
    ...

  def dispatch_receive(self, pending: Any, *, num_ranks: int,
                       num_experts: int, max_tokens: int, num_tokens: int,
                       num_topk: int, hidden: int, use_fp8: bool,
                       round_scale: bool, use_ue8m0: bool,
                       zero_padding: bool) -> LowLatencyDispatched:
    ...

  def combine_send(self, y: jax.Array, topk_idx: jax.Array,
                   topk_weights: jax.Array, handle: LowLatencyHandle, *,
                   zero_copy: bool) -> Any:
    ...

  def combine_receive(self, pending: Any) -> jax.Array:
    """`bf16[T, H]`: each token's weighted sum (docs/contract.md)."""

  def dispatch(self, x: jax.Array, topk_idx: jax.Array, *, num_ranks: int,
               num_experts: int, max_tokens: int, use_fp8: bool,
               round_scale: bool, use_ue8m0: bool,
               zero_padding: bool) -> LowLatencyDispatched:
    """What `dispatch_receive` returns for `dispatch_send`'s pending value,
    in as few operations as the backend has."""

  def combine(self, y: jax.Array, topk_idx: jax.Array,
              topk_weights: jax.Array, handle: LowLatencyHandle, *,
              zero_copy: bool) -> jax.Array:
    """What `combine_receive` returns for `combine_send`'s pending value, in
    as few operations as the backend has."""
