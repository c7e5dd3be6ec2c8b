"""One dispatch, cached dispatch and combine on the intranode kernels, small,
for compute-sanitizer (one process over the visible GPUs, R = their count):

    compute-sanitizer --tool memcheck python3 scripts/sanitize_intranode.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_intranode.py

Random routing with -1 entries and a capacity below the received rows, so
padding, drops and every path of the kernels run; both ways of moving rows.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_ep._src.cuda import intranode, peer_buffers

EP = "ep"


def main() -> None:
  gpus = jax.devices("gpu")
  R, T, H, K, E = len(gpus), 64, 256, 4, 8 * len(gpus)
  mesh = Mesh(np.array(gpus), (EP,))
  rng = np.random.default_rng(0)
  idx = rng.integers(-1, E, (R * T, K)).astype(np.int32)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(EP)))
  x = put(jnp.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16))
  w = put(rng.random((R * T, K)).astype(np.float32))
  buffers = peer_buffers.create_peer_buffers(
      gpus, intranode.intranode_buffer_bytes(T, H, K, R))
  kw = dict(axis_name=EP, num_ranks=R, num_experts=E, capacity=R * T * 3 // 4,
            expert_alignment=4, buffers=buffers, num_sms=4, chunk_tokens=5)

  def per_shard(x, idx, w):
    outs = []
    for copy_engine in (False, True):
      rows, _, _, _, h = intranode.dispatch((x,), idx, w, **kw,
                                            copy_engine=copy_engine)
      back = intranode.cached_dispatch((x,), h, axis_name=EP, buffers=buffers,
                                       num_sms=4, copy_engine=copy_engine)
      out = intranode.combine(rows[0], h, axis_name=EP, buffers=buffers,
                              num_sms=4)
      outs += [rows[0], back[0], out]
    return tuple(outs)

  out = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                              out_specs=P(EP)))(x, put(idx), w)
  jax.block_until_ready(out)
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(out[:3], out[3:]))
  buffers.close()
  print(f"sanitize_intranode: R={R} done; both ways agree: {same}", flush=True)


if __name__ == "__main__":
  main()
