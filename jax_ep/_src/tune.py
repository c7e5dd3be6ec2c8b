"""Tunes the intranode kernels on the local GPUs and records the best config.

    python -m jax_ep.tune [--tokens 4096 --hidden 7168 --topk 8 --experts 256
        --sms 16,24,32 --send-warps 2,4,6,8 --chunks 0,1,2,4,8
        --copy-engine 1,0 --iters 10 --reps 20 --out PATH]

One process drives every visible GPU (EP size = number of GPUs). For each SM
count it times bf16 `dispatch` and `combine` on a `Buffer` of that config,
the way every benchmark times (`jax_ep._src.timing`), under every combination
of the other `Config` fields swept (--send-warps: nvl_send_warps, --chunks:
nvl_chunk, --copy-engine: nvl_copy_engine) and scores a tuning by dispatch +
combine time. The chosen config is the fastest one of the smallest SM count whose best
is within 3% of the overall best: SMs the kernels do not take stay with the
model's compute. The entry (config and the measured figures) goes into the
tuned-config file (`jax_ep._src.config`), replacing the one for the same
device kind and EP size.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_ep._src import native
from jax_ep._src import runtime
from jax_ep._src import timing
from jax_ep._src.config import Config, tuned_config_path, write_tuned_config
from jax_ep._src.sizes import nvl_buffer_bytes

# A smaller SM count wins when its best time is within this fraction of the
# overall best.
SM_SLACK = 0.03
# The Config fields the intranode kernels read: each record holds them.
TUNING_FIELDS = ("num_sms", "nvl_send_warps", "nvl_chunk", "nvl_copy_engine")


def tuning_fields(config: Config) -> dict:
  """The `TUNING_FIELDS` of `config`, as a record holds them."""
  return {f: getattr(config, f) for f in TUNING_FIELDS}


def problem(mesh, *, tokens: int, hidden: int, topk: int, experts: int,
            seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Global (x bf16, topk_idx, topk_weights) of `tokens` per rank on the
  mesh's "ep" axis, routed as a softmax router's top-k."""
  rng = np.random.default_rng(seed)
  ranks = mesh.shape["ep"]
  idx = timing.random_routing(rng, ranks * tokens, topk, experts)
  x = rng.standard_normal((ranks * tokens, hidden), dtype=np.float32)
  weights = rng.random(idx.shape, dtype=np.float32)
  sharding = NamedSharding(mesh, P("ep"))
  return (jax.device_put(jnp.asarray(x, jnp.bfloat16), sharding),
          jax.device_put(idx, sharding), jax.device_put(weights, sharding))


def time_config(mesh, config: Config, inputs, *, experts: int, iters: int,
                reps: int, warmup: int, backend: str = "cuda") -> dict:
  """One tuning's record: µs per call of bf16 dispatch and of combine on a
  `Buffer` with `config` (`timing.time_dispatch`/`time_combine`). Every
  config's Buffer shares the group's NVLink buffers."""
  x, idx, _ = inputs
  buffer = runtime.Buffer(
      mesh, "ep", backend=backend, config=config,
      num_nvl_bytes=nvl_buffer_bytes(x.shape[0] // mesh.shape["ep"],
                                     x.shape[1], idx.shape[1],
                                     mesh.shape["ep"]))
  loops = dict(num_experts=experts, iters=iters, reps=reps, warmup=warmup)
  return dict(**tuning_fields(config),
              dispatch_us=round(timing.time_dispatch(
                  buffer, inputs, mesh, **loops) * 1e6, 1),
              combine_us=round(timing.time_combine(
                  buffer, inputs, mesh, **loops) * 1e6, 1))


def choose(totals: dict[tuple, float]) -> tuple[dict[int, tuple], tuple]:
  """The best tuning per SM count, and the chosen one.

  Args:
    totals: score (lower is better) of each tuning, keyed by its
      `TUNING_FIELDS` values (num_sms first).

  Returns:
    `(best_per_num_sms, chosen)`: the best tuning of each SM count, and the
    best tuning of the smallest SM count within `SM_SLACK` of the overall best.
  """
  best_per_sms = {}
  for key, total in sorted(totals.items()):
    best = best_per_sms.get(key[0])
    if best is None or total < totals[best]:
      best_per_sms[key[0]] = key
  limit = min(totals.values()) * (1 + SM_SLACK)
  chosen = next(best_per_sms[s] for s in sorted(best_per_sms)
                if totals[best_per_sms[s]] <= limit)
  return best_per_sms, chosen


def tune(devices: Sequence[jax.Device], *, tokens: int, hidden: int,
         topk: int, experts: int, configs: Sequence[Config], iters: int = 10,
         reps: int = 20, warmup: int = 2, backend: str = "cuda",
         report: Callable[[dict], None] | None = None) -> dict:
  """Times every tuning on `devices` and returns the tuned-config entry.

  Args:
    devices: the local devices, in rank order, all of one kind (GPUs; CPUs
      with backend "reference" run the same steps, for testing).
    tokens, hidden, topk, experts: the shapes timed (T per rank, H, K, E).
    configs: the tunings swept (`sweep`).
    iters, reps, warmup: `jax_ep._src.timing`'s loop: calls per timed loop,
      timed loops (the median counts), untimed loops first.
    backend: the `Buffer`'s backend.
    report: called with each tuning's record as it is measured.

  Returns:
    `{"device_kind", "num_ranks", "config", "measured"}` for
    `write_tuned_config`; `measured` holds the shapes, the chosen tuning's
    times, and one row per tuning and per SM count's best.
  """
  mesh = Mesh(np.array(devices), ("ep",))
  inputs = problem(mesh, tokens=tokens, hidden=hidden, topk=topk,
                   experts=experts)
  rows = {}
  for config in configs:
    row = time_config(mesh, config, inputs, experts=experts, iters=iters,
                      reps=reps, warmup=warmup, backend=backend)
    row["total_us"] = round(row["dispatch_us"] + row["combine_us"], 1)
    rows[tuple(row[f] for f in TUNING_FIELDS)] = row
    if report:
      report(row)
  best_per_sms, chosen = choose({k: r["total_us"] for k, r in rows.items()})
  return dict(
      device_kind=devices[0].device_kind, num_ranks=len(devices),
      config=dict(zip(TUNING_FIELDS, chosen)),
      measured=dict(
          date=datetime.date.today().isoformat(), jax=jax.__version__,
          tokens=tokens, hidden=hidden, topk=topk, experts=experts,
          dtype="bf16", iters=iters, reps=reps, warmup=warmup,
          score="dispatch_us + combine_us", chosen=rows[chosen],
          best_per_num_sms=[rows[k] for _, k in sorted(best_per_sms.items())],
          tunings=[rows[k] for k in sorted(rows)]))


def format_table(entry: dict) -> str:
  """The entry's per-tuning times as a text table; marks the best tunings."""
  measured = entry["measured"]
  best = {tuple(r[f] for f in TUNING_FIELDS)
          for r in measured["best_per_num_sms"]}
  chosen = tuple(measured["chosen"][f] for f in TUNING_FIELDS)
  lines = [f"{entry['device_kind']}, {entry['num_ranks']} GPUs, "
           f"T={measured['tokens']} H={measured['hidden']} "
           f"K={measured['topk']} E={measured['experts']}, bf16 (µs per call)",
           f"{'num_sms':>7} {'nvl_send_warps':>14} {'nvl_chunk':>9} "
           f"{'nvl_copy_engine':>15} {'dispatch':>9} {'combine':>9} "
           f"{'total':>9}"]
  for r in measured["tunings"]:
    key = tuple(r[f] for f in TUNING_FIELDS)
    mark = ("  <- chosen" if key == chosen else
            "  <- best for its num_sms" if key in best else "")
    lines.append(f"{r['num_sms']:>7} {r['nvl_send_warps']:>14} "
                 f"{r['nvl_chunk']:>9} {int(r['nvl_copy_engine']):>15} "
                 f"{r['dispatch_us']:>9.1f} "
                 f"{r['combine_us']:>9.1f} {r['total_us']:>9.1f}{mark}")
  return "\n".join(lines)


def sweep(num_sms: Sequence[int], nvl_send_warps: Sequence[int],
          nvl_chunk: Sequence[int],
          nvl_copy_engine: Sequence[bool]) -> list[Config]:
  """Every combination of the values as a `Config` (ValueError names the
  first that is not a valid one)."""
  return [Config(num_sms=s, nvl_send_warps=w, nvl_chunk=c, nvl_copy_engine=e)
          for s, w, c, e in itertools.product(num_sms, nvl_send_warps,
                                              nvl_chunk, nvl_copy_engine)]


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated ints, got {text!r}") from None


def _local_gpus() -> list[jax.Device]:
  """Every visible GPU; exits with a message when there are none."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  if not gpus:
    sys.exit("jax_ep.tune: no GPU visible to JAX (devices: "
             f"{[d.platform for d in jax.devices()]}); the tuner times the "
             "CUDA kernels and needs at least one GPU")
  if native.extension() is None:
    sys.exit("jax_ep.tune: the CUDA extension jax_ep._jax_ep is missing: "
             f"{native.unavailable_reason()}")
  kinds = sorted({d.device_kind for d in gpus})
  if len(kinds) > 1:
    sys.exit(f"jax_ep.tune: the GPUs are of several kinds {kinds}; limit "
             "them to one kind with CUDA_VISIBLE_DEVICES")
  return gpus


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (see the module docstring); returns the exit status."""
  ap = argparse.ArgumentParser(
      prog="python -m jax_ep.tune",
      description="Times the intranode kernels on every local GPU under each "
      "tuning, and writes the best config for this GPU kind and EP size to "
      "the tuned-config file.")
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
  ap.add_argument("--hidden", type=int, default=7168)
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--sms", type=_int_list, default=[16, 24, 32],
                  help="SM counts (blocks) to try (Config.num_sms)")
  ap.add_argument("--send-warps", type=_int_list, default=[2, 4, 6, 8],
                  help="pushing warps per 16-warp block to try "
                  "(Config.nvl_send_warps)")
  ap.add_argument("--chunks", type=_int_list, default=[0, 1, 2, 4, 8],
                  help="tokens per arrival flag to try (Config.nvl_chunk; 0: "
                  "automatic)")
  ap.add_argument("--copy-engine", type=_int_list, default=[1, 0],
                  help="dispatch by copy engine (1) or pushing warps (0) "
                  "(Config.nvl_copy_engine)")
  ap.add_argument("--iters", type=int, default=10,
                  help="chained calls per timed loop")
  ap.add_argument("--reps", type=int, default=20,
                  help="timed loops per op and tuning (the median counts)")
  ap.add_argument("--warmup", type=int, default=2,
                  help="untimed loops first")
  ap.add_argument("--out", default=None,
                  help="tuned-config file to update (default: $JAX_EP_CONFIG "
                  "or ~/.cache/jax_ep/config.json)")
  args = ap.parse_args(argv)
  # Every tuning must make a valid Config; check before any GPU work.
  try:
    configs = sweep(args.sms, args.send_warps, args.chunks,
                    [bool(e) for e in args.copy_engine])
  except ValueError as e:
    ap.error(str(e))
  gpus = _local_gpus()
  if args.experts % len(gpus):
    ap.error(f"--experts ({args.experts}) must be a multiple of the number "
             f"of GPUs ({len(gpus)})")
  out = args.out or tuned_config_path()

  def progress(row):
    print(f"num_sms {row['num_sms']}, nvl_send_warps {row['nvl_send_warps']}, "
          f"nvl_chunk {row['nvl_chunk']}, nvl_copy_engine "
          f"{int(row['nvl_copy_engine'])}: dispatch {row['dispatch_us']} µs, "
          f"combine {row['combine_us']} µs", file=sys.stderr, flush=True)

  entry = tune(gpus, tokens=args.tokens, hidden=args.hidden, topk=args.topk,
               experts=args.experts, configs=configs, iters=args.iters,
               reps=args.reps, warmup=args.warmup, report=progress)
  print(format_table(entry))
  write_tuned_config(out, entry)
  print(f"wrote {entry['config']} for {entry['device_kind']} x "
        f"{entry['num_ranks']} to {out}")
  return 0
