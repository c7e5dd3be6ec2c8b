"""Small MoE layers for the gradient tests: with jax_ep and dense (no EP).

The dense MoE evaluates every token with its experts directly. The EP MoE
routes with the same router (softmax over `x @ w_router` at top-k ids fixed
from the dense logits), dispatches, runs each local expert on the received
rows, weights them with the received top-k weights and combines.
"""

import jax
import jax.numpy as jnp

import jax_ep

NUM_EXPERTS = 8
TOKENS = 8
HIDDEN = 16


def router(x, w_router, topk_idx):
  """Softmax gates at the chosen experts. The logits are an elementwise
  product and a sum, whose bits do not depend on the number of rows (a
  matmul's may), so both MoEs see the same gates."""
  logits = (x[:, :, None] * w_router[None]).sum(1)
  return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), topk_idx, axis=-1)


def choose_experts(x, w_router, k):
  logits = (x[:, :, None] * w_router[None]).sum(1)
  return jax.lax.top_k(logits, k)[1].astype(jnp.int32)


# ---------------------------------------------------------------- normal MoE


def mlp(x, w1, w2):
  return jnp.tanh(x @ w1) @ w2


def dense_moe(x, w_router, w1, w2, topk_idx):
  gates = router(x, w_router, topk_idx)
  out = jnp.zeros_like(x)
  for k in range(topk_idx.shape[1]):
    e = topk_idx[:, k]
    h = jax.vmap(lambda xt, a, b: mlp(xt[None], a, b)[0])(x, w1[e], w2[e])
    out = out + gates[:, k:k + 1] * h
  return out


def ep_moe(buffer, x, w_router, w1, w2, topk_idx):
  """Per rank: w1 [L, H, F] and w2 [L, F, H] hold the local experts."""
  gates = router(x, w_router, topk_idx)
  d = jax_ep.dispatch(buffer, x, topk_idx, gates, num_experts=NUM_EXPERTS)
  y = jnp.zeros_like(d.x)
  for l in range(w1.shape[0]):
    coef = jnp.where(d.topk_idx == l, d.topk_weights, 0.0).sum(-1)
    y = y + coef[:, None] * mlp(d.x, w1[l], w2[l])
  return jax_ep.combine(buffer, y, d.handle)


# ---------------------------------------------------------------- LL MoE


def diag_expert(x, a, b, c):
  """A per-channel MLP: elementwise ops only, so the EP and dense MoEs
  compute every expert output with the same bits, and the bf16 roundings the
  LL path imposes (rows in, expert outputs, combined output) fall on the same
  values in both."""
  return jax.nn.relu(x * a + b) * c


def dense_ll_moe(x, w_router, a, b, c, topk_idx):
  """Dense mirror of the LL path's roundings: x is sent as bf16 (one rounding
  of each copy's cotangent, one of their fp32 sum), expert outputs are bf16,
  the output is bf16."""
  gates = router(x, w_router, topk_idx)
  xf = x.astype(jnp.bfloat16).astype(jnp.float32)
  out = jnp.zeros_like(x)
  for k in range(topk_idx.shape[1]):
    e = topk_idx[:, k]
    x_in = xf.astype(jnp.bfloat16).astype(jnp.float32)
    h = diag_expert(x_in, a[e], b[e], c[e])
    out = out + gates[:, k:k + 1] * h.astype(jnp.bfloat16).astype(jnp.float32)
  return out.astype(jnp.bfloat16).astype(jnp.float32)


def ep_ll_moe(buffer, x, w_router, a, b, c, topk_idx):
  gates = router(x, w_router, topk_idx)
  d = jax_ep.low_latency_dispatch(
      buffer, x.astype(jnp.bfloat16), topk_idx,
      num_max_dispatch_tokens_per_rank=x.shape[0] + 1,
      num_experts=NUM_EXPERTS, use_fp8=False)
  rows = d.x.astype(jnp.float32)  # [L, R*Tmax, H]
  h = diag_expert(rows, a[:, None], b[:, None], c[:, None])
  out = jax_ep.low_latency_combine(buffer, h.astype(jnp.bfloat16), topk_idx,
                                   gates, d.handle)
  return out.astype(jnp.float32)
