"""The dense model itself, on cases small enough to work out by hand.

Every other test trusts `dense_model`; these pin it to docs/contract.md with
answers written out here, not computed.
"""

import numpy as np

import dense_model as dm

F32 = np.float32
BF16 = dm.BF16

# R=2 ranks, T=2 tokens, K=2, E=4 (L=2): rank 0 holds experts 0, 1.
IDX = np.array([[[0, 3], [1, -1]],     # rank 0: t0 -> ranks 0, 1; t1 -> 0
                [[2, 2], [-1, 5]]],    # rank 1: t0 -> 1 (twice); t1 -> none
               np.int32)
W = np.array([[[.5, .25], [.75, .125]], [[2., 4.], [8., 16.]]], F32)
X = np.arange(1, 1 + 2 * 2 * 4, dtype=F32).reshape(2, 2, 4)  # rows a0 a1 b0 b1


def test_layout_by_hand():
  got = dm.layout(IDX, 4)
  np.testing.assert_array_equal(got.num_tokens_per_rank, [[2, 1], [0, 1]])
  np.testing.assert_array_equal(got.num_tokens_per_expert,
                                [[1, 1, 0, 1], [0, 0, 2, 0]])
  np.testing.assert_array_equal(
      got.is_token_in_rank,
      [[[True, True], [True, False]], [[False, True], [False, False]]])
  np.testing.assert_array_equal(got.num_invalid, [0, 1])
  # One node: tokens with any valid expert; two nodes of one rank: per rank.
  np.testing.assert_array_equal(got.num_tokens_per_node, [[2], [1]])
  np.testing.assert_array_equal(
      dm.layout(IDX, 4, ranks_per_node=1).num_tokens_per_node,
      [[2, 1], [0, 1]])


def test_dispatch_by_hand():
  got = dm.dispatch([X], IDX, W, num_experts=4)
  want_x = np.zeros((2, 4, 4), F32)
  want_x[0, :2] = [X[0, 0], X[0, 1]]  # rank 0: (s0, t0), (s0, t1)
  want_x[1, :2] = [X[0, 0], X[1, 0]]  # rank 1: (s0, t0), (s1, t0)
  np.testing.assert_array_equal(got.rows[0], want_x)
  np.testing.assert_array_equal(
      got.topk_idx, [[[0, -1], [1, -1], [-1, -1], [-1, -1]],
                     [[-1, 1], [0, 0], [-1, -1], [-1, -1]]])
  np.testing.assert_array_equal(
      got.topk_weights, [[[.5, 0], [.75, 0], [0, 0], [0, 0]],
                         [[0, .25], [2, 4], [0, 0], [0, 0]]])
  np.testing.assert_array_equal(got.num_tokens, [2, 2])
  np.testing.assert_array_equal(got.num_tokens_per_expert, [[1, 1], [2, 1]])
  np.testing.assert_array_equal(got.src_index, [[0, 1, 4, 4], [0, 2, 4, 4]])
  np.testing.assert_array_equal(got.recv_row,
                                [[[0, 1], [4, 4]], [[0, 4], [1, 4]]])


def test_dispatch_capacity_and_alignment_by_hand():
  got = dm.dispatch([X], IDX, None, num_experts=4, capacity=1,
                    expert_alignment=4)
  np.testing.assert_array_equal(got.rows[0], [[X[0, 0]], [X[0, 0]]])
  np.testing.assert_array_equal(got.num_tokens, [2, 2])  # true counts
  np.testing.assert_array_equal(got.recv_row,
                                [[[0, 1], [1, 1]], [[0, 1], [1, 1]]])
  np.testing.assert_array_equal(got.num_tokens_per_expert, [[4, 4], [4, 4]])
  assert got.topk_weights is None


def test_combine_by_hand():
  routes = dm.dispatch([X], IDX, None, num_experts=4)
  y = np.arange(2 * 4 * 4, dtype=F32).reshape(2, 4, 4) + 100
  bias = np.full((4, 4), 0.5, F32)
  got = dm.combine(y, routes, biases=(bias, bias))
  want = np.array([[y[0, 0] + y[1, 0] + 1, y[0, 1] + 1],
                   [y[1, 1] + 1, np.ones(4, F32)]])
  np.testing.assert_array_equal(got, want)


def test_combine_sums_in_fp32_in_rank_order():
  # Token 0 of rank 0 goes to ranks 0, 1, 2 (E=3, L=1): rows 2^25, 1, -2^25.
  idx = np.array([[[0, 1, 2]], [[-1, -1, -1]], [[-1, -1, -1]]], np.int32)
  x = np.zeros((3, 1, 8), F32)
  routes = dm.dispatch([x], idx, None, num_experts=3)
  y = np.zeros((3, 3, 8), BF16)
  y[:, 0, 0] = [2.0**25, 1.0, -2.0**25]  # fp32 in rank order: 0, not 1
  y[:, 0, 1] = [1.0, 2.0**-8, 2.0**-8]   # bf16 accumulation would give 1
  got = dm.combine(y, routes)
  assert float(got[0, 0, 0]) == 0.0
  assert float(got[0, 0, 1]) == 1.0 + 2.0**-7


def test_low_latency_by_hand():
  routes = dm.low_latency_dispatch(X.astype(BF16), IDX, num_experts=4,
                                   max_tokens=3)
  np.testing.assert_array_equal(routes.count, [[1, 1], [1, 1]])
  want_src = np.full((2, 2, 6), 6)
  want_src[0, 0, 0], want_src[0, 1, 0] = 0, 1   # e0: (s0, t0); e1: (s0, t1)
  want_src[1, 0, 0], want_src[1, 1, 0] = 3, 0   # e2: (s1, t0); e3: (s0, t0)
  np.testing.assert_array_equal(routes.src_index, want_src)
  assert routes.slot[1, 0, 3] == 0 and routes.slot[1, 0, 0] == 6
  np.testing.assert_array_equal(routes.rows[0][1, 0, 0], X[1, 0])
  assert not routes.rows[0][:, :, 1:].any()

  y = np.zeros((2, 2, 6, 4), BF16)
  y[0, 0, 0], y[0, 1, 0], y[1, 0, 0], y[1, 1, 0] = 1, 2, 3, 4
  y[:, :, 1:] = 99  # past the counts: never read
  got = dm.low_latency_combine(y, IDX, W, routes)
  want = np.array([[[.5 * 1 + .25 * 4] * 4, [.75 * 2] * 4],
                   [[2 * 3 + 4 * 3] * 4, [0] * 4]], F32)  # duplicates add
  np.testing.assert_array_equal(got.astype(F32), want)


def test_low_latency_combine_vjp_by_hand():
  routes = dm.low_latency_dispatch(np.zeros((2, 2, 2), BF16), IDX,
                                   num_experts=4, max_tokens=3)
  g = np.array([[[1, -2], [3, .5]], [[-1, 4], [5, 5]]], BF16)
  y = np.full((2, 2, 6, 2), 99, BF16)  # past the counts: never read
  y[0, 0, 0], y[0, 1, 0], y[1, 0, 0], y[1, 1, 0] = [2, -1], [1, -1], \
      [.5, 2], [-3, 1]
  d_y, d_w, bound = dm.low_latency_combine_vjp(g, y, IDX, W, routes)
  want_y = np.zeros(y.shape, F32)
  want_y[0, 0, 0] = [.5, -1]      # e0: g[s0, t0] * .5
  want_y[0, 1, 0] = [2.25, .375]  # e1: g[s0, t1] * .75
  want_y[1, 0, 0] = [-6, 24]      # e2: g[s1, t0] * (2 + 4), listed twice
  want_y[1, 1, 0] = [.25, -.5]    # e3: g[s0, t0] * .25
  assert d_y.dtype == BF16
  np.testing.assert_array_equal(d_y.astype(F32), want_y)
  # <g[t], y[slot of (t, k)]>; 0 for -1 and for expert 5 (out of range).
  np.testing.assert_array_equal(d_w, [[[4, -5], [2.5, 0]],
                                      [[7.5, 7.5], [0, 0]]])
  np.testing.assert_array_equal(  # H * 2^-24 * sum |g * y|
      bound, 2 * 2.0**-24 * np.array([[[4, 5], [3.5, 0]],
                                      [[8.5, 8.5], [0, 0]]]))


def test_fp8_by_hand():
  x = np.zeros((3, 128), F32)
  x[0, :4] = [448, -2, 0.5, 3]    # amax 448: scale 1, q exact
  x[1, :2] = [3, -1]              # amax 3: scale 3/448, pow2: 2^-7
  # row 2 all zero: amax floored at 1e-4
  q, s = dm.per_token_cast_to_fp8(x)
  assert q.dtype == dm.E4M3
  inv448 = F32(1) / F32(448)
  np.testing.assert_array_equal(s[:, 0], [F32(448) * inv448, F32(3) * inv448,
                                          F32(1e-4) * inv448])
  np.testing.assert_array_equal(q[0, :4].astype(F32), [448, -2, 0.5, 3])
  np.testing.assert_array_equal(q[1, :2].astype(F32), [448, -144])  # -149.3 -> -144 (step 16)
  assert not q[2].astype(F32).any()
  _, s = dm.per_token_cast_to_fp8(x, round_scale=True)
  np.testing.assert_array_equal(s[:2, 0], [1.0, 2.0**-7])
  q, _ = dm.per_token_cast_to_fp8(x, round_scale=True)
  np.testing.assert_array_equal(q[1, :2].astype(F32), [384, -128])


def test_ue8m0_packing_by_hand():
  scales = np.array([[1.0, 2.0, 0.5, 2.0**-7]], F32)
  packed = dm.ue8m0_pack(scales)
  assert packed.dtype == np.int32
  assert int(packed[0, 0]) == 127 | 128 << 8 | 126 << 16 | 120 << 24
  np.testing.assert_array_equal(dm.ue8m0_unpack(packed), scales)
  x = np.ones((1, 512), F32)
  x[0, 128:256] = 300.0
  _, packed = dm.per_token_cast_to_fp8(x, use_ue8m0=True)
  # amax 1 -> 1/448 -> 2^-8 (byte 119); amax 300 -> 0.67 -> 2^0 (byte 127)
  assert int(packed[0, 0]) == 119 | 127 << 8 | 119 << 16 | 119 << 24


def test_cast_back_by_hand():
  q = np.array([[2.0] * 128 + [-0.5] * 128], F32).astype(dm.E4M3)
  back = dm.per_token_cast_back(q, np.array([[0.25, 8.0]], F32))
  assert back.dtype == BF16
  np.testing.assert_array_equal(back.astype(F32)[0, [0, 200]], [0.5, -4.0])
