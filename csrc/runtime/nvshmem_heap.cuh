// The NVSHMEM runtime of the low-latency kernels and the internode exchange:
// one NVSHMEM job per process group (one process per GPU), bootstrapped from
// a unique id that the Python side shares through the jax.distributed
// key-value store, and one symmetric allocation: the two buffer sets of
// low_latency/heap_layout.h, then the exchange region of
// internode/exchange_layout.h.
//
// A process has at most one open heap, for its one GPU; the FFI handlers take
// it from CurrentHeap. Closing is collective (nvshmem_finalize) and must come
// after every rank's last low-latency kernel.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"
#include "internode/exchange.cuh"
#include "low_latency/low_latency.cuh"

namespace jax_ep::runtime {

// NVSHMEM's unique id, as bytes, for rank 0 to share.
Status NvshmemUniqueId(std::string* id);

// Initializes NVSHMEM as PE `rank` of `num_ranks` on CUDA device `device` and
// allocates `heap_bytes` of symmetric memory for the low-latency kernels and
// `exchange_bytes` for the internode exchange (zeroed; every PE has returned
// from the zeroing before any returns from this call). Either may be 0, not
// both. NVSHMEM reads its environment (e.g. NVSHMEM_SYMMETRIC_SIZE) here.
Status OpenNvshmemHeap(const std::string& unique_id, int rank, int num_ranks,
                       int device, int64_t heap_bytes, int64_t exchange_bytes);

// Frees the heap and finalizes NVSHMEM (collective). A no-op when none is open.
Status CloseNvshmemHeap();

// The open low-latency heap, or InvalidArgument naming `op` when there is none.
Status CurrentHeap(const char* op, low_latency::Heap* heap);

// The open exchange region, or InvalidArgument naming `op` when there is none.
Status CurrentExchangeRegion(const char* op, internode::Region* region);

}  // namespace jax_ep::runtime
