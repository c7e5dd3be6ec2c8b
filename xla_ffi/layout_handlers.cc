// FFI handler of the layout family: jax_ep_get_dispatch_layout (csrc/layout)
// on XLA's stream. The launcher checks the kernel's limits; the handler
// checks XLA's buffers against each other and the attributes.
//
// It enqueues two kernels, allocates nothing and never waits for the device:
// safe in command buffers (CUDA graphs).

#include <cuda_runtime_api.h>

#include <cstdint>

#include "checks.h"
#include "handlers.h"
#include "layout/dispatch_layout.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = ::xla::ffi;
using jax_ep::ffi_checks::ExpectShape;
using jax_ep::ffi_checks::FirstFailure;

// Counts the tokens each rank and expert receives (LaunchDispatchLayout).
// Checks: the outputs' shapes agree with topk_idx and the attributes.
static ffi::Error GetDispatchLayout(
    cudaStream_t stream, ffi::BufferR2<ffi::S32> topk_idx, int64_t num_experts,
    int64_t num_ranks, ffi::ResultBufferR1<ffi::S32> num_tokens_per_rank,
    ffi::ResultBufferR1<ffi::S32> num_tokens_per_expert,
    ffi::ResultBufferR2<ffi::PRED> is_token_in_rank,
    ffi::ResultBufferR0<ffi::S32> num_invalid) {
  constexpr const char* kOp = jax_ep::targets::kGetDispatchLayout;
  const int64_t num_tokens = topk_idx.dimensions()[0];
  if (auto error = FirstFailure({
          ExpectShape(kOp, "num_tokens_per_rank",
                      num_tokens_per_rank->dimensions(), {num_ranks}),
          ExpectShape(kOp, "num_tokens_per_expert",
                      num_tokens_per_expert->dimensions(), {num_experts}),
          ExpectShape(kOp, "is_token_in_rank", is_token_in_rank->dimensions(),
                      {num_tokens, num_ranks}),
      });
      error.failure()) {
    return error;
  }
  jax_ep::layout::DispatchLayoutArgs args;
  args.topk_idx = topk_idx.typed_data();
  args.num_tokens = num_tokens;
  args.num_topk = topk_idx.dimensions()[1];
  args.num_experts = num_experts;
  args.num_ranks = num_ranks;
  args.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  args.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  args.is_token_in_rank = is_token_in_rank->typed_data();
  args.num_invalid = num_invalid->typed_data();
  return jax_ep::ffi_checks::ToFfiError(
      jax_ep::layout::LaunchDispatchLayout(args, stream));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpGetDispatchLayout, GetDispatchLayout,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR2<ffi::S32>>()   // topk_idx [T, K], -1: none
        .Attr<int64_t>("num_experts")     // E, a multiple of R
        .Attr<int64_t>("num_ranks")       // R
        .Ret<ffi::BufferR1<ffi::S32>>()   // num_tokens_per_rank [R]
        .Ret<ffi::BufferR1<ffi::S32>>()   // num_tokens_per_expert [E]
        .Ret<ffi::BufferR2<ffi::PRED>>()  // is_token_in_rank [T, R]
        .Ret<ffi::BufferR0<ffi::S32>>(),  // num_invalid []: ids not in [-1, E)
    {ffi::Traits::kCmdBufferCompatible});
