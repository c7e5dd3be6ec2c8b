"""DeepSeek-V3's MoE layer in Flax nnx, with its routed experts spread over
the EP mesh axis by jax_ep.

Per token (DeepSeek-V3, section 2.1.2): `out = shared(x) + sum_k w_k *
expert_{idx_k}(x)`, with DeepSeek-V3's gate (`dsv3_gate.py`: sigmoid affinities,
a selection-only bias for auxiliary-loss-free balancing, group-limited
top-k, normalized weights times the routed scale), SwiGLU experts and
a shared expert (one SwiGLU of `shared_ffn`, DeepSeek-V3's one shared
expert of 2048).

As in `model.py`'s toy layer, EP is also data parallelism: the tokens and the
routed experts are sharded over the EP axis, and per rank, inside
`jax.shard_map`:

    gate -> jax_ep.dispatch (bf16, or fp8 rows with their scales)
         -> local SwiGLU experts (`experts.local_experts`) -> jax_ep.combine

With `overlap_micro_batches` the tokens go as two micro-batches, each one's
dispatch and combine beside the other's expert GEMMs on XLA's other streams
(`jax_ep.overlap`), as DualPipe overlaps them.

With `fp8_dispatch` the rows travel as e4m3 with one f32 scale per 128
channels and are cast back on arrival, as DeepSeek-V3 trains; their
gradient comes back as the bf16 combine of the rows' cotangents (the
transpose of the dispatch), while the weights' gradient goes through the
dispatch's own VJP. The gate's load (choices per expert over the global
batch) is kept for `rebalance`, the bias update between steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import dsv3_gate
import jax_ep
from experts import capacity, local_experts


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
  """The layer's sizes; the defaults are DeepSeek-V3's.

  Attributes:
    hidden: H.
    expert_ffn: F, each routed expert's SwiGLU width.
    shared_ffn: the shared expert's SwiGLU width; 0 for none.
    gate: the gate's sizes (`dsv3_gate.GateConfig`). With `gate.num_groups` the
      nodes of the EP axis, `gate.topk_groups` limits the nodes a token's
      rows cross to (DeepSeek-V3: 8 groups = 8 nodes at EP64, 4 kept).
    fp8_dispatch: dispatch e4m3 rows with per-128-channel scales.
    capacity_factor: see `experts.capacity`; None never
      drops a row.
    expert_slots_factor: None runs the local experts through
      `jax.lax.ragged_dot`; a factor runs them as batched GEMMs over that
      many times the mean pairs per expert (`experts.padded_experts`;
      pairs past an expert's slots are dropped and counted).
    overlap_micro_batches: run the tokens as two micro-batches, each one's
      dispatch and combine beside the other's expert GEMMs
      (`jax_ep.overlap`, DualPipe's overlap); needs an even T.
    bias_rate: the bias update's step (`dsv3_gate.update_bias`).
    dtype: compute and communication dtype; parameters are float32.
  """

  hidden: int = 7168
  expert_ffn: int = 2048
  shared_ffn: int = 2048
  gate: dsv3_gate.GateConfig = dsv3_gate.GateConfig()
  fp8_dispatch: bool = False
  capacity_factor: float | None = None
  expert_slots_factor: float | None = None
  overlap_micro_batches: bool = False
  bias_rate: float = 0.001
  dtype: str = "bfloat16"


def config_of(cfg) -> MoEConfig:
  """The layer's config from the example's `Config` (configs/default.py)."""
  gate = dsv3_gate.GateConfig(
      num_experts=cfg.num_experts, topk=cfg.topk, num_groups=cfg.num_groups,
      topk_groups=cfg.topk_groups or cfg.num_groups,
      route_scale=cfg.route_scale)
  return MoEConfig(hidden=cfg.hidden, expert_ffn=cfg.ffn,
                   shared_ffn=cfg.shared_ffn, gate=gate,
                   fp8_dispatch=cfg.fp8_dispatch,
                   capacity_factor=cfg.capacity_factor,
                   expert_slots_factor=cfg.expert_slots_factor,
                   overlap_micro_batches=cfg.overlap_micro_batches,
                   bias_rate=cfg.bias_rate, dtype=cfg.dtype)


def swiglu(h: jax.Array) -> jax.Array:
  """`silu(gate) * up` of `h = [gate | up]` along the last axis."""
  gate, up = jnp.split(h, 2, axis=-1)
  return jax.nn.silu(gate) * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _arrived(buffer, x, q, scales, handle):
  """The fp8 rows `(q, scales)` a dispatch of `x` delivered, cast back to
  `x.dtype`; the gradient into `x` is the bf16 combine of the rows'
  cotangents along `handle` (the transpose of the dispatch)."""
  del buffer, handle
  return jax_ep.per_token_cast_back(q, scales).astype(x.dtype)


def _arrived_fwd(buffer, x, q, scales, handle):
  return _arrived(buffer, x, q, scales, handle), handle


def _arrived_bwd(buffer, handle, g):
  return jax_ep.combine(buffer, g, handle), None, None, None


_arrived.defvjp(_arrived_fwd, _arrived_bwd)


def routed_experts(buffer: jax_ep.Buffer, cfg: MoEConfig, x: jax.Array,
                   topk_idx: jax.Array, topk_weights: jax.Array,
                   w_gate_up: jax.Array, w_down: jax.Array):
  """The routed experts' part of the layer on one EP rank (in `shard_map`).

  Args:
    x: `[T, H]` this rank's tokens.
    topk_idx, topk_weights: the gate's `[T, K]` choices and weights.
    w_gate_up: `[L, H, 2F]` and w_down: `[L, F, H]`, this rank's experts.

  Returns:
    `([T, H] in x.dtype, int32 rows this rank could not receive plus
    (row, expert) pairs its experts' slots could not take)`.
  """
  if cfg.overlap_micro_batches:
    return _two_micro_batches(buffer, cfg, x, topk_idx, topk_weights,
                              w_gate_up, w_down)
  d, rows, cap = _send(buffer, cfg, x, topk_idx, topk_weights)
  y, dropped_pairs = _experts(cfg, d, rows, w_gate_up, w_down)
  out = jax_ep.combine(buffer, y.astype(x.dtype), d.handle)
  return out, jnp.maximum(d.num_recv_tokens - cap, 0) + dropped_pairs


def _send(buffer, cfg: MoEConfig, x, topk_idx, topk_weights):
  """Dispatches `x`: `(Dispatched, its rows in x.dtype, the capacity)`."""
  num_experts = cfg.gate.num_experts
  cap = capacity(buffer.num_ranks, x.shape[0], num_experts, cfg.gate.topk,
                 cfg.capacity_factor)
  if cfg.fp8_dispatch:
    # The rows' gradient comes back through `_arrived`, not the dispatch.
    q, scales = lax.stop_gradient(jax_ep.per_token_cast_to_fp8(x))
    d = jax_ep.dispatch(buffer, (q, scales), topk_idx, topk_weights,
                        num_experts=num_experts, capacity=cap)
    return d, _arrived(buffer, x, d.x, d.scales, d.handle), cap
  d = jax_ep.dispatch(buffer, x, topk_idx, topk_weights,
                      num_experts=num_experts, capacity=cap)
  return d, d.x, cap


def _experts(cfg: MoEConfig, d, rows, w_gate_up, w_down):
  """This rank's experts on the rows `d` delivered: `(y, dropped pairs)`."""
  return local_experts(rows, d.topk_idx, d.topk_weights, w_gate_up, w_down,
                       slots_factor=cfg.expert_slots_factor,
                       activation=swiglu)


def _two_micro_batches(buffer, cfg: MoEConfig, x, topk_idx, topk_weights,
                       w_gate_up, w_down):
  """`routed_experts` on the two halves of the tokens, a and b, with each
  half's communication beside the other's expert GEMMs (`jax_ep.overlap`),
  as DualPipe overlaps two micro-batches:

      dispatch a
      dispatch b   beside  experts a
      combine a    beside  experts b
      combine b

  The backward runs the same pairs in reverse, each part on its stream."""
  if x.shape[0] % 2:
    raise ValueError(f"overlap_micro_batches: the tokens per rank "
                     f"({x.shape[0]}) must be even")
  half = x.shape[0] // 2
  xs = (x[:half], x[half:])
  idx = (topk_idx[:half], topk_idx[half:])
  weights = (topk_weights[:half], topk_weights[half:])
  # Every jax_ep op goes through `overlap`, the lone ones too: on the one
  # communication stream they run in program order, never two at once.
  sent_a, _ = jax_ep.overlap(
      buffer, lambda: _send(buffer, cfg, xs[0], idx[0], weights[0]))
  sent_b, (y_a, dropped_a) = jax_ep.overlap(
      buffer, lambda: _send(buffer, cfg, xs[1], idx[1], weights[1]),
      lambda: _experts(cfg, sent_a[0], sent_a[1], w_gate_up, w_down))
  out_a, (y_b, dropped_b) = jax_ep.overlap(
      buffer,
      lambda: jax_ep.combine(buffer, y_a.astype(x.dtype), sent_a[0].handle),
      lambda: _experts(cfg, sent_b[0], sent_b[1], w_gate_up, w_down))
  out_b, _ = jax_ep.overlap(
      buffer,
      lambda: jax_ep.combine(buffer, y_b.astype(x.dtype), sent_b[0].handle))
  dropped = sum(jnp.maximum(d.num_recv_tokens - cap, 0)
                for d, _, cap in (sent_a, sent_b))
  return (jnp.concatenate([out_a, out_b]),
          dropped + dropped_a + dropped_b)


class GateBias(nnx.Variable):
  """The gate's selection bias: updated by `rebalance`, not by gradients."""


class ExpertLoad(nnx.Variable):
  """Choices per expert in the last call, over the global batch."""


class DroppedRows(nnx.Variable):
  """Rows the dispatch capacity and (row, expert) pairs the experts' slots
  dropped in the last call, over all ranks."""


class SwiGLU(nnx.Module):
  """`down(silu(x W_gate) * (x W_up))`, replicated (the shared experts)."""

  def __init__(self, hidden: int, ffn: int, *, dtype, rngs: nnx.Rngs):
    self.gate_up = nnx.Linear(hidden, 2 * ffn, use_bias=False, dtype=dtype,
                              rngs=rngs)
    self.down = nnx.Linear(ffn, hidden, use_bias=False, dtype=dtype,
                           rngs=rngs)

  def __call__(self, x):
    return self.down(swiglu(self.gate_up(x)))


class DeepSeekMoE(nnx.Module):
  """DeepSeek-V3's MoE layer over the EP axis of `buffer`.

  Call it on `[N, H]` tokens sharded over the EP axis (N = R*T); it returns
  `[N, H]` in `cfg.dtype`, sharded the same way, and keeps the gate's load
  (`load`) and the rows the capacity dropped (`dropped_rows`).
  """

  def __init__(self, buffer: jax_ep.Buffer, cfg: MoEConfig, *,
               rngs: nnx.Rngs):
    E, H, F = cfg.gate.num_experts, cfg.hidden, cfg.expert_ffn
    if E % buffer.num_ranks:
      raise ValueError(f"DeepSeekMoE: the gate's num_experts ({E}) must be a "
                       f"multiple of the EP size ({buffer.num_ranks})")
    self.buffer = buffer
    self.cfg = cfg
    ep = P(buffer.axis_name, None, None)
    init = nnx.initializers.normal(stddev=1.0)
    self.gate_weight = nnx.Param(init(rngs.params(), (H, E)) / math.sqrt(H))
    self.gate_bias = GateBias(jnp.zeros((E,), jnp.float32))
    self.w_gate_up = nnx.Param(
        init(rngs.params(), (E, H, 2 * F)) / math.sqrt(H), out_sharding=ep)
    self.w_down = nnx.Param(
        init(rngs.params(), (E, F, H)) / math.sqrt(F), out_sharding=ep)
    self.shared = (SwiGLU(H, cfg.shared_ffn, dtype=jnp.dtype(cfg.dtype),
                          rngs=rngs) if cfg.shared_ffn else None)
    self.load = ExpertLoad(jnp.zeros((E,), jnp.int32))
    self.dropped_rows = DroppedRows(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, axis = self.cfg, self.buffer.axis_name
    x = x.astype(cfg.dtype)

    def per_rank(x, gate_weight, gate_bias, w_gate_up, w_down):
      idx, weights = dsv3_gate.gate(x, gate_weight, gate_bias, cfg.gate)
      out, dropped = routed_experts(self.buffer, cfg, x, idx, weights,
                                    w_gate_up, w_down)
      load = dsv3_gate.expert_load(idx, cfg.gate.num_experts)
      return out, lax.psum(load, axis), lax.psum(dropped, axis)

    out, load, dropped = jax.shard_map(
        per_rank, mesh=self.buffer.mesh,
        in_specs=(P(axis, None), P(), P(), P(axis, None, None),
                  P(axis, None, None)),
        out_specs=(P(axis, None), P(), P()),
    )(x, self.gate_weight[...], self.gate_bias[...], self.w_gate_up[...],
      self.w_down[...])
    self.load[...] = load
    self.dropped_rows[...] = dropped
    if self.shared is not None:
      out = out + self.shared(x)
    return out

  def rebalance(self) -> None:
    """The bias update after a step, from the last call's load."""
    self.gate_bias[...] = dsv3_gate.update_bias(
        self.gate_bias[...], self.load[...], self.cfg.bias_rate)
