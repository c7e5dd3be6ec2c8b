"""Trains the MoE model of `model.py` with expert parallelism on jax_ep.

    python -m jax_ep.launch -n 2 -- python examples/moe/main.py
    python examples/moe/main.py --config gpu --steps 100    # one process

Every device is one EP rank: a 1-D mesh with axis "ep" shards both the tokens
(data parallelism) and the routed experts. Each process makes its own share of
the global batch; only process 0 prints. The task: regress a fixed random
teacher MoE (see `configs/default.py`), with fresh inputs every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys
import time

try:
  import jax_ep
except ModuleNotFoundError:  # a checkout that was not pip-installed
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  import jax_ep
import jax_ep.launch

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import model as moe_model
from configs.default import Config

_CONFIGS = ("default", "gpu")


def get_config(name: str = "default", **overrides) -> Config:
  """The named preset of `configs/`, with fields replaced by `overrides`."""
  if name not in _CONFIGS:
    raise ValueError(f"unknown config {name!r}; choose from {_CONFIGS}")
  cfg = importlib.import_module(f"configs.{name}").get_config()
  return dataclasses.replace(cfg, **overrides)


class Teacher:
  """`y = A[g(x)] @ x`, `g(x) = argmax(x @ G)`: a random piecewise-linear map.

  Scaled so that `E[y**2]` is about 1 for standard normal inputs.
  """

  def __init__(self, cfg):
    rng = np.random.default_rng([cfg.seed, 1 << 20])
    d = cfg.data_dim
    self.gate = rng.standard_normal((d, cfg.teacher_experts)).astype(np.float32)
    self.maps = (rng.standard_normal((cfg.teacher_experts, d, d))
                 / np.sqrt(d)).astype(np.float32)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    piece = np.argmax(x @ self.gate, axis=-1)
    y = np.empty_like(x)
    for e in range(self.maps.shape[0]):
      rows = piece == e
      y[rows] = x[rows] @ self.maps[e]
    return y


class Batches:
  """Global batches `(x, y)`, `[R*T, D]` sharded over "ep", built from the
  data each process draws for its own devices."""

  def __init__(self, cfg, mesh: jax.sharding.Mesh):
    self.teacher = Teacher(cfg)
    self.sharding = NamedSharding(mesh, P("ep", None))
    local_devices = sum(d.process_index == jax.process_index()
                        for d in mesh.devices.flat)
    self.shape = (cfg.tokens_per_rank * local_devices, cfg.data_dim)
    self.rng = np.random.default_rng([cfg.seed, jax.process_index()])

  def next(self):
    x = self.rng.standard_normal(self.shape, dtype=np.float32)
    y = self.teacher(x)
    return (jax.make_array_from_process_local_data(self.sharding, x),
            jax.make_array_from_process_local_data(self.sharding, y))


def create(cfg, buffer: jax_ep.Buffer):
  """Model and AdamW optimizer, initialized under `jit` on the mesh (params of
  the routed experts sharded over "ep", the rest replicated)."""
  warmup = min(cfg.warmup_steps, cfg.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
      end_value=0.1 * cfg.learning_rate)
  tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)

  @nnx.jit
  def init():
    model = moe_model.Model(buffer, cfg, rngs=nnx.Rngs(cfg.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  return init()


@nnx.jit
def train_step(model, optimizer, x, y):
  """One AdamW step on the mean squared error; returns (loss, dropped rows)."""

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  dropped = sum(block.moe.dropped_rows[...] for block in model.blocks)
  return loss, dropped


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def train(cfg, *, backend: str = "auto", devices=None, log=print) -> dict:
  """Trains for `cfg.steps` steps on a 1-D "ep" mesh over `devices` (default:
  every device of every process). Returns the metrics (see `--metrics_out`)."""
  if cfg.steps < 1:
    raise ValueError(f"steps must be at least 1, got {cfg.steps}")
  devices = jax.devices() if devices is None else devices
  mesh = jax.make_mesh((len(devices),), ("ep",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Explicit,))
  # The intranode kernels' NVLink buffers, sized for this model's dispatches.
  nvl_bytes = (jax_ep.nvl_buffer_bytes(cfg.tokens_per_rank, cfg.hidden,
                                       cfg.topk, len(devices), cfg.dtype)
               if devices[0].platform == "gpu" and backend != "reference"
               else None)
  buffer = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nvl_bytes)
  ranks, tokens = buffer.num_ranks, cfg.tokens_per_rank
  cap = moe_model.capacity(ranks, tokens, cfg.num_experts, cfg.topk,
                           cfg.capacity_factor)
  log(f"jax_ep MoE example: {jax.process_count()} process(es), {ranks} "
      f"{devices[0].platform} device(s), backend {buffer.backend!r}")

  with jax.set_mesh(mesh):
    batches = Batches(cfg, mesh)
    model, optimizer = create(cfg, buffer)
    params = nnx.state(model, nnx.Param)
    routed = _count([b.moe.w_in for b in model.blocks] +
                    [b.moe.w_out for b in model.blocks])
    log(f"model: {cfg.num_layers} layers, H={cfg.hidden}, E={cfg.num_experts}"
        f" ({cfg.num_experts // ranks} per rank), top-{cfg.topk}, F={cfg.ffn}, "
        f"shared F={cfg.shared_ffn}, {cfg.dtype}; {_count(params) / 1e6:.2f}M "
        f"params ({routed / 1e6:.2f}M in routed experts, sharded)")
    log(f"data: {tokens} tokens per rank, {ranks * tokens} per step; "
        f"capacity {cap} rows per rank")

    losses, dropped_rows = [], 0
    x, y = batches.next()
    start = time.perf_counter()
    compile_s = warm_start = None
    interval_start, interval_steps = start, 0
    for step in range(1, cfg.steps + 1):
      loss, dropped = train_step(model, optimizer, x, y)
      x, y = batches.next()  # while the step runs
      losses.append(float(loss))
      dropped_rows += int(dropped)
      now = time.perf_counter()
      if step == 1:
        compile_s = now - start
        warm_start = interval_start = now
        log(f"step {step:4d}  loss {losses[-1]:.4f}  "
            f"(compile and first step: {compile_s:.1f} s)")
        continue
      interval_steps += 1
      if step % cfg.log_every == 0 or step == cfg.steps:
        rate = interval_steps * ranks * tokens / (now - interval_start)
        log(f"step {step:4d}  loss {losses[-1]:.4f}  tokens/s {rate:,.0f}")
        interval_start, interval_steps = now, 0
    end = time.perf_counter()

  timed = cfg.steps - 1
  tokens_per_s = timed * ranks * tokens / (end - warm_start) if timed else None
  metrics = dict(
      losses=losses, tokens_per_s=tokens_per_s, compile_s=compile_s,
      step_ms=1e3 * (end - warm_start) / timed if timed else None,
      dropped_rows=dropped_rows, ranks=ranks, processes=jax.process_count(),
      platform=devices[0].platform, backend=buffer.backend,
      config=dataclasses.asdict(cfg))
  rate = (f"{tokens_per_s:,.0f} tokens/s (steps 2-{cfg.steps}, {ranks} "
          "ranks)" if timed else "no timed steps")
  log(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {cfg.steps} steps; "
      f"{rate}; {dropped_rows} rows dropped by the capacity")
  return metrics


def _field_parser(type_name: str):
  if type_name == "int":
    return int
  if type_name == "float":
    return float
  if type_name == "float | None":
    return lambda s: None if s.lower() == "none" else float(s)
  if type_name == "int | None":
    return lambda s: None if s.lower() == "none" else int(s)
  return str


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", choices=_CONFIGS, default="default",
                      help="preset in configs/ (default: %(default)s)")
  parser.add_argument("--backend", choices=("auto", "cuda", "reference"),
                      default="auto", help="jax_ep backend (default: auto)")
  parser.add_argument("--metrics_out", type=pathlib.Path, default=None,
                      help="process 0 writes the metrics here as JSON")
  overrides = parser.add_argument_group(
      "config overrides",
      "replace one field of the preset (fields: configs/default.py)")
  for field in dataclasses.fields(Config):
    overrides.add_argument(f"--{field.name}", type=_field_parser(field.type),
                           default=argparse.SUPPRESS,
                           metavar=field.type.split()[0].upper())
  return parser.parse_args(argv)


def main(argv=None) -> int:
  jax_ep.launch.initialize()  # joins the other processes; first JAX call
  args = parse_args(argv)
  fields = {f.name for f in dataclasses.fields(Config)}
  cfg = get_config(args.config, **{
      name: value for name, value in vars(args).items() if name in fields})
  lead = jax.process_index() == 0
  log = (lambda msg: print(msg, flush=True)) if lead else (lambda msg: None)
  metrics = train(cfg, backend=args.backend, log=log)
  if lead and args.metrics_out is not None:
    args.metrics_out.write_text(json.dumps(metrics, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
