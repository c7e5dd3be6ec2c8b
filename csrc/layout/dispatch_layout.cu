// get_dispatch_layout: which ranks and experts the tokens of one rank select.
//
// What it computes (docs/contract.md), from topk_idx[T, K] (int32,
// row-major) and E experts spread over R ranks, L = E / R each, expert e on
// rank e / L:
//   num_tokens_per_expert[e]  number of (t, k) with topk_idx[t, k] == e; a
//                             token that lists e twice counts twice.
//   is_token_in_rank[t, r]    some topk_idx[t, k] is an expert of rank r.
//   num_tokens_per_rank[r]    number of tokens t with is_token_in_rank[t, r].
//   num_invalid               number of (t, k) outside [-1, E).
// -1 selects nothing; so do the invalid ids, which are only counted.
//
// How: two kernels on the caller's stream, nothing on the host.
//   1. ZeroCountsKernel (one block) zeroes the three count outputs.
//   2. DispatchLayoutKernel: one token per thread, blocks striding over the
//      tokens. A thread reads its token's K ids, bumps the block's
//      shared-memory expert histogram, builds a 64-bit mask of the token's
//      ranks (expert -> rank from a shared table: no division per id) and
//      writes its is_token_in_rank row from the mask, 8 bytes per store when
//      R % 8 == 0. Warp votes count tokens per rank. At the end a block adds
//      its nonzero counts to the outputs with global atomics: at most gridDim
//      adds per address.
// Integer sums do not depend on the order of the atomics, so results are the
// same on every run. Ids are range-checked (as unsigned) before they index
// anything: no input can make either kernel access memory out of bounds.

#include <algorithm>
#include <cstdint>
#include <string>

#include "layout/dispatch_layout.cuh"

namespace jax_ep::layout {
namespace {

constexpr int kThreads = 256;
// Past kMaxBlocks * kThreads tokens, blocks take several strides.
constexpr int kMaxBlocks = 1024;
static_assert(kMaxRanks <= 64, "a token's ranks are a 64-bit mask");
static_assert(kMaxRanks <= kThreads, "ZeroCountsKernel: a thread per rank");

constexpr int CeilDiv(int64_t a, int64_t b) {
  return static_cast<int>((a + b - 1) / b);
}

// The launch's sizes, narrowed to int once they have been validated.
struct Params {
  const int32_t* topk_idx;
  int num_tokens;
  int num_topk;
  int num_experts;
  int num_ranks;
  int32_t* num_tokens_per_rank;
  int32_t* num_tokens_per_expert;
  bool* is_token_in_rank;
  int32_t* num_invalid;
};

__global__ void __launch_bounds__(kThreads) ZeroCountsKernel(Params p) {
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {
    p.num_tokens_per_expert[e] = 0;
  }
  if (threadIdx.x < p.num_ranks) p.num_tokens_per_rank[threadIdx.x] = 0;
  if (threadIdx.x == 0) *p.num_invalid = 0;
}

// One block's shared memory.
struct BlockState {
  int expert_count[kMaxNormalExperts];
  int rank_count[kMaxRanks];
  int invalid_count;
  uint8_t rank_of_expert[kMaxNormalExperts];
};

__device__ void InitBlockState(const Params& p, BlockState& s) {
  const int experts_per_rank = p.num_experts / p.num_ranks;
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {
    s.expert_count[e] = 0;
    s.rank_of_expert[e] = static_cast<uint8_t>(e / experts_per_rank);
  }
  if (threadIdx.x < kMaxRanks) s.rank_count[threadIdx.x] = 0;
  if (threadIdx.x == 0) s.invalid_count = 0;
  __syncthreads();
}

// Reads token t's ids: counts its experts in `s` and its invalid ids in
// `invalid`, returns the mask of its ranks.
__device__ uint64_t VisitToken(const Params& p, BlockState& s, int t,
                               int& invalid) {
  const int32_t* ids = p.topk_idx + static_cast<int64_t>(t) * p.num_topk;
  uint64_t ranks = 0;
  for (int k = 0; k < p.num_topk; ++k) {
    const int32_t id = __ldg(ids + k);
    if (static_cast<unsigned>(id) < static_cast<unsigned>(p.num_experts)) {
      atomicAdd(&s.expert_count[id], 1);
      ranks |= uint64_t{1} << s.rank_of_expert[id];
    } else {
      invalid += id != -1;
    }
  }
  return ranks;
}

// The low 8 bits of `bits` as 8 bytes of 0 or 1, bit i in byte i.
__device__ uint64_t BitsToBytes(uint64_t bits) {
  uint64_t bytes = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) bytes |= ((bits >> i) & 1) << (8 * i);
  return bytes;
}

// Writes a token's is_token_in_rank row from its rank mask.
__device__ void WriteRow(uint8_t* row, uint64_t ranks, int num_ranks,
                         bool row_is_8_byte_aligned) {
  if (row_is_8_byte_aligned) {
    for (int r = 0; r < num_ranks; r += 8) {
      *reinterpret_cast<uint64_t*>(row + r) = BitsToBytes(ranks >> r);
    }
  } else {
    for (int r = 0; r < num_ranks; ++r) row[r] = (ranks >> r) & 1;
  }
}

// Adds the block's counts to the outputs (zeroed by ZeroCountsKernel).
// Lane l brings its warp's token counts of ranks l and l + 32.
__device__ void FlushCounts(const Params& p, BlockState& s, int rank_count_lo,
                            int rank_count_hi, int invalid) {
  const int lane = threadIdx.x % 32;
  if (rank_count_lo != 0) atomicAdd(&s.rank_count[lane], rank_count_lo);
  if (rank_count_hi != 0) atomicAdd(&s.rank_count[lane + 32], rank_count_hi);
  invalid = __reduce_add_sync(0xffffffffu, invalid);
  if (lane == 0 && invalid != 0) atomicAdd(&s.invalid_count, invalid);
  __syncthreads();
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {
    if (s.expert_count[e] != 0) {
      atomicAdd(&p.num_tokens_per_expert[e], s.expert_count[e]);
    }
  }
  if (threadIdx.x < p.num_ranks && s.rank_count[threadIdx.x] != 0) {
    atomicAdd(&p.num_tokens_per_rank[threadIdx.x], s.rank_count[threadIdx.x]);
  }
  if (threadIdx.x == 0 && s.invalid_count != 0) {
    atomicAdd(p.num_invalid, s.invalid_count);
  }
}

__global__ void __launch_bounds__(kThreads) DispatchLayoutKernel(Params p) {
  __shared__ BlockState s;
  InitBlockState(p, s);
  const int lane = threadIdx.x % 32;
  const int num_ranks = p.num_ranks;
  uint8_t* const rows = reinterpret_cast<uint8_t*>(p.is_token_in_rank);
  // Every row starts at a multiple of num_ranks bytes.
  const bool rows_are_8_byte_aligned =
      num_ranks % 8 == 0 && reinterpret_cast<uintptr_t>(rows) % 8 == 0;
  int invalid = 0;
  // Lane l counts the warp's tokens of ranks l (lo) and l + 32 (hi).
  int rank_count_lo = 0;
  int rank_count_hi = 0;
  // `first` is the same for the whole block: every lane reaches the votes.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads;
       first < p.num_tokens; first += stride) {
    const int64_t t = first + threadIdx.x;
    uint64_t ranks = 0;
    if (t < p.num_tokens) {
      ranks = VisitToken(p, s, static_cast<int>(t), invalid);
      WriteRow(rows + t * num_ranks, ranks, num_ranks, rows_are_8_byte_aligned);
    }
    for (int r = 0; r < num_ranks; ++r) {
      const int in_rank = __popc(__ballot_sync(0xffffffffu, (ranks >> r) & 1));
      if (lane == r % 32) (r < 32 ? rank_count_lo : rank_count_hi) += in_rank;
    }
  }
  FlushCounts(p, s, rank_count_lo, rank_count_hi, invalid);
}

Status Validate(const DispatchLayoutArgs& a) {
  auto fail = [](const std::string& what) {
    return Status::InvalidArgument("get_dispatch_layout: " + what);
  };
  auto in_range = [](int64_t v, int64_t lo, int64_t hi) {
    return lo <= v && v <= hi;
  };
  if (a.num_tokens < 0) {
    return fail("num_tokens must be >= 0, got " + std::to_string(a.num_tokens));
  }
  if (!in_range(a.num_topk, 1, kMaxTopk)) {
    return fail("num_topk must be in [1, " + std::to_string(kMaxTopk) +
                "], got " + std::to_string(a.num_topk));
  }
  if (!in_range(a.num_experts, 1, kMaxNormalExperts)) {
    return fail("num_experts must be in [1, " +
                std::to_string(kMaxNormalExperts) + "], got " +
                std::to_string(a.num_experts));
  }
  if (!in_range(a.num_ranks, 1, kMaxRanks)) {
    return fail("num_ranks must be in [1, " + std::to_string(kMaxRanks) +
                "], got " + std::to_string(a.num_ranks));
  }
  if (a.num_experts % a.num_ranks != 0) {
    return fail("num_experts (" + std::to_string(a.num_experts) +
                ") must be a multiple of num_ranks (" +
                std::to_string(a.num_ranks) + ")");
  }
  // Token indices, and the counts, are int32 in the kernel.
  if (a.num_tokens * a.num_topk > INT32_MAX) {
    return fail("num_tokens * num_topk must be < 2^31, got " +
                std::to_string(a.num_tokens) + " * " +
                std::to_string(a.num_topk));
  }
  return Status();
}

}  // namespace

Status LaunchDispatchLayout(const DispatchLayoutArgs& args,
                            cudaStream_t stream) {
  if (Status status = Validate(args); !status.ok()) return status;
  Params params;
  params.topk_idx = args.topk_idx;
  params.num_tokens = static_cast<int>(args.num_tokens);
  params.num_topk = static_cast<int>(args.num_topk);
  params.num_experts = static_cast<int>(args.num_experts);
  params.num_ranks = static_cast<int>(args.num_ranks);
  params.num_tokens_per_rank = args.num_tokens_per_rank;
  params.num_tokens_per_expert = args.num_tokens_per_expert;
  params.is_token_in_rank = args.is_token_in_rank;
  params.num_invalid = args.num_invalid;

  ZeroCountsKernel<<<1, kThreads, 0, stream>>>(params);
  if (params.num_tokens > 0) {
    const int num_blocks =
        std::min(CeilDiv(args.num_tokens, kThreads), kMaxBlocks);
    DispatchLayoutKernel<<<num_blocks, kThreads, 0, stream>>>(params);
  }
  return Status::FromCuda(cudaGetLastError(), "get_dispatch_layout launch");
}

}  // namespace jax_ep::layout
