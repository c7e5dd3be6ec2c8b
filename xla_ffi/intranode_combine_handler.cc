// FFI handler "jax_ep_intranode_combine": an intranode combine
// (csrc/intranode/dispatch_combine.cu) on XLA's stream.
//
//   y                bf16/f32[M, C]     argument
//   recv_row         s32[R, T]          argument (the dispatch handle's)
//   bias             f32[T, C]          argument ([T, 0] when unused)
//   num_ranks        int64              attribute, R
//   num_sms, send_warps, chunk_tokens, timeout_ns, copy_engine   int64
//                                           attributes:
//                                       intranode::Tuning
//   out              f32 or y's type [T, C]  result
//
// out[t] = sum over ranks r, in rank order, in fp32, of y_r[recv_row_r[me, t]]
// (+0 where that is M), plus bias[t], rounded once to out's type.

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

constexpr char kOp[] = "jax_ep_intranode_combine";

bool ToElementType(ffi::DataType type, intranode::ElementType* out) {
  switch (type) {
    case ffi::DataType::BF16:
      *out = intranode::ElementType::kBF16;
      return true;
    case ffi::DataType::F32:
      *out = intranode::ElementType::kF32;
      return true;
    default:
      return false;
  }
}

ffi::Error IntranodeCombineImpl(
    cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer y,
    ffi::Buffer<ffi::S32> recv_row, ffi::Buffer<ffi::F32> bias,
    int64_t num_ranks, int64_t num_sms, int64_t send_warps,
    int64_t chunk_tokens, int64_t timeout_ns, int64_t copy_engine,
    ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = ExpectRank(kOp, "y", y.dimensions(), 2); e.failure()) return e;
  if (auto e = ExpectRank(kOp, "recv_row", recv_row.dimensions(), 2);
      e.failure()) {
    return e;
  }
  const int64_t M = y.dimensions()[0];
  const int64_t C = y.dimensions()[1];
  const int64_t T = recv_row.dimensions()[1];
  const bool has_bias =
      bias.dimensions().size() == 2 && bias.dimensions()[1] != 0;
  for (auto error : {
           ExpectShape(kOp, "recv_row", recv_row.dimensions(),
                       {num_ranks, T}),
           ExpectShape(kOp, "bias", bias.dimensions(), {T, has_bias ? C : 0}),
           ExpectShape(kOp, "out", out->dimensions(), {T, C}),
       }) {
    if (error.failure()) return error;
  }
  intranode::CombineArgs a;
  if (!ToElementType(y.element_type(), &a.y_type) ||
      !ToElementType(out->element_type(), &a.out_type)) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": y and out must be bf16 or f32");
  }
  std::shared_ptr<const runtime::PeerBuffers> buffers;
  if (auto error = ffi_checks::FindPeerBuffers(kOp, device_ordinal, &buffers);
      error.failure()) {
    return error;
  }
  a.y = y.untyped_data();
  a.recv_row = recv_row.typed_data();
  a.bias = has_bias ? bias.typed_data() : nullptr;
  a.num_tokens = T;
  a.num_channels = C;
  a.num_ranks = num_ranks;
  a.capacity = M;
  a.tuning = {num_sms, send_warps, chunk_tokens, timeout_ns, copy_engine};
  a.out = out->untyped_data();
  return ffi_checks::ToFfiError(
      intranode::LaunchCombine(*buffers, a, stream));
}

}  // namespace
}  // namespace jax_ep

// Enqueues two kernels, allocates nothing and never waits for the device:
// safe in command buffers. The peer buffers must outlive every replay.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeCombine, jax_ep::IntranodeCombineImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // stream
        .Ctx<xla::ffi::DeviceOrdinal>()                 // device_ordinal
        .Arg<xla::ffi::AnyBuffer>()                     // y
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // recv_row
        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()         // bias
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("send_warps")
        .Attr<int64_t>("chunk_tokens")
        .Attr<int64_t>("timeout_ns")
        .Attr<int64_t>("copy_engine")
        .Ret<xla::ffi::AnyBuffer>(),                    // out
    {xla::ffi::Traits::kCmdBufferCompatible});
