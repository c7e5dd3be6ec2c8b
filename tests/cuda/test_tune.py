"""The autotuner's CPU side: Config fields, the tuned-config file, the choice.

The sweep times the kernels on GPUs; here it runs on CPU ranks with the
reference backend (the same steps, meaningless times), the choice is checked
on made-up times, and the command line only for its help and its refusal to
run without a GPU.
"""

import json
import os
import re
import subprocess
import sys

import pytest

import jax_ep
from jax_ep._src import config as config_lib
from jax_ep._src import tune
from ep_testing import cpu_devices
from repo_paths import REPO
H200 = "NVIDIA H200"


def esc(message):
  return re.escape(message)


def entry(device_kind=H200, num_ranks=2, **config):
  return dict(device_kind=device_kind, num_ranks=num_ranks,
              config=config or dict(num_sms=16, nvl_send_warps=6, nvl_chunk=2),
              measured=dict(total_us=123.4))


@pytest.fixture
def config_file(tmp_path, monkeypatch):
  """A tuned-config path in a folder that does not exist yet, set as
  JAX_EP_CONFIG."""
  path = tmp_path / "a" / "b" / "config.json"
  monkeypatch.setenv(config_lib.CONFIG_ENV, str(path))
  return path


# ---------------------------------------------------------------- Config


def test_config_defaults():
  config = jax_ep.Config()
  assert (config.num_sms, config.nvl_send_warps, config.nvl_chunk,
          config.nvl_copy_engine) == (0, 4, 4, False)  # num_sms 0: automatic


@pytest.mark.parametrize("warps", [1, 8, 15])
def test_config_nvl_send_warps_in_range(warps):
  assert jax_ep.Config(nvl_send_warps=warps).nvl_send_warps == warps


@pytest.mark.parametrize("warps,message", [
    (0, "jax_ep.Config: nvl_send_warps must be a positive int, got 0"),
    (4.0, "jax_ep.Config: nvl_send_warps must be a positive int, got 4.0"),
    (16, "jax_ep.Config: nvl_send_warps must be at most 15 (a 16-warp block "
     "keeps one warp to receive), got 16"),
])
def test_config_nvl_send_warps_out_of_range(warps, message):
  with pytest.raises(ValueError, match=esc(message)):
    jax_ep.Config(nvl_send_warps=warps)


def test_config_nvl_chunk_zero_means_automatic():
  assert jax_ep.Config(nvl_chunk=0).nvl_chunk == 0


@pytest.mark.parametrize("value", [-1, 2.0, True, None])
def test_config_nvl_chunk_must_be_a_non_negative_int(value):
  with pytest.raises(ValueError, match=esc(
      "jax_ep.Config: nvl_chunk must be an int >= 0 (0: automatic), got "
      f"{value!r}")):
    jax_ep.Config(nvl_chunk=value)


# ---------------------------------------------------------------- the file


def test_default_path_is_under_the_home_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(config_lib.CONFIG_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert (config_lib.tuned_config_path()
          == tmp_path / ".cache" / "jax_ep" / "config.json")


def test_missing_file_gives_none(config_file):
  assert config_lib.tuned_config(H200, 2) is None
  assert not config_file.exists()


def test_round_trip_creates_folders_and_keeps_other_defaults(config_file):
  config_lib.write_tuned_config(config_file, entry())
  assert config_lib.tuned_config(H200, 2) == jax_ep.Config(
      num_sms=16, nvl_send_warps=6, nvl_chunk=2)
  data = json.loads(config_file.read_text())
  assert data == {"version": 1, "entries": [entry()]}


def test_no_matching_entry_gives_none(config_file):
  config_lib.write_tuned_config(config_file, entry())
  assert config_lib.tuned_config("NVIDIA H100 80GB HBM3", 2) is None
  assert config_lib.tuned_config(H200, 4) is None


def test_write_replaces_the_same_device_and_size_only(config_file):
  config_lib.write_tuned_config(config_file, entry())
  config_lib.write_tuned_config(config_file, entry(num_ranks=4, num_sms=32))
  config_lib.write_tuned_config(config_file, entry(num_sms=20, nvl_chunk=0))
  assert config_lib.tuned_config(H200, 2) == jax_ep.Config(num_sms=20,
                                                           nvl_chunk=0)
  assert config_lib.tuned_config(H200, 4) == jax_ep.Config(num_sms=32)
  assert len(json.loads(config_file.read_text())["entries"]) == 2
  # The temporary files went into the target (os.replace).
  assert os.listdir(config_file.parent) == [config_file.name]


@pytest.mark.parametrize("text,problem", [
    ("{not json", "not JSON"),
    ('{"version": 2, "entries": []}', '"version": 1'),
    ('[]', '"version": 1'),
    ('{"version": 1, "entries": {}}', "entries must be a list"),
    ('{"version": 1, "entries": [3]}', "entry 0 must be an object"),
    ('{"version": 1, "entries": [{"num_ranks": 2, "config": {}}]}',
     "entry 0: device_kind must be a string"),
    ('{"version": 1, "entries": [{"device_kind": "x", "num_ranks": 0, '
     '"config": {}}]}', "entry 0: num_ranks must be a positive int, got 0"),
    ('{"version": 1, "entries": [{"device_kind": "x", "num_ranks": 2}]}',
     "entry 0: config must be an object"),
    ('{"version": 1, "entries": [{"device_kind": "x", "num_ranks": 2, '
     '"config": {"sms": 8}}]}', "entry 0: unknown config fields ['sms']"),
    ('{"version": 1, "entries": [{"device_kind": "x", "num_ranks": 2, '
     '"config": {"num_sms": 23}}]}',
     "entry 0: jax_ep.Config: num_sms must be even, got 23"),
    ('{"version": 1, "entries": [{"device_kind": "x", "num_ranks": 2, '
     '"config": {}}, {"device_kind": "x", "num_ranks": 2, "config": {}}]}',
     "entry 1 repeats device_kind 'x' with num_ranks 2"),
])
def test_malformed_file_names_the_file_and_the_problem(config_file, text,
                                                       problem):
  config_file.parent.mkdir(parents=True)
  config_file.write_text(text)
  with pytest.raises(ValueError, match=esc(str(config_file)) + ".*"
                     + esc(problem)):
    config_lib.tuned_config(H200, 2)
  # Writing does not clobber a file it cannot read.
  with pytest.raises(ValueError, match=esc(str(config_file))):
    config_lib.write_tuned_config(config_file, entry())
  assert config_file.read_text() == text


def test_write_rejects_a_bad_entry(config_file):
  with pytest.raises(ValueError, match=esc(
      "the new entry: jax_ep.Config: nvl_send_warps must be at most 15")):
    config_lib.write_tuned_config(config_file, entry(nvl_send_warps=16))
  assert not config_file.parent.exists()


# ---------------------------------------------------------------- the choice


@pytest.mark.parametrize("t16,t24,chosen", [(102.9, 101.0, (16, 4, 2)),
                                            (104.0, 101.0, (24, 4, 0)),
                                            (104.0, 103.5, (32, 8, 0))])
def test_choose_prefers_fewer_sms_within_three_percent(t16, t24, chosen):
  totals = {(16, 4, 2): t16, (16, 2, 2): t16 + 5, (24, 4, 0): t24,
            (32, 8, 0): 100.0, (32, 2, 0): 130.0}
  best, got = tune.choose(totals)
  assert best == {16: (16, 4, 2), 24: (24, 4, 0), 32: (32, 8, 0)}
  assert got == chosen


def test_tune_scores_dispatch_plus_combine(monkeypatch, config_file):
  # Made-up times: dispatch falls with num_sms and halves with the copy
  # engine, combine is best at chunk 2.
  def fake_time_config(mesh, config, inputs, **kwargs):
    return dict(**tune.tuning_fields(config),
                dispatch_us=(3000 / config.num_sms /
                             (2 if config.nvl_copy_engine else 1)),
                combine_us=(100 + abs(config.nvl_chunk - 2) +
                            config.nvl_send_warps))

  monkeypatch.setattr(tune, "time_config", fake_time_config)
  monkeypatch.setattr(tune, "problem", lambda mesh, **kwargs: None)
  devices = cpu_devices(2)
  kind = devices[0].device_kind
  result = tune.tune(devices, tokens=64, hidden=256, topk=2, experts=8,
                     configs=tune.sweep([24, 32], [2, 4], [0, 2],
                                        [True, False]))
  # 32 SMs: 46.875 + 102 = 148.875; 24 SMs: 62.5 + 102 = 164.5 (over 3%).
  assert result["config"] == dict(num_sms=32, nvl_send_warps=2, nvl_chunk=2,
                                  nvl_copy_engine=True)
  assert (result["device_kind"], result["num_ranks"]) == (kind, 2)
  measured = result["measured"]
  assert measured["chosen"]["total_us"] == 148.9
  assert len(measured["tunings"]) == 16
  assert [r["num_sms"] for r in measured["best_per_num_sms"]] == [24, 32]
  table = tune.format_table(result)
  assert "<- chosen" in table and "<- best for its num_sms" in table
  config_lib.write_tuned_config(config_file, result)
  assert config_lib.tuned_config(kind, 2) == jax_ep.Config(
      num_sms=32, nvl_send_warps=2, nvl_chunk=2, nvl_copy_engine=True)


def test_tune_times_each_config_with_the_shared_timing_method():
  """The sweep's real steps (inputs, a Buffer per config, timed dispatch and
  combine) on two CPU ranks with the reference backend."""
  reported = []
  result = tune.tune(cpu_devices(2), tokens=16, hidden=128, topk=2,
                     experts=8, configs=tune.sweep([8, 16], [4], [0], [False]),
                     iters=2, reps=2, warmup=1, backend="reference",
                     report=reported.append)
  assert [r["num_sms"] for r in reported] == [8, 16]
  for r in reported:
    assert r["dispatch_us"] > 0 and r["combine_us"] > 0
    assert r["total_us"] == round(r["dispatch_us"] + r["combine_us"], 1)
  assert result["num_ranks"] == 2
  assert result["config"]["num_sms"] in (8, 16)


# ---------------------------------------------------------------- the CLI


def run_tuner(*args, tmp_path):
  # JAX_PLATFORMS=cpu: the refusal must also show on a GPU machine.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_EP_CONFIG=str(tmp_path / "config.json"))
  return subprocess.run([sys.executable, "-m", "jax_ep.tune", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_cli_help_works_without_gpus(tmp_path):
  result = run_tuner("--help", tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr
  for flag in ("--tokens", "--sms", "--send-warps", "--chunks", "--out"):
    assert flag in result.stdout


def test_cli_refuses_to_run_without_a_gpu(tmp_path):
  result = run_tuner("--tokens", "8", tmp_path=tmp_path)
  assert result.returncode != 0
  assert "jax_ep.tune: no GPU visible to JAX" in result.stderr
  assert not (tmp_path / "config.json").exists()


def test_cli_rejects_a_tuning_that_is_not_a_config(tmp_path):
  result = run_tuner("--sms", "23", tmp_path=tmp_path)
  assert result.returncode == 2
  assert "jax_ep.Config: num_sms must be even, got 23" in result.stderr
