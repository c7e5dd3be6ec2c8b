"""Intranode dispatch/combine kernels on GPUs: shared test code and a worker.

Imported by test_intranode_gpu.py (one process driving every GPU) and run as
a script by it:

    python intranode_worker.py --seed N --steps S
        one process of a `jax_ep._src.launch.launch` group (one GPU each):
        peer buffers through CUDA IPC, kernel dispatch + combine next to the
        reference on fresh routings; each process compares the shards it
        holds, bit for bit; prints "... passed".
    python intranode_worker.py --seed N --timeout
        one process, rank 0 of two dispatches alone: its barrier must time
        out, print rank, phase and peer, and fail (exit 1).

Every check runs the kernels and the pure-JAX reference in one program on the
same inputs and compares every output (and every handle field) bitwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import traceback

_TESTS = pathlib.Path(__file__).resolve().parent
for _path in (_TESTS.parent, _TESTS):
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep._src.cuda import intranode
from jax_ep._src.fp8 import FP8_DTYPE, GROUP
from jax_ep._src.reference import normal as reference

EP = "ep"


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
  num_sms: int = 0  # kernel tuning; 0: the defaults
  send_warps: int = 0
  chunk_tokens: int = 0
  copy_engine: bool = True  # False: warps push the dispatched rows

  def tuning(self) -> dict[str, int]:
    out = dict(chunk_tokens=self.chunk_tokens, copy_engine=self.copy_engine)
    if self.num_sms:
      out["num_sms"] = self.num_sms
    if self.send_warps:
      out["send_warps"] = self.send_warps
    return out

  def name(self) -> str:
    return (f"T{self.tokens}-H{self.hidden}-K{self.topk}-E{self.experts}-"
            f"M{self.capacity}-a{self.alignment}"
            f"{'-fp8' if self.fp8 else ''}{'' if self.weights else '-now'}"
            f"{'-skew' if self.skew else ''}"
            f"{f'-sm{self.num_sms}' if self.num_sms else ''}"
            f"{f'-w{self.send_warps}' if self.send_warps else ''}"
            f"{f'-c{self.chunk_tokens}' if self.chunk_tokens else ''}"
            f"{'' if self.copy_engine else '-push'}")


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
    x = np.asarray(jnp.asarray(x * 50).astype(FP8_DTYPE))
  else:
    x = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
  topk = routing(rng, R, case).reshape(R * T, case.topk)
  weights = rng.standard_normal((R * T, case.topk)).astype(np.float32)
  y = np.asarray(jnp.asarray(
      rng.standard_normal((R * M, H), np.float32)).astype(jnp.bfloat16))
  bias = rng.standard_normal((R * T, H)).astype(np.float32)
  return x, scales, topk, weights, y, bias


def _pairs(case: Case, num_ranks: int, buffers, x, scales, idx, w, y, bias):
  """(name, kernel value, reference value) for every output of one shard."""
  rows = (x,) if scales is None else (x, scales)
  w = w if case.weights else None
  kw = dict(axis_name=EP, num_ranks=num_ranks, num_experts=case.experts,
            capacity=case.capacity or num_ranks * case.tokens,
            expert_alignment=case.alignment)
  k_rows, k_idx, k_w, k_pe, k_h = intranode.dispatch(
      rows, idx, w, buffers=buffers, **kw, **case.tuning())
  r_rows, r_idx, r_w, r_pe, r_h = reference.dispatch(rows, idx, w, **kw)
  pairs = [(f"recv_rows[{i}]", k, r) for i, (k, r) in
           enumerate(zip(k_rows, r_rows))]
  pairs += [("recv_topk_idx", k_idx, r_idx),
            ("num_tokens_per_expert", k_pe, r_pe),
            ("handle.src_index", k_h.src_index, r_h.src_index),
            ("handle.recv_row", k_h.recv_row, r_h.recv_row),
            ("handle.num_recv_tokens", k_h.num_recv_tokens,
             r_h.num_recv_tokens)]
  if case.weights:
    pairs.append(("recv_topk_weights", k_w, r_w))
  k_cached = intranode.cached_dispatch(rows, k_h, axis_name=EP,
                                      buffers=buffers, **case.tuning())
  r_cached = reference.cached_dispatch(rows, r_h, axis_name=EP)
  pairs += [(f"cached recv_rows[{i}]", k, r) for i, (k, r) in
            enumerate(zip(k_cached, r_cached))]
  k_out = intranode.combine(y, k_h, axis_name=EP, buffers=buffers,
                            **case.tuning())
  r_out = reference.combine(y, r_h, axis_name=EP)
  pairs.append(("combine f32", k_out, r_out))
  k_out = intranode.combine(y, k_h, axis_name=EP, buffers=buffers, bias=bias,
                            out_dtype=y.dtype)
  pairs.append(("combine bf16 + bias", k_out, (r_out + bias).astype(y.dtype)))
  y32 = y[:, :128].astype(jnp.float32) * 3
  pairs.append(("combine of f32 y",
                intranode.combine(y32, k_h, axis_name=EP, buffers=buffers),
                reference.combine(y32, r_h, axis_name=EP)))
  return pairs


def _names(case: Case) -> list[str]:
  names = ["recv_rows[0]"] + (["recv_rows[1]"] if case.fp8 else []) + [
      "recv_topk_idx", "num_tokens_per_expert", "handle.src_index",
      "handle.recv_row", "handle.num_recv_tokens"]
  if case.weights:
    names.append("recv_topk_weights")
  names += ["cached recv_rows[0]"] + (["cached recv_rows[1]"] if case.fp8
                                      else [])
  return names + ["combine f32", "combine bf16 + bias", "combine of f32 y"]


def _specs(case: Case, extra=()):
  del case
  return tuple([P(*extra, EP)] * 6)  # scales may be None: an empty tree


@functools.cache
def step(mesh: Mesh, buffers, case: Case):
  """jit(shard_map): global inputs -> tuple of (kernel, reference) outputs,
  each [R, ...] (rank-major); names from `_names(case)`."""
  num_ranks = mesh.devices.size

  def per_shard(x, scales, idx, w, y, bias):
    out = []
    for _, k, r in _pairs(case, num_ranks, buffers, x, scales, idx, w, y,
                          bias):
      out += [k[None], r[None]]
    return tuple(out)

  n = len(_names(case))
  return jax.jit(jax.shard_map(
      per_shard, mesh=mesh, in_specs=_specs(case),
      out_specs=tuple([P(EP)] * (2 * n))))


@functools.cache
def scan_steps(mesh: Mesh, buffers, case: Case):
  """N dispatch/combine pairs back to back in one program (lax.scan): inputs
  get a leading [N] axis; outputs [N, R, ...]."""
  num_ranks = mesh.devices.size

  def per_shard(x, scales, idx, w, y, bias):
    def body(carry, xs):
      out = []
      for _, k, r in _pairs(case, num_ranks, buffers, *xs):
        out += [k[None], r[None]]
      return carry, tuple(out)

    _, out = lax.scan(body, None, (x, scales, idx, w, y, bias))
    return out

  n = len(_names(case))
  return jax.jit(jax.shard_map(
      per_shard, mesh=mesh, in_specs=_specs(case, (None,)),
      out_specs=tuple([P(None, EP)] * (2 * n))))


def bits(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def compare(names, out, what: str) -> None:
  """Asserts every kernel output equals its reference bitwise."""
  for i, name in enumerate(names):
    k, r = np.asarray(out[2 * i]), np.asarray(out[2 * i + 1])
    assert k.shape == r.shape and k.dtype == r.dtype, (
        f"{what}: {name}: {k.dtype}{k.shape} vs {r.dtype}{r.shape}")
    kb, rb = bits(k), bits(r)
    if not np.array_equal(kb, rb):
      bad = np.argwhere(kb != rb)
      raise AssertionError(
          f"{what}: {name}: {len(bad)} of {kb.size} elements differ; first "
          f"at {bad[:5].tolist()}: kernel {k[tuple(bad[0])]!r} vs reference "
          f"{r[tuple(bad[0])]!r}")


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


def run_multiprocess(seed: int, steps: int) -> None:
  from jax_ep._src.cuda import peer_buffers  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  num_ranks = len(devices)
  mesh = Mesh(np.array(devices), (EP,))
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  cases = [Case(7, 2048, 8, 256),
           Case(128, 7168, 8, 256, alignment=4, copy_engine=False),
           Case(300, 2048, 2, num_ranks, capacity=200),
           Case(128, 7168, 8, 256, fp8=True, skew=True),
           Case(1, 2048, 1, 256, weights=False)]
  num_bytes = max(intranode.intranode_buffer_bytes(
      c.tokens, c.hidden, c.topk, num_ranks,
      FP8_DTYPE if c.fp8 else jnp.bfloat16) for c in cases)
  with peer_buffers.create_peer_buffers(devices, num_bytes) as buffers:
    rng = np.random.default_rng(seed)  # the same draws on every process
    for i in range(steps):
      case = cases[i % len(cases)]
      arrays = inputs(rng, num_ranks, case)
      args = [global_array(mesh, a, P(EP)) for a in arrays]
      out = step(mesh, buffers, case)(*args)
      names = _names(case)
      for j, name in enumerate(names):
        for ks, rs in zip(out[2 * j].addressable_shards,
                          out[2 * j + 1].addressable_shards):
          if not np.array_equal(bits(ks.data), bits(rs.data)):
            raise AssertionError(
                f"{who}, seed={seed}, step {i}, {case.name()}: {name} "
                f"differs on shard {ks.index}")
    jax.block_until_ready(out)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("jax_ep intranode test done")
  print(f"{who}: {steps} dispatch/combine steps passed", flush=True)


def run_timeout() -> None:
  """Rank 0 alone calls dispatch: its wait for rank 1 must time out."""
  from jax_ep._src.cuda import peer_buffers  # pylint: disable=g-import-not-at-top
  gpus = jax.devices("gpu")[:2]
  case = Case(16, 2048, 8, 16)
  buffers = peer_buffers.create_peer_buffers(
      gpus, intranode.intranode_buffer_bytes(case.tokens, case.hidden,
                                             case.topk, 2))
  x = jax.device_put(jnp.ones((case.tokens, case.hidden), jnp.bfloat16),
                     gpus[0])
  idx = jax.device_put(jnp.zeros((case.tokens, case.topk), jnp.int32), gpus[0])
  call = jax.jit(lambda x, idx: intranode.dispatch(
      (x,), idx, None, axis_name=EP, num_ranks=2, num_experts=case.experts,
      capacity=2 * case.tokens, expert_alignment=1, buffers=buffers,
      timeout_s=0.5)[0])
  jax.block_until_ready(call(x, idx))
  print("dispatch returned without a timeout", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--timeout", action="store_true")
  args = parser.parse_args(argv)
  try:
    if args.timeout:
      run_timeout()
      return 3  # no timeout is a failure too
    import jax_ep.launch  # pylint: disable=g-import-not-at-top
    jax_ep.launch.initialize()
    run_multiprocess(args.seed, args.steps)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    import os  # pylint: disable=g-import-not-at-top
    os._exit(1)  # skip jax.distributed's shutdown wait for the peer
  return 0


if __name__ == "__main__":
  sys.exit(main())
