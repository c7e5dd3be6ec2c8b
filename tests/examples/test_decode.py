"""The decoding example (examples/moe/decode.py) on CPU ranks (reference
backend): the tokens do not depend on whether the low-latency ops are split
by hooks (the shared expert between send and receive), with bf16 and fp8
dispatch, and the script runs end to end. On GPUs (marked gpu) the script
on the low-latency kernels, one process per rank (R = the GPUs, and 2
sharing one GPU), gives the same tokens with and without hooks."""

import dataclasses
import json
import sys

import jax
import numpy as np
import pytest

import jax_ep
from ep_testing import cpu_devices
from gpu_testing import GPUS, NEEDS_KERNELS, launch_per_gpu, multi_rank_sizes
from repo_paths import REPO

EXAMPLE = REPO / "examples" / "moe"
if str(EXAMPLE) not in sys.path:
  sys.path.insert(0, str(EXAMPLE))
import decode  # noqa: E402  (examples/moe/decode.py)

SMALL = decode.DecodeConfig(hidden=128, num_heads=2, num_experts=8, ffn=64,
                            shared_ffn=64, batch_per_rank=8, prompt_len=3,
                            new_tokens=3)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_tokens_do_not_depend_on_hooks(use_fp8):
  mesh = jax.make_mesh((2,), ("ep",), devices=cpu_devices(2))
  buffer = jax_ep.Buffer(mesh, "ep", backend="reference")
  runs = {}
  with jax.set_mesh(mesh):
    for hooks in (True, False):
      cfg = dataclasses.replace(SMALL, hooks=hooks, use_fp8=use_fp8)
      runs[hooks] = decode.decode(cfg, buffer, log=lambda _: None)
  tokens = runs[True]["tokens"]
  assert tokens.shape == (2 * SMALL.batch_per_rank, SMALL.max_len)
  assert ((tokens >= 0) & (tokens < SMALL.vocab)).all()
  np.testing.assert_array_equal(tokens, runs[False]["tokens"])
  prompts = np.random.default_rng(SMALL.seed).integers(
      0, SMALL.vocab, (tokens.shape[0], SMALL.prompt_len), dtype=np.int32)
  np.testing.assert_array_equal(tokens[:, :SMALL.prompt_len], prompts)


def test_script_writes_its_metrics(tmp_path):
  out = tmp_path / "metrics.json"
  args = [f"--{f.name}={getattr(SMALL, f.name)}"
          for f in dataclasses.fields(SMALL)] + ["--metrics_out", str(out)]
  assert decode.main(args) == 0
  metrics = json.loads(out.read_text())
  assert metrics["ranks"] == jax.device_count()
  assert metrics["step_ms"] > 0 and metrics["tokens_per_s"] > 0
  assert metrics["hooks"] and metrics["backend"] == "reference"


@pytest.mark.parametrize("num_ranks", [
    pytest.param(r, marks=NEEDS_KERNELS, id=f"R{r}")
    for r in sorted({max(len(GPUS), 1), *multi_rank_sizes((2,))})])
def test_tokens_do_not_depend_on_hooks_on_the_kernels(capfd, tmp_path,
                                                      num_ranks):
  digests = {}
  for hooks in (True, False):
    out = tmp_path / f"hooks_{hooks}.json"
    code, _, report = launch_per_gpu(
        capfd, [str(EXAMPLE / "decode.py"), f"--hooks={hooks}",
                "--new_tokens=4", "--metrics_out", str(out)],
        timeout=300, num_ranks=num_ranks)
    assert code == 0, report
    metrics = json.loads(out.read_text())
    assert metrics["backend"] == "cuda" and metrics["ranks"] == num_ranks
    digests[hooks] = metrics["tokens_sha256"]
  assert digests[True] == digests[False], digests
