"""Greedy decoding of a small MoE transformer on jax_ep's low-latency ops.

    python examples/moe/decode.py                          # CPU: reference
    python -m jax_ep.launch -n 2 -- python examples/moe/decode.py

A static batch of `batch_per_rank` sequences per EP rank (DeepEP's decode
shape: 128 tokens per rank per step) decodes `new_tokens` tokens after a
prompt, one token per sequence per step, with a KV cache. Each layer is
[RMSNorm, causal attention, residual, RMSNorm, MoE, residual]; the MoE sends
each token to its top-k experts with `low_latency_dispatch` and brings the
weighted outputs back with `low_latency_combine`. With hooks
(`--hooks true`, the default) each op returns after its send half, the
shared expert runs between send and receive, then the hook receives, as a
server overlaps its work with the transfer. The output tokens do not depend
on the hooks.

On GPUs the low-latency kernels need one process per GPU and the Buffer's
NVSHMEM heap (`num_ll_bytes`); elsewhere the reference backend runs. The
script prints the per-step latency (after the first, compiling, step) and
tokens/s; `--metrics_out` writes them as JSON, with the sha256 of the first
process's sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import time

try:
  import jax_ep
except ModuleNotFoundError:  # a checkout that was not pip-installed
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  import jax_ep
import jax_ep.launch

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
  """Sizes of the model and the decode run.

  Attributes:
    vocab: tokens of the vocabulary.
    hidden: H, a multiple of 128 with fp8 dispatch.
    num_layers, num_heads: the transformer's layers and attention heads.
    num_experts, topk, ffn: routed experts (E, a multiple of the EP size),
      experts per token, their hidden size.
    shared_ffn: the shared expert's hidden size (it runs between the
      dispatch's send and receive).
    batch_per_rank: sequences per EP rank (tokens per rank per step).
    prompt_len, new_tokens: prompt tokens, then tokens decoded greedily.
    use_fp8: dispatch fp8 rows (the low-latency kernels' cast).
    hooks: split each low-latency op into send and receive.
    seed: seed of the parameters and the prompts.
  """

  vocab: int = 512
  hidden: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_experts: int = 16
  topk: int = 2
  ffn: int = 256
  shared_ffn: int = 256
  batch_per_rank: int = 128
  prompt_len: int = 8
  new_tokens: int = 16
  use_fp8: bool = True
  hooks: bool = True
  seed: int = 0

  @property
  def max_len(self) -> int:
    return self.prompt_len + self.new_tokens


_LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "router", "shared_in",
                  "shared_out", "w_in", "w_out")


def param_specs(axis: str) -> dict:
  """The routed experts sharded over the EP axis (rank r holds experts
  [r*L, (r+1)*L)), the rest replicated; layer weights stacked by layer."""
  layers = {name: P(None, axis) if name.startswith("w_") else P()
            for name in _LAYER_WEIGHTS}
  return {"embed": P(), "head": P(), "layers": layers}


def init_params(cfg: DecodeConfig, mesh) -> dict:
  """Random parameters, bf16 but the router (f32)."""
  keys = iter(jax.random.split(jax.random.key(cfg.seed), 16))
  H, F, E, S = cfg.hidden, cfg.ffn, cfg.num_experts, cfg.shared_ffn

  def normal(shape, fan_in, dtype=jnp.bfloat16):
    return (jax.random.normal(next(keys), shape) / np.sqrt(fan_in)).astype(
        dtype)

  n = cfg.num_layers
  layers = {"wq": normal((n, H, H), H), "wk": normal((n, H, H), H),
            "wv": normal((n, H, H), H), "wo": normal((n, H, H), H),
            "router": normal((n, H, E), H, jnp.float32),
            "shared_in": normal((n, H, S), H),
            "shared_out": normal((n, S, H), S),
            "w_in": normal((n, E, H, F), H), "w_out": normal((n, E, F, H), F)}
  params = {"embed": normal((cfg.vocab, H), 1.0),
            "head": normal((H, cfg.vocab), H), "layers": layers}
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                      params, param_specs("ep"))


def _norm(x):
  x = x.astype(jnp.float32)
  return (x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)).astype(
      jnp.bfloat16)


def attention(x, k_cache, v_cache, pos, wq, wk, wv, wo, num_heads):
  """Causal attention of this step's tokens `x[B, H]` at position `pos` over
  the cache; returns `(out[B, H], k_cache, v_cache)` with this step's keys
  and values written at `pos`."""
  B, H = x.shape
  q, k, v = (jnp.dot(x, w).reshape(B, num_heads, -1) for w in (wq, wk, wv))
  k_cache = jax.lax.dynamic_update_slice(k_cache, k[:, None], (0, pos, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v[:, None], (0, pos, 0, 0))
  scores = jnp.einsum("bnd,bsnd->bns", q, k_cache,
                      preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(H // num_heads)
  seen = jnp.arange(k_cache.shape[1]) <= pos
  probs = jax.nn.softmax(jnp.where(seen, scores, -jnp.inf), -1)
  out = jnp.einsum("bns,bsnd->bnd", probs.astype(jnp.bfloat16), v_cache)
  return jnp.dot(out.reshape(B, H), wo), k_cache, v_cache


def moe(buffer, cfg: DecodeConfig, x, router, shared_in, shared_out, w_in,
        w_out):
  """The MoE on one rank: `x[B, H]` bf16 -> routed + shared, bf16."""
  probs = jax.nn.softmax(jnp.dot(x.astype(jnp.float32), router), -1)
  weights, idx = jax.lax.top_k(probs, cfg.topk)
  weights = weights / weights.sum(-1, keepdims=True)
  idx = idx.astype(jnp.int32)
  sent = jax_ep.low_latency_dispatch(
      buffer, x, idx, num_max_dispatch_tokens_per_rank=cfg.batch_per_rank,
      num_experts=cfg.num_experts, use_fp8=cfg.use_fp8,
      return_recv_hook=cfg.hooks)
  # The shared expert runs while the rows travel (between the hook's halves).
  shared = jnp.dot(jax.nn.gelu(jnp.dot(x, shared_in)), shared_out)
  d = sent(shared) if cfg.hooks else sent
  rows = d.x
  if cfg.use_fp8:
    L, S, H = rows.shape
    rows = jax_ep.per_token_cast_back(rows.reshape(L * S, H),
                                      d.scales.reshape(L * S, -1)).reshape(
                                          L, S, H).astype(jnp.bfloat16)
  h = jax.nn.gelu(jnp.einsum("lsh,lhf->lsf", rows, w_in))
  y = jnp.einsum("lsf,lfh->lsh", h, w_out).astype(jnp.bfloat16)
  out = jax_ep.low_latency_combine(buffer, y, idx, weights, d.handle,
                                   return_recv_hook=cfg.hooks)
  routed = out() if cfg.hooks else out
  return routed + shared


def make_step(buffer, cfg: DecodeConfig):
  """jit(shard_map): `(params, caches, tokens[N], pos) -> (next tokens[N],
  caches)`, N = R * batch_per_rank sharded over "ep"."""
  axis = buffer.axis_name

  def per_rank(params, caches, tokens, pos):
    x = params["embed"][tokens]
    k_caches, v_caches = caches
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      layer = jax.tree.map(lambda a, i=i: a[i], params["layers"])
      a, k, v = attention(_norm(x), k_caches[i], v_caches[i], pos,
                          layer["wq"], layer["wk"], layer["wv"], layer["wo"],
                          cfg.num_heads)
      new_k.append(k)
      new_v.append(v)
      x = x + a
      x = x + moe(buffer, cfg, _norm(x), layer["router"], layer["shared_in"],
                  layer["shared_out"], layer["w_in"], layer["w_out"])
    logits = jnp.dot(_norm(x), params["head"],
                     preferred_element_type=jnp.float32)
    return (jnp.argmax(logits, -1).astype(jnp.int32),
            (jnp.stack(new_k), jnp.stack(new_v)))

  cache_spec = P(None, axis)
  return jax.jit(jax.shard_map(
      per_rank, mesh=buffer.mesh,
      in_specs=(param_specs(axis), (cache_spec, cache_spec), P(axis), P()),
      out_specs=(P(axis), (cache_spec, cache_spec))), donate_argnums=(1,))


def decode(cfg: DecodeConfig, buffer, log=print) -> dict:
  """Feeds each sequence's prompt, then decodes `new_tokens` greedily.
  Returns this process's sequences (`tokens`, numpy `[n, max_len]`) and
  the timings."""
  mesh = buffer.mesh
  ranks = buffer.num_ranks
  N = ranks * cfg.batch_per_rank
  params = init_params(cfg, mesh)
  cache_shape = (cfg.num_layers, N, cfg.max_len, cfg.num_heads,
                 cfg.hidden // cfg.num_heads)
  caches = tuple(jax.device_put(jnp.zeros(cache_shape, jnp.bfloat16),
                                NamedSharding(mesh, P(None, "ep")))
                 for _ in range(2))
  prompts = np.random.default_rng(cfg.seed).integers(
      0, cfg.vocab, (N, cfg.prompt_len), dtype=np.int32)
  sharding = NamedSharding(mesh, P("ep"))
  prompt = lambda pos: jax.make_array_from_callback(  # noqa: E731
      (N,), sharding, lambda index: prompts[:, pos][index])
  step = make_step(buffer, cfg)
  tokens = [prompt(0)]
  times = []
  for pos in range(cfg.max_len - 1):
    start = time.perf_counter()
    nxt, caches = step(params, caches, tokens[-1], jnp.int32(pos))
    nxt.block_until_ready()
    times.append(time.perf_counter() - start)
    tokens.append(prompt(pos + 1) if pos + 1 < cfg.prompt_len else nxt)
  # This process's sequences (all of them with one process).
  out = np.stack([np.concatenate([np.asarray(s.data)
                                  for s in t.addressable_shards])
                  for t in tokens], 1)
  step_ms = 1e3 * float(np.median(times[1:])) if len(times) > 1 else None
  metrics = dict(step_ms=step_ms, compile_s=times[0],
                 tokens_sha256=hashlib.sha256(out.tobytes()).hexdigest(),
                 tokens_per_s=N / (step_ms / 1e3) if step_ms else None,
                 ranks=ranks, backend=buffer.backend, hooks=cfg.hooks,
                 use_fp8=cfg.use_fp8, config=dataclasses.asdict(cfg))
  log(f"decoded {cfg.new_tokens} tokens for {N} sequences on {ranks} "
      f"rank(s), backend {buffer.backend!r}: first step {times[0]:.1f} s "
      f"(compiles), then {step_ms:.2f} ms per step (median), "
      f"{metrics['tokens_per_s']:,.0f} tokens/s")
  return dict(tokens=out, **metrics)


def open_buffer(cfg: DecodeConfig, backend: str = "auto"):
  """A Buffer over every device; the NVSHMEM heap on GPUs."""
  mesh = jax.make_mesh((jax.device_count(),), ("ep",))
  gpu = jax.devices()[0].platform == "gpu" and backend != "reference"
  ll = (jax_ep.ll_buffer_bytes(cfg.batch_per_rank, cfg.hidden,
                               cfg.num_experts) if gpu else None)
  return jax_ep.Buffer(mesh, "ep", backend=backend, num_ll_bytes=ll)


def main(argv=None) -> int:
  jax_ep.launch.initialize()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backend", choices=("auto", "cuda", "reference"),
                      default="auto")
  parser.add_argument("--metrics_out", type=pathlib.Path, default=None)
  for field in dataclasses.fields(DecodeConfig):
    kind = {"int": int, "bool": lambda s: s.lower() in ("1", "true", "yes")}
    parser.add_argument(f"--{field.name}", type=kind[field.type],
                        default=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  fields = {f.name for f in dataclasses.fields(DecodeConfig)}
  cfg = DecodeConfig(**{k: v for k, v in vars(args).items() if k in fields})
  lead = jax.process_index() == 0
  buffer = open_buffer(cfg, args.backend)
  with jax.set_mesh(buffer.mesh):
    result = decode(cfg, buffer, log=print if lead else (lambda _: None))
  if lead and args.metrics_out is not None:
    result.pop("tokens")
    args.metrics_out.write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
