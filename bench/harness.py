"""Timing and records: the one harness every benchmark uses.

Timing method: `jax_ep/_src/timing.py` (the tuner's too), re-exported here:
the op runs `iters_per_call` times inside one jitted `fori_loop`, the loop is
timed with the host clock, the median over `reps` loops counts. Process 0's
figure is recorded.

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
import sys

import jax

from jax_ep._src.timing import (chained_loop, random_routing, time_combine,
                                time_dispatch, time_loop, time_per_call)

__all__ = ["Record", "chained_loop", "device_name", "gbps", "place",
           "print_header", "print_row", "random_routing", "save_records",
           "time_combine", "time_dispatch", "time_loop", "time_per_call",
           "write_records"]


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
  # Compute benchmarks (bench/experts.py): model TFLOP/s; None for the
  # communication ones.
  tflops: float | None = None


def _command() -> str:
  """How to rerun this benchmark, launcher included."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)  # -m's module
  module = spec.name.removesuffix(".__main__") if spec else "bench"
  bench = ["python", "-m", module, *sys.argv[1:]]
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


def place(a, sharding) -> jax.Array:
  """The global array `a`, which every process holds alike, placed shard by
  shard with no collective (`jax.device_put` of a global array checks it
  across the processes with an NCCL all-gather, which ranks sharing a GPU
  refuse)."""
  return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])


def save_records(records: list[Record], out: str | None, name: str) -> None:
  """Writes `records` to `out`, by default
  bench/results/<date>_<device>_<name>.json, and says where."""
  device = device_name().replace(" ", "_")
  out = out or (f"bench/results/{datetime.date.today().isoformat()}_"
                f"{device}_{name}.json")
  write_records(records, out)
  print(f"wrote {out}")


def print_header() -> None:
  print(f"{'op':<21}{'impl':<19}{'dtype':<6}{'ranks':>6}{'tokens':>7}"
        f"{'hidden':>7}{'sms':>5}{'time_us':>10}{'logical':>9}{'link':>8}",
        flush=True)


def print_row(r: Record) -> None:
  fmt = lambda v: "-" if v is None else f"{v:.1f}"
  sms = "-" if r.num_sms is None else str(r.num_sms)
  print(f"{r.op:<21}{r.impl:<19}{r.dtype:<6}{r.ranks:>6}{r.tokens:>7}"
        f"{r.hidden:>7}{sms:>5}{r.time_us:>10.1f}{fmt(r.logical_gbps):>9}"
        f"{fmt(r.link_gbps):>8}"
        f"{'' if r.tflops is None else f'  {r.tflops:.1f} TFLOP/s'}"
        f"{'  ' + r.note if r.note else ''}", flush=True)
