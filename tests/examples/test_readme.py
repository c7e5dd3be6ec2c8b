"""The README's example runs as written: alone (every CPU device of this
process) and as two processes under `python -m jax_ep.launch -n 2`, where it
must run as one program over both (it calls `jax_ep.launch.initialize()`)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from repo_paths import REPO

README = REPO / "README.md"
# What the example leaves behind, printed after it.
_REPORT = ('\nprint(f"example: {jax.process_count()} processes, "\n'
           '      f"out {out.dtype}{list(out.shape)}")\n')


def example() -> str:
  """The first ```python block after "## Example"."""
  text = README.read_text()
  section = text[text.index("## Example"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_runs_in_this_process():
  scope = {}
  # pylint: disable-next=exec-used
  exec(compile(example(), str(README), "exec"), scope)
  assert scope["jax"].device_count() > 1  # conftest's CPU devices
  # Each token's two choices weigh 1/2 each, so the ranks that received it
  # send back x/2 or x between them: the sum is x, exactly.
  out, x = np.asarray(scope["out"]), np.asarray(scope["x"])
  assert out.dtype == x.dtype and np.array_equal(out, x)


def test_the_example_runs_as_one_program_of_two_processes(tmp_path):
  script = tmp_path / "example.py"
  script.write_text(example() + _REPORT)
  proc = subprocess.run(
      [sys.executable, "-m", "jax_ep.launch", "-n", "2", "--platform", "cpu",
       "--timeout", "120", "--", sys.executable, str(script)],
      capture_output=True, text=True, timeout=180)
  report = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
  assert proc.returncode == 0, report
  line = "example: 2 processes, out bfloat16[128, 256]"
  assert proc.stdout.count(line) == 2, report
