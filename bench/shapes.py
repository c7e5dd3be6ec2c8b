"""Named problem shapes shared by the benchmarks and the tests."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
  """One MoE communication problem, per EP rank."""
  tokens: int
  hidden: int
  topk: int
  experts: int


SHAPES = {
    # DeepSeek-V3 training / prefill (docs/measuring.md).
    "dsv3": Shape(tokens=4096, hidden=7168, topk=8, experts=256),
    # DeepSeek-V3 decoding (low-latency kernels).
    "dsv3_ll": Shape(tokens=128, hidden=7168, topk=8, experts=288),
    # DeepEP's published low-latency figures (256 experts, as its tests).
    "deepep_ll": Shape(tokens=128, hidden=7168, topk=8, experts=256),
    # Small enough for the CPU.
    "ci": Shape(tokens=128, hidden=256, topk=4, experts=16),
}
