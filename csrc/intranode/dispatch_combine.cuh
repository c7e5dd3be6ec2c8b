// Intranode (NVLink) normal dispatch and combine: staging layout and host
// launchers. The protocol is described at the top of dispatch_combine.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "common/status.h"
#include "runtime/peer_buffers.cuh"

namespace jax_ep::intranode {

// The data region of every rank's peer buffer is split into two equal halves;
// call sequence `seq` stages into half `seq & 1`. The split is fixed by the
// buffer (not by a call's shapes) so that calls of different shapes never
// overlap a half a slow peer may still read.
__host__ __device__ inline int64_t StageHalfBytes(int64_t data_bytes) {
  return data_bytes / 2 / 256 * 256;
}
__host__ __device__ inline char* StageHalf(char* base, int64_t data_bytes,
                                           int64_t parity) {
  return base + parity * StageHalfBytes(data_bytes);
}

// What a dispatch stages in one half, at offsets every rank computes alike.
// Sections are 256-byte aligned.
struct DispatchStage {
  int64_t num_tokens;    // T
  int64_t num_ranks;     // R
  int64_t num_topk;      // K
  int64_t row_bytes[2];  // bytes per token of the (up to) two row arrays

  // int32[R]: tokens sent to each destination.
  __host__ __device__ int64_t counts_offset() const { return 0; }
  // int32[E] (at most kMaxNotifyExperts): (token, k) selections per expert.
  __host__ __device__ int64_t expert_counts_offset() const {
    return runtime::AlignUp(num_ranks * 4, 256);
  }
  // int32[R, T]: position of token t among those sent to d, or -1.
  __host__ __device__ int64_t positions_offset() const {
    return expert_counts_offset() + runtime::kMaxNotifyExperts * 4;
  }
  // int32[R, T]: the tokens sent to d, in order (first counts[d] valid).
  __host__ __device__ int64_t tokens_offset() const {
    return positions_offset() + runtime::AlignUp(num_ranks * num_tokens * 4, 256);
  }
  __host__ __device__ int64_t topk_idx_offset() const {
    return tokens_offset() + runtime::AlignUp(num_ranks * num_tokens * 4, 256);
  }
  __host__ __device__ int64_t topk_weights_offset() const {
    return topk_idx_offset() + runtime::AlignUp(num_tokens * num_topk * 4, 256);
  }
  __host__ __device__ int64_t rows_offset(int i) const {
    const int64_t first =
        topk_weights_offset() + runtime::AlignUp(num_tokens * num_topk * 4, 256);
    return i == 0 ? first
                  : first + runtime::AlignUp(num_tokens * row_bytes[0], 256);
  }
  __host__ __device__ int64_t bytes() const {
    return rows_offset(1) + runtime::AlignUp(num_tokens * row_bytes[1], 256);
  }

  __host__ __device__ int32_t* counts(char* half) const {
    return reinterpret_cast<int32_t*>(half + counts_offset());
  }
  __host__ __device__ int32_t* expert_counts(char* half) const {
    return reinterpret_cast<int32_t*>(half + expert_counts_offset());
  }
  __host__ __device__ int32_t* positions(char* half) const {
    return reinterpret_cast<int32_t*>(half + positions_offset());
  }
  __host__ __device__ int32_t* tokens(char* half) const {
    return reinterpret_cast<int32_t*>(half + tokens_offset());
  }
  __host__ __device__ int32_t* topk_idx(char* half) const {
    return reinterpret_cast<int32_t*>(half + topk_idx_offset());
  }
  __host__ __device__ float* topk_weights(char* half) const {
    return reinterpret_cast<float*>(half + topk_weights_offset());
  }
  __host__ __device__ char* rows(char* half, int i) const {
    return half + rows_offset(i);
  }
};

// What a combine stages in one half.
struct CombineStage {
  int64_t num_tokens;  // T
  int64_t num_ranks;   // R
  int64_t capacity;    // M
  int64_t row_bytes;   // bytes per row of y

  // int32[R, T]: this rank's handle.recv_row.
  __host__ __device__ int64_t recv_row_offset() const { return 0; }
  // [M, row_bytes]: y (only the first min(num_recv, M) rows are written).
  __host__ __device__ int64_t rows_offset() const {
    return runtime::AlignUp(num_ranks * num_tokens * 4, 256);
  }
  __host__ __device__ int64_t bytes() const {
    return rows_offset() + runtime::AlignUp(capacity * row_bytes, 256);
  }
  __host__ __device__ int32_t* recv_row(char* half) const {
    return reinterpret_cast<int32_t*>(half + recv_row_offset());
  }
  __host__ __device__ char* rows(char* half) const {
    return half + rows_offset();
  }
};

// Data-region bytes (both halves) that dispatch and combine of these shapes
// need: 2 * max(dispatch stage, combine stage).
inline int64_t RequiredDataBytes(const DispatchStage& dispatch,
                                 const CombineStage& combine) {
  return 2 * (std::max(dispatch.bytes(), combine.bytes()) + 256);
}

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
  int64_t num_sms;                // blocks of the copy and receive kernels
  int64_t timeout_ns;             // > 0
  void* recv_rows[2];             // [M, row_bytes[i]] out
  int32_t* recv_topk_idx;         // [M, K] out
  float* recv_topk_weights;       // [M, K] out
  int32_t* num_recv_per_expert;   // [E / R] out
  int32_t* src_index;             // [M] out
  int32_t* recv_row;              // [R, T] out
  int32_t* num_recv_tokens;       // [] out
};

// One combine. y's element type: bf16 or f32; out: f32 or y's type.
enum class ElementType { kBF16, kF32 };
struct CombineArgs {
  const void* y;                  // [M, C]
  ElementType y_type;
  const int32_t* recv_row;        // [R, T], the dispatch handle's
  const int32_t* num_recv_tokens; // [], the dispatch handle's
  const float* bias;              // [T, C] or null
  int64_t num_tokens;             // T
  int64_t num_channels;           // C
  int64_t num_ranks;              // R
  int64_t capacity;               // M
  int64_t num_sms;
  int64_t timeout_ns;
  void* out;                      // [T, C] out
  ElementType out_type;
};

// Enqueue the dispatch (stage, barrier, receive) or combine (stage, barrier,
// reduce) kernels on `stream`: no host synchronization, no allocation.
// InvalidArgument, with nothing enqueued, when the sizes do not fit.
Status LaunchDispatch(const runtime::PeerView& buffers, const DispatchArgs& a,
                      cudaStream_t stream);
Status LaunchCombine(const runtime::PeerView& buffers, const CombineArgs& a,
                     cudaStream_t stream);

}  // namespace jax_ep::intranode
