"""Shape fuzzing on the reference backend (CPU devices, R = 1, 2 and 4).

Every draw of shape_fuzz.py (random shapes from everything the ops accept,
and some they must refuse) runs and equals the dense model bit for bit, or is
refused at trace time with a message that names the public op and the
reason. The draws depend on the test's seed (replay: JAX_EP_TEST_SEED). The
GPU grid, on the kernels, is test_shape_fuzz_gpu.py.
"""

import numpy as np
import pytest
from jax.sharding import Mesh

import shape_fuzz
from ep_testing import cpu_devices

DRAWS = 3  # per family and EP size (18 in all); a draw costs a compile, ~1.5 s


@pytest.mark.parametrize("family", shape_fuzz.FAMILIES)
@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_every_drawn_shape_runs_right_or_is_refused(seed, num_ranks, family):
  mesh = Mesh(np.array(cpu_devices(num_ranks)), ("ep",))
  count = shape_fuzz.fuzz(mesh, "reference", seed, range(DRAWS), [family],
                          f"seed={seed}, R={num_ranks}")
  assert count == DRAWS


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("family", shape_fuzz.FAMILIES)
def test_draws_span_the_accepted_shapes_and_the_refused_ones(family, backend):
  """The draws reach both ends of every size, every dtype or fp8 mode, and
  refusals as well as runs (a generator that drew only small or only
  refused shapes would pass the tests above without testing much)."""
  draws = [shape_fuzz.draw(0, family, i, 2, backend) for i in range(400)]
  runs = [d for d in draws if not shape_fuzz.refusals(d, backend)]
  assert 0.03 < 1 - len(runs) / len(draws) < 0.5
  assert {d.tokens % 2 for d in runs} == {0, 1}
  assert min(d.tokens for d in runs) == 1
  assert max(d.tokens for d in runs) >= 150
  assert min(d.topk for d in runs) == 1 and max(d.topk for d in runs) >= 16
  assert min(d.hidden for d in runs) <= 256
  assert max(d.hidden for d in runs) >= 4096
  assert min(d.experts for d in runs) == 2
  names = shape_fuzz.ROW_DTYPES if family == "normal" else shape_fuzz.FP8_MODES
  assert {d.dtype for d in runs} == set(names)
  if family == "low_latency":
    assert {d.hooks for d in runs} == {d.zero_copy for d in runs} == {
        False, True}
    assert any(d.max_tokens > d.tokens for d in runs)
    assert max(d.tokens for d in runs) > 512  # the kernels' second pass
  else:
    assert any(d.capacity is not None and d.capacity < d.num_ranks * d.tokens
               for d in runs)
    assert {d.routing for d in runs} == set(shape_fuzz.ROUTINGS)
