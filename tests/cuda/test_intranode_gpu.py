"""GPU tests of the intranode dispatch and combine kernels, against the
pure-JAX reference, bit for bit (every output and every handle field).

* One process driving every local GPU (peer access): a table of shapes
  (T in {1, 7, 33, 128, 4096}, H in {256, 384, 2048, 7168}, K in {1, 4, 8},
  E in {R, 16, 256}), -1 and out-of-range ids, skewed routing, capacity
  overflow, fp8 rows (scale rows of 8, 12 and 224 bytes),
  no weights, expert alignment; two fresh routings per shape.
* 50 dispatch/combine pairs back to back in one program (lax.scan) with a
  fresh routing each.
* 200 dispatch/combine pairs with fresh routings, twice: the same bits.
* Trace-time refusal of buffers too small for a call; the peer buffers made
  once per device, sized with their control region.
* One process per rank (intranode_worker.py; peer buffers through CUDA IPC),
  at R = the GPUs (2 or more) and at R = 2, 4 and 8 where those are
  multiples of the GPUs, several ranks then sharing each GPU: every case of
  `multiprocess_cases` twice, equal to the dense model (and to the reference
  backend where each rank has its own GPU).
* A rank that never arrives (R = 2): the other's dispatch names rank, phase
  and peer and fails instead of hanging.
* Pressure (marked `pressure`): gpu_testing.PRESSURE_PAIRS pairs (7,500 at
  R = 2, 200 at R = 8) on fresh routings, each equal to the dense model, the
  same sha256 twice.
"""

from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh

import intranode_worker as worker
from intranode_worker import Case, PUSH
from gpu_testing import (GPUS, NEEDS_KERNELS, PRESSURE_PAIRS,
                         assert_missing_rank_times_out, every_worker,
                         launch_per_gpu, multi_rank_sizes, repeat_digests)
from jax_ep._src import sizes
from jax_ep._src.config import OVERLAP_NUM_SMS, Config
from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import peer_buffers
from jax_ep._src.fp8 import FP8_DTYPE



R = len(GPUS)
pytestmark = NEEDS_KERNELS
WORKER = pathlib.Path(worker.__file__).resolve()

CASES = [
    Case(1, 2048, 1, max(R, 1)),
    Case(1, 7168, 8, 256),
    Case(7, 2048, 8, 256),
    Case(7, 7168, 1, max(R, 1), alignment=8),
    Case(128, 2048, 1, 256, weights=False),
    Case(128, 7168, 8, 256, skew=True),
    Case(128, 2048, 8, 256, capacity=max(1, R * 128 // 3)),  # overflow
    Case(128, 7168, 8, 256, fp8=True),
    Case(4096, 2048, 1, max(R, 1), skew=True),
    Case(4096, 7168, 8, 256, alignment=128),
    Case(4096, 7168, 8, 256, capacity=3000, skew=True),  # overflow
    Case(4096, 7168, 8, 256, fp8=True),
    # fp8 scale rows of 8 and 12 bytes (H = 256, 384): not whole 16 bytes.
    Case(7, 256, 4, 16, fp8=True),
    Case(33, 384, 8, 256, fp8=True, config=PUSH),
    Case(4096, 2056, 8, 256),  # H not a multiple of 128 (4112-byte rows)
    # Warps push the dispatched rows (no copy engine).
    Case(128, 7168, 8, 256, skew=True, config=PUSH),
    Case(4096, 7168, 8, 256, capacity=3000, config=PUSH),
    Case(128, 7168, 8, 256, fp8=True, config=PUSH),
    # Tunings the autotuner may pick: the fewest blocks Config allows (2),
    # lone pusher, tiny chunks.
    Case(128, 2048, 8, 256,
         config=Config(num_sms=2, nvl_send_warps=1, nvl_chunk=1,
                       nvl_copy_engine=True)),
    Case(128, 2048, 8, 256,
         config=Config(num_sms=2, nvl_send_warps=1, nvl_chunk=1)),
    Case(4096, 7168, 8, 256,
         config=Config(num_sms=8, nvl_send_warps=15, nvl_chunk=1)),
    Case(1000, 2048, 8, 256,
         config=Config(num_sms=64, nvl_chunk=1000, nvl_copy_engine=True)),
    Case(4096, 2048, 8, 256,  # one chunk, one piece
         config=Config(num_sms=OVERLAP_NUM_SMS, nvl_chunk=4096,
                       nvl_copy_engine=True)),
]
CASES = [c for c in CASES if c.topk <= c.experts]  # the ops need K <= E
SCAN_CASE = Case(128, 2048, 8, 256)


@pytest.fixture(scope="module")
def setup():
  num_bytes = max(sizes.nvl_buffer_bytes(
      c.tokens, c.hidden, c.topk, R, FP8_DTYPE if c.fp8 else jnp.bfloat16)
      for c in CASES)
  buffers = peer_buffers.create_peer_buffers(GPUS, num_bytes)
  yield Mesh(np.array(GPUS), (worker.EP,)), buffers
  buffers.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name())
def test_kernels_match_reference(setup, seed, case):
  mesh, buffers = setup
  rng = np.random.default_rng(seed)
  for call in range(2):
    worker.run_case(mesh, buffers, case, rng, f"seed={seed}, call {call}")


def test_50_pairs_in_one_program(setup, seed):
  mesh, buffers = setup
  rng = np.random.default_rng(seed)
  steps = 50
  per_step = [worker.inputs(rng, R, SCAN_CASE) for _ in range(steps)]
  stacked = [None if a[0] is None else np.stack(a) for a in zip(*per_step)]
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  args = [None if a is None else jax.device_put(
      a, NamedSharding(mesh, P(None, worker.EP))) for a in stacked]
  out = worker.scan_steps(mesh, buffers, SCAN_CASE)(*args)
  out = [np.asarray(o) for o in out]
  names = worker._names(SCAN_CASE)  # pylint: disable=protected-access
  for i in range(steps):
    worker.compare(names, [o[i] for o in out],
                   f"seed={seed}, step {i} of the scan")


def test_200_pairs_are_bitwise_repeatable(setup, seed):
  """Identical inputs give identical bits, run after run (no atomics decide
  any output: every row has one writer, sums run in rank order)."""
  mesh, buffers = setup
  case = Case(512, 2048, 8, 256, skew=True)
  rng = np.random.default_rng(seed)
  steps = 200
  per_step = [worker.inputs(rng, R, case) for _ in range(steps)]
  x, _, idx, w, y, _ = [None if a[0] is None else np.stack(a)
                        for a in zip(*per_step)]
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, worker.EP)))
  x, idx, w, y = put(x), put(idx), put(w), put(y)
  kernels = dict(axis_name=worker.EP, buffers=buffers,
                 timeout_s=worker.KERNEL_TIMEOUT_S)
  kw = dict(num_ranks=R, num_experts=case.experts, capacity=R * case.tokens,
            expert_alignment=1, **kernels)

  def per_shard(x, idx, w, y):
    def body(carry, xs):
      x, idx, w, y = xs
      rows, r_idx, r_w, _, h = intranode.dispatch((x,), idx, w, **kw)
      out = intranode.combine(y, h, **kernels)
      back = intranode.cached_dispatch((x,), h, **kernels)[0]
      return carry, (rows[0][None], r_idx[None], r_w[None], h.recv_row[None],
                     out[None], back[None])
    return lax.scan(body, None, (x, idx, w, y))[1]

  program = jax.jit(jax.shard_map(
      per_shard, mesh=mesh, in_specs=P(None, worker.EP),
      out_specs=P(None, worker.EP)))

  def digest():
    h = hashlib.sha256()
    for a in program(x, idx, w, y):
      h.update(np.asarray(a).tobytes())
    return h.hexdigest()

  first = digest()
  assert digest() == first, f"seed={seed}: two runs of 200 pairs differ"


def test_a_missing_rank_times_out_with_a_report(capfd, seed):
  """Two ranks (one GPU each, or sharing one); rank 1 never calls."""
  report = assert_missing_rank_times_out(capfd, WORKER, seed)
  assert ("jax_ep intranode_dispatch timeout: rank 0, phase 'wait for the "
          "peers to start the call', peer 1") in report, report


def test_too_small_buffers_are_refused_at_trace_time(setup):
  mesh, buffers = setup
  del mesh
  tokens = 1 << 16  # far past what the fixture sized the buffers for
  x = jax.ShapeDtypeStruct((tokens, 7168), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((tokens, 8), jnp.int32)
  with pytest.raises(ValueError,
                     match="num_nvl_bytes with jax_ep.nvl_buffer_bytes"):
    jax.eval_shape(lambda x, idx: intranode.dispatch(
        (x,), idx, None, axis_name=worker.EP, num_ranks=R, num_experts=256,
        capacity=R * tokens, expert_alignment=1, buffers=buffers,
        timeout_s=worker.KERNEL_TIMEOUT_S), x, idx)


def test_creating_buffers_twice_is_refused(setup):
  del setup  # the module's buffers hold every GPU
  with pytest.raises(ValueError, match="already created"):
    peer_buffers.create_peer_buffers(GPUS[:1], 1024)


def test_buffer_bytes_add_the_control_region():
  assert peer_buffers.buffer_bytes(1000, 2) > 1024
  # The control region: counters, count slots and 4096 arrival flags (8
  # bytes) per rank.
  control = peer_buffers.buffer_bytes(1 << 20, 8) - (1 << 20)
  assert 8 * 4096 * 8 <= control < (1 << 19)


@pytest.mark.parametrize("num_ranks", multi_rank_sizes(),
                         ids=lambda r: f"R{r}")
def test_one_process_per_rank(capfd, seed, num_ranks):
  steps = 2 * len(worker.multiprocess_cases(num_ranks))
  code, out, report = launch_per_gpu(
      capfd, [str(WORKER), "--seed", str(seed), "--steps", str(steps)],
      timeout=300, num_ranks=num_ranks)
  report = f"seed={seed}, R={num_ranks}: {report}"
  assert code == 0, report
  for line in every_worker(f"{steps} dispatch/combine steps passed",
                           num_ranks):
    assert line in out, report


@pytest.mark.pressure
@pytest.mark.parametrize("num_ranks", [r for r in multi_rank_sizes()
                                       if r in PRESSURE_PAIRS],
                         ids=lambda r: f"R{r}")
def test_pressure_pairs_hash_the_same_twice(capfd, seed, num_ranks):
  """Dispatch/combine pairs on fresh routings, back to back, each equal to
  the dense model; two launches with the same seed print the same sha256."""
  steps = PRESSURE_PAIRS[num_ranks]
  run = lambda: repeat_digests(capfd, [str(WORKER), "--seed", str(seed)],
                               num_ranks=num_ranks, steps=steps, timeout=400)
  first = run()
  assert run() == first, f"seed={seed}, R={num_ranks}: two runs differ"
