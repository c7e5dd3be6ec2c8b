"""Named problem shapes of the tests (per EP rank), shared with the benchmarks.

`bench.shapes.SHAPES` holds the shapes the benchmarks run; the tests take the
same names, cut to sizes a 2-core CPU runs in seconds (tag "ci"), and keep the
full sizes under the tag "full" (run them with JAX_EP_TEST_FULL=1).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from bench.shapes import SHAPES, Shape

RANKS = (1, 2, 4, 8)  # every E below is a multiple of each


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  shape: Shape
  tags: frozenset[str]

  @property
  def param(self):
    marks = ()
    if "ci" not in self.tags:
      marks = pytest.mark.skipif(
          not os.environ.get("JAX_EP_TEST_FULL"),
          reason=f"spec {self.name!r} is tagged full; set JAX_EP_TEST_FULL=1")
    return pytest.param(self, id=self.name, marks=marks)


def _spec(name, shape, *tags):
  return Spec(name, shape, frozenset(tags))


SPECS = {s.name: s for s in [
    # Odd token count, row of 64 bytes.
    _spec("tiny", Shape(tokens=5, hidden=32, topk=3, experts=16), "ci"),
    # fp8-capable hidden size (one 128-channel group).
    _spec("small", Shape(tokens=12, hidden=128, topk=4, experts=16), "ci"),
    # UE8M0 needs H % 512 == 0.
    _spec("ue8m0", Shape(tokens=6, hidden=512, topk=4, experts=16), "ci"),
    # bench's own CPU shape.
    _spec("ci", SHAPES["ci"], "ci"),
    # DeepSeek-V3 hidden size, top-k and experts with a handful of tokens.
    _spec("dsv3_cut", dataclasses.replace(SHAPES["dsv3"], tokens=4), "ci"),
    _spec("dsv3_ll_cut", dataclasses.replace(SHAPES["dsv3_ll"], tokens=3),
          "ci"),
    # The benchmark shapes themselves.
    _spec("dsv3", SHAPES["dsv3"], "full"),
    _spec("dsv3_ll", SHAPES["dsv3_ll"], "full"),
]}


def params(*names):
  return [SPECS[n].param for n in names]
