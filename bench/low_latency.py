"""Low-latency dispatch / combine benchmarks (docs/measuring.md), peers in the
same run, on `bench.normal.Problem`'s inputs with Tmax = tokens per rank.

Ops:
  ll_dispatch          fp8 or bf16 rows into the experts' slots
  ll_combine           random bf16 expert outputs y[L, R*Tmax, H], weighted,
                       back to their tokens' ranks
  ll_dispatch_combine  both; the combine reads a stand-in for the experts'
                       output, and waits for the dispatched rows
  ll_overlap           what the receive hooks hide, three records:
                       ll_overlap_compute  one compute block alone (bf16
                                           matmuls, ~60 us on an H200)
                       ll_overlap_serial   dispatch, compute, combine, compute,
                                           each waiting for the last
                       ll_overlap_hooked   the same with each compute block
                                           between its op's send and receive;
                                           its note says how much of the serial
                                           communication time it hid

Implementations:
  jax_ep      the "cuda" backend's LL kernels (NVSHMEM: one process per GPU).
              Its dispatch runs with zero_padding=False: rows past each
              expert's count are left unwritten, as DeepEP leaves them (the
              records' note says so; the reference always zeros them).
  reference   jax_ep's pure-JAX backend: dispatch all-gathers every rank's
              rows and ids and gathers them into the slots; combine sends f32
              partial sums home with an all_to_all.
  all_to_all  raw `lax.all_to_all`s of byte rows moving the LL logical bytes,
              one per phase (dispatch, combine).

Bytes per rank, counted as DeepEP counts them, per (token, expert) selection
that is not -1: fp8 dispatch H + H/32 + 16 (e4m3 row, an f32 scale per 128
channels, 16 bytes of metadata), bf16 dispatch 2H, combine 2H.
  logical = those bytes of every selection this rank receives (local ones
            included) / time.
  link    = bytes that crossed to another GPU / time. jax_ep: the counted
            bytes of the selections whose expert is on another rank.
            reference: the (R-1)*T rows its dispatch gathers (fp8 H + H/32,
            bf16 2H) and the (R-1)*T f32 rows (4H) of partials its combine
            sends (the ids and weights it also moves are left out).
            all_to_all: (R-1)/R of its arrays.
The overlap records have no byte figures: their time includes the compute.

With --profile, each dispatch / combine record's note lists every kernel of
the loop with its median time per launch (from the profiler), and jax_ep's
and all_to_all's records get `kernel_us`, their own kernels' time per call
(jax_ep: its LL kernels; all_to_all: NCCL's), as DeepEP's tests report
theirs. The reference gets none: its collectives run on a stream of their
own, so their spans include waiting beside its other kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from bench import harness, kernel_time, normal
from bench.shapes import Shape

OPS = ("ll_dispatch", "ll_combine", "ll_dispatch_combine", "ll_overlap")
# With --profile, the kernels a record's kernel_us sums, by substring of their
# names: jax_ep's LL kernels, NCCL's. The reference gets none: its NCCL
# collectives run on their own stream, beside its other kernels.
_OWN_KERNELS = {"jax_ep": "low_latency", "all_to_all": "nccl"}
# The overlap's compute block: COMPUTE_MATMULS chained `tanh(a @ b)` on
# [COMPUTE_SIZE, COMPUTE_SIZE] bf16 (~60 us together on an H200).
COMPUTE_SIZE = 2048
COMPUTE_MATMULS = 2


def dispatch_bytes(hidden: int, fp8: bool) -> int:
  """DeepEP's count for one dispatched selection."""
  return hidden + hidden // 32 + 16 if fp8 else 2 * hidden


def combine_bytes(hidden: int) -> int:
  """DeepEP's count for one combined selection."""
  return 2 * hidden


def gathered_row_bytes(hidden: int, fp8: bool) -> int:
  """One row the reference's dispatch all-gathers (fp8: with f32 scales)."""
  return normal._row_bytes(hidden, fp8)  # pylint: disable=protected-access


def _after(value, *deps):
  """`value`, pinned after `deps` in XLA's schedule (as `RecvHook` pins).

  Only `deps` that something else reads: XLA drops the others from the
  barrier, and then computes them not at all (seen on GPUs, jax 0.11).
  """
  return lax.optimization_barrier((value, deps))[0]


def _with_element_of(out, a):
  """2-D `out` with the first element of `a` written at [0, 0]: `out` now
  depends on `a` (as the harness links one call to the next)."""
  first = a.reshape(-1)[:1].reshape(1, 1).astype(out.dtype)
  return lax.dynamic_update_slice(out, first, (0, 0))


def _compute(a, b):
  for _ in range(COMPUTE_MATMULS):
    a = jnp.tanh(a @ b)
  return a


def _op_then_compute(op, a, b, hooked: bool):
  """Runs `op(return_recv_hook)` and one compute block on `a` after it.

  Without hooks the compute waits for the op's result. With hooks it runs
  between the op's send and its receive, which waits for the compute.
  Returns `(op's result, compute's result)`.
  """
  if not hooked:
    result = op(False)
    return result, _compute(_after(a, result), b)
  hook = op(True)
  # Compute only once the send is issued: XLA could otherwise schedule it
  # before the send, with nothing in flight to overlap.
  a = _compute(_after(a, hook.pending), b)
  return hook(a), a


def _random(mesh, shape, dtype, seed: int, scale: float = 1.0):
  """A random global array sharded over 'ep', made on the devices."""
  def make():
    key = jax.random.key(seed)
    if jnp.issubdtype(dtype, jnp.integer):
      return jax.random.bits(key, shape, dtype)
    return (jax.random.normal(key, shape) * scale).astype(dtype)
  return jax.jit(make, out_shardings=NamedSharding(mesh, P("ep")))()


@dataclasses.dataclass(frozen=True)
class _Calls:
  """One implementation's LL ops at one shape (Tmax = tokens)."""
  buffer: jax_ep.Buffer
  shape: Shape
  dispatch_options: dict  # the kernels' own options

  def dispatch(self, x, idx, fp8: bool, hook: bool = False):
    return jax_ep.low_latency_dispatch(
        self.buffer, x, idx, num_max_dispatch_tokens_per_rank=self.shape.tokens,
        num_experts=self.shape.experts, use_fp8=fp8, return_recv_hook=hook,
        **self.dispatch_options)

  def combine(self, y, idx, weights, handle, hook: bool = False):
    """`y` comes flat, [L * R*Tmax, H]: the harness links 2-D arrays."""
    y = y.reshape(self.shape.experts // self.buffer.num_ranks, -1,
                  self.shape.hidden)
    return jax_ep.low_latency_combine(self.buffer, y, idx, weights, handle,
                                      return_recv_hook=hook)


def run(mesh, shape: Shape, *, impls, dtypes, ops, seed: int, iters: int,
        reps: int, warmup: int, unroll: int = 1,
        profile: bool = False) -> list[harness.Record]:
  """Times every impl and LL op on one shape; with `profile`, also the
  kernels' own time per call (bench/kernel_time.py)."""
  problem = normal.Problem(mesh, shape, seed)
  records = []
  timing = dict(iters=iters, reps=reps, warmup=warmup)

  def record(op, impl, dtype, seconds, logical=None, link=None, note=None,
             kernels=None):
    kernel_us = None
    if kernels is not None:
      times = kernel_time.per_kernel(kernels, iters)
      if impl in _OWN_KERNELS:
        # None where the loop runs none of them (the compute block alone).
        kernel_us = kernel_time.summary(times, _OWN_KERNELS[impl]) or None
      idle = kernel_time.idle_per_call(kernels, iters)
      note = "; ".join(filter(None, (
          note, f"GPU idle {idle:.1f} us per call", "kernels (us): " +
          kernel_time.describe(times))))
    records.append(harness.Record(
        op=op, impl=impl, dtype=dtype, tokens=shape.tokens,
        hidden=shape.hidden, topk=shape.topk, experts=shape.experts,
        ranks=problem.ranks, num_sms=None, time_us=seconds * 1e6,
        logical_gbps=harness.gbps(logical, seconds),
        link_gbps=harness.gbps(link, seconds), note=note, kernel_us=kernel_us))
    if jax.process_index() == 0:
      harness.print_row(records[-1])

  def timed(step, carry):
    """(seconds per call, the kernels of one profiled loop or None), from
    one compiled loop."""
    loop = harness.chained_loop(step, iters, mesh, unroll)
    seconds = harness.time_loop(loop, carry, **timing)
    if not profile:
      return seconds, None
    return seconds, kernel_time.kernel_intervals(loop, carry)

  for impl in impls:
    if impl == "all_to_all":
      _run_all_to_all(problem, ops, dtypes, record, timed)
    elif impl in ("jax_ep", "reference"):
      _run_impl(problem, impl, ops, dtypes, record, timed, seed)
    elif jax.process_index() == 0:
      print(f"{impl}: skipped (no low-latency counterpart)")
  return records


def _run_impl(problem: normal.Problem, impl: str, ops, dtypes, record, timed,
              seed: int) -> None:
  """jax_ep's kernels or its reference backend, every LL op asked for."""
  mesh, shape, ranks = problem.mesh, problem.shape, problem.ranks
  if impl == "jax_ep":
    if len(jax.local_devices()) > 1:
      if jax.process_index() == 0:
        print("jax_ep: skipped (the LL kernels need one process per GPU: "
              f"python -m jax_ep.launch -n {ranks} -- python -m bench ...)")
      return
    buffer = jax_ep.Buffer(mesh, "ep", backend="cuda",
                           num_ll_bytes=jax_ep.ll_buffer_bytes(
                               shape.tokens, shape.hidden, shape.experts))
    calls = _Calls(buffer, shape, dict(zero_padding=False))
    note = "zero_padding=False"
  else:
    buffer = jax_ep.Buffer(mesh, "ep", backend="reference")
    calls = _Calls(buffer, shape, {})
    note = None
  hidden = shape.hidden
  gathered = (ranks - 1) * shape.tokens

  def traffic(fp8: bool | None, combine: bool):
    """(logical, link) bytes per rank of a dispatch (fp8 or bf16; None: no
    dispatch) followed, if `combine`, by a combine."""
    counted = ((0 if fp8 is None else dispatch_bytes(hidden, fp8)) +
               (combine_bytes(hidden) if combine else 0))
    if impl == "jax_ep":
      return problem.recv_pairs * counted, problem.remote_pairs * counted
    # Whole rows: the ones dispatch gathers, the f32 partials combine sends.
    rows = ((0 if fp8 is None else gathered_row_bytes(hidden, fp8)) +
            (4 * hidden if combine else 0))
    return problem.recv_pairs * counted, gathered * rows

  x, idx, weights = problem.x, problem.idx, problem.weights
  if {"ll_combine", "ll_dispatch_combine", "ll_overlap"} & set(ops):
    slots = shape.experts * shape.tokens  # L * R*Tmax rows per rank
    y = _random(mesh, (ranks * slots, hidden), jnp.bfloat16, seed + 1)

  if "ll_dispatch" in ops:
    for dtype in dtypes:
      fp8 = dtype == "fp8"
      t, kernels = timed(lambda c, fp8=fp8: calls.dispatch(*c, fp8).x,
                         (x, idx))
      record("ll_dispatch", impl, dtype, t, *traffic(fp8, False), note,
             kernels)

  if "ll_combine" in ops:
    handle = jax.jit(normal._sharded(  # pylint: disable=protected-access
        mesh, lambda x, i: calls.dispatch(x, i, False).handle))(x, idx)
    t, kernels = timed(lambda c: calls.combine(*c), (y, idx, weights, handle))
    record("ll_combine", impl, "bf16", t, *traffic(None, True),
           kernels=kernels)

  def round_trip(fp8):
    def step(carry):
      x, idx, weights, y = carry
      d = calls.dispatch(x, idx, fp8)
      # Through the weights, the combine reads the rows (one element, as the
      # harness links calls): nothing drops or reorders the dispatch.
      return calls.combine(y, idx, _with_element_of(weights, d.x), d.handle)
    return step

  if "ll_dispatch_combine" in ops:
    for dtype in dtypes:
      fp8 = dtype == "fp8"
      t, kernels = timed(round_trip(fp8), (x, idx, weights, y))
      record("ll_dispatch_combine", impl, dtype, t, *traffic(fp8, True), note,
             kernels)

  if "ll_overlap" in ops:
    _run_overlap(problem, calls, impl, dtypes, record, timed, seed, note, y)
  buffer.close()


def _run_overlap(problem: normal.Problem, calls: _Calls, impl: str, dtypes,
                 record, timed, seed: int, note, y) -> None:
  """Compute alone, then dispatch/combine with compute, without and with
  hooks (module docstring). With --profile, the hooked receives' kernel
  times are those of rows that have already arrived."""
  mesh, ranks = problem.mesh, problem.ranks
  square = (ranks * COMPUTE_SIZE, COMPUTE_SIZE)
  a = _random(mesh, square, jnp.bfloat16, seed + 2)
  b = _random(mesh, square, jnp.bfloat16, seed + 3,
              scale=COMPUTE_SIZE ** -0.5)  # keeps tanh off its flat tails
  compute, kernels = timed(lambda c: _compute(*c), (a, b))
  record("ll_overlap_compute", impl, "bf16", compute, kernels=kernels)

  def step(fp8, hooked):
    def body(carry):
      x, idx, weights, y, a, b = carry
      d, a = _op_then_compute(
          lambda hook: calls.dispatch(x, idx, fp8, hook), a, b, hooked)
      out, a = _op_then_compute(
          lambda hook: calls.combine(y, idx, _with_element_of(weights, d.x),
                                     d.handle, hook), a, b, hooked)
      return _with_element_of(out, a)  # keeps the last compute block
    return body

  carry = (problem.x, problem.idx, problem.weights, y, a, b)
  for dtype in dtypes:
    fp8 = dtype == "fp8"
    serial, kernels = timed(step(fp8, False), carry)
    record("ll_overlap_serial", impl, dtype, serial, note=note,
           kernels=kernels)
    hooked, kernels = timed(step(fp8, True), carry)
    communication = serial - 2 * compute
    hid = (f"hooks hid {(serial - hooked) * 1e6:.1f} of the "
           f"{communication * 1e6:.1f} us serial communication")
    record("ll_overlap_hooked", impl, dtype, hooked,
           note="; ".join(filter(None, (note, hid))), kernels=kernels)


def _run_all_to_all(problem: normal.Problem, ops, dtypes, record,
                    timed) -> None:
  """Raw all_to_alls of byte rows whose received bytes equal the LL logical
  bytes: one per phase, each phase waiting for the last."""
  shape, ranks, mesh = problem.shape, problem.ranks, problem.mesh
  per_peer = int(np.ceil(problem.recv_pairs / ranks))
  runs = []  # (op, dtype, row bytes of each phase)
  for op in ops:
    if op == "ll_combine":
      runs.append((op, "bf16", [combine_bytes(shape.hidden)]))
    elif op in ("ll_dispatch", "ll_dispatch_combine"):
      for dtype in dtypes:
        rows = [dispatch_bytes(shape.hidden, dtype == "fp8")]
        if op == "ll_dispatch_combine":
          rows.append(combine_bytes(shape.hidden))
        runs.append((op, dtype, rows))

  def step(arrays):
    out = None
    for a in arrays:
      if out is not None:
        a = lax.dynamic_update_slice(a, out[:1, :1], (0, 0))
      out = lax.all_to_all(a.reshape(ranks, per_peer, -1), "ep", 0,
                           0).reshape(a.shape)
    return out

  for op, dtype, rows in runs:
    arrays = tuple(_random(mesh, (ranks * ranks * per_peer, row), jnp.uint8,
                           seed) for seed, row in enumerate(rows))
    t, kernels = timed(step, arrays)
    total = ranks * per_peer * sum(rows)
    record(op, "all_to_all", dtype, t, total, total * (ranks - 1) / ranks,
           kernels=kernels)
