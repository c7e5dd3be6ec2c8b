// Intranode combine kernel. The call around it (the kernel sequence, the
// barrier, the data region and why one copy of it suffices) is described at
// the top of launch.cu; kernels.cuh has what it shares with dispatch.cu's
// kernels.
//
// Combine. A pushing warp on rank r sends, for each owner s and chunk, the
// rows y[recv_row[s, t]] into s's slot at t and row_of[t] = recv_row[s, t];
// a receiving warp on s waits for the chunk from every peer, then sums for
// each token, in fp32 and rank order, the R contributions (its own from y,
// +0.0 where the row is M): total = v_0, total = total + v_r, then adds the
// bias (f32) and rounds once to the output type, exactly as the reference.

#include <cuda_bf16.h>

#include "intranode/kernels.cuh"

namespace jax_ep::intranode {
namespace {

// V elements of type In at `src` as floats (exact: bf16 -> f32 is a shift).
template <typename In, int V>
__device__ __forceinline__ void LoadFloats(const char* src, float* out) {
  if constexpr (sizeof(In) == 2 && V == 8) {
    const int4 raw = __ldcg(reinterpret_cast<const int4*>(src));
    const uint32_t words[4] = {static_cast<uint32_t>(raw.x),
                               static_cast<uint32_t>(raw.y),
                               static_cast<uint32_t>(raw.z),
                               static_cast<uint32_t>(raw.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  } else if constexpr (sizeof(In) == 2) {
    static_assert(V == 1);
    out[0] = __uint_as_float(
        static_cast<uint32_t>(__ldcg(reinterpret_cast<const uint16_t*>(src)))
        << 16);
  } else if constexpr (V == 4) {
    const float4 raw = __ldcg(reinterpret_cast<const float4*>(src));
    out[0] = raw.x;
    out[1] = raw.y;
    out[2] = raw.z;
    out[3] = raw.w;
  } else {
    static_assert(V == 1);
    out[0] = __ldcg(reinterpret_cast<const float*>(src));
  }
}

// Stores V floats at `dst` as Out, rounding to nearest even once.
template <typename Out, int V>
__device__ __forceinline__ void StoreFloats(char* dst, const float* v) {
  if constexpr (sizeof(Out) == 2 && V == 8) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      words[i] = *reinterpret_cast<const uint32_t*>(&pair);
    }
    *reinterpret_cast<int4*>(dst) = make_int4(words[0], words[1], words[2],
                                              words[3]);
  } else if constexpr (sizeof(Out) == 2) {
    static_assert(V == 1);
    *reinterpret_cast<__nv_bfloat16*>(dst) = __float2bfloat16_rn(v[0]);
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      reinterpret_cast<float4*>(dst)[i / 4] =
          make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  } else {
    static_assert(V == 1);
    *reinterpret_cast<float*>(dst) = v[0];
  }
}

// out[t, c .. c+V) for the U channel groups c = channel + u * stride (those
// below C): the sum over ranks, in order, of their rows (null: +0.0), plus
// the bias; one rounding. A lane keeps U loads per rank in flight.
template <typename In, typename Out, int V, int U>
__device__ __forceinline__ void ReduceElements(const CombineParams& p,
                                               const char* const* rows,
                                               int64_t t, int channel,
                                               int stride) {
  const int C = p.num_channels;
  float total[U][V];
  for (int r = 0; r < p.c.num_ranks; ++r) {
    float v[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int at = channel + u * stride;
      if (rows[r] != nullptr && at < C) {
        LoadFloats<In, V>(rows[r] + int64_t{at} * sizeof(In), v[u]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        total[u][i] = r == 0 ? v[u][i] : __fadd_rn(total[u][i], v[u][i]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int at = channel + u * stride;
    if (at >= C) break;
    const int64_t element = t * C + at;
    if (p.bias != nullptr) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        total[u][i] = __fadd_rn(total[u][i], p.bias[element + i]);
      }
    }
    StoreFloats<Out, V>(p.out + element * int64_t{sizeof(Out)}, total[u]);
  }
}

template <typename In, typename Out>
__device__ void ReduceToken(const CombineParams& p, const char* const* rows,
                            int64_t t) {
  constexpr int V = 16 / sizeof(In);
  constexpr int U = 4;
  const int C = p.num_channels, lane = Lane();
  if (p.row_bytes % 16 == 0 && Aligned16(p.out) && Aligned16(p.y)) {
    for (int channel = lane * V; channel < C; channel += 32 * V * U) {
      ReduceElements<In, Out, V, U>(p, rows, t, channel, 32 * V);
    }
  } else {
    for (int channel = lane; channel < C; channel += 32 * U) {
      ReduceElements<In, Out, 1, U>(p, rows, t, channel, 32);
    }
  }
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) CombineKernel(CombineParams p) {
  __shared__ const char* token_rows[kWarps][kMaxRanks];
  const Common& c = p.c;
  char* const local = c.buffers.local_base;
  const int me = c.buffers.rank, R = c.num_ranks, n = c.num_chunks,
            T = c.num_tokens, M = c.capacity;
  const int64_t rb = p.row_bytes;
  const uint64_t seq = SequenceNow(c.buffers);
  const WarpRole role = Role(c);
  if (role.sends) {
    PushChunks(c, role, seq, [&](int owner, int q, char* base, int t0, int t1) {
      int32_t* row_of = c.call.row_of(base, q);
      ForEachToken(
          t0, t1,
          [&](int t) {
            const int row = KeptRow(p.recv_row[int64_t{owner} * T + t], M);
            row_of[t] = row;
            return row;
          },
          [&](int t, int row) {
            if (row == M) return;
            CopyRow(c.call.rows(base, q, 0) + t * rb, p.y + row * rb, rb);
          });
    });
    return;
  }
  const char** rows = token_rows[threadIdx.x / 32];
  for (int chunk = role.id; chunk < n; chunk += role.count) {
    for (int s = 0; s < R; ++s) {
      if (s != me) WaitChunk(c, Op::kCombine, s, chunk, seq);
    }
    int t0, t1;
    ChunkTokens(c, chunk, &t0, &t1);
    // The rows of `group` tokens at a time, one (token, rank) per lane, so
    // the warp waits for their loads once per group.
    const int group = max(1, 32 / R);
    for (int base = t0; base < t1; base += group) {
      const int n = min(group, t1 - base);
      for (int j = Lane(); j < n * R; j += 32) {
        const int t = base + j / R, r = j % R, q = PeerSlot(r, me);
        const int row = r == me ? KeptRow(p.recv_row[int64_t{me} * T + t], M)
                                : __ldcg(c.call.row_of(local, q) + t);
        rows[j] = row == M ? nullptr
                  : r == me ? p.y + row * rb
                            : c.call.rows(local, q, 0) + t * rb;
      }
      __syncwarp();
      for (int u = 0; u < n; ++u) {
        ReduceToken<In, Out>(p, rows + u * R, base + u);
      }
      __syncwarp();
    }
  }
}

}  // namespace

Status LaunchCombineKernel(const CombineParams& p, ElementType y_type,
                           ElementType out_type, int blocks,
                           cudaStream_t stream) {
  if (y_type == ElementType::kBF16 && out_type == ElementType::kF32) {
    CombineKernel<__nv_bfloat16, float><<<blocks, kThreads, 0, stream>>>(p);
  } else if (y_type == ElementType::kBF16) {
    CombineKernel<__nv_bfloat16, __nv_bfloat16>
        <<<blocks, kThreads, 0, stream>>>(p);
  } else {
    CombineKernel<float, float><<<blocks, kThreads, 0, stream>>>(p);
  }
  return Launched("CombineKernel launch");
}

}  // namespace jax_ep::intranode
