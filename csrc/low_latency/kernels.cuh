// What the low-latency send and receive kernels share: the block shape, the
// buffer sets and sequence numbers, the transports and the routing helpers.
// Low-latency dispatch and combine run over NVSHMEM in two halves each
// (docs/low_latency.md; results: docs/contract.md), in send.cu and
// receive.cu, each file opening with its halves' protocol. What both halves
// rely on:
//
// Protocol. Every call (a send half, then its receive half) takes the next
// sequence number `seq` from device memory (State): the send kernel's blocks
// read it when they start and the last block to finish stores it, so no host
// code runs per call and CUDA-graph replays count correctly. `seq & 1` picks
// the buffer set; the send returns `seq` as a ticket that the receive takes.
//
// Flags are never cleared: a flag or count signal holds the sequence number of
// the call that wrote it, so a receiver waits until it reaches `seq`. A set is
// reused two calls later: before a send writes to the peers, it waits until
// every peer has received the call that last used the set (each receive
// kernel's last block tells every peer so, in `received`). A flag above `seq`
// would mean that handshake failed: the kernel reports it and traps.
//
// Transports. A peer whose memory nvshmem_ptr maps (NVLink P2P) gets plain
// stores, then a system-scope release of the flag; any other peer (or every
// peer with Options::force_put) gets nvshmemx_putmem_signal_nbi_warp, which
// delivers the flag after the data.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>

#include "common/status.h"
#include "low_latency/low_latency.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {

// Send kernels and the combine receive: one block of 512 per SM (the
// dispatch receive's blocks: receive.cu).
inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;

// --- Sets and sequence numbers ------------------------------------------------

struct SetPointers {
  char* flags;
  char* data;
};

__device__ __forceinline__ SetPointers SetOf(char* base, int64_t set_bytes,
                                             uint64_t seq) {
  char* set = base + static_cast<int64_t>(seq & 1) * set_bytes;
  return {set, set + set_bytes / kFlagShare};
}

// The last block of a kernel to arrive at `done` gets true (and resets it):
// every other block has finished its memory operations by then.
__device__ __forceinline__ bool LastBlock(unsigned int* done) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last) *done = 0;
  }
  __syncthreads();
  return last;
}

// --- Transports ---------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T* PeerPtr(T* p, int pe, bool force_put) {
  return force_put ? nullptr : static_cast<T*>(nvshmem_ptr(p, pe));
}

// Sets `word` (a symmetric address) on PE `pe` to `value`: a system-scope
// release store through the P2P mapping, else an NVSHMEM signal. Returns
// whether it signalled (the thread must nvshmem_quiet before the kernel ends).
__device__ __forceinline__ bool Signal(uint64_t* word, uint64_t value, int pe,
                                       bool force_put) {
  if (uint64_t* peer = PeerPtr(word, pe, force_put)) {
    sync::st_release_sys_global(peer, value);
    return false;
  }
  nvshmemx_signal_op(word, value, NVSHMEM_SIGNAL_SET, pe);
  return true;
}

// --- Routing ------------------------------------------------------------------

__device__ __forceinline__ bool ValidExpert(int32_t e, int64_t num_experts) {
  return e >= 0 && e < num_experts;
}

// Whether k is the first of the token's columns to choose a valid expert.
__device__ __forceinline__ bool FirstChoice(const int32_t* row, int k,
                                            int64_t num_experts) {
  const int32_t e = row[k];
  if (!ValidExpert(e, num_experts)) return false;
  for (int j = 0; j < k; ++j) {
    if (row[j] == e) return false;
  }
  return true;
}

// --- Launching ----------------------------------------------------------------

// Blocks for `work` items, at most what is resident at once.
inline int Grid(const Heap& heap, int64_t work, int blocks_per_sm = 1) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(work, int64_t{heap.num_sms} * blocks_per_sm)));
}

// The status of the launch just enqueued; `what` names it in an error.
inline Status Launched(const char* what) {
  return Status::FromCuda(cudaGetLastError(), what);
}

}  // namespace jax_ep::low_latency
