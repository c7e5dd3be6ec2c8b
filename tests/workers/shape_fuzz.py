"""Shape fuzzing of every op: each accepted input runs right, or is refused.

Draws shapes at random from everything the public ops accept, and some that
the contract refuses, runs them on a Buffer (the "cuda" backend's kernels on
GPUs, the reference on CPUs) and checks every output element, padding
included, against the dense model:

* "normal": `get_dispatch_layout`, a fresh `dispatch` (bf16, f16, f32 or fp8
  rows, every routing kind of `ep_testing.ROUTINGS`, with or without
  weights, capacity overflow, expert alignment), a cached dispatch of other
  rows, and a `combine` of random rows with the received weights and a bias:
  bit for bit.
* "low_latency": ll_worker's program (dispatch in every fp8 mode or bf16,
  hooks, zero_copy, zero_padding, then combine), checked as ll_worker checks
  it: bit for bit, the combine but for rounding ties.

A draw the contract refuses must raise ValueError or TypeError while tracing,
with a message that starts with the public op and says why (`refusals`
lists the reasons a draw may be refused for); every other draw must run and
match. Draw i of a family and seed depends on (seed, family, i) alone.

As a script, one process per rank (every process draws the same shapes),
one GPU each or several ranks per GPU (`--ranks-per-gpu`):

    python -m jax_ep.launch -n R [--ranks-per-gpu K] -- python \\
        tests/workers/shape_fuzz.py --seed S --draws D
        [--families normal,low_latency] [--only I] [--backend B]

prints one line per draw, then "worker i/R: fuzz <n> draws passed".
`--only I` replays draw I of each family; `--backend reference` runs the
reference in place of the kernels (to check this script without GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import sys

# Run as a script: tests/support first, where repo_paths puts the repository
# and the other test folders on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "support"))
import repo_paths  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import dense_model as dm
import intranode_worker
import jax_ep
import jax_ep.launch
import ll_worker
from ep_testing import BF16, FP8_MODES, ROUTINGS, assert_same, normal, routing

EP = "ep"
FAMILIES = ("normal", "low_latency")
# Row dtypes of the normal family ("fp8": e4m3 rows with f32 scales).
ROW_DTYPES = {"bf16": BF16, "f16": np.dtype(np.float16),
              "f32": np.dtype(np.float32), "fp8": dm.E4M3}
# The limits of the contract and of the kernels that draws probe, written
# here from the documentation, not imported: the tests state the contract.
MAX_TOKENS = 300
MAX_HIDDEN = 8192
MAX_TOPK = 32
NVL_MAX_EXPERTS = 1024  # intranode and layout kernels
LL_MAX_TOKENS = 1024  # Tmax of the low-latency kernels
LL_MAX_EXPERTS = 4096
LL_MAX_SLOTS = 8192  # R * Tmax
# What one draw may cost: elements of its largest global array, and steps
# of the dense model's Python loops. The CPU runs in `make test` (2 cores).
BUDGETS = {"reference": (1 << 22, 200_000), "cuda": (1 << 26, 1_000_000)}


@dataclasses.dataclass(frozen=True)
class Draw:
  """One random problem. `dtype` is a key of ROW_DTYPES (normal) or of
  FP8_MODES (low_latency)."""
  family: str
  num_ranks: int
  tokens: int
  hidden: int
  topk: int
  experts: int
  dtype: str
  routing: str = "distinct"  # normal: a kind of ep_testing.ROUTINGS
  weights: bool = True
  capacity: int | None = None
  alignment: int = 1
  bias: bool = False
  max_tokens: int = 0  # low_latency: Tmax
  skew: bool = False  # low_latency: most tokens on expert 0
  hooks: bool = False
  zero_copy: bool = False
  zero_padding: bool = True

  def ll_case(self) -> ll_worker.Case:
    return ll_worker.Case(self.tokens, self.hidden, self.topk, self.experts,
                          self.max_tokens, self.dtype, self.skew, self.hooks,
                          self.zero_copy, self.zero_padding)

  def name(self) -> str:
    if self.family == "low_latency":
      return f"low_latency R{self.num_ranks} {self.ll_case().name()}"
    return (f"normal R{self.num_ranks} T{self.tokens}-H{self.hidden}-"
            f"K{self.topk}-E{self.experts}-{self.dtype}-{self.routing}-"
            f"M{self.capacity}-a{self.alignment}"
            f"{'' if self.weights else '-no_weights'}"
            f"{'-bias' if self.bias else ''}")

  @property
  def capacity_rows(self) -> int:
    return self.capacity or self.num_ranks * self.tokens

  def cost(self) -> tuple[int, int]:
    """(elements of the largest global array, dense-model loop steps)."""
    r, t = self.num_ranks, self.tokens
    if self.family == "normal":
      return (r * self.capacity_rows * self.hidden, r * r * t * self.topk)
    return (self.experts * r * self.max_tokens * self.hidden,
            self.experts * r * t * self.topk)


def refusals(d: Draw, backend: str) -> list[str]:
  """Patterns of the reasons the ops must refuse `d` for on `backend` (the
  op reports the first it meets); empty when `d` must run."""
  reasons = []
  if d.topk > d.experts:
    reasons.append(r"topk_idx has K=\d+ columns")
  if d.family == "normal":
    if d.hidden * ROW_DTYPES[d.dtype].itemsize % 16:
      reasons.append(r"rows must be a multiple of 16 bytes")
    if backend == "cuda" and d.experts > NVL_MAX_EXPERTS:
      reasons.append(rf"num_experts <= {NVL_MAX_EXPERTS}")
    return reasons
  mode = FP8_MODES[d.dtype]
  if mode["use_fp8"]:
    group = 512 if mode.get("use_ue8m0") else 128
    if d.hidden % group:
      reasons.append(rf"hidden size must be a multiple of {group} for fp8")
  elif d.hidden * 2 % 16:
    reasons.append(r"rows must be a multiple of 16 bytes")
  if backend == "cuda":
    if d.max_tokens > LL_MAX_TOKENS:
      reasons.append(rf"num_max_dispatch_tokens_per_rank <= {LL_MAX_TOKENS}")
    if d.num_ranks * d.max_tokens > LL_MAX_SLOTS:
      reasons.append(rf"<= {LL_MAX_SLOTS}")
    if d.experts > LL_MAX_EXPERTS:
      reasons.append(rf"num_experts <= {LL_MAX_EXPERTS}")
  return reasons


def _log_int(rng, low: int, high: int) -> int:
  """An int in [low, high], log-uniformly: small and large sizes alike."""
  return min(high, int(math.exp(rng.uniform(math.log(low),
                                            math.log(high + 1)))))


def _multiple(rng, unit: int, high: int) -> int:
  return unit * int(rng.integers(1, high // unit + 1))


def _draw_once(rng, family: str, num_ranks: int, dtypes) -> Draw:
  # Low-latency tokens up to Tmax: past 512 a kernel block's threads take
  # the tokens in more than one pass.
  tokens = _log_int(rng, 1, MAX_TOKENS if family == "normal" else
                    LL_MAX_TOKENS)
  limit = NVL_MAX_EXPERTS if family == "normal" else LL_MAX_EXPERTS
  if rng.random() < 0.05:  # past the kernels' limit
    experts = num_ranks * -(-int(rng.integers(limit + 1, limit + 64))
                            // num_ranks)
  else:
    experts = num_ranks * _log_int(rng, 1, max(1, 300 // num_ranks))
  if experts < MAX_TOPK and rng.random() < 0.1:  # K > E: refused
    topk = int(rng.integers(experts + 1, MAX_TOPK + 1))
  else:
    high = min(MAX_TOPK, experts) if rng.random() < 0.5 else min(8, experts)
    topk = int(rng.integers(1, high + 1))
  if family == "normal":
    dtype = str(rng.choice(dtypes))
    if dtype == "fp8":
      hidden = _multiple(rng, 128, MAX_HIDDEN)
    else:
      unit = 16 // ROW_DTYPES[dtype].itemsize  # channels per 16 bytes
      hidden = _multiple(rng, unit, MAX_HIDDEN)
      if rng.random() < 0.1:  # rows of a multiple of 8 bytes only: refused
        hidden -= unit // 2
    capacity = (None if rng.random() < 0.5 else
                int(rng.integers(1, num_ranks * tokens + 9)))
    return Draw(family, num_ranks, tokens, hidden, topk, experts, dtype,
                routing=str(rng.choice(ROUTINGS)),
                weights=bool(rng.random() < 0.8), capacity=capacity,
                alignment=1 if rng.random() < 0.6 else int(
                    rng.integers(1, 129)),
                bias=bool(rng.random() < 0.5))
  dtype = str(rng.choice(list(FP8_MODES)))
  mode = FP8_MODES[dtype]
  unit = 8  # bf16 rows of 16 bytes
  if mode["use_fp8"]:
    unit = 512 if mode.get("use_ue8m0") and rng.random() < 0.8 else 128
    if rng.random() < 0.1:  # not a whole scale group: refused
      unit = 8
  hidden = _multiple(rng, unit, MAX_HIDDEN)
  max_tokens = tokens
  if rng.random() < 0.6:
    max_tokens = min(LL_MAX_TOKENS, tokens + _log_int(rng, 1, MAX_TOKENS))
  if rng.random() < 0.03:  # past the kernels' Tmax
    max_tokens = int(rng.integers(LL_MAX_TOKENS + 1, LL_MAX_TOKENS + 64))
  return Draw(family, num_ranks, tokens, hidden, topk, experts, dtype,
              max_tokens=max_tokens, skew=bool(rng.random() < 0.3),
              hooks=bool(rng.random() < 0.3),
              zero_copy=bool(rng.random() < 0.3),
              zero_padding=bool(rng.random() < 0.7))


def draw(seed: int, family: str, index: int, num_ranks: int, backend: str,
         shared_gpu: bool = False) -> Draw:
  """Draw `index` of `family`, redrawn until it fits the backend's budget
  (refused draws too, so that the budget does not favour them). Where ranks
  share a GPU no f16 rows are drawn: their combine falls back to the
  reference, whose collectives NCCL refuses there."""
  rng = np.random.default_rng([seed, FAMILIES.index(family), index])
  elements, steps = BUDGETS[backend]
  dtypes = ["bf16", "bf16", "fp8", "fp8", "f32", "f32" if shared_gpu else "f16"]
  while True:
    d = _draw_once(rng, family, num_ranks, dtypes)
    if d.cost()[0] <= elements and d.cost()[1] <= steps:
      return d


# ------------------------------------------------------------ normal family


def _normal_inputs(rng, d: Draw) -> dict[str, np.ndarray]:
  """Global inputs by rank ([R, ...]) of a normal draw."""
  r, t, h, k = d.num_ranks, d.tokens, d.hidden, d.topk
  inputs = {"idx": routing(rng, r, t, k, d.experts, d.routing)}
  for name in ("x", "x2"):
    if d.dtype == "fp8":
      q, s = dm.per_token_cast_to_fp8(normal(rng, (r, t, h)) * 10)
      inputs[name], inputs[f"{name}_scales"] = q, s
    else:
      inputs[name] = normal(rng, (r, t, h), ROW_DTYPES[d.dtype])
  inputs["w"] = rng.standard_normal((r, t, k)).astype(np.float32)
  inputs["y"] = normal(rng, (r, d.capacity_rows, h), _y_dtype(d))
  inputs["bias"] = normal(rng, (r, t, h))
  return inputs


def _y_dtype(d: Draw) -> np.dtype:
  return BF16 if d.dtype == "fp8" else ROW_DTYPES[d.dtype]


def _abstract_inputs(mesh: Mesh, d: Draw):
  """The program's arguments as shapes, split over the ranks, to trace it."""
  r, t, h, k = d.num_ranks, d.tokens, d.hidden, d.topk
  sharding = jax.sharding.NamedSharding(mesh, P(EP))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                   sharding=sharding)
  if d.family == "low_latency":
    slots = d.num_ranks * d.max_tokens
    return (spec((r * t, h), BF16), spec((r * t, k), np.int32),
            spec((r * t, k), np.float32),
            spec((d.experts, slots, h), BF16))
  rows = {"x": spec((r * t, h), ROW_DTYPES[d.dtype])}
  if d.dtype == "fp8":
    rows["x_scales"] = spec((r * t, h // dm.GROUP), np.float32)
  return ({"idx": spec((r * t, k), np.int32), **rows,
           **{f"x2{n[1:]}": a for n, a in rows.items()},
           "w": spec((r * t, k), np.float32),
           "y": spec((r * d.capacity_rows, h), _y_dtype(d)),
           "bias": spec((r * t, h), np.float32)},)


def _normal_program(mesh: Mesh, buffer: jax_ep.Buffer, d: Draw):
  """jit(shard_map): the draw's layout, dispatch, cached dispatch and
  combine; global inputs [R*T, ...] -> dict of outputs, each [R, ...]."""

  def per_rank(a):
    rows = (a["x"], a["x_scales"]) if d.dtype == "fp8" else a["x"]
    rows2 = (a["x2"], a["x2_scales"]) if d.dtype == "fp8" else a["x2"]
    layout = jax_ep.get_dispatch_layout(buffer, a["idx"], d.experts)
    got = jax_ep.dispatch(buffer, rows, a["idx"],
                          a["w"] if d.weights else None,
                          num_experts=d.experts, capacity=d.capacity,
                          expert_alignment=d.alignment)
    again = jax_ep.dispatch(buffer, rows2, handle=got.handle)
    out = jax_ep.combine(buffer, a["y"], got.handle, got.topk_weights,
                         bias=a["bias"] if d.bias else None)
    out, out_weights = out if d.weights else (out, None)
    h = got.handle
    result = dict(
        num_tokens_per_rank=layout.num_tokens_per_rank,
        num_tokens_per_expert=layout.num_tokens_per_expert,
        is_token_in_rank=layout.is_token_in_rank,
        num_invalid=layout.num_invalid,
        num_tokens_per_node=layout.num_tokens_per_node, x=got.x,
        scales=got.scales,
        topk_idx=got.topk_idx, topk_weights=got.topk_weights,
        num_tokens=got.num_recv_tokens,
        recv_tokens_per_expert=got.num_recv_tokens_per_expert,
        src_index=h.src_index, recv_row=h.recv_row,
        num_recv_tokens=h.num_recv_tokens, cached_x=again.x,
        cached_scales=again.scales, combined=out,
        combined_weights=out_weights)
    return {k: v[None] for k, v in result.items() if v is not None}

  return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(EP),
                               out_specs=P(EP)))


def _normal_truth(d: Draw, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What every rank must return, [R, ...], from the dense model."""
  fp8 = d.dtype == "fp8"
  rows = [a["x"]] + ([a["x_scales"]] if fp8 else [])
  rows2 = [a["x2"]] + ([a["x2_scales"]] if fp8 else [])
  kw = dict(num_experts=d.experts, capacity=d.capacity_rows,
            expert_alignment=d.alignment)
  layout = dm.layout(a["idx"], d.experts)
  routes = dm.dispatch(rows, a["idx"], a["w"] if d.weights else None, **kw)
  cached = dm.dispatch(rows2, a["idx"], None, **kw)
  truth = dict(
      num_tokens_per_rank=layout.num_tokens_per_rank,
      num_tokens_per_expert=layout.num_tokens_per_expert,
      is_token_in_rank=layout.is_token_in_rank,
      num_invalid=layout.num_invalid,
      num_tokens_per_node=layout.num_tokens_per_node, x=routes.rows[0],
      topk_idx=routes.topk_idx, num_tokens=routes.num_tokens,
      recv_tokens_per_expert=routes.num_tokens_per_expert,
      src_index=routes.src_index, recv_row=routes.recv_row,
      num_recv_tokens=routes.num_tokens, cached_x=cached.rows[0],
      combined=dm.combine(a["y"], routes, [a["bias"]] if d.bias else []))
  if d.dtype == "fp8":
    truth.update(scales=routes.rows[1], cached_scales=cached.rows[1])
  if d.weights:
    truth.update(topk_weights=routes.topk_weights,
                 combined_weights=dm.combine(routes.topk_weights, routes))
  return truth


def _check_normal(mesh: Mesh, program, d: Draw, rng, ctx: str) -> str:
  inputs = _normal_inputs(rng, d)
  flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in inputs.items()}
  got = program({k: intranode_worker.global_array(mesh, v, P(EP))
                 for k, v in flat.items()})
  truth = _normal_truth(d, inputs)
  assert sorted(got) == sorted(truth), f"{ctx}: outputs {sorted(got)}"
  for name, want in truth.items():
    for rank, value in ll_worker.by_rank(got[name]):
      assert_same(value, want[rank], f"{name} (rank {rank})", ctx)
  return f"{len(truth)} outputs equal the dense model"


# ------------------------------------------------------------------ driver


def _program(mesh: Mesh, kern, ref, d: Draw):
  if d.family == "normal":
    return _normal_program(mesh, kern, d)
  return ll_worker.case_program(mesh, kern, ref, d.ll_case())


def _check(mesh: Mesh, program, d: Draw, rng, ctx: str) -> str:
  if d.family == "normal":
    return _check_normal(mesh, program, d, rng, ctx)
  return ll_worker.check_call(mesh, program, d.ll_case(), rng, ctx)


def kernel_buffer(mesh: Mesh, backend: str, draws) -> jax_ep.Buffer:
  """The Buffer under test, its NVLink buffers and NVSHMEM heap sized for
  every draw that must run."""
  if backend == "reference":
    return jax_ep.Buffer(mesh, EP, backend="reference")
  runs = [d for d in draws if not refusals(d, backend)]
  nvl = [jax_ep.nvl_buffer_bytes(
      d.tokens, d.hidden, d.topk, d.num_ranks,
      jnp.float8_e4m3fn if d.dtype == "fp8" else ROW_DTYPES[d.dtype])
         for d in runs if d.family == "normal"]
  ll = [jax_ep.ll_buffer_bytes(d.max_tokens, d.hidden, d.experts)
        for d in runs if d.family == "low_latency"]
  return jax_ep.Buffer(mesh, EP, backend="cuda",
                       num_nvl_bytes=max(nvl, default=None),
                       num_ll_bytes=max(ll, default=None))


def run_draw(mesh: Mesh, kern, ref, d: Draw, seed: int, index: int,
             who: str) -> str:
  """Traces one draw, then runs and checks it unless it was refused; returns
  its line for the log."""
  ctx = f"{who}, seed={seed}, {d.family} draw {index}: {d.name()}"
  expected = refusals(d, kern.backend)
  try:
    program = _program(mesh, kern, ref, d).lower(
        *_abstract_inputs(mesh, d)).compile()
  except (ValueError, TypeError) as e:
    message = str(e)
    public = re.match(r"jax_ep\.(get_dispatch_layout|dispatch|combine|"
                      r"low_latency_dispatch|low_latency_combine)\b", message)
    if not expected or not public or not any(
        re.search(p, message) for p in expected):
      raise AssertionError(f"{ctx}: refused with {type(e).__name__}: "
                           f"{message!r}; expected "
                           f"{expected or 'no refusal'}") from e
    return f"{ctx}: refused: {message}"
  assert not expected, f"{ctx}: ran, but must be refused for {expected}"
  rng = np.random.default_rng([seed, FAMILIES.index(d.family), index, 1])
  return f"{ctx}: ok, {_check(mesh, program, d, rng, ctx)}"


def fuzz(mesh: Mesh, backend: str, seed: int, indices, families,
         who: str) -> int:
  """Runs draws `indices` of each family at the mesh's EP size, printing a
  line per draw; returns how many ran or were refused as they must."""
  num_ranks = mesh.devices.size
  # No f16 draws where ranks share a GPU (see `draw`).
  shared_gpu = intranode_worker.ranks_share_gpus()
  draws = [(i, draw(seed, f, i, num_ranks, backend, shared_gpu))
           for f in families for i in indices]
  kern = kernel_buffer(mesh, backend, [d for _, d in draws])
  ref = ll_worker.reference_buffer(mesh)
  for index, d in draws:
    print(run_draw(mesh, kern, ref, d, seed, index, who), flush=True)
  kern.close()  # collective: every process is past its last op
  return len(draws)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--draws", type=int, default=20,
                      help="draws of each family")
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--only", type=int, default=None, metavar="I",
                      help="replay draw I of each family")
  parser.add_argument("--backend", choices=("cuda", "reference"),
                      default="cuda")
  args = parser.parse_args(argv)
  families = args.families.split(",")
  jax_ep.launch.initialize()
  mesh = Mesh(np.array(jax.devices()), (EP,))
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  indices = [args.only] if args.only is not None else range(args.draws)
  count = fuzz(mesh, args.backend, args.seed, indices, families, who)
  print(f"{who}: fuzz {count} draws passed", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
