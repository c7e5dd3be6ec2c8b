"""A dense model of jax_ep routing, written for the tests from docs/contract.md.

Plain numpy loops over ranks, tokens and top-k slots, with no vectorised
tricks and nothing taken from `jax_ep`: every function takes the *global*
inputs, split by source rank (`x[R, T, H]`, `topk_idx[R, T, K]`,
`topk_weights[R, T, K]`), and returns, stacked over ranks, exactly what each
rank must see, padding included. The tests compare every element of jax_ep's
outputs with these.

Conventions (the contract of docs/contract.md, spelled out where it leaves a
choice):
  * Layout: `num_tokens_per_node[n]` counts the tokens with an expert on any
    rank of node n (ranks `n*G .. n*G + G-1`), each once.
  * Expert `e` is valid when `0 <= e < E`; it lives on rank `e // L`
    (`L = E / R`) as local expert `e - rank * L`. `-1` and every other id
    outside `[0, E)` select nothing.
  * Normal dispatch: rank r receives one row per (source s, token t) with at
    least one expert on r, ordered by s then t; the first `capacity` rows are
    kept, the rest dropped (still counted). Padding: zero rows, -1 ids, 0
    weights, `src_index = R*T`, `recv_row = capacity`.
  * Combine: `out[t] = round(((c_0 + c_1) + ... + c_{R-1}) + bias)` in fp32,
    in rank order, where `c_r = y_r[row of t]` for a rank r that kept t and
    +0 for the others (the sum starts at c_0, not at a +0: at R = 1 a -0
    stays -0); a tuple of biases is summed first (`b0 + b1`) and then
    added. Rounded once to y's dtype. Across nodes (G = ranks_per_node <
    R): each node's ranks summed so, rounded to y's dtype, then the node
    partials summed so in node order, the bias added, rounded once.
  * LL dispatch: expert l of rank r gets, in slots `[0, count)`, one row per
    (s, t) that lists `r*L + l` (once, even if listed twice), ordered by s
    then t; slots past the count are zero. Slot ids: `s * Tmax + t`.
  * LL combine: per owner rank r (rank order), `partial_r = fp32 sum over k in
    k order of w[t, k] * y[row of (t, k)]` for the k whose expert is on r;
    `out[t] = round_bf16(0 + partial_r0 + partial_r1 + ...)`.
  * FP8: per token per 128 channels, `amax = max|x|` floored at 1e-4,
    `scale = amax * f32(1/448)` (a product, as docs/contract.md and fp8.py
    specify: what XLA computes for a division by a constant anyway, and
    DeepEP's `amax * kFP8AmaxInv`), optionally rounded
    up to a power of two,
    `q = e4m3(x * (1 / scale))` (round to nearest even); UE8M0 packs the
    biased exponents of four consecutive scales little-endian into an int32.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F32 = np.float32
FP8_MAX = F32(448.0)
FP8_MAX_INV = F32(1.0) / FP8_MAX  # f32(1/448), rounded once
AMAX_FLOOR = F32(1e-4)
GROUP = 128


def owner(e: int, num_experts: int, num_ranks: int) -> int | None:
  """Rank holding expert e, or None when e selects nothing."""
  if 0 <= e < num_experts:
    return e // (num_experts // num_ranks)
  return None


def local_ids(experts, rank: int, num_experts: int, num_ranks: int) -> list[int]:
  """Per top-k slot: the local id on `rank` of the chosen expert, else -1."""
  num_local = num_experts // num_ranks
  return [int(e) - rank * num_local
          if owner(int(e), num_experts, num_ranks) == rank else -1
          for e in experts]


# ---------------------------------------------------------------- layout


@dataclasses.dataclass
class Layout:
  num_tokens_per_rank: np.ndarray    # int32[R(src), R]
  num_tokens_per_expert: np.ndarray  # int32[R(src), E]
  is_token_in_rank: np.ndarray       # bool[R(src), T, R]
  num_invalid: np.ndarray            # int32[R(src)]
  num_tokens_per_node: np.ndarray    # int32[R(src), N]


def layout(topk_idx: np.ndarray, num_experts: int,
           ranks_per_node: int | None = None) -> Layout:
  num_ranks, num_tokens, num_topk = topk_idx.shape
  per_node = ranks_per_node or num_ranks
  num_nodes = num_ranks // per_node
  node_count = np.zeros((num_ranks, num_nodes), np.int32)
  per_rank = np.zeros((num_ranks, num_ranks), np.int32)
  per_expert = np.zeros((num_ranks, num_experts), np.int32)
  in_rank = np.zeros((num_ranks, num_tokens, num_ranks), bool)
  invalid = np.zeros(num_ranks, np.int32)
  for s in range(num_ranks):
    for t in range(num_tokens):
      for k in range(num_topk):
        e = int(topk_idx[s, t, k])
        r = owner(e, num_experts, num_ranks)
        if r is None:
          invalid[s] += e != -1
          continue
        per_expert[s, e] += 1
        in_rank[s, t, r] = True
    for r in range(num_ranks):
      per_rank[s, r] = sum(in_rank[s, t, r] for t in range(num_tokens))
    for n in range(num_nodes):
      node_count[s, n] = sum(
          any(in_rank[s, t, n * per_node:(n + 1) * per_node])
          for t in range(num_tokens))
  return Layout(per_rank, per_expert, in_rank, invalid, node_count)


# ---------------------------------------------------------------- normal


@dataclasses.dataclass
class Dispatch:
  rows: list[np.ndarray]          # per input array: [R, M, C]
  topk_idx: np.ndarray            # int32[R, M, K]
  topk_weights: np.ndarray | None # f32[R, M, K]
  num_tokens: np.ndarray          # int32[R], true count (may exceed M)
  num_tokens_per_expert: np.ndarray  # int32[R, L], aligned
  src_index: np.ndarray           # int32[R, M]: s*T + t, R*T for padding
  recv_row: np.ndarray            # int32[R(dest), R(src), T]: row, or M
  capacity: int


def dispatch(rows, topk_idx, topk_weights=None, *, num_experts: int,
             capacity: int | None = None, expert_alignment: int = 1) -> Dispatch:
  """`rows`: list of [R, T, C] arrays sent together (x, or fp8 q and scales)."""
  num_ranks, num_tokens, num_topk = topk_idx.shape
  num_local = num_experts // num_ranks
  m = num_ranks * num_tokens if capacity is None else capacity
  out_rows = [np.zeros((num_ranks, m, a.shape[-1]), a.dtype) for a in rows]
  out_idx = np.full((num_ranks, m, num_topk), -1, np.int32)
  out_w = None if topk_weights is None else np.zeros((num_ranks, m, num_topk),
                                                     F32)
  count = np.zeros(num_ranks, np.int32)
  per_expert = np.zeros((num_ranks, num_local), np.int32)
  src_index = np.full((num_ranks, m), num_ranks * num_tokens, np.int32)
  recv_row = np.full((num_ranks, num_ranks, num_tokens), m, np.int32)
  for r in range(num_ranks):
    n = 0
    for s in range(num_ranks):
      for t in range(num_tokens):
        local = local_ids(topk_idx[s, t], r, num_experts, num_ranks)
        if all(l < 0 for l in local):
          continue
        for l in local:
          if l >= 0:
            per_expert[r, l] += 1
        if n < m:
          for a, out in zip(rows, out_rows):
            out[r, n] = a[s, t]
          for k, l in enumerate(local):
            out_idx[r, n, k] = l
            if out_w is not None and l >= 0:
              out_w[r, n, k] = topk_weights[s, t, k]
          src_index[r, n] = s * num_tokens + t
          recv_row[r, s, t] = n
        n += 1
    count[r] = n
  a = expert_alignment
  per_expert = ((per_expert + a - 1) // a * a).astype(np.int32)
  return Dispatch(out_rows, out_idx, out_w, count, per_expert, src_index,
                  recv_row, m)


def combine(y: np.ndarray, routes: Dispatch, biases=(),
            ranks_per_node: int | None = None) -> np.ndarray:
  """y[R, M, C] (any float dtype) -> out[R(src), T, C] in y's dtype;
  `ranks_per_node` G < R sums node by node."""
  num_ranks, _, num_tokens = routes.recv_row.shape
  per_node = ranks_per_node or num_ranks
  out = np.zeros((num_ranks, num_tokens, y.shape[-1]), y.dtype)
  bias = None
  for b in biases:
    b = np.asarray(b).reshape(num_ranks, num_tokens, -1).astype(F32)
    bias = b if bias is None else (bias + b).astype(F32)
  for s in range(num_ranks):
    for t in range(num_tokens):
      acc = None
      for node in range(num_ranks // per_node):
        partial = None
        for r in range(node * per_node, (node + 1) * per_node):
          row = routes.recv_row[r, s, t]
          term = (y[r, row].astype(F32) if row < routes.capacity else
                  np.zeros(y.shape[-1], F32))
          partial = term if partial is None else (partial + term).astype(F32)
        if per_node < num_ranks:  # the partial crosses the network
          partial = partial.astype(y.dtype).astype(F32)
        acc = partial if acc is None else (acc + partial).astype(F32)
      if bias is not None:
        acc = (acc + bias[s, t]).astype(F32)
      out[s, t] = acc.astype(y.dtype)
  return out


# ---------------------------------------------------------------- fp8


def _pow2_ceil(scale: np.ndarray) -> np.ndarray:
  mantissa, exponent = np.frexp(scale.astype(F32))
  exponent = np.where(mantissa == 0.5, exponent - 1, exponent)
  return np.ldexp(F32(1.0), exponent).astype(F32)


def ue8m0_pack(scale: np.ndarray) -> np.ndarray:
  """Power-of-two f32 scales [..., G] -> int32 [..., G/4], byte i = group i."""
  mantissa, exponent = np.frexp(scale.astype(F32))
  assert np.all(mantissa == 0.5), "UE8M0 needs power-of-two scales"
  biased = (exponent.astype(np.int64) - 1 + 127).reshape(
      *scale.shape[:-1], -1, 4)
  word = np.zeros(biased.shape[:-1], np.uint64)
  for i in range(4):
    word |= biased[..., i].astype(np.uint64) << np.uint64(8 * i)
  return word.astype(np.uint32).view(np.int32)


def ue8m0_unpack(packed: np.ndarray) -> np.ndarray:
  word = packed.view(np.uint32).astype(np.int64)
  groups = [(word >> (8 * i)) & 0xFF for i in range(4)]
  biased = np.stack(groups, axis=-1).reshape(*packed.shape[:-1], -1)
  return np.ldexp(F32(1.0), (biased - 127).astype(np.int32)).astype(F32)


def per_token_cast_to_fp8(x, *, round_scale=False, use_ue8m0=False):
  """x[..., H] -> (e4m3[..., H], f32 scales[..., H/128] or int32[..., H/512])."""
  groups = np.asarray(x).astype(F32).reshape(*x.shape[:-1], -1, GROUP)
  amax = np.maximum(np.abs(groups).max(-1), AMAX_FLOOR).astype(F32)
  scale = (amax * FP8_MAX_INV).astype(F32)
  if round_scale or use_ue8m0:
    scale = _pow2_ceil(scale)
  inverse = (F32(1.0) / scale).astype(F32)
  q = (groups * inverse[..., None]).astype(F32).astype(E4M3).reshape(x.shape)
  return q, (ue8m0_pack(scale) if use_ue8m0 else scale)


def per_token_cast_back(q, scales, dtype=BF16):
  if scales.dtype == np.int32:
    scales = ue8m0_unpack(scales)
  groups = q.astype(F32).reshape(*q.shape[:-1], -1, GROUP)
  return (groups * scales[..., None]).astype(F32).reshape(q.shape).astype(dtype)


# ---------------------------------------------------------------- low latency


@dataclasses.dataclass
class LowLatencyDispatch:
  rows: list[np.ndarray]  # [R, L, R*Tmax, C] per array (x, or q and scales)
  count: np.ndarray       # int32[R, L]
  src_index: np.ndarray   # int32[R, L, R*Tmax]: s*Tmax + t, R*Tmax if empty
  slot: np.ndarray        # int32[R, L, R*Tmax] by s*Tmax + t: slot, or R*Tmax
  max_tokens: int


def low_latency_dispatch(x, topk_idx, *, num_experts: int, max_tokens: int,
                         use_fp8=False, round_scale=False,
                         use_ue8m0=False) -> LowLatencyDispatch:
  num_ranks, num_tokens, _ = topk_idx.shape
  num_local = num_experts // num_ranks
  slots = num_ranks * max_tokens
  if use_fp8:
    rows = list(per_token_cast_to_fp8(x, round_scale=round_scale,
                                      use_ue8m0=use_ue8m0))
  else:
    rows = [np.asarray(x)]
  out = [np.zeros((num_ranks, num_local, slots, a.shape[-1]), a.dtype)
         for a in rows]
  count = np.zeros((num_ranks, num_local), np.int32)
  src_index = np.full((num_ranks, num_local, slots), slots, np.int32)
  slot = np.full((num_ranks, num_local, slots), slots, np.int32)
  for r in range(num_ranks):
    for l in range(num_local):
      expert = r * num_local + l
      n = 0
      for s in range(num_ranks):
        for t in range(num_tokens):
          if expert not in [int(e) for e in topk_idx[s, t]]:
            continue
          for a, o in zip(rows, out):
            o[r, l, n] = a[s, t]
          src_index[r, l, n] = s * max_tokens + t
          slot[r, l, s * max_tokens + t] = n
          n += 1
      count[r, l] = n
  return LowLatencyDispatch(out, count, src_index, slot, max_tokens)


def low_latency_combine(y, topk_idx, topk_weights,
                        routes: LowLatencyDispatch) -> np.ndarray:
  """y[R, L, R*Tmax, H] -> bf16 out[R, T, H]."""
  return low_latency_combine_f32(y, topk_idx, topk_weights, routes)[0].astype(
      BF16)


def low_latency_combine_f32(y, topk_idx, topk_weights,
                            routes: LowLatencyDispatch):
  """The fp32 sums before the bf16 rounding, and `sum |w * y|` per element.

  Returns `(total f32[R, T, H], abs_sum f64[R, T, H])`; `abs_sum` bounds how
  far another fp32 evaluation of the same sum (e.g. with fused multiply-adds)
  may land: within about `(K + 1) * 2^-24 * abs_sum`.
  """
  num_ranks, num_tokens, num_topk = topk_idx.shape
  num_local = y.shape[1]
  num_experts = num_ranks * num_local
  total = np.zeros((num_ranks, num_tokens, y.shape[-1]), F32)
  abs_sum = np.zeros(total.shape, np.float64)
  for s in range(num_ranks):
    for t in range(num_tokens):
      acc = np.zeros(y.shape[-1], F32)
      for r in range(num_ranks):
        partial = np.zeros(y.shape[-1], F32)
        for k in range(num_topk):
          e = int(topk_idx[s, t, k])
          if owner(e, num_experts, num_ranks) != r:
            continue
          l = e - r * num_local
          row = routes.slot[r, l, s * routes.max_tokens + t]
          term = (F32(topk_weights[s, t, k]) * y[r, l, row].astype(F32))
          partial = (partial + term.astype(F32)).astype(F32)
          abs_sum[s, t] += np.abs(term.astype(np.float64))
        acc = (acc + partial).astype(F32)
      total[s, t] = acc
  return total, abs_sum


def low_latency_combine_vjp(g, y, topk_idx, topk_weights,
                            routes: LowLatencyDispatch):
  """The cotangents of `low_latency_combine(y, topk_idx, topk_weights)` at
  `g[R, T, H]`: `d_y[r, l, slot of t] = bf16(g[t] * w_sum)`, `w_sum` the fp32
  sum in k order of t's weights for expert `r*L + l` (a repeated expert adds
  each of its weights), 0 in empty slots; `d_w[t, k] = <g[t], y[slot of
  (t, k)]>`.

  Returns `(d_y bf16[R, L, R*Tmax, H], d_w f64[R, T, K], d_w_bound
  f64[R, T, K])`: an fp32 evaluation of each dot of H terms lies within
  `d_w_bound = H * 2^-24 * sum |g * y|` of `d_w`. Where k selects nothing
  both are 0: that d_w is 0 exactly.
  """
  num_ranks, num_local, _, hidden = y.shape
  d_y = np.zeros(y.shape, BF16)
  d_w = np.zeros(topk_weights.shape, np.float64)
  abs_sum = np.zeros(topk_weights.shape, np.float64)
  for r, l in np.ndindex(num_ranks, num_local):
    for n in range(routes.count[r, l]):
      s, t = divmod(int(routes.src_index[r, l, n]), routes.max_tokens)
      w_sum = F32(0)
      for k in range(topk_idx.shape[-1]):
        if topk_idx[s, t, k] == r * num_local + l:
          w_sum = F32(w_sum + topk_weights[s, t, k])
          prod = g[s, t].astype(np.float64) * y[r, l, n].astype(np.float64)
          d_w[s, t, k] = prod.sum()
          abs_sum[s, t, k] = np.abs(prod).sum()
      d_y[r, l, n] = (g[s, t].astype(F32) * w_sum).astype(BF16)
  return d_y, d_w, hidden * 2.0**-24 * abs_sum


def first_selections(topk_idx: np.ndarray) -> np.ndarray:
  """f32 mask: 1 where slot k is the first to list its expert, else 0."""
  mask = np.zeros(topk_idx.shape, F32)
  for index in np.ndindex(*topk_idx.shape[:-1]):
    seen = set()
    for k, e in enumerate(topk_idx[index]):
      if int(e) not in seen:
        mask[index + (k,)] = 1.0
        seen.add(int(e))
  return mask
