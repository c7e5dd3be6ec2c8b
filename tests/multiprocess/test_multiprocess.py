"""jax_ep across processes: N local processes joined by jax.distributed.

Each test starts `multiprocess_worker.py` N times through jax_ep's own
launcher (`jax_ep._src.launch.launch`, CPU devices, a free localhost port).
Every process builds the same inputs from the shared seed, runs layout,
dispatch (fresh, fp8, cached, capacity overflow), combine (weights, two
biases, identity), low-latency dispatch/combine (bf16 and fp8 variants, hook)
and gradients (dispatch's VJP, a small MoE against a dense one) over an EP
mesh spanning all processes, and checks its own shards against the dense
model. A failing process fails the test, with every process's output.
"""

import signal
import sys
import time

import pytest

from jax_ep._src import launch
from repo_paths import WORKERS

WORKER = WORKERS / "multiprocess_worker.py"
TIMEOUT_S = 90  # each configuration takes 15-35 s on 2 cores


def run_workers(capfd, num_processes, devices, seed, checks=None,
                timeout=TIMEOUT_S):
  command = [sys.executable, str(WORKER), "--seed", str(seed)]
  if checks:
    command += ["--checks", checks]
  start = time.monotonic()
  code = launch.launch(command, num_processes, platform="cpu",
                       devices_per_process=devices, timeout=timeout)
  out, err = capfd.readouterr()
  return code, out, err, time.monotonic() - start


def _report(code, out, err, what):
  return (f"{what}: exit code {code}\n----- stdout of all processes -----\n"
          f"{out}\n----- stderr of all processes -----\n{err[-20000:]}")


# Two launches (each costs its compiles in every process, on CI's 2 cores):
# 2 processes of 2 devices run every check (several shards per process, EP 4
# spanning both), and 4 processes of one device each layout and combine
# (every shard in a process of its own; combine's check dispatches first and
# checks combine(dispatch(x)) too); the others there would triple its time.
# EP 2 over 2 processes of one device runs in the tests below and in
# test_readme's and test_example_moe's launches.
@pytest.mark.parametrize("num_processes,devices,checks", [
    (4, 1, "layout,combine"), (2, 2, None)],
                         ids=["4procx1dev", "2procx2dev"])
def test_multiprocess_matches_dense_model(capfd, seed, num_processes, devices,
                                          checks):
  code, out, err, _ = run_workers(capfd, num_processes, devices, seed, checks)
  what = (f"{num_processes} processes x {devices} CPU devices, seed={seed} "
          f"(rerun with JAX_EP_TEST_SEED={seed})")
  if code != 0:
    pytest.fail(_report(code, out, err, what), pytrace=False)
  for i in range(num_processes):
    assert f"worker {i}/{num_processes}: all checks passed" in out, \
        _report(code, out, err, what)
  assert f"of {num_processes * devices} devices" in out  # EP spans processes


def test_buffer_setup_runs_no_xla_collective(capfd, seed):
  code, out, err, _ = run_workers(capfd, 2, 1, seed, checks="setup")
  what = f"2 processes, setup, seed={seed}"
  if code != 0:
    pytest.fail(_report(code, out, err, what), pytrace=False)
  for i in range(2):
    assert f"worker {i}/2: setup ok" in out, _report(code, out, err, what)


def test_a_failing_process_stops_the_launch(capfd, seed):
  """launch(): "The first process to fail (or a timeout) stops the others;
  its exit code is returned". Process 1 raises (an uncaught exception, as in
  any user program) while process 0 waits in a collective: launch must
  return 1 promptly, not the timeout's 124."""
  code, out, err, took = run_workers(capfd, 2, 1, seed,
                                     checks="selftest_failure", timeout=20)
  report = _report(code, out, err, f"selftest (took {took:.0f} s)")
  assert "deliberate failure in process 1" in err, report
  assert code == 1, report


def test_a_process_killed_by_a_signal_is_named(capfd):
  """A crash (here SIGSEGV, as a sanitizer's or a driver's would be) gives a
  shell's status, 128 + N, and a line naming the process and the signal."""
  code = launch.launch(
      [sys.executable, "-c", "import os, signal; "
       "os.kill(os.getpid(), signal.SIGSEGV)"], 2, platform="cpu",
      timeout=60)
  err = capfd.readouterr().err
  assert code == 128 + signal.SIGSEGV, err
  assert "jax_ep.launch: process 0 died of SIGSEGV" in err or (
      "jax_ep.launch: process 1 died of SIGSEGV" in err), err
