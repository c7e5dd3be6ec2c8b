"""`jax_ep.overlap`: communication beside computation, each on its own XLA
stream (docs/measuring.md, "Overlap").

XLA runs a custom call on its compute stream, in program order with the
model's matmuls. Under `compute_on("gpu_stream:N")` a computation becomes an
async start/done pair on stream N. Measured with jax 0.11.2 on one H200
(bench/overlap.py): with the communication alone on a second stream XLA
still issued its start after the step's independent matmuls; with the
communication on one extra stream and the independent computation on
another, both starts come before either done, and jax_ep's kernels ran
wholly beside the matmuls. That is what `overlap` writes.

The normal ops traced inside `comm` take `Config.num_sms` SMs, 24 when it is
0 (automatic), and leave the rest to `compute`; traced elsewhere they take
the automatic grid for a GPU they have to themselves. The choice is made
when an op is traced, and a custom VJP's backward keeps its forward's.

Every jax_ep op of a program that overlaps goes through `overlap` (alone:
`compute=None`), so that all of them run on the one communication stream,
in program order: jax_ep's kernels of two ops must not run at once. An op
traced inside `compute` is refused (`check_not_in_compute`); one traced
outside any `overlap` in a program that overlaps cannot be seen at trace
time, and is the caller's to avoid.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import jax
from jax.experimental.compute_on import compute_on
from jax._src import config as jax_config  # compute_on's context (0.11.2)

# XLA's extra compute streams (compute_on's "gpu_stream:N"): one for the
# communication, one for what runs beside it.
COMM_STREAM = "gpu_stream:1"
COMPUTE_STREAM = "gpu_stream:2"

_beside_compute = contextvars.ContextVar("jax_ep_beside_compute",
                                         default=False)
_in_compute = contextvars.ContextVar("jax_ep_in_overlap_compute",
                                     default=False)


def beside_compute() -> bool:
  """Whether the op being traced runs beside computation (inside
  `overlap`'s `comm`)."""
  return _beside_compute.get()


@contextlib.contextmanager
def _set(flag: contextvars.ContextVar):
  """`flag` is True while the context is open."""
  token = flag.set(True)
  try:
    yield
  finally:
    flag.reset(token)


def tracing_beside_compute():
  """While it is open, ops are traced as beside computation."""
  return _set(_beside_compute)


def check_not_in_compute(op: str) -> None:
  """Refuses jax_ep op `op` traced inside `overlap`'s `compute`, which runs
  beside the communication: two jax_ep ops would run at once."""
  if _in_compute.get():
    raise ValueError(
        f"jax_ep.{op}: called inside jax_ep.overlap's compute, which runs "
        "beside its comm on another stream; two jax_ep ops must not run at "
        "once: call it in comm, or in an overlap of its own")


def _traced_without_stream(f: Callable[[], Any]) -> Callable[[], Any]:
  """`f`, its operations traced without compute_on's stream annotation, so
  that only the call of the computation carries it. In jax 0.11.2 every
  operation traced inside compute_on("gpu_stream:N") gets the annotation
  (and is marked not inlineable), so a jitted function it calls (jnp.where's,
  for one) becomes an async call of its own inside the async computation,
  which XLA fails to compile ("No ExecutionStreamId found for call-start
  ... only reachable through embedded calls"; the DeepSeek-V3 layer's
  experts on one H200). XLA runs the whole computation on stream N all the
  same."""
  def traced():
    outer = jax_config.compute_on_context_manager.swap_local(None)
    try:
      return f()
    finally:
      jax_config.compute_on_context_manager.set_local(outer)
  return traced


def overlap(buffer, comm: Callable[[], Any],
            compute: Callable[[], Any] | None = None) -> tuple[Any, Any]:
  """Runs `comm()` and `compute()` beside each other; returns both results.

  For the DualPipe-style schedule of MoE training: one micro-batch's dispatch
  or combine while another's expert GEMMs run. `comm` and `compute` take no
  arguments (close over what they use) and must not depend on each other.
  Differentiable: the backward of each part runs on the part's stream.

  On the "cuda" backend `comm` runs on one extra XLA stream (the
  communication stream) and `compute` on another; the normal kernels traced
  in `comm` take `buffer.config.num_sms` SMs, 24 when it is 0 (the
  default), so `compute` keeps the rest. On the "reference" backend both run
  as written: plain XLA ops, which XLA schedules itself.

  Two jax_ep ops must never run at once (their kernels share the Buffer's
  memory), and XLA may run work of different streams at once: in a program
  that uses `overlap`, run every jax_ep op through it, with `compute=None`
  for one that has nothing beside it. The communication stream then runs
  them one after another, in the program's order, on every rank.

  Args:
    buffer: the `jax_ep.Buffer` the ops in `comm` use.
    comm: jax_ep ops (and anything else to run on the communication stream).
    compute: independent computation, or None; no jax_ep op (refused on
      every backend).

  Returns:
    `(comm(), compute())` (None for no `compute`).
  """
  if buffer.backend != "cuda":
    if compute is None:
      return comm(), None
    comm_out = comm()
    with _set(_in_compute):
      return comm_out, compute()
  on_device = jax.memory.Space.Device
  with tracing_beside_compute():
    comm_out = compute_on(_traced_without_stream(comm),
                          compute_type=COMM_STREAM,
                          out_memory_spaces=on_device)()
  if compute is None:
    return comm_out, None
  with _set(_in_compute):
    return comm_out, compute_on(_traced_without_stream(compute),
                                compute_type=COMPUTE_STREAM,
                                out_memory_spaces=on_device)()
