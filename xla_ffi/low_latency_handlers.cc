// FFI handlers of the low-latency family: the send and receive halves of a
// dispatch and of a combine (csrc/low_latency) on XLA's stream, over this
// process's NVSHMEM heap. All four take the round trip's `shape` and the
// backend's `options` (attributes.h); a send half returns the ticket its
// receive half takes. The launchers check `shape` against the kernels' limits
// and the heap; the handlers check XLA's buffers against `shape`.
//
// One kernel each, no allocation, no host wait, the per-call state on the
// device: safe in command buffers (CUDA graphs).

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "attributes.h"
#include "checks.h"
#include "handlers.h"
#include "low_latency/low_latency.cuh"
#include "runtime/nvshmem_heap.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = ::xla::ffi;
using jax_ep::ffi_checks::ExpectExpertsPerRank;
using jax_ep::ffi_checks::ExpectShape;
using jax_ep::ffi_checks::FirstFailure;
using jax_ep::ffi_checks::ToFfiError;
using jax_ep::low_latency::Heap;
using jax_ep::low_latency::Options;
using jax_ep::low_latency::Shape;

// A ticket is the send's sequence number as two u32 words (lo, hi).
constexpr int64_t kTicketWords = 2;

// The end of every handler, once it has listed its checks and filled its
// launcher's args: the first failed check, else `launch` on this process's
// NVSHMEM heap.
template <typename Args>
static ffi::Error CheckAndLaunch(
    const char* op, std::initializer_list<ffi::Error> checks,
    jax_ep::Status (*launch)(const Heap&, const Args&, cudaStream_t),
    const Args& a, cudaStream_t stream) {
  if (auto error = FirstFailure(checks); error.failure()) return error;
  Heap heap;
  if (auto error = ToFfiError(jax_ep::runtime::CurrentHeap(op, &heap));
      error.failure()) {
    return error;
  }
  return ToFfiError(launch(heap, a, stream));
}

// The local experts L and the slots per local expert S = R * Tmax of
// `shape`, once its experts split evenly over its ranks (the launcher checks
// the rest of the shape).
static ffi::Error ExpertSlots(const char* op, const Shape& shape, int64_t* L,
                              int64_t* S) {
  if (auto error =
          ExpectExpertsPerRank(op, shape.num_experts, shape.num_ranks);
      error.failure()) {
    return error;
  }
  *L = shape.num_local();
  *S = shape.num_ranks * shape.max_tokens;
  return ffi::Error::Success();
}

// Sends each token, cast to fp8 when asked, to its experts' ranks
// (LaunchDispatchSend).
// Checks: x and topk_idx agree with `shape`.
static ffi::Error LowLatencyDispatchSend(cudaStream_t stream,
                                         ffi::BufferR2<ffi::BF16> x,
                                         ffi::BufferR2<ffi::S32> topk_idx,
                                         Shape shape, Options options,
                                         bool use_fp8, bool round_scale,
                                         ffi::ResultBufferR1<ffi::U32> ticket) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyDispatchSend;
  const int64_t T = shape.num_tokens;
  jax_ep::low_latency::DispatchSendArgs a;
  a.shape = shape;
  a.x = x.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.use_fp8 = use_fp8;
  a.round_scale = round_scale;
  a.options = options;
  a.ticket = ticket->typed_data();
  return CheckAndLaunch(
      kOp,
      {
          ExpectShape(kOp, "x", x.dimensions(), {T, shape.hidden}),
          ExpectShape(kOp, "topk_idx", topk_idx.dimensions(),
                      {T, shape.num_topk}),
          ExpectShape(kOp, "ticket", ticket->dimensions(), {kTicketWords}),
      },
      jax_ep::low_latency::LaunchDispatchSend, a, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchSend, LowLatencyDispatchSend,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR2<ffi::BF16>>()  // x [T, H]
        .Arg<ffi::BufferR2<ffi::S32>>()   // topk_idx [T, K], -1: none
        .Attr<Shape>("shape")             // T, Tmax, H, K, E, R
        .Attr<Options>("options")
        .Attr<bool>("use_fp8")            // send e4m3 rows and f32 scales
        .Attr<bool>("round_scale")        // scales rounded to powers of 2
        .Ret<ffi::BufferR1<ffi::U32>>(),  // ticket [2]: the call's sequence
    {ffi::Traits::kCmdBufferCompatible});

// Packs the rows the peers sent into this rank's experts' slots
// (LaunchDispatchRecv): S = R * Tmax slots per local expert. recv_scales is
// f32 [L, S, H/128], or s32 [L, S, H/512] with use_ue8m0 (four exponents
// packed), and unused without use_fp8.
// Checks: the outputs agree with `shape` and with use_fp8, use_ue8m0.
static ffi::Error LowLatencyDispatchRecv(
    cudaStream_t stream, ffi::BufferR1<ffi::U32> ticket, Shape shape,
    Options options, bool use_fp8, bool use_ue8m0, bool zero_padding,
    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
    ffi::ResultBufferR1<ffi::S32> count,
    ffi::ResultBufferR2<ffi::S32> src_index,
    ffi::ResultBufferR2<ffi::S32> slot) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyDispatchRecv;
  int64_t L, S;
  if (auto error = ExpertSlots(kOp, shape, &L, &S); error.failure()) {
    return error;
  }
  const int64_t H = shape.hidden;
  // UE8M0 packs the exponents of four scale groups into one s32.
  const int64_t scale_columns =
      H / (use_ue8m0 ? 4 * jax_ep::low_latency::kScaleGroup
                     : jax_ep::low_latency::kScaleGroup);
  const ffi::DataType x_type =
      use_fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
  const ffi::DataType scales_type =
      use_ue8m0 ? ffi::DataType::S32 : ffi::DataType::F32;
  const bool types_ok =
      recv_x->element_type() == x_type &&
      (!use_fp8 || recv_scales->element_type() == scales_type);
  jax_ep::low_latency::DispatchRecvArgs a;
  a.shape = shape;
  a.ticket = ticket.typed_data();
  a.use_fp8 = use_fp8;
  a.use_ue8m0 = use_ue8m0;
  a.zero_padding = zero_padding;
  a.options = options;
  a.recv_x = recv_x->untyped_data();
  a.recv_scales = use_fp8 ? recv_scales->untyped_data() : nullptr;
  a.count = count->typed_data();
  a.src_index = src_index->typed_data();
  a.slot = slot->typed_data();
  return CheckAndLaunch(
      kOp,
      {
          ExpectShape(kOp, "ticket", ticket.dimensions(), {kTicketWords}),
          ExpectShape(kOp, "recv_x", recv_x->dimensions(), {L, S, H}),
          use_fp8 ? ExpectShape(kOp, "recv_scales", recv_scales->dimensions(),
                                {L, S, scale_columns})
                  : ffi::Error::Success(),
          ExpectShape(kOp, "count", count->dimensions(), {L}),
          ExpectShape(kOp, "src_index", src_index->dimensions(), {L, S}),
          ExpectShape(kOp, "slot", slot->dimensions(), {L, S}),
          types_ok ? ffi::Error::Success()
                   : ffi::Error::InvalidArgument(
                         std::string(kOp) +
                         ": recv_x must be f8e4m3fn with use_fp8 "
                         "(recv_scales f32, or s32 with use_ue8m0), else "
                         "bf16"),
      },
      jax_ep::low_latency::LaunchDispatchRecv, a, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchRecv, LowLatencyDispatchRecv,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR1<ffi::U32>>()  // ticket [2], the send half's
        .Attr<Shape>("shape")            // T, Tmax, H, K, E, R
        .Attr<Options>("options")
        .Attr<bool>("use_fp8")            // as the send half's
        .Attr<bool>("use_ue8m0")          // scales as packed exponents
        .Attr<bool>("zero_padding")       // zero the slots past each count
        .Ret<ffi::AnyBuffer>()            // recv_x [L, S, H], e4m3 or bf16
        .Ret<ffi::AnyBuffer>()            // recv_scales, see above
        .Ret<ffi::BufferR1<ffi::S32>>()   // count [L]: rows per local expert
        .Ret<ffi::BufferR2<ffi::S32>>()   // src_index [L, S]: the handle
        .Ret<ffi::BufferR2<ffi::S32>>(),  // slot [L, S]: the handle
    {ffi::Traits::kCmdBufferCompatible});

// Sends every received row's expert output back to its source rank
// (LaunchCombineSend).
// Checks: y and src_index agree with `shape`.
static ffi::Error LowLatencyCombineSend(cudaStream_t stream,
                                        ffi::BufferR3<ffi::BF16> y,
                                        ffi::BufferR2<ffi::S32> src_index,
                                        Shape shape, Options options,
                                        bool zero_copy,
                                        ffi::ResultBufferR1<ffi::U32> ticket) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyCombineSend;
  int64_t L, S;
  if (auto error = ExpertSlots(kOp, shape, &L, &S); error.failure()) {
    return error;
  }
  jax_ep::low_latency::CombineSendArgs a;
  a.shape = shape;
  a.y = y.typed_data();
  a.src_index = src_index.typed_data();
  a.zero_copy = zero_copy;
  a.options = options;
  a.ticket = ticket->typed_data();
  return CheckAndLaunch(
      kOp,
      {
          ExpectShape(kOp, "y", y.dimensions(), {L, S, shape.hidden}),
          ExpectShape(kOp, "src_index", src_index.dimensions(), {L, S}),
          ExpectShape(kOp, "ticket", ticket->dimensions(), {kTicketWords}),
      },
      jax_ep::low_latency::LaunchCombineSend, a, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineSend, LowLatencyCombineSend,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR3<ffi::BF16>>()  // y [L, S = R * Tmax, H]
        .Arg<ffi::BufferR2<ffi::S32>>()   // src_index [L, S], the handle's
        .Attr<Shape>("shape")             // the dispatch's
        .Attr<Options>("options")
        .Attr<bool>("zero_copy")          // puts read y, not a staged copy
        .Ret<ffi::BufferR1<ffi::U32>>(),  // ticket [2]: the call's sequence
    {ffi::Traits::kCmdBufferCompatible});

// Sums each token's weighted expert outputs in the reference's order
// (LaunchCombineRecv).
// Checks: topk_idx, topk_weights and out agree with `shape`.
static ffi::Error LowLatencyCombineRecv(cudaStream_t stream,
                                        ffi::BufferR1<ffi::U32> ticket,
                                        ffi::BufferR2<ffi::S32> topk_idx,
                                        ffi::BufferR2<ffi::F32> topk_weights,
                                        Shape shape, Options options,
                                        ffi::ResultBufferR2<ffi::BF16> out) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyCombineRecv;
  const int64_t T = shape.num_tokens;
  const int64_t K = shape.num_topk;
  jax_ep::low_latency::CombineRecvArgs a;
  a.shape = shape;
  a.ticket = ticket.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.weights = topk_weights.typed_data();
  a.options = options;
  a.out = out->typed_data();
  return CheckAndLaunch(
      kOp,
      {
          ExpectShape(kOp, "ticket", ticket.dimensions(), {kTicketWords}),
          ExpectShape(kOp, "topk_idx", topk_idx.dimensions(), {T, K}),
          ExpectShape(kOp, "topk_weights", topk_weights.dimensions(), {T, K}),
          ExpectShape(kOp, "out", out->dimensions(), {T, shape.hidden}),
      },
      jax_ep::low_latency::LaunchCombineRecv, a, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineRecv, LowLatencyCombineRecv,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR1<ffi::U32>>()  // ticket [2], the send half's
        .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx [T, K], the dispatch's
        .Arg<ffi::BufferR2<ffi::F32>>()  // topk_weights [T, K]
        .Attr<Shape>("shape")            // the dispatch's
        .Attr<Options>("options")
        .Ret<ffi::BufferR2<ffi::BF16>>(),  // out [T, H]
    {ffi::Traits::kCmdBufferCompatible});
