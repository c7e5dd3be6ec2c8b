"""One dispatch, cached dispatch and combine on the intranode kernels, small,
for compute-sanitizer. R is the number of devices of the run:

    compute-sanitizer --tool memcheck --report-api-errors no \
        python3 scripts/sanitize_intranode.py
    python3 -m jax_ep.launch -n 2 -- compute-sanitizer --tool racecheck \
        python3 scripts/sanitize_intranode.py --ways push
    python3 -m jax_ep.launch -n 2 --ranks-per-gpu 2 -- compute-sanitizer \
        --tool memcheck python3 scripts/sanitize_intranode.py

memcheck runs in one process over every GPU, or one process per rank (two
ranks sharing one GPU: scripts/gpu_check.sh does so on a one-GPU machine). racecheck serializes a process's
kernels, so a rank's kernel that waits for a peer in the same process would
wait forever: run it one process per GPU, and on the push way only (the
copy-engine way's flag kernel runs beside the main kernel on a side stream).
`--report-api-errors no` hides the cudaErrorPeerAccessAlreadyEnabled that
enabling peer access returns when XLA did it first; it is expected.

Random routing with -1 entries and a capacity below the received rows, so
padding, drops and every path of the kernels run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep.launch
from jax_ep._src import exchange
from jax_ep._src import runtime
from jax_ep._src import sizes
from jax_ep._src.config import Config
from jax_ep._src.cuda import intranode, peer_buffers

EP = "ep"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ways", choices=("push", "both"), default="both",
                      help="push only, or push and the copy engine")
  args = parser.parse_args()
  jax_ep.launch.initialize()
  gpus = jax.devices("gpu")
  R, T, H, K, E = len(gpus), 64, 256, 4, 8 * len(gpus)
  mesh = Mesh(np.array(gpus), (EP,))
  rng = np.random.default_rng(0)  # the same inputs on every process

  def put(a):
    sharding = NamedSharding(mesh, P(EP))
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  x = put(np.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16))
  idx = put(rng.integers(-1, E, (R * T, K)).astype(np.int32))
  w = put(rng.random((R * T, K)).astype(np.float32))
  buffers = peer_buffers.create_peer_buffers(
      gpus, sizes.nvl_buffer_bytes(T, H, K, R))
  ways = (False,) if args.ways == "push" else (False, True)

  def per_shard(x, idx, w):
    outs = []
    for copy_engine in ways:
      kernels = dict(axis_name=EP, buffers=buffers,
                     timeout_s=runtime.DEFAULT_TIMEOUT_S,
                     config=Config(num_sms=4, nvl_chunk=5,
                                   nvl_copy_engine=copy_engine))
      rows, _, _, _, h = intranode.dispatch(
          (x,), idx, w, num_ranks=R, num_experts=E, capacity=R * T * 3 // 4,
          expert_alignment=4, **kernels)
      back = intranode.cached_dispatch((x,), h, **kernels)
      out = intranode.combine(rows[0], h, **kernels)
      outs += [rows[0], back[0], out]
    return tuple(outs)

  out = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                              out_specs=P(EP)))(x, idx, w)
  jax.block_until_ready(out)
  local = [[np.asarray(s.data) for s in a.addressable_shards] for a in out]
  same = all(all(np.array_equal(p, q) for p, q in zip(a, b))
             for a, b in zip(local[:3], local[3:]))
  exchange.barrier("sanitize_intranode: done")  # peers may still read ours
  buffers.close()
  print(f"sanitize_intranode: R={R}, process {jax.process_index()} done; "
        f"ways {args.ways}" + (f", both agree: {same}" if len(ways) > 1 else ""),
        flush=True)


if __name__ == "__main__":
  main()
