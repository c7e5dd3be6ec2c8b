"""Kernel configuration: SM budget and chunking of the communication buffers."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """How a communication kernel uses the GPU (DESIGN.md §7).

  Attributes:
    num_sms: streaming multiprocessors a normal kernel may occupy; the rest stay
      free for the model's compute. Must be even (kernels pair a sender and a
      receiver block per channel).
    nvl_chunk: tokens moved per NVLink flow-control step.
    nvl_buffer: tokens held per channel in the NVLink ring buffers.
    rdma_chunk: tokens moved per RDMA flow-control step (internode).
    rdma_buffer: tokens held per channel in the RDMA ring buffers (internode).

  The reference backend ignores the configuration; it is validated all the same
  so that a bad config fails the same way on every backend.
  """

  num_sms: int = 24
  nvl_chunk: int = 6
  nvl_buffer: int = 256
  rdma_chunk: int = 16
  rdma_buffer: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"jax_ep.Config: {field.name} must be a positive int, got {value!r}")
    if self.num_sms % 2:
      raise ValueError(
          f"jax_ep.Config: num_sms must be even, got {self.num_sms}")
    if self.nvl_chunk > self.nvl_buffer:
      raise ValueError(
          f"jax_ep.Config: nvl_chunk ({self.nvl_chunk}) must not exceed "
          f"nvl_buffer ({self.nvl_buffer})")
    if self.rdma_chunk > self.rdma_buffer:
      raise ValueError(
          f"jax_ep.Config: rdma_chunk ({self.rdma_chunk}) must not exceed "
          f"rdma_buffer ({self.rdma_buffer})")
