"""Bad input: every validated argument fails at trace time with its message.

docs/contract.md, "Bad input": a Python error naming the op, the argument
and the limit. The ops are only traced here (`jax.make_jaxpr`), never compiled.
"""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep._src import runtime
from jax_ep._src.reference.low_latency import ReferenceLowLatency
from jax_ep._src.reference.normal import ReferenceNormal
from ep_testing import BF16, Ep, cpu_devices

R, T, H, K, E = 2, 4, 64, 2, 8  # the valid base case, per rank
F8 = jnp.float8_e4m3fn


@pytest.fixture(scope="module")
def ep():
  return Ep(R)


def arr(shape, dtype=np.float32):
  """Global (all ranks) array: leading dim R * shape[0]."""
  return np.ones((R * shape[0], *shape[1:]), dtype)


def ids(shape=(T, K), dtype=np.int32):
  return np.zeros((R * shape[0], *shape[1:]), dtype)


def raises(ep, exc, message, body, *args):
  """Tracing `body` under shard_map raises `exc` matching `message`."""
  with pytest.raises(exc, match=message):
    ep.trace(body, *args)


def esc(text):
  return re.escape(text)


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("idx,num_experts,exc,message", [
    (ids(), 7, ValueError, "get_dispatch_layout: num_experts (7) must be a "
     "multiple of the EP size (2)"),
    (ids(), 0, ValueError, "get_dispatch_layout: num_experts must be a "
     "positive int, got 0"),
    (ids(), 8.0, ValueError, "num_experts must be a positive int, got 8.0"),
    (ids(), True, ValueError, "num_experts must be a positive int, got True"),
    (ids((T,)), E, ValueError, "get_dispatch_layout: topk_idx must have 2 "
     "dimensions, got int32[4]"),
    (ids(dtype=np.float32), E, TypeError, "get_dispatch_layout: topk_idx must "
     "have dtype in ['int32'], got float32[4, 2]"),
    (ids((T, 9)), E, ValueError, "get_dispatch_layout: topk_idx has K=9 "
     "columns; K must be in [1, 8] (at most 32 and at most num_experts=8)"),
    (ids((T, 33)), 64, ValueError, "topk_idx has K=33 columns; K must be in "
     "[1, 32]"),
])
def test_layout_bad_input(ep, idx, num_experts, exc, message):
  raises(ep, exc, esc(message),
         lambda i: jax_ep.get_dispatch_layout(ep.buffer, i, num_experts), idx)


# ---------------------------------------------------------------- dispatch


def _dispatch(ep, **kwargs):
  return lambda x, i: jax_ep.dispatch(ep.buffer, x, i, **kwargs)


DISPATCH_CASES = {
    # x
    "x_1d": (arr((T,), BF16), ids(), {}, ValueError,
             "dispatch: x must have 2 dimensions, got bfloat16[4]"),
    "x_3d": (arr((T, 2, H), BF16), ids(), {}, ValueError,
             "dispatch: x must have 2 dimensions, got bfloat16[4, 2, 64]"),
    "x_int": (arr((T, H), np.int32), ids(), {}, TypeError,
              "dispatch: x must have dtype in ['bfloat16', 'float16', "
              "'float32'], got int32[4, 64]"),
    "x_fp8_alone": (arr((T, 128), np.float32), ids(), dict(fp8_alone=True),
                    TypeError, "dispatch: x is float8_e4m3fn rows without "
                    "their scales; fp8 x is the pair (e4m3[T, H], f32 "
                    "scales[T, H/128]) that jax_ep.per_token_cast_to_fp8 "
                    "returns"),
    "x_row_bytes_bf16": (arr((T, 4), BF16), ids(), {}, ValueError,
                         "dispatch: a row of x is 8 bytes (bfloat16[4, 4]); "
                         "rows must be a multiple of 16 bytes"),
    "x_row_bytes_f32": (arr((T, 6), np.float32), ids(), {}, ValueError,
                        "a row of x is 24 bytes (float32[4, 6])"),
    # topk_idx
    "idx_missing": (arr((T, H), BF16), None, {}, ValueError,
                    "dispatch: a fresh dispatch needs topk_idx and "
                    "num_experts (or pass handle= for a cached dispatch)"),
    "num_experts_missing": (arr((T, H), BF16), ids(), dict(num_experts=None),
                            ValueError, "a fresh dispatch needs topk_idx and "
                            "num_experts"),
    "idx_tokens": (arr((T, H), BF16), ids((T + 1, K)), {}, ValueError,
                   "dispatch: topk_idx must have shape [4, '*'], got "
                   "int32[5, 2] (axis 0)"),
    "idx_dtype": (arr((T, H), BF16), ids(dtype=np.int16), {}, TypeError,
                  "dispatch: topk_idx must have dtype in ['int32'], got "
                  "int16[4, 2]"),
    "idx_ndim": (arr((T, H), BF16), ids((T, K, 1)), {}, ValueError,
                 "dispatch: topk_idx must have 2 dimensions"),
    "idx_k_too_large": (arr((T, H), BF16), ids((T, 9)), {}, ValueError,
                        "dispatch: topk_idx has K=9 columns; K must be in "
                        "[1, 8]"),
    # num_experts
    "experts_not_multiple": (arr((T, H), BF16), ids(), dict(num_experts=5),
                             ValueError, "dispatch: num_experts (5) must be "
                             "a multiple of the EP size (2)"),
    "experts_negative": (arr((T, H), BF16), ids(), dict(num_experts=-2),
                         ValueError, "dispatch: num_experts must be a "
                         "positive int, got -2"),
    # topk_weights
    "weights_dtype": (arr((T, H), BF16), ids(),
                      dict(topk_weights=arr((T, K), BF16)), TypeError,
                      "dispatch: topk_weights must have dtype in "
                      "['float32'], got bfloat16[4, 2]"),
    "weights_shape": (arr((T, H), BF16), ids(),
                      dict(topk_weights=arr((T, K + 1))), ValueError,
                      "dispatch: topk_weights must have shape [4, 2], got "
                      "float32[4, 3] (axis 1)"),
    "weights_ndim": (arr((T, H), BF16), ids(),
                     dict(topk_weights=arr((T,))), ValueError,
                     "dispatch: topk_weights must have 2 dimensions"),
    # capacity, alignment
    "capacity_zero": (arr((T, H), BF16), ids(), dict(capacity=0), ValueError,
                      "dispatch: capacity must be a positive int, got 0"),
    "capacity_negative": (arr((T, H), BF16), ids(), dict(capacity=-3),
                          ValueError, "capacity must be a positive int, "
                          "got -3"),
    "capacity_float": (arr((T, H), BF16), ids(), dict(capacity=2.5),
                       ValueError, "capacity must be a positive int, got 2.5"),
    "capacity_bool": (arr((T, H), BF16), ids(), dict(capacity=True),
                      ValueError, "capacity must be a positive int, got True"),
    "alignment_zero": (arr((T, H), BF16), ids(), dict(expert_alignment=0),
                       ValueError, "dispatch: expert_alignment must be a "
                       "positive int, got 0"),
    "alignment_negative": (arr((T, H), BF16), ids(),
                           dict(expert_alignment=-4), ValueError,
                           "expert_alignment must be a positive int, got -4"),
}


@pytest.mark.parametrize("case", list(DISPATCH_CASES))
def test_dispatch_bad_input(ep, case):
  x, idx, kwargs, exc, message = DISPATCH_CASES[case]
  kwargs = dict(kwargs)
  kwargs.setdefault("num_experts", E)
  weights = kwargs.pop("topk_weights", None)
  fp8_alone = kwargs.pop("fp8_alone", False)

  def body(x, *i):
    if fp8_alone:
      x = x.astype(F8)
    return jax_ep.dispatch(ep.buffer, x, i[0] if i else None,
                           None if weights is None else jnp.asarray(weights)[
                               :T], **kwargs)

  args = (x,) if idx is None else (x, idx)
  raises(ep, exc, esc(message), body, *args)


FP8_CASES = {
    "triple": (lambda q, s: (q, s, s), TypeError,
               "dispatch: fp8 x must be a pair (e4m3[T, H], f32 scales"
               "[T, H/128]), got a sequence of 3"),
    "q_dtype": (lambda q, s: (q.astype(jnp.bfloat16), s), TypeError,
                "dispatch: x[0] (fp8 rows) must have dtype in "
                "['float8_e4m3fn'], got bfloat16[4, 256]"),
    "q_ndim": (lambda q, s: (q[None], s), ValueError,
               "x[0] (fp8 rows) must have 2 dimensions"),
    "q_hidden": (lambda q, s: (q[:, :192], s), ValueError,
                 "dispatch: fp8 x has hidden size 192; it must be a multiple "
                 "of 128"),
    "scales_dtype": (lambda q, s: (q, s.astype(jnp.bfloat16)), TypeError,
                     "dispatch: x[1] (fp8 scales) must have dtype in "
                     "['float32'], got bfloat16[4, 2]"),
    "scales_shape": (lambda q, s: (q, s[:, :1]), ValueError,
                     "dispatch: x[1] (fp8 scales) must have shape [4, 2], "
                     "got float32[4, 1] (axis 1)"),
    "scales_tokens": (lambda q, s: (q, s[:3]), ValueError,
                      "x[1] (fp8 scales) must have shape [4, 2], got "
                      "float32[3, 2] (axis 0)"),
}


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_dispatch_bad_fp8_pair(ep, case):
  make, exc, message = FP8_CASES[case]

  def body(x, i):
    pair = make(*jax_ep.per_token_cast_to_fp8(x))
    return jax_ep.dispatch(ep.buffer, pair, i, num_experts=E)

  raises(ep, exc, esc(message), body, arr((T, 256)), ids())


CACHED_CASES = {
    "handle_type": (dict(handle=("not", "a handle")), TypeError,
                    "dispatch: handle must be the DispatchHandle of a "
                    "dispatch, got <class 'tuple'>"),
    "with_topk_idx": (dict(topk_idx=True), ValueError,
                      "dispatch: a cached dispatch (handle=...) takes only x; "
                      "topk_idx, topk_weights, num_experts, capacity and "
                      "expert_alignment come from the handle"),
    "with_weights": (dict(topk_weights=True), ValueError,
                     "a cached dispatch (handle=...) takes only x"),
    "with_num_experts": (dict(num_experts=E), ValueError,
                         "a cached dispatch (handle=...) takes only x"),
    "with_capacity": (dict(capacity=3), ValueError,
                      "a cached dispatch (handle=...) takes only x"),
    "with_alignment": (dict(expert_alignment=2), ValueError,
                       "a cached dispatch (handle=...) takes only x"),
    "tokens": (dict(tokens=T - 1), ValueError,
               "dispatch: x has 3 tokens but the handle was made for 4"),
    "ranks": (dict(ranks=4), ValueError,
              "dispatch: handle is for 4 ranks, the Buffer for 2"),
}


@pytest.mark.parametrize("case", list(CACHED_CASES))
def test_cached_dispatch_bad_input(ep, case):
  kwargs, exc, message = CACHED_CASES[case]
  kwargs = dict(kwargs)

  def body(x, i):
    handle = jax_ep.dispatch(ep.buffer, x, i, num_experts=E).handle
    if "ranks" in kwargs:
      handle = dataclasses.replace(handle, num_ranks=kwargs.pop("ranks"))
    handle = kwargs.pop("handle", handle)
    rows = x[:kwargs.pop("tokens", T)]
    if kwargs.pop("topk_idx", False):
      kwargs["topk_idx"] = i
    if kwargs.pop("topk_weights", False):
      kwargs["topk_weights"] = jnp.ones(i.shape, jnp.float32)
    return jax_ep.dispatch(ep.buffer, rows, handle=handle, **kwargs)

  raises(ep, exc, esc(message), body, arr((T, H), BF16), ids())


# ---------------------------------------------------------------- combine

M = R * T  # default capacity


COMBINE_CASES = {
    "handle_type": (dict(handle="nope"), TypeError,
                    "combine: handle must be the DispatchHandle of a "
                    "dispatch, got <class 'str'>"),
    "handle_ranks": (dict(ranks=8), ValueError,
                     "combine: handle is for 8 ranks, the Buffer for 2"),
    "y_ndim": (dict(y=(M, H, 1)), ValueError,
               "combine: y must have 2 dimensions, got bfloat16[8, 64, 1]"),
    "y_dtype": (dict(y=(M, H), y_dtype=np.int32), TypeError,
                "combine: y must have dtype in ['bfloat16', 'float16', "
                "'float32'], got int32[8, 64]"),
    "y_rows": (dict(y=(M - 1, H)), ValueError,
               "combine: y must have shape [8, '*'], got bfloat16[7, 64] "
               "(axis 0)"),
    "y_row_bytes": (dict(y=(M, 4)), ValueError,
                    "combine: a row of y is 8 bytes (bfloat16[8, 4]); rows "
                    "must be a multiple of 16 bytes"),
    "weights_rows": (dict(weights=((M - 2, K), np.float32)), ValueError,
                     "combine: topk_weights must have shape [8, '*'], got "
                     "float32[6, 2] (axis 0)"),
    "weights_dtype": (dict(weights=((M, K), BF16)), TypeError,
                      "combine: topk_weights must have dtype in ['float32']"),
    "bias_shape": (dict(bias=[((T, H + 8), np.float32)]), ValueError,
                   "combine: bias must have shape [4, 64], got "
                   "float32[4, 72] (axis 1)"),
    "bias_tokens": (dict(bias=[((T + 1, H), np.float32)]), ValueError,
                    "combine: bias must have shape [4, 64], got "
                    "float32[5, 64] (axis 0)"),
    "bias_ndim": (dict(bias=[((T * H,), np.float32)]), ValueError,
                  "combine: bias must have 2 dimensions"),
    "bias_dtype": (dict(bias=[((T, H), np.int32)]), TypeError,
                   "combine: bias must have dtype in ['bfloat16', 'float16', "
                   "'float32'], got int32[4, 64]"),
    "bias_tuple_second": (dict(bias=[((T, H), np.float32),
                                     ((T, H - 8), BF16)], as_tuple=True),
                          ValueError, "combine: bias[1] must have shape "
                          "[4, 64], got bfloat16[4, 56] (axis 1)"),
}


@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_combine_bad_input(ep, case):
  spec, exc, message = COMBINE_CASES[case]

  def body(x, i):
    handle = jax_ep.dispatch(ep.buffer, x, i, num_experts=E).handle
    if "ranks" in spec:
      handle = dataclasses.replace(handle, num_ranks=spec["ranks"])
    handle = spec.get("handle", handle)
    y = jnp.ones(spec.get("y", (M, H)), spec.get("y_dtype", BF16))
    w = None
    if "weights" in spec:
      w = jnp.ones(*spec["weights"])
    bias = [jnp.ones(*b) for b in spec.get("bias", [])]
    bias = tuple(bias) if spec.get("as_tuple") else (bias[0] if bias else None)
    return jax_ep.combine(ep.buffer, y, handle, w, bias=bias)

  raises(ep, exc, esc(message), body, arr((T, H), BF16), ids())


# ---------------------------------------------------------------- low latency


LL_DISPATCH_CASES = {
    "zero_padding": (dict(zero_padding="no"), TypeError,
                     "low_latency_dispatch: zero_padding must be a bool, got "
                     "'no'"),
    "tmax_zero": (dict(num_max_dispatch_tokens_per_rank=0), ValueError,
                  "low_latency_dispatch: num_max_dispatch_tokens_per_rank "
                  "must be a positive int, got 0"),
    "tmax_float": (dict(num_max_dispatch_tokens_per_rank=4.0), ValueError,
                   "num_max_dispatch_tokens_per_rank must be a positive int, "
                   "got 4.0"),
    "tokens_above_tmax": (dict(num_max_dispatch_tokens_per_rank=T - 1),
                          ValueError, "low_latency_dispatch: x has 4 tokens "
                          "but num_max_dispatch_tokens_per_rank is 3"),
    "experts_not_multiple": (dict(num_experts=9), ValueError,
                             "low_latency_dispatch: num_experts (9) must be a "
                             "multiple of the EP size (2)"),
    "x_f32": (dict(x_dtype=np.float32), TypeError,
              "low_latency_dispatch: x must have dtype in ['bfloat16'], got "
              "float32[4, 128]"),
    "x_ndim": (dict(x_shape=(T, 2, 64)), ValueError,
               "low_latency_dispatch: x must have 2 dimensions"),
    "x_row_bytes": (dict(x_shape=(T, 12), use_fp8=False), ValueError,
                    "low_latency_dispatch: a row of x is 24 bytes "
                    "(bfloat16[4, 12]); rows must be a multiple of 16 bytes"),
    "idx_k": (dict(idx_shape=(T, 9)), ValueError,
              "low_latency_dispatch: topk_idx has K=9 columns"),
    "idx_tokens": (dict(idx_shape=(T - 1, K)), ValueError,
                   "low_latency_dispatch: topk_idx must have shape [4, '*'], "
                   "got int32[3, 2] (axis 0)"),
    "idx_dtype": (dict(idx_dtype=np.uint32), TypeError,
                  "low_latency_dispatch: topk_idx must have dtype in "
                  "['int32']"),
    "fp8_hidden": (dict(x_shape=(T, 64)), ValueError,
                   "low_latency_dispatch: the hidden size must be a multiple "
                   "of 128 for fp8, got 64"),
    "ue8m0_hidden": (dict(x_shape=(T, 256), use_ue8m0=True), ValueError,
                     "low_latency_dispatch: the hidden size must be a multiple "
                     "of 512 for fp8 with UE8M0 scales, got 256"),
    "round_scale_without_fp8": (dict(use_fp8=False, round_scale=True),
                                ValueError, "low_latency_dispatch: "
                                "round_scale and use_ue8m0 need use_fp8=True"),
    "ue8m0_without_fp8": (dict(use_fp8=False, use_ue8m0=True, x_shape=(T, 512)),
                          ValueError, "round_scale and use_ue8m0 need "
                          "use_fp8=True"),
}


@pytest.mark.parametrize("case", list(LL_DISPATCH_CASES))
def test_low_latency_dispatch_bad_input(ep, case):
  spec, exc, message = LL_DISPATCH_CASES[case]
  spec = dict(spec)
  x = arr(spec.pop("x_shape", (T, 128)), spec.pop("x_dtype", BF16))
  idx = ids(spec.pop("idx_shape", (T, K)), spec.pop("idx_dtype", np.int32))
  kwargs = dict(num_max_dispatch_tokens_per_rank=T, num_experts=E)
  kwargs.update(spec)
  raises(ep, exc, esc(message), lambda x, i: jax_ep.low_latency_dispatch(
      ep.buffer, x, i, **kwargs), x, idx)


LL_COMBINE_CASES = {
    "handle_type": (dict(handle=object()), TypeError,
                    "low_latency_combine: handle must be the LowLatencyHandle "
                    "of a low_latency_dispatch, got <class 'object'>"),
    "normal_handle": (dict(handle="normal"), TypeError,
                      "handle must be the LowLatencyHandle of a "
                      "low_latency_dispatch, got <class "
                      "'jax_ep._src.handles.DispatchHandle'>"),
    "handle_ranks": (dict(ranks=4), ValueError,
                     "low_latency_combine: handle is for 4 ranks, the Buffer "
                     "for 2"),
    "y_ndim": (dict(y=(4 * R * T, 128)), ValueError,
               "low_latency_combine: y must have 3 dimensions"),
    "y_dtype": (dict(y_dtype=jnp.float32), TypeError,
                "low_latency_combine: y must have dtype in ['bfloat16'], got "
                "float32[4, 8, 128]"),
    "y_slots": (dict(y=(4, R * T + 1, 128)), ValueError,
                "low_latency_combine: y must have shape [4, 8, 128], got "
                "bfloat16[4, 9, 128] (axis 1)"),
    "y_hidden": (dict(y=(4, R * T, 256)), ValueError,
                 "y must have shape [4, 8, 128], got bfloat16[4, 8, 256] "
                 "(axis 2)"),
    "y_experts": (dict(y=(3, R * T, 128)), ValueError,
                  "y must have shape [4, 8, 128], got bfloat16[3, 8, 128] "
                  "(axis 0)"),
    "idx_tokens": (dict(idx=(T + 1, K)), ValueError,
                   "low_latency_combine: topk_idx must have shape [4, '*']"),
    "weights_missing": (dict(weights=None), ValueError,
                        "low_latency_combine: topk_weights is required"),
    "weights_dtype": (dict(weights=jnp.bfloat16), TypeError,
                      "low_latency_combine: topk_weights must have dtype in "
                      "['float32']"),
    "weights_shape": (dict(weights_shape=(T, K + 1)), ValueError,
                      "low_latency_combine: topk_weights must have shape "
                      "[4, 2], got float32[4, 3] (axis 1)"),
    "zero_copy": (dict(zero_copy=1), TypeError,
                  "low_latency_combine: zero_copy must be a bool, got 1"),
}


@pytest.mark.parametrize("case", list(LL_COMBINE_CASES))
def test_low_latency_combine_bad_input(ep, case):
  spec, exc, message = LL_COMBINE_CASES[case]

  def body(x, i):
    d = jax_ep.low_latency_dispatch(ep.buffer, x, i,
                                    num_max_dispatch_tokens_per_rank=T,
                                    num_experts=E, use_fp8=False)
    handle = d.handle
    if "ranks" in spec:
      handle = dataclasses.replace(handle, num_ranks=spec["ranks"])
    if spec.get("handle") == "normal":
      handle = jax_ep.dispatch(ep.buffer, x, i, num_experts=E).handle
    elif "handle" in spec:
      handle = spec["handle"]
    y = jnp.ones(spec.get("y", (4, R * T, 128)), spec.get("y_dtype",
                                                          jnp.bfloat16))
    idx = jnp.zeros(spec["idx"], jnp.int32) if "idx" in spec else i
    w = jnp.ones(spec.get("weights_shape", (T, K)),
                 spec.get("weights", jnp.float32) or jnp.float32)
    if "weights" in spec and spec["weights"] is None:
      w = None
    return jax_ep.low_latency_combine(ep.buffer, y, idx, w, handle,
                                      zero_copy=spec.get("zero_copy", False))

  raises(ep, exc, esc(message), body, arr((T, 128), BF16), ids())


# ---------------------------------------------------------------- shard_map


OPS = {
    "get_dispatch_layout": lambda b, x, i: jax_ep.get_dispatch_layout(b, i, E),
    "dispatch": lambda b, x, i: jax_ep.dispatch(b, x, i, num_experts=E),
    "low_latency_dispatch": lambda b, x, i: jax_ep.low_latency_dispatch(
        b, x, i, num_max_dispatch_tokens_per_rank=T, num_experts=E),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_ops_outside_shard_map(ep, op, jit):
  x, i = jnp.ones((T, 128), jnp.bfloat16), jnp.zeros((T, K), jnp.int32)
  call = lambda x, i: OPS[op](ep.buffer, x, i)
  with pytest.raises(ValueError, match=esc(
      f"jax_ep.{op} must be called inside jax.shard_map over the EP axis "
      "'ep'")):
    (jax.jit(call) if jit else call)(x, i)


def test_combine_outside_shard_map(ep):
  def body(x, i):
    return jax_ep.dispatch(ep.buffer, x, i, num_experts=E).handle

  handle = ep.run(body, arr((T, 128), BF16), ids())
  with pytest.raises(ValueError, match=esc(
      "jax_ep.combine must be called inside jax.shard_map")):
    jax_ep.combine(ep.buffer, jnp.ones((M, 128), jnp.bfloat16), handle)


@pytest.mark.parametrize("op", list(OPS))
def test_ops_on_an_axis_of_another_size(op):
  """A Buffer for 4 ranks used under shard_map over an 'ep' axis of 2."""
  big, small = Ep(4), Ep(2)
  with pytest.raises(ValueError, match=esc(
      f"jax_ep.{op}: axis 'ep' has size 2 here but the Buffer was built for "
      "4 ranks")):
    small.trace(lambda x, i: OPS[op](big.buffer, x, i), arr((T, 128), BF16),
                ids())


# ---------------------------------------------------------------- Buffer


def _mesh(n, names=("ep",)):
  return jax.make_mesh((n,), names, devices=cpu_devices(n))


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(axis_name="tp"), ValueError,
     "jax_ep.Buffer: axis_name 'tp' is not an axis of the mesh (axes ('ep',))"),
    (dict(backend="tpu"), ValueError,
     "jax_ep.Buffer: backend must be one of ('auto', 'cuda', 'reference'), "
     "got 'tpu'"),
    (dict(config=dict(num_sms=24)), TypeError,
     "jax_ep.Buffer: config must be a jax_ep.Config, got <class 'dict'>"),
    (dict(ranks_per_node=3), ValueError,
     "jax_ep.Buffer: ranks_per_node must be a positive divisor of the EP size "
     "4, got 3"),
    (dict(ranks_per_node=0), ValueError,
     "ranks_per_node must be a positive divisor of the EP size 4, got 0"),
    (dict(ranks_per_node="2"), ValueError,
     "ranks_per_node must be a positive divisor of the EP size 4, got '2'"),
    (dict(ranks_per_node=8), ValueError,
     "ranks_per_node must be a positive divisor of the EP size 4, got 8"),
    (dict(num_nvl_bytes=-1), ValueError,
     "jax_ep.Buffer: num_nvl_bytes must be an int >= 0 (see "
     "jax_ep.nvl_buffer_bytes), got -1"),
    (dict(num_nvl_bytes=1.5), ValueError,
     "num_nvl_bytes must be an int >= 0"),
    (dict(num_ll_bytes=-1), ValueError,
     "jax_ep.Buffer: num_ll_bytes must be an int >= 0 (see "
     "jax_ep.ll_buffer_bytes), got -1"),
    (dict(ll_transport="rdma"), ValueError,
     "jax_ep.Buffer: ll_transport must be one of ('auto', 'put'), got 'rdma'"),
    (dict(timeout_s=0), ValueError,
     "jax_ep.Buffer: timeout_s must be > 0, got 0"),
])
def test_buffer_bad_arguments(kwargs, exc, message):
  kwargs = dict(kwargs)
  axis = kwargs.pop("axis_name", "ep")
  with pytest.raises(exc, match=esc(message)):
    jax_ep.Buffer(_mesh(4), axis, **kwargs)


def test_buffer_node_size_must_be_supported():
  with pytest.raises(ValueError, match=esc(
      "jax_ep.Buffer: ranks_per_node must be one of (1, 2, 4, 8) when the EP "
      "axis spans several nodes, got 3")):
    jax_ep.Buffer(_mesh(6), "ep", ranks_per_node=3)


def test_reference_backend_ignores_num_nvl_bytes():
  buffer = jax_ep.Buffer(_mesh(2), "ep", backend="reference",
                         num_nvl_bytes=1 << 20)
  assert buffer.normal_backend("dispatch") == ReferenceNormal("ep", 2)


def test_nothing_is_a_fallback_on_the_reference_backend():
  ep = Ep(2)
  x = np.ones((2 * 4, 16), np.float16)
  idx = np.zeros((2 * 4, 2), np.int32)

  def round_trip(x, i):
    d = jax_ep.dispatch(ep.buffer, x, i, num_experts=4)
    return jax_ep.combine(ep.buffer, d.x, d.handle)

  ep.run(round_trip, x, idx)
  assert ep.buffer.fallbacks() == ()


def test_reference_backend_ignores_num_ll_bytes():
  buffer = jax_ep.Buffer(_mesh(2), "ep", backend="reference",
                         num_ll_bytes=1 << 20, ll_transport="put")
  assert buffer.low_latency_backend("low_latency_dispatch") == (
      ReferenceLowLatency("ep"))


def test_ll_buffer_bytes_grows_with_every_shape_but_not_with_ranks():
  # Two sets of E*Tmax message, combine-row and staging slots: linear in
  # Tmax and E, about 6H bytes per slot and set pair.
  base = jax_ep.ll_buffer_bytes(128, 7168, 288)
  assert 2 * 288 * 128 * 6 * 7168 <= base <= 2.1 * 288 * 128 * 6 * 7168
  for bigger in ((256, 7168, 288), (128, 8192, 288), (128, 7168, 320)):
    assert jax_ep.ll_buffer_bytes(*bigger) > base


def test_nvl_buffer_bytes_follows_the_slot_layout():
  # slots of T rows with their routing (position + K ids + K
  # weights), plus an int32 [R, T] scratch; sections 256-byte aligned.
  T, H, K = 4096, 7168, 8
  for R in (1, 2, 8):
    assert jax_ep.nvl_buffer_bytes(T, H, K, R) == (
        R * T * 4 + (R - 1) * T * (2 * H + 4 + 8 * K))
  fp8 = jax_ep.nvl_buffer_bytes(T, H, K, 2, jnp.float8_e4m3fn)
  assert fp8 < jax_ep.nvl_buffer_bytes(T, H, K, 2)  # combine rows are bf16


def test_rdma_buffer_bytes_follows_the_region_layout():
  # Flags (u64 free[1024] + arrived[1024 ranks x 64 chunks]), then two
  # int32 masks and two slot arrays of the widest exchanged row (a
  # dispatched row with its K ids and K weights, or a combine row) for the
  # larger leg: N * T slots over the network, G * (N * T) = R * T inside a
  # node of G > 1; sections 256-byte aligned.
  T, H, K = 4096, 7168, 8
  flags = 1024 * 8 + 1024 * 64 * 8
  row = 2 * H + 8 * K  # a multiple of 16 here
  for R, G in ((2, 1), (8, 1), (16, 8), (16, 2)):
    assert jax_ep.rdma_buffer_bytes(T, H, K, R, G) == (
        flags + 2 * R * T * 4 + 2 * R * T * row)
  fp8 = jax_ep.rdma_buffer_bytes(T, H, K, 2, 1, jnp.float8_e4m3fn)
  assert fp8 == jax_ep.rdma_buffer_bytes(T, H, 0, 2, 1)  # combine rows widest


def test_rdma_settings_become_nvshmem_variables():
  from jax_ep._src.cuda import nvshmem  # pylint: disable=g-import-not-at-top
  assert nvshmem.rdma_environment() == {}
  assert nvshmem.rdma_environment(qps_per_rank=8, service_level=3,
                                  traffic_class=106) == {
                                      "NVSHMEM_IBGDA_NUM_RC_PER_PE": "8",
                                      "NVSHMEM_IB_SL": "3",
                                      "NVSHMEM_IB_TRAFFIC_CLASS": "106"}


@pytest.mark.parametrize("name,value,limits", [
    ("rdma_qps_per_rank", 0, "[1, 1024]"),
    ("rdma_service_level", 16, "[0, 15]"),
    ("rdma_traffic_class", -1, "[0, 255]"),
    ("rdma_service_level", True, "[0, 15]")])
def test_rdma_settings_out_of_range_are_refused(name, value, limits):
  with pytest.raises(ValueError, match=esc(
      f"jax_ep.Buffer: {name} must be an int in {limits}, got {value!r}")):
    jax_ep.Buffer(_mesh(2), "ep", backend="reference", **{name: value})


def test_buffer_sizes_give_the_buffer_what_its_topology_needs():
  T, H, K = 512, 1024, 8
  assert jax_ep.buffer_sizes(T, H, K, 8) == {
      "num_nvl_bytes": jax_ep.nvl_buffer_bytes(T, H, K, 8)}
  assert jax_ep.buffer_sizes(T, H, K, 8, ranks_per_node=8) == {
      "num_nvl_bytes": jax_ep.nvl_buffer_bytes(T, H, K, 8)}
  assert jax_ep.buffer_sizes(T, H, K, 8, ranks_per_node=2,
                             ll_max_tokens=64, num_experts=32) == {
      "num_rdma_bytes": jax_ep.rdma_buffer_bytes(T, H, K, 8, 2),
      "num_ll_bytes": jax_ep.ll_buffer_bytes(64, H, 32)}
  with pytest.raises(ValueError, match="pass both ll_max_tokens and "
                     "num_experts"):
    jax_ep.buffer_sizes(T, H, K, 8, ll_max_tokens=64)
  buffer = jax_ep.Buffer(_mesh(2), "ep", backend="reference", ranks_per_node=1,
                         **jax_ep.buffer_sizes(T, H, K, 2, ranks_per_node=1))
  assert buffer.num_rdma_bytes == jax_ep.rdma_buffer_bytes(T, H, K, 2, 1)


def test_reference_backend_ignores_num_rdma_bytes():
  buffer = jax_ep.Buffer(_mesh(2), "ep", backend="reference",
                         ranks_per_node=1, num_rdma_bytes=1 << 20)
  assert buffer.normal_backend("dispatch").ranks_per_node == 1
  with pytest.raises(ValueError, match=esc(
      "jax_ep.Buffer: num_rdma_bytes must be an int >= 0 (see "
      "jax_ep.rdma_buffer_bytes), got -1")):
    jax_ep.Buffer(_mesh(2), "ep", backend="reference", num_rdma_bytes=-1)


def test_intranode_kernel_timeout_is_checked_at_trace_time():
  """The wrappers check only the timeout: `Config` checked the rest."""
  from jax_ep._src.cuda import intranode  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((16, 2), jnp.int32)
  with pytest.raises(ValueError, match=esc(
      "jax_ep.intranode_dispatch: timeout_s must be > 0, got 0.0")):
    jax.eval_shape(lambda x, idx: intranode.dispatch(
        (x,), idx, None, axis_name="ep", num_ranks=2, num_experts=8,
        capacity=32, expert_alignment=1, buffers=None, timeout_s=0.0), x, idx)


def test_buffer_cuda_backend_on_cpu_is_a_clear_error():
  with pytest.raises(RuntimeError, match=esc(
      "jax_ep.Buffer: backend='cuda' needs the EP mesh axis on CUDA GPUs, but "
      "its devices are on ['cpu']; use backend='reference' or 'auto'")):
    jax_ep.Buffer(_mesh(2), "ep", backend="cuda")


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(4, None), (4, 2),
                                                      (8, 1), (6, 6), (2, 2)])
def test_buffer_topology(num_ranks, ranks_per_node):
  buffer = jax_ep.Buffer(_mesh(num_ranks), "ep", backend="auto",
                         ranks_per_node=ranks_per_node)
  rpn = num_ranks if ranks_per_node is None else ranks_per_node
  assert buffer.backend == "reference"  # auto on CPU
  assert buffer.num_ranks == num_ranks
  assert buffer.topology == jax_ep.Topology(num_ranks, rpn, num_ranks // rpn,
                                            (0,) * num_ranks)
  assert not buffer.topology.one_process_per_rank or num_ranks == 1
  assert buffer.config == jax_ep.Config()
  assert f"num_ranks={num_ranks}" in repr(buffer)


def test_buffer_on_a_2d_mesh_uses_its_ep_axis():
  devices = np.array(cpu_devices(8)).reshape(2, 4)
  mesh = jax.sharding.Mesh(devices, ("dp", "ep"))
  buffer = jax_ep.Buffer(mesh, "ep", backend="reference")
  assert buffer.num_ranks == 4 and buffer.axis_name == "ep"


# ---------------------------------------------------------------- Config


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "8", None])
def test_config_send_warps_must_be_a_positive_int(value):
  with pytest.raises(ValueError, match=esc(
      f"jax_ep.Config: nvl_send_warps must be a positive int, got "
      f"{value!r}")):
    jax_ep.Config(nvl_send_warps=value)


@pytest.mark.parametrize("field", ["num_sms", "nvl_chunk", "rdma_chunk"])
@pytest.mark.parametrize("value", [-1, 2.0, True, "8", None])
def test_config_chunks_must_be_ints_from_zero(field, value):
  with pytest.raises(ValueError, match=esc(
      f"jax_ep.Config: {field} must be an int >= 0 (0: automatic), got "
      f"{value!r}")):
    jax_ep.Config(**{field: value})


@pytest.mark.parametrize("value", [1, 0, None, "yes"])
def test_config_nvl_copy_engine_must_be_a_bool(value):
  with pytest.raises(ValueError, match=esc(
      f"jax_ep.Config: nvl_copy_engine must be a bool, got {value!r}")):
    jax_ep.Config(nvl_copy_engine=value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_sms=23), "jax_ep.Config: num_sms must be even, got 23"),
    (dict(nvl_send_warps=16), "jax_ep.Config: nvl_send_warps must be at "
     "most 15"),
])
def test_config_consistency(kwargs, message):
  with pytest.raises(ValueError, match=esc(message)):
    jax_ep.Config(**kwargs)


def test_config_is_frozen_and_keyword_only():
  config = jax_ep.Config(num_sms=20, nvl_chunk=8)
  assert (config.num_sms, config.nvl_chunk, config.rdma_chunk) == (20, 8, 0)
  with pytest.raises(TypeError):
    jax_ep.Config(24, 6, 4)  # pylint: disable=too-many-function-args
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.num_sms = 2
  jax_ep.Config(num_sms=2, nvl_send_warps=1, nvl_chunk=0,
                rdma_chunk=0)  # the smallest valid config


# ---------------------------------------------------------------- no tokens


ZERO_TOKEN_OPS = {
    "get_dispatch_layout": lambda b, x, i: jax_ep.get_dispatch_layout(b, i, E),
    "dispatch": lambda b, x, i: jax_ep.dispatch(b, x, i, num_experts=E),
    "dispatch_capacity": lambda b, x, i: jax_ep.dispatch(b, x, i, num_experts=E,
                                                         capacity=4),
    "low_latency_dispatch": lambda b, x, i: jax_ep.low_latency_dispatch(
        b, x, i, num_max_dispatch_tokens_per_rank=2, num_experts=E,
        use_fp8=False),
}


@pytest.mark.parametrize("op", list(ZERO_TOKEN_OPS))
def test_zero_tokens_work_or_fail_clearly(ep, op):
  """T = 0 (nothing to send) is either an empty result or a jax_ep error
  naming the op at trace time (docs/contract.md, "Bad input"); never an
  internal crash."""
  x, i = np.zeros((0, 128), BF16), np.zeros((0, K), np.int32)
  try:
    ep.trace(lambda x, i: ZERO_TOKEN_OPS[op](ep.buffer, x, i), x, i)
  except (ValueError, TypeError) as e:
    name = op.split("_capacity")[0]
    assert str(e).startswith(f"jax_ep.{name}"), f"{type(e).__name__}: {e}"
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"{op} with T=0 crashed: {type(e).__name__}: {e}")


def test_check_capacity_on_an_explicit_axis_says_what_to_do():
  """`jax.make_mesh` makes Explicit axes; checkify cannot report through
  shard_map over them, so check_capacity refuses with a jax_ep message."""
  mesh = jax.make_mesh((2,), ("ep",), devices=cpu_devices(2))
  buffer = jax_ep.Buffer(mesh, "ep", backend="reference")

  def body(x, i):
    d = jax_ep.dispatch(buffer, x, i, num_experts=4, capacity=2)
    jax_ep.check_capacity(d)
    return d.x

  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
  f = jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
  with pytest.raises(ValueError, match=re.escape(
      "jax_ep.check_capacity: the Buffer's mesh axis is of type "
      "AxisType.Explicit (jax.make_mesh's default)")):
    checkify.checkify(f)(put(jnp.ones((8, 64), jnp.bfloat16)),
                         put(jnp.zeros((8, 2), jnp.int32)))


def test_num_sms_above_the_sm_count_is_refused():
  """runtime.check_sms, as Buffer runs it on GPUs (which say `core_count`)."""
  gpu = types.SimpleNamespace(core_count=132)
  runtime.check_sms(jax_ep.Config(num_sms=132), [gpu, gpu])
  runtime.check_sms(jax_ep.Config(num_sms=200), [types.SimpleNamespace()])
  with pytest.raises(ValueError, match=re.escape(
      "jax_ep.Buffer: config.num_sms is 134 but the GPUs have 132 SMs")):
    runtime.check_sms(jax_ep.Config(num_sms=134), [gpu])
