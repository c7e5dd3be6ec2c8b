// Low-latency dispatch over NVSHMEM: each token, cast once, into a message
// slot of each distinct expert it chose, then per local expert the rows
// packed into the XLA outputs. One kernel runs the whole op; with a receive
// hook the send half and the receive half run as two (kernels.cuh describes
// what both ops share: sequence numbers, buffer sets, flags, transports).
//
// Send. One block per token casts the token once (fp8 per 128 channels, or
// the bf16 row as is) in registers and stores it into message slot
// (l * R + me) * Tmax + t of each distinct expert's rank, then releases that
// slot's flag. Every block also counts the other ranks' experts' tokens (one
// thread per token) and sends the counts of its share of those experts as
// (seq << 24) | count. Nothing goes to this rank's own experts: their rows
// never pass through the buffer (at R = 1 the send has nothing to do).
//
// Receive. Each block is four units of 128 threads; a unit takes one local
// expert at a time: it finds this rank's tokens of the expert in topk_idx,
// waits for the other ranks' counts, then for that many flags per source,
// packs the rows by (source rank, token) into the XLA outputs and writes the
// handle. Then one block per token of this rank casts its row from x once
// (as the send casts) into the packed row of each of this rank's experts it
// chose. Nothing depends on arrival order: the result is deterministic.
// Both halves read topk_idx from a copy in shared memory when it fits.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "low_latency/kernels.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {
namespace {

constexpr const char* kOp = "low_latency_dispatch";
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

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

// --- A token's row, one pass of a block at a time -----------------------------

// Output int4s per thread and pass over a row: one pass covers H <= 8192 in
// bf16 (an int4 per 8 channels), H <= 16384 in fp8 (per 16 channels).
constexpr int kChunksPerThread = 2;

// Thread j's part of a pass over a token's row: the output chunks base +
// u * kThreads + j (int4s of e4m3, or of bf16 as is) and, with fp8, their
// 128-channel groups' scales. Load issues the loads and Cast uses them, so
// that a caller's setup runs while they fly. Every thread of the block runs
// both (a group's amax is shared over 8 lanes).
struct RowPass {
  int64_t base;
  int64_t chunks;  // of the whole row
  int4 in[kChunksPerThread][2];
  int4 out[kChunksPerThread];
  float scale[kChunksPerThread];

  __device__ __forceinline__ int64_t Chunk(int u) const {
    return base + u * kThreads + threadIdx.x;
  }

  __device__ __forceinline__ void Load(const DispatchArgs& a, int64_t t) {
    const int4* row = reinterpret_cast<const int4*>(
        static_cast<const __nv_bfloat16*>(a.x) + t * a.shape.hidden);
#pragma unroll
    for (int u = 0; u < kChunksPerThread; ++u) {
      const int64_t c = Chunk(u);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool load = c < chunks && (a.use_fp8 || h == 0);
        in[u][h] = load ? row[a.use_fp8 ? 2 * c + h : c]
                        : make_int4(0, 0, 0, 0);
      }
    }
  }

  __device__ __forceinline__ void Cast(const DispatchArgs& a) {
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
  }
};

// The output chunks of a row of H channels.
__device__ __forceinline__ int64_t RowChunks(const DispatchArgs& a) {
  return a.use_fp8 ? a.shape.hidden / 16 : a.shape.hidden / 8;
}

// A packed output row's bytes: e4m3 or bf16.
__device__ __forceinline__ int64_t PackedRowBytes(const DispatchArgs& a) {
  return a.use_fp8 ? a.shape.hidden : 2 * a.shape.hidden;
}

// A packed row's scale bytes: a float per 128 channels, or a UE8M0 byte.
__device__ __forceinline__ int64_t PackedScaleBytes(const DispatchArgs& a) {
  if (!a.use_fp8) return 0;
  const int64_t groups = a.shape.hidden / kScaleGroup;
  return a.use_ue8m0 ? groups : groups * 4;
}

// --- Send ----------------------------------------------------------------------

// The first token's setup splits the block: warp 0 finds the destinations,
// the threads from kWaitFrom wait for the buffer set (one per peer), the
// threads from kCountFrom count; all of it while the row's loads are in
// flight.
constexpr int kWaitFrom = 32;
constexpr int kCountFrom = kWaitFrom + kMaxRanks;
static_assert(kCountFrom < kThreads, "no thread left to count");

// Adds every token's distinct valid choices of other ranks' experts to
// `tokens_of` (per expert, in shared memory), one thread per token from
// thread kCountFrom on. Every block counts them all, so that no block waits
// for another before its count signals.
__device__ __forceinline__ void CountChoices(const Heap& heap,
                                             const DispatchArgs& a,
                                             int32_t* tokens_of) {
  const int64_t E = a.shape.num_experts, L = a.shape.num_local();
  const int K = static_cast<int>(a.shape.num_topk);
  for (int64_t t = static_cast<int64_t>(threadIdx.x) - kCountFrom;
       t >= 0 && t < a.shape.num_tokens; t += kThreads - kCountFrom) {
    const int32_t* row = a.topk_idx + t * K;
    for (int k = 0; k < K; ++k) {
      if (FirstChoice(row, k, E) && row[k] / L != heap.rank) {
        atomicAdd(&tokens_of[row[k]], 1);
      }
    }
  }
}

// The waiting and counting threads' part of a block's first setup (see
// kWaitFrom).
__device__ __forceinline__ void WaitSetAndCount(const Heap& heap,
                                                const DispatchArgs& a,
                                                const SetPointers& set,
                                                uint64_t seq,
                                                int32_t* tokens_of) {
  const int peer = static_cast<int>(threadIdx.x) - kWaitFrom;
  if (peer >= 0 && peer < a.shape.num_ranks) {
    WaitSetFree(heap, set, seq, peer, a.options.timeout_ns, kOp);
  }
  CountChoices(heap, a, tokens_of);
}

// Thread j of block b sends the count signal of expert b + j * gridDim.x,
// unless the expert is this rank's (the receive counts those). Returns
// whether the thread issued an NVSHMEM signal (it must then quiet).
__device__ __forceinline__ bool SignalCounts(const Heap& heap,
                                             const DispatchArgs& a,
                                             const SetPointers& set,
                                             uint64_t seq,
                                             const int32_t* tokens_of) {
  const Shape& sh = a.shape;
  const int64_t L = sh.num_local();
  bool put = false;
  for (int64_t e = blockIdx.x + static_cast<int64_t>(threadIdx.x) * gridDim.x;
       e < sh.num_experts; e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int pe = static_cast<int>(e / L);
    if (pe == heap.rank) continue;
    uint64_t* signal = reinterpret_cast<uint64_t*>(
        set.flags + SetLayout{sh}.counts() +
        ((e % L) * sh.num_ranks + heap.rank) * 8);
    put |= Signal(heap, signal, (seq << kCountBits) | tokens_of[e], pe,
                  a.options.force_put);
  }
  return put;
}

// One block per token: each thread loads and casts its chunks of the row once
// and stores them straight into every mapped destination's message slot (K
// stores in flight per chunk); after the block barrier, one thread per
// destination releases its flag. Destinations without a mapping get the row
// from a staged copy in the symmetric heap by put-with-signal. Destinations
// are other ranks only: with one rank no token is loaded. Returns whether the
// thread issued NVSHMEM puts (it must then quiet).
__device__ __forceinline__ bool SendTokens(const Heap& heap,
                                           const DispatchArgs& a,
                                           const SetPointers& set,
                                           uint64_t seq) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32;
  const SetLayout layout{sh};
  const int64_t L = sh.num_local(), R = sh.num_ranks, K = sh.num_topk;
  const int64_t H = sh.hidden, E = sh.num_experts;
  const bool force_put = a.options.force_put;
  if (R == 1) return false;  // every row is cast in place by the receive
  bool put = false;
  __shared__ int32_t tokens_of[kMaxLowLatencyExperts];
  for (int64_t e = threadIdx.x; e < E; e += kThreads) tokens_of[e] = 0;
  __syncthreads();  // the zeroing before any count
  bool first = true;  // the block's first setup: wait for the set and count

  // Per token, by column k: the mapped message slot and flag of a distinct
  // valid choice of another rank's expert (null for puts and for the other
  // columns), and its PE (-1 for the columns that send nothing).
  __shared__ char* peer_message[kMaxTopk];
  __shared__ uint64_t* peer_flag[kMaxTopk];
  __shared__ int pe_of[kMaxTopk];
  const int64_t message = sh.message_bytes();
  const int64_t payload = a.use_fp8 ? AlignUp(H + H / kScaleGroup * 4, 16)
                                    : 2 * H;
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
    char* stage = set.data + layout.dispatch_stage() + t * message;
    bool any_put = false;
    RowPass pass;
    pass.chunks = RowChunks(a);
    for (pass.base = 0; pass.base < pass.chunks;
         pass.base += int64_t{kThreads} * kChunksPerThread) {
      pass.Load(a, t);
      // The token's setup while the loads above are in flight; the
      // condition is the block's, so every thread reaches the barrier.
      if (pass.base == 0) {
        bool needs_put = false;
        if (warp == 0) {
          const int k = threadIdx.x;  // K <= 32
          const int32_t e = k < K ? choices[k] : -1;
          const int pe = static_cast<int>(e / L);
          const bool sends = FirstChoiceInWarp(e, K, E) && pe != heap.rank;
          if (k < K) {
            peer_message[k] = nullptr;
            peer_flag[k] = nullptr;
            pe_of[k] = -1;
          }
          if (sends) {
            const int64_t slot = slot_of(e, t);
            pe_of[k] = pe;
            peer_message[k] = PeerPtr(heap, message_at(slot), pe, force_put);
            peer_flag[k] = PeerPtr(heap, flag_at(slot), pe, force_put);
            needs_put = peer_message[k] == nullptr;
          }
        } else if (first) {
          WaitSetAndCount(heap, a, set, seq, tokens_of);
        }
        any_put = __syncthreads_or(needs_put);
        first = false;
      }
      pass.Cast(a);
      auto store = [&](char* dst) {
#pragma unroll
        for (int u = 0; u < kChunksPerThread; ++u) {
          const int64_t c = pass.Chunk(u);
          if (c >= pass.chunks) continue;
          reinterpret_cast<int4*>(dst)[c] = pass.out[u];
          if (a.use_fp8 && c % (kScaleGroup / 16) == 0) {
            reinterpret_cast<float*>(dst + H)[c / (kScaleGroup / 16)] =
                pass.scale[u];
          }
        }
      };
      for (int k = 0; k < K; ++k) {
        if (peer_message[k] != nullptr) store(peer_message[k]);
      }
      if (any_put) store(stage);
    }
    // The barrier orders every thread's stores before the flags' releases.
    __syncthreads();
    if (threadIdx.x < K && peer_flag[threadIdx.x] != nullptr) {
      sync::st_release_sys_global(peer_flag[threadIdx.x], seq);
    }
    if (any_put) {
      for (int k = warp; k < K; k += kWarps) {
        if (pe_of[k] < 0 || peer_message[k] != nullptr) continue;
        const int64_t slot = slot_of(choices[k], t);
        nvshmemx_putmem_signal_nbi_warp(message_at(slot), stage, payload,
                                        flag_at(slot), seq, NVSHMEM_SIGNAL_SET,
                                        pe_of[k]);
        put = true;
      }
    }
    __syncthreads();  // the shared destinations are the next token's
  }
  if (first) {  // a block without a token
    WaitSetAndCount(heap, a, set, seq, tokens_of);
  }
  __syncthreads();
  return SignalCounts(heap, a, set, seq, tokens_of) || put;
}

// --- Receive -------------------------------------------------------------------

// A unit of a block: the threads that receive one local expert at a time.
constexpr int kUnitThreads = 128;
constexpr int kUnitWarps = kUnitThreads / 32;
constexpr int kUnits = kThreads / kUnitThreads;
constexpr int kRecvUnroll = 8;  // int4 loads in flight per thread

// The unit's barrier (named barriers 1..kUnits; 0 is __syncthreads').
__device__ __forceinline__ void UnitSync(int unit) {
  asm volatile("bar.sync %0, %1;" ::"r"(unit + 1), "r"(kUnitThreads)
               : "memory");
}

// Zeroes `bytes` (a multiple of 4) from `p` (4-byte aligned) with the unit's
// thread i. The padding after `total` rows need not start on 16 bytes: a
// scale row is 4 * H / 128 bytes, or H / 128 with UE8M0 (8 at H = 256, 4 at
// H = 512), so words run up to the first 16-byte boundary and after the last
// int4.
__device__ __forceinline__ void ZeroBytes(char* p, int64_t bytes, int i) {
  const int64_t misaligned = reinterpret_cast<uintptr_t>(p) % 16;
  const int64_t head = misaligned ? min(bytes, 16 - misaligned) : 0;
  for (int64_t j = i; j < head / 4; j += kUnitThreads) {
    reinterpret_cast<int32_t*>(p)[j] = 0;
  }
  char* const body = p + head;
  const int64_t vectors = (bytes - head) / 16;
  for (int64_t j = i; j < vectors; j += kUnitThreads) {
    reinterpret_cast<int4*>(body)[j] = make_int4(0, 0, 0, 0);
  }
  for (int64_t j = vectors * 4 + i; j < (bytes - head) / 4;
       j += kUnitThreads) {
    reinterpret_cast<int32_t*>(body)[j] = 0;
  }
}

// One warp waits until `count` of the `num_slots` row flags at `flags` carry
// `seq`; returns the lane's arrival bits (bit j: slot j * 32 + lane), and the
// rows are then visible to the warp. Relaxed loads, kPoll in flight per lane
// (acquire loads would each wait out the last), then one fence. A timeout
// reports how many rows had arrived.
__device__ __forceinline__ uint32_t WaitRows(const uint64_t* flags,
                                            int num_slots, int count,
                                            uint64_t seq, int64_t timeout_ns,
                                            const Site& site) {
  constexpr int kPoll = 4;
  const int lane = threadIdx.x % 32;
  uint32_t arrived = 0;
  int found = 0;
  // One sweep over the flags not seen yet: whether `count` have arrived.
  auto sweep = [&] {
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
    return found >= count;
  };
  if (count > 0) {  // a source that sent nothing has no flag to sweep for
    sync::wait_until(sweep, timeout_ns, [&] {
      Report(site, "timeout", seq, static_cast<uint64_t>(found));
    });
  }
  sync::fence_acq_rel_sys();
  return arrived;
}

// The count that rank s sent for local expert l.
__device__ __forceinline__ int32_t WaitCount(const Heap& heap,
                                             const DispatchArgs& a,
                                             const SetPointers& set,
                                             uint64_t seq, int64_t l,
                                             int64_t s) {
  const SetLayout layout{a.shape};
  const uint64_t* signal = reinterpret_cast<const uint64_t*>(
      set.flags + layout.counts() + (l * a.shape.num_ranks + s) * 8);
  const Site site{kOp, "wait for the count of a local expert", heap.rank,
                  static_cast<int>(s), l};
  return static_cast<int32_t>(
      WaitFlag(signal, kCountBits, seq, a.options.timeout_ns, site) &
      ((1ull << kCountBits) - 1));
}

// The first kFirstIds ids of token t (-1 past K, or for t >= end) in
// registers: their loads all fly at once (a loop over K would wait out each).
// The columns past kFirstIds, rare, are read one by one.
constexpr int kFirstIds = 8;

__device__ __forceinline__ void LoadFirstIds(const DispatchArgs& a, int64_t t,
                                             int64_t end,
                                             int32_t (&ids)[kFirstIds]) {
  const int64_t K = a.shape.num_topk;
#pragma unroll
  for (int j = 0; j < kFirstIds; ++j) {
    ids[j] = t < end && j < K ? a.topk_idx[t * K + j] : -1;
  }
}

// This rank's tokens in [first, end) that chose expert e, for one warp: bit j
// of the lane's result is token first + j * 32 + lane (end - first <= 1024).
__device__ __forceinline__ uint32_t OwnTokensOf(const DispatchArgs& a,
                                                int32_t e, int64_t first,
                                                int64_t end, int lane) {
  const int K = static_cast<int>(a.shape.num_topk);
  uint32_t chose = 0;
  for (int j = 0; first + j * 32 < end; ++j) {
    const int64_t t = first + j * 32 + lane;
    int32_t ids[kFirstIds];
    LoadFirstIds(a, t, end, ids);
    bool hit = false;
#pragma unroll
    for (int k = 0; k < kFirstIds; ++k) hit |= ids[k] == e;
    for (int k = kFirstIds; t < end && k < K; ++k) {
      hit |= a.topk_idx[t * K + k] == e;
    }
    chose |= static_cast<uint32_t>(hit) << j;
  }
  return chose;
}

// The unit's thread i receives local expert l; `source_of` (the unit's S
// words of shared memory) holds each packed row's s * Tmax + t, `own` (the
// unit's kUnitWarps words) each warp's count of this rank's tokens.
__device__ __forceinline__ void ReceiveExpert(const Heap& heap,
                                              const DispatchArgs& a,
                                              const SetPointers& set,
                                              uint64_t seq, int64_t l,
                                              int unit, int i,
                                              int32_t* counts,
                                              int32_t* offsets,
                                              int32_t* own,
                                              int32_t* source_of) {
  const Shape& sh = a.shape;
  const int warp = i / 32, lane = i % 32;
  const SetLayout layout{sh};
  const int64_t R = sh.num_ranks, Tmax = sh.max_tokens, T = sh.num_tokens;
  const int64_t S = R * Tmax, H = sh.hidden, me = heap.rank;
  const int64_t row_bytes = PackedRowBytes(a);
  const int64_t scale_bytes = PackedScaleBytes(a);
  int32_t* const src_index = a.src_index + l * S;
  int32_t* const slot = a.slot + l * S;

  // This rank's tokens of the expert: each warp scans a quarter of them (a
  // multiple of 32) while the peers' counts are awaited.
  const int64_t quarter = (T + kUnitThreads - 1) / kUnitThreads * 32;
  const int64_t first = warp * quarter, end = min(T, first + quarter);
  const uint32_t chose = OwnTokensOf(
      a, static_cast<int32_t>(me * sh.num_local() + l), first, end, lane);
  const int chosen = __reduce_add_sync(0xffffffffu, __popc(chose));
  if (lane == 0) own[warp] = chosen;
  for (int64_t s = i; s < R; s += kUnitThreads) {
    if (s != me) counts[s] = WaitCount(heap, a, set, seq, l, s);
  }
  // Every slot empty until the packing below fills it.
  for (int64_t j = i; j < S; j += kUnitThreads) {
    slot[j] = static_cast<int32_t>(S);
    src_index[j] = static_cast<int32_t>(S);
  }
  UnitSync(unit);
  if (i == 0) {
    counts[me] = 0;
    for (int w = 0; w < kUnitWarps; ++w) counts[me] += own[w];
    offsets[0] = 0;
    for (int64_t s = 0; s < R; ++s) offsets[s + 1] = offsets[s] + counts[s];
    a.count[l] = offsets[R];
  }
  UnitSync(unit);

  // Places the warp's rows of source s in slot order: bit j of `arrived`
  // is slot j * 32 + lane, packed from `packed` on.
  auto place = [&](int64_t s, uint32_t arrived, int64_t from, int64_t to,
                   int packed) {
    for (int64_t j = 0; from + j * 32 < to; ++j) {
      const uint32_t here = __ballot_sync(0xffffffffu, arrived >> j & 1);
      if (arrived >> j & 1) {
        const int row = packed + __popc(here & ((1u << lane) - 1));
        const int32_t source =
            static_cast<int32_t>(s * Tmax + from + j * 32 + lane);
        source_of[row] = source;
        src_index[row] = source;
        slot[source] = row;
      }
      packed += __popc(here);
    }
  };
  // This rank's rows in token order: each warp's quarter after the ones
  // before it.
  int packed = offsets[me];
  for (int w = 0; w < warp; ++w) packed += own[w];
  place(me, chose, first, end, packed);
  // Per other source, one warp waits for its `counts[s]` flags and packs
  // them in token order.
  for (int64_t s = warp; s < R; s += kUnitWarps) {
    if (s == me) continue;
    const uint64_t* flags = reinterpret_cast<const uint64_t*>(
        set.flags + layout.dispatch_flags()) + (l * R + s) * Tmax;
    const Site site{kOp, "wait for the rows of a local expert", heap.rank,
                    static_cast<int>(s), l};
    place(s,
          WaitRows(flags, static_cast<int>(Tmax), counts[s], seq,
                   a.options.timeout_ns, site),
          0, Tmax, offsets[s]);
  }
  UnitSync(unit);

  // The other ranks' rows land packed before and after this rank's (which
  // CastOwnTokens writes): the unit copies them as one run of int4s,
  // kRecvUnroll loads in flight per thread.
  const int total = offsets[R], mine = counts[me], mine_from = offsets[me];
  // The packed row of the j-th row of the other ranks.
  auto other_row = [&](int j) { return j < mine_from ? j : j + mine; };
  const int row_chunks = static_cast<int>(row_bytes / 16);
  const int run = (total - mine) * row_chunks;
  const int64_t message = sh.message_bytes();
  int4* out = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                      l * S * row_bytes);
  const char* messages = set.data + layout.dispatch_data() + l * S * message;
  for (int base = i; base < run; base += kUnitThreads * kRecvUnroll) {
    int4 v[kRecvUnroll];
#pragma unroll
    for (int u = 0; u < kRecvUnroll; ++u) {
      const int f = base + u * kUnitThreads;
      if (f < run) {
        v[u] = reinterpret_cast<const int4*>(
            messages + source_of[other_row(f / row_chunks)] *
                           message)[f % row_chunks];
      }
    }
#pragma unroll
    for (int u = 0; u < kRecvUnroll; ++u) {
      const int f = base + u * kUnitThreads;
      if (f < run) {
        out[other_row(f / row_chunks) * row_chunks + f % row_chunks] = v[u];
      }
    }
  }
  // Their scales, one 32-bit word per thread: a float per 128 channels, or
  // four UE8M0 exponent bytes, little-endian.
  const int scale_words = static_cast<int>(scale_bytes / 4);
  uint32_t* scale_out = reinterpret_cast<uint32_t*>(
      static_cast<char*>(a.recv_scales) + l * S * scale_bytes);
  for (int f = i; f < (total - mine) * scale_words; f += kUnitThreads) {
    const int row = other_row(f / scale_words), w = f % scale_words;
    const uint32_t* scales = reinterpret_cast<const uint32_t*>(
        messages + source_of[row] * message + H);
    uint32_t word = 0;
    if (a.use_ue8m0) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        word |= (scales[w * 4 + b] >> 23) << (8 * b);
      }
    } else {
      word = scales[w];
    }
    scale_out[row * scale_words + w] = word;
  }
  if (a.zero_padding) {
    ZeroBytes(static_cast<char*>(a.recv_x) + (l * S + total) * row_bytes,
              (S - total) * row_bytes, i);
    if (a.use_fp8) {
      ZeroBytes(static_cast<char*>(a.recv_scales) +
                    (l * S + total) * scale_bytes,
                (S - total) * scale_bytes, i);
    }
  }
  UnitSync(unit);  // counts, offsets and own are the unit's next expert's
}

// One block per token of this rank: its row, cast (or copied) once, goes to
// the packed row of each of this rank's experts that it chose: after the
// rows of the ranks before this one (their counts), the tokens before it that
// chose the expert — where ReceiveExpert placed it. A thread per earlier
// token finds which of those experts it chose (column_of maps an expert to
// its column in one shared load); a ballot per warp counts them.
__device__ __forceinline__ void CastOwnTokens(const Heap& heap,
                                              const DispatchArgs& a,
                                              const SetPointers& set,
                                              uint64_t seq) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int K = static_cast<int>(sh.num_topk);
  const int64_t L = sh.num_local(), E = sh.num_experts;
  const int64_t S = sh.num_ranks * sh.max_tokens, me = heap.rank;
  const int64_t row_bytes = PackedRowBytes(a);
  const int64_t scale_bytes = PackedScaleBytes(a);
  // Per column k of the token: its expert where it is a first choice of
  // this rank's, else -1, and its packed row.
  __shared__ int32_t expert_of[kMaxTopk];
  __shared__ int32_t row_of[kMaxTopk];
  // The inverse of expert_of: -1 but at the token's experts of this rank.
  __shared__ int8_t column_of[kMaxLowLatencyExperts];
  for (int64_t e = threadIdx.x; e < E; e += kThreads) column_of[e] = -1;
  __syncthreads();
  for (int64_t t = blockIdx.x; t < sh.num_tokens; t += gridDim.x) {
    const int32_t* choices = a.topk_idx + t * K;
    // The first earlier token's ids: their loads fly with the choices'.
    int32_t ids[kFirstIds];
    LoadFirstIds(a, threadIdx.x, t, ids);
    bool mine = false;
    if (warp == 0) {
      const int k = lane;  // K <= 32
      const int32_t e = k < K ? choices[k] : -1;
      mine = FirstChoiceInWarp(e, K, E) && e / L == me;
      if (k < K) {
        expert_of[k] = mine ? e : -1;
        row_of[k] = 0;
        if (mine) column_of[e] = static_cast<int8_t>(k);
      }
    }
    // Also the barrier before the setup reads expert_of and column_of.
    if (!__syncthreads_or(mine)) continue;
    // Bit column_of[id] when token `before`'s id is one of those experts.
    auto column_bit = [&](int32_t id) {
      const int column = ValidExpert(id, E) ? column_of[id] : -1;
      return column < 0 ? 0u : 1u << column;
    };
    RowPass pass;
    pass.chunks = RowChunks(a);
    for (pass.base = 0; pass.base < pass.chunks;
         pass.base += int64_t{kThreads} * kChunksPerThread) {
      pass.Load(a, t);
      if (pass.base == 0) {  // the rows, while the loads fly
        for (int64_t from = 0; from < t; from += kThreads) {
          const int64_t before = from + threadIdx.x;
          if (from > 0) LoadFirstIds(a, before, t, ids);
          uint32_t chose = 0;  // bit k: token `before` chose expert_of[k]
#pragma unroll
          for (int j = 0; j < kFirstIds; ++j) chose |= column_bit(ids[j]);
          for (int j = kFirstIds; before < t && j < K; ++j) {
            chose |= column_bit(a.topk_idx[before * K + j]);
          }
          for (int k = 0; k < K; ++k) {
            if (expert_of[k] < 0) continue;
            const int n = __popc(__ballot_sync(0xffffffffu, chose >> k & 1));
            if (lane == 0 && n > 0) atomicAdd(&row_of[k], n);
          }
        }
        for (int64_t w = threadIdx.x; w < K * me; w += kThreads) {
          const int k = static_cast<int>(w % K);
          if (expert_of[k] >= 0) {
            atomicAdd(&row_of[k],
                      WaitCount(heap, a, set, seq, expert_of[k] % L, w / K));
          }
        }
        __syncthreads();
        // Every read of column_of is done: back to -1 for the next token.
        if (threadIdx.x < K && expert_of[threadIdx.x] >= 0) {
          column_of[expert_of[threadIdx.x]] = -1;
        }
      }
      pass.Cast(a);
      // With UE8M0 a word packs four groups' exponents: lane 0 gathers its
      // warp's 32 chunks (a row's chunks are a multiple of 32 then).
      uint32_t word[kChunksPerThread] = {};
      if (a.use_ue8m0) {
#pragma unroll
        for (int u = 0; u < kChunksPerThread; ++u) {
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const float group = __shfl_sync(0xffffffffu, pass.scale[u], b * 8);
            word[u] |= (__float_as_uint(group) >> 23) << (8 * b);
          }
        }
      }
      for (int k = 0; k < K; ++k) {
        if (expert_of[k] < 0) continue;
        const int64_t row = (expert_of[k] % L) * S + row_of[k];
        int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                            row * row_bytes);
        char* scales = static_cast<char*>(a.recv_scales) + row * scale_bytes;
#pragma unroll
        for (int u = 0; u < kChunksPerThread; ++u) {
          const int64_t c = pass.Chunk(u);
          if (c >= pass.chunks) continue;
          dst[c] = pass.out[u];
          if (a.use_ue8m0) {
            if (lane == 0) {
              reinterpret_cast<uint32_t*>(scales)[c / 32] = word[u];
            }
          } else if (a.use_fp8 && c % (kScaleGroup / 16) == 0) {
            reinterpret_cast<float*>(scales)[c / (kScaleGroup / 16)] =
                pass.scale[u];
          }
        }
      }
    }
    __syncthreads();  // expert_of and row_of are the next token's
  }
}

// Local expert l goes to unit (l / G) % kUnits of block l % G: the experts
// spread over every block before any block's second unit takes one.
__device__ __forceinline__ void ReceiveExperts(const Heap& heap,
                                               const DispatchArgs& a,
                                               const SetPointers& set,
                                               uint64_t seq) {
  __shared__ int32_t counts[kUnits][kMaxRanks];
  __shared__ int32_t offsets[kUnits][kMaxRanks + 1];
  __shared__ int32_t own[kUnits][kUnitWarps];
  extern __shared__ int32_t sources[];  // kUnits * S (ReceiveSharedBytes)
  const int unit = threadIdx.x / kUnitThreads, i = threadIdx.x % kUnitThreads;
  const int64_t G = gridDim.x, S = a.shape.num_ranks * a.shape.max_tokens;
  for (int64_t l = blockIdx.x + unit * G; l < a.shape.num_local();
       l += kUnits * G) {
    ReceiveExpert(heap, a, set, seq, l, unit, i, counts[unit], offsets[unit],
                  own[unit], sources + unit * S);
  }
}

// The dynamic shared memory of a receiving kernel: each unit's S sources.
inline int ReceiveSharedBytes(const Shape& shape) {
  return static_cast<int>(kUnits * shape.num_ranks * shape.max_tokens *
                          sizeof(int32_t));
}

// Every block reads the ids many times (the units once per local expert, the
// own-token cast once per earlier token): up to kStagedIds of them are
// copied once into shared memory, their loads in flight while the call's
// sequence number is read.
constexpr int kStagedIds = 4096;

template <Halves kHalves>
__global__ void __launch_bounds__(kThreads, 1)
    DispatchKernel(const Heap heap, const DispatchArgs args) {
  __shared__ int32_t staged[kStagedIds];
  const int64_t num_ids = args.shape.num_tokens * args.shape.num_topk;
  const bool stage = num_ids <= kStagedIds;
  int32_t ids[kStagedIds / kThreads];
#pragma unroll
  for (int u = 0; u < kStagedIds / kThreads; ++u) {
    const int64_t j = u * kThreads + threadIdx.x;
    ids[u] = stage && j < num_ids ? args.topk_idx[j] : 0;
  }
  const uint64_t seq = CallSequence<kHalves>(heap, args.ticket);
  const SetPointers set = SetOf(heap, seq);
#pragma unroll
  for (int u = 0; u < kStagedIds / kThreads; ++u) {
    const int64_t j = u * kThreads + threadIdx.x;
    if (stage && j < num_ids) staged[j] = ids[u];
  }
  __syncthreads();
  DispatchArgs a = args;
  if (stage) a.topk_idx = staged;
  bool put = false;
  if constexpr (Sends(kHalves)) put = SendTokens(heap, a, set, seq);
  if constexpr (Receives(kHalves)) {
    ReceiveExperts(heap, a, set, seq);
    CastOwnTokens(heap, a, set, seq);
  }
  if (put) nvshmem_quiet();
  EndCall<kHalves>(heap, set, seq, a.options.force_put);
}

}  // namespace

Status PrepareKernels() {
  // The receiving kernels' shared memory at the largest S, past the 48 KB a
  // kernel gets without asking.
  Shape largest{};
  largest.num_ranks = 1;
  largest.max_tokens = kMaxLowLatencySlotsPerExpert;
  const int bytes = ReceiveSharedBytes(largest);
  for (Status s :
       {Status::FromCuda(cudaFuncSetAttribute(
                             DispatchKernel<Halves::kReceive>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             bytes),
                         "DispatchKernel shared memory"),
        Status::FromCuda(cudaFuncSetAttribute(
                             DispatchKernel<Halves::kBoth>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             bytes),
                         "DispatchKernel shared memory")}) {
    if (!s.ok()) return s;
  }
  return Status();
}

Status LaunchDispatch(const Heap& heap, const DispatchArgs& a, Halves halves,
                      cudaStream_t stream) {
  if (Status s = CheckShape("jax_ep_ll_dispatch", heap, a.shape); !s.ok()) {
    return s;
  }
  if (a.use_fp8 && a.shape.hidden % kScaleGroup != 0) {
    return Status::InvalidArgument(
        "jax_ep_ll_dispatch: fp8 needs the hidden size to be a multiple of "
        "128");
  }
  if (Receives(halves) && a.use_ue8m0 &&
      a.shape.hidden % (4 * kScaleGroup) != 0) {
    return Status::InvalidArgument(
        "jax_ep_ll_dispatch: UE8M0 scales need the hidden size to be a "
        "multiple of 512");
  }
  // A block per token to send; to receive, a block per local expert while
  // there are SMs (then their other units take the rest).
  const int64_t send_blocks = Sends(halves) ? a.shape.num_tokens : 0;
  const int64_t recv_blocks = Receives(halves) ? a.shape.num_local() : 0;
  const int grid = Grid(heap, std::max(send_blocks, recv_blocks));
  const int shared = Receives(halves) ? ReceiveSharedBytes(a.shape) : 0;
  switch (halves) {
    case Halves::kSend:
      DispatchKernel<Halves::kSend><<<grid, kThreads, 0, stream>>>(heap, a);
      break;
    case Halves::kReceive:
      DispatchKernel<Halves::kReceive><<<grid, kThreads, shared, stream>>>(
          heap, a);
      break;
    case Halves::kBoth:
      DispatchKernel<Halves::kBoth><<<grid, kThreads, shared, stream>>>(heap,
                                                                         a);
      break;
  }
  return Launched("DispatchKernel launch");
}

}  // namespace jax_ep::low_latency
