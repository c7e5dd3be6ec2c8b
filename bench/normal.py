"""Normal dispatch / combine (and layout) benchmarks, peers in the same run.

Implementations timed on the same inputs:
  jax_ep      the "cuda" backend's kernels (only when the extension and GPUs
              are there, and only for ops that have a kernel)
  reference   jax_ep's pure-JAX backend: all_gather + gathers, all_to_all back
  all_to_all  a raw `lax.all_to_all` moving the dispatch's logical bytes
  ragged_all_to_all  MaxText's pipeline (bench/ragged.py): one row per
              (token, expert) pair; in one process only (docs/measuring.md)

Link bytes per rank: jax_ep moves each remote row once; the reference's
all_gather (dispatch) and all_to_all (combine) move (R-1)*T full rows; the raw
all_to_all moves (R-1)/R of its array.

Across nodes (`ranks_per_node` G < R: jax_ep runs its internode kernels) the
jax_ep records count bytes as DeepEP counts its internode figures: logical =
(token, destination node) pairs, own node included, times the row bytes
("RDMA logical bandwidth"), link = the pairs whose node is another, the rows
that cross the network. Where ranks share GPUs or nodes are simulated on one
host, those figures only show that the path runs (docs/measuring.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep._src.runtime import KERNEL_OPS
from bench import harness, ragged
from bench.shapes import Shape

FP8_GROUP = 128


def _row_bytes(hidden: int, fp8: bool) -> int:
  return hidden + 4 * hidden // FP8_GROUP if fp8 else 2 * hidden


def _rows_per_rank(idx: np.ndarray, shape: Shape, ranks: int) -> np.ndarray:
  """[R(dest), R(src)] rows each rank receives from each source."""
  per_rank = shape.experts // ranks
  dest = np.where(idx >= 0, idx // per_rank, -1).reshape(ranks, shape.tokens, -1)
  return np.stack([(dest == r).any(-1).sum(-1) for r in range(ranks)])


def _node_pairs(idx: np.ndarray, shape: Shape, ranks: int,
                ranks_per_node: int) -> tuple[float, float]:
  """Mean per source rank of its (token, destination node) pairs, and of
  those whose node is not its own."""
  per_node = shape.experts // ranks * ranks_per_node
  nodes = ranks // ranks_per_node
  dest = np.where(idx >= 0, idx // per_node, -1).reshape(ranks, shape.tokens,
                                                          -1)
  hit = np.stack([(dest == n).any(-1) for n in range(nodes)], -1)  # [R,T,N]
  own = np.arange(ranks) // ranks_per_node
  remote = hit.sum((1, 2)) - hit[np.arange(ranks), :, own].sum(-1)
  return float(hit.sum((1, 2)).mean()), float(remote.mean())


def _pairs_per_rank(idx: np.ndarray, shape: Shape, ranks: int) -> np.ndarray:
  """[R(dest), R(src)] (token, expert) pairs each rank receives from each."""
  dest = np.where(idx >= 0, idx // (shape.experts // ranks), -1)
  dest = dest.reshape(ranks, -1)
  return np.stack([(dest == r).sum(-1) for r in range(ranks)])


class Problem:
  """Global inputs of one shape on the mesh, and the byte counts they imply."""

  def __init__(self, mesh, shape: Shape, seed: int,
               ranks_per_node: int | None = None):
    self.mesh = mesh
    self.shape = shape
    self.ranks = mesh.shape["ep"]
    sharding = NamedSharding(mesh, P("ep"))
    rng = np.random.default_rng(seed)  # same routing on every process
    idx = harness.random_routing(rng, self.ranks * shape.tokens, shape.topk,
                                 shape.experts)
    weights = rng.random(idx.shape, dtype=np.float32)
    local = np.random.default_rng([seed, jax.process_index()])
    n_local = shape.tokens * len(mesh.local_devices)
    x = local.standard_normal((n_local, shape.hidden), dtype=np.float32)

    self.x = jax.make_array_from_process_local_data(sharding,
                                                    x.astype(jnp.bfloat16))
    self.idx = harness.place(idx, sharding)
    self.weights = harness.place(weights, sharding)
    self.fp8 = jax.jit(jax.shard_map(
        jax_ep.per_token_cast_to_fp8, mesh=mesh, in_specs=P("ep"),
        out_specs=P("ep")))(self.x)
    rows = _rows_per_rank(idx, shape, self.ranks)
    self.recv_rows = rows.sum(1).mean()
    self.remote_rows = (rows.sum(1) - np.diag(rows)).mean()
    pairs = _pairs_per_rank(idx, shape, self.ranks)
    self.recv_pairs = pairs.sum(1).mean()
    self.remote_pairs = (pairs.sum(1) - np.diag(pairs)).mean()
    self.node_pairs, self.remote_node_pairs = _node_pairs(
        idx, shape, self.ranks, ranks_per_node or self.ranks)


def _sharded(mesh, f):
  return jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))


def run(mesh, shape: Shape, *, impls, dtypes, ops, seed: int, iters: int,
        reps: int, warmup: int, num_sms=(None,),
        ranks_per_node: int | None = None) -> list[harness.Record]:
  """Times every impl and op on one shape; jax_ep's kernels once per SM
  count in `num_sms` (None: the Buffer's default config; 0: automatic).
  `ranks_per_node` G < R makes the EP axis N = R / G nodes: jax_ep then runs its internode
  kernels (one process per rank)."""
  problem = Problem(mesh, shape, seed, ranks_per_node)
  ranks = problem.ranks
  internode = ranks_per_node is not None and ranks_per_node < ranks
  note = (f"internode: {ranks // ranks_per_node} nodes of {ranks_per_node}"
          if internode else None)
  records = []
  loops = dict(iters=iters, reps=reps, warmup=warmup)

  def record(op, impl, dtype, seconds, logical, link, num_sms=None):
    records.append(harness.Record(
        op=op, impl=impl, dtype=dtype, tokens=shape.tokens,
        hidden=shape.hidden, topk=shape.topk, experts=shape.experts,
        ranks=ranks, num_sms=num_sms, time_us=seconds * 1e6,
        logical_gbps=harness.gbps(logical, seconds),
        link_gbps=harness.gbps(link, seconds), note=note))
    if jax.process_index() == 0:
      harness.print_row(records[-1])

  api_ops = {"layout": ("get_dispatch_layout",), "dispatch": ("dispatch",),
             "combine": ("combine",), "dispatch_combine": ("dispatch", "combine")}
  on_gpus = mesh.devices.flat[0].platform == "gpu"
  runs = [(impl, sms) for impl in impls
          for sms in (num_sms if impl == "jax_ep" and on_gpus else (None,))]
  for impl, sms in runs:
    if impl == "ragged_all_to_all":
      _run_ragged(problem, ops, record, loops)
      continue
    if impl == "all_to_all":
      if "dispatch" in ops:
        for dtype in dtypes:
          _run_all_to_all(problem, dtype, record, loops)
      continue
    # Without its kernel an op would time the reference a second time.
    ops_here = [op for op in ops if impl != "jax_ep" or
                all(a in KERNEL_OPS for a in api_ops[op])]
    kernels = impl == "jax_ep"
    sizing = (shape.tokens, shape.hidden, shape.topk, ranks)
    buffer = jax_ep.Buffer(
        mesh, "ep", backend="cuda" if kernels else "reference",
        ranks_per_node=ranks_per_node,
        num_nvl_bytes=jax_ep.nvl_buffer_bytes(*sizing)
        if kernels and not internode else None,
        num_rdma_bytes=jax_ep.rdma_buffer_bytes(*sizing, ranks_per_node)
        if kernels and internode else None,
        config=None if sms is None else jax_ep.Config(num_sms=sms))
    num_sms = buffer.num_sms()
    gathered = (ranks - 1) * shape.tokens

    def logical(rows, hidden_bytes):
      if kernels and internode:
        return problem.node_pairs * hidden_bytes
      return rows * hidden_bytes

    def wire(rows, hidden_bytes):
      if kernels and internode:
        return problem.remote_node_pairs * hidden_bytes
      return (problem.remote_rows if kernels else rows) * hidden_bytes

    dispatch = functools.partial(jax_ep.dispatch, buffer,
                                 num_experts=shape.experts)
    if "layout" in ops_here:
      t = harness.time_per_call(
          lambda idx: jax_ep.get_dispatch_layout(buffer, idx, shape.experts),
          problem.idx, mesh, **loops)
      record("layout", impl, "int32", t, None, None)

    for dtype in dtypes:
      if "dispatch" not in ops_here:
        continue
      fp8 = dtype == "fp8"
      row = _row_bytes(shape.hidden, fp8)

      carry = (problem.fp8 if fp8 else problem.x, problem.idx, problem.weights)
      t = harness.time_dispatch(buffer, carry, mesh,
                                num_experts=shape.experts, **loops)
      record("dispatch", impl, dtype, t, logical(problem.recv_rows, row),
             wire(gathered, row), num_sms)

    row = _row_bytes(shape.hidden, False)
    if "combine" in ops_here:
      t = harness.time_combine(
          buffer, (problem.x, problem.idx, problem.weights), mesh,
          num_experts=shape.experts, **loops)
      record("combine", impl, "bf16", t, logical(problem.recv_rows, row),
             wire(gathered, row), num_sms)

    if "dispatch_combine" in ops_here:
      def round_trip(carry):
        d = dispatch(*carry)
        return jax_ep.combine(buffer, d.x, d.handle)

      t = harness.time_per_call(round_trip,
                                (problem.x, problem.idx, problem.weights),
                                mesh, **loops)
      record("dispatch_combine", impl, "bf16", t,
             2 * logical(problem.recv_rows, row), 2 * wire(gathered, row),
             num_sms)
  return records


def _run_all_to_all(problem: Problem, dtype: str, record, loops) -> None:
  """A raw all_to_all whose received bytes equal the dispatch's logical bytes."""
  shape, ranks, mesh = problem.shape, problem.ranks, problem.mesh
  fp8 = dtype == "fp8"
  row = _row_bytes(shape.hidden, fp8)
  per_peer = int(np.ceil(problem.recv_rows / ranks))
  width = row // (1 if fp8 else 2)
  dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  data = jax.jit(lambda: jax.random.normal(
      jax.random.key(0), (ranks * ranks * per_peer, width)).astype(dt),
                 out_shardings=NamedSharding(mesh, P("ep")))()

  def step(a):
    return jax.lax.all_to_all(a.reshape(ranks, per_peer, width), "ep", 0,
                              0).reshape(-1, width)

  t = harness.time_per_call(step, data, mesh, **loops)
  total = ranks * per_peer * row
  record("dispatch", "all_to_all", dtype, t, total, total * (ranks - 1) / ranks)


def _run_ragged(problem: Problem, ops, record, loops) -> None:
  """MaxText's ragged_all_to_all pipeline, bf16 (see bench/ragged.py)."""
  shape, ranks, mesh = problem.shape, problem.ranks, problem.mesh
  if jax.process_count() > 1 or jax.devices()[0].platform != "gpu":
    if jax.process_index() == 0:
      print("ragged_all_to_all: skipped (runs in one process on GPUs only)")
    return
  kw = dict(num_ranks=ranks, axis_name="ep")
  row = _row_bytes(shape.hidden, False)
  carry = (problem.x, problem.idx, problem.weights)

  def routes(idx):
    return ragged.routes(idx, num_experts=shape.experts, **kw)

  if "dispatch" in ops:
    t = harness.time_per_call(
        lambda c: ragged.dispatch(c[0], c[1], routes(c[1]), **kw), carry,
        mesh, **loops)
    record("dispatch", "ragged_all_to_all", "bf16", t,
           problem.recv_pairs * row, problem.remote_pairs * row)
  if "dispatch_combine" in ops:
    def round_trip(c):
      x, idx, w = c
      r = routes(idx)
      return ragged.combine(ragged.dispatch(x, idx, r, **kw), idx, w, r,
                            axis_name="ep")

    t = harness.time_per_call(round_trip, carry, mesh, **loops)
    record("dispatch_combine", "ragged_all_to_all", "bf16", t,
           2 * problem.recv_pairs * row, 2 * problem.remote_pairs * row)
