"""Low-latency dispatch/combine kernels on GPUs: a worker, one process per rank.

The LL kernels use NVSHMEM, which needs one process per rank, so
test_low_latency_gpu.py runs this script through
`gpu_testing.launch_per_gpu`: one process per GPU, or (`jax_ep.launch
--ranks-per-gpu`) several ranks sharing each GPU. There NCCL refuses every
XLA collective across the processes, so the pure-JAX reference backend
cannot run and the dense model (tests/support/dense_model.py) is the only
oracle.

    python ll_worker.py --seed N [--transport auto|put] [--cases all|shared]
        [--grads] [--mixed] [--ranks-per-node G]
        the parts asked for, in this order, in one launch (one Buffer sized
        for all of them); with none of the three, --cases all. With
        --ranks-per-node G < R the Buffer spans nodes of G ranks
        (test_internode_gpu.py): --mixed's normal ops run the internode
        kernels, whose NVSHMEM region shares the heap with the LL buffers.
    --cases all|shared
        every case of CASES, or of SHARED_CASES (a subset with every mode,
        small enough for 8 ranks sharing a GPU), on two fresh draws of
        inputs: the kernels (a Buffer with backend "cuda") and, where each
        rank has its own GPU, the pure-JAX reference (a second Buffer) in one
        program on the same inputs. Each process checks the ranks it holds
        against the dense model (the contract: fp8.py's cast with IEEE f32
        arithmetic): count, handle.src_index and handle.slot bit for bit,
        then scales and x (fp8 as bits; with zero_padding=False only the
        rows below each expert's count), then the combine against the fp32
        dense model, exact but for rounding ties (as in test_low_latency.py).
        It prints how many dispatched and combined elements of the reference
        backend differ from the kernels' (on GPUs XLA divides f32 within 2
        ulp, so the reference's fp8 cast can round a value next to an e4m3
        boundary the other way), then "worker i/R: <case> passed".
    --grads
        for each of GRAD_CASES (bf16: the fp8 cast is not differentiated),
        the VJPs straight out of the ops, against the dense model: a
        dispatch's in x (the combine kernels) bit for bit, and a combine's
        (two dispatches and a combine on the kernels) in y bit for bit and
        in topk_weights within `dm.low_latency_combine_vjp`'s bound (exactly
        0 where k selects nothing). Then, where the reference runs, the
        gradients in x, topk_weights and y of sum(g * combine(dispatch(x).x
        * c + y)) on the kernels and on the reference: d_x and d_y bit for
        bit, d_topk_weights within 2^-10 of its largest element. Prints
        "worker i/R: grads <case> passed".
    --mixed
        a normal dispatch/combine (intranode or internode kernels) feeding a
    low-latency
        dispatch/combine in one jitted program, twice, equal to the dense
        model's (and, where each rank has its own GPU, the reference
        backend's) bit for bit; then "worker i/R: mixed <case> passed".
    python ll_worker.py --seed N --repeat STEPS
        STEPS jitted dispatch/combine pairs of REPEAT_CASE with fresh
        routings, enqueued back to back in chunks (the host checks one chunk
        while the GPU runs the next; intranode_worker.repeat_steps), on
        values whose combine sums are exact in fp32, so every output must
        equal the dense model's bits; every step is checked. Prints one
        sha256 over every step's outputs (two runs must print the same),
        "worker i/R: repeat STEPS sha256 <hex>", then "worker i/R: repeat
        STEPS passed".
    python ll_worker.py --seed N --timeout
        rank 1 never calls; rank 0's dispatch must time out, print its rank
        and phase, and fail (exit 1; 3 means it returned).

A hidden `--backend reference` runs the "kernel" side on the reference too,
to check this script without GPUs:
    python -m jax_ep.launch -n 2 -- python tests/workers/ll_worker.py \\
        --seed 0 --backend reference [--grads --mixed | --repeat 200]
and with JAX_EP_LAUNCH_RANKS_PER_GPU=2 in the environment the processes take
the paths of ranks sharing a GPU (no reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
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
from intranode_worker import by_rank, ranks_share_gpus
import jax_ep
import jax_ep.launch
from ep_testing import (BF16, FP8_MODES, assert_bf16_sum, assert_same, dyadic,
                        flat, ll_tokens, normal, weights)

EP = "ep"
# Rows of random expert outputs drawn per case; see `expert_outputs`.
_POOL_ROWS = 4096
# The timeout check: rank 0's wait (rank 1 stays away, see
# intranode_worker.call_alone).
_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class Case:
  tokens: int
  hidden: int
  topk: int
  experts: int
  max_tokens: int = 0  # Tmax; 0: `tokens`
  mode: str = "fp8"  # a key of ep_testing.FP8_MODES
  skew: bool = False  # most tokens on expert 0 (intranode_worker.routing)
  hooks: bool = False  # return_recv_hook, each hook called after other work
  zero_copy: bool = False
  zero_padding: bool = True  # False: rows past each count are unspecified

  @property
  def tmax(self) -> int:
    return self.max_tokens or self.tokens

  def at(self, num_ranks: int) -> Case:
    """This case on `num_ranks` ranks: its experts rounded up to a multiple
    of them (the lists below are written for 2 ranks: E=2 becomes E=R)."""
    return dataclasses.replace(
        self, experts=-(-self.experts // num_ranks) * num_ranks)

  def name(self) -> str:
    return (f"T{self.tokens}-Tmax{self.tmax}-H{self.hidden}-K{self.topk}-"
            f"E{self.experts}-{self.mode}{'-skew' if self.skew else ''}"
            f"{'-hooks' if self.hooks else ''}"
            f"{'-zero_copy' if self.zero_copy else ''}"
            f"{'' if self.zero_padding else '-no_zero_padding'}")


# Every mode (bf16, each fp8 option, hooks, zero_copy, zero_padding off,
# skew, Tmax > T, fp8 scale rows not whole 16 bytes) at shapes that 8 ranks
# sharing a GPU run in seconds (the dense model of a case holds E*R*Tmax
# rows on the host).
SHARED_CASES = [
    Case(1, 2048, 1, 2),
    Case(1, 7168, 8, 288, mode="bf16"),
    Case(1, 4096, 8, 288, mode="bf16", zero_padding=False),
    Case(3, 4096, 8, 288, mode="fp8_round_scale", skew=True),
    Case(3, 2048, 1, 2, max_tokens=128, mode="bf16"),
    Case(128, 2048, 8, 288, mode="fp8_round_scale_ue8m0", skew=True,
         hooks=True),
    Case(128, 2048, 1, 2, skew=True),
    Case(6, 1024, 4, 12, max_tokens=9, mode="bf16", skew=True, hooks=True,
         zero_copy=True),
    Case(5, 512, 3, 6, max_tokens=6, zero_copy=True, zero_padding=False),
    # fp8 scale rows of 4 * H/128 (or H/128 with UE8M0) bytes, not a
    # multiple of 16: the padding after the received rows started off a
    # 16-byte boundary, and these crashed with a misaligned address.
    Case(5, 256, 2, 2, max_tokens=7, mode="fp8_round_scale"),
    Case(4, 512, 3, 4, max_tokens=8, mode="fp8_ue8m0"),
]
CASES = SHARED_CASES + [
    Case(3, 7168, 8, 288, max_tokens=128, hooks=True),
    Case(128, 7168, 8, 288),  # DeepSeek-V3 decoding (bench shape dsv3_ll)
    Case(128, 7168, 8, 288, mode="bf16", skew=True, zero_copy=True),
    Case(128, 7168, 8, 288, hooks=True, zero_padding=False),
    Case(128, 4096, 8, 288, mode="fp8_ue8m0"),
    Case(128, 4096, 1, 288, mode="bf16", zero_copy=True, zero_padding=False),
    # More of issue 13's crashing shapes (scale rows off 16 bytes).
    Case(5, 256, 2, 2, max_tokens=8, mode="fp8_round_scale"),
    Case(8, 7168, 2, 5, max_tokens=9, mode="fp8_round_scale_ue8m0"),
    Case(4, 3072, 4, 288, mode="fp8_ue8m0"),
    Case(1, 1536, 2, 64, max_tokens=14, mode="fp8_round_scale_ue8m0"),
    Case(9, 384, 5, 6, max_tokens=14),
    Case(3, 384, 5, 288, max_tokens=4),
    Case(4, 2560, 7, 64, max_tokens=7, mode="fp8_round_scale_ue8m0"),
    Case(8, 1024, 1, 2, max_tokens=13, mode="fp8_round_scale_ue8m0"),
    Case(7, 1024, 1, 4, mode="fp8_ue8m0"),
    Case(3, 512, 5, 64, max_tokens=13, mode="fp8_round_scale_ue8m0"),
    Case(9, 256, 6, 12, max_tokens=10, mode="fp8_round_scale"),
    Case(4, 256, 8, 12, mode="fp8_round_scale"),
]
# --repeat: small, so that the host (inputs, dense model) keeps up.
REPEAT_CASE = Case(8, 2048, 8, 16)
# --mixed: normal and low-latency ops in one program.
MIXED_CASE = Case(64, 2048, 8, 16, mode="bf16", skew=True)
# --grads: bf16 (the fp8 cast is not differentiated).
GRAD_CASES = [
    Case(3, 2048, 1, 2, max_tokens=8, mode="bf16"),
    Case(128, 2048, 8, 288, mode="bf16", skew=True),
]


def expert_outputs(rng, num_ranks: int, case: Case, *, exact=False):
  """bf16 y[R, L, R*Tmax, H], every slot filled, empty ones too.

  Each slot holds a row drawn from a pool of random rows (a fresh row per
  slot takes seconds at the DeepSeek-V3 shape), so reading a wrong slot shows
  unless it drew the same row. With `exact`, dyadic values whose weighted
  sums with `dyadic` weights are exact in fp32.
  """
  slots = (num_ranks, case.experts // num_ranks, num_ranks * case.tmax)
  shape = (min(_POOL_ROWS, int(np.prod(slots))), case.hidden)
  pool = dyadic(rng, shape) if exact else normal(rng, shape, BF16)
  return pool[rng.integers(len(pool), size=slots)]


def token_inputs(rng, num_ranks: int, case: Case, *, exact=False):
  """Global numpy inputs by rank: x bf16[R, T, H], topk_idx int32[R, T, K]
  (-1, repeated and out-of-range ids) and topk_weights f32[R, T, K]."""
  x = ll_tokens(rng, num_ranks, case.tokens, case.hidden)
  idx = intranode_worker.routing(rng, num_ranks, case)
  if exact:  # k/8 times y's j/16: exact products and sums
    w = dyadic(rng, idx.shape, np.float32, bits=3)
  else:
    w = weights(rng, idx.shape)
  return x, idx, w


def ops(kern: jax_ep.Buffer, ref: jax_ep.Buffer | None, case: Case):
  """Per shard: (x, idx, w, y) -> dict of the kernels' and the reference's
  dispatch ("got", "want") and combine ("out", "ref_out"). With `ref` None
  (ranks that share a GPU, where NCCL refuses the reference's collectives)
  "want" and "ref_out" are None."""
  options = dict(num_max_dispatch_tokens_per_rank=case.tmax,
                 num_experts=case.experts, **FP8_MODES[case.mode])
  kernel_options = {}
  if kern.backend == "cuda":  # the reference always zeros the padding
    kernel_options["zero_padding"] = case.zero_padding

  def run(x, idx, w, y):
    dispatched = jax_ep.low_latency_dispatch(
        kern, x, idx, **options, **kernel_options,
        return_recv_hook=case.hooks)
    want = ref_out = None
    if ref is not None:
      want = jax_ep.low_latency_dispatch(ref, x, idx, **options)
    # With hooks, the reference's op (else a stand-in) is the work between
    # send and receive.
    got = (dispatched(x * 2 if want is None else want.x) if case.hooks else
           dispatched)
    combined = jax_ep.low_latency_combine(kern, y, idx, w, got.handle,
                                          zero_copy=case.zero_copy,
                                          return_recv_hook=case.hooks)
    if ref is not None:
      ref_out = jax_ep.low_latency_combine(ref, y, idx, w, want.handle)
    out = (combined(y * 2 if ref_out is None else ref_out) if case.hooks else
           combined)
    return dict(got=got, want=want, out=out, ref_out=ref_out)

  return run


def _lead(tree):
  """A leading rank axis on every leaf, so shard_map can return it."""
  return jax.tree.map(lambda a: a[None], tree)


def case_program(mesh: Mesh, kern, ref, case: Case):
  """jit(shard_map(ops)): global x[R*T, H], idx, w [R*T, K], y[R*L, S, H]
  -> `ops`' dict, every leaf [R, ...]."""
  return jax.jit(jax.shard_map(
      lambda *a: _lead(ops(kern, ref, case)(*a)), mesh=mesh,
      in_specs=P(EP), out_specs=P(EP)))


def beside_reference(got, want):
  """(rank, got's values, want's or None) for each shard this process holds;
  `want`, the reference backend's output, may be None (no reference)."""
  if want is None:
    for rank, values in by_rank(got):
      yield rank, values, None
  else:
    yield from by_rank(got, want)


def _differ(a, b) -> int:
  """Elements whose bits differ (0 without a reference `b`)."""
  if b is None:
    return 0
  return int(np.count_nonzero(intranode_worker.bits(a) !=
                              intranode_worker.bits(b)))


def reference_buffer(mesh: Mesh) -> jax_ep.Buffer | None:
  """The reference backend's Buffer, or None where ranks share a GPU: NCCL
  refuses the reference's collectives there, and the dense model is the
  only oracle."""
  if ranks_share_gpus():
    return None
  return jax_ep.Buffer(mesh, EP, backend="reference")


def check_dispatch(got, want, dense: dm.LowLatencyDispatch, case: Case,
                   ctx: str) -> str:
  """Every kernel output and handle field equal to the dense model's, bit for
  bit; the rows past each expert's count only with zero_padding. Says how
  many row elements of the reference backend (`want`, if any) differ from
  them."""
  assert (got.scales is None) == (len(dense.rows) == 1), ctx
  exact = {"recv_count": (got.recv_count, dense.count),
           "handle.src_index": (got.handle.src_index, dense.src_index),
           "handle.slot": (got.handle.slot, dense.slot)}
  for name, (g, d) in exact.items():
    for rank, gv in by_rank(g):
      assert_same(gv, d[rank], f"{name} (rank {rank})", ctx)
  rows = {"x": (got.x, None if want is None else want.x, dense.rows[0])}
  if got.scales is not None:  # first: a wrong scale explains wrong rows
    rows = {"scales": (got.scales, None if want is None else want.scales,
                       dense.rows[1]), **rows}
  differ = 0
  for name, (g, w, d) in rows.items():
    for rank, gv, wv in beside_reference(g, w):
      dv = d[rank]
      if not case.zero_padding:
        valid = np.arange(gv.shape[1]) < dense.count[rank][:, None]  # [L, S]
        gv, dv = gv[valid], dv[valid]
        wv = None if wv is None else wv[valid]
      assert_same(gv, dv, f"{name} (rank {rank})", ctx)
      differ += _differ(gv, wv)
  if want is None:
    return "no reference to compare"
  return f"{differ} row elements of the reference differ"


def check_combine(out, ref_out, truth, num_topk: int, ctx: str) -> str:
  """`out` is the fp32 `truth` rounded once, except on rounding ties (see
  `ep_testing.assert_bf16_sum`); says how many elements differ from the
  reference's output."""
  total, abs_sum = truth
  differ = checked = 0
  for rank, o, r in beside_reference(out, ref_out):
    assert_bf16_sum(o, total[rank], abs_sum[rank], num_topk,
                    f"combine (rank {rank})", ctx)
    differ += _differ(o, r)
    checked += o.size
  if ref_out is None:
    return "no reference to compare"
  return f"{differ} of {checked} elements differ from the reference's"


def kernel_buffer(mesh: Mesh, backend: str, cases, transport: str,
                  **kwargs) -> jax_ep.Buffer:
  """The Buffer under test, its LL buffers sized for every case."""
  if backend == "reference":
    return jax_ep.Buffer(mesh, EP, backend="reference", **kwargs)
  num_bytes = max(jax_ep.ll_buffer_bytes(c.tmax, c.hidden, c.experts)
                  for c in cases)
  return jax_ep.Buffer(mesh, EP, backend="cuda", num_ll_bytes=num_bytes,
                       ll_transport=transport, **kwargs)


def check_call(mesh: Mesh, program, case: Case, rng, ctx: str) -> str:
  """Runs `program` (`case_program`) once on fresh inputs drawn from `rng`
  and checks every output; returns a note on the reference's differences."""
  num_ranks = mesh.devices.size
  x, idx, w = token_inputs(rng, num_ranks, case)
  y = expert_outputs(rng, num_ranks, case)
  result = program(*[intranode_worker.global_array(mesh, a, P(EP))
                     for a in (flat(x), flat(idx), flat(w), flat(y))])
  dense = dm.low_latency_dispatch(x, idx, num_experts=case.experts,
                                  max_tokens=case.tmax, **FP8_MODES[case.mode])
  dispatch_note = check_dispatch(result["got"], result["want"], dense, case,
                                 ctx)
  truth = dm.low_latency_combine_f32(y, idx, w, dense)  # its slots: any mode
  differ = check_combine(result["out"], result["ref_out"], truth, case.topk,
                         ctx)
  return f"dispatch: {dispatch_note}; combine: {differ}"


def run_cases(mesh: Mesh, kern, ref, cases, seed: int, who: str) -> None:
  rng = np.random.default_rng(seed)  # the same draws on every process
  for case in cases:
    program = case_program(mesh, kern, ref, case)
    for call in range(2):
      ctx = f"{who}, seed={seed}, call {call}, {case.name()}"
      print(f"{ctx}: {check_call(mesh, program, case, rng, ctx)}", flush=True)
    print(f"{who}: {case.name()} passed", flush=True)


def run_repeat(mesh: Mesh, kern, case: Case, seed: int, steps: int,
               who: str) -> None:
  """`steps` pairs on the kernels alone, each checked against the dense
  model (`intranode_worker.repeat_steps`)."""
  num_ranks = mesh.devices.size
  rng = np.random.default_rng(seed)
  put = lambda a: intranode_worker.global_array(mesh, flat(a), P(EP))
  # One y for every step: each step's routing reads other slots of it.
  y_host = expert_outputs(rng, num_ranks, case, exact=True)
  y = put(y_host)
  program = case_program(mesh, kern, None, case)

  def run_step():
    arrays = token_inputs(rng, num_ranks, case, exact=True)
    result = program(*[put(a) for a in arrays], y)
    return arrays, (result["got"], result["out"])

  def check_step(step, arrays, out):
    (x, idx, w), (got, combined) = arrays, out
    ctx = f"{who}, seed={seed}, step {step} of {steps}, {case.name()}"
    dense = dm.low_latency_dispatch(x, idx, num_experts=case.experts,
                                    max_tokens=case.tmax,
                                    **FP8_MODES[case.mode])
    check_dispatch(got, None, dense, case, ctx)
    want = dm.low_latency_combine(y_host, idx, w, dense)  # its slots
    for rank, o in by_rank(combined):
      assert_same(o, want[rank], f"combine (rank {rank}, exact sums)", ctx)

  intranode_worker.repeat_steps(steps, run_step, check_step, who)


def vjp_program(mesh: Mesh, buffer, case: Case):
  """jit(shard_map) of the VJPs alone: global (x, idx, w, y, g_recv, g_out)
  -> dict of d_x, a bf16 dispatch's VJP at g_recv, and d_y and d_w, a
  combine's at g_out (every leaf [R, ...]). Each is an op's
  backward output as it is: XLA arithmetic after it would be free to skip a
  bf16 rounding (--xla_allow_excess_precision)."""
  def per_shard(x, idx, w, y, g_recv, g_out):
    def dispatch(x):
      d = jax_ep.low_latency_dispatch(
          buffer, x, idx, num_max_dispatch_tokens_per_rank=case.tmax,
          num_experts=case.experts, use_fp8=False)
      return d.x, d.handle

    _, dispatch_vjp, handle = jax.vjp(dispatch, x, has_aux=True)
    grads = dict(d_x=dispatch_vjp(g_recv)[0])
    _, combine_vjp = jax.vjp(
        lambda y, w: jax_ep.low_latency_combine(buffer, y, idx, w, handle),
        y, w)
    grads["d_y"], grads["d_w"] = combine_vjp(g_out)
    return _lead(grads)

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                               out_specs=P(EP)))


def check_vjps(got, x, idx, w, y, g_recv, g_out, case: Case,
               ctx: str) -> None:
  """`vjp_program`'s outputs against the dense model: d_x (dispatch's VJP is
  a unit-weight combine over each token's distinct experts) and d_y bit for
  bit, d_w within `dm.low_latency_combine_vjp`'s bound, +0 where k selects
  nothing."""
  routes = dm.low_latency_dispatch(x, idx, num_experts=case.experts,
                                   max_tokens=case.tmax)
  want_x = dm.low_latency_combine(g_recv, idx, dm.first_selections(idx),
                                  routes)
  for rank, d_x in by_rank(got["d_x"]):
    assert_same(d_x, want_x[rank], f"dispatch VJP d_x (rank {rank})", ctx)
  want_y, want_w, bound = dm.low_latency_combine_vjp(g_out, y, idx, w, routes)
  selects = (idx >= 0) & (idx < case.experts)
  for rank, d_y, d_w in by_rank(got["d_y"], got["d_w"]):
    assert_same(d_y, want_y[rank], f"combine VJP d_y (rank {rank})", ctx)
    assert_same(d_w[~selects[rank]], np.zeros((~selects[rank]).sum(),
                                               np.float32),
                f"combine VJP d_topk_weights (rank {rank}, no selection)",
                ctx)
    err = np.abs(d_w.astype(np.float64) - want_w[rank])
    assert (err <= bound[rank]).all(), (
        f"combine VJP d_topk_weights (rank {rank}): max error {err.max()}, "
        f"bound {bound[rank].max()} [{ctx}]")


def grad_program(mesh: Mesh, buffer, case: Case):
  """jit(grad) of sum(g * combine(dispatch(x).x * c + y)) in x, w and y:
  dispatch's VJP is a combine and combine's a bf16 dispatch, on the kernels
  when `buffer` has them."""
  def per_shard(x, idx, w, y, c, g):
    d = jax_ep.low_latency_dispatch(
        buffer, x, idx, num_max_dispatch_tokens_per_rank=case.tmax,
        num_experts=case.experts, use_fp8=False)
    out = jax_ep.low_latency_combine(buffer, d.x * c + y, idx, w, d.handle)
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))[None]

  loss = jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP), out_specs=P(EP))
  return jax.jit(jax.grad(lambda x, w, y, idx, c, g: jnp.sum(
      loss(x, idx, w, y, c, g)), argnums=(0, 1, 2)))


def run_grads(mesh: Mesh, kern, ref, cases, seed: int, who: str) -> None:
  """The VJPs against the dense model (`check_vjps`), then,
  where the reference runs, gradients through a whole program on both
  backends: d_x and d_y bit for bit, d_w within 2^-10 of its largest element
  (the same sums, perhaps fused in another order; wrong rows or slots would
  be far off)."""
  num_ranks = mesh.devices.size
  rng = np.random.default_rng(seed)
  put = lambda a: intranode_worker.global_array(mesh, flat(a), P(EP))
  for case in cases:
    ctx = f"{who}, seed={seed}, grads, {case.name()}"
    # Weights in eighths: a token's weights for an expert it lists more
    # than once sum exactly in any order (XLA picks its own on GPUs).
    x, idx, w = token_inputs(rng, num_ranks, case, exact=True)
    # Random rows in every slot of y and g_recv, empty ones too: reading a
    # wrong or empty slot shows.
    y, g_recv = (expert_outputs(rng, num_ranks, case) for _ in range(2))
    g_out = normal(rng, x.shape, BF16)
    got = vjp_program(mesh, kern, case)(
        *[put(a) for a in (x, idx, w, y, g_recv, g_out)])
    check_vjps(got, x, idx, w, y, g_recv, g_out, case, ctx)
    if ref is not None:
      c = normal(rng, (num_ranks, case.experts // num_ranks, 1, case.hidden),
                 BF16)
      args = [put(a) for a in (x, w, y, idx, c, g_out)]
      got = grad_program(mesh, kern, case)(*args)
      want = grad_program(mesh, ref, case)(*args)
      for name, gv, wv in zip(("d_x", "d_w", "d_y"), got, want):
        for rank, a, b in by_rank(gv, wv):
          if name == "d_w":
            bound = 2.0**-10 * np.abs(b).max()
            assert (np.abs(a - b) <= bound).all(), (
                f"{name} (rank {rank}, reference): max error "
                f"{np.abs(a - b).max()} [{ctx}]")
          else:
            assert_same(a, b, f"{name} (rank {rank}, reference)", ctx)
    print(f"{ctx}: VJPs of dispatch and combine as the dense model's; "
          f"{'' if ref else 'no '}whole-program gradients as the reference's",
          flush=True)
    print(f"{who}: grads {case.name()} passed", flush=True)


def run_mixed(mesh: Mesh, kern, ref, case: Case, seed: int, who: str) -> None:
  """A normal dispatch/combine (the intranode kernels) and a low-latency
  dispatch/combine (NVSHMEM) in one jitted program, twice: every output
  equal to the dense model's and (where ranks do not share a GPU) to the
  reference backend's, bit for bit. The values make every sum exact in fp32
  (x in quarters, weights in eighths: the normal combine's rows are
  multiples of 2^-5 below 2^7, the LL combine's sums multiples of 2^-8 below
  2^12), so neither summation order nor FMA contraction, which XLA may
  choose differently from the kernels, changes a bit. `kern` has NVLink
  buffers for `case`."""
  num_ranks = mesh.devices.size

  def body(buffer):
    def per_shard(x, idx, w):
      d = jax_ep.dispatch(buffer, x, idx, w, num_experts=case.experts)
      normal_out, _ = jax_ep.combine(buffer, d.x, d.handle, d.topk_weights)
      ll = jax_ep.low_latency_dispatch(
          buffer, normal_out, idx, num_max_dispatch_tokens_per_rank=case.tmax,
          num_experts=case.experts, use_fp8=False)
      out = jax_ep.low_latency_combine(buffer, ll.x, idx, w, ll.handle)
      return _lead(dict(normal=normal_out, ll_x=ll.x, count=ll.recv_count,
                        out=out))
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(EP),
                                 out_specs=P(EP)))

  rng = np.random.default_rng(seed)
  for call in range(2):
    ctx = f"{who}, seed={seed}, mixed call {call}, {case.name()}"
    _, idx, w = token_inputs(rng, num_ranks, case, exact=True)
    x = dyadic(rng, (num_ranks, case.tokens, case.hidden), bits=2)
    args = [intranode_worker.global_array(mesh, flat(a), P(EP))
            for a in (x, idx, w)]
    got = body(kern)(*args)
    routes = dm.dispatch([x], idx, w, num_experts=case.experts)
    normal_out = dm.combine(routes.rows[0], routes)
    ll = dm.low_latency_dispatch(normal_out, idx, num_experts=case.experts,
                                 max_tokens=case.tmax)
    dense = dict(normal=normal_out, ll_x=ll.rows[0], count=ll.count,
                 out=dm.low_latency_combine(ll.rows[0], idx, w, ll))
    want = None if ref is None else body(ref)(*args)
    for name in got:
      for rank, a, b in beside_reference(got[name],
                                         None if want is None else want[name]):
        assert_same(a, dense[name][rank], f"{name} (rank {rank})", ctx)
        if b is not None:
          assert_same(a, b, f"{name} (rank {rank}, reference)", ctx)
  print(f"{who}: mixed {case.name()} passed", flush=True)


def run_timeout(mesh: Mesh, transport: str) -> int:
  """Rank 0 dispatches alone: its wait for rank 1 must time out. Both ranks
  compile the call (compiling may exchange with the peers); rank 1 never
  runs it."""
  case = Case(16, 2048, 8, 16)
  kern = kernel_buffer(mesh, "cuda", [case], transport, timeout_s=_TIMEOUT_S)
  x, idx, _ = token_inputs(np.random.default_rng(0), mesh.devices.size, case)
  args = [intranode_worker.global_array(mesh, flat(a), P(EP))
          for a in (x, idx)]
  dispatch = jax.jit(jax.shard_map(
      lambda x, i: jax_ep.low_latency_dispatch(
          kern, x, i, num_max_dispatch_tokens_per_rank=case.tmax,
          num_experts=case.experts).x[None],
      mesh=mesh, in_specs=P(EP), out_specs=P(EP))).lower(*args).compile()
  return intranode_worker.call_alone(dispatch, args, "low_latency_dispatch")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--transport", choices=("auto", "put"), default="auto",
                      help="the kernel Buffer's ll_transport")
  parser.add_argument("--cases", choices=("all", "shared"),
                      help="CASES or SHARED_CASES (default: all, unless "
                      "--grads or --mixed is given)")
  parser.add_argument("--grads", action="store_true",
                      help="the VJPs through GRAD_CASES")
  parser.add_argument("--mixed", action="store_true",
                      help="normal and low-latency ops in one program")
  parser.add_argument("--repeat", type=int, default=0, metavar="STEPS",
                      help="STEPS dispatch/combine pairs back to back, "
                      "hashed, instead of the parts above")
  parser.add_argument("--timeout", action="store_true",
                      help="rank 0 dispatches alone and must time out")
  parser.add_argument("--ranks-per-node", type=int, default=None,
                      metavar="G", help="the Buffer's ranks_per_node")
  parser.add_argument("--backend", choices=("cuda", "reference"),
                      default="cuda", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if (args.repeat or args.timeout) and (args.cases or args.grads or
                                        args.mixed):
    parser.error("--repeat and --timeout run alone")
  # Before any JAX call. Under the launcher it also makes an uncaught error
  # exit at once, without jax.distributed's shutdown wait for the peer.
  jax_ep.launch.initialize()
  mesh = Mesh(np.array(jax.devices()), (EP,))
  if args.timeout:
    return run_timeout(mesh, args.transport)
  who = f"worker {jax.process_index()}/{jax.process_count()}"
  num_ranks = mesh.devices.size
  if args.repeat:
    case = REPEAT_CASE.at(num_ranks)
    kern = kernel_buffer(mesh, args.backend, [case], args.transport)
    run_repeat(mesh, kern, case, args.seed, args.repeat, who)
  else:
    # The cases at this many ranks (their experts a multiple of them).
    cases = [c.at(num_ranks) for c in
             {"all": CASES, "shared": SHARED_CASES,
              None: [] if args.grads or args.mixed else CASES}[args.cases]]
    grad_cases = [c.at(num_ranks) for c in GRAD_CASES] if args.grads else []
    mixed = MIXED_CASE.at(num_ranks) if args.mixed else None
    sized = cases + grad_cases + ([mixed] if mixed else [])
    # One Buffer for every part (a Buffer costs seconds), with the buffers
    # of the mixed program's normal ops: NVLink ones on one node, the
    # NVSHMEM exchange region across nodes.
    per_node = args.ranks_per_node or num_ranks
    normal_bytes = {}
    if mixed and per_node == num_ranks:
      normal_bytes["num_nvl_bytes"] = jax_ep.nvl_buffer_bytes(
          mixed.tokens, mixed.hidden, mixed.topk, num_ranks)
    elif mixed:
      normal_bytes["num_rdma_bytes"] = jax_ep.rdma_buffer_bytes(
          mixed.tokens, mixed.hidden, mixed.topk, num_ranks, per_node)
    kern = kernel_buffer(mesh, args.backend, sized, args.transport,
                         ranks_per_node=args.ranks_per_node, **normal_bytes)
    ref = reference_buffer(mesh)
    run_cases(mesh, kern, ref, cases, args.seed, who)
    if grad_cases:
      run_grads(mesh, kern, ref, grad_cases, args.seed, who)
    if mixed:
      run_mixed(mesh, kern, ref, mixed, args.seed, who)
  # Collective: every process is past its last op. The heap's close is a
  # barrier before the NVLink buffers go.
  kern.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
