// Low-latency combine over NVSHMEM: every received row's expert output back
// to its source, then per token the weighted sum. One kernel runs the whole
// op; with a receive hook the send half and the receive half run as two
// (kernels.cuh describes what both ops share: sequence numbers, buffer sets,
// flags, transports).
//
// Send. Warps write each received row's expert output back to its source at
// (global expert, token), flagged; rows whose source is this rank stay in y
// (at R = 1 the send has nothing to do).
//
// Receive. One block per token: its first warp finds each choice's row (in y
// through the dispatch handle's slot for this rank's experts, else in the
// buffer set) and waits for the other ranks' rows, then the block sums in
// fp32: per rank, in rank order, the k-ordered weighted rows, then the ranks'
// sums, rounded once to bf16 — the reference's order
// (reference/low_latency.py).

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "common/warp_copy.cuh"
#include "low_latency/kernels.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::low_latency {
namespace {

constexpr const char* kOp = "low_latency_combine";
// int4 loads in flight per lane of a row's copy: a bf16 row of H = 7168 is
// 28 int4s per lane, two rounds.
constexpr int kSendUnroll = 16;

// --- Send ----------------------------------------------------------------------

// Each local expert's rows are packed at the front of its S slots (the
// dispatch handle's src_index holds S past them). W / L warps serve each
// expert (each expert gets a warp when there are fewer warps than experts);
// warp j of an expert sends its rows j, j + W / L, ... up to the first empty
// slot: every warp starts at once, whatever the counts. Returns whether the
// thread issued NVSHMEM puts (it must then quiet).
__device__ __forceinline__ bool SendRows(const Heap& heap,
                                         const CombineArgs& a,
                                         const SetPointers& set,
                                         uint64_t seq) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SetLayout layout{sh};
  const int64_t L = sh.num_local(), Tmax = sh.max_tokens;
  const int64_t S = sh.num_ranks * Tmax, row_bytes = sh.combine_row_bytes();
  const bool force_put = a.options.force_put;
  if (sh.num_ranks == 1) return false;  // every row is read in place
  if (threadIdx.x < sh.num_ranks) {
    WaitSetFree(heap, set, seq, threadIdx.x, a.options.timeout_ns, kOp);
  }
  __syncthreads();

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
      if (pe == heap.rank) continue;  // the receive reads y in place
      const int64_t slot =
          (heap.rank * L + l) * Tmax + source % static_cast<int>(Tmax);
      char* dst = data + slot * row_bytes;
      uint64_t* flag = reinterpret_cast<uint64_t*>(flags + slot * 8);
      const char* src = static_cast<const char*>(a.y) + g * row_bytes;
      if (char* peer_dst = PeerPtr(heap, dst, pe, force_put)) {
        WarpCopy<kSendUnroll>(reinterpret_cast<int4*>(peer_dst),
                              reinterpret_cast<const int4*>(src),
                              row_bytes / 16, lane);
        // The warp barrier orders the lanes' stores before the release,
        // which is cumulative over what the warp wrote.
        __syncwarp();
        if (lane == 0) {
          sync::st_release_sys_global(PeerPtr(heap, flag, pe, force_put),
                                      seq);
        }
        continue;
      }
      if (!a.zero_copy) {
        // Puts read a registered buffer: stage y's row in the symmetric heap.
        char* stage = stages + g * row_bytes;
        WarpCopy<kSendUnroll>(reinterpret_cast<int4*>(stage),
                              reinterpret_cast<const int4*>(src),
                              row_bytes / 16, lane);
        __syncwarp();
        src = stage;
      }
      nvshmemx_putmem_signal_nbi_warp(dst, src, row_bytes, flag, seq,
                                      NVSHMEM_SIGNAL_SET, pe);
      put = true;
    }
  }
  return put;
}

// --- Receive -------------------------------------------------------------------

// A valid choice of a token whose row this rank's dispatch did not receive:
// topk_idx is not the dispatch's. Prints where, then traps.
__device__ __noinline__ void ReportMissingRow(int rank, int64_t t, int32_t e) {
  printf("jax_ep %s: rank %d, token %lld chose expert %d, whose rank's "
         "dispatch did not receive it: combine's topk_idx must be the "
         "dispatch's\n",
         kOp, rank, static_cast<long long>(t), e);
  __trap();
}

// One block per token: the first warp orders the token's valid choices by
// (rank, k), finds their rows and waits for the other ranks' (relaxed loads,
// then one fence), then every thread sums its 8-channel chunks.
__device__ __forceinline__ void ReceiveTokens(const Heap& heap,
                                              const CombineArgs& a,
                                              const SetPointers& set,
                                              uint64_t seq) {
  const Shape& sh = a.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SetLayout layout{sh};
  const int64_t L = sh.num_local(), K = sh.num_topk, H = sh.hidden;
  const int64_t E = sh.num_experts, row_bytes = sh.combine_row_bytes();
  const int64_t Tmax = sh.max_tokens, S = sh.num_ranks * Tmax;

  // The token's valid choices ordered by (rank, k), the reference's order:
  // row, weight and rank of the j-th, and how many there are.
  __shared__ const int4* row_of[kMaxTopk];
  __shared__ float weight[kMaxTopk];
  __shared__ int32_t rank_of[kMaxTopk];
  __shared__ int num_valid;

  for (int64_t t = blockIdx.x; t < sh.num_tokens; t += gridDim.x) {
    const int32_t* choices = a.topk_idx + t * K;
    if (warp == 0) {
      const int k = lane;  // K <= 32
      const int32_t e = k < K ? choices[k] : -1;
      const bool valid = ValidExpert(e, E);
      const bool own = valid && e / L == heap.rank;
      if (valid) {
        // Position among the valid choices by (rank, k).
        int j = 0;
        for (int k2 = 0; k2 < K; ++k2) {
          const int32_t e2 = choices[k2];
          j += ValidExpert(e2, E) &&
               (e2 / L < e / L || (e2 / L == e / L && k2 < k));
        }
        const char* row;
        if (own) {
          const int64_t l = e % L;
          const int32_t r = a.slot[l * S + heap.rank * Tmax + t];
          if (r < 0 || r >= S) ReportMissingRow(heap.rank, t, e);
          row = static_cast<const char*>(a.y) + (l * S + r) * row_bytes;
        } else {
          row = set.data + layout.combine_data() + (e * Tmax + t) * row_bytes;
        }
        row_of[j] = reinterpret_cast<const int4*>(row);
        weight[j] = a.weights[t * K + k];
        rank_of[j] = static_cast<int32_t>(e / L);
      }
      const uint32_t valid_lanes = __ballot_sync(0xffffffffu, valid);
      if (lane == 0) num_valid = __popc(valid_lanes);
      // Another rank's row, once per distinct expert, comes flagged.
      bool arrived = !(valid && !own && FirstChoice(choices, k, E));
      const bool waits = __any_sync(0xffffffffu, !arrived);
      const uint64_t* flag =
          arrived ? nullptr
                  : reinterpret_cast<const uint64_t*>(
                        set.flags + layout.combine_flags() +
                        (e * Tmax + t) * 8);
      const Site site{kOp, "wait for an expert's row", heap.rank,
                      static_cast<int>(valid ? e / L : -1), e};
      uint64_t seen = 0;
      const auto all_arrived = [&] {
        if (!arrived) {
          seen = sync::ld_relaxed_sys_global(flag);
          arrived = Arrived(seen, 0, seq, site);
        }
        return __all_sync(0xffffffffu, arrived);
      };
      if (!all_arrived()) {
        sync::wait_until(all_arrived, a.options.timeout_ns, [&] {
          if (!arrived) Report(site, "timeout", seq, seen);
        });
      }
      if (waits) sync::fence_acq_rel_sys();
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
          if (j0 + u < n) raw[u] = row_of[j0 + u][c];
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
}

template <Halves kHalves>
__global__ void __launch_bounds__(kThreads, 1)
    CombineKernel(const Heap heap, const CombineArgs a) {
  const uint64_t seq = CallSequence<kHalves>(heap, a.ticket);
  const SetPointers set = SetOf(heap, seq);
  bool put = false;
  if constexpr (Sends(kHalves)) put = SendRows(heap, a, set, seq);
  if constexpr (Receives(kHalves)) ReceiveTokens(heap, a, set, seq);
  if (put) nvshmem_quiet();
  EndCall<kHalves>(heap, set, seq, a.options.force_put);
}

}  // namespace

Status LaunchCombine(const Heap& heap, const CombineArgs& a, Halves halves,
                     cudaStream_t stream) {
  if (Status s = CheckShape("jax_ep_ll_combine", heap, a.shape); !s.ok()) {
    return s;
  }
  // A warp per received row to send, a block per token to receive.
  const int64_t rows = a.shape.num_experts * a.shape.max_tokens;
  const int64_t send_blocks = Sends(halves) ? (rows + kWarps - 1) / kWarps : 0;
  const int64_t recv_blocks = Receives(halves) ? a.shape.num_tokens : 0;
  const int grid = Grid(heap, std::max(send_blocks, recv_blocks));
  switch (halves) {
    case Halves::kSend:
      CombineKernel<Halves::kSend><<<grid, kThreads, 0, stream>>>(heap, a);
      break;
    case Halves::kReceive:
      CombineKernel<Halves::kReceive><<<grid, kThreads, 0, stream>>>(heap, a);
      break;
    case Halves::kBoth:
      CombineKernel<Halves::kBoth><<<grid, kThreads, 0, stream>>>(heap, a);
      break;
  }
  return Launched("CombineKernel launch");
}

}  // namespace jax_ep::low_latency
