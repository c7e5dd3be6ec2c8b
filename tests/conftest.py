"""pytest setup for the jax_ep tests (tests/README.md maps the folders).

* Gives this process 8 CPU devices (before any backend starts), so the
  single-process tests run EP sizes 1, 2, 4 and 8 on CPU.
* Where JAX is CPU-only (no nvidia-smi, as in the Makefile), turns on JAX's
  compilation cache in a fresh folder that lives as long as the session:
  tests that build the same program (the same op at the same shapes, on
  other random values) compile it once. Compiling is most of what the CPU
  tests cost. JAX_COMPILATION_CACHE_DIR set by the caller is used as it is.
* Puts the repository, tests/support and tests/workers on `sys.path`
  (`repo_paths`), so `jax_ep`, `bench`, the helpers and the workers import
  under any import mode.
* `seed`: a fresh random seed per test (override with JAX_EP_TEST_SEED=<n> to
  replay a failure); a failing test's report names it. `rng` draws from it,
  and `problem(num_ranks, shape)` is an `ep_testing.Problem`, the EP mesh and
  inputs of a test, drawn from `rng`.
"""

from __future__ import annotations

import atexit
import functools
import os
import pathlib
import secrets
import shutil
import sys
import tempfile

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "support"))
import repo_paths  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
from ep_testing import Problem  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_CPU_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)


def _share_compilations() -> None:
  """JAX's persistent compilation cache, keyed by the program's text and the
  devices, so that a hit is the same program; every compile is cached."""
  if shutil.which("nvidia-smi") or jax.config.jax_compilation_cache_dir:
    return  # GPU runs keep JAX's defaults; a caller's cache is its own
  folder = tempfile.mkdtemp(prefix="jax_ep_tests_compiled_")
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_share_compilations()

_SEED_KEY = "jax_ep_seed"


@pytest.fixture
def seed(request) -> int:
  """Fresh seed for numpy's default_rng; JAX_EP_TEST_SEED replays one."""
  value = os.environ.get("JAX_EP_TEST_SEED")
  value = int(value) if value else secrets.randbits(63)
  request.node.user_properties.append((_SEED_KEY, value))
  return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
  """numpy's default_rng(seed), which every random input of a test comes
  from."""
  return np.random.default_rng(seed)


@pytest.fixture
def problem(seed, rng):
  """`problem(num_ranks, shape, **ep_kwargs)`: the test's `Problem` on
  `num_ranks` CPU ranks, for `shape` (a `Shape` or a name in `specs.SPECS`),
  drawing its inputs from `rng`."""
  return functools.partial(Problem, seed, rng)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if report.failed:
    for key, value in item.user_properties:
      if key == _SEED_KEY:
        report.sections.append(
            ("jax_ep seed", f"seed={value}; replay with "
             f"JAX_EP_TEST_SEED={value} pytest '{item.nodeid}'"))
  return report
