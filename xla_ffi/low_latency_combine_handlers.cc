// FFI handlers "jax_ep_ll_combine_send" and "jax_ep_ll_combine_recv": the two
// halves of a low-latency combine (csrc/low_latency/low_latency.cu) on XLA's
// stream, over this process's NVSHMEM heap.
//
// send:  y bf16[L, R*Tmax, H], src_index s32[L, R*Tmax]  ->  ticket u32[2]
// recv:  ticket u32[2], topk_idx s32[T, K], topk_weights f32[T, K]
//        ->  out bf16[T, H]
// Attributes: num_experts, max_tokens, num_ranks, timeout_ns (both);
// zero_copy, force_put (send) (int64).

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "handlers.h"
#include "low_latency/low_latency.cuh"
#include "runtime/nvshmem_heap.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {
namespace {

namespace ffi = ::xla::ffi;
using ffi_checks::ExpectRank;
using ffi_checks::ExpectShape;
using ffi_checks::ToFfiError;

constexpr char kSend[] = "jax_ep_ll_combine_send";
constexpr char kRecv[] = "jax_ep_ll_combine_recv";

ffi::Error CombineSendImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> y,
                           ffi::Buffer<ffi::S32> src_index,
                           int64_t num_experts, int64_t max_tokens,
                           int64_t num_ranks, int64_t zero_copy,
                           int64_t force_put, int64_t timeout_ns,
                           ffi::Result<ffi::Buffer<ffi::U32>> ticket) {
  if (auto e = ExpectRank(kSend, "y", y.dimensions(), 3); e.failure()) return e;
  const int64_t L = y.dimensions()[0], S = num_ranks * max_tokens;
  const int64_t H = y.dimensions()[2];
  for (auto e : {ExpectShape(kSend, "y", y.dimensions(), {L, S, H}),
                 ExpectShape(kSend, "src_index", src_index.dimensions(), {L, S}),
                 ExpectShape(kSend, "ticket", ticket->dimensions(), {2})}) {
    if (e.failure()) return e;
  }
  low_latency::Heap heap;
  if (Status s = runtime::CurrentHeap(kSend, &heap); !s.ok()) {
    return ToFfiError(s);
  }
  low_latency::CombineSendArgs a;
  // T and K do not matter to the send half; 1 passes the shape checks.
  a.shape = {1, max_tokens, H, 1, num_experts, num_ranks};
  a.y = y.typed_data();
  a.src_index = src_index.typed_data();
  a.zero_copy = zero_copy != 0;
  a.options.force_put = force_put != 0;
  a.options.timeout_ns = timeout_ns;
  a.ticket = ticket->typed_data();
  return ToFfiError(low_latency::LaunchCombineSend(heap, a, stream));
}

ffi::Error CombineRecvImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> ticket,
                           ffi::Buffer<ffi::S32> topk_idx,
                           ffi::Buffer<ffi::F32> topk_weights,
                           int64_t num_experts, int64_t max_tokens,
                           int64_t num_ranks, int64_t timeout_ns,
                           ffi::Result<ffi::Buffer<ffi::BF16>> out) {
  for (auto e : {ExpectRank(kRecv, "topk_idx", topk_idx.dimensions(), 2),
                 ExpectRank(kRecv, "out", out->dimensions(), 2)}) {
    if (e.failure()) return e;
  }
  const int64_t T = topk_idx.dimensions()[0], K = topk_idx.dimensions()[1];
  for (auto e : {ExpectShape(kRecv, "ticket", ticket.dimensions(), {2}),
                 ExpectShape(kRecv, "topk_weights", topk_weights.dimensions(),
                             {T, K}),
                 ExpectShape(kRecv, "out", out->dimensions(),
                             {T, out->dimensions()[1]})}) {
    if (e.failure()) return e;
  }
  low_latency::Heap heap;
  if (Status s = runtime::CurrentHeap(kRecv, &heap); !s.ok()) {
    return ToFfiError(s);
  }
  low_latency::CombineRecvArgs a;
  a.shape = {T, max_tokens, out->dimensions()[1], K, num_experts, num_ranks};
  a.ticket = ticket.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.weights = topk_weights.typed_data();
  a.options.timeout_ns = timeout_ns;
  a.out = out->typed_data();
  return ToFfiError(low_latency::LaunchCombineRecv(heap, a, stream));
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineSend, jax_ep::CombineSendImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()  // y
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // src_index
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("zero_copy")
        .Attr<int64_t>("force_put")
        .Attr<int64_t>("timeout_ns")
        .Ret<xla::ffi::Buffer<xla::ffi::U32>>(),  // ticket
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineRecv, jax_ep::CombineRecvImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::Buffer<xla::ffi::U32>>()   // ticket
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // topk_idx
        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // topk_weights
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("timeout_ns")
        .Ret<xla::ffi::Buffer<xla::ffi::BF16>>(),  // out
    {xla::ffi::Traits::kCmdBufferCompatible});
