// Intranode notify: host launcher. The protocol is described at the top of
// notify.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "runtime/peer_buffers.cuh"

namespace jax_ep::intranode {

// Device pointers and sizes of one call. Every EP rank calls notify with the
// same sizes, in the same order relative to its other notify calls.
struct NotifyArgs {
  const int32_t* num_tokens_per_rank;    // [R], this rank's, from the layout
  const int32_t* num_tokens_per_expert;  // [E], this rank's, from the layout
  int64_t num_ranks;                     // R, must equal the buffers' R
  int64_t num_experts;                   // E, a multiple of R, <= 1024
  int64_t expert_alignment;              // >= 1
  int64_t timeout_ns;                    // > 0: per wait, then trap
  int32_t* count_matrix;                 // [R, R] out: [s, d] = s sends to d
  int32_t* recv_tokens_per_expert;       // [E / R] out
};

// Enqueues one single-block kernel on `stream` (no host synchronization, no
// allocation: capturable in a CUDA graph). Returns InvalidArgument without
// enqueuing anything when the sizes do not fit `buffers`.
Status LaunchNotify(const runtime::PeerView& buffers, const NotifyArgs& args,
                    cudaStream_t stream);

}  // namespace jax_ep::intranode
