// Intranode (NVLink) normal dispatch, cached dispatch and combine: the data
// region layout, the arguments and the host launchers (launch.cu). The
// protocol is described at the top of launch.cu (the call), dispatch.cu and
// combine.cu (the kernels).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "common/status.h"
#include "runtime/peer_buffers.cuh"

namespace jax_ep::intranode {

// Slot q of a receiver's data region holds what its q-th other rank sends it.
__host__ __device__ inline int PeerSlot(int source, int receiver) {
  return source < receiver ? source : source - 1;
}

// The data region as one call uses it. Every rank derives the same layout
// from the call's shapes, so an offset is valid in every peer's region.
//
//   scratch  int32[R, T]: a fresh dispatch's positions (read by this rank
//            only) or a cached dispatch's staged recv_row (read by peers)
//   R - 1 peer slots, slot PeerSlot(s, me) written by rank s only, each:
//     rows0    [T, row_bytes[0]]   token t's row at t (x, fp8 rows or y)
//     rows1    [T, row_bytes[1]]   fp8 scales, or empty
//     row_of   int32[T]            dispatch: t's position among the tokens s
//                                  sends here (-1: none); combine: t's row
//                                  at s, or M
//     topk_idx int32[T, K]         dispatch: token t's expert ids
//     weights  f32[T, K]           dispatch: token t's weights
// Sections are 256-byte aligned.
struct CallLayout {
  int64_t num_tokens;    // T
  int64_t num_ranks;     // R
  int64_t num_topk;      // K (0 for combine and cached dispatch)
  int64_t row_bytes[2];  // bytes per token of the (up to) two row arrays

  __host__ __device__ int64_t section(int64_t bytes) const {
    return runtime::AlignUp(bytes, 256);
  }
  __host__ __device__ int64_t scratch_bytes() const {
    return section(num_ranks * num_tokens * 4);
  }
  __host__ __device__ int64_t rows_offset(int i) const {
    return i == 0 ? 0 : section(num_tokens * row_bytes[0]);
  }
  __host__ __device__ int64_t row_of_offset() const {
    return rows_offset(1) + section(num_tokens * row_bytes[1]);
  }
  __host__ __device__ int64_t topk_idx_offset() const {
    return row_of_offset() + section(num_tokens * 4);
  }
  __host__ __device__ int64_t weights_offset() const {
    return topk_idx_offset() + section(num_tokens * num_topk * 4);
  }
  __host__ __device__ int64_t slot_bytes() const {
    return weights_offset() + section(num_tokens * num_topk * 4);
  }
  __host__ __device__ int64_t bytes() const {
    return scratch_bytes() + (num_ranks - 1) * slot_bytes();
  }

  __host__ __device__ int32_t* scratch(char* base) const {
    return reinterpret_cast<int32_t*>(base);
  }
  __host__ __device__ char* slot(char* base, int q) const {
    return base + scratch_bytes() + q * slot_bytes();
  }
  __host__ __device__ char* rows(char* base, int q, int i) const {
    return slot(base, q) + rows_offset(i);
  }
  __host__ __device__ int32_t* row_of(char* base, int q) const {
    return reinterpret_cast<int32_t*>(slot(base, q) + row_of_offset());
  }
  __host__ __device__ int32_t* topk_idx(char* base, int q) const {
    return reinterpret_cast<int32_t*>(slot(base, q) + topk_idx_offset());
  }
  __host__ __device__ float* weights(char* base, int q) const {
    return reinterpret_cast<float*>(slot(base, q) + weights_offset());
  }
};

// Data-region bytes that a dispatch (rows of row_bytes + scale_row_bytes,
// top-K) and a combine (rows of combine_row_bytes) of T tokens over R ranks
// need: the larger of the two layouts.
inline int64_t RequiredDataBytes(int64_t num_tokens, int64_t num_ranks,
                                 int64_t num_topk, int64_t row_bytes,
                                 int64_t scale_row_bytes,
                                 int64_t combine_row_bytes) {
  const CallLayout dispatch{num_tokens, num_ranks, num_topk,
                            {row_bytes, scale_row_bytes}};
  const CallLayout combine{num_tokens, num_ranks, 0, {combine_row_bytes, 0}};
  return std::max(dispatch.bytes(), combine.bytes());
}

// How the kernels use the GPU (jax_ep.Config; the autotuner sweeps them).
struct Tuning {
  int64_t num_sms;       // blocks of the main kernel, 1 per SM
  int64_t send_warps;    // warps per block (of 16) that push to peers
  int64_t chunk_tokens;  // tokens per arrival flag; 0 picks one
  int64_t timeout_ns;    // per wait for a peer, then report and trap
  // Dispatches only: 1 moves every token's row and routing to each peer with
  // the copy engines (no SM pushes, every warp receives); 0 pushes the
  // selected rows with `send_warps` warps per block.
  int64_t copy_engine;
};

// One fresh dispatch. Device pointers; every rank calls it with the same
// sizes, in the same order relative to its other intranode calls.
struct DispatchArgs {
  const void* rows[2];            // [T, row_bytes[i]]; rows[1] may be unused
  int64_t row_bytes[2];           // multiples of 4; row_bytes[1] may be 0
  const int32_t* topk_idx;        // [T, K]
  const float* topk_weights;      // [T, K]
  int64_t num_tokens;             // T >= 1
  int64_t num_topk;               // 1 <= K <= 32
  int64_t num_ranks;              // R, must equal the buffers' R
  int64_t num_experts;            // E, a multiple of R, <= 1024
  int64_t capacity;               // M >= 1
  int64_t expert_alignment;       // >= 1
  Tuning tuning;
  void* recv_rows[2];             // [M, row_bytes[i]] out
  int32_t* recv_topk_idx;         // [M, K] out
  float* recv_topk_weights;       // [M, K] out
  int32_t* num_recv_per_expert;   // [E / R] out
  int32_t* src_index;             // [M] out
  int32_t* recv_row;              // [R, T] out
  int32_t* num_recv_tokens;       // [] out
};

// A dispatch that replays a handle's routing (the backward of combine).
struct CachedDispatchArgs {
  const void* rows[2];            // [T, row_bytes[i]]
  int64_t row_bytes[2];
  const int32_t* recv_row;        // [R, T], the handle's
  const int32_t* num_recv_tokens; // [], the handle's
  int64_t num_tokens;             // T
  int64_t num_ranks;              // R
  int64_t capacity;               // M
  Tuning tuning;
  void* recv_rows[2];             // [M, row_bytes[i]] out
};

// One combine. y's element type: bf16 or f32; out: f32 or y's type.
enum class ElementType { kBF16, kF32 };
struct CombineArgs {
  const void* y;                  // [M, C]
  ElementType y_type;
  const int32_t* recv_row;        // [R, T], the dispatch handle's
  const float* bias;              // [T, C] or null
  int64_t num_tokens;             // T
  int64_t num_channels;           // C
  int64_t num_ranks;              // R
  int64_t capacity;               // M
  Tuning tuning;
  void* out;                      // [T, C] out
  ElementType out_type;
};

// Enqueue a call's kernels on `stream`: no host synchronization, no
// allocation. InvalidArgument, with nothing enqueued, when the sizes do not
// fit the buffers or the limits.
Status LaunchDispatch(const runtime::PeerBuffers& buffers,
                      const DispatchArgs& a, cudaStream_t stream);
Status LaunchCachedDispatch(const runtime::PeerBuffers& buffers,
                            const CachedDispatchArgs& a, cudaStream_t stream);
Status LaunchCombine(const runtime::PeerBuffers& buffers, const CombineArgs& a,
                     cudaStream_t stream);

}  // namespace jax_ep::intranode
