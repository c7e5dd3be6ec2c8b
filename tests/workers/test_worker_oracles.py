"""CPU checks of the GPU workers' oracles: on the reference backend, the
outputs that intranode_worker.py and internode_worker.py compare with the
dense model (where ranks share a GPU it is the only oracle) equal the dense
model's, so that a GPU failure is the kernels', not the test's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import internode_worker
import intranode_worker as worker
from ep_testing import cpu_devices


def oracle_cases(num_ranks: int) -> list[worker.Case]:
  """`multiprocess_cases` less those that only tune the kernels: a case
  whose routing and options (K, E, capacity, alignment, fp8, weights, skew)
  an earlier case has, at other sizes, with its own `config`, which the
  reference backend ignores (its shapes run on the GPUs). Every other case
  stays: every kind of input the oracle meets (-1 ids, skew, capacity
  overflow, fp8 scale rows, no weights, alignment)."""
  kept, seen = [], set()
  for case in worker.multiprocess_cases(num_ranks):
    key = dataclasses.replace(case, tokens=0, hidden=0,
                              config=worker.COPY_ENGINE)
    if key in seen and case.config != worker.COPY_ENGINE:
      continue
    seen.add(key)
    kept.append(case)
  return kept


@pytest.mark.parametrize("pair", [False, True], ids=["steps", "repeat"])
def test_intranode_worker_dense_outputs_are_the_contract(seed, rng, pair):
  num_ranks = 2
  mesh = Mesh(np.array(cpu_devices(num_ranks)), (worker.EP,))
  cases = [worker.REPEAT_CASE] if pair else oracle_cases(num_ranks)
  for case in cases:
    arrays = worker.inputs(rng, num_ranks, case)
    out = worker.step(mesh, None, case, with_reference=False, pair=pair)(
        *[worker.global_array(mesh, a, P(worker.EP)) for a in arrays])
    worker.check_shards(case, num_ranks, arrays, out,
                        f"seed={seed}, {case.name()}", with_reference=False,
                        pair=pair)


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(2, 1), (4, 2)])
def test_internode_worker_dense_outputs_are_the_contract(seed, rng, num_ranks,
                                                         ranks_per_node):
  """The same for internode_worker.py's public-op steps and its VJP check,
  across nodes on the reference backend (combine node by node where
  G > 1)."""
  mesh = Mesh(np.array(cpu_devices(num_ranks)), (worker.EP,))
  buffer = internode_worker.open_buffer(
      mesh, worker.multiprocess_cases(num_ranks), "reference",
      ranks_per_node=ranks_per_node)
  internode_worker.check_vjps(mesh, buffer, rng, ranks_per_node,
                              f"seed={seed}, G={ranks_per_node}, VJPs")
  for case in oracle_cases(num_ranks):
    arrays = worker.inputs(rng, num_ranks, case)
    out = internode_worker.step(mesh, buffer, case)(
        *[worker.global_array(mesh, a, P(worker.EP)) for a in arrays])
    worker.check_shards(case, num_ranks, arrays, out,
                        f"seed={seed}, G={ranks_per_node}, {case.name()}",
                        with_reference=False, ranks_per_node=ranks_per_node)
