"""DeepSeek-V3's gate: which experts each token goes to, with what weight.

As DeepSeek-V3 publishes it (the paper's section 2.1.2 and the reference
inference code's `Gate`), per token, in f32:

    s       = sigmoid(x @ W)                       affinities, [E]
    c       = s + b                                b: a per-expert bias used
                                                   for selection only
    group g = the sum of the two best c of its E/G experts
    kept    = the `topk_groups` best groups
    idx     = the `topk` best c among the kept groups' experts
    w       = s[idx] / sum(s[idx]) * route_scale

Ties go to the lower index (groups and experts), as `lax.top_k` breaks them.

The bias balances the load without an auxiliary loss: after each step each
expert's bias moves by `rate` towards the mean load (down when it took more
tokens than the mean, up when fewer; `update_bias`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """DeepSeek-V3's gate sizes; the defaults are its published values.

  Attributes:
    num_experts: E, the routed experts.
    topk: K, experts per token.
    num_groups: G, contiguous expert groups (with groups = nodes, a token's
      rows cross the network to at most `topk_groups` nodes).
    topk_groups: groups a token may pick its experts from.
    route_scale: the routed scaling factor applied to the weights.
  """

  num_experts: int = 256
  topk: int = 8
  num_groups: int = 8
  topk_groups: int = 4
  route_scale: float = 2.5

  def __post_init__(self):
    if self.num_experts % self.num_groups:
      raise ValueError(f"GateConfig: num_experts ({self.num_experts}) must be "
                       f"a multiple of num_groups ({self.num_groups})")
    if not 1 <= self.topk_groups <= self.num_groups:
      raise ValueError(f"GateConfig: topk_groups must be in [1, num_groups="
                       f"{self.num_groups}], got {self.topk_groups}")
    per_group = self.num_experts // self.num_groups
    if not 1 <= self.topk <= self.topk_groups * per_group:
      raise ValueError(
          f"GateConfig: topk must be in [1, topk_groups * experts per group "
          f"= {self.topk_groups * per_group}], got {self.topk}")


def gate(x: jax.Array, weight: jax.Array, bias: jax.Array,
         cfg: GateConfig) -> tuple[jax.Array, jax.Array]:
  """`(int32[T, K] expert ids, f32[T, K] weights)` for tokens `x[T, H]`.

  Args:
    x: the tokens (any float dtype; the affinities are computed in f32 at
      full precision, so equivalent computations route alike).
    weight: `[H, E]` the gate's projection.
    bias: `f32[E]` the selection bias (not differentiated through).
    cfg: the sizes.
  """
  logits = jnp.dot(x.astype(jnp.float32), weight.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  scores = jax.nn.sigmoid(logits)
  choice = scores + lax.stop_gradient(bias.astype(jnp.float32))
  if cfg.topk_groups < cfg.num_groups:
    grouped = choice.reshape(choice.shape[0], cfg.num_groups, -1)
    group_scores = lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)
    kept = lax.top_k(group_scores, cfg.topk_groups)[1]  # [T, topk_groups]
    in_kept = (jnp.arange(cfg.num_groups) == kept[..., None]).any(-2)
    choice = jnp.where(in_kept[..., None], grouped,
                       -jnp.inf).reshape(choice.shape)
  # The choice is not differentiable; the weights are, through `scores`.
  idx = lax.top_k(lax.stop_gradient(choice), cfg.topk)[1]
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  weights = weights / weights.sum(-1, keepdims=True) * cfg.route_scale
  return idx.astype(jnp.int32), weights


def expert_load(topk_idx: jax.Array, num_experts: int) -> jax.Array:
  """`int32[E]`: how many (token, k) choices each expert got."""
  return (topk_idx.reshape(-1, 1) == jnp.arange(num_experts)).sum(
      0, dtype=jnp.int32)


def update_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """The auxiliary-loss-free balancing step: each expert's bias moves by
  `rate` against its load's deviation from the mean (`sign(mean - load)`;
  unchanged at the mean)."""
  load = load.astype(jnp.float32)
  return bias + rate * jnp.sign(load.mean() - load)
