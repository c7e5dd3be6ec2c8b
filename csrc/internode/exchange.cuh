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

// One exchange within a team of Z = shape.team_size PEs spaced
// `team_stride` apart: member i is first + i * stride, where first is the
// rank of the team's block of Z * stride ranks with this rank's remainder
// modulo stride. With G ranks per node, stride G and Z = R / G make the team
// of this rank's local index on every node (the network leg), stride 1 and
// Z = G the ranks of its node. Every member sends, for each member i and
// token t with 0 <= src_row[i, t] < num_rows, its row src_row[i, t] of
// `rows` to member i, which finds it at recv_rows[sender's index, t] with
// recv_mask[sender's index, t] = 1. Slots nobody sent are zero rows with
// mask 0.
struct ExchangeArgs {
  ExchangeShape shape;
  int team_stride = 1;
  // G: a call's end tells both teams of this rank (stride G and stride 1)
  // that its slots are free, whichever team the next call uses.
  int ranks_per_node = 1;
  const char* rows = nullptr; // [num_rows, B]
  int64_t num_rows = 0;
  const int32_t* src_row = nullptr;  // [Z, T]
  char* recv_rows = nullptr;         // [Z, T, B]
  int32_t* recv_mask = nullptr;      // [Z, T]
  int num_sms = 1;  // the SM budget: blocks of the send and receive kernels
  int64_t timeout_ns = 0;
};

// InvalidArgument naming `op` when the shape is outside the kernels' range or
// the region too small; else enqueues the exchange's three kernels.
Status LaunchExchange(const char* op, const Region& region,
                      const ExchangeArgs& args, cudaStream_t stream);

}  // namespace jax_ep::internode
