// What the intranode dispatch and combine kernels share: the block shape,
// warp roles, chunks and their arrival flags, row copies, each kernel's
// parameters and the functions that launch the kernels. The kernels are
// compiled whole-program, so each is launched from its own file (dispatch.cu,
// combine.cu) by a function declared here, which launch.cu calls in a call's
// order. The protocol is described at the top of launch.cu (the call),
// dispatch.cu and combine.cu (the kernels).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "intranode/dispatch_combine.cuh"
#include "runtime/peer_buffers.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::intranode {

// 512 threads leave 128 registers per thread: the copy loops keep 8 16-byte
// loads in flight without spilling.
inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kUnroll = 8;  // 16-byte loads in flight per lane
inline constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kMaxRanks <= kThreads, "a thread per rank");

enum class Op { kDispatch, kCachedDispatch, kCombine };

__device__ inline const char* OpName(Op op) {
  switch (op) {
    case Op::kDispatch:
      return "intranode_dispatch";
    case Op::kCachedDispatch:
      return "intranode_cached_dispatch";
    default:
      return "intranode_combine";
  }
}

// --- Helpers ------------------------------------------------------------------

__device__ __forceinline__ int Lane() { return threadIdx.x % 32; }

__device__ __forceinline__ uint64_t SequenceNow(const runtime::PeerView& v) {
  return *reinterpret_cast<volatile uint64_t*>(v.layout.sequence(v.local_base));
}

// The q-th rank other than `me` (the inverse of PeerSlot).
__host__ __device__ __forceinline__ int OtherRank(int q, int me) {
  return q < me ? q : q + 1;
}

__device__ __forceinline__ bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Copies one row of `bytes` (a multiple of 4) with the 32 lanes of a warp;
// 16-byte accesses when both ends allow them. Loads skip L1 (.cg): the
// source may have been written by a peer during this kernel.
__device__ __forceinline__ void CopyRow(char* dst, const char* src,
                                        int64_t bytes) {
  const int lane = Lane();
  if (bytes % 16 == 0 && Aligned16(dst) && Aligned16(src)) {
    const int n = static_cast<int>(bytes / 16);
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int i = lane; i < n; i += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * 32 < n) v[u] = __ldcg(s + i + u * 32);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * 32 < n) d[i + u * 32] = v[u];
      }
    }
  } else {
    const int n = static_cast<int>(bytes / 4);
    const int32_t* s = reinterpret_cast<const int32_t*>(src);
    int32_t* d = reinterpret_cast<int32_t*>(dst);
    for (int i = lane; i < n; i += 32) d[i] = __ldcg(s + i);
  }
}

// --- Warp roles, chunks and arrival flags -------------------------------------

// What every main kernel needs: the buffers, the call's layout and sizes,
// and how its work is cut.
struct Common {
  runtime::PeerView buffers;
  CallLayout call;
  int num_tokens, num_ranks, capacity;
  int send_warps, chunk_tokens, num_chunks;
  int64_t timeout_ns;
};

// A warp either pushes to peers or receives; `id` of `count` in its role.
struct WarpRole {
  bool sends;
  int id;
  int count;
};
__device__ __forceinline__ WarpRole Role(const Common& c) {
  const int warp = threadIdx.x / 32;
  const bool sends = warp < c.send_warps;
  const int per_block = sends ? c.send_warps : kWarps - c.send_warps;
  return {sends,
          static_cast<int>(blockIdx.x) * per_block +
              (sends ? warp : warp - c.send_warps),
          static_cast<int>(gridDim.x) * per_block};
}

// Tokens [*t0, *t1) of chunk `chunk`.
__device__ __forceinline__ void ChunkTokens(const Common& c, int chunk,
                                            int* t0, int* t1) {
  *t0 = chunk * c.chunk_tokens;
  *t1 = min(c.num_tokens, *t0 + c.chunk_tokens);
}

// Walks tokens [t0, t1) with a warp: lane i evaluates row_of(t) for the i-th
// token of each group of 32 (so the loads run in parallel), group(base, n,
// mine) sees the whole group (lane u's row in `mine`), then body(t, row)
// runs for each token in order with the whole warp (row is warp-uniform).
template <typename RowOf, typename Group, typename Body>
__device__ __forceinline__ void ForEachToken(int t0, int t1, RowOf row_of,
                                             Group group, Body body) {
  for (int base = t0; base < t1; base += 32) {
    const int t = base + Lane();
    const int mine = t < t1 ? row_of(t) : 0;
    const int n = min(32, t1 - base);
    group(base, n, mine);
    for (int u = 0; u < n; ++u) body(base + u, __shfl_sync(kFullMask, mine, u));
  }
}
template <typename RowOf, typename Body>
__device__ __forceinline__ void ForEachToken(int t0, int t1, RowOf row_of,
                                             Body body) {
  ForEachToken(t0, t1, row_of, [](int, int, int) {}, body);
}

__device__ __forceinline__ uint64_t* Arrival(const Common& c, char* base,
                                             int source, int chunk) {
  return c.buffers.layout.arrivals(base) + int64_t{source} * runtime::kMaxChunks +
         chunk;
}

// Publishes a chunk the warp wrote into a peer: __syncwarp orders the other
// lanes' stores before lane 0's fence and release.
__device__ __forceinline__ void ReleaseChunk(uint64_t* flag, uint64_t seq) {
  __syncwarp();
  if (Lane() == 0) {
    __threadfence_system();
    sync::st_release_sys_global(flag, seq);
  }
}

// The sender warps' share of the (peer, chunk) pairs: push(peer, q, base,
// t0, t1) writes tokens [t0, t1) into the peer's buffer `base` (in its slot
// q for this rank), then the chunk is released to that peer.
template <typename Push>
__device__ __forceinline__ void PushChunks(const Common& c,
                                           const WarpRole& role, uint64_t seq,
                                           Push push) {
  const int me = c.buffers.rank, R = c.num_ranks, n = c.num_chunks;
  char* const* peer_bases = c.buffers.layout.peer_bases(c.buffers.local_base);
  for (int i = role.id; i < (R - 1) * n; i += role.count) {
    const int peer = OtherRank(i % (R - 1), me), chunk = i / (R - 1);
    char* const base = peer_bases[peer];
    int t0, t1;
    ChunkTokens(c, chunk, &t0, &t1);
    push(peer, PeerSlot(me, peer), base, t0, t1);
    ReleaseChunk(Arrival(c, base, me, chunk), seq);
  }
}

__device__ __forceinline__ void WaitChunk(const Common& c, Op op, int source,
                                          int chunk, uint64_t seq) {
  if (Lane() == 0) {
    const sync::WaitSite site{OpName(op), "wait for a peer's rows",
                              c.buffers.rank, source};
    sync::wait_at_least_acquire_sys(Arrival(c, c.buffers.local_base, source,
                                            chunk),
                                    seq, c.timeout_ns, site);
  }
  __syncwarp();
}

// A handle's row, or M for anything outside [0, M): a bad handle must not
// make the kernel write out of bounds.
__device__ __forceinline__ int KeptRow(int row, int capacity) {
  return row >= 0 && row < capacity ? row : capacity;
}

// --- Kernel parameters --------------------------------------------------------

struct DispatchParams {
  Common c;
  const char* rows[2];
  int64_t row_bytes[2];
  const int32_t* topk_idx;
  const float* topk_weights;
  int num_topk, num_local_experts, expert_alignment;
  char* recv_rows[2];
  int32_t* recv_topk_idx;
  float* recv_topk_weights;
  int32_t* num_recv_per_expert;
  int32_t* src_index;
  int32_t* recv_row;
  int32_t* num_recv_tokens;
};

struct CachedParams {
  Common c;
  const char* rows[2];
  int64_t row_bytes[2];
  const int32_t* recv_row;
  const int32_t* num_recv_tokens;
  char* recv_rows[2];
};

struct CombineParams {
  Common c;
  const char* y;
  int64_t row_bytes;  // of y
  const int32_t* recv_row;
  const float* bias;
  int num_channels;
  char* out;
};

// --- Kernel launches ----------------------------------------------------------

// Each enqueues one kernel on `stream` and returns the launch's status; they
// check nothing (launch.cu has checked the sizes).
Status LaunchStageDispatch(const DispatchParams& p, cudaStream_t stream);
Status LaunchDispatchKernel(const DispatchParams& p, int blocks,
                            cudaStream_t stream);
Status LaunchStageCached(const CachedParams& p, int blocks,
                         cudaStream_t stream);
Status LaunchCachedDispatchKernel(const CachedParams& p, int blocks,
                                  cudaStream_t stream);
// The CombineKernel that reads y as y_type and writes out_type.
Status LaunchCombineKernel(const CombineParams& p, ElementType y_type,
                           ElementType out_type, int blocks,
                           cudaStream_t stream);

// The status of the launch just enqueued; `kernel` names it in an error.
inline Status Launched(const char* kernel) {
  return Status::FromCuda(cudaGetLastError(), kernel);
}

}  // namespace jax_ep::intranode
