"""The internode backend's JAX side on CPU ranks, with its one kernel (the
row exchange, within the ranks of a local index or of a node) emulated with
an all_gather: dispatch, cached dispatch, combine and their VJPs must give
the reference's bits at several (nodes, ranks per node), and the packing of
rows into exchanged bytes must round-trip. The kernel runs on GPUs in
tests/cuda/test_internode_gpu.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import jax_ep
from jax_ep._src.cuda import internode
from ep_testing import BF16, assert_same, flat

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


# The (team size, tokens) of every emulated kernel call, as traced.
CALLS = []


@dataclasses.dataclass(frozen=True)
class EmulatedExchange(internode.CudaInternode):
  """The exchange kernel's contract in JAX (one call, `_exchange_call`):
  member i of a team of Z ranks spaced `stride` apart is first + i *
  stride."""

  def _exchange_call(self, rows, src_row, within_node):
    CALLS.append(src_row.shape)
    rank = lax.axis_index(self.axis_name)
    size = src_row.shape[0]
    stride = 1 if within_node else self.ranks_per_node
    first = rank // (stride * size) * (stride * size) + rank % stride
    num_rows = rows.shape[0]
    sent = (src_row >= 0) & (src_row < num_rows)
    out = jnp.where(sent[..., None],
                    jnp.take(rows, jnp.clip(src_row, 0, num_rows - 1), axis=0),
                    jnp.uint8(0))
    members = first + jnp.arange(size) * stride
    me = (rank - first) // stride
    recv = lax.all_gather(out, self.axis_name)[members, me]
    return recv, lax.all_gather(sent, self.axis_name)[members, me]


def _with_emulated_kernels(p, ranks_per_node, num_rdma_bytes=1 << 40):
  """`p.buffer`'s normal ops on the internode backend's JAX side, its
  exchanges in a region of `num_rdma_bytes`."""
  backend = EmulatedExchange(p.buffer.axis_name, num_rdma_bytes,
                             ranks_per_node, 100.0)
  p.buffer.normal_backend = lambda op: dataclasses.replace(backend, op=op)
  return p


@pytest.mark.parametrize("dtype", [BF16, np.float32, FP8])
def test_pack_round_trips(rng, dtype):
  """Rows of any widths come back bit for bit (padding bytes dropped)."""
  a = rng.normal(size=(5, 24)).astype(dtype)
  b = rng.integers(-9, 9, size=(5, 3), dtype=np.int32)
  c = rng.normal(size=(5, 1)).astype(np.float32)
  packed = internode.pack((a, b, c))
  assert packed.dtype == jnp.uint8 and packed.shape[1] % 16 == 0
  for got, want in zip(internode.unpack(packed, (a, b, c)), (a, b, c)):
    assert_same(got, want, "unpacked", f"dtype={dtype}")


# A region for 5 tokens of dispatch's rows (the "small" shape's bf16 x,
# H = 128, with K = 4 ids and weights: 288 bytes) between the 2 ranks of a
# team: the 12-token calls go in pieces.
SMALL_REGION = internode.native.sizes_module().exchange_region_bytes(
    2, 5, 288)


@pytest.mark.parametrize("num_ranks,ranks_per_node,routing,capacity,region", [
    (2, 1, "distinct", None, None), (4, 1, "invalid", None, None),
    (4, 2, "hot", 12, None), (8, 2, "duplicates", None, None),
    (8, 4, "invalid", 40, None), (8, 4, "empty_rank", None, None),
    (4, 2, "duplicates", 30, SMALL_REGION)])
def test_ops_give_the_reference_bits(problem, num_ranks, ranks_per_node,
                                     routing, capacity, region):
  """Every output of dispatch (bf16 and fp8 rows, weights), of a cached
  dispatch and of combine (rows, weights, bias) equals the reference's,
  across nodes of G ranks (combine's partials rounded per node), capacity
  overflow included; with a `region` too small for whole calls, the
  exchanges go in pieces of tokens and give the same bits."""
  CALLS.clear()
  kernels = _with_emulated_kernels(
      problem(num_ranks, "small", ranks_per_node=ranks_per_node),
      ranks_per_node, region or 1 << 40)
  reference = jax_ep.Buffer(kernels.mesh, "ep", backend="reference",
                            ranks_per_node=ranks_per_node)
  s = kernels.shape
  idx, x, w = kernels.routing(routing), kernels.rows(BF16), kernels.weights()
  q, scales = (np.asarray(a) for a in jax.jit(jax_ep.per_token_cast_to_fp8)(
      x.reshape(-1, s.hidden)))
  q, scales = q.reshape(*x.shape), scales.reshape(num_ranks, s.tokens, -1)
  y = kernels.rows(BF16, num_rows=capacity or num_ranks * s.tokens)
  bias = kernels.rows(np.float32)

  def ops(buffer):
    def body(x, q, scales, i, w, y, bias):
      d = jax_ep.dispatch(buffer, x, i, w, num_experts=s.experts,
                          capacity=capacity)
      d8 = jax_ep.dispatch(buffer, (q, scales), i, num_experts=s.experts,
                           capacity=capacity)
      again = jax_ep.dispatch(buffer, (q, scales), handle=d.handle)
      out, out_w = jax_ep.combine(buffer, y, d.handle, d.topk_weights, bias)
      return (d.x, d.topk_idx, d.topk_weights, d.num_recv_tokens,
              d.num_recv_tokens_per_expert, d.handle.src_index,
              d.handle.recv_row, d8.x, d8.scales, again.x, again.scales, out,
              out_w)
    return body

  args = [flat(a) for a in (x, q, scales, idx, w, y, bias)]
  got = kernels.run(ops(kernels.buffer), *args)
  want = kernels.run(ops(reference), *args)
  names = ("x", "topk_idx", "topk_weights", "num_recv_tokens",
           "num_recv_tokens_per_expert", "src_index", "recv_row", "fp8 x",
           "fp8 scales", "cached x", "cached scales", "out", "out weights")
  for name, g, wnt in zip(names, got, want):
    assert_same(g, wnt, name, kernels.context(
        G=ranks_per_node, routing=routing, capacity=capacity))
  # Whole calls move every token of a leg (T, or N * T), pieces fewer.
  pieces = [t for _, t in CALLS if t < s.tokens]
  assert CALLS and (bool(pieces) == bool(region)), CALLS


@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_gradients_give_the_reference_bits(problem, ranks_per_node):
  """The VJPs (combine's is a cached dispatch, dispatch's a combine) run on
  the same exchanges and give the reference's cotangents."""
  kernels = _with_emulated_kernels(
      problem(4, "small", ranks_per_node=ranks_per_node), ranks_per_node)
  reference = jax_ep.Buffer(kernels.mesh, "ep", backend="reference",
                            ranks_per_node=ranks_per_node)
  s = kernels.shape
  idx, x, w = kernels.routing("distinct"), kernels.rows(BF16), kernels.weights()

  def grads(buffer):
    def loss(x, w, i):
      d = jax_ep.dispatch(buffer, x, i, w, num_experts=s.experts)
      y = d.x * d.topk_weights.sum(-1, keepdims=True).astype(d.x.dtype)
      return jax_ep.combine(buffer, y, d.handle).astype(jnp.float32).sum()

    def body(x, w, i):
      return jax.grad(loss, argnums=(0, 1))(x, w, i)
    return body

  args = [flat(a) for a in (x, w, idx)]
  got = kernels.run(grads(kernels.buffer), *args)
  want = kernels.run(grads(reference), *args)
  for name, g, wnt in zip(("d_x", "d_w"), got, want):
    assert_same(g, wnt, name, kernels.context(G=ranks_per_node))
