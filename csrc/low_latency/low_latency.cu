// Low-latency dispatch and combine over NVSHMEM (docs/low_latency.md; results:
// docs/contract.md).
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
// Dispatch. The send kernel, one block per token, casts the token once (fp8
// per 128 channels, or the bf16 row as is) in registers and stores it into
// message slot (l * R + me) * Tmax + t of each distinct expert's rank, then
// releases that slot's flag; every block also counts every expert's tokens
// (T * K ids) and sends the counts of its share of the experts as
// (seq << 24) | count. The receive kernel, one block per local expert, waits
// for the R counts, then for that many flags per source, packs the rows by
// (source rank, token) into the XLA outputs and writes the handle. Nothing
// depends on arrival order: the result is deterministic.
//
// Combine. The send kernel writes each received row's expert output back to
// its source at (global expert, token), flagged. The receive kernel, one
// block per token, waits for the token's distinct experts and sums in fp32:
// per rank, in rank order, the k-ordered weighted rows, then the ranks' sums,
// rounded once to bf16 — the reference's order (reference/low_latency.py).
//
// Transports. A peer whose memory nvshmem_ptr maps (NVLink P2P) gets plain
// stores, then a system-scope release of the flag; any other peer (or every
// peer with Options::force_put) gets nvshmemx_putmem_signal_nbi_warp, which
// delivers the flag after the data.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "low_latency/low_latency.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {
namespace {

// Send kernels and the combine receive: one block of 512 per SM; the
// dispatch receive: blocks of 256, two per SM, one per local expert.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRecvThreads = 256;
constexpr int kRecvWarps = kRecvThreads / 32;
constexpr int kRecvUnroll = 4;
constexpr int kMaxTopk = 32;
// Tokens per source are swept 32 at a time with one bit per sweep and lane.
constexpr int64_t kMaxTokens = 32 * 32;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// --- Sets, sequence numbers and waits ----------------------------------------

struct SetPointers {
  char* flags;
  char* data;
};

__device__ __forceinline__ SetPointers SetOf(char* base, int64_t set_bytes,
                                             uint64_t seq) {
  char* set = base + static_cast<int64_t>(seq & 1) * set_bytes;
  return {set, set + set_bytes / kFlagShare};
}

__device__ __forceinline__ uint64_t TicketSequence(const uint32_t* ticket) {
  return static_cast<uint64_t>(ticket[0]) |
         (static_cast<uint64_t>(ticket[1]) << 32);
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

// The last block to finish stores the sequence number: every block has read
// the old one by then, and the next call's kernel starts after this one.
__device__ __forceinline__ void EndSend(State* state, uint64_t seq) {
  if (LastBlock(&state->send_blocks_done) && threadIdx.x == 0) {
    state->sequence = seq;
  }
}

struct Site {
  const char* op;
  const char* phase;
  int rank;
  int peer;
  int64_t index;  // the expert, token or slot waited for
};

__device__ __noinline__ void Report(const Site& site, const char* what,
                                    uint64_t expected, uint64_t seen) {
  printf("jax_ep %s %s: rank %d, phase '%s', peer %d, index %lld: expected "
         "sequence %llu, seen %llu\n",
         site.op, what, site.rank, site.phase, site.peer,
         static_cast<long long>(site.index),
         static_cast<unsigned long long>(expected),
         static_cast<unsigned long long>(seen));
  __trap();
}

// The sequence part of a flag value (`shift` drops a packed count).
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

// Spins until the flag carries `seq`; returns its value.
__device__ __forceinline__ uint64_t WaitFlag(const uint64_t* flag, int shift,
                                             uint64_t seq, int64_t timeout_ns,
                                             const Site& site) {
  uint64_t value = sync::ld_acquire_sys_global(flag);
  if (Arrived(value, shift, seq, site)) return value;
  const uint64_t start = sync::global_timer_ns();
  while (!Arrived(value = sync::ld_acquire_sys_global(flag), shift, seq,
                  site)) {
    if (static_cast<int64_t>(sync::global_timer_ns() - start) > timeout_ns) {
      Report(site, "timeout", seq, value >> shift);
    }
  }
  return value;
}

// Every block reads the call's sequence number first; block 0 hands it out.
// Then it waits until every peer has received the call that last used this
// buffer set (seq - 2), so that nothing it writes overwrites unread rows.
__device__ __forceinline__ uint64_t BeginSend(const Heap& heap,
                                              uint32_t* ticket, int num_ranks,
                                              int64_t timeout_ns,
                                              const char* op) {
  __shared__ uint64_t seq;
  if (threadIdx.x == 0) {
    seq = *reinterpret_cast<const volatile unsigned long long*>(
              &heap.state->sequence) + 1;
    if (blockIdx.x == 0) {
      ticket[0] = static_cast<uint32_t>(seq);
      ticket[1] = static_cast<uint32_t>(seq >> 32);
    }
  }
  __syncthreads();
  if (seq > 2 && threadIdx.x < num_ranks) {
    const uint64_t* received = reinterpret_cast<const uint64_t*>(
        SetOf(heap.base, heap.set_bytes, seq).flags + SetLayout{}.received()) +
        threadIdx.x;
    const sync::WaitSite site{op, "wait for the peers to receive the buffer "
                              "set's last call (at most two sends may wait "
                              "for their receives)",
                              heap.rank, static_cast<int>(threadIdx.x)};
    sync::wait_at_least_acquire_sys(received, seq - 2, timeout_ns, site);
  }
  __syncthreads();
  return seq;
}

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

// A receive kernel's last block tells every peer that this rank has received
// call `seq` from the set, so that their sends may reuse it.
__device__ __forceinline__ void EndRecv(State* state, char* set_flags,
                                        uint64_t seq, int rank, int num_ranks,
                                        bool force_put) {
  if (!LastBlock(&state->recv_blocks_done) ||
      threadIdx.x >= static_cast<unsigned>(num_ranks)) {
    return;
  }
  uint64_t* word = reinterpret_cast<uint64_t*>(
                       set_flags + SetLayout{}.received()) + rank;
  if (Signal(word, seq, threadIdx.x, force_put)) nvshmem_quiet();
}

// --- Moving rows -------------------------------------------------------------

// One warp copies `n` int4s, kUnroll loads in flight per lane before their
// stores: a load-then-store loop would wait out the memory latency per int4.
__device__ __forceinline__ void WarpCopy(int4* __restrict__ dst,
                                         const int4* __restrict__ src,
                                         int64_t n, int lane) {
  constexpr int kUnroll = 8;
  // Lane-offset pointers and a count of what is left keep each access an
  // immediate offset from one base: per-access 64-bit indices spilled.
  src += lane;
  dst += lane;
  for (int64_t left = n - lane; left > 0; left -= 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u * 32 < left) v[u] = src[u * 32];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u * 32 < left) dst[u * 32] = v[u];
    }
    src += 32 * kUnroll;
    dst += 32 * kUnroll;
  }
}

// One warp copies `bytes` (a multiple of 16) from `src` to `dst`, then raises
// `flag` to `value` after the data, by P2P stores when `peer_dst` (the
// nvshmem_ptr mapping of `dst`) is set, else by an NVSHMEM put with signal.
// Returns whether it issued a put (the warp must then nvshmem_quiet before
// the kernel ends). The lanes' stores precede the release through the warp
// barrier: the flag store is cumulative over what the warp wrote.
__device__ __forceinline__ bool WarpSend(void* dst, void* peer_dst,
                                         const void* src, int64_t bytes,
                                         uint64_t* flag, uint64_t* peer_flag,
                                         uint64_t value, int pe, int lane) {
  if (peer_dst != nullptr) {
    WarpCopy(static_cast<int4*>(peer_dst), static_cast<const int4*>(src),
             bytes / 16, lane);
    __syncwarp();
    if (lane == 0) sync::st_release_sys_global(peer_flag, value);
    return false;
  }
  nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, flag, value,
                                  NVSHMEM_SIGNAL_SET, pe);
  return true;
}

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

// --- fp8 cast (jax_ep/_src/fp8.py, bit for bit) ------------------------------

__device__ __forceinline__ float RoundUpPow2(float scale) {
  const uint32_t bits = __float_as_uint(scale);
  const uint32_t exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0 ? 1 : 0);
  return __uint_as_float(exponent << 23);
}

// Casts 16 channels (two int4s of bf16) to one int4 of e4m3 and returns the
// scale of their 128-channel group. The group's 8 chunks sit on 8 consecutive
// lanes, which share the amax by shuffles: all 32 lanes must call it.
__device__ __forceinline__ float CastChunk(const int4 (&in)[2],
                                          bool round_scale, int4* out) {
  float f[16];
  float amax = 0.0f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&in[h]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      f[h * 8 + i] = __bfloat162float(v[i]);
      amax = fmaxf(amax, fabsf(f[h * 8 + i]));
    }
  }
#pragma unroll
  for (int offset = 4; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
  float scale = fmaxf(amax, kAmaxFloor) * (1.0f / kFp8Max);
  if (round_scale) scale = RoundUpPow2(scale);
  const float inv = 1.0f / scale;
  alignas(16) uint8_t q[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    q[i] = static_cast<uint8_t>(
        __nv_cvt_float_to_fp8(f[i] * inv, __NV_SATFINITE, __NV_E4M3));
  }
  *out = *reinterpret_cast<const int4*>(q);
  return scale;
}

// --- Dispatch send -----------------------------------------------------------

// Output int4s per thread and pass over a row: one pass covers H <= 8192 in
// bf16 (an int4 per 8 channels), H <= 16384 in fp8 (per 16 channels).
constexpr int kChunksPerThread = 2;

// Adds every token's distinct valid choices to `tokens_of` (per expert, in
// shared memory; T * K ids, read through L1). Every block counts them all, so
// that no block waits for another before its count signals.
__device__ __forceinline__ void CountChoices(const DispatchSendArgs& a,
                                             int32_t* tokens_of) {
  const int64_t E = a.shape.num_experts, K = a.shape.num_topk;
  for (int64_t i = threadIdx.x; i < a.shape.num_tokens * K; i += kThreads) {
    if (FirstChoice(a.topk_idx + i / K * K, static_cast<int>(i % K), E)) {
      atomicAdd(&tokens_of[a.topk_idx[i]], 1);
    }
  }
}

// Thread j of block b sends the count signal of expert b + j * gridDim.x.
// Returns whether the thread issued an NVSHMEM signal (it must then quiet).
__device__ __forceinline__ bool SignalCounts(const Heap& heap,
                                             const DispatchSendArgs& a,
                                             const SetPointers& set,
                                             uint64_t seq,
                                             const int32_t* tokens_of) {
  const Shape& sh = a.shape;
  const int64_t L = sh.num_local();
  bool put = false;
  for (int64_t e = blockIdx.x + static_cast<int64_t>(threadIdx.x) * gridDim.x;
       e < sh.num_experts; e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int pe = static_cast<int>(e / L);
    uint64_t* signal = reinterpret_cast<uint64_t*>(
        set.flags + SetLayout{sh}.counts() +
        ((e % L) * sh.num_ranks + heap.rank) * 8);
    put |= Signal(signal, (seq << kCountBits) | tokens_of[e], pe,
                  a.options.force_put);
  }
  return put;
}

// One block per token: each thread loads and casts its chunks of the row once
// and stores them straight into every P2P destination's message slot (K
// stores in flight per chunk); after the block barrier, one thread per
// destination releases its flag. Destinations without a P2P mapping get the
// row from a staged copy in the symmetric heap by put-with-signal.
__global__ void __launch_bounds__(kThreads, 1)
    DispatchSendKernel(const Heap heap, const DispatchSendArgs a) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32;
  const uint64_t seq = BeginSend(heap, a.ticket, sh.num_ranks,
                                 a.options.timeout_ns, "low_latency_dispatch");
  const SetLayout layout{sh};
  const SetPointers set = SetOf(heap.base, heap.set_bytes, seq);
  const int64_t L = sh.num_local(), R = sh.num_ranks, K = sh.num_topk;
  const int64_t H = sh.hidden, E = sh.num_experts;
  bool put = false;
  // Counted while the block's first row drains (a block without a token
  // counts after the loop), signalled after the block's rows.
  __shared__ int32_t tokens_of[kMaxExperts];
  for (int64_t e = threadIdx.x; e < E; e += kThreads) tokens_of[e] = 0;
  bool counted = false;

  // Per token, by column k: the P2P mapping of the message slot and flag of
  // a distinct valid choice (null for puts and for the other columns).
  __shared__ char* peer_message[kMaxTopk];
  __shared__ uint64_t* peer_flag[kMaxTopk];
  const int64_t message = sh.message_bytes();
  const int64_t payload = a.use_fp8 ? AlignUp(H + H / kScaleGroup * 4, 16)
                                    : 2 * H;
  // Chunks of the row: int4s of the message's e4m3 (16 channels) or bf16 (8).
  const int64_t chunks = a.use_fp8 ? H / 16 : H / 8;
  // Expert e's message slot for token t, and its flag (symmetric addresses).
  auto slot_of = [&](int32_t e, int64_t t) {
    return ((e % L) * R + heap.rank) * sh.max_tokens + t;
  };
  auto message_at = [&](int64_t slot) {
    return set.data + layout.dispatch_data() + slot * message;
  };
  auto flag_at = [&](int64_t slot) {
    return reinterpret_cast<uint64_t*>(set.flags + layout.dispatch_flags()) +
           slot;
  };
  for (int64_t t = blockIdx.x; t < sh.num_tokens; t += gridDim.x) {
    const int32_t* choices = a.topk_idx + t * K;
    bool needs_put = false;
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      peer_message[k] = nullptr;
      peer_flag[k] = nullptr;
      if (FirstChoice(choices, k, E)) {
        const int32_t e = choices[k];
        const int pe = static_cast<int>(e / L);
        const int64_t slot = slot_of(e, t);
        peer_message[k] = PeerPtr(message_at(slot), pe, a.options.force_put);
        peer_flag[k] = PeerPtr(flag_at(slot), pe, a.options.force_put);
        needs_put = peer_message[k] == nullptr;
      }
    }
    const bool any_put = __syncthreads_or(needs_put);
    char* stage = set.data + layout.dispatch_stage() + t * message;
    const int4* row = reinterpret_cast<const int4*>(
        static_cast<const __nv_bfloat16*>(a.x) + t * H);
    for (int64_t base = 0; base < chunks;
         base += int64_t{kThreads} * kChunksPerThread) {
      int4 in[kChunksPerThread][2];
#pragma unroll
      for (int u = 0; u < kChunksPerThread; ++u) {
        const int64_t c = base + u * kThreads + threadIdx.x;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool load = c < chunks && (a.use_fp8 || h == 0);
          in[u][h] = load ? row[a.use_fp8 ? 2 * c + h : c]
                          : make_int4(0, 0, 0, 0);
        }
      }
      int4 out[kChunksPerThread];
      float scale[kChunksPerThread];
#pragma unroll
      for (int u = 0; u < kChunksPerThread; ++u) {
        // A 128-channel group is 8 chunks, never split by `chunks` (H is a
        // multiple of 128): inactive lanes cast zeros beside no active one.
        if (a.use_fp8) {
          scale[u] = CastChunk(in[u], a.round_scale, &out[u]);
        } else {
          out[u] = in[u][0];
        }
      }
      auto store = [&](char* dst) {
#pragma unroll
        for (int u = 0; u < kChunksPerThread; ++u) {
          const int64_t c = base + u * kThreads + threadIdx.x;
          if (c >= chunks) continue;
          reinterpret_cast<int4*>(dst)[c] = out[u];
          if (a.use_fp8 && c % (kScaleGroup / 16) == 0) {
            reinterpret_cast<float*>(dst + H)[c / (kScaleGroup / 16)] =
                scale[u];
          }
        }
      };
      for (int k = 0; k < K; ++k) {
        if (peer_message[k] != nullptr) store(peer_message[k]);
      }
      if (any_put) store(stage);
    }
    if (!counted) {  // the barrier above ordered the zeroing before this
      CountChoices(a, tokens_of);
      counted = true;
    }
    // The barrier orders every thread's stores before the flags' releases.
    __syncthreads();
    if (threadIdx.x < K && peer_flag[threadIdx.x] != nullptr) {
      sync::st_release_sys_global(peer_flag[threadIdx.x], seq);
    }
    if (any_put) {
      for (int k = warp; k < K; k += kWarps) {
        if (!FirstChoice(choices, k, E) || peer_message[k] != nullptr) continue;
        const int32_t e = choices[k];
        const int64_t slot = slot_of(e, t);
        nvshmemx_putmem_signal_nbi_warp(message_at(slot), stage, payload,
                                        flag_at(slot), seq, NVSHMEM_SIGNAL_SET,
                                        static_cast<int>(e / L));
        put = true;
      }
    }
    __syncthreads();  // the shared destinations are the next token's
  }
  if (!counted) {
    __syncthreads();
    CountChoices(a, tokens_of);
  }
  __syncthreads();
  put |= SignalCounts(heap, a, set, seq, tokens_of);
  if (put) nvshmem_quiet();
  EndSend(heap.state, seq);
}

// --- Dispatch receive --------------------------------------------------------

// Zeroes `bytes` (a multiple of 4) from `p` (4-byte aligned) with the block.
// The padding after `total` rows need not start on 16 bytes: a scale row is
// 4 * H / 128 bytes, or H / 128 with UE8M0 (8 at H = 256, 4 at H = 512), so
// words run up to the first 16-byte boundary and after the last int4.
__device__ __forceinline__ void ZeroBytes(char* p, int64_t bytes) {
  const int64_t misaligned = reinterpret_cast<uintptr_t>(p) % 16;
  const int64_t head = misaligned ? min(bytes, 16 - misaligned) : 0;
  for (int64_t i = threadIdx.x; i < head / 4; i += blockDim.x) {
    reinterpret_cast<int32_t*>(p)[i] = 0;
  }
  char* const body = p + head;
  const int64_t vectors = (bytes - head) / 16;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    reinterpret_cast<int4*>(body)[i] = make_int4(0, 0, 0, 0);
  }
  for (int64_t i = vectors * 4 + threadIdx.x; i < (bytes - head) / 4;
       i += blockDim.x) {
    reinterpret_cast<int32_t*>(body)[i] = 0;
  }
}

// One warp waits until `count` of the `num_slots` row flags at `flags` carry
// `seq`; returns the lane's arrival bits (bit j: slot j * 32 + lane), and the
// rows are then visible to the warp. Relaxed loads, kPoll in flight per lane
// (acquire loads would each wait out the last), then one fence.
__device__ __forceinline__ uint32_t WaitRows(const uint64_t* flags,
                                            int num_slots, int count,
                                            uint64_t seq, int64_t timeout_ns,
                                            const Site& site) {
  constexpr int kPoll = 4;
  const int lane = threadIdx.x % 32;
  uint32_t arrived = 0;
  int found = 0;
  const uint64_t start = sync::global_timer_ns();
  while (found < count) {
    found = 0;
    for (int j0 = 0; j0 * 32 < num_slots; j0 += kPoll) {
      uint64_t seen[kPoll];
#pragma unroll
      for (int u = 0; u < kPoll; ++u) {
        const int t = (j0 + u) * 32 + lane;
        seen[u] = t < num_slots && !(arrived >> (j0 + u) & 1)
                      ? sync::ld_relaxed_sys_global(flags + t)
                      : 0;
      }
#pragma unroll
      for (int u = 0; u < kPoll; ++u) {
        if ((j0 + u) * 32 >= num_slots) break;
        if (Arrived(seen[u], 0, seq, site)) arrived |= 1u << (j0 + u);
        found += __popc(__ballot_sync(0xffffffffu, arrived >> (j0 + u) & 1));
      }
    }
    if (found < count &&
        static_cast<int64_t>(sync::global_timer_ns() - start) > timeout_ns) {
      Report(site, "timeout", seq, static_cast<uint64_t>(found));
    }
  }
  sync::fence_acq_rel_sys();
  return arrived;
}

__global__ void __launch_bounds__(kRecvThreads, 2)
    DispatchRecvKernel(const Heap heap, const DispatchRecvArgs a) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = TicketSequence(a.ticket);
  const SetLayout layout{sh};
  const SetPointers set = SetOf(heap.base, heap.set_bytes, seq);
  const int64_t L = sh.num_local(), R = sh.num_ranks, Tmax = sh.max_tokens;
  const int64_t S = R * Tmax, H = sh.hidden;
  const int64_t row_bytes = a.use_fp8 ? H : 2 * H;
  const int64_t scale_bytes =
      !a.use_fp8 ? 0 : (a.use_ue8m0 ? H / kScaleGroup : H / kScaleGroup * 4);

  __shared__ int32_t source_of[kMaxSlotsPerExpert];  // s * Tmax + t per row
  __shared__ int32_t counts[kMaxRanks];
  __shared__ int32_t offsets[kMaxRanks + 1];

  for (int64_t l = blockIdx.x; l < L; l += gridDim.x) {
    for (int64_t s = threadIdx.x; s < R; s += kRecvThreads) {
      const uint64_t* signal = reinterpret_cast<const uint64_t*>(
          set.flags + layout.counts() + (l * R + s) * 8);
      const Site site{"low_latency_dispatch", "wait for the count of a local "
                      "expert", heap.rank, static_cast<int>(s), l};
      counts[s] = static_cast<int32_t>(
          WaitFlag(signal, kCountBits, seq, a.options.timeout_ns, site) &
          ((1ull << kCountBits) - 1));
    }
    // Every slot empty until the packing below fills it.
    for (int64_t i = threadIdx.x; i < S; i += kRecvThreads) {
      a.slot[l * S + i] = static_cast<int32_t>(S);
      a.src_index[l * S + i] = static_cast<int32_t>(S);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      offsets[0] = 0;
      for (int64_t s = 0; s < R; ++s) offsets[s + 1] = offsets[s] + counts[s];
      a.count[l] = offsets[R];
    }
    __syncthreads();

    // Per source, one warp waits for its `counts[s]` flags and packs them in
    // token order.
    for (int64_t s = warp; s < R; s += kRecvWarps) {
      const uint64_t* flags = reinterpret_cast<const uint64_t*>(
          set.flags + layout.dispatch_flags()) + (l * R + s) * Tmax;
      const Site site{"low_latency_dispatch", "wait for the rows of a local "
                      "expert", heap.rank, static_cast<int>(s), l};
      const uint32_t arrived =
          WaitRows(flags, static_cast<int>(Tmax), counts[s], seq,
                   a.options.timeout_ns, site);
      int packed = offsets[s];
      for (int64_t j = 0; j * 32 < Tmax; ++j) {
        const uint32_t here = __ballot_sync(0xffffffffu, arrived >> j & 1);
        if (arrived >> j & 1) {
          const int row = packed + __popc(here & ((1u << lane) - 1));
          const int32_t source = static_cast<int32_t>(s * Tmax + j * 32 + lane);
          source_of[row] = source;
          a.src_index[l * S + row] = source;
          a.slot[l * S + source] = row;
        }
        packed += __popc(here);
      }
    }
    __syncthreads();

    // The rows land packed, one after the other: the block copies them as
    // one run of int4s, kRecvUnroll loads in flight per thread.
    const int total = offsets[R];
    const int row_chunks = static_cast<int>(row_bytes / 16);
    const int run = total * row_chunks;
    int4* out = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                        l * S * row_bytes);
    const char* messages = set.data + layout.dispatch_data() +
                           l * S * sh.message_bytes();
    for (int base = threadIdx.x; base < run;
         base += kRecvThreads * kRecvUnroll) {
      int4 v[kRecvUnroll];
#pragma unroll
      for (int u = 0; u < kRecvUnroll; ++u) {
        const int f = base + u * kRecvThreads;
        if (f < run) {
          v[u] = reinterpret_cast<const int4*>(
              messages + source_of[f / row_chunks] * sh.message_bytes())
              [f % row_chunks];
        }
      }
#pragma unroll
      for (int u = 0; u < kRecvUnroll; ++u) {
        const int f = base + u * kRecvThreads;
        if (f < run) out[f] = v[u];
      }
    }
    // The scales, one 32-bit word per thread: a float per 128 channels, or
    // four UE8M0 exponent bytes, little-endian.
    const int scale_words = static_cast<int>(scale_bytes / 4);
    uint32_t* scale_out = reinterpret_cast<uint32_t*>(
        static_cast<char*>(a.recv_scales) + l * S * scale_bytes);
    for (int f = threadIdx.x; f < total * scale_words; f += kRecvThreads) {
      const int i = f / scale_words, w = f % scale_words;
      const uint32_t* scales = reinterpret_cast<const uint32_t*>(
          messages + source_of[i] * sh.message_bytes() + H);
      uint32_t word = 0;
      if (a.use_ue8m0) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          word |= (scales[w * 4 + b] >> 23) << (8 * b);
        }
      } else {
        word = scales[w];
      }
      scale_out[f] = word;
    }
    if (a.zero_padding) {
      ZeroBytes(static_cast<char*>(a.recv_x) + (l * S + total) * row_bytes,
                (S - total) * row_bytes);
      if (a.use_fp8) {
        ZeroBytes(static_cast<char*>(a.recv_scales) +
                      (l * S + total) * scale_bytes,
                  (S - total) * scale_bytes);
      }
    }
    __syncthreads();  // shared memory is reused by the next expert
  }
  EndRecv(heap.state, set.flags, seq, heap.rank, R, a.options.force_put);
}

// --- Combine send ------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 1)
    CombineSendKernel(const Heap heap, const CombineSendArgs a) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = BeginSend(heap, a.ticket, sh.num_ranks,
                                 a.options.timeout_ns, "low_latency_combine");
  const SetLayout layout{sh};
  const SetPointers set = SetOf(heap.base, heap.set_bytes, seq);
  const int64_t L = sh.num_local(), Tmax = sh.max_tokens;
  const int64_t S = sh.num_ranks * Tmax, row_bytes = sh.combine_row_bytes();

  // Each local expert's rows are packed at the front of its S slots (the
  // dispatch handle's src_index holds S past them). W / L warps serve each
  // expert (each expert gets a warp when there are fewer warps than experts);
  // warp j of an expert sends its rows j, j + W / L, ... up to the first
  // empty slot: every warp starts at once, whatever the counts.
  // 32-bit indices (S <= kMaxSlotsPerExpert, checked at launch): beside the
  // put path's inlined NVSHMEM code, 64-bit ones spilled.
  bool put = false;
  const int num_warps = static_cast<int>(gridDim.x) * kWarps;
  const int experts = static_cast<int>(L), slots = static_cast<int>(S);
  const int per_expert = num_warps >= experts ? num_warps / experts : 1;
  char* const data = set.data + layout.combine_data();
  char* const flags = set.flags + layout.combine_flags();
  char* const stages = set.data + layout.combine_stage();
  for (int task = static_cast<int>(blockIdx.x) * kWarps + warp;
       task < experts * per_expert; task += num_warps) {
    const int l = task % experts;
    for (int i = task / experts; i < slots; i += per_expert) {
      const int64_t g = int64_t{l} * slots + i;
      const int32_t source = a.src_index[g];
      if (source < 0 || source >= slots) break;
      const int pe = source / static_cast<int>(Tmax);
      const int64_t slot =
          (heap.rank * L + l) * Tmax + source % static_cast<int>(Tmax);
      char* dst = data + slot * row_bytes;
      uint64_t* flag = reinterpret_cast<uint64_t*>(flags + slot * 8);
      char* peer_dst = PeerPtr(dst, pe, a.options.force_put);
      const char* src = static_cast<const char*>(a.y) + g * row_bytes;
      if (peer_dst == nullptr && !a.zero_copy) {
        // Puts read a registered buffer: stage y's row in the symmetric heap.
        char* stage = stages + g * row_bytes;
        WarpCopy(reinterpret_cast<int4*>(stage),
                 reinterpret_cast<const int4*>(src), row_bytes / 16, lane);
        __syncwarp();
        src = stage;
      }
      put |= WarpSend(dst, peer_dst, src, row_bytes, flag,
                      PeerPtr(flag, pe, a.options.force_put), seq, pe, lane);
    }
  }
  if (put) nvshmem_quiet();
  EndSend(heap.state, seq);
}

// --- Combine receive ---------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 1)
    CombineRecvKernel(const Heap heap, const CombineRecvArgs a) {
  const Shape& sh = a.shape;
  const uint64_t seq = TicketSequence(a.ticket);
  const SetLayout layout{sh};
  const SetPointers set = SetOf(heap.base, heap.set_bytes, seq);
  const int64_t L = sh.num_local(), K = sh.num_topk, H = sh.hidden;
  const int64_t row_bytes = sh.combine_row_bytes();

  // The token's valid choices ordered by (rank, k), the reference's order:
  // expert, weight and rank of the j-th, and how many there are.
  __shared__ int32_t expert[kMaxTopk];
  __shared__ float weight[kMaxTopk];
  __shared__ int32_t rank_of[kMaxTopk];
  __shared__ int num_valid;

  for (int64_t t = blockIdx.x; t < sh.num_tokens; t += gridDim.x) {
    const int32_t* choices = a.topk_idx + t * K;
    if (threadIdx.x == 0) num_valid = 0;
    __syncthreads();
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      const int32_t e = choices[k];
      if (ValidExpert(e, sh.num_experts)) {
        // Position among the valid choices by (rank, k).
        int j = 0;
        for (int k2 = 0; k2 < K; ++k2) {
          const int32_t e2 = choices[k2];
          j += ValidExpert(e2, sh.num_experts) &&
               (e2 / L < e / L || (e2 / L == e / L && k2 < k));
        }
        expert[j] = e;
        weight[j] = a.weights[t * K + k];
        rank_of[j] = static_cast<int32_t>(e / L);
        atomicAdd(&num_valid, 1);
        if (FirstChoice(choices, k, sh.num_experts)) {
          const uint64_t* flag = reinterpret_cast<const uint64_t*>(
              set.flags + layout.combine_flags() + (e * sh.max_tokens + t) * 8);
          const Site site{"low_latency_combine", "wait for an expert's row",
                          heap.rank, static_cast<int>(e / L), e};
          WaitFlag(flag, 0, seq, a.options.timeout_ns, site);
        }
      }
    }
    __syncthreads();

    const int n = num_valid;
    for (int64_t c = threadIdx.x; c < H / 8; c += kThreads) {
      float total[8], partial[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) total[i] = partial[i] = 0.0f;
      // kBatch rows' loads in flight at once, then their sums in order.
      constexpr int kBatch = 8;
      for (int j0 = 0; j0 < n; j0 += kBatch) {
        int4 raw[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (j0 + u < n) {
            raw[u] = reinterpret_cast<const int4*>(
                set.data + layout.combine_data() +
                (expert[j0 + u] * sh.max_tokens + t) * row_bytes)[c];
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int j = j0 + u;
          if (j >= n) break;
          if (j > 0 && rank_of[j] != rank_of[j - 1]) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              total[i] += partial[i];
              partial[i] = 0.0f;
            }
          }
          const __nv_bfloat16* y =
              reinterpret_cast<const __nv_bfloat16*>(&raw[u]);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            partial[i] =
                __fmaf_rn(weight[j], __bfloat162float(y[i]), partial[i]);
          }
        }
      }
      alignas(16) __nv_bfloat16 result[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        result[i] = __float2bfloat16_rn(total[i] + partial[i]);
      }
      reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(a.out) + t * H)[c] =
          *reinterpret_cast<const int4*>(result);
    }
    __syncthreads();  // the shared choices are reused by the next token
  }
  EndRecv(heap.state, set.flags, seq, heap.rank, sh.num_ranks,
          a.options.force_put);
}

// --- Launchers ---------------------------------------------------------------

Status CheckShape(const char* op, const Heap& heap, const Shape& sh) {
  auto bad = [op](const std::string& what) {
    return Status::InvalidArgument(std::string(op) + ": " + what);
  };
  if (sh.num_ranks != heap.num_ranks) {
    return bad("the EP axis has " + std::to_string(sh.num_ranks) +
               " ranks but NVSHMEM has " + std::to_string(heap.num_ranks) +
               " PEs");
  }
  if (sh.num_experts <= 0 || sh.num_experts % sh.num_ranks != 0 ||
      sh.num_experts > kMaxExperts) {
    return bad("num_experts must be a positive multiple of the ranks, at most " +
               std::to_string(kMaxExperts) + ", got " +
               std::to_string(sh.num_experts));
  }
  if (sh.max_tokens < 1 || sh.max_tokens > kMaxTokens ||
      sh.num_tokens > sh.max_tokens) {
    return bad("need 1 <= T <= Tmax <= " + std::to_string(kMaxTokens) +
               ", got T=" + std::to_string(sh.num_tokens) +
               ", Tmax=" + std::to_string(sh.max_tokens));
  }
  if (sh.num_ranks > kMaxRanks ||
      sh.num_ranks * sh.max_tokens > kMaxSlotsPerExpert) {
    return bad("R * Tmax must be <= " + std::to_string(kMaxSlotsPerExpert) +
               " and R <= " + std::to_string(kMaxRanks));
  }
  if (sh.num_topk < 1 || sh.num_topk > kMaxTopk) {
    return bad("topk must be in [1, " + std::to_string(kMaxTopk) + "], got " +
               std::to_string(sh.num_topk));
  }
  if (sh.hidden <= 0 || sh.hidden % 8 != 0) {
    return bad("the hidden size must be a positive multiple of 8, got " +
               std::to_string(sh.hidden));
  }
  const SetLayout layout{sh};
  const int64_t flags_region = heap.set_bytes / kFlagShare;
  if (layout.flags_bytes() > flags_region ||
      layout.data_bytes() > heap.set_bytes - flags_region) {
    return bad("the NVSHMEM heap (" + std::to_string(2 * heap.set_bytes) +
               " bytes) is too small for this call, which needs " +
               std::to_string(HeapBytes(sh)) +
               ": size the Buffer's num_ll_bytes with jax_ep.ll_buffer_bytes "
               "for the largest shapes you run");
  }
  return Status();
}

// Blocks for `work` items, at most what is resident at once.
int Grid(const Heap& heap, int64_t work, int blocks_per_sm = 1) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(work, int64_t{heap.num_sms} * blocks_per_sm)));
}

Status Launched(const char* what) {
  return Status::FromCuda(cudaGetLastError(), what);
}

}  // namespace

int64_t HeapBytes(const Shape& shape) {
  const SetLayout layout{shape};
  const int64_t unit = kFlagShare * kAlign;
  // The flags fit in set / kFlagShare, the data in the rest.
  const int64_t set = std::max(layout.flags_bytes() * kFlagShare,
                               (layout.data_bytes() * kFlagShare +
                                kFlagShare - 2) / (kFlagShare - 1));
  return 2 * AlignUp(set, unit);
}

Status LaunchDispatchSend(const Heap& heap, const DispatchSendArgs& a,
                          cudaStream_t stream) {
  if (Status s = CheckShape("jax_ep_ll_dispatch_send", heap, a.shape); !s.ok()) {
    return s;
  }
  if (a.use_fp8 && a.shape.hidden % kScaleGroup != 0) {
    return Status::InvalidArgument(
        "jax_ep_ll_dispatch_send: fp8 needs the hidden size to be a multiple "
        "of 128");
  }
  DispatchSendKernel<<<Grid(heap, a.shape.num_tokens), kThreads, 0, stream>>>(
      heap, a);
  return Launched("DispatchSendKernel launch");
}

Status LaunchDispatchRecv(const Heap& heap, const DispatchRecvArgs& a,
                          cudaStream_t stream) {
  if (Status s = CheckShape("jax_ep_ll_dispatch_recv", heap, a.shape); !s.ok()) {
    return s;
  }
  if (a.use_ue8m0 && a.shape.hidden % (4 * kScaleGroup) != 0) {
    return Status::InvalidArgument(
        "jax_ep_ll_dispatch_recv: UE8M0 scales need the hidden size to be a "
        "multiple of 512");
  }
  DispatchRecvKernel<<<Grid(heap, a.shape.num_local(), 2), kRecvThreads, 0,
                       stream>>>(heap, a);
  return Launched("DispatchRecvKernel launch");
}

Status LaunchCombineSend(const Heap& heap, const CombineSendArgs& a,
                         cudaStream_t stream) {
  if (Status s = CheckShape("jax_ep_ll_combine_send", heap, a.shape); !s.ok()) {
    return s;
  }
  const int64_t rows = a.shape.num_experts * a.shape.max_tokens;
  CombineSendKernel<<<Grid(heap, (rows + kWarps - 1) / kWarps), kThreads, 0,
                      stream>>>(heap, a);
  return Launched("CombineSendKernel launch");
}

Status LaunchCombineRecv(const Heap& heap, const CombineRecvArgs& a,
                         cudaStream_t stream) {
  if (Status s = CheckShape("jax_ep_ll_combine_recv", heap, a.shape); !s.ok()) {
    return s;
  }
  CombineRecvKernel<<<Grid(heap, a.shape.num_tokens), kThreads, 0, stream>>>(
      heap, a);
  return Launched("CombineRecvKernel launch");
}

}  // namespace jax_ep::low_latency
