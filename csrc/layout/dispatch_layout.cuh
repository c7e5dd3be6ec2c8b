// get_dispatch_layout: host launcher. The kernel and what it computes are
// described at the top of dispatch_layout.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/limits.h"
#include "common/status.h"

namespace jax_ep::layout {

// Device pointers and sizes of one call. Row-major arrays; num_experts must be
// a multiple of num_ranks. Pointers into empty arrays may be null.
struct DispatchLayoutArgs {
  const int32_t* topk_idx;         // [num_tokens, num_topk]
  int64_t num_tokens;              // >= 0
  int64_t num_topk;                // [1, kMaxTopk]
  int64_t num_experts;             // [1, kMaxNormalExperts]
  int64_t num_ranks;               // [1, kMaxRanks]
  int32_t* num_tokens_per_rank;    // [num_ranks]
  int32_t* num_tokens_per_expert;  // [num_experts]
  bool* is_token_in_rank;          // [num_tokens, num_ranks]
  int32_t* num_invalid;            // scalar
};

// Enqueues the whole computation on `stream` (two kernels, no host
// synchronization, no allocation), so it may be captured in a CUDA graph.
// Every output element is written. Returns InvalidArgument, without enqueuing
// anything, when the sizes are outside the supported range, and the CUDA
// error when a launch fails.
Status LaunchDispatchLayout(const DispatchLayoutArgs& args,
                            cudaStream_t stream);

}  // namespace jax_ep::layout
