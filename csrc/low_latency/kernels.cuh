// What the low-latency dispatch and combine kernels share: the block shape,
// the buffer sets and sequence numbers, the transports, the waits and the
// routing helpers. Each op (dispatch.cu, combine.cu) runs as one kernel, or
// as a send kernel and a receive kernel (`Halves`; docs/low_latency.md;
// results: docs/contract.md); each file opens with its op's protocol. What
// both rely on:
//
// Protocol. Every call takes the next sequence number `seq` from device
// memory (State): the send half's blocks (or the whole op's) read it when they
// start and the last block to finish stores it, so no host code runs per call
// and CUDA-graph replays count correctly. `seq & 1` picks the buffer set; a
// send half returns `seq` as a ticket that its receive half takes.
//
// Flags are never cleared: a flag or count signal holds the sequence number of
// the call that wrote it, so a receiver waits until it reaches `seq`. A set is
// reused two calls later: before a call writes to the peers, it waits until
// every peer has received the call that last used the set (each receiving
// kernel's last block tells every peer so, in `received`). A flag above `seq`
// would mean that handshake failed: the kernel reports it and traps.
//
// One kernel for both halves. Its blocks send first, then receive, waiting
// for rows that other blocks of the same kernel send: the launcher never asks
// for more blocks than the GPU holds at once (one per SM), so every block
// that a waiting block needs is running or finished.
//
// Transports. A peer whose memory is mapped here (Heap::peer_base: NVLink P2P)
// gets plain stores, then a system-scope release of the flag; any other peer
// (or every peer with Options::force_put) gets
// nvshmemx_putmem_signal_nbi_warp, which delivers the flag after the data.
// Nothing goes through this PE's own buffers: both ops read the rows of this
// rank's tokens for this rank's experts in place (x, y).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "common/status.h"
#include "low_latency/low_latency.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {

// One block of 512 per SM for every kernel.
inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;

__host__ __device__ constexpr bool Sends(Halves h) {
  return h != Halves::kReceive;
}
__host__ __device__ constexpr bool Receives(Halves h) {
  return h != Halves::kSend;
}

// --- Sets and sequence numbers ------------------------------------------------

struct SetPointers {
  char* flags;
  char* data;
};

__device__ __forceinline__ SetPointers SetOf(const Heap& heap, uint64_t seq) {
  char* set = heap.base + static_cast<int64_t>(seq & 1) * heap.set_bytes;
  return {set, set + heap.set_bytes / kFlagShare};
}

__device__ __forceinline__ uint64_t TicketSequence(const uint32_t* ticket) {
  return static_cast<uint64_t>(ticket[0]) |
         (static_cast<uint64_t>(ticket[1]) << 32);
}

// The call's sequence number: a sending kernel's blocks take the next one
// (block 0 writes it to `ticket` when there is one), a receive half's read
// the send half's ticket.
template <Halves kHalves>
__device__ __forceinline__ uint64_t CallSequence(const Heap& heap,
                                                 uint32_t* ticket) {
  if constexpr (!Sends(kHalves)) {
    return TicketSequence(ticket);
  } else {
    __shared__ uint64_t seq;
    if (threadIdx.x == 0) {
      seq = *reinterpret_cast<const volatile unsigned long long*>(
                &heap.state->sequence) + 1;
      if (blockIdx.x == 0 && ticket != nullptr) {
        ticket[0] = static_cast<uint32_t>(seq);
        ticket[1] = static_cast<uint32_t>(seq >> 32);
      }
    }
    __syncthreads();
    return seq;
  }
}

// Waits until PE `peer` has received the call that last used this buffer set
// (seq - 2), so that nothing this block writes overwrites unread rows: one
// thread per peer calls it, and the caller's next block barrier passes that
// on. A rank never writes its own sets (its own rows are read in place), so
// it waits for no one at `peer` == its rank.
__device__ __forceinline__ void WaitSetFree(const Heap& heap,
                                           const SetPointers& set,
                                           uint64_t seq, int peer,
                                           int64_t timeout_ns,
                                           const char* op) {
  if (seq <= 2 || peer == heap.rank) return;
  const uint64_t* received =
      reinterpret_cast<const uint64_t*>(set.flags + SetLayout{}.received()) +
      peer;
  const sync::WaitSite site{op, "wait for the peers to receive the buffer "
                            "set's last call (at most two sends may wait for "
                            "their receives)",
                            heap.rank, peer};
  sync::wait_at_least_acquire_sys(received, seq - 2, timeout_ns, site);
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

// `p` (a symmetric address) as mapped for PE `pe`, or null where only NVSHMEM
// puts reach it (or every peer, with force_put).
template <typename T>
__device__ __forceinline__ T* PeerPtr(const Heap& heap, T* p, int pe,
                                      bool force_put) {
  char* peer = force_put ? nullptr : heap.peer_base[pe];
  if (peer == nullptr) return nullptr;
  return reinterpret_cast<T*>(peer + (reinterpret_cast<char*>(p) - heap.base));
}

// Sets `word` (a symmetric address) on PE `pe` to `value`: a release store
// through the mapping, else an NVSHMEM signal. Returns whether it signalled
// (the thread must nvshmem_quiet before the kernel ends).
__device__ __forceinline__ bool Signal(const Heap& heap, uint64_t* word,
                                       uint64_t value, int pe,
                                       bool force_put) {
  if (uint64_t* peer = PeerPtr(heap, word, pe, force_put)) {
    sync::st_release_sys_global(peer, value);
    return false;
  }
  nvshmemx_signal_op(word, value, NVSHMEM_SIGNAL_SET, pe);
  return true;
}

// The last block of a receiving kernel tells every peer that this rank has
// received call `seq` from the set, so that their sends may reuse it.
__device__ __forceinline__ void SignalReceived(const Heap& heap,
                                               const SetPointers& set,
                                               uint64_t seq, bool force_put) {
  if (threadIdx.x >= static_cast<unsigned>(heap.num_ranks) ||
      threadIdx.x == static_cast<unsigned>(heap.rank)) {
    return;
  }
  uint64_t* word = reinterpret_cast<uint64_t*>(set.flags +
                                               SetLayout{}.received()) +
                   heap.rank;
  if (Signal(heap, word, seq, threadIdx.x, force_put)) nvshmem_quiet();
}

// A kernel's end, once per call: the last block of a sending kernel stores
// the sequence number (every block has read the old one by then), the last
// of a receiving kernel tells the peers (every block has read the set).
template <Halves kHalves>
__device__ __forceinline__ void EndCall(const Heap& heap,
                                        const SetPointers& set, uint64_t seq,
                                        bool force_put) {
  State* state = heap.state;
  if (!LastBlock(Sends(kHalves) ? &state->send_blocks_done
                                : &state->recv_blocks_done)) {
    return;
  }
  if (Sends(kHalves) && threadIdx.x == 0) state->sequence = seq;
  if (Receives(kHalves)) SignalReceived(heap, set, seq, force_put);
}

// --- Waits --------------------------------------------------------------------

// Where a receiver waits, for its reports.
struct Site {
  const char* op;
  const char* phase;
  int rank;
  int peer;
  int64_t index;  // the expert, token or slot waited for
};

// Prints what went wrong (`what`) at `site`, then traps.
__device__ __noinline__ inline void Report(const Site& site, const char* what,
                                           uint64_t expected, uint64_t seen) {
  printf("jax_ep %s %s: rank %d, phase '%s', peer %d, index %lld: expected "
         "sequence %llu, seen %llu\n",
         site.op, what, site.rank, site.phase, site.peer,
         static_cast<long long>(site.index),
         static_cast<unsigned long long>(expected),
         static_cast<unsigned long long>(seen));
  __trap();
}

// Whether the sequence part of a flag value (`shift` drops a packed count)
// is `seq`.
__device__ __forceinline__ bool Arrived(uint64_t value, int shift, uint64_t seq,
                                        const Site& site) {
  const uint64_t got = value >> shift;
  if (got > seq) {
    // The send handshake makes this impossible; it would be a protocol bug.
    Report(site, "overrun (a later call wrote this buffer set before the "
           "receive)", seq, got);
  }
  return got == seq;
}

// Waits until a peer's flag carries `seq` (system-scope acquire loads);
// returns its value. A timeout reports the sequence part of the last value
// seen.
__device__ __forceinline__ uint64_t WaitFlag(const uint64_t* flag, int shift,
                                             uint64_t seq, int64_t timeout_ns,
                                             const Site& site) {
  uint64_t value;
  const auto arrived = [&] {
    value = sync::ld_acquire_sys_global(flag);
    return Arrived(value, shift, seq, site);
  };
  if (!arrived()) {
    sync::wait_until(arrived, timeout_ns, [&] {
      Report(site, "timeout", seq, value >> shift);
    });
  }
  return value;
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

// The same for a warp that holds a token's row: lane k < K holds column k's
// expert e (the other lanes anything). One match instead of k loads; every
// lane calls it (K <= 32).
__device__ __forceinline__ bool FirstChoiceInWarp(int32_t e, int K,
                                                  int64_t num_experts) {
  const int lane = threadIdx.x % 32;
  const uint32_t same = __match_any_sync(0xffffffffu, e);
  return lane < K && ValidExpert(e, num_experts) && __ffs(same) - 1 == lane;
}

// --- Launching ----------------------------------------------------------------

// Blocks for `work` items, at most one per SM: a whole-op kernel's blocks must
// all be resident at once.
inline int Grid(const Heap& heap, int64_t work) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(work, heap.num_sms)));
}

// The status of the launch just enqueued; `what` names it in an error.
inline Status Launched(const char* what) {
  return Status::FromCuda(cudaGetLastError(), what);
}

}  // namespace jax_ep::low_latency
