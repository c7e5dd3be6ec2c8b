"""Kernel time from the profiler (docs/measuring.md), as DeepEP's bench_kineto
reports its own: what the GPU kernels of a jitted loop of calls took, launch
gaps and host time left out.

The loop is a `harness.chained_loop`, already compiled and warm (the timed
runs before did both), run once under `jax.profiler.trace`; every process
runs it (the collectives keep the ranks in lockstep) and profiles its own
GPU.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
from typing import Callable, NamedTuple

import jax


def per_kernel(kernels: list[Kernel], iters: int
               ) -> dict[str, tuple[int, float]]:
  """Per GPU kernel name among the `kernels` of `iters` calls (one profiled
  loop, kernel_intervals'): (launches per call, median µs per launch)."""
  durations = collections.defaultdict(list)
  for kernel in kernels:
    durations[kernel.name].append(kernel.end - kernel.start)
  return {name: (round(len(d) / iters), statistics.median(d))
          for name, d in durations.items()}


def idle_per_call(kernels: list[Kernel], iters: int) -> float:
  """µs per call in which no kernel ran, from the first kernel's start to the
  last one's end: launch gaps, and the GPU waiting for the host."""
  union = busy(kernels)
  return (union[-1][1] - union[0][0] - length(union)) / iters


class Kernel(NamedTuple):
  """One kernel run: its name, the GPU stream it ran on, start and end (µs
  on the profiler's clock)."""
  name: str
  stream: int
  start: float
  end: float


def kernel_intervals(loop: Callable, carry) -> list[Kernel]:
  """Every kernel of one profiled run of `loop` on this process's GPU
  streams, in start order."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(loop(carry))
    kernels = _kernels(trace_dir)
  if not kernels:
    raise RuntimeError("the profile holds no GPU kernel (is CUPTI available?)")
  return sorted(kernels, key=lambda k: k.start)


def _kernels(trace_dir: str) -> list[Kernel]:
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  if not paths:
    raise RuntimeError(f"the profiler wrote no perfetto trace in {trace_dir}")
  with gzip.open(paths[0]) as f:
    events = json.load(f)["traceEvents"]
  gpus = {e["pid"] for e in events if e.get("ph") == "M" and
          e.get("name") == "process_name" and
          e["args"]["name"].startswith("/device:GPU")}
  streams = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and
             e.get("name") == "thread_name" and e["pid"] in gpus and
             "Stream" in e["args"]["name"]}
  return [Kernel(e["name"], e["tid"], float(e["ts"]),
                 float(e["ts"]) + float(e["dur"]))
          for e in events
          if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams]


def busy(kernels: list[Kernel]) -> list[tuple[float, float]]:
  """The union of the kernels' intervals: disjoint (start, end), in order."""
  union: list[tuple[float, float]] = []
  for k in sorted(kernels, key=lambda k: k.start):
    if union and k.start <= union[-1][1]:
      union[-1] = (union[-1][0], max(union[-1][1], k.end))
    else:
      union.append((k.start, k.end))
  return union


def length(intervals: list[tuple[float, float]]) -> float:
  return sum(end - start for start, end in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]
                 ) -> list[tuple[float, float]]:
  """Where two unions of disjoint sorted intervals (busy's) overlap."""
  out, i, j = [], 0, 0
  while i < len(a) and j < len(b):
    start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
    if start < end:
      out.append((start, end))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return out


def short_name(kernel: str) -> str:
  """The kernel's own name: `ns::Kernel(args)` or its mangled form (as the
  profiler names relocatable device code's kernels; a template's arguments
  follow the name) -> `Kernel`."""
  mangled = re.findall(r"([A-Z][A-Za-z]*Kernel)[EI]", kernel)
  if mangled:
    return mangled[-1]
  return kernel.split("(")[0].split("::")[-1]


def summary(times: dict[str, tuple[int, float]], match: str = "") -> float:
  """µs per call of the kernels whose name contains `match`."""
  return sum(n * us for name, (n, us) in times.items() if match in name)


def describe(times: dict[str, tuple[int, float]]) -> str:
  """`Name xN: us` per kernel, longest first, on one line."""
  rows = sorted(times.items(), key=lambda kv: -kv[1][0] * kv[1][1])
  return ", ".join(f"{short_name(name)[:40]}{f' x{n}' if n != 1 else ''}: "
                   f"{us:.1f}" for name, (n, us) in rows if n > 0)
