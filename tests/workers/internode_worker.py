"""Internode dispatch/combine on GPUs, one process per rank, in nodes of G
ranks (`Buffer(ranks_per_node=G)`, `--ranks-per-node G`, default 1: rows
cross the NVSHMEM exchange between nodes and are forwarded inside them).
Run by test_internode_gpu.py through `gpu_testing.launch_per_gpu` (one GPU
each, or several ranks sharing a GPU):

    python internode_worker.py --seed N [--ranks-per-node G]
        [--region-share F] [--rdma-chunk C] --steps S
        S calls cycling through intranode_worker's `multiprocess_cases` on
        fresh inputs, through the public ops on the kernels: dispatch,
        cached dispatch, combines (f32, bf16 with a bias, f32 rows); then
        the VJPs of dispatch (a combine, summed node by node) and of
        combine (a cached dispatch). Each process checks the shards it holds
        against the dense model, every output and handle field bit for bit;
        prints "worker i/R: S internode steps passed", then "worker i/R:
        internode VJPs passed". With F < 1 the exchange region holds F of
        what whole calls need, and the larger calls go in pieces; C is
        Config.rdma_chunk (default 0, automatic).
    python internode_worker.py --seed N --repeat STEPS
        STEPS dispatch/combine pairs on fresh routings, enqueued back to
        back, each checked; prints the sha256 of every output (two runs must
        print the same), then "worker i/R: repeat STEPS passed".
    python internode_worker.py --seed N --timeout
        two ranks; rank 1 never calls, so rank 0's dispatch must time out,
        print rank, phase and peer, and fail (exit 1; 3 means it returned).

A hidden `--backend reference` runs the same checks on the reference
backend, to check the oracle without GPUs:
    python -m jax_ep.launch -n 2 -- \\
        python tests/workers/internode_worker.py --seed 0 --backend reference
"""

from __future__ import annotations

import functools
import pathlib
import sys

# Run as a script: tests/support first, where repo_paths puts the repository
# and the other test folders on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "support"))
import repo_paths  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import dense_model as dm
import intranode_worker as intra
import jax_ep
import jax_ep.launch
from ep_testing import assert_same
from jax_ep._src import exchange

EP = intra.EP
# The VJP check: capacity overflow and a hot expert.
VJP_CASE = intra.Case(48, 2048, 8, 256, capacity=100, skew=True)
# The kernels' wait for a peer: a hang fails in seconds.
KERNEL_TIMEOUT_S = 10.0


def open_buffer(mesh: Mesh, cases, backend: str = "cuda", *,
                ranks_per_node: int = 1, region_share: float = 1.0,
                rdma_chunk: int = 0,
                timeout_s: float = KERNEL_TIMEOUT_S) -> jax_ep.Buffer:
  """A Buffer of nodes of `ranks_per_node` ranks, its exchange region sized
  for every case's whole calls, times `region_share` (below 1, the larger
  calls go in pieces; collective), with `Config.rdma_chunk`."""
  num_ranks = mesh.devices.size
  # f32: the checks also combine f32 rows.
  rdma = int(region_share * max(
      jax_ep.rdma_buffer_bytes(c.tokens, c.hidden, c.topk, num_ranks,
                               ranks_per_node, jnp.float32) for c in cases))
  return jax_ep.Buffer(mesh, EP, backend=backend,
                       ranks_per_node=ranks_per_node,
                       num_rdma_bytes=rdma if backend == "cuda" else None,
                       config=jax_ep.Config(rdma_chunk=rdma_chunk),
                       timeout_s=timeout_s)


def _outputs(buffer, case: intra.Case, x, scales, idx, w, y, bias, *,
             pair: bool) -> list:
  """One shard's outputs in intranode_worker's `_names(case, pair)` order,
  through the public ops."""
  rows = x if scales is None else (x, scales)
  d = jax_ep.dispatch(buffer, rows, idx, w if case.weights else None,
                      num_experts=case.experts, capacity=case.capacity,
                      expert_alignment=case.alignment)
  h = d.handle
  out = [d.x] + ([] if scales is None else [d.scales]) + [
      d.topk_idx, d.num_recv_tokens_per_expert, h.src_index, h.recv_row,
      h.num_recv_tokens]
  if case.weights:
    out.append(d.topk_weights)
  if not pair:
    again = jax_ep.dispatch(buffer, rows, handle=h)
    out += [again.x] + ([] if scales is None else [again.scales])
  out.append(jax_ep.combine(buffer, y.astype(jnp.float32), h))
  if not pair:
    out.append(jax_ep.combine(buffer, y, h, bias=bias))
    out.append(jax_ep.combine(buffer, y[:, :128].astype(jnp.float32) * 3, h))
  return out


@functools.cache
def step(mesh: Mesh, buffer, case: intra.Case, pair: bool = False):
  """jit(shard_map): global inputs -> `_outputs`, each [R, ...]."""
  n = len(intra._names(case, pair))  # pylint: disable=protected-access
  return jax.jit(jax.shard_map(
      lambda *a: tuple(o[None] for o in _outputs(buffer, case, *a,
                                                 pair=pair)),
      mesh=mesh, in_specs=tuple([P(EP)] * 6), out_specs=tuple([P(EP)] * n)))


def vjp_program(mesh: Mesh, buffer, case: intra.Case):
  """jit(shard_map): (x, idx, w, g_x, g_w, g_out) -> the cotangents of
  dispatch (d_x, d_w, for the cotangents g_x of its rows and g_w of its
  weights) and of combine (d_y, for the cotangent g_out of its output, with
  y = g_x)."""

  def per_shard(x, idx, w, g_x, g_w, g_out):
    def forward(x, w):
      d = jax_ep.dispatch(buffer, x, idx, w, num_experts=case.experts,
                          capacity=case.capacity)
      return (d.x, d.topk_weights), d.handle

    _, pull, handle = jax.vjp(forward, x, w, has_aux=True)
    d_x, d_w = pull((g_x, g_w))
    _, pull = jax.vjp(lambda y: jax_ep.combine(buffer, y, handle), g_x)
    (d_y,) = pull(g_out)
    return d_x[None], d_w[None], d_y[None]

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                               out_specs=P(EP)))


def check_vjps(mesh: Mesh, buffer, rng, G: int, ctx: str) -> None:
  """`vjp_program` on the kernels against the dense model, bit for bit."""
  case, num_ranks = VJP_CASE, mesh.devices.size
  x, _, idx, w, g_x, g_out = intra.inputs(rng, num_ranks, case)
  g_out = g_out.astype(dm.BF16)
  g_w = rng.standard_normal((g_x.shape[0], case.topk)).astype(np.float32)
  got = vjp_program(mesh, buffer, case)(
      *[intra.global_array(mesh, a, P(EP)) for a in (x, idx, w, g_x, g_w,
                                                     g_out)])
  per_rank = lambda a: a.reshape(num_ranks, -1, *a.shape[1:])
  x, idx, w, g_x, g_w, g_out = map(per_rank, (x, idx, w, g_x, g_w, g_out))
  routes = dm.dispatch([x], idx, w, num_experts=case.experts,
                       capacity=case.capacity)
  # The weights' cotangent counts where the received row has an expert here.
  g_w = np.where(routes.topk_idx >= 0, g_w, np.float32(0))
  want = (dm.combine(g_x, routes, ranks_per_node=G),
          dm.combine(g_w, routes, ranks_per_node=G),
          dm.dispatch([g_out], idx, w, num_experts=case.experts,
                      capacity=case.capacity).rows[0])
  for name, g, truth in zip(("d_x (dispatch)", "d_weights (dispatch)",
                             "d_y (combine)"), got, want):
    for rank, value in intra.by_rank(g):
      assert_same(value, truth[rank], f"{name} (rank {rank})", ctx)


def run_steps(mesh: Mesh, backend: str, seed: int, steps: int, G: int,
              who: str, region_share: float = 1.0,
              rdma_chunk: int = 0) -> None:
  num_ranks = mesh.devices.size
  cases = intra.multiprocess_cases(num_ranks)
  buffer = open_buffer(mesh, cases + [VJP_CASE], backend, ranks_per_node=G,
                       region_share=region_share, rdma_chunk=rdma_chunk)
  rng = np.random.default_rng(seed)  # the same draws on every process
  for i in range(steps):
    case = cases[i % len(cases)]
    arrays = intra.inputs(rng, num_ranks, case)
    out = step(mesh, buffer, case)(
        *[intra.global_array(mesh, a, P(EP)) for a in arrays])
    intra.check_shards(case, num_ranks, arrays, out,
                       f"{who}, seed={seed}, G={G}, step {i}, {case.name()}",
                       with_reference=False, ranks_per_node=G)
  print(f"{who}: {steps} internode steps passed", flush=True)
  check_vjps(mesh, buffer, rng, G, f"{who}, seed={seed}, G={G}, VJPs")
  exchange.barrier("internode_worker: steps done")
  print(f"{who}: internode VJPs passed", flush=True)


def run_repeat(mesh: Mesh, backend: str, seed: int, steps: int, G: int,
               who: str) -> None:
  num_ranks = mesh.devices.size
  case = intra.REPEAT_CASE
  buffer = open_buffer(mesh, [case], backend, ranks_per_node=G)
  program = step(mesh, buffer, case, pair=True)
  rng = np.random.default_rng(seed)

  def run_step():
    arrays = intra.inputs(rng, num_ranks, case)
    return arrays, program(*[intra.global_array(mesh, a, P(EP))
                             for a in arrays])

  def check_step(i, arrays, out):
    intra.check_shards(case, num_ranks, arrays, out,
                       f"{who}, seed={seed}, G={G}, step {i} of {steps}, "
                       f"{case.name()}", with_reference=False, pair=True,
                       ranks_per_node=G)

  intra.repeat_steps(steps, run_step, check_step, who)
  exchange.barrier("internode_worker: repeat done")


def run_timeout(mesh: Mesh) -> int:
  """Rank 0 dispatches alone: its wait for rank 1's rows must time out."""
  case = intra.Case(16, 2048, 8, 16)
  buffer = open_buffer(mesh, [case], timeout_s=0.5)
  x, _, idx, _, _, _ = intra.inputs(np.random.default_rng(0),
                                    mesh.devices.size, case)
  args = [intra.global_array(mesh, a, P(EP)) for a in (x, idx)]
  call = jax.jit(jax.shard_map(
      lambda x, idx: jax_ep.dispatch(buffer, x, idx,
                                     num_experts=case.experts).x[None],
      mesh=mesh, in_specs=P(EP), out_specs=P(EP))).lower(*args).compile()
  return intra.call_alone(call, args, "dispatch")


def main(argv=None) -> int:
  parser = intra.worker_parser(__doc__.splitlines()[0])
  parser.add_argument("--ranks-per-node", type=int, default=1)
  parser.add_argument("--region-share", type=float, default=1.0,
                      help="the exchange region as a share of what whole "
                      "calls need (below 1: calls in pieces)")
  parser.add_argument("--rdma-chunk", type=int, default=0,
                      help="Config.rdma_chunk (0: automatic)")
  args = parser.parse_args(argv)
  jax_ep.launch.initialize()
  mesh = Mesh(np.array(jax.devices()), (EP,))
  if args.timeout:
    return run_timeout(mesh)
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  if args.repeat:
    run_repeat(mesh, args.backend, args.seed, args.repeat,
               args.ranks_per_node, who)
  else:
    run_steps(mesh, args.backend, args.seed, args.steps, args.ranks_per_node,
              who, args.region_share, args.rdma_chunk)
  return 0


if __name__ == "__main__":
  sys.exit(main())
