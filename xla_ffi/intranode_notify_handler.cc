// FFI handler "jax_ep_intranode_notify": finds this device's peer buffers in
// the registry, checks XLA's buffers against the attributes, then enqueues
// csrc's intranode notify on XLA's stream.
//
//   num_tokens_per_rank     s32[R]    argument (this rank's layout)
//   num_tokens_per_expert   s32[E]    argument (this rank's layout)
//   num_ranks               int64     attribute, R
//   num_experts             int64     attribute, E
//   expert_alignment        int64     attribute
//   timeout_ns              int64     attribute, per wait
//   count_matrix            s32[R, R] result
//   recv_tokens_per_expert  s32[E/R]  result
//
// The rank comes from the registry entry of the device XLA runs the call on.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "checks.h"
#include "handlers.h"
#include "intranode/notify.cuh"
#include "peer_buffers_lookup.h"
#include "runtime/peer_buffers.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {
namespace {

namespace ffi = ::xla::ffi;
using ffi_checks::ExpectShape;

constexpr char kOp[] = "jax_ep_intranode_notify";

ffi::Error IntranodeNotifyImpl(
    cudaStream_t stream, int32_t device_ordinal,
    ffi::Buffer<ffi::S32> num_tokens_per_rank,
    ffi::Buffer<ffi::S32> num_tokens_per_expert, int64_t num_ranks,
    int64_t num_experts, int64_t expert_alignment, int64_t timeout_ns,
    ffi::ResultBuffer<ffi::S32> count_matrix,
    ffi::ResultBuffer<ffi::S32> recv_tokens_per_expert) {
  if (num_ranks < 1 || num_experts % num_ranks != 0) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": num_experts (" + std::to_string(num_experts) +
        ") must be a multiple of num_ranks (" + std::to_string(num_ranks) +
        ")");
  }
  for (auto error : {
           ExpectShape(kOp, "num_tokens_per_rank",
                       num_tokens_per_rank.dimensions(), {num_ranks}),
           ExpectShape(kOp, "num_tokens_per_expert",
                       num_tokens_per_expert.dimensions(), {num_experts}),
           ExpectShape(kOp, "count_matrix", count_matrix->dimensions(),
                       {num_ranks, num_ranks}),
           ExpectShape(kOp, "recv_tokens_per_expert",
                       recv_tokens_per_expert->dimensions(),
                       {num_experts / num_ranks}),
       }) {
    if (error.failure()) return error;
  }
  std::shared_ptr<const runtime::PeerBuffers> buffers;
  if (auto error = ffi_checks::FindPeerBuffers(kOp, device_ordinal, &buffers);
      error.failure()) {
    return error;
  }
  intranode::NotifyArgs args;
  args.num_tokens_per_rank = num_tokens_per_rank.typed_data();
  args.num_tokens_per_expert = num_tokens_per_expert.typed_data();
  args.num_ranks = num_ranks;
  args.num_experts = num_experts;
  args.expert_alignment = expert_alignment;
  args.timeout_ns = timeout_ns;
  args.count_matrix = count_matrix->typed_data();
  args.recv_tokens_per_expert = recv_tokens_per_expert->typed_data();
  return ffi_checks::ToFfiError(
      intranode::LaunchNotify(buffers->view(), args, stream));
}

}  // namespace
}  // namespace jax_ep

// Enqueues one kernel, allocates nothing and never waits for the device; the
// call sequence and slot parity live in device memory: safe in command
// buffers (CUDA graphs). The peer buffers must outlive every replay.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpIntranodeNotify, jax_ep::IntranodeNotifyImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // stream
        .Ctx<xla::ffi::DeviceOrdinal>()                 // device_ordinal
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // num_tokens_per_rank
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // num_tokens_per_expert
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("expert_alignment")
        .Attr<int64_t>("timeout_ns")
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>()   // count_matrix
        .Ret<xla::ffi::Buffer<xla::ffi::S32>>(),  // recv_tokens_per_expert
    {xla::ffi::Traits::kCmdBufferCompatible});
