"""Timing and records: the one harness every benchmark uses.

Timing method: the op runs `iters_per_call` times inside one jitted
`fori_loop` (each iteration's input depends on the last output, so nothing is
hoisted or overlapped), the loop is timed with the host clock around
`block_until_ready`, and the per-call time is the loop's time over the
iterations. That is repeated `reps` times after `warmup` runs; the median is
reported. Every process runs the same loop; the collectives keep the ranks in
lockstep; process 0's figure is recorded.

Bandwidth (docs/measuring.md), per rank:
  logical = bytes of all rows this rank receives (local rows included) / time;
            an fp8 row counts H + 4*H/128 bytes.
  link    = bytes that actually crossed to another GPU / time (implementation
            dependent: each benchmark states its own count).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from typing import Callable

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P


def chained_loop(step: Callable, iters: int, mesh) -> Callable:
  """Jitted `iters` calls of the per-shard `step(carry) -> out` in `shard_map`.

  Each call's input depends on the last call's output: the first element of
  the output's first leaf is written into the carry's first leaf (2-D).
  """
  def body(_, carry):
    out = step(carry)
    leaves, tree = jax.tree.flatten(carry)
    first = jax.tree.leaves(out)[0]
    link = first.reshape(-1)[:1].astype(leaves[0].dtype).reshape(1, 1)
    leaves[0] = lax.dynamic_update_slice(leaves[0], link, (0, 0))
    return jax.tree.unflatten(tree, leaves)

  loop = lambda carry: lax.fori_loop(0, iters, body, carry)
  return jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=P("ep"),
                               out_specs=P("ep")))


def time_per_call(step: Callable, carry, mesh, *, iters: int, reps: int,
                  warmup: int) -> float:
  """Median seconds per call of `step` over `reps` timed loops."""
  return time_loop(chained_loop(step, iters, mesh), carry, iters=iters,
                   reps=reps, warmup=warmup)


def time_loop(loop: Callable, carry, *, iters: int, reps: int,
              warmup: int) -> float:
  """Median seconds per call of a `chained_loop` of `iters` calls over
  `reps` timed runs, after `warmup` runs."""
  for _ in range(warmup):
    jax.block_until_ready(loop(carry))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(loop(carry))
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def device_name() -> str:
  return jax.devices()[0].device_kind


@dataclasses.dataclass
class Record:
  """One benchmark figure (the fields listed in docs/measuring.md)."""
  op: str
  impl: str
  dtype: str
  tokens: int
  hidden: int
  topk: int
  experts: int
  ranks: int
  num_sms: int | None
  time_us: float
  logical_gbps: float | None
  link_gbps: float | None
  device: str = dataclasses.field(default_factory=device_name)
  date: str = dataclasses.field(
      default_factory=lambda: datetime.date.today().isoformat())
  command: str = dataclasses.field(default_factory=lambda: _command())
  processes: int = dataclasses.field(default_factory=jax.process_count)
  # What the figure needs said beside it (an option that differs from the
  # peers', what an overlap hid, the kernels' times); None for most records.
  note: str | None = None
  # With --profile: the implementation's own GPU kernels' time per call, from
  # the profiler (bench/kernel_time.py); None otherwise.
  kernel_us: float | None = None


def _command() -> str:
  """How to rerun this benchmark, launcher included."""
  bench = ["python", "-m", "bench", *sys.argv[1:]]
  if jax.process_count() > 1:
    bench = ["python", "-m", "jax_ep.launch", "-n", str(jax.process_count()),
             "--", *bench]
  return " ".join(shlex.quote(a) for a in bench)


def gbps(nbytes: float | None, seconds: float) -> float | None:
  return None if nbytes is None else nbytes / seconds / 1e9


def write_records(records: list[Record], path: str) -> None:
  """Appends nothing: writes a new JSON file (old files are the history)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump([dataclasses.asdict(r) for r in records], f, indent=1)


def print_header() -> None:
  print(f"{'op':<21}{'impl':<19}{'dtype':<6}{'ranks':>6}{'tokens':>7}"
        f"{'hidden':>7}{'sms':>5}{'time_us':>10}{'logical':>9}{'link':>8}",
        flush=True)


def print_row(r: Record) -> None:
  fmt = lambda v: "-" if v is None else f"{v:.1f}"
  sms = "-" if r.num_sms is None else str(r.num_sms)
  print(f"{r.op:<21}{r.impl:<19}{r.dtype:<6}{r.ranks:>6}{r.tokens:>7}"
        f"{r.hidden:>7}{sms:>5}{r.time_us:>10.1f}{fmt(r.logical_gbps):>9}"
        f"{fmt(r.link_gbps):>8}{'  ' + r.note if r.note else ''}", flush=True)


def random_routing(rng: np.random.Generator, tokens: int, topk: int,
                   experts: int) -> np.ndarray:
  """Distinct random experts per token, as a softmax router's top-k gives."""
  scores = rng.random((tokens, experts))
  return np.argsort(-scores, axis=1)[:, :topk].astype(np.int32)
