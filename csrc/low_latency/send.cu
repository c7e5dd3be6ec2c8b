// The send halves of low-latency dispatch and combine over NVSHMEM: a send
// kernel takes the call's sequence number, waits until the peers may reuse
// the buffer set, and writes the rows into the peers' set, flagged. The
// protocol both halves share (sequence numbers, buffer sets, flags,
// transports) is described at the top of kernels.cuh; receive.cu has the
// receive halves.
//
// Dispatch. The send kernel, one block per token, casts the token once (fp8
// per 128 channels, or the bf16 row as is) in registers and stores it into
// message slot (l * R + me) * Tmax + t of each distinct expert's rank, then
// releases that slot's flag; every block also counts every expert's tokens
// (T * K ids) and sends the counts of its share of the experts as
// (seq << 24) | count.
//
// Combine. The send kernel writes each received row's expert output back to
// its source at (global expert, token), flagged.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "common/warp_copy.cuh"
#include "low_latency/kernels.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {
namespace {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// --- Sequence numbers ---------------------------------------------------------

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

// The last block to finish stores the sequence number: every block has read
// the old one by then, and the next call's kernel starts after this one.
__device__ __forceinline__ void EndSend(State* state, uint64_t seq) {
  if (LastBlock(&state->send_blocks_done) && threadIdx.x == 0) {
    state->sequence = seq;
  }
}

// --- Moving rows -------------------------------------------------------------

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
  __shared__ int32_t tokens_of[kMaxLowLatencyExperts];
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
  // 32-bit indices (S <= kMaxLowLatencySlotsPerExpert, checked at launch):
  // beside the put path's inlined NVSHMEM code, 64-bit ones spilled.
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

}  // namespace

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

}  // namespace jax_ep::low_latency
