// FFI handlers "jax_ep_ll_dispatch_send" and "jax_ep_ll_dispatch_recv": the two
// halves of a low-latency dispatch (csrc/low_latency/low_latency.cu) on XLA's
// stream, over this process's NVSHMEM heap.
//
// send:  x bf16[T, H], topk_idx s32[T, K]  ->  ticket u32[2]
// recv:  ticket u32[2]  ->  recv_x [L, R*Tmax, H] (f8e4m3fn or bf16),
//        recv_scales (f32[L, R*Tmax, H/128], s32[L, R*Tmax, H/512] with
//        UE8M0, or u8[0] without fp8), count s32[L], src_index s32[L, R*Tmax],
//        slot s32[L, R*Tmax]
// Attributes: num_experts, max_tokens, num_ranks, use_fp8, timeout_ns (both);
// round_scale, force_put (send); num_tokens, num_topk, use_ue8m0,
// zero_padding (recv) (int64).

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

constexpr char kSend[] = "jax_ep_ll_dispatch_send";
constexpr char kRecv[] = "jax_ep_ll_dispatch_recv";

ffi::Error DispatchSendImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x,
                            ffi::Buffer<ffi::S32> topk_idx, int64_t num_experts,
                            int64_t max_tokens, int64_t num_ranks,
                            int64_t use_fp8, int64_t round_scale,
                            int64_t force_put, int64_t timeout_ns,
                            ffi::Result<ffi::Buffer<ffi::U32>> ticket) {
  for (auto e : {ExpectRank(kSend, "x", x.dimensions(), 2),
                 ExpectRank(kSend, "topk_idx", topk_idx.dimensions(), 2)}) {
    if (e.failure()) return e;
  }
  const int64_t T = x.dimensions()[0];
  for (auto e : {ExpectShape(kSend, "topk_idx", topk_idx.dimensions(),
                             {T, topk_idx.dimensions()[1]}),
                 ExpectShape(kSend, "ticket", ticket->dimensions(), {2})}) {
    if (e.failure()) return e;
  }
  low_latency::Heap heap;
  if (Status s = runtime::CurrentHeap(kSend, &heap); !s.ok()) {
    return ToFfiError(s);
  }
  low_latency::DispatchSendArgs a;
  a.shape = {T, max_tokens, x.dimensions()[1], topk_idx.dimensions()[1],
             num_experts, num_ranks};
  a.x = x.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.use_fp8 = use_fp8 != 0;
  a.round_scale = round_scale != 0;
  a.options.force_put = force_put != 0;
  a.options.timeout_ns = timeout_ns;
  a.ticket = ticket->typed_data();
  return ToFfiError(low_latency::LaunchDispatchSend(heap, a, stream));
}

ffi::Error DispatchRecvImpl(cudaStream_t stream,
                            ffi::Buffer<ffi::U32> ticket, int64_t num_experts,
                            int64_t max_tokens, int64_t num_ranks,
                            int64_t num_tokens, int64_t num_topk,
                            int64_t use_fp8, int64_t use_ue8m0,
                            int64_t zero_padding, int64_t timeout_ns,
                            ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::Result<ffi::AnyBuffer> recv_scales,
                            ffi::Result<ffi::Buffer<ffi::S32>> count,
                            ffi::Result<ffi::Buffer<ffi::S32>> src_index,
                            ffi::Result<ffi::Buffer<ffi::S32>> slot) {
  if (auto e = ExpectRank(kRecv, "recv_x", recv_x->dimensions(), 3);
      e.failure()) {
    return e;
  }
  const int64_t L = recv_x->dimensions()[0];
  const int64_t S = num_ranks * max_tokens;
  const int64_t H = recv_x->dimensions()[2];
  const int64_t scale_columns = !use_fp8 ? 0 : (use_ue8m0 ? H / 512 : H / 128);
  for (auto e : {
           ExpectShape(kRecv, "ticket", ticket.dimensions(), {2}),
           ExpectShape(kRecv, "recv_x", recv_x->dimensions(), {L, S, H}),
           use_fp8 ? ExpectShape(kRecv, "recv_scales",
                                 recv_scales->dimensions(),
                                 {L, S, scale_columns})
                   : ffi::Error::Success(),
           ExpectShape(kRecv, "count", count->dimensions(), {L}),
           ExpectShape(kRecv, "src_index", src_index->dimensions(), {L, S}),
           ExpectShape(kRecv, "slot", slot->dimensions(), {L, S}),
       }) {
    if (e.failure()) return e;
  }
  const ffi::DataType want = use_fp8 ? ffi::DataType::F8E4M3FN
                                     : ffi::DataType::BF16;
  if (recv_x->element_type() != want ||
      (use_fp8 && recv_scales->element_type() !=
                      (use_ue8m0 ? ffi::DataType::S32 : ffi::DataType::F32))) {
    return ffi::Error::InvalidArgument(
        std::string(kRecv) + ": recv_x must be e4m3 with fp8 (scales f32, or "
                             "s32 with UE8M0), else bf16");
  }
  low_latency::Heap heap;
  if (Status s = runtime::CurrentHeap(kRecv, &heap); !s.ok()) {
    return ToFfiError(s);
  }
  low_latency::DispatchRecvArgs a;
  a.shape = {num_tokens, max_tokens, H, num_topk, num_experts, num_ranks};
  a.ticket = ticket.typed_data();
  a.use_fp8 = use_fp8 != 0;
  a.use_ue8m0 = use_ue8m0 != 0;
  a.zero_padding = zero_padding != 0;
  a.options.timeout_ns = timeout_ns;
  a.recv_x = recv_x->untyped_data();
  a.recv_scales = use_fp8 ? recv_scales->untyped_data() : nullptr;
  a.count = count->typed_data();
  a.src_index = src_index->typed_data();
  a.slot = slot->typed_data();
  return ToFfiError(low_latency::LaunchDispatchRecv(heap, a, stream));
}

}  // namespace
}  // namespace jax_ep

// One kernel each, no allocation, no host wait, the per-call state on the
// device: safe in command buffers.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchSend, jax_ep::DispatchSendImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()  // x
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // topk_idx
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("use_fp8")
        .Attr<int64_t>("round_scale")
        .Attr<int64_t>("force_put")
        .Attr<int64_t>("timeout_ns")
        .Ret<xla::ffi::Buffer<xla::ffi::U32>>(),  // ticket
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchRecv, jax_ep::DispatchRecvImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // ticket
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("num_tokens")
        .Attr<int64_t>("num_topk")
        .Attr<int64_t>("use_fp8")
        .Attr<int64_t>("use_ue8m0")
        .Attr<int64_t>("zero_padding")
        .Attr<int64_t>("timeout_ns")
        .Ret<xla::ffi::AnyBuffer>()                // recv_x
        .Ret<xla::ffi::AnyBuffer>()                // recv_scales
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()    // count
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()    // src_index
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>(),   // slot
    {xla::ffi::Traits::kCmdBufferCompatible});
