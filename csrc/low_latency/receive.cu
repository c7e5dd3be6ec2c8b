// The receive halves of low-latency dispatch and combine over NVSHMEM: a
// receive kernel takes the send half's ticket, waits for the flags that carry
// its sequence number and writes the XLA outputs; its last block tells every
// peer that the buffer set may be reused. The protocol both halves share
// (sequence numbers, buffer sets, flags, transports) is described at the top
// of kernels.cuh; send.cu has the send halves.
//
// Dispatch. The receive kernel, one block per local expert, waits for the R
// counts, then for that many flags per source, packs the rows by (source
// rank, token) into the XLA outputs and writes the handle. Nothing depends on
// arrival order: the result is deterministic.
//
// Combine. The receive kernel, one block per token, waits for the token's
// distinct experts and sums in fp32: per rank, in rank order, the k-ordered
// weighted rows, then the ranks' sums, rounded once to bf16 — the reference's
// order (reference/low_latency.py).

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <nvshmem.h>

#include <cstdint>
#include <cstdio>

#include "low_latency/kernels.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {
namespace {

// The dispatch receive: blocks of 256, two per SM, one per local expert.
constexpr int kRecvThreads = 256;
constexpr int kRecvWarps = kRecvThreads / 32;
constexpr int kRecvUnroll = 4;

// --- Sequence numbers and waits -----------------------------------------------

__device__ __forceinline__ uint64_t TicketSequence(const uint32_t* ticket) {
  return static_cast<uint64_t>(ticket[0]) |
         (static_cast<uint64_t>(ticket[1]) << 32);
}

struct Site {
  const char* op;
  const char* phase;
  int rank;
  int peer;
  int64_t index;  // the expert, token or slot waited for
};

// Prints what went wrong (`what`) at `site`, then traps.
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

// Waits until the flag carries `seq` (acquire loads); returns its value. A
// timeout reports the sequence part of the last value seen.
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

  // s * Tmax + t per row.
  __shared__ int32_t source_of[kMaxLowLatencySlotsPerExpert];
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

}  // namespace

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
