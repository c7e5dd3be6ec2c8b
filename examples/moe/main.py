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
import os
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

import dsv3
import experts
import model as moe_model
import orbax.checkpoint as ocp
from configs.default import Config

_CONFIGS = ("default", "gpu", "dsv3_gpu")


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
  """One AdamW step on the mean squared error, then the DeepSeek-V3 gates'
  bias update; returns (loss, dropped rows)."""

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  for block in model.blocks:
    if isinstance(block.moe, dsv3.DeepSeekMoE):
      block.moe.rebalance()
  dropped = sum(block.moe.dropped_rows[...] for block in model.blocks)
  return loss, dropped


# Dense bf16 peak FLOP/s per GPU, for MFU (the vendor's figure without
# sparsity).
PEAK_BF16_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12}


def flops_per_token(cfg) -> float:
  """Model FLOPs of one training step per token: 3x the forward's matmuls
  (the input and output projections, and per layer the router, the K routed
  experts and the shared expert; SwiGLU experts have three matrices)."""
  mats = 3 if cfg.layer == "deepseek_v3" else 2
  layer = 2 * cfg.hidden * (cfg.num_experts + mats * cfg.topk * cfg.ffn +
                            mats * cfg.shared_ffn)
  return 3 * (4 * cfg.data_dim * cfg.hidden + cfg.num_layers * layer)


class Checkpoints:
  """The model and optimizer in Orbax checkpoints under `directory` (None:
  none): `restore` puts the latest into them and returns its step."""

  def __init__(self, directory, every: int):
    self.every = every
    self.manager = None if directory is None else ocp.CheckpointManager(
        pathlib.Path(directory).resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2))

  def restore(self, model, optimizer) -> int:
    if self.manager is None or self.manager.latest_step() is None:
      return 0
    step = self.manager.latest_step()
    state = nnx.state((model, optimizer))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    nnx.update((model, optimizer), self.manager.restore(
        step, args=ocp.args.StandardRestore(abstract)))
    return step

  def save(self, step: int, model, optimizer, *, last: bool) -> None:
    if self.manager is None or not (last or step % self.every == 0):
      return
    self.manager.save(step, args=ocp.args.StandardSave(
        nnx.state((model, optimizer))))
    if last:
      self.manager.wait_until_finished()


def _progress(text: str | None, done: float = 0.0) -> None:
  """A progress bar with `text` on a terminal, redrawn in place; None
  clears it (before a log line). Nothing when stdout is not a terminal."""
  if not sys.stdout.isatty():
    return
  bar = "" if text is None else (
      f"[{'#' * int(30 * done):<30}] {text}")
  print(f"\r\033[K{bar}", end="", flush=True)


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
  cap = experts.capacity(ranks, tokens, cfg.num_experts, cfg.topk,
                           cfg.capacity_factor)
  log(f"jax_ep MoE example: {jax.process_count()} process(es), {ranks} "
      f"{devices[0].platform} device(s), backend {buffer.backend!r}")

  with jax.set_mesh(mesh):
    batches = Batches(cfg, mesh)
    model, optimizer = create(cfg, buffer)
    checkpoints = Checkpoints(cfg.checkpoint_dir, cfg.checkpoint_every)
    first_step = checkpoints.restore(model, optimizer) + 1
    if first_step > cfg.steps:
      raise ValueError(
          f"the checkpoint in {cfg.checkpoint_dir} is at step "
          f"{first_step - 1}, not before --steps {cfg.steps}: raise --steps "
          "to train on")
    if first_step > 1:
      log(f"restored step {first_step - 1} from {cfg.checkpoint_dir}")
    params = nnx.state(model, nnx.Param)
    routed = _count([v for b in model.blocks for name, v in
                     vars(b.moe).items() if name.startswith("w_")])
    log(f"model: {cfg.layer}, {cfg.num_layers} layers, H={cfg.hidden}, "
        f"E={cfg.num_experts}"
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
    for step in range(first_step, cfg.steps + 1):
      loss, dropped = train_step(model, optimizer, x, y)
      x, y = batches.next()  # while the step runs
      losses.append(float(loss))
      dropped_rows += int(dropped)
      checkpoints.save(step, model, optimizer, last=step == cfg.steps)
      now = time.perf_counter()
      if step == first_step:
        compile_s = now - start
        warm_start = interval_start = now
        log(f"step {step:4d}  loss {losses[-1]:.4f}  "
            f"(compile and first step: {compile_s:.1f} s)")
        continue
      interval_steps += 1
      if step % cfg.log_every == 0 or step == cfg.steps:
        rate = interval_steps * ranks * tokens / (now - interval_start)
        _progress(None)
        log(f"step {step:4d}  loss {losses[-1]:.4f}  tokens/s {rate:,.0f}")
        interval_start, interval_steps = now, 0
      elif jax.process_index() == 0:
        _progress(f"{step}/{cfg.steps} loss {losses[-1]:.4f}",
                  step / cfg.steps)
    end = time.perf_counter()

  timed = cfg.steps - first_step
  tokens_per_s = timed * ranks * tokens / (end - warm_start) if timed else None
  # Model FLOP/s per device, and their share of the device's bf16 peak.
  tflops = (tokens_per_s * flops_per_token(cfg) / ranks / 1e12
            if tokens_per_s else None)
  peak = PEAK_BF16_FLOPS.get(devices[0].device_kind)
  mfu = (tflops * 1e12 / peak if tflops and peak and cfg.dtype == "bfloat16"
         else None)
  metrics = dict(
      losses=losses, tokens_per_s=tokens_per_s, compile_s=compile_s,
      model_tflops_per_device=tflops, mfu=mfu, first_step=first_step,
      step_ms=1e3 * (end - warm_start) / timed if timed else None,
      dropped_rows=dropped_rows, ranks=ranks, processes=jax.process_count(),
      platform=devices[0].platform, backend=buffer.backend,
      config=dataclasses.asdict(cfg))
  rate = (f"{tokens_per_s:,.0f} tokens/s (steps {first_step + 1}-"
          f"{cfg.steps}, {ranks} ranks), {tflops:.2f} model TFLOP/s per device"
          + (f", MFU {100 * mfu:.1f}%" if mfu else "") if timed
          else "no timed steps")
  log(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} in "
      f"{len(losses)} steps; {rate}; {dropped_rows} rows dropped by the "
      "capacity (and (row, expert) pairs by the expert slots)")
  return metrics


def _field_parser(type_name: str):
  if type_name == "int":
    return int
  if type_name == "float":
    return float
  if type_name == "bool":
    return lambda s: s.lower() in ("1", "true", "yes")
  if type_name == "str | None":
    return lambda s: None if s.lower() == "none" else s
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
  args = parse_args(argv)
  fields = {f.name for f in dataclasses.fields(Config)}
  cfg = get_config(args.config, **{
      name: value for name, value in vars(args).items() if name in fields})
  if cfg.overlap_micro_batches:
    # A command buffer (CUDA graph) runs the work of both streams one after
    # the other (jax_ep.overlap): XLA reads the flag when the GPUs start.
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_gpu_enable_command_buffer="]))
  jax_ep.launch.initialize()  # joins the other processes; first JAX call
  lead = jax.process_index() == 0
  log = (lambda msg: print(msg, flush=True)) if lead else (lambda msg: None)
  metrics = train(cfg, backend=args.backend, log=log)
  if lead and args.metrics_out is not None:
    args.metrics_out.write_text(json.dumps(metrics, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
