"""Intranode dispatch/combine kernels on GPUs: shared test code and a worker.

Imported by test_intranode_gpu.py (one process driving every GPU; its checks
run the kernels and the pure-JAX reference in one program on the same inputs
and compare every output and handle field bit for bit) and run by it as a
script, one process per rank (`gpu_testing.launch_per_gpu`; one GPU each, or
several ranks sharing a GPU with `jax_ep.launch --ranks-per-gpu`):

    python intranode_worker.py --seed N --steps S
        S calls cycling through `multiprocess_cases` (peer buffers through
        CUDA IPC) on fresh inputs: dispatch, cached dispatch and combines
        (f32, bf16 with a bias, f32 rows). Each process checks the shards it
        holds against the dense model (tests/support/dense_model.py), every
        output and handle field bit for bit, and against the reference
        backend in the same program where each rank has its own GPU (NCCL
        refuses the reference's collectives where ranks share one); prints
        "worker i/R: S dispatch/combine steps passed".
    python intranode_worker.py --seed N --repeat STEPS
        STEPS dispatch/combine pairs of REPEAT_CASE on fresh routings,
        enqueued back to back in chunks of REPEAT_CHUNK, every one checked
        against the dense model; prints the sha256 of every output (two
        runs must print the same), then "worker i/R: repeat STEPS passed".
    python intranode_worker.py --seed N --timeout
        two ranks; rank 1 never calls, so rank 0's dispatch must time out,
        print rank, phase and peer, and fail (exit 1; 3 means it returned).

A hidden `--backend reference` runs the "kernel" side on the reference, to
check the dense-model oracle without GPUs:
    python -m jax_ep.launch -n 2 -- \\
        python tests/workers/intranode_worker.py --seed 0 --backend reference
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import os
import pathlib
import sys
import time

# Run as a script: tests/support first, where repo_paths puts the repository
# and the other test folders on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "support"))
import repo_paths  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dense_model as dm
import jax_ep.launch
from ep_testing import assert_same
from jax_ep._src import exchange
from jax_ep._src import sizes
from jax_ep._src.config import ALONE_NUM_SMS, OVERLAP_NUM_SMS, Config
from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import peer_buffers
from jax_ep._src.fp8 import FP8_DTYPE, GROUP
from jax_ep._src.reference import normal as reference

EP = "ep"
# --repeat: steps enqueued before the host checks them.
REPEAT_CHUNK = 250
# The timeout check: rank 0's wait, and how long rank 1 stays away.
_TIMEOUT_S = 0.5
_ABSENT_S = 60.0
# The kernels' wait for a peer in the other checks: a hang fails in seconds.
KERNEL_TIMEOUT_S = 10.0
# The kernels' tuning of most cases: copy-engine dispatches, automatic chunks,
# the grid of kernels alone on the GPU (a Buffer's default).
COPY_ENGINE = Config(num_sms=ALONE_NUM_SMS, nvl_chunk=0, nvl_copy_engine=True)
# Warps pushing the dispatched rows, on the budget beside computation.
PUSH = Config(num_sms=OVERLAP_NUM_SMS, nvl_chunk=0)


@dataclasses.dataclass(frozen=True)
class Case:
  tokens: int
  hidden: int
  topk: int
  experts: int
  capacity: int | None = None  # default R*T
  alignment: int = 1
  fp8: bool = False
  weights: bool = True
  skew: bool = False  # most tokens to expert 0
  config: Config = COPY_ENGINE  # the kernels' tuning

  def name(self) -> str:
    tuning = "".join(
        f"-{f.name}={getattr(self.config, f.name)}"
        for f in dataclasses.fields(Config)
        if getattr(self.config, f.name) != getattr(COPY_ENGINE, f.name))
    return (f"T{self.tokens}-H{self.hidden}-K{self.topk}-E{self.experts}-"
            f"M{self.capacity}-a{self.alignment}"
            f"{'-fp8' if self.fp8 else ''}{'' if self.weights else '-now'}"
            f"{'-skew' if self.skew else ''}{tuning}")


# --repeat: small rows, so that the host (inputs, dense model) keeps up.
REPEAT_CASE = Case(8, 512, 8, 16)


def routing(rng: np.random.Generator, num_ranks: int, case: Case) -> np.ndarray:
  """int32[R, T, K]: random ids with -1 entries, repeats, a hot expert (or,
  with `skew`, most tokens on expert 0), ids >= E sometimes."""
  shape = (num_ranks, case.tokens, case.topk)
  ids = rng.integers(0, case.experts, shape, dtype=np.int32)
  hot = 0 if case.skew else int(rng.integers(case.experts))
  share = 0.9 if case.skew else 0.5
  ids[rng.random(shape[:2]) < share, 0] = hot
  ids[rng.random(shape) < 0.15] = -1
  ids[rng.random(shape) < 0.01] = case.experts + 3  # selects nothing
  if num_ranks > 1 and rng.random() < 0.3:
    per_rank = case.experts // num_ranks
    ids[ids == case.experts - per_rank] = -1
  return ids


def inputs(rng: np.random.Generator, num_ranks: int, case: Case):
  """Global inputs, rank-major: x, scales, topk, weights, y, bias."""
  R, T, H = num_ranks, case.tokens, case.hidden
  M = case.capacity or R * T
  x = rng.standard_normal((R * T, H), np.float32)
  scales = None
  if case.fp8:
    scales = rng.uniform(0.01, 2.0, (R * T, H // GROUP)).astype(np.float32)
    x = (x * 50).astype(dm.E4M3)
  else:
    x = x.astype(dm.BF16)
  topk = routing(rng, R, case).reshape(R * T, case.topk)
  weights = rng.standard_normal((R * T, case.topk)).astype(np.float32)
  y = rng.standard_normal((R * M, H), np.float32).astype(dm.BF16)
  bias = rng.standard_normal((R * T, H)).astype(np.float32)
  return x, scales, topk, weights, y, bias


def _outputs(case: Case, num_ranks: int, buffers, x, scales, idx, w, y,
             bias, *, pair: bool = False) -> list:
  """One shard's outputs in `_names(case, pair)` order: the kernels', or the
  reference backend's where `buffers` is None. `pair`: the dispatch and its
  f32 combine only."""
  rows = (x,) if scales is None else (x, scales)
  w = w if case.weights else None
  if buffers is None:
    ops, extra = reference, {}
  else:
    ops, extra = intranode, dict(buffers=buffers, config=case.config,
                                 timeout_s=KERNEL_TIMEOUT_S)
  recv_rows, recv_idx, recv_w, per_expert, h = ops.dispatch(
      rows, idx, w, axis_name=EP, num_ranks=num_ranks,
      num_experts=case.experts,
      capacity=case.capacity or num_ranks * case.tokens,
      expert_alignment=case.alignment, **extra)
  out = [*recv_rows, recv_idx, per_expert, h.src_index, h.recv_row,
         h.num_recv_tokens]
  if case.weights:
    out.append(recv_w)
  if not pair:
    out += ops.cached_dispatch(rows, h, axis_name=EP, **extra)
  combined = ops.combine(y, h, axis_name=EP, **extra)
  out.append(combined)
  if not pair:
    if buffers is None:  # the reference has no bias: the contract's sum
      out.append((combined + bias).astype(y.dtype))
    else:
      out.append(intranode.combine(y, h, axis_name=EP, bias=bias,
                                   out_dtype=y.dtype, **extra))
    out.append(ops.combine(y[:, :128].astype(jnp.float32) * 3, h,
                           axis_name=EP, **extra))
  return out


def _names(case: Case, pair: bool = False) -> list[str]:
  names = ["recv_rows[0]"] + (["recv_rows[1]"] if case.fp8 else []) + [
      "recv_topk_idx", "num_tokens_per_expert", "handle.src_index",
      "handle.recv_row", "handle.num_recv_tokens"]
  if case.weights:
    names.append("recv_topk_weights")
  if not pair:
    names += ["cached recv_rows[0]"] + (["cached recv_rows[1]"] if case.fp8
                                        else [])
  names.append("combine f32")
  if not pair:
    names += ["combine bf16 + bias", "combine of f32 y"]
  return names


def dense_outputs(case: Case, num_ranks: int, arrays, *, pair: bool = False,
                  ranks_per_node: int | None = None) -> list[np.ndarray]:
  """What the ranks must return for each of `_names(case, pair)`, [R, ...]:
  the dense model on `inputs`' arrays (combines node by node for
  `ranks_per_node` G < R)."""
  x, scales, idx, w, y, bias = [
      None if a is None else a.reshape(num_ranks, -1, *a.shape[1:])
      for a in arrays]
  routes = dm.dispatch([x] + ([] if scales is None else [scales]), idx,
                       w if case.weights else None, num_experts=case.experts,
                       capacity=case.capacity or num_ranks * case.tokens,
                       expert_alignment=case.alignment)
  out = [*routes.rows, routes.topk_idx, routes.num_tokens_per_expert,
         routes.src_index, routes.recv_row, routes.num_tokens]
  if case.weights:
    out.append(routes.topk_weights)
  if not pair:
    out += routes.rows  # the cached dispatch of the same rows
  combine = functools.partial(dm.combine, ranks_per_node=ranks_per_node)
  out.append(combine(y.astype(np.float32), routes))
  if not pair:
    out.append(combine(y, routes, [bias]))
    out.append(combine(y[..., :128].astype(np.float32) * np.float32(3),
                       routes))
  return out


def _specs(case: Case, extra=()):
  del case
  return tuple([P(*extra, EP)] * 6)  # scales may be None: an empty tree


def _side_by_side(case: Case, num_ranks: int, buffers, args, *,
                  with_reference: bool, pair: bool) -> tuple:
  """The kernels' outputs, each followed by the reference's if
  `with_reference`; every one with a leading axis of 1 (the rank)."""
  kern = _outputs(case, num_ranks, buffers, *args, pair=pair)
  if not with_reference:
    return tuple(k[None] for k in kern)
  ref = _outputs(case, num_ranks, None, *args, pair=pair)
  return tuple(a[None] for k, r in zip(kern, ref) for a in (k, r))


@functools.cache
def step(mesh: Mesh, buffers, case: Case, with_reference: bool = True,
         pair: bool = False):
  """jit(shard_map): global inputs -> the outputs of `_side_by_side`, each
  [R, ...] (rank-major); names from `_names(case, pair)`."""
  num_ranks = mesh.devices.size
  n = len(_names(case, pair)) * (2 if with_reference else 1)
  return jax.jit(jax.shard_map(
      lambda *args: _side_by_side(case, num_ranks, buffers, args,
                                  with_reference=with_reference, pair=pair),
      mesh=mesh, in_specs=_specs(case), out_specs=tuple([P(EP)] * n)))


@functools.cache
def scan_steps(mesh: Mesh, buffers, case: Case):
  """N dispatch/combine pairs back to back in one program (lax.scan), next to
  the reference: inputs get a leading [N] axis; outputs [N, R, ...]."""
  num_ranks = mesh.devices.size

  def per_shard(*args):
    def body(carry, xs):
      return carry, _side_by_side(case, num_ranks, buffers, xs,
                                  with_reference=True, pair=False)
    return lax.scan(body, None, args)[1]

  n = 2 * len(_names(case))
  return jax.jit(jax.shard_map(
      per_shard, mesh=mesh, in_specs=_specs(case, (None,)),
      out_specs=tuple([P(None, EP)] * n)))


def bits(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def compare(names, out, what: str) -> None:
  """Asserts that every kernel output (the even entries of `out`) equals the
  reference's after it, bit for bit."""
  for i, name in enumerate(names):
    assert_same(out[2 * i], out[2 * i + 1], f"{name} (kernel vs reference)",
                what)


def ranks_share_gpus() -> bool:
  """Whether ranks share GPUs (`jax_ep.launch --ranks-per-gpu`): NCCL then
  refuses every XLA collective across them, the reference backend's too."""
  return jax_ep.launch.ranks_per_gpu() > 1


def by_rank(*arrays):
  """(rank, values...) for each shard this process holds of `arrays`, all
  [R, ...] and split over the ranks alike."""
  for shards in zip(*(a.addressable_shards for a in arrays)):
    yield (shards[0].index[0].start or 0,
           *[np.asarray(s.data)[0] for s in shards])


def check_shards(case: Case, num_ranks: int, arrays, out, ctx: str, *,
                 with_reference: bool, pair: bool = False,
                 ranks_per_node: int | None = None) -> None:
  """Every output shard this process holds (`step`'s `out` on `inputs`'
  `arrays`) equal to the dense model's (`dense_outputs`), bit for bit, and to
  the reference backend's where `out` has it."""
  truth = dense_outputs(case, num_ranks, arrays, pair=pair,
                        ranks_per_node=ranks_per_node)
  stride = 2 if with_reference else 1
  for j, name in enumerate(_names(case, pair)):
    for rank, *values in by_rank(*out[stride * j:stride * (j + 1)]):
      assert_same(values[0], truth[j][rank], f"{name} (rank {rank})", ctx)
      if with_reference:
        assert_same(values[0], values[1], f"{name} (rank {rank}, reference)",
                    ctx)


def global_array(mesh: Mesh, a, spec):
  if a is None:
    return None
  return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec),
                                      lambda index: a[index])


def run_case(mesh: Mesh, buffers, case: Case, rng, what: str) -> None:
  num_ranks = mesh.devices.size
  arrays = inputs(rng, num_ranks, case)
  args = [global_array(mesh, a, P(EP)) for a in arrays]
  out = step(mesh, buffers, case)(*args)
  compare(_names(case), out, f"{what}, {case.name()}")


def multiprocess_cases(num_ranks: int) -> list[Case]:
  """What `--steps` cycles through: every path of the kernels at small
  shapes (the dense model runs on the host for each)."""
  return [Case(7, 2048, 8, 256),
          Case(128, 7168, 8, 256, alignment=4, config=PUSH),
          Case(300, 2048, 2, num_ranks, capacity=200),
          Case(128, 7168, 8, 256, fp8=True, skew=True),
          Case(1, 2048, 1, 256, weights=False),
          # fp8 scale rows of 8 and 12 bytes; H not a multiple of 128
          Case(7, 256, 4, 16, fp8=True),
          Case(33, 384, 8, 256, fp8=True, config=PUSH),
          Case(64, 2056, 8, 256, capacity=50, skew=True),
          # tunings the autotuner may pick: the fewest blocks Config allows
          # (2), lone pusher
          Case(96, 2048, 8, 256,
               config=Config(num_sms=2, nvl_send_warps=1, nvl_chunk=1)),
          Case(256, 4096, 8, 256,
               config=Config(num_sms=8, nvl_send_warps=15, nvl_chunk=7,
                             nvl_copy_engine=True))]


def open_buffers(mesh: Mesh, cases, backend: str = "cuda"):
  """The EP group's NVLink peer buffers, sized for every case (collective);
  None (in a context) for the reference backend."""
  if backend == "reference":
    return contextlib.nullcontext(None)
  num_ranks = mesh.devices.size
  return peer_buffers.create_peer_buffers(
      list(mesh.devices.flat),
      max(sizes.nvl_buffer_bytes(
          c.tokens, c.hidden, c.topk, num_ranks,
          FP8_DTYPE if c.fp8 else jnp.bfloat16) for c in cases))


def run_multiprocess(mesh: Mesh, backend: str, seed: int, steps: int,
                     who: str) -> None:
  """`steps` calls cycling through `multiprocess_cases`, each checked against
  the dense model, and against the reference backend where each rank has
  its own GPU (NCCL refuses the reference's collectives on a shared one)."""
  num_ranks = mesh.devices.size
  with_reference = not ranks_share_gpus()
  cases = multiprocess_cases(num_ranks)
  with open_buffers(mesh, cases, backend) as buffers:
    rng = np.random.default_rng(seed)  # the same draws on every process
    for i in range(steps):
      case = cases[i % len(cases)]
      arrays = inputs(rng, num_ranks, case)
      out = step(mesh, buffers, case, with_reference)(
          *[global_array(mesh, a, P(EP)) for a in arrays])
      check_shards(case, num_ranks, arrays, out,
                   f"{who}, seed={seed}, step {i}, {case.name()}",
                   with_reference=with_reference)
    # A peer's last kernel may still touch these buffers until it is done.
    exchange.barrier("intranode_worker: steps done")
  print(f"{who}: {steps} dispatch/combine steps passed", flush=True)


def repeat_steps(steps: int, run_step, check_step, who: str) -> None:
  """`steps` steps enqueued back to back in chunks of REPEAT_CHUNK:
  `run_step()` draws a step's inputs and enqueues it, returning `(inputs,
  outputs)`; `check_step(i, inputs, outputs)` checks step i. A chunk is
  hashed and checked while the next one runs, so two chunks' outputs are
  alive at a time. Prints the sha256 of every output (two runs must print
  the same), then "<who>: repeat <steps> passed"."""
  digest = hashlib.sha256()

  def finish(chunk) -> None:
    for i, (arrays, out) in chunk:
      for leaf in jax.tree.leaves(out):
        for _, values in by_rank(leaf):
          digest.update(values.tobytes())
      check_step(i, arrays, out)

  pending = []
  for first in range(0, steps, REPEAT_CHUNK):
    chunk = [(i, run_step())
             for i in range(first, min(first + REPEAT_CHUNK, steps))]
    finish(pending)
    pending = chunk
  finish(pending)
  print(f"{who}: repeat {steps} sha256 {digest.hexdigest()}", flush=True)
  print(f"{who}: repeat {steps} passed", flush=True)


def run_repeat(mesh: Mesh, backend: str, seed: int, steps: int,
               who: str) -> None:
  """`steps` dispatch/combine pairs on fresh routings (REPEAT_CASE), each
  checked against the dense model (`repeat_steps`)."""
  num_ranks = mesh.devices.size
  case = REPEAT_CASE
  with open_buffers(mesh, [case], backend) as buffers:
    program = step(mesh, buffers, case, with_reference=False, pair=True)
    rng = np.random.default_rng(seed)

    def run_step():
      arrays = inputs(rng, num_ranks, case)
      return arrays, program(*[global_array(mesh, a, P(EP)) for a in arrays])

    def check_step(i, arrays, out):
      check_shards(case, num_ranks, arrays, out,
                   f"{who}, seed={seed}, step {i} of {steps}, {case.name()}",
                   with_reference=False, pair=True)

    repeat_steps(steps, run_step, check_step, who)
    exchange.barrier("intranode_worker: repeat done")


def run_timeout(mesh: Mesh) -> int:
  """Rank 0 dispatches alone: its wait for rank 1 must time out. Both ranks
  compile the call (compiling may exchange with the peers); rank 1 never
  runs it."""
  case = Case(16, 2048, 8, 16)
  buffers = open_buffers(mesh, [case])
  num_ranks = mesh.devices.size
  x, _, idx, _, _, _ = inputs(np.random.default_rng(0), num_ranks, case)
  args = [global_array(mesh, a, P(EP)) for a in (x, idx)]
  call = jax.jit(jax.shard_map(
      lambda x, idx: intranode.dispatch(
          (x,), idx, None, axis_name=EP, num_ranks=num_ranks,
          num_experts=case.experts, capacity=num_ranks * case.tokens,
          expert_alignment=1, buffers=buffers,
          timeout_s=_TIMEOUT_S)[0][0][None],
      mesh=mesh, in_specs=P(EP), out_specs=P(EP))).lower(*args).compile()
  return call_alone(call, args, "dispatch")


def call_alone(compiled, args, op: str) -> int:
  """Runs `compiled` (compiled on every rank) on rank 0 alone: its wait for
  the others must time out and fail the process. Returns 3, a failure, if
  the call returns; the other ranks stay away, then exit with 3."""
  print(f"rank {jax.process_index()}: compiled", flush=True)
  if jax.process_index() != 0:
    time.sleep(_ABSENT_S)  # never calls; rank 0 must have failed by now
    print(f"rank {jax.process_index()}: rank 0 was still running after "
          f"{_ABSENT_S:.0f} s", flush=True)
    os._exit(3)  # pylint: disable=protected-access  # no shutdown barrier
  jax.block_until_ready(compiled(*args))
  print(f"{op} returned without a timeout", flush=True)
  return 3


def worker_parser(description: str) -> argparse.ArgumentParser:
  """The arguments every normal-op worker takes (this one's, and
  internode_worker.py's with its own on top)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--steps", type=int, default=20,
                      help="calls cycling through multiprocess_cases")
  parser.add_argument("--repeat", type=int, default=0, metavar="STEPS",
                      help="STEPS dispatch/combine pairs instead, hashed")
  parser.add_argument("--timeout", action="store_true",
                      help="rank 0 dispatches alone and must time out")
  parser.add_argument("--backend", choices=("cuda", "reference"),
                      default="cuda", help=argparse.SUPPRESS)
  return parser


def main(argv=None) -> int:
  args = worker_parser(__doc__.splitlines()[0]).parse_args(argv)
  # Before any JAX call. Under the launcher it also makes an uncaught error
  # exit at once, without jax.distributed's shutdown wait for the peer.
  jax_ep.launch.initialize()
  mesh = Mesh(np.array(jax.devices()), (EP,))
  if args.timeout:
    return run_timeout(mesh)
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  if args.repeat:
    run_repeat(mesh, args.backend, args.seed, args.repeat, who)
  else:
    run_multiprocess(mesh, args.backend, args.seed, args.steps, who)
  return 0


if __name__ == "__main__":
  sys.exit(main())
