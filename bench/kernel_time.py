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
from typing import Callable

import jax


def kernel_times(loop: Callable, carry, *, iters: int
                 ) -> dict[str, tuple[int, float]]:
  """Per GPU kernel name of one profiled run of `loop` (`iters` calls):
  (launches per call, median µs per launch)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(loop(carry))
    durations = _kernel_durations(trace_dir)
  return {name: (round(len(d) / iters), statistics.median(d))
          for name, d in durations.items()}


def _kernel_durations(trace_dir: str) -> dict[str, list[float]]:
  """Durations (µs) of every kernel on this process's GPU streams, by name."""
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
  durations = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams:
      durations[e["name"]].append(float(e["dur"]))
  if not durations:
    raise RuntimeError("the profile holds no GPU kernel (is CUPTI available?)")
  return durations


def short_name(kernel: str) -> str:
  """The kernel's own name: `ns::Kernel(args)` or its mangled form (as the
  profiler names relocatable device code's kernels) -> `Kernel`."""
  mangled = re.findall(r"([A-Z][A-Za-z]*Kernel)E", kernel)
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
