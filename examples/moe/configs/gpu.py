"""A DeepSeek-like layer size for GPUs: bf16, H=2048, 64 experts, top-8."""

from __future__ import annotations

import dataclasses

from configs import default


def get_config() -> default.Config:
  return dataclasses.replace(
      default.get_config(),
      data_dim=256,
      tokens_per_rank=4096,
      hidden=2048,
      num_layers=2,
      num_experts=64,
      topk=8,
      ffn=1024,
      shared_ffn=2048,
      capacity_factor=None,
      dtype="bfloat16",
      steps=50,
      learning_rate=1e-3,
      log_every=10,
  )
