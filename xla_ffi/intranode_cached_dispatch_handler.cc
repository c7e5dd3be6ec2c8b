// FFI handler "jax_ep_intranode_cached_dispatch": an intranode dispatch that
// replays a handle's routing (csrc/intranode/dispatch_combine.cu), the
// backward of combine, on XLA's stream.
//
//   x                [T, C0] any type   argument (rows, sent as bytes)
//   scales           [T, C1] any type   argument ([T, 0] when unused)
//   recv_row         s32[R, T]          argument (the dispatch handle's)
//   num_recv_tokens  s32[]              argument (the dispatch handle's)
//   num_ranks        int64              attribute, R
//   capacity         int64              attribute, M
//   num_sms, send_warps, chunk_tokens, timeout_ns, copy_engine   int64
//                                           attributes:
//                                       intranode::Tuning
//   recv_x           [M, C0] x's type   result
//   recv_scales      [M, C1]            result
//
// recv_x[recv_row_me[s, t]] = x_s[t] for every kept row; rows from
// min(num_recv_tokens, M) on are zero.

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
using ffi_checks::ExpectShape;

constexpr char kOp[] = "jax_ep_intranode_cached_dispatch";

ffi::Error IntranodeCachedDispatchImpl(
    cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
    ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> recv_row,
    ffi::Buffer<ffi::S32> num_recv_tokens, int64_t num_ranks, int64_t capacity,
    int64_t num_sms, int64_t send_warps, int64_t chunk_tokens,
    int64_t timeout_ns, int64_t copy_engine, ffi::Result<ffi::AnyBuffer> recv_x,
    ffi::Result<ffi::AnyBuffer> recv_scales) {
  const int64_t M = capacity;
  if (auto e = ffi_checks::ExpectDispatchRows(kOp, x, scales, *recv_x,
                                              *recv_scales, M);
      e.failure()) {
    return e;
  }
  const int64_t T = x.dimensions()[0];
  for (auto error : {
           ExpectShape(kOp, "recv_row", recv_row.dimensions(), {num_ranks, T}),
           ExpectShape(kOp, "num_recv_tokens", num_recv_tokens.dimensions(),
                       {}),
       }) {
    if (error.failure()) return error;
  }
  std::shared_ptr<const runtime::PeerBuffers> buffers;
  if (auto error = ffi_checks::FindPeerBuffers(kOp, device_ordinal, &buffers);
      error.failure()) {
    return error;
  }
  intranode::CachedDispatchArgs a;
  a.rows[0] = x.untyped_data();
  a.rows[1] = scales.untyped_data();
  a.row_bytes[0] = ffi_checks::RowBytes(x);
  a.row_bytes[1] = ffi_checks::RowBytes(scales);
  a.recv_row = recv_row.typed_data();
  a.num_recv_tokens = num_recv_tokens.typed_data();
  a.num_tokens = T;
  a.num_ranks = num_ranks;
  a.capacity = capacity;
  a.tuning = {num_sms, send_warps, chunk_tokens, timeout_ns, copy_engine};
  a.recv_rows[0] = recv_x->untyped_data();
  a.recv_rows[1] = recv_scales->untyped_data();
  return ffi_checks::ToFfiError(
      intranode::LaunchCachedDispatch(*buffers, a, stream));
}

}  // namespace
}  // namespace jax_ep

// Enqueues three kernels, allocates nothing and never waits for the device:
// safe in command buffers. The peer buffers must outlive every replay.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeCachedDispatch, jax_ep::IntranodeCachedDispatchImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // stream
        .Ctx<xla::ffi::DeviceOrdinal>()                 // device_ordinal
        .Arg<xla::ffi::AnyBuffer>()                     // x
        .Arg<xla::ffi::AnyBuffer>()                     // scales
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // recv_row
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // num_recv_tokens
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("capacity")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("send_warps")
        .Attr<int64_t>("chunk_tokens")
        .Attr<int64_t>("timeout_ns")
        .Attr<int64_t>("copy_engine")
        .Ret<xla::ffi::AnyBuffer>()                     // recv_x
        .Ret<xla::ffi::AnyBuffer>(),                    // recv_scales
    {xla::ffi::Traits::kCmdBufferCompatible});
