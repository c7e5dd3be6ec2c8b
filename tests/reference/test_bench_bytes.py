"""The benchmark's byte counts across nodes (bench/normal.py), which its
internode figures are made of: DeepEP's logical count ((token, destination
node) pairs, own node included) and the rows that cross the network."""

import jax
import numpy as np

from bench import normal
from bench.shapes import Shape
from ep_testing import cpu_devices


def test_node_pairs_count_each_token_once_per_node(rng):
  ranks, per_node = 8, 2
  shape = Shape(tokens=9, hidden=128, topk=4, experts=32)
  idx = rng.integers(-1, shape.experts, (ranks * shape.tokens, shape.topk))
  pairs, remote = normal._node_pairs(idx, shape, ranks, per_node)  # pylint: disable=protected-access
  want, want_remote = [], []
  experts_per_node = shape.experts // ranks * per_node
  for q in range(ranks):
    rows = idx[q * shape.tokens:(q + 1) * shape.tokens]
    nodes = [{e // experts_per_node for e in row if e >= 0} for row in rows]
    want.append(sum(len(n) for n in nodes))
    want_remote.append(sum(len(n - {q // per_node}) for n in nodes))
  assert pairs == np.mean(want) and remote == np.mean(want_remote)


def test_the_reference_runs_as_nodes_and_says_so():
  mesh = jax.make_mesh((4,), ("ep",), devices=cpu_devices(4))
  shape = Shape(tokens=8, hidden=256, topk=2, experts=8)
  records = normal.run(mesh, shape, impls=["reference"], dtypes=["bf16"],
                       ops=["dispatch", "combine"], seed=0, iters=1, reps=1,
                       warmup=0, ranks_per_node=2)
  assert [r.op for r in records] == ["dispatch", "combine"]
  assert {r.note for r in records} == {"internode: 2 nodes of 2"}
