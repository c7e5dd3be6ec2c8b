// The internode row exchange over NVSHMEM: its arguments and host launcher.
// The protocol is at the top of exchange.cu, the region's layout in
// exchange_layout.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "internode/exchange_layout.h"

namespace jax_ep::internode {

// The exchange's part of this process's NVSHMEM heap, as the runtime hands
// it out (runtime/nvshmem_heap.cuh).
struct Region {
  char* base = nullptr;                   // symmetric: the same on every PE
  int64_t bytes = 0;
  unsigned long long* sequence = nullptr; // device memory: the last call
  int rank = 0;                           // this PE (= EP rank)
  int num_ranks = 0;                      // R = N * G
  int num_sms = 0;
};

// One exchange. Every PE of the team (this rank's local index on each of the
// N nodes) sends, for each node m and token t with 0 <= src_row[m, t] <
// num_rows, its row src_row[m, t] of `rows` to the team's PE on node m,
// which finds it at recv_rows[my node, t] with recv_mask[my node, t] = 1.
// Slots nobody sent are zero rows with mask 0.
struct ExchangeArgs {
  ExchangeShape shape;
  int ranks_per_node = 1;     // G: node m's PE in the team is m * G + local
  const char* rows = nullptr; // [num_rows, B]
  int64_t num_rows = 0;
  const int32_t* src_row = nullptr;  // [N, T]
  char* recv_rows = nullptr;         // [N, T, B]
  int32_t* recv_mask = nullptr;      // [N, T]
  int64_t timeout_ns = 0;
};

// InvalidArgument naming `op` when the shape is outside the kernels' range or
// the region too small; else enqueues the exchange's three kernels.
Status LaunchExchange(const char* op, const Region& region,
                      const ExchangeArgs& args, cudaStream_t stream);

}  // namespace jax_ep::internode
