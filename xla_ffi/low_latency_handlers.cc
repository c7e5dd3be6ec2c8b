// FFI handlers of the low-latency family: dispatch and combine (csrc/
// low_latency), each as one custom call or as its send and receive halves (a
// receive hook), on XLA's stream, over this process's NVSHMEM heap. All take
// the round trip's `shape` and the backend's `options` (attributes.h); a send
// half returns the ticket its receive half takes. The launchers check `shape`
// against the kernels' limits and the heap; the handlers check XLA's buffers
// against `shape`.
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
using jax_ep::low_latency::CombineArgs;
using jax_ep::low_latency::DispatchArgs;
using jax_ep::low_latency::Halves;
using jax_ep::low_latency::Heap;
using jax_ep::low_latency::Options;
using jax_ep::low_latency::Shape;

// A ticket is the send's sequence number as two u32 words (lo, hi).
constexpr int64_t kTicketWords = 2;

// The end of every handler, once it has filled its launcher's args: the
// first failed check, else `launch` of `halves` on this process's NVSHMEM
// heap.
template <typename Args>
static ffi::Error CheckAndLaunch(
    const char* op, std::initializer_list<ffi::Error> checks,
    jax_ep::Status (*launch)(const Heap&, const Args&, Halves, cudaStream_t),
    const Args& a, Halves halves, cudaStream_t stream) {
  if (auto error = FirstFailure(checks); error.failure()) return error;
  Heap heap;
  if (auto error = ToFfiError(jax_ep::runtime::CurrentHeap(op, &heap));
      error.failure()) {
    return error;
  }
  return ToFfiError(launch(heap, a, halves, stream));
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

static ffi::Error ExpectTicket(const char* op,
                               ffi::Span<const int64_t> dimensions) {
  return ExpectShape(op, "ticket", dimensions, {kTicketWords});
}

// --- Dispatch -----------------------------------------------------------------

// The tokens (both halves read them) into `a`; the first failed check of
// them.
static ffi::Error DispatchInputs(const char* op, ffi::BufferR2<ffi::BF16> x,
                                 ffi::BufferR2<ffi::S32> topk_idx,
                                 DispatchArgs* a) {
  a->x = x.typed_data();
  a->topk_idx = topk_idx.typed_data();
  return FirstFailure({
      ExpectShape(op, "x", x.dimensions(),
                  {a->shape.num_tokens, a->shape.hidden}),
      ExpectShape(op, "topk_idx", topk_idx.dimensions(),
                  {a->shape.num_tokens, a->shape.num_topk}),
  });
}

// The receive half's outputs into `a`: recv_x [L, S, H] (e4m3 with use_fp8,
// else bf16), recv_scales f32 [L, S, H/128], or s32 [L, S, H/512] with
// use_ue8m0 (four exponents packed), unused without use_fp8; count [L],
// src_index and slot [L, S]. The first failed check of them.
static ffi::Error DispatchOutputs(const char* op, ffi::AnyBuffer recv_x,
                                  ffi::AnyBuffer recv_scales,
                                  ffi::ResultBufferR1<ffi::S32> count,
                                  ffi::ResultBufferR2<ffi::S32> src_index,
                                  ffi::ResultBufferR2<ffi::S32> slot,
                                  DispatchArgs* a) {
  int64_t L, S;
  if (auto error = ExpertSlots(op, a->shape, &L, &S); error.failure()) {
    return error;
  }
  const int64_t H = a->shape.hidden;
  const int64_t scale_columns =
      H / (a->use_ue8m0 ? 4 * jax_ep::low_latency::kScaleGroup
                        : jax_ep::low_latency::kScaleGroup);
  const ffi::DataType x_type =
      a->use_fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
  const ffi::DataType scales_type =
      a->use_ue8m0 ? ffi::DataType::S32 : ffi::DataType::F32;
  const bool types_ok =
      recv_x.element_type() == x_type &&
      (!a->use_fp8 || recv_scales.element_type() == scales_type);
  a->recv_x = recv_x.untyped_data();
  a->recv_scales = a->use_fp8 ? recv_scales.untyped_data() : nullptr;
  a->count = count->typed_data();
  a->src_index = src_index->typed_data();
  a->slot = slot->typed_data();
  return FirstFailure({
      ExpectShape(op, "recv_x", recv_x.dimensions(), {L, S, H}),
      a->use_fp8 ? ExpectShape(op, "recv_scales", recv_scales.dimensions(),
                               {L, S, scale_columns})
                 : ffi::Error::Success(),
      ExpectShape(op, "count", count->dimensions(), {L}),
      ExpectShape(op, "src_index", src_index->dimensions(), {L, S}),
      ExpectShape(op, "slot", slot->dimensions(), {L, S}),
      types_ok ? ffi::Error::Success()
               : ffi::Error::InvalidArgument(
                     std::string(op) +
                     ": recv_x must be f8e4m3fn with use_fp8 (recv_scales "
                     "f32, or s32 with use_ue8m0), else bf16"),
  });
}

static DispatchArgs DispatchOptions(Shape shape, Options options, bool use_fp8,
                                    bool round_scale, bool use_ue8m0,
                                    bool zero_padding) {
  DispatchArgs a;
  a.shape = shape;
  a.options = options;
  a.use_fp8 = use_fp8;
  a.round_scale = round_scale;
  a.use_ue8m0 = use_ue8m0;
  a.zero_padding = zero_padding;
  return a;
}

// Sends each token, cast to fp8 when asked, to its experts' ranks and packs
// the rows the peers sent into this rank's experts' slots, in one kernel.
static ffi::Error LowLatencyDispatch(
    cudaStream_t stream, ffi::BufferR2<ffi::BF16> x,
    ffi::BufferR2<ffi::S32> topk_idx, Shape shape, Options options,
    bool use_fp8, bool round_scale, bool use_ue8m0, bool zero_padding,
    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
    ffi::ResultBufferR1<ffi::S32> count,
    ffi::ResultBufferR2<ffi::S32> src_index,
    ffi::ResultBufferR2<ffi::S32> slot) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyDispatch;
  DispatchArgs a = DispatchOptions(shape, options, use_fp8, round_scale,
                                   use_ue8m0, zero_padding);
  return CheckAndLaunch(
      kOp,
      {DispatchInputs(kOp, x, topk_idx, &a),
       DispatchOutputs(kOp, *recv_x, *recv_scales, count, src_index, slot,
                       &a)},
      jax_ep::low_latency::LaunchDispatch, a, Halves::kBoth, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatch, LowLatencyDispatch,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR2<ffi::BF16>>()  // x [T, H]
        .Arg<ffi::BufferR2<ffi::S32>>()   // topk_idx [T, K], -1: none
        .Attr<Shape>("shape")             // T, Tmax, H, K, E, R
        .Attr<Options>("options")
        .Attr<bool>("use_fp8")            // send e4m3 rows and f32 scales
        .Attr<bool>("round_scale")        // scales rounded to powers of 2
        .Attr<bool>("use_ue8m0")          // scales as packed exponents
        .Attr<bool>("zero_padding")       // zero the slots past each count
        .Ret<ffi::AnyBuffer>()            // recv_x [L, S, H], e4m3 or bf16
        .Ret<ffi::AnyBuffer>()            // recv_scales, see DispatchOutputs
        .Ret<ffi::BufferR1<ffi::S32>>()   // count [L]: rows per local expert
        .Ret<ffi::BufferR2<ffi::S32>>()   // src_index [L, S]: the handle
        .Ret<ffi::BufferR2<ffi::S32>>(),  // slot [L, S]: the handle
    {ffi::Traits::kCmdBufferCompatible});

// The send half of LowLatencyDispatch.
static ffi::Error LowLatencyDispatchSend(cudaStream_t stream,
                                         ffi::BufferR2<ffi::BF16> x,
                                         ffi::BufferR2<ffi::S32> topk_idx,
                                         Shape shape, Options options,
                                         bool use_fp8, bool round_scale,
                                         ffi::ResultBufferR1<ffi::U32> ticket) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyDispatchSend;
  DispatchArgs a = DispatchOptions(shape, options, use_fp8, round_scale,
                                   /*use_ue8m0=*/false, /*zero_padding=*/true);
  a.ticket = ticket->typed_data();
  return CheckAndLaunch(kOp,
                        {DispatchInputs(kOp, x, topk_idx, &a),
                         ExpectTicket(kOp, ticket->dimensions())},
                        jax_ep::low_latency::LaunchDispatch, a, Halves::kSend,
                        stream);
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

// The receive half of LowLatencyDispatch; it casts the rows of this rank's
// tokens for its own experts from x, as the send half would have.
static ffi::Error LowLatencyDispatchRecv(
    cudaStream_t stream, ffi::BufferR1<ffi::U32> ticket,
    ffi::BufferR2<ffi::BF16> x, ffi::BufferR2<ffi::S32> topk_idx, Shape shape,
    Options options, bool use_fp8, bool round_scale, bool use_ue8m0,
    bool zero_padding, ffi::Result<ffi::AnyBuffer> recv_x,
    ffi::Result<ffi::AnyBuffer> recv_scales,
    ffi::ResultBufferR1<ffi::S32> count,
    ffi::ResultBufferR2<ffi::S32> src_index,
    ffi::ResultBufferR2<ffi::S32> slot) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyDispatchRecv;
  DispatchArgs a = DispatchOptions(shape, options, use_fp8, round_scale,
                                   use_ue8m0, zero_padding);
  a.ticket = const_cast<uint32_t*>(ticket.typed_data());  // read only
  return CheckAndLaunch(
      kOp,
      {ExpectTicket(kOp, ticket.dimensions()),
       DispatchInputs(kOp, x, topk_idx, &a),
       DispatchOutputs(kOp, *recv_x, *recv_scales, count, src_index, slot,
                       &a)},
      jax_ep::low_latency::LaunchDispatch, a, Halves::kReceive, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchRecv, LowLatencyDispatchRecv,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR1<ffi::U32>>()   // ticket [2], the send half's
        .Arg<ffi::BufferR2<ffi::BF16>>()  // x [T, H], the send half's
        .Arg<ffi::BufferR2<ffi::S32>>()   // topk_idx [T, K], the send half's
        .Attr<Shape>("shape")             // T, Tmax, H, K, E, R
        .Attr<Options>("options")
        .Attr<bool>("use_fp8")            // as the send half's
        .Attr<bool>("round_scale")        // as the send half's
        .Attr<bool>("use_ue8m0")          // scales as packed exponents
        .Attr<bool>("zero_padding")       // zero the slots past each count
        .Ret<ffi::AnyBuffer>()            // recv_x [L, S, H], e4m3 or bf16
        .Ret<ffi::AnyBuffer>()            // recv_scales, see DispatchOutputs
        .Ret<ffi::BufferR1<ffi::S32>>()   // count [L]: rows per local expert
        .Ret<ffi::BufferR2<ffi::S32>>()   // src_index [L, S]: the handle
        .Ret<ffi::BufferR2<ffi::S32>>(),  // slot [L, S]: the handle
    {ffi::Traits::kCmdBufferCompatible});

// --- Combine ------------------------------------------------------------------

// y [L, S, H] into `a` (both halves read it: the send for the other ranks'
// tokens, the receive for this rank's); its check.
static ffi::Error CombineRows(const char* op, ffi::BufferR3<ffi::BF16> y,
                              CombineArgs* a) {
  int64_t L, S;
  if (auto error = ExpertSlots(op, a->shape, &L, &S); error.failure()) {
    return error;
  }
  a->y = y.typed_data();
  return ExpectShape(op, "y", y.dimensions(), {L, S, a->shape.hidden});
}

// A dispatch handle's [L, S] field into `*field`; its check.
static ffi::Error HandleField(const char* op, const char* name,
                              ffi::BufferR2<ffi::S32> buffer,
                              const Shape& shape, const int32_t** field) {
  int64_t L, S;
  if (auto error = ExpertSlots(op, shape, &L, &S); error.failure()) {
    return error;
  }
  *field = buffer.typed_data();
  return ExpectShape(op, name, buffer.dimensions(), {L, S});
}

// The receive half's routing, weights and output into `a`; the first failed
// check.
static ffi::Error CombineOutput(const char* op,
                                ffi::BufferR2<ffi::S32> topk_idx,
                                ffi::BufferR2<ffi::F32> topk_weights,
                                ffi::ResultBufferR2<ffi::BF16> out,
                                CombineArgs* a) {
  const int64_t T = a->shape.num_tokens, K = a->shape.num_topk;
  a->topk_idx = topk_idx.typed_data();
  a->weights = topk_weights.typed_data();
  a->out = out->typed_data();
  return FirstFailure({
      ExpectShape(op, "topk_idx", topk_idx.dimensions(), {T, K}),
      ExpectShape(op, "topk_weights", topk_weights.dimensions(), {T, K}),
      ExpectShape(op, "out", out->dimensions(), {T, a->shape.hidden}),
  });
}

static CombineArgs CombineOptions(Shape shape, Options options) {
  CombineArgs a;
  a.shape = shape;
  a.options = options;
  return a;
}

// Sends every received row's expert output back to its source rank and sums
// each token's weighted expert outputs in the reference's order, in one
// kernel.
static ffi::Error LowLatencyCombine(
    cudaStream_t stream, ffi::BufferR3<ffi::BF16> y,
    ffi::BufferR2<ffi::S32> src_index, ffi::BufferR2<ffi::S32> slot,
    ffi::BufferR2<ffi::S32> topk_idx, ffi::BufferR2<ffi::F32> topk_weights,
    Shape shape, Options options, bool zero_copy,
    ffi::ResultBufferR2<ffi::BF16> out) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyCombine;
  CombineArgs a = CombineOptions(shape, options);
  a.zero_copy = zero_copy;
  return CheckAndLaunch(
      kOp,
      {CombineRows(kOp, y, &a),
       HandleField(kOp, "src_index", src_index, shape, &a.src_index),
       HandleField(kOp, "slot", slot, shape, &a.slot),
       CombineOutput(kOp, topk_idx, topk_weights, out, &a)},
      jax_ep::low_latency::LaunchCombine, a, Halves::kBoth, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombine, LowLatencyCombine,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR3<ffi::BF16>>()  // y [L, S = R * Tmax, H]
        .Arg<ffi::BufferR2<ffi::S32>>()   // src_index [L, S], the handle's
        .Arg<ffi::BufferR2<ffi::S32>>()   // slot [L, S], the handle's
        .Arg<ffi::BufferR2<ffi::S32>>()   // topk_idx [T, K], the dispatch's
        .Arg<ffi::BufferR2<ffi::F32>>()   // topk_weights [T, K]
        .Attr<Shape>("shape")             // the dispatch's
        .Attr<Options>("options")
        .Attr<bool>("zero_copy")          // puts read y, not a staged copy
        .Ret<ffi::BufferR2<ffi::BF16>>(),  // out [T, H]
    {ffi::Traits::kCmdBufferCompatible});

// The send half of LowLatencyCombine.
static ffi::Error LowLatencyCombineSend(cudaStream_t stream,
                                        ffi::BufferR3<ffi::BF16> y,
                                        ffi::BufferR2<ffi::S32> src_index,
                                        Shape shape, Options options,
                                        bool zero_copy,
                                        ffi::ResultBufferR1<ffi::U32> ticket) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyCombineSend;
  CombineArgs a = CombineOptions(shape, options);
  a.zero_copy = zero_copy;
  a.ticket = ticket->typed_data();
  return CheckAndLaunch(
      kOp,
      {CombineRows(kOp, y, &a),
       HandleField(kOp, "src_index", src_index, shape, &a.src_index),
       ExpectTicket(kOp, ticket->dimensions())},
      jax_ep::low_latency::LaunchCombine, a, Halves::kSend, stream);
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

// The receive half of LowLatencyCombine.
static ffi::Error LowLatencyCombineRecv(
    cudaStream_t stream, ffi::BufferR1<ffi::U32> ticket,
    ffi::BufferR3<ffi::BF16> y, ffi::BufferR2<ffi::S32> slot,
    ffi::BufferR2<ffi::S32> topk_idx, ffi::BufferR2<ffi::F32> topk_weights,
    Shape shape, Options options, ffi::ResultBufferR2<ffi::BF16> out) {
  constexpr const char* kOp = jax_ep::targets::kLowLatencyCombineRecv;
  CombineArgs a = CombineOptions(shape, options);
  a.ticket = const_cast<uint32_t*>(ticket.typed_data());  // read only
  return CheckAndLaunch(
      kOp,
      {ExpectTicket(kOp, ticket.dimensions()), CombineRows(kOp, y, &a),
       HandleField(kOp, "slot", slot, shape, &a.slot),
       CombineOutput(kOp, topk_idx, topk_weights, out, &a)},
      jax_ep::low_latency::LaunchCombine, a, Halves::kReceive, stream);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineRecv, LowLatencyCombineRecv,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR1<ffi::U32>>()   // ticket [2], the send half's
        .Arg<ffi::BufferR3<ffi::BF16>>()  // y [L, S], the send half's
        .Arg<ffi::BufferR2<ffi::S32>>()   // slot [L, S], the handle's
        .Arg<ffi::BufferR2<ffi::S32>>()   // topk_idx [T, K], the dispatch's
        .Arg<ffi::BufferR2<ffi::F32>>()   // topk_weights [T, K]
        .Attr<Shape>("shape")             // the dispatch's
        .Attr<Options>("options")
        .Ret<ffi::BufferR2<ffi::BF16>>(),  // out [T, H]
    {ffi::Traits::kCmdBufferCompatible});
