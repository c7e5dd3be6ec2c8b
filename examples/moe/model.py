"""A Flax nnx Mixture-of-Experts layer on jax_ep, and a tiny model around it.

Expert parallelism (EP) here is also data parallelism, as in DeepEP: the
tokens and the routed experts are both sharded over the EP mesh axis; rank r
holds experts `[r*L, (r+1)*L)`, `L = E/R`. Per rank, inside `jax.shard_map`:

    router -> top-k -> jax_ep.dispatch -> local experts (ragged_dot)
           -> weight by the top-k weights -> jax_ep.combine

The router and the shared expert are replicated. Gradients flow through
dispatch and combine (jax_ep defines their VJPs), into the tokens, the expert
weights and, through the top-k weights, the router.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import dsv3
import jax_ep
from experts import capacity, grouped_experts


def route(x: jax.Array, router: jax.Array, topk: int, *, num_groups: int = 1,
          max_groups: int | None = None):
  """Softmax router: `(int32[T, K] expert ids, f32[T, K] weights)`.

  The K weights of a token are renormalized to sum to 1. Logits are computed
  in full f32 (no TF32/bf16 passes), so that routing does not flip on
  near-ties between equivalent computations.

  Group-limited, as DeepSeek-V3 gates: the E experts form `num_groups`
  contiguous groups; a group scores the sum of its two best probabilities,
  and a token picks its top-K experts among those of its `max_groups` best
  groups only (None: every group). With the groups the nodes of the EP axis
  (`MoE(max_nodes=...)`), a token's rows cross the network to at most
  `max_groups` nodes.
  """
  logits = jnp.dot(x.astype(jnp.float32), router,
                   precision=lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  chosen = probs
  if max_groups is not None and max_groups < num_groups:
    grouped = probs.reshape(probs.shape[0], num_groups, -1)
    best_two = lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)
    kept = lax.top_k(best_two, max_groups)[1]  # [T, max_groups]
    in_kept = (jnp.arange(num_groups) == kept[..., None]).any(-2)
    # Experts of other groups rank below every kept one (probs are >= 0).
    chosen = jnp.where(in_kept[..., None], grouped, -1.0).reshape(probs.shape)
  idx = lax.top_k(chosen, topk)[1]
  weights = jnp.take_along_axis(probs, idx, axis=-1)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return idx.astype(jnp.int32), weights


def ep_moe(buffer: jax_ep.Buffer, x: jax.Array, router: jax.Array,
           w_in: jax.Array, w_out: jax.Array, *, topk: int,
           capacity_factor: float | None = None,
           max_nodes: int | None = None):
  """The routed experts on one EP rank; call inside `jax.shard_map`.

  Args:
    buffer: the `jax_ep.Buffer` of the EP axis (R ranks).
    x: `[T, H]` this rank's tokens.
    router: `f32[H, E]`, replicated.
    w_in: `[L, H, F]` and w_out: `[L, F, H]`, this rank's experts.
    topk: experts per token (K).
    capacity_factor: see `experts.capacity`.
    max_nodes: each token's experts lie on at most this many nodes of the
      EP axis (`route`'s groups are the nodes); None: no limit.

  Returns:
    `([T, H] output in x.dtype, int32 rows this rank could not receive)`.
  """
  num_experts = router.shape[1]
  topk_idx, topk_weights = route(x, router, topk,
                                 num_groups=buffer.topology.num_nodes,
                                 max_groups=max_nodes)
  cap = capacity(buffer.num_ranks, x.shape[0], num_experts, topk,
                 capacity_factor)
  d = jax_ep.dispatch(buffer, x, topk_idx, topk_weights,
                      num_experts=num_experts, capacity=cap)
  y = grouped_experts(d.x, d.topk_idx, d.topk_weights, w_in, w_out)
  out = jax_ep.combine(buffer, y.astype(x.dtype), d.handle)
  dropped = jnp.maximum(d.num_recv_tokens - cap, 0)
  return out, dropped


class DroppedRows(nnx.Variable):
  """Rows the dispatch capacity dropped in the last call, over all EP ranks."""


class MLP(nnx.Module):
  """The shared expert: `H -> F -> H` with a GELU, replicated."""

  def __init__(self, hidden: int, ffn: int, *, dtype, rngs: nnx.Rngs):
    self.up = nnx.Linear(hidden, ffn, use_bias=False, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(ffn, hidden, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class MoE(nnx.Module):
  """Top-k routed experts over the EP axis of `buffer`, plus a shared expert.

  Args:
    buffer: the `jax_ep.Buffer`; its mesh axis shards both the tokens and
      the routed experts.
    hidden, ffn, num_experts, topk: H, F, E, K.
    shared_ffn: hidden size of the shared expert (0: no shared expert).
    capacity_factor: see `experts.capacity`.
    max_nodes: node-limited routing, see `ep_moe`.
    dtype: compute and communication dtype; parameters are float32.

  Call it on `[N, H]` tokens sharded over the EP axis (N = R*T); it returns
  `[N, H]` in `dtype`, sharded the same way, and stores in `dropped_rows` (a
  `DroppedRows` variable) how many rows the capacity dropped.
  """

  def __init__(self, buffer: jax_ep.Buffer, *, hidden: int, ffn: int,
               num_experts: int, topk: int, shared_ffn: int = 0,
               capacity_factor: float | None = None,
               max_nodes: int | None = None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_experts % buffer.num_ranks:
      raise ValueError(
          f"MoE: num_experts ({num_experts}) must be a multiple of the EP "
          f"size ({buffer.num_ranks})")
    if max_nodes is not None and (not isinstance(max_nodes, int)
                                  or max_nodes < 1):
      raise ValueError(f"MoE: max_nodes must be None or an int >= 1, got "
                       f"{max_nodes!r}")
    self.buffer = buffer
    self.topk = topk
    self.capacity_factor = capacity_factor
    self.max_nodes = max_nodes
    self.dtype = dtype
    ep = P(buffer.axis_name, None, None)
    init = nnx.initializers.normal(stddev=1.0)
    self.router = nnx.Param(
        init(rngs.params(), (hidden, num_experts)) / math.sqrt(hidden))
    self.w_in = nnx.Param(
        init(rngs.params(), (num_experts, hidden, ffn)) / math.sqrt(hidden),
        out_sharding=ep)
    self.w_out = nnx.Param(
        init(rngs.params(), (num_experts, ffn, hidden)) / math.sqrt(ffn),
        out_sharding=ep)
    self.shared = (MLP(hidden, shared_ffn, dtype=dtype, rngs=rngs)
                   if shared_ffn else None)
    self.dropped_rows = DroppedRows(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    axis = self.buffer.axis_name

    def routed(x, router, w_in, w_out):
      out, dropped = ep_moe(self.buffer, x, router, w_in, w_out,
                            topk=self.topk,
                            capacity_factor=self.capacity_factor,
                            max_nodes=self.max_nodes)
      return out, lax.psum(dropped, axis)

    out, dropped = jax.shard_map(
        routed, mesh=self.buffer.mesh,
        in_specs=(P(axis, None), P(), P(axis, None, None),
                  P(axis, None, None)),
        out_specs=(P(axis, None), P()),
    )(x, self.router[...], self.w_in[...], self.w_out[...])
    self.dropped_rows[...] = dropped
    if self.shared is not None:
      out = out + self.shared(x)
    return out


class Block(nnx.Module):
  """`x + MoE(RMSNorm(x))`, the MoE layer `cfg.layer` names."""

  def __init__(self, buffer, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.norm = nnx.RMSNorm(cfg.hidden, dtype=dtype, rngs=rngs)
    if cfg.layer == "deepseek_v3":
      self.moe = dsv3.DeepSeekMoE(buffer, dsv3.config_of(cfg), rngs=rngs)
    elif cfg.layer == "moe":
      self.moe = MoE(buffer, hidden=cfg.hidden, ffn=cfg.ffn,
                     num_experts=cfg.num_experts, topk=cfg.topk,
                     shared_ffn=cfg.shared_ffn,
                     capacity_factor=cfg.capacity_factor,
                     max_nodes=cfg.max_nodes, dtype=dtype, rngs=rngs)
    else:
      raise ValueError(f"layer must be 'moe' or 'deepseek_v3', got "
                       f"{cfg.layer!r}")

  def __call__(self, x):
    return x + self.moe(self.norm(x))


class Model(nnx.Module):
  """Input projection, `num_layers` MoE blocks, RMSNorm, output head.

  Maps `[N, data_dim]` float inputs to `f32[N, data_dim]` predictions; N is
  sharded over the EP axis.
  """

  def __init__(self, buffer: jax_ep.Buffer, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.embed = nnx.Linear(cfg.data_dim, cfg.hidden, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List(
        [Block(buffer, cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.hidden, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(cfg.hidden, cfg.data_dim, dtype=dtype,
                           kernel_init=nnx.initializers.variance_scaling(
                               0.01, "fan_in", "normal"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.embed(x)
    for block in self.blocks:
      h = block(h)
    return self.head(self.norm(h)).astype(jnp.float32)
