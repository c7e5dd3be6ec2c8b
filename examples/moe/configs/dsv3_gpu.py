"""DeepSeek-V3's layer at the one-GPU preset's sizes (configs/gpu.py): H=2048,
64 routed experts in 8 groups (a token's top-8 from its 4 best groups),
SwiGLU experts of width 1024 run as batched GEMMs over per-expert slots, a
shared expert, 4096 tokens per rank, bf16."""

from __future__ import annotations

import dataclasses

from configs import gpu


def get_config():
  return dataclasses.replace(
      gpu.get_config(),
      layer="deepseek_v3",
      shared_ffn=1024,
      num_groups=8,
      topk_groups=4,
      route_scale=2.5,
      expert_slots_factor=1.25,
  )
