// FFI handler of the internode family: the row exchange within a team of
// ranks (this rank's local index on every node, or the ranks of its node;
// csrc/internode/exchange.cu), on XLA's stream, over this process's NVSHMEM
// exchange region. The
// internode dispatch and combine (jax_ep/_src/cuda/internode.py) are built
// on it. The launcher checks the shape against the region; the handler
// checks XLA's buffers against each other.
//
// Three kernels, no allocation, no host wait, the per-call state on the
// device: safe in command buffers (CUDA graphs).

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "handlers.h"
#include "internode/exchange.cuh"
#include "runtime/nvshmem_heap.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = ::xla::ffi;
using jax_ep::ffi_checks::ExpectShape;
using jax_ep::ffi_checks::FirstFailure;
using jax_ep::ffi_checks::ToFfiError;

// Sends row src_row[i, t] of `rows` (where in range) to slot [my index, t] of
// team member i; returns what the members sent here (LaunchExchange):
// recv_rows [Z, T, B] (zero where nothing came) and recv_mask [Z, T] (1
// where a row came).
// Checks: the row widths and [Z, T] agree between the buffers.
static ffi::Error InternodeExchange(cudaStream_t stream,
                                    ffi::BufferR2<ffi::U8> rows,
                                    ffi::BufferR2<ffi::S32> src_row,
                                    int64_t team_stride, int64_t ranks_per_node,
                                    int64_t num_sms, int64_t rdma_chunk,
                                    int64_t timeout_ns,
                                    ffi::ResultBufferR3<ffi::U8> recv_rows,
                                    ffi::ResultBufferR2<ffi::S32> recv_mask) {
  constexpr const char* kOp = jax_ep::targets::kInternodeExchange;
  const auto rows_dims = rows.dimensions();
  const auto src_dims = src_row.dimensions();
  jax_ep::internode::ExchangeArgs a;
  a.shape = {src_dims[0], src_dims[1], rows_dims[1]};
  a.team_stride = static_cast<int>(team_stride);
  a.ranks_per_node = static_cast<int>(ranks_per_node);
  a.num_sms = static_cast<int>(num_sms);
  a.shape.min_chunk_tokens =
      std::max<int64_t>(rdma_chunk, jax_ep::internode::kMinChunkTokens);
  a.rows = reinterpret_cast<const char*>(rows.typed_data());
  a.num_rows = rows_dims[0];
  a.src_row = src_row.typed_data();
  a.recv_rows = reinterpret_cast<char*>(recv_rows->typed_data());
  a.recv_mask = recv_mask->typed_data();
  a.timeout_ns = timeout_ns;
  const int64_t Z = a.shape.team_size, T = a.shape.num_tokens;
  if (auto error = FirstFailure({
          ExpectShape(kOp, "recv_rows", recv_rows->dimensions(),
                      {Z, T, a.shape.row_bytes}),
          ExpectShape(kOp, "recv_mask", recv_mask->dimensions(), {Z, T}),
      });
      error.failure()) {
    return error;
  }
  jax_ep::internode::Region region;
  if (auto error = ToFfiError(
          jax_ep::runtime::CurrentExchangeRegion(kOp, &region));
      error.failure()) {
    return error;
  }
  return ToFfiError(jax_ep::internode::LaunchExchange(kOp, region, a, stream));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpInternodeExchange, InternodeExchange,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::BufferR2<ffi::U8>>()   // rows [X, B], B a multiple of 16
        .Arg<ffi::BufferR2<ffi::S32>>()  // src_row [Z, T]: row to member i, or -1
        .Attr<int64_t>("team_stride")     // G (a local index's ranks) or 1
        .Attr<int64_t>("ranks_per_node")  // G
        .Attr<int64_t>("num_sms")         // Config.num_sms
        .Attr<int64_t>("rdma_chunk")      // Config.rdma_chunk (0: automatic)
        .Attr<int64_t>("timeout_ns")
        .Ret<ffi::BufferR3<ffi::U8>>()   // recv_rows [Z, T, B]
        .Ret<ffi::BufferR2<ffi::S32>>(),  // recv_mask [Z, T]
    {ffi::Traits::kCmdBufferCompatible});
