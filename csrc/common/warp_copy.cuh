// The warp-wide row copy that the NVSHMEM kernels share (the low-latency
// send halves, the internode exchange).
#pragma once

#include <cstdint>

namespace jax_ep {

// One warp copies `n` int4s, kUnroll loads in flight per lane before their
// stores: a load-then-store loop would wait out the memory latency per int4.
template <int kUnroll = 8>
__device__ __forceinline__ void WarpCopy(int4* __restrict__ dst,
                                         const int4* __restrict__ src,
                                         int64_t n, int lane) {
  // Lane-offset pointers and a count of what is left keep each access an
  // immediate offset from one base: per-access 64-bit indices spilled.
  src += lane;
  dst += lane;
  for (int64_t left = n - lane; left > 0; left -= 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u * 32 < left) v[u] = src[u * 32];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u * 32 < left) dst[u * 32] = v[u];
    }
    src += 32 * kUnroll;
    dst += 32 * kUnroll;
  }
}

}  // namespace jax_ep
