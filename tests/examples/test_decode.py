"""The decoding example (examples/moe/decode.py) on CPU ranks (reference
backend): the tokens do not depend on whether the low-latency ops are split
by hooks (the shared expert between send and receive), with bf16 and fp8
dispatch, and the script runs end to end."""

import dataclasses
import json
import sys

import jax
import numpy as np
import pytest

import jax_ep
from ep_testing import cpu_devices
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
