// FFI handlers of the intranode (NVLink) family: dispatch, cached dispatch
// and combine (csrc/intranode) on XLA's stream, over the peer
// buffers that the registry holds for the device XLA runs the call on (the
// rank comes from that entry). The launchers check the sizes against the
// peer buffers and the kernels' limits; the handlers check XLA's buffers
// against each other and the attributes.
//
// Each enqueues kernels, allocates nothing and never waits for the device;
// the call sequence and parity live in device memory: safe in command buffers
// (CUDA graphs). The peer buffers must outlive every replay.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>

#include "attributes.h"
#include "checks.h"
#include "handlers.h"
#include "intranode/dispatch_combine.cuh"
#include "runtime/peer_buffers.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = ::xla::ffi;
using jax_ep::ffi_checks::ExpectExpertsPerRank;
using jax_ep::ffi_checks::ExpectRank;
using jax_ep::ffi_checks::ExpectShape;
using jax_ep::ffi_checks::FirstFailure;
using jax_ep::ffi_checks::ToFfiError;
using jax_ep::intranode::Tuning;
using jax_ep::runtime::PeerBuffers;
using PeerBuffersPtr = std::shared_ptr<const jax_ep::runtime::PeerBuffers>;

namespace {

// Sets `*buffers` to the registry entry of `device`, or returns
// FailedPrecondition "<op>: jax_ep peer buffers: <why>".
ffi::Error FindPeerBuffers(std::string_view op, int32_t device,
                           PeerBuffersPtr* buffers) {
  std::string why;
  *buffers = jax_ep::runtime::FindPeerBuffers(device, &why);
  if (*buffers != nullptr) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    std::string(op) + ": jax_ep peer buffers: " + why);
}

// The end of every handler, once it has listed its checks and filled its
// launcher's args: the first failed check, else `launch` on the peer buffers
// of `device`.
template <typename Launch>
ffi::Error CheckAndLaunch(const char* op, int32_t device,
                          std::initializer_list<ffi::Error> checks,
                          Launch launch) {
  if (auto error = FirstFailure(checks); error.failure()) return error;
  PeerBuffersPtr buffers;
  if (auto error = FindPeerBuffers(op, device, &buffers); error.failure()) {
    return error;
  }
  return ToFfiError(launch(*buffers));
}

// Bytes per row of a rank-2 buffer: the kernels move rows as bytes.
int64_t RowBytes(const ffi::AnyBuffer& rows) {
  return rows.dimensions()[1] *
         static_cast<int64_t>(ffi::ByteWidth(rows.element_type()));
}

// The rows a dispatch moves: checks x [T, C0] and scales [T, C1] in, recv_x
// [M, C0] and recv_scales [M, C1] of the same types out, then fills *m.
ffi::Error MovedRows(std::string_view op, const ffi::AnyBuffer& x,
                     const ffi::AnyBuffer& scales,
                     const ffi::AnyBuffer& recv_x,
                     const ffi::AnyBuffer& recv_scales, int64_t num_ranks,
                     int64_t capacity, const Tuning& tuning,
                     jax_ep::intranode::DispatchRows* m) {
  if (auto error =
          FirstFailure({ExpectRank(op, "x", x.dimensions(), 2),
                        ExpectRank(op, "scales", scales.dimensions(), 2)});
      error.failure()) {
    return error;
  }
  const int64_t num_tokens = x.dimensions()[0];
  if (auto error = FirstFailure({
          ExpectShape(op, "scales", scales.dimensions(),
                      {num_tokens, scales.dimensions()[1]}),
          ExpectShape(op, "recv_x", recv_x.dimensions(),
                      {capacity, x.dimensions()[1]}),
          ExpectShape(op, "recv_scales", recv_scales.dimensions(),
                      {capacity, scales.dimensions()[1]}),
      });
      error.failure()) {
    return error;
  }
  if (recv_x.element_type() != x.element_type() ||
      recv_scales.element_type() != scales.element_type()) {
    return ffi::Error::InvalidArgument(
        std::string(op) +
        ": recv_x and recv_scales must have the types of x and scales");
  }
  *m = {{x.untyped_data(), scales.untyped_data()},
        {RowBytes(x), RowBytes(scales)},
        {recv_x.untyped_data(), recv_scales.untyped_data()},
        num_tokens,
        num_ranks,
        capacity,
        tuning};
  return ffi::Error::Success();
}

bool ToElementType(ffi::DataType type, jax_ep::intranode::ElementType* out) {
  switch (type) {
    case ffi::DataType::BF16:
      *out = jax_ep::intranode::ElementType::kBF16;
      return true;
    case ffi::DataType::F32:
      *out = jax_ep::intranode::ElementType::kF32;
      return true;
    default:
      return false;
  }
}

}  // namespace

// A fresh dispatch: routes each token's rows to its experts' ranks
// (LaunchDispatch).
// Checks: shapes and row types agree with each other and the attributes.
static ffi::Error IntranodeDispatch(
    cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
    ffi::AnyBuffer scales, ffi::BufferR2<ffi::S32> topk_idx,
    ffi::BufferR2<ffi::F32> topk_weights, int64_t num_ranks,
    int64_t num_experts, int64_t capacity, int64_t expert_alignment,
    Tuning tuning, ffi::Result<ffi::AnyBuffer> recv_x,
    ffi::Result<ffi::AnyBuffer> recv_scales,
    ffi::ResultBufferR2<ffi::S32> recv_topk_idx,
    ffi::ResultBufferR2<ffi::F32> recv_topk_weights,
    ffi::ResultBufferR1<ffi::S32> num_recv_per_expert,
    ffi::ResultBufferR1<ffi::S32> src_index,
    ffi::ResultBufferR2<ffi::S32> recv_row,
    ffi::ResultBufferR0<ffi::S32> num_recv_tokens) {
  constexpr const char* kOp = jax_ep::targets::kIntranodeDispatch;
  const int64_t M = capacity;
  jax_ep::intranode::DispatchArgs a;
  if (auto error = FirstFailure({
          ExpectExpertsPerRank(kOp, num_experts, num_ranks),
          MovedRows(kOp, x, scales, *recv_x, *recv_scales, num_ranks, M,
                    tuning, &a.moved),
      });
      error.failure()) {
    return error;
  }
  const int64_t T = a.moved.num_tokens;
  const int64_t K = topk_idx.dimensions()[1];
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.num_topk = K;
  a.num_experts = num_experts;
  a.expert_alignment = expert_alignment;
  a.recv_topk_idx = recv_topk_idx->typed_data();
  a.recv_topk_weights = recv_topk_weights->typed_data();
  a.num_recv_per_expert = num_recv_per_expert->typed_data();
  a.src_index = src_index->typed_data();
  a.recv_row = recv_row->typed_data();
  a.num_recv_tokens = num_recv_tokens->typed_data();
  return CheckAndLaunch(
      kOp, device_ordinal,
      {
          ExpectShape(kOp, "topk_idx", topk_idx.dimensions(), {T, K}),
          ExpectShape(kOp, "topk_weights", topk_weights.dimensions(), {T, K}),
          ExpectShape(kOp, "recv_topk_idx", recv_topk_idx->dimensions(),
                      {M, K}),
          ExpectShape(kOp, "recv_topk_weights", recv_topk_weights->dimensions(),
                      {M, K}),
          ExpectShape(kOp, "num_recv_per_expert",
                      num_recv_per_expert->dimensions(),
                      {num_experts / num_ranks}),
          ExpectShape(kOp, "src_index", src_index->dimensions(), {M}),
          ExpectShape(kOp, "recv_row", recv_row->dimensions(), {num_ranks, T}),
      },
      [&](const PeerBuffers& buffers) {
        return jax_ep::intranode::LaunchDispatch(buffers, a, stream);
      });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeDispatch, IntranodeDispatch,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()              // x [T, C0], rows sent as bytes
        .Arg<ffi::AnyBuffer>()              // scales [T, C1], C1 may be 0
        .Arg<ffi::BufferR2<ffi::S32>>()     // topk_idx [T, K], -1: none
        .Arg<ffi::BufferR2<ffi::F32>>()     // topk_weights [T, K]
        .Attr<int64_t>("num_ranks")         // R
        .Attr<int64_t>("num_experts")       // E, a multiple of R
        .Attr<int64_t>("capacity")          // M, rows this rank receives
        .Attr<int64_t>("expert_alignment")  // rounds num_recv_per_expert
        .Attr<Tuning>("tuning")             // attributes.h
        .Ret<ffi::AnyBuffer>()              // recv_x [M, C0], x's type
        .Ret<ffi::AnyBuffer>()              // recv_scales [M, C1]
        .Ret<ffi::BufferR2<ffi::S32>>()     // recv_topk_idx [M, K]
        .Ret<ffi::BufferR2<ffi::F32>>()     // recv_topk_weights [M, K]
        .Ret<ffi::BufferR1<ffi::S32>>()     // num_recv_per_expert [E / R]
        .Ret<ffi::BufferR1<ffi::S32>>()     // src_index [M]
        .Ret<ffi::BufferR2<ffi::S32>>()     // recv_row [R, T]: the handle
        .Ret<ffi::BufferR0<ffi::S32>>(),    // num_recv_tokens []
    {ffi::Traits::kCmdBufferCompatible});

// A dispatch that replays a handle's routing, the backward of combine
// (LaunchCachedDispatch): recv_x[recv_row_me[s, t]] = x_s[t] for every kept
// row; rows from min(num_recv_tokens, M) on are zero.
// Checks: shapes and row types agree with each other and the attributes.
static ffi::Error IntranodeCachedDispatch(
    cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
    ffi::AnyBuffer scales, ffi::BufferR2<ffi::S32> recv_row,
    ffi::BufferR0<ffi::S32> num_recv_tokens, int64_t num_ranks,
    int64_t capacity, Tuning tuning, ffi::Result<ffi::AnyBuffer> recv_x,
    ffi::Result<ffi::AnyBuffer> recv_scales) {
  constexpr const char* kOp = jax_ep::targets::kIntranodeCachedDispatch;
  jax_ep::intranode::CachedDispatchArgs a;
  if (auto error = MovedRows(kOp, x, scales, *recv_x, *recv_scales, num_ranks,
                             capacity, tuning, &a.moved);
      error.failure()) {
    return error;
  }
  const int64_t T = a.moved.num_tokens;
  a.recv_row = recv_row.typed_data();
  a.num_recv_tokens = num_recv_tokens.typed_data();
  return CheckAndLaunch(
      kOp, device_ordinal,
      {ExpectShape(kOp, "recv_row", recv_row.dimensions(), {num_ranks, T})},
      [&](const PeerBuffers& buffers) {
        return jax_ep::intranode::LaunchCachedDispatch(buffers, a, stream);
      });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeCachedDispatch, IntranodeCachedDispatch,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()           // x [T, C0], rows sent as bytes
        .Arg<ffi::AnyBuffer>()           // scales [T, C1], C1 may be 0
        .Arg<ffi::BufferR2<ffi::S32>>()  // recv_row [R, T], the handle's
        .Arg<ffi::BufferR0<ffi::S32>>()  // num_recv_tokens [], the handle's
        .Attr<int64_t>("num_ranks")      // R
        .Attr<int64_t>("capacity")       // M
        .Attr<Tuning>("tuning")          // attributes.h
        .Ret<ffi::AnyBuffer>()           // recv_x [M, C0], x's type
        .Ret<ffi::AnyBuffer>(),          // recv_scales [M, C1]
    {ffi::Traits::kCmdBufferCompatible});

// Sums each token's expert outputs back on its own rank (LaunchCombine):
// out[t] = sum over ranks r, in rank order, in fp32, of
// y_r[recv_row_r[me, t]] (+0 where that is M), plus bias[t], rounded once to
// out's type.
// Checks: shapes agree with each other and num_ranks; y, out are bf16 or f32.
static ffi::Error IntranodeCombine(cudaStream_t stream, int32_t device_ordinal,
                                   ffi::AnyBuffer y,
                                   ffi::BufferR2<ffi::S32> recv_row,
                                   ffi::BufferR2<ffi::F32> bias,
                                   int64_t num_ranks, Tuning tuning,
                                   ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = jax_ep::targets::kIntranodeCombine;
  if (auto error = ExpectRank(kOp, "y", y.dimensions(), 2); error.failure()) {
    return error;
  }
  const int64_t M = y.dimensions()[0];
  const int64_t C = y.dimensions()[1];
  const int64_t T = recv_row.dimensions()[1];
  const bool has_bias = bias.dimensions()[1] != 0;
  jax_ep::intranode::CombineArgs a;
  const bool types_ok = ToElementType(y.element_type(), &a.y_type) &&
                        ToElementType(out->element_type(), &a.out_type);
  a.y = y.untyped_data();
  a.recv_row = recv_row.typed_data();
  a.bias = has_bias ? bias.typed_data() : nullptr;
  a.num_tokens = T;
  a.num_channels = C;
  a.num_ranks = num_ranks;
  a.capacity = M;
  a.tuning = tuning;
  a.out = out->untyped_data();
  return CheckAndLaunch(
      kOp, device_ordinal,
      {
          ExpectShape(kOp, "recv_row", recv_row.dimensions(), {num_ranks, T}),
          ExpectShape(kOp, "bias", bias.dimensions(), {T, has_bias ? C : 0}),
          ExpectShape(kOp, "out", out->dimensions(), {T, C}),
          types_ok ? ffi::Error::Success()
                   : ffi::Error::InvalidArgument(
                         std::string(kOp) + ": y and out must be bf16 or f32"),
      },
      [&](const PeerBuffers& buffers) {
        return jax_ep::intranode::LaunchCombine(buffers, a, stream);
      });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeCombine, IntranodeCombine,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()           // y [M, C], bf16 or f32
        .Arg<ffi::BufferR2<ffi::S32>>()  // recv_row [R, T], the handle's
        .Arg<ffi::BufferR2<ffi::F32>>()  // bias [T, C], or [T, 0] for none
        .Attr<int64_t>("num_ranks")      // R
        .Attr<Tuning>("tuning")          // attributes.h
        .Ret<ffi::AnyBuffer>(),          // out [T, C], f32 or y's type
    {ffi::Traits::kCmdBufferCompatible});
