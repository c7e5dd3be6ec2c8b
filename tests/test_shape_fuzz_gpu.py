"""Shape fuzzing on the kernels: shape_fuzz.py's draws of every family on
the "cuda" backend, one process per local GPU (R = the number of GPUs), each
run checked against the dense model (every output element, padding
included) or refused at trace time with a public message. A CUDA error in
any draw fails the run. Every line of the log names the seed and the draw;
`python -m jax_ep.launch -n R -- python tests/shape_fuzz.py --seed S
--only I` replays draw I.

scripts/gpu_check.sh also runs a slice of these draws under
compute-sanitizer's memcheck.
"""

from __future__ import annotations

import pathlib

import shape_fuzz
from gpu_testing import NEEDS_KERNELS, every_worker, launch_per_gpu

pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(shape_fuzz.__file__).resolve()
DRAWS = 60  # of each family


def test_every_drawn_shape_runs_right_or_is_refused(capfd, seed):
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--draws", str(DRAWS)],
      timeout=540)
  report = f"seed={seed}: {report}"
  assert code == 0, report
  count = DRAWS * len(shape_fuzz.FAMILIES)
  for line in every_worker(f"fuzz {count} draws passed"):
    assert line in out, report
