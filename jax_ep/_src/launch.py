"""Starts a JAX program as several local processes, and joins them up.

`python -m jax_ep.launch -n 2 -- python train.py` runs `train.py` twice, with
environment variables that `initialize()` turns into
`jax.distributed.initialize(...)`. Each process gets its own slice of the local
GPUs (CUDA_VISIBLE_DEVICES) or, without GPUs, its own CPU devices. Clusters
that JAX detects by itself (SLURM, Open MPI, ...) need no launcher:
`initialize()` then calls `jax.distributed.initialize()` with no arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax

_ENV_PREFIX = "JAX_EP_LAUNCH_"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _num_local_gpus() -> int:
  if shutil.which("nvidia-smi") is None:
    return 0
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(line.startswith("GPU ") for line in out.splitlines())


def process_env(process_id: int, num_processes: int, port: int,
                devices_per_process: int, use_gpus: bool,
                ranks_per_gpu: int = 1) -> dict[str, str]:
  """Environment of one launched process; with `ranks_per_gpu` K > 1,
  processes K*g .. K*g + K-1 share GPU g (one device each)."""
  env = {
      _ENV_PREFIX + "COORDINATOR": f"localhost:{port}",
      _ENV_PREFIX + "NUM_PROCESSES": str(num_processes),
      _ENV_PREFIX + "PROCESS_ID": str(process_id),
      _ENV_PREFIX + "DEVICES": str(devices_per_process),
      # Keep NVLink multicast off in every process (docs/processes.md).
      "NCCL_NVLS_ENABLE": "0",
      "NVSHMEM_DISABLE_NVLS": "1",
  }
  if use_gpus:
    env[_ENV_PREFIX + "RANKS_PER_GPU"] = str(ranks_per_gpu)
    first = process_id // ranks_per_gpu * devices_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        str(first + i) for i in range(devices_per_process))
    if ranks_per_gpu > 1:  # each process takes only the memory it uses
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  else:
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _exit_on_uncaught(kind, value, traceback) -> None:
  """Prints the error, then exits at once with status 1.

  A normal exit would wait in JAX's at-exit `jax.distributed` shutdown for
  peers that are blocked in a collective with this process, forever; exiting
  at once lets the launcher see the failure and stop the others.
  """
  sys.__excepthook__(kind, value, traceback)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def initialize() -> None:
  """Joins this process to the others of a launch (or of a known cluster).

  Call it first, before any other JAX call. Under `jax_ep.launch` it reads the
  launcher's variables; elsewhere it calls `jax.distributed.initialize()`,
  which detects SLURM, Open MPI and similar clusters. A lone process with
  neither is left alone.
  """
  env = os.environ
  if _ENV_PREFIX + "COORDINATOR" not in env:
    if any(k in env for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                              "JAX_COORDINATOR_ADDRESS")):
      jax.distributed.initialize()
    return
  jax.config.update("jax_num_cpu_devices", int(env[_ENV_PREFIX + "DEVICES"]))
  sys.excepthook = _exit_on_uncaught
  jax.distributed.initialize(
      coordinator_address=env[_ENV_PREFIX + "COORDINATOR"],
      num_processes=int(env[_ENV_PREFIX + "NUM_PROCESSES"]),
      process_id=int(env[_ENV_PREFIX + "PROCESS_ID"]))


def ranks_per_gpu() -> int:
  """How many processes of this launch share each GPU (1 outside one)."""
  return int(os.environ.get(_ENV_PREFIX + "RANKS_PER_GPU", "1"))


def launch(command: list[str], num_processes: int, *,
           devices_per_process: int | None = None, platform: str = "auto",
           timeout: float | None = None,
           env: dict[str, str] | None = None, ranks_per_gpu: int = 1) -> int:
  """Runs `command` as `num_processes` joined processes; returns an exit code.

  The processes inherit this environment plus `env`. The first process to
  fail (or a timeout) stops the others; its exit code is returned (124 on
  timeout, 128 + N for a process killed by signal N, which is named on
  stderr).

  `ranks_per_gpu` K > 1 is a testing mode for the multi-rank kernels on few
  GPUs: K processes share each GPU, one device each, without preallocating
  (each takes only what it uses: XLA's buffers, the NVLink buffers and the
  NVSHMEM heap of every process must fit in the one GPU together). The GPU
  time-slices between them, so it checks correctness only: a barrier takes
  milliseconds. NCCL refuses such processes, so no XLA collective may run
  across them (jax_ep's Buffer set-up uses none).
  """
  if not isinstance(ranks_per_gpu, int) or ranks_per_gpu < 1 or (
      num_processes % ranks_per_gpu):
    raise ValueError(
        f"jax_ep.launch: ranks_per_gpu must be a positive divisor of the "
        f"{num_processes} processes, got {ranks_per_gpu!r}")
  gpus = _num_local_gpus() if platform in ("auto", "gpu") else 0
  use_gpus = gpus > 0
  if platform == "gpu" and not use_gpus:
    raise RuntimeError("jax_ep.launch: --platform gpu but no GPU was found")
  if ranks_per_gpu > 1 and not use_gpus:
    raise ValueError("jax_ep.launch: ranks_per_gpu > 1 needs GPUs")
  if ranks_per_gpu > 1 and devices_per_process not in (None, 1):
    raise ValueError("jax_ep.launch: with ranks_per_gpu > 1 each process has "
                     f"one device, got devices_per_process={devices_per_process}")
  num_groups = num_processes // ranks_per_gpu
  if devices_per_process is None:
    devices_per_process = max(1, gpus // num_groups) if use_gpus else 1
  if use_gpus and devices_per_process * num_groups > gpus:
    raise ValueError(
        f"jax_ep.launch: {num_processes} processes x {devices_per_process} "
        f"GPUs ({ranks_per_gpu} per GPU) need "
        f"{num_groups * devices_per_process}, found {gpus}")
  port = _free_port()
  procs = [
      subprocess.Popen(command, env={**os.environ, **(env or {}), **process_env(
          i, num_processes, port, devices_per_process, use_gpus,
          ranks_per_gpu)})
      for i in range(num_processes)
  ]
  deadline = None if timeout is None else time.monotonic() + timeout
  code = 0
  # Poll every process each round: a failure behind a live one must count.
  while None in [p.poll() for p in procs]:
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed or (deadline is not None and time.monotonic() > deadline):
      code = failed[0] if failed else 124
      if not failed:
        print(f"jax_ep.launch: timed out after {timeout} s", file=sys.stderr)
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.1)
  for p in procs:
    p.wait()
  for i, p in enumerate(procs):
    # The loop above SIGKILLs the others once one fails: those are no news.
    if p.returncode < 0 and -p.returncode != signal.SIGKILL:
      print(f"jax_ep.launch: process {i} died of "
            f"{signal.Signals(-p.returncode).name}", file=sys.stderr)
  code = code or next((p.returncode for p in procs if p.returncode), 0)
  return 128 - code if code < 0 else code  # a shell's status for a signal


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jax_ep.launch",
      description="Run a JAX program as several joined local processes.")
  parser.add_argument("-n", "--num-processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=None,
                      help="GPUs (or CPU devices) per process; default: the "
                      "local GPUs split evenly, or 1 CPU device")
  parser.add_argument("--platform", choices=("auto", "gpu", "cpu"),
                      default="auto")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds before every process is killed")
  parser.add_argument("--ranks-per-gpu", type=int, default=1,
                      help="processes per GPU, one device each: a testing "
                      "mode for the multi-rank kernels on few GPUs (the "
                      "ranks take turns on a GPU: correct, and slow)")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="the command, after --")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  return launch(command, args.num_processes,
                devices_per_process=args.devices_per_process,
                platform=args.platform, timeout=args.timeout,
                ranks_per_gpu=args.ranks_per_gpu)
