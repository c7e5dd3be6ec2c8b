"""`python -m bench`: time jax_ep and its peers, write JSON to bench/results/.

Run it as one process per GPU through the launcher, e.g. on two GPUs:
  python -m jax_ep.launch -n 2 -- python -m bench --shape dsv3
or in one process driving every local GPU: python -m bench --shape dsv3
The low-latency ops run when listed (jax_ep's LL kernels need one process
per GPU):
  python -m jax_ep.launch -n 2 -- python -m bench --shape dsv3_ll \
      --ops ll_dispatch,ll_combine,ll_dispatch_combine,ll_overlap
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax

from bench import harness, low_latency, normal
from bench.shapes import SHAPES

_IMPLS = ("jax_ep", "reference", "all_to_all", "ragged_all_to_all")
_NORMAL_OPS = ("layout", "dispatch", "combine", "dispatch_combine")
_OPS = _NORMAL_OPS + low_latency.OPS


def _csv(choices):
  def parse(text):
    items = text.split(",")
    bad = [i for i in items if i not in choices]
    if bad:
      raise argparse.ArgumentTypeError(f"{bad} not in {choices}")
    return items
  return parse


def _ints(text):
  return [int(v) for v in text.split(",")]


def main(argv=None) -> None:
  from jax_ep.launch import initialize  # pylint: disable=g-import-not-at-top
  initialize()
  parser = argparse.ArgumentParser(prog="python -m bench",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="dsv3")
  parser.add_argument("--tokens", type=_ints,
                      help="override tokens per rank; a comma list sweeps")
  parser.add_argument("--num-sms", type=_ints, default=[24, 0],
                      help="SM counts to time jax_ep's normal kernels with "
                      "(comma list; 0: automatic, the grid of a kernel alone "
                      "on the GPU; default 24,0: DeepEP's budget, beside "
                      "which the model computes, and the automatic grid)")
  parser.add_argument("--hidden", type=_ints,
                      help="override the hidden size; a comma list sweeps")
  parser.add_argument("--ranks-per-node", type=int, default=None,
                      help="G < R: the EP axis as R / G nodes of G ranks, "
                      "jax_ep on its internode kernels (default: detected)")
  parser.add_argument("--impls", type=_csv(_IMPLS), default=list(_IMPLS))
  parser.add_argument("--ops", type=_csv(_OPS), default=list(_NORMAL_OPS),
                      help="default: the normal ops; the low-latency ones "
                      f"({','.join(low_latency.OPS)}) run when listed")
  parser.add_argument("--dtypes", type=_csv(("bf16", "fp8")),
                      default=["bf16", "fp8"])
  parser.add_argument("--iters", type=int, default=None,
                      help="calls per timed jitted loop (default: 10 for the "
                      "normal ops, 1000 for the low-latency ones, whose calls "
                      "are short next to a loop's launch: about 0.8 ms per "
                      "loop on an H200)")
  parser.add_argument("--unroll", type=int, default=1,
                      help="low-latency ops: calls per iteration of the "
                      "timed loop's XLA while loop (unrolled, XLA may share "
                      "the reference's routing work between calls)")
  parser.add_argument("--reps", type=int, default=50, help="timed loops")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--profile", action="store_true",
                      help="low-latency ops: also record the kernels' own "
                      "time per call from the profiler (kernel_us)")
  parser.add_argument("--out", default=None,
                      help="JSON path (default bench/results/<date>_<device>_"
                      "<shape>_r<ranks>.json)")
  args = parser.parse_args(argv)
  if args.profile and jax.devices()[0].platform != "gpu":
    parser.error("--profile reads GPU kernels from the profiler: run it on GPUs")

  base = SHAPES[args.shape]
  mesh = jax.make_mesh((jax.device_count(),), ("ep",))
  impls = list(args.impls)
  if "jax_ep" in impls and jax_ep_backend(mesh) != "cuda":
    impls.remove("jax_ep")  # without kernels it would time the reference twice
    if jax.process_index() == 0:
      print("jax_ep: skipped (no CUDA kernels here: its backend would be "
            "the reference)")
  normal_ops = [op for op in args.ops if op in _NORMAL_OPS]
  ll_ops = [op for op in args.ops if op in low_latency.OPS]
  if jax.process_index() == 0:
    harness.print_header()
  records = []
  common = dict(seed=args.seed, reps=args.reps, warmup=args.warmup)
  for hidden, tokens in itertools.product(args.hidden or [base.hidden],
                                          args.tokens or [base.tokens]):
    shape = dataclasses.replace(base, hidden=hidden, tokens=tokens)
    if normal_ops:
      records += normal.run(mesh, shape, impls=impls, dtypes=args.dtypes,
                            ops=normal_ops, num_sms=args.num_sms,
                            ranks_per_node=args.ranks_per_node,
                            iters=args.iters or 10, **common)
    if ll_ops:
      records += low_latency.run(mesh, shape, impls=impls, dtypes=args.dtypes,
                                 ops=ll_ops, iters=args.iters or 1000,
                                 unroll=args.unroll, profile=args.profile,
                                 **common)
  if jax.process_index() == 0:
    harness.save_records(records, args.out,
                         f"{args.shape}_r{jax.device_count()}")


def jax_ep_backend(mesh) -> str:
  import jax_ep  # pylint: disable=g-import-not-at-top
  return jax_ep.Buffer(mesh, "ep").backend


if __name__ == "__main__":
  main()
