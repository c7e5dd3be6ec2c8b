"""Times the intranode dispatch and combine kernels (one process, every GPU).

    python scripts/time_intranode.py [--tokens 4096 --hidden 7168 --topk 8
        --experts 256 --calls 20 --reps 10 --fp8
        --tunings 24:8:0:1,24:4:2:0] [--no-reference]

Each tuning is the `jax_ep.Config` fields
num_sms:nvl_send_warps:nvl_chunk[:nvl_copy_engine] (nvl_chunk 0: automatic;
nvl_copy_engine 1, the default here, or 0). Prints one JSON record per line; the method and the records' fields are described in
`jax_ep._src.cuda.intranode_timing`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=g-import-not-at-top

from jax_ep._src.config import Config
from jax_ep._src.cuda import intranode_timing


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--hidden", type=int, default=7168)
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--calls", type=int, default=20)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--tunings", default="24:8:0")
  ap.add_argument("--fp8", action="store_true")
  ap.add_argument("--no-reference", action="store_true")
  args = ap.parse_args()
  tunings = []
  for text in args.tunings.split(","):
    values = [int(v) for v in text.split(":")] + [1]  # copy engine by default
    num_sms, send_warps, chunk, copy_engine = values[:4]
    tunings.append(Config(num_sms=num_sms, nvl_send_warps=send_warps,
                          nvl_chunk=chunk, nvl_copy_engine=bool(copy_engine)))
  intranode_timing.time_intranode(
      jax.devices("gpu"), tokens=args.tokens, hidden=args.hidden,
      topk=args.topk, experts=args.experts,
      dtype="fp8" if args.fp8 else "bf16", tunings=tunings,
      reference_too=not args.no_reference, calls=args.calls, reps=args.reps,
      report=lambda record: print(json.dumps(record), flush=True))


if __name__ == "__main__":
  main()
