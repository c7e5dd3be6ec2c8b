"""Default configuration: a small MoE that trains in about a minute on 2 CPUs.

The task (see `main.py`) regresses the output of a fixed random "teacher" MoE:
`target = A[g(x)] @ x`, where `g(x)` picks one of `teacher_experts` linear
maps by the argmax of a random gate. Inputs are fresh Gaussian draws every
step, so the loss measures generalization, starting near 1.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Sizes of the model, the data and the training run.

  Attributes:
    data_dim: features of the synthetic inputs and targets (D).
    teacher_experts: linear pieces of the teacher function.
    tokens_per_rank: tokens each EP rank (device) holds per step (T).
    hidden: model width (H). `hidden * itemsize(dtype)` must be a multiple
      of 16 bytes (jax_ep moves rows in 16-byte vectors).
    num_layers: blocks of [RMSNorm, MoE, residual].
    num_experts: routed experts per layer (E), a multiple of the EP size.
    topk: experts per token (K).
    ffn: hidden size of each routed expert (F).
    shared_ffn: hidden size of the shared expert; 0 for none.
    capacity_factor: rows each rank may receive, as a multiple of the rows
      it receives on average under uniform routing; `None` means `R*T`, which
      never drops a token. Dropped rows are counted and printed.
    max_nodes: node-limited routing: each token's experts lie on at most
      this many nodes of the EP axis (DeepSeek-V3's group-limited gating,
      groups = nodes); `None` for no limit. Nodes come from the hosts (or
      the Buffer's ranks_per_node).
    dtype: compute and communication dtype ("float32" or "bfloat16");
      parameters and optimizer state stay float32.
    layer: "moe" (softmax router, GELU experts: `model.MoE`) or
      "deepseek_v3" (DeepSeek-V3's gate, SwiGLU experts: `dsv3.DeepSeekMoE`;
      its shared expert is a SwiGLU of width shared_ffn).
    num_groups, topk_groups, route_scale: DeepSeek-V3's gate (layer
      "deepseek_v3"): experts in num_groups groups, a token's experts from
      its topk_groups best (None: all), weights times route_scale. With the
      groups the nodes of the EP axis this is node-limited routing.
    fp8_dispatch: layer "deepseek_v3": dispatch fp8 rows with their scales.
    expert_slots_factor: layer "deepseek_v3": None runs the local experts
      through ragged_dot; a factor runs them as batched GEMMs over that many
      times the mean (row, expert) pairs per expert (experts.padded_experts;
      pairs that do not fit are dropped and counted with the rows).
    overlap_micro_batches: layer "deepseek_v3": two micro-batches per
      step, each one's dispatch and combine beside the other's expert GEMMs
      (`jax_ep.overlap`, DualPipe's overlap); tokens_per_rank even.
    bias_rate: layer "deepseek_v3": the gate's bias update per step.
    steps: training steps.
    learning_rate: peak AdamW learning rate (linear warm-up, cosine decay).
    warmup_steps: steps of linear learning-rate warm-up.
    weight_decay: AdamW weight decay.
    seed: seed of the parameters and the teacher (data differ per process).
    log_every: print every this many steps.
    checkpoint_dir: where Orbax keeps the model and optimizer (None: no
      checkpoints); a run restores the latest one there and goes on from it.
    checkpoint_every: save every this many steps (and after the last).
  """

  data_dim: int = 32
  teacher_experts: int = 4
  tokens_per_rank: int = 256
  hidden: int = 128
  num_layers: int = 2
  num_experts: int = 8
  topk: int = 2
  ffn: int = 256
  shared_ffn: int = 256
  capacity_factor: float | None = None
  max_nodes: int | None = None
  dtype: str = "float32"
  layer: str = "moe"
  num_groups: int = 1
  topk_groups: int | None = None
  route_scale: float = 1.0
  fp8_dispatch: bool = False
  expert_slots_factor: float | None = None
  overlap_micro_batches: bool = False
  bias_rate: float = 0.001
  steps: int = 50
  learning_rate: float = 1e-2
  warmup_steps: int = 5
  weight_decay: float = 1e-4
  seed: int = 0
  log_every: int = 5
  checkpoint_dir: str | None = None
  checkpoint_every: int = 100


def get_config() -> Config:
  return Config()
