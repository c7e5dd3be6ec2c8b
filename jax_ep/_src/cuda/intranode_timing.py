"""Times the intranode dispatch and combine kernels (one process, every GPU).

Each figure comes from a jitted `lax.scan` of `calls` chained calls inside
`jax.shard_map` over the given GPUs (what a model sees, launches included):
the per-call time is the program's wall time / `calls`, median over `reps`
repetitions. Cached dispatch and combine need one (untimed) dispatch for their
handle, so their programs' time minus that of a program with that dispatch
alone is what they count. The pure-JAX reference runs the same programs as the
baseline.

Logical bandwidth (docs/measuring.md): bytes of all received rows (local ones
included) per rank / time; link: bytes of rows received from another GPU per
rank / time. The routing is uniform, as DeepEP's tests draw it (random scores,
top-k).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_ep._src import runtime
from jax_ep._src.config import Config
from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import peer_buffers
from jax_ep._src.fp8 import FP8_DTYPE, GROUP, per_token_cast_to_fp8
from jax_ep._src.reference import normal as reference
from jax_ep._src.sizes import nvl_buffer_bytes

OPS = ("dispatch", "cached_dispatch", "combine")
# The Config fields the intranode kernels read: each kernel record holds them.
TUNING_FIELDS = ("num_sms", "nvl_send_warps", "nvl_chunk", "nvl_copy_engine")
_EP = "ep"


def tuning_fields(config: Config) -> dict:
  """The `TUNING_FIELDS` of `config`, as a record holds them."""
  return {f: getattr(config, f) for f in TUNING_FIELDS}


def time_intranode(devices: Sequence[jax.Device], *, tokens: int, hidden: int,
                   topk: int, experts: int, dtype: str = "bf16",
                   tunings: Sequence[Config] = (), reference_too: bool = True,
                   ops: Sequence[str] = OPS, calls: int = 10, reps: int = 5,
                   report: Callable[[dict], None] | None = None) -> list[dict]:
  """Times the intranode kernels, one tuning after the other, on these GPUs.

  Args:
    devices: the GPUs of the EP axis, in rank order, all driven by this
      process.
    tokens: T, tokens per rank.
    hidden: H.
    topk: K.
    experts: E, a multiple of the number of devices.
    dtype: rows of dispatch and cached dispatch: "bf16" or "fp8" (e4m3 with
      f32 scales, cast outside the timed loop). Combine is always bf16.
    tunings: the kernels' configs, timed one after the other; every tuning
      shares one set of peer buffers. The kernels wait for a peer as long as
      a Buffer's (`runtime.DEFAULT_TIMEOUT_S`).
    reference_too: time the pure-JAX reference as well (impl "reference").
    ops: which of "dispatch", "cached_dispatch", "combine" to time.
    calls: calls per timed program.
    reps: timed runs of each program (after two untimed ones).
    report: called with each record as soon as it is measured.

  Returns:
    One record per (implementation, op): `op`, `impl` ("jax_ep" or
    "reference"), `dtype`, `tokens`, `hidden`, `topk`, `experts`, `ranks`,
    the `TUNING_FIELDS` (jax_ep only), `time_us`, `logical_gbps`, `link_gbps`
    (None when the time is 0: lost in the noise) and `device` (the device
    kind).

  Raises:
    ValueError: an unknown dtype or op.
  """
  if dtype not in ("bf16", "fp8"):
    raise ValueError(
        f"time_intranode: dtype must be bf16 or fp8, got {dtype!r}")
  if set(ops) - set(OPS):
    raise ValueError(f"time_intranode: ops must be among {OPS}, got {ops}")
  devices = list(devices)
  R, T, H, K, E = len(devices), tokens, hidden, topk, experts
  fp8 = dtype == "fp8"
  mesh = Mesh(np.array(devices), (_EP,))
  rng = np.random.default_rng(0)
  scores = rng.random((R * T, E)).astype(np.float32)
  topk_idx = np.argsort(-scores, axis=1)[:, :K].astype(np.int32)
  sharding = NamedSharding(mesh, P(_EP))
  x = jax.device_put(jnp.asarray(rng.standard_normal((R * T, H)),
                                 jnp.bfloat16), sharding)
  idx = jax.device_put(topk_idx, sharding)
  w = jax.device_put(rng.random((R * T, K)).astype(np.float32), sharding)
  kw = dict(axis_name=_EP, num_ranks=R, num_experts=E, capacity=R * T,
            expert_alignment=1)

  def rows_of(x):
    return per_token_cast_to_fp8(x) if fp8 else (x,)

  def program(per_shard):
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(_EP),
                                 out_specs=P(_EP)))

  # The carry (always 0) makes each call depend on the previous one, so XLA
  # can neither hoist nor reorder the calls.
  def dispatch_program(dispatch_fn):
    def per_shard(x, idx, w):
      x_rows = rows_of(x)

      def body(c, _):
        rows = dispatch_fn(x_rows, idx + c, w)[0]
        return c + (rows[0][0, 0] * 0).astype(jnp.int32), None
      c, _ = lax.scan(body, idx[0, 0] * 0, None, length=calls)
      return c[None]
    return program(per_shard)

  def after_dispatch_program(dispatch_fn, fn):
    """`calls` chained `fn(x_rows, y, handle)` after one dispatch."""
    def per_shard(x, idx, w):
      x_rows = rows_of(x)
      rows, _, _, _, h = dispatch_fn(x_rows, idx, w)
      y = rows[0].astype(jnp.bfloat16)

      def body(c, _):
        out = fn(x_rows, y, dataclasses.replace(h, recv_row=h.recv_row + c))
        return c + (out[0, 0] * 0).astype(jnp.int32), None
      c, _ = lax.scan(body, idx[0, 0] * 0, None, length=calls)
      return c[None]
    return program(per_shard)

  def timed(prog):
    jax.block_until_ready(prog(x, idx, w))  # compile + warm up
    jax.block_until_ready(prog(x, idx, w))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(prog(x, idx, w))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  local = topk_idx.reshape(R, T, K) // (E // R)
  rows_to = [[int((local[s] == d).any(-1).sum()) for d in range(R)]
             for s in range(R)]
  recv_rows = sum(map(sum, rows_to))
  link_rows = recv_rows - sum(rows_to[r][r] for r in range(R))
  row_bytes = H + H // GROUP * 4 if fp8 else H * 2

  def record(op, impl, config, seconds):
    nbytes = H * 2 if op == "combine" else row_bytes

    def gbps(rows):
      # A time lost in the noise (difference of two programs' times <= 0)
      # has no bandwidth.
      if seconds <= 0:
        return None
      return round(rows / R * nbytes / seconds / 1e9, 1)
    return dict(
        op=op, impl=impl, dtype="bf16" if op == "combine" else dtype,
        tokens=T, hidden=H, topk=K, experts=E, ranks=R,
        **(tuning_fields(config) if config else {}),
        time_us=round(max(seconds, 0) * 1e6, 1),
        logical_gbps=gbps(recv_rows), link_gbps=gbps(link_rows),
        device=devices[0].device_kind)

  def measure(impl, config, dispatch_fn, cached_fn, combine_fn, records):
    if "dispatch" in ops:
      records.append(record("dispatch", impl, config,
                            timed(dispatch_program(dispatch_fn)) / calls))
      if report:
        report(records[-1])
    others = [(op, fn) for op, fn in (("cached_dispatch", cached_fn),
                                      ("combine", combine_fn)) if op in ops]
    if others:
      one = timed(after_dispatch_program(
          dispatch_fn, lambda x_rows, y, h: y[:T] * 0))
    for op, fn in others:
      seconds = timed(after_dispatch_program(dispatch_fn, fn)) - one
      records.append(record(op, impl, config, seconds / calls))
      if report:
        report(records[-1])

  records = []
  sizes = nvl_buffer_bytes(T, H, K, R, FP8_DTYPE if fp8 else jnp.bfloat16)
  with (peer_buffers.create_peer_buffers(devices, sizes) if tunings
        else contextlib.nullcontext()) as buffers:
    for config in tunings:
      kernels = dict(buffers=buffers, config=config,
                     timeout_s=runtime.DEFAULT_TIMEOUT_S)
      measure(
          "jax_ep", config,
          lambda rows, idx, w, k=kernels: intranode.dispatch(
              rows, idx, w, **kw, **k),
          lambda x_rows, y, h, k=kernels: intranode.cached_dispatch(
              x_rows, h, axis_name=_EP, **k)[0],
          lambda x_rows, y, h, k=kernels: intranode.combine(
              y, h, axis_name=_EP, out_dtype=y.dtype, **k),
          records)
  if reference_too:
    measure(
        "reference", None,
        lambda rows, idx, w: reference.dispatch(rows, idx, w, **kw),
        lambda x_rows, y, h: reference.cached_dispatch(
            x_rows, h, axis_name=_EP)[0],
        lambda x_rows, y, h: reference.combine(
            y, h, axis_name=_EP).astype(y.dtype),
        records)
  return records
