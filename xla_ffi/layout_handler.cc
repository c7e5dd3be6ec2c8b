// FFI handler "jax_ep_get_dispatch_layout": checks XLA's buffers against the
// attributes, then enqueues csrc's get_dispatch_layout on XLA's stream.
//
//   topk_idx              s32[T, K]  argument
//   num_experts           int64      attribute, E
//   num_ranks             int64      attribute, R
//   num_tokens_per_rank   s32[R]     result
//   num_tokens_per_expert s32[E]     result
//   is_token_in_rank      pred[T, R] result
//   num_invalid           s32[]      result
//
// The supported ranges of K, E and R are checked by the launcher.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "checks.h"
#include "handlers.h"
#include "layout/dispatch_layout.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {
namespace {

namespace ffi = ::xla::ffi;
using ffi_checks::ExpectRank;
using ffi_checks::ExpectShape;

constexpr char kOp[] = "jax_ep_get_dispatch_layout";

ffi::Error GetDispatchLayoutImpl(
    cudaStream_t stream, ffi::Buffer<ffi::S32> topk_idx, int64_t num_experts,
    int64_t num_ranks, ffi::ResultBuffer<ffi::S32> num_tokens_per_rank,
    ffi::ResultBuffer<ffi::S32> num_tokens_per_expert,
    ffi::ResultBuffer<ffi::PRED> is_token_in_rank,
    ffi::ResultBuffer<ffi::S32> num_invalid) {
  if (auto error = ExpectRank(kOp, "topk_idx", topk_idx.dimensions(), 2);
      error.failure()) {
    return error;
  }
  const int64_t num_tokens = topk_idx.dimensions()[0];
  const int64_t num_topk = topk_idx.dimensions()[1];
  for (auto error : {
           ExpectShape(kOp, "num_tokens_per_rank",
                       num_tokens_per_rank->dimensions(), {num_ranks}),
           ExpectShape(kOp, "num_tokens_per_expert",
                       num_tokens_per_expert->dimensions(), {num_experts}),
           ExpectShape(kOp, "is_token_in_rank", is_token_in_rank->dimensions(),
                       {num_tokens, num_ranks}),
           ExpectShape(kOp, "num_invalid", num_invalid->dimensions(), {}),
       }) {
    if (error.failure()) return error;
  }

  layout::DispatchLayoutArgs args;
  args.topk_idx = topk_idx.typed_data();
  args.num_tokens = num_tokens;
  args.num_topk = num_topk;
  args.num_experts = num_experts;
  args.num_ranks = num_ranks;
  args.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  args.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  args.is_token_in_rank = is_token_in_rank->typed_data();
  args.num_invalid = num_invalid->typed_data();
  return ffi_checks::ToFfiError(layout::LaunchDispatchLayout(args, stream));
}

}  // namespace
}  // namespace jax_ep

// Enqueues two kernels, allocates nothing and never waits for the device:
// safe in command buffers (CUDA graphs).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpGetDispatchLayout, jax_ep::GetDispatchLayoutImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // stream
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // topk_idx
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("num_ranks")
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()   // num_tokens_per_rank
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()   // num_tokens_per_expert
        .Ret<xla::ffi::Buffer<xla::ffi::PRED>>()  // is_token_in_rank
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>(),  // num_invalid
    {xla::ffi::Traits::kCmdBufferCompatible});
