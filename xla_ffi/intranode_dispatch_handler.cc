// FFI handler "jax_ep_intranode_dispatch": a fresh intranode dispatch
// (csrc/intranode/dispatch_combine.cu) on XLA's stream.
//
//   x                   [T, C0] any type    argument (rows, sent as bytes)
//   scales              [T, C1] any type    argument ([T, 0] when unused)
//   topk_idx            s32[T, K]           argument
//   topk_weights        f32[T, K]           argument (zeros when unused)
//   num_ranks           int64               attribute, R
//   num_experts         int64               attribute, E
//   capacity            int64               attribute, M
//   expert_alignment    int64               attribute
//   num_sms, send_warps, chunk_tokens, timeout_ns, copy_engine   int64
//                                           attributes:
//                                           intranode::Tuning
//   recv_x              [M, C0] x's type    result
//   recv_scales         [M, C1]             result
//   recv_topk_idx       s32[M, K]           result
//   recv_topk_weights   f32[M, K]           result
//   num_recv_per_expert s32[E/R]            result
//   src_index           s32[M]              result
//   recv_row            s32[R, T]           result
//   num_recv_tokens     s32[]               result
//
// The rank comes from the registry entry of the device XLA runs the call on.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "checks.h"
#include "handlers.h"
#include "intranode/dispatch_combine.cuh"
#include "peer_buffers_lookup.h"
#include "runtime/peer_buffers.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {
namespace {

namespace ffi = ::xla::ffi;
using ffi_checks::ExpectRank;
using ffi_checks::ExpectShape;

constexpr char kOp[] = "jax_ep_intranode_dispatch";

ffi::Error IntranodeDispatchImpl(
    cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
    ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> topk_idx,
    ffi::Buffer<ffi::F32> topk_weights, int64_t num_ranks, int64_t num_experts,
    int64_t capacity, int64_t expert_alignment, int64_t num_sms,
    int64_t send_warps, int64_t chunk_tokens, int64_t timeout_ns,
    int64_t copy_engine,
    ffi::Result<ffi::AnyBuffer> recv_x,
    ffi::Result<ffi::AnyBuffer> recv_scales,
    ffi::ResultBuffer<ffi::S32> recv_topk_idx,
    ffi::ResultBuffer<ffi::F32> recv_topk_weights,
    ffi::ResultBuffer<ffi::S32> num_recv_per_expert,
    ffi::ResultBuffer<ffi::S32> src_index,
    ffi::ResultBuffer<ffi::S32> recv_row,
    ffi::ResultBuffer<ffi::S32> num_recv_tokens) {
  if (num_ranks < 1 || num_experts % num_ranks != 0) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": num_experts (" + std::to_string(num_experts) +
        ") must be a multiple of num_ranks (" + std::to_string(num_ranks) +
        ")");
  }
  const int64_t M = capacity;
  if (auto e = ffi_checks::ExpectDispatchRows(kOp, x, scales, *recv_x,
                                              *recv_scales, M);
      e.failure()) {
    return e;
  }
  if (auto e = ExpectRank(kOp, "topk_idx", topk_idx.dimensions(), 2);
      e.failure()) {
    return e;
  }
  const int64_t T = x.dimensions()[0];
  const int64_t K = topk_idx.dimensions()[1];
  for (auto error : {
           ExpectShape(kOp, "topk_idx", topk_idx.dimensions(), {T, K}),
           ExpectShape(kOp, "topk_weights", topk_weights.dimensions(), {T, K}),
           ExpectShape(kOp, "recv_topk_idx", recv_topk_idx->dimensions(),
                       {M, K}),
           ExpectShape(kOp, "recv_topk_weights",
                       recv_topk_weights->dimensions(), {M, K}),
           ExpectShape(kOp, "num_recv_per_expert",
                       num_recv_per_expert->dimensions(),
                       {num_experts / num_ranks}),
           ExpectShape(kOp, "src_index", src_index->dimensions(), {M}),
           ExpectShape(kOp, "recv_row", recv_row->dimensions(),
                       {num_ranks, T}),
           ExpectShape(kOp, "num_recv_tokens", num_recv_tokens->dimensions(),
                       {}),
       }) {
    if (error.failure()) return error;
  }
  std::shared_ptr<const runtime::PeerBuffers> buffers;
  if (auto error = ffi_checks::FindPeerBuffers(kOp, device_ordinal, &buffers);
      error.failure()) {
    return error;
  }
  intranode::DispatchArgs a;
  a.rows[0] = x.untyped_data();
  a.rows[1] = scales.untyped_data();
  a.row_bytes[0] = ffi_checks::RowBytes(x);
  a.row_bytes[1] = ffi_checks::RowBytes(scales);
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.num_tokens = T;
  a.num_topk = K;
  a.num_ranks = num_ranks;
  a.num_experts = num_experts;
  a.capacity = capacity;
  a.expert_alignment = expert_alignment;
  a.tuning = {num_sms, send_warps, chunk_tokens, timeout_ns, copy_engine};
  a.recv_rows[0] = recv_x->untyped_data();
  a.recv_rows[1] = recv_scales->untyped_data();
  a.recv_topk_idx = recv_topk_idx->typed_data();
  a.recv_topk_weights = recv_topk_weights->typed_data();
  a.num_recv_per_expert = num_recv_per_expert->typed_data();
  a.src_index = src_index->typed_data();
  a.recv_row = recv_row->typed_data();
  a.num_recv_tokens = num_recv_tokens->typed_data();
  return ffi_checks::ToFfiError(
      intranode::LaunchDispatch(*buffers, a, stream));
}

}  // namespace
}  // namespace jax_ep

// Enqueues three kernels, allocates nothing and never waits for the device;
// the call sequence and parity live in device memory: safe in command
// buffers. The peer buffers must outlive every replay.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeDispatch, jax_ep::IntranodeDispatchImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // stream
        .Ctx<xla::ffi::DeviceOrdinal>()                 // device_ordinal
        .Arg<xla::ffi::AnyBuffer>()                     // x
        .Arg<xla::ffi::AnyBuffer>()                     // scales
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // topk_idx
        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()         // topk_weights
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("capacity")
        .Attr<int64_t>("expert_alignment")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("send_warps")
        .Attr<int64_t>("chunk_tokens")
        .Attr<int64_t>("timeout_ns")
        .Attr<int64_t>("copy_engine")
        .Ret<xla::ffi::AnyBuffer>()                     // recv_x
        .Ret<xla::ffi::AnyBuffer>()                     // recv_scales
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()         // recv_topk_idx
        .Ret<xla::ffi::Buffer<xla::ffi::F32>>()         // recv_topk_weights
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()         // num_recv_per_expert
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()         // src_index
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()         // recv_row
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>(),        // num_recv_tokens
    {xla::ffi::Traits::kCmdBufferCompatible});
