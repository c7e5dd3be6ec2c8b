"""Shape fuzzing on the kernels: shape_fuzz.py's draws of every family on
the "cuda" backend, each run checked against the dense model (every output
element, padding included) or refused at trace time with a public message.
A CUDA error in any draw fails the run.

R is one process per local GPU, and also R = 2, 4 and 8 where those are
multiples of the GPUs: then several processes share each GPU (`jax_ep.launch
--ranks-per-gpu`), which checks the multi-rank paths on a one-GPU machine;
the GPU time-slices between them, so those runs take fewer draws. Every line
of the log names the seed and the draw; `python -m jax_ep.launch -n R
[--ranks-per-gpu K] -- python tests/workers/shape_fuzz.py --seed S --only I`
replays draw I.

scripts/gpu_check.sh also runs a slice of these draws under
compute-sanitizer's memcheck.
"""

from __future__ import annotations

import pathlib

import pytest

import shape_fuzz
from gpu_testing import (GPUS, NEEDS_KERNELS, every_worker, launch_per_gpu,
                         multi_rank_sizes)

pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(shape_fuzz.__file__).resolve()
# Draws of each family by EP size: one process per GPU, then (where they
# are multiples of the GPUs) 2, 4 and 8 ranks sharing each GPU, fewer.
RANKS = {len(GPUS): 60,
         **{r: 12 if r < 8 else 6 for r in multi_rank_sizes()
            if r > len(GPUS)}}


@pytest.mark.parametrize("num_ranks", sorted(RANKS), ids=lambda r: f"R{r}")
def test_every_drawn_shape_runs_right_or_is_refused(capfd, seed, num_ranks):
  draws = RANKS[num_ranks]
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--draws", str(draws)],
      timeout=540, num_ranks=num_ranks)
  report = f"seed={seed}, R={num_ranks}: {report}"
  assert code == 0, report
  count = draws * len(shape_fuzz.FAMILIES)
  for line in every_worker(f"fuzz {count} draws passed", num_ranks):
    assert line in out, report
