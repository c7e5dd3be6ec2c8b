// Intranode (NVLink) normal dispatch, cached dispatch and combine: the
// arguments and the host launchers (launch.cu). The data region's layout is
// in call_layout.h; the protocol is described at the top of launch.cu (the
// call), dispatch.cu and combine.cu (the kernels).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/limits.h"
#include "common/status.h"
#include "intranode/call_layout.h"
#include "runtime/peer_buffers.cuh"

namespace jax_ep::intranode {

// How the kernels use the GPU: jax_ep.Config's fields of the same names (the
// autotuner sweeps them) and the backend's timeout.
struct Tuning {
  int64_t num_sms;         // blocks of the main kernel, 1 per SM
  int64_t nvl_send_warps;  // warps per block (of 16) that push to peers
  int64_t nvl_chunk;       // tokens per arrival flag; 0 picks one
  int64_t timeout_ns;      // per wait for a peer, then report and trap
  // Dispatches only: 1 moves every token's row and routing to each peer with
  // the copy engines (no SM pushes, every warp receives); 0 pushes the
  // selected rows with `nvl_send_warps` warps per block. Combine ignores it
  // and always pushes with warps: the rows an owner needs are not at static
  // places.
  int64_t nvl_copy_engine;
};

// What both dispatches move and the sizes they share. Device pointers;
// every rank calls with the same sizes, in the same order relative to its
// other intranode calls.
struct DispatchRows {
  const void* rows[2];            // [T, row_bytes[i]]; rows[1] may be unused
  int64_t row_bytes[2];           // multiples of 4; row_bytes[1] may be 0
  void* recv_rows[2];             // [M, row_bytes[i]] out
  int64_t num_tokens;             // T >= 1
  int64_t num_ranks;              // R, must equal the buffers' R
  int64_t capacity;               // M >= 1
  Tuning tuning;
};

// One fresh dispatch.
struct DispatchArgs {
  DispatchRows moved;
  const int32_t* topk_idx;        // [T, K]
  const float* topk_weights;      // [T, K]
  int64_t num_topk;               // 1 <= K <= kMaxTopk
  int64_t num_experts;            // E, a multiple of R, <= kMaxNormalExperts
  int64_t expert_alignment;       // >= 1
  int32_t* recv_topk_idx;         // [M, K] out
  float* recv_topk_weights;       // [M, K] out
  int32_t* num_recv_per_expert;   // [E / R] out
  int32_t* src_index;             // [M] out
  int32_t* recv_row;              // [R, T] out
  int32_t* num_recv_tokens;       // [] out
};

// A dispatch that replays a handle's routing (the backward of combine).
struct CachedDispatchArgs {
  DispatchRows moved;
  const int32_t* recv_row;        // [R, T], the handle's
  const int32_t* num_recv_tokens; // [], the handle's
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
