"""`python -m bench.overlap`: does jax_ep's communication run beside
independent computation on a GPU? (issue 18)

One process per GPU (`python -m jax_ep.launch -n <GPUs> -- python -m
bench.overlap`; R = 1 on one GPU). Three jitted loops of `--iters` steps,
each step depending on the last:
  comm      a dispatch and a combine of the shape's bf16 rows (the combine
            of the dispatched rows, so each step waits for the last)
  compute   `--matmuls` independent chains of bf16 matmuls, n x n
  pair      both in one step, the communication independent of the matmuls,
            under each variant of how XLA may place it:
    base          as written (the compute stream)
    stream        the communication under `compute_on("gpu_stream:1")`,
                  XLA's other-stream annotation
    stream_nocb   the same, command buffers (CUDA graphs) off: a graph runs
                  its commands in order on the main stream
    stream_nocc   the same, custom calls left out of command buffers
    collective    under `compute_on("gpu_stream:collective")` (XLA's
                  communication stream), command buffers off
    stream_lhs    stream_nocb with the latency-hiding scheduler
    stream_group  stream_lhs with the communication and the matmuls in one
                  scheduling group (frontend attribute _scheduling_group_id),
                  which asks the scheduler to put the matmuls between the
                  communication's start and done (on one H200 every other
                  variant started it after the step's matmuls)
    matmuls_stream      the other way round: the matmuls under
                  `compute_on("gpu_stream:1")`, the communication on the
                  compute stream, command buffers off (XLA's cost model
                  knows matmuls, not custom calls, so it may start them
                  early)
    matmuls_stream_lhs  the same with the latency-hiding scheduler
    both_streams  the communication on gpu_stream:1 and the matmuls on
                  gpu_stream:2, command buffers off: two async computations,
                  which XLA may start one after the other before either's
                  done (it did so with its own async copies)
    both_streams_lhs    the same with the latency-hiding scheduler
    both_streams_cb     both_streams with command buffers on (XLA's default)
    overlap       the same through `jax_ep.overlap`, as a model writes it
    overlap_nocb  overlap with command buffers off
    both_collective     the communication on gpu_stream:collective (XLA's
                  communication stream), the matmuls on gpu_stream:1
    both_collective_prio  the same with XLA's communication streams at the
                  highest priority (xla_gpu_enable_highest_priority_async_
                  stream): the block scheduler then serves the
                  communication's blocks before the matmuls' waiting ones
The communication is traced as it would be beside computation (the grid of
`jax_ep.overlap`, Config.num_sms 0: 24 SMs) in the variants that give it a
stream, as written (the grid of kernels alone on the GPU, 64 SMs) in the
others, and timed alone at each grid. The record of each pair (op
`overlap_<variant>`) notes the parts' times alone, their sum and max, and
how much of the shorter part the pair hid: (sum - pair) / min. `--dump DIR`
has XLA write each variant's optimized HLO and thunk sequence under
DIR/<variant>, where `call-start` around the custom call and `kAsyncStart
... computation_stream[1]` outside any `kCommandBuffer` say that it got its
own stream. On the reference backend
(no kernels: CPUs) only `base` runs, to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.compute_on import compute_on
from jax.experimental.xla_metadata import set_xla_metadata
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from bench import harness, kernel_time
from jax_ep._src import overlap as overlap_lib
from bench.shapes import SHAPES

_NO_GRAPHS = {"xla_gpu_enable_command_buffer": ""}
_LHS = {**_NO_GRAPHS, "xla_gpu_enable_latency_hiding_scheduler": True}
_GROUP = "_scheduling_group_id"  # XLA's scheduling annotation


class Variant(NamedTuple):
  """`compute_on`'s compute_type for the communication and for the matmuls
  (None: as written, on the compute stream), XLA compile options, and the
  scheduling group the step is traced in (None: none)."""
  comm_on: str | None
  options: dict
  matmuls_on: str | None = None
  group: str | None = None
  helper: bool = False  # written with jax_ep.overlap (its streams)


def _placement(variant: Variant) -> str:
  parts = [f"the {part} on {where}" for part, where in (
      ("comm", variant.comm_on), ("matmuls", variant.matmuls_on)) if where]
  if variant.group:
    parts.append(f"scheduling group {variant.group}")
  if variant.helper:
    parts.append("through jax_ep.overlap")
  return ", ".join(parts) or "as written"


# jax_ep.overlap: both_streams_cb written with the library's helper.
OVERLAP = Variant(overlap_lib.COMM_STREAM, {},
                  matmuls_on=overlap_lib.COMPUTE_STREAM, helper=True)
VARIANTS = {
    "base": Variant(None, {}),
    "stream": Variant("gpu_stream:1", {}),
    "stream_nocb": Variant("gpu_stream:1", _NO_GRAPHS),
    "stream_nocc": Variant("gpu_stream:1", {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUDNN,"
                                         "CONDITIONAL"}),
    "collective": Variant("gpu_stream:collective", _NO_GRAPHS),
    "stream_lhs": Variant("gpu_stream:1", _LHS),
    "stream_group": Variant("gpu_stream:1", _LHS, group="1"),
    "matmuls_stream": Variant(None, _NO_GRAPHS, matmuls_on="gpu_stream:1"),
    "matmuls_stream_lhs": Variant(None, _LHS, matmuls_on="gpu_stream:1"),
    "both_streams": Variant("gpu_stream:1", _NO_GRAPHS,
                            matmuls_on="gpu_stream:2"),
    "both_streams_cb": Variant("gpu_stream:1", {}, matmuls_on="gpu_stream:2"),
    "both_streams_lhs": Variant("gpu_stream:1", _LHS,
                                matmuls_on="gpu_stream:2"),
    "overlap": OVERLAP,
    "overlap_nocb": OVERLAP._replace(options=_NO_GRAPHS),
    "both_collective": Variant("gpu_stream:collective", _NO_GRAPHS,
                               matmuls_on="gpu_stream:1"),
    "both_collective_prio": Variant(
        "gpu_stream:collective",
        {**_NO_GRAPHS, "xla_gpu_enable_highest_priority_async_stream": True},
        matmuls_on="gpu_stream:1"),
}


def _tracing(beside: bool):
  """While the communication is traced: the kernels' grid of communication
  beside computation (`jax_ep.overlap`'s), or of kernels alone on the
  GPU."""
  if not beside:
    return contextlib.nullcontext()
  return overlap_lib.tracing_beside_compute()


def _comm(buffer, num_experts: int, x, idx):
  """A dispatch of `x` and the combine of what arrived: `x`-shaped."""
  d = jax_ep.dispatch(buffer, x, idx, num_experts=num_experts)
  return jax_ep.combine(buffer, d.x, d.handle)


def _compute(mats):
  """One matmul of each chain (b of scale 1/sqrt(n): the rows keep their
  size)."""
  return tuple((jnp.dot(a, b, preferred_element_type=jnp.float32)
                .astype(a.dtype), b) for a, b in mats)


def _loop(mesh, iters: int, step):
  """jit(shard_map) of `iters` calls of `step(carry) -> carry`. Each call
  takes the whole carry the last one returned (harness.chained_loop links
  only a first element, so XLA would hoist the loop-invariant matmuls)."""
  def loop(carry):
    return lax.fori_loop(0, iters, lambda _, c: step(c), carry)
  return jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=P("ep"),
                               out_specs=P("ep")))


def _timed(loop, carry, options, *, iters: int, reps: int, warmup: int,
           dump: str | None, profile: bool, name: str):
  """Seconds per step, and with `profile` the kernels' busy time per step:
  a note (see _busy_note)."""
  if dump:
    options = {**options, "xla_dump_to": f"{dump}/{name}",
               "xla_dump_hlo_as_text": True}
  compiled = loop.lower(carry).compile(options or None)
  seconds = harness.time_loop(compiled, carry, iters=iters, reps=reps,
                              warmup=warmup)
  if not profile:
    return seconds, ""
  return seconds, _busy_note(kernel_time.kernel_intervals(compiled, carry),
                             iters)


def _busy_note(kernels, iters: int) -> str:
  """Per step: how long jax_ep's kernels ran, how long the others (the
  matmuls, XLA's fusions) ran, and how long both ran at once; from one
  profiled run of the loop."""
  ours = kernel_time.busy([k for k in kernels if "jax_ep" in k.name])
  others = kernel_time.busy([k for k in kernels if "jax_ep" not in k.name])
  both = kernel_time.intersection(ours, others)
  return (f"kernels per step: jax_ep {kernel_time.length(ours) / iters:.1f} "
          f"us, others {kernel_time.length(others) / iters:.1f} us, both at "
          f"once {kernel_time.length(both) / iters:.1f} us")


def run(*, shape_name: str, matmuls: int, n: int, variants, iters: int,
        reps: int, warmup: int, seed: int, dump: str | None,
        profile: bool = False, num_sms: int | None = None):
  shape = SHAPES[shape_name]
  mesh = jax.make_mesh((jax.device_count(),), ("ep",))
  ranks = mesh.shape["ep"]
  on_gpus = jax.devices()[0].platform == "gpu"
  buffer = jax_ep.Buffer(
      mesh, "ep", backend="cuda" if on_gpus else "reference",
      config=jax_ep.Config(num_sms=num_sms) if num_sms else None,
      num_nvl_bytes=jax_ep.nvl_buffer_bytes(shape.tokens, shape.hidden,
                                            shape.topk, ranks)
      if on_gpus else None)
  if not on_gpus:
    variants = [v for v in variants
                if VARIANTS[v].comm_on is VARIANTS[v].matmuls_on is None]
  sharding = NamedSharding(mesh, P("ep"))
  rng = np.random.default_rng(seed)
  put = functools.partial(harness.place, sharding=sharding)
  x = put(rng.standard_normal((ranks * shape.tokens, shape.hidden),
                              np.float32).astype(jnp.bfloat16))
  idx = put(harness.random_routing(rng, ranks * shape.tokens, shape.topk,
                                   shape.experts))
  # Per rank: `matmuls` chains of an [n, n] a and b, stacked on the EP axis.
  mats = tuple(
      (put(rng.standard_normal((ranks * n, n), np.float32)
           .astype(jnp.bfloat16)),
       put((rng.standard_normal((ranks * n, n), np.float32) / np.sqrt(n))
           .astype(jnp.bfloat16)))
      for _ in range(matmuls))
  comm = functools.partial(_comm, buffer, shape.experts)
  loops = dict(iters=iters, reps=reps, warmup=warmup, dump=dump,
               profile=profile)

  def comm_step(c):
    x, idx = c
    return comm(x, idx), idx

  def pair_step(variant: Variant):
    if variant.helper:
      def step(c):
        x, idx, mats = c
        y, mats = jax_ep.overlap(buffer, lambda: comm(x, idx),
                                 lambda: _compute(mats))
        return y, idx, mats
      return step

    def on(where, f):
      return f if where is None else compute_on(
          f, compute_type=where, out_memory_spaces=jax.memory.Space.Device)
    part = on(variant.comm_on, comm)
    matmuls = on(variant.matmuls_on, _compute)

    def step(c):
      x, idx, mats = c
      with set_xla_metadata(**({_GROUP: variant.group} if variant.group
                               else {})), \
          _tracing(variant.comm_on is not None):
        return part(x, idx), idx, matmuls(mats)
    return step

  records = []

  def record(op, seconds, note, beside=False):
    records.append(harness.Record(
        op=op, impl="jax_ep" if on_gpus else "reference", dtype="bf16",
        tokens=shape.tokens, hidden=shape.hidden, topk=shape.topk,
        experts=shape.experts, ranks=ranks,
        num_sms=buffer.num_sms(beside_compute=beside),
        time_us=seconds * 1e6, logical_gbps=None, link_gbps=None, note=note))
    if jax.process_index() == 0:
      harness.print_row(records[-1])

  # The communication alone at each grid a variant gives its kernels: alone
  # on the GPU (as written) and beside computation (on a stream of its own).
  comm_alone = {}
  grids = [False] + ([True] if any(
      VARIANTS[v].comm_on for v in variants) and buffer.num_sms(
          beside_compute=True) != buffer.num_sms() else [])
  for beside in grids:
    with _tracing(beside):
      loop = _loop(mesh, iters, comm_step)
      comm_alone[beside] = _timed(loop, (x, idx), {},
                                  name="comm_beside" if beside else "comm",
                                  **loops)
    record("overlap_comm_beside" if beside else "overlap_comm",
           comm_alone[beside][0], "; ".join(filter(None, [
               "dispatch + combine alone, at the grid of kernels " +
               ("beside computation" if beside else "alone on the GPU"),
               comm_alone[beside][1]])), beside)
  compute_s, compute_busy = _timed(_loop(mesh, iters, _compute), mats, {},
                                   name="compute", **loops)
  compute_note = f"{matmuls} chains of {n}x{n} bf16 matmuls"
  record("overlap_compute", compute_s, "; ".join(
      filter(None, [compute_note + " alone", compute_busy])))
  for name in variants:
    variant = VARIANTS[name]
    beside = variant.comm_on is not None and True in comm_alone
    comm_s = comm_alone[beside][0]
    seconds, pair_busy = _timed(_loop(mesh, iters, pair_step(variant)),
                                (x, idx, mats), variant.options, name=name,
                                **loops)
    total, longest = comm_s + compute_s, max(comm_s, compute_s)
    hidden = (total - seconds) / min(comm_s, compute_s)
    record(f"overlap_{name}", seconds,
           f"with {compute_note}: sum of the parts {total * 1e6:.1f} us, max "
           f"{longest * 1e6:.1f} us; hid {100 * hidden:.0f}% of the shorter "
           f"part ({_placement(variant)}, {variant.options or 'defaults'})"
           + (f"; {pair_busy}" if pair_busy else ""), beside)
  return records


def main(argv=None) -> None:
  from jax_ep.launch import initialize  # pylint: disable=g-import-not-at-top
  initialize()
  parser = argparse.ArgumentParser(prog="python -m bench.overlap",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="dsv3")
  parser.add_argument("--matmuls", type=int, default=4)
  parser.add_argument("--n", type=int, default=4096,
                      help="the matmuls' size")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma list of {', '.join(VARIANTS)}")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-sms", type=int, default=None,
                      help="the kernels' SMs (default: the Buffer's)")
  parser.add_argument("--profile", action="store_true",
                      help="also profile one run of each loop: the kernels' "
                      "busy time per step, jax_ep's and the others', and "
                      "how long both ran at once")
  parser.add_argument("--dump", default=None,
                      help="folder for XLA's dumps, one per variant")
  parser.add_argument("--out", default=None, help="JSON path (default "
                      "bench/results/<date>_<device>_overlap_r<ranks>.json)")
  args = parser.parse_args(argv)
  variants = args.variants.split(",")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  if jax.process_index() == 0:
    harness.print_header()
  records = run(shape_name=args.shape, matmuls=args.matmuls, n=args.n,
                variants=variants, iters=args.iters, reps=args.reps,
                warmup=args.warmup, seed=args.seed, dump=args.dump,
                profile=args.profile, num_sms=args.num_sms)
  if jax.process_index() == 0:
    harness.save_records(records, args.out,
                         f"overlap_r{jax.device_count()}")


if __name__ == "__main__":
  main()
