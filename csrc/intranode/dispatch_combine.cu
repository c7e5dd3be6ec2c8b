// Intranode normal dispatch and combine over NVLink peer buffers, by "pull":
// each rank stages what it owns in its own peer buffer (a local copy), the
// ranks meet at a barrier, then every rank reads what it needs straight from
// its peers' buffers into XLA's output buffers. DESIGN.md §4 gives the
// results, bit for bit (the pure-JAX reference is the oracle).
//
// Kernels per call, in stream order on each rank r (R ranks, T tokens):
//   dispatch: StageDispatch -> Barrier -> ReceiveDispatch
//   combine:  StageCombine  -> Barrier -> ReduceCombine
//
// Call sequence and halves. All intranode calls of a device (notify,
// dispatch, combine) share its call counter and its flags (BufferLayout's
// control region): the Barrier kernel does seq = ++*sequence. Every rank
// makes the same sequence of calls, so seq names the same call everywhere.
// A call stages into half (seq & 1) of the data region (StageHalf; the split
// is fixed by the buffer, not by shapes). The stage kernel runs before the
// barrier increments the counter, so it uses parity (*sequence + 1) & 1; the
// kernels after the barrier use *sequence & 1.
//
// Barrier (one block, thread d < R): __threadfence_system, then
// st.release.sys flags[r] = seq in peer d's control region, then wait with
// ld.acquire.sys until this rank's flags[d] >= seq (sync::
// wait_at_least_acquire_sys: reports rank, phase, peer and traps after the
// timeout). The stage kernel finished before the barrier kernel started
// (same stream), and the fence + release publish its writes system-wide, so
// a peer that sees flags[r] >= seq reads this call's staged data.
//
// Why a half is never overwritten while a slow peer still reads it: rank s
// writes half p for call seq only in its stage kernel for seq. Staging call
// seq + 2 into the same half requires s to have finished call seq + 1,
// hence its barrier for seq + 1, hence to have seen every peer d's flag for
// seq + 1. d releases that flag in its barrier kernel for seq + 1, which runs
// after d's receive/reduce kernel of call seq (stream order), the last
// kernel that reads s's half of call seq. Call seq + 1 itself uses the other
// half. Hence one barrier per call suffices. Flags only grow; a flag already
// past seq satisfies the wait. Notify's slots obey the same argument.
//
// Dispatch staging (DispatchStage, in r's own half):
//   StageDispatch has R scan blocks and num_sms copy blocks. Scan block d
//   marks the tokens that select an expert of rank d (any k with
//   topk_idx[t,k] - d*L in [0, L): exactly the reference's test), writes
//   positions[d, t] (rank of t among them, or -1), tokens[d, p] (the p-th of
//   them), counts[d] and the per-expert counts of d's experts. Copy blocks
//   copy the rows (up to two arrays: bf16 rows, or fp8 rows and scales, as
//   bytes), topk_idx and topk_weights.
// ReceiveDispatch on r: offsets off[s] = sum over s' < s of counts_s'[r]
//   (read from the peers' halves); row j in [0, min(total, M)) belongs to the
//   source s with off[s] <= j < off[s+1] and is its token
//   t = tokens_s[r, j - off[s]]: rows ordered by source then token. A warp
//   per row writes src_index, recv_topk_idx/weights (k-th lane) and copies
//   the row with 16-byte loads from s's half; rows past the count get zeros,
//   -1, 0 and src_index R*T. recv_row[s, t] = off[s] + positions_s[r, t], or
//   M when not sent or past capacity. Block 0 writes num_recv_tokens (true
//   total) and the per-expert counts (sum over sources, rounded up).
// Combine staging (CombineStage): y's first min(num_recv, M) rows and the
//   handle's recv_row[R, T]. ReduceCombine on s: a warp per token t; lane r
//   reads row_r = recv_row_r[s, t] from rank r's half; the warp sums, in
//   fp32 and rank order, y_r[row_r] (or +0.0 where row_r == M), exactly as
//   the reference: total = v_0; total = total + v_r for r = 1..R-1; then
//   adds the bias (f32) and rounds once to the output type.

#include <string>

#include <cuda_bf16.h>

#include "intranode/dispatch_combine.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::intranode {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTopk = 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per lane
static_assert(runtime::kMaxPeerRanks <= kThreads, "a thread per rank");

// --- Helpers ------------------------------------------------------------------

__device__ __forceinline__ int64_t SequenceNow(const runtime::PeerView& v) {
  return static_cast<int64_t>(
      *reinterpret_cast<volatile uint64_t*>(v.layout.sequence(v.local_base)));
}

__device__ __forceinline__ char* Half(const runtime::PeerView& v, char* base,
                                      int64_t parity) {
  return StageHalf(base, v.layout.data_bytes, parity);
}

// Copies `bytes` (a multiple of 4) from src to dst, worker `id` of `count`
// workers of `width` lanes; 16-byte accesses when both ends allow them.
__device__ __forceinline__ void CopyBytes(char* dst, const char* src,
                                          int64_t bytes, int64_t id,
                                          int64_t count) {
  const bool vec = (bytes % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(dst) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(src) % 16 == 0);
  if (vec) {
    const int64_t n = bytes / 16;
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = id; i < n; i += count * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * count < n) v[u] = s[i + u * count];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * count < n) d[i + u * count] = v[u];
      }
    }
  } else {
    const int64_t n = bytes / 4;
    const int32_t* s = reinterpret_cast<const int32_t*>(src);
    int32_t* d = reinterpret_cast<int32_t*>(dst);
    for (int64_t i = id; i < n; i += count) d[i] = s[i];
  }
}

__device__ __forceinline__ void ZeroBytes(char* dst, int64_t bytes, int64_t id,
                                          int64_t count) {
  if (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = id; i < bytes / 16; i += count) d[i] = make_int4(0, 0, 0, 0);
  } else {
    int32_t* d = reinterpret_cast<int32_t*>(dst);
    for (int64_t i = id; i < bytes / 4; i += count) d[i] = 0;
  }
}

// --- Barrier ------------------------------------------------------------------

__global__ void __launch_bounds__(runtime::kMaxPeerRanks)
    Barrier(runtime::PeerView v, int num_ranks, int64_t timeout_ns,
            bool combine) {
  __shared__ uint64_t sequence;
  const runtime::BufferLayout& layout = v.layout;
  char* const local = v.local_base;
  if (threadIdx.x == 0) {
    uint64_t* counter = layout.sequence(local);
    sequence = *counter + 1;
    *counter = sequence;
  }
  __syncthreads();
  __threadfence_system();
  if (threadIdx.x < num_ranks) {
    char* const* peer_bases = layout.peer_bases(local);
    sync::st_release_sys_global(layout.flags(peer_bases[threadIdx.x]) + v.rank,
                                sequence);
    const sync::WaitSite site{
        combine ? "intranode_combine" : "intranode_dispatch",
        "wait for the peers' staged data",
                              v.rank, static_cast<int>(threadIdx.x)};
    sync::wait_at_least_acquire_sys(layout.flags(local) + threadIdx.x,
                                    sequence, timeout_ns, site);
  }
}

// --- Dispatch -----------------------------------------------------------------

struct DispatchParams {
  runtime::PeerView buffers;
  DispatchStage stage;
  const char* rows[2];
  const int32_t* topk_idx;
  const float* topk_weights;
  int num_tokens, num_topk, num_ranks, num_local_experts, capacity;
  int expert_alignment;
  char* recv_rows[2];
  int32_t* recv_topk_idx;
  float* recv_topk_weights;
  int32_t* num_recv_per_expert;
  int32_t* src_index;
  int32_t* recv_row;
  int32_t* num_recv_tokens;
};

enum class StageRole { kScan, kCopy };

// Scan block for destination `dest`: positions, tokens, counts, expert counts.
__device__ void ScanDestination(const DispatchParams& p, char* half, int dest) {
  __shared__ int expert_counts[runtime::kMaxNotifyExperts];
  __shared__ int warp_offsets[kWarps];
  __shared__ int chunk_total;
  const int num_local = p.num_local_experts;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int l = threadIdx.x; l < num_local; l += kThreads) expert_counts[l] = 0;
  __syncthreads();
  int32_t* positions = p.stage.positions(half) + int64_t{dest} * p.num_tokens;
  int32_t* tokens = p.stage.tokens(half) + int64_t{dest} * p.num_tokens;
  int running = 0;
  for (int base = 0; base < p.num_tokens; base += kThreads) {
    const int t = base + threadIdx.x;
    bool selected = false;
    if (t < p.num_tokens) {
      for (int k = 0; k < p.num_topk; ++k) {
        const int local =
            p.topk_idx[int64_t{t} * p.num_topk + k] - dest * num_local;
        if (local >= 0 && local < num_local) {
          selected = true;
          atomicAdd(&expert_counts[local], 1);
        }
      }
    }
    const unsigned mask = __ballot_sync(0xffffffffu, selected);
    const int before_in_warp = __popc(mask & ((1u << lane) - 1u));
    if (lane == 0) warp_offsets[warp] = __popc(mask);
    __syncthreads();
    if (warp == 0) {
      const int own = warp_offsets[lane];
      int inclusive = own;
#pragma unroll
      for (int shift = 1; shift < 32; shift *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, shift);
        if (lane >= shift) inclusive += other;
      }
      warp_offsets[lane] = inclusive - own;
      if (lane == 31) chunk_total = inclusive;
    }
    __syncthreads();
    const int position = running + warp_offsets[warp] + before_in_warp;
    if (t < p.num_tokens) {
      positions[t] = selected ? position : -1;
      if (selected) tokens[position] = t;
    }
    running += chunk_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.stage.counts(half)[dest] = running;
  int32_t* out = p.stage.expert_counts(half) + dest * num_local;
  for (int l = threadIdx.x; l < num_local; l += kThreads) out[l] = expert_counts[l];
}

// Copy blocks: the rows, topk_idx and topk_weights into the half.
__device__ void CopyInputs(const DispatchParams& p, char* half, int block,
                           int num_blocks) {
  const int64_t id = int64_t{block} * kThreads + threadIdx.x;
  const int64_t count = int64_t{num_blocks} * kThreads;
  const int64_t topk_bytes = int64_t{p.num_tokens} * p.num_topk * 4;
  CopyBytes(reinterpret_cast<char*>(p.stage.topk_idx(half)),
            reinterpret_cast<const char*>(p.topk_idx), topk_bytes, id, count);
  CopyBytes(reinterpret_cast<char*>(p.stage.topk_weights(half)),
            reinterpret_cast<const char*>(p.topk_weights), topk_bytes, id,
            count);
  for (int i = 0; i < 2; ++i) {
    CopyBytes(p.stage.rows(half, i), p.rows[i],
              int64_t{p.num_tokens} * p.stage.row_bytes[i], id, count);
  }
}

__global__ void __launch_bounds__(kThreads) StageDispatch(DispatchParams p) {
  const auto role = [&] {
    return blockIdx.x < static_cast<unsigned>(p.num_ranks) ? StageRole::kScan
                                                            : StageRole::kCopy;
  }();
  char* half = Half(p.buffers, p.buffers.local_base,
                    (SequenceNow(p.buffers) + 1) & 1);
  switch (role) {
    case StageRole::kScan:
      ScanDestination(p, half, blockIdx.x);
      break;
    case StageRole::kCopy:
      CopyInputs(p, half, blockIdx.x - p.num_ranks, gridDim.x - p.num_ranks);
      break;
  }
}

// One received row j (a warp): routing, weights and the row itself.
__device__ void ReceiveRow(const DispatchParams& p, char* const* peer_bases,
                           int64_t parity, const int* offsets, int j) {
  const int lane = threadIdx.x % 32;
  const int rank = p.buffers.rank;
  const int num_ranks = p.num_ranks;
  const int total = offsets[num_ranks];
  const int K = p.num_topk;
  if (j >= total) {
    if (lane == 0) p.src_index[j] = num_ranks * p.num_tokens;
    if (lane < K) {
      p.recv_topk_idx[int64_t{j} * K + lane] = -1;
      p.recv_topk_weights[int64_t{j} * K + lane] = 0.0f;
    }
    for (int i = 0; i < 2; ++i) {
      const int64_t rb = p.stage.row_bytes[i];
      ZeroBytes(p.recv_rows[i] + j * rb, rb, lane, 32);
    }
    return;
  }
  int source = 0;
  while (source + 1 < num_ranks && offsets[source + 1] <= j) ++source;
  char* half = Half(p.buffers, peer_bases[source], parity);
  int token = 0;
  if (lane == 0) {
    token = p.stage.tokens(half)[int64_t{rank} * p.num_tokens + j -
                                 offsets[source]];
    p.src_index[j] = source * p.num_tokens + token;
  }
  token = __shfl_sync(0xffffffffu, token, 0);
  if (lane < K) {
    const int64_t at = int64_t{token} * K + lane;
    const int num_local = p.num_local_experts;
    int local = p.stage.topk_idx(half)[at] - rank * num_local;
    local = (local >= 0 && local < num_local) ? local : -1;
    p.recv_topk_idx[int64_t{j} * K + lane] = local;
    p.recv_topk_weights[int64_t{j} * K + lane] =
        local >= 0 ? p.stage.topk_weights(half)[at] : 0.0f;
  }
  for (int i = 0; i < 2; ++i) {
    const int64_t rb = p.stage.row_bytes[i];
    CopyBytes(p.recv_rows[i] + j * rb, p.stage.rows(half, i) + token * rb, rb,
              lane, 32);
  }
}

__global__ void __launch_bounds__(kThreads) ReceiveDispatch(DispatchParams p) {
  __shared__ int offsets[runtime::kMaxPeerRanks + 1];
  __shared__ int counts[runtime::kMaxPeerRanks];
  const int rank = p.buffers.rank;
  const int num_ranks = p.num_ranks;
  const int64_t parity = SequenceNow(p.buffers) & 1;
  char* const* peer_bases =
      p.buffers.layout.peer_bases(p.buffers.local_base);
  if (threadIdx.x < num_ranks) {
    char* half = Half(p.buffers, peer_bases[threadIdx.x], parity);
    counts[threadIdx.x] = p.stage.counts(half)[rank];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int s = 0; s < num_ranks; ++s) {
      offsets[s] = sum;
      sum += counts[s];
    }
    offsets[num_ranks] = sum;
  }
  __syncthreads();

  // Rows: a warp each.
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int j = warp; j < p.capacity; j += num_warps) {
    ReceiveRow(p, peer_bases, parity, offsets, j);
  }

  // recv_row[s, t].
  const int64_t id = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  const int64_t count = int64_t{gridDim.x} * kThreads;
  for (int64_t i = id; i < int64_t{num_ranks} * p.num_tokens; i += count) {
    const int source = static_cast<int>(i / p.num_tokens);
    const int64_t t = i % p.num_tokens;
    char* half = Half(p.buffers, peer_bases[source], parity);
    const int position =
        p.stage.positions(half)[int64_t{rank} * p.num_tokens + t];
    const int64_t row = position >= 0 ? int64_t{offsets[source]} + position
                                      : int64_t{p.capacity};
    p.recv_row[i] = static_cast<int32_t>(row < p.capacity ? row : p.capacity);
  }

  // Counts.
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) *p.num_recv_tokens = offsets[num_ranks];
    const int num_local = p.num_local_experts;
    for (int l = threadIdx.x; l < num_local; l += kThreads) {
      int64_t sum = 0;
      for (int s = 0; s < num_ranks; ++s) {
        char* half = Half(p.buffers, peer_bases[s], parity);
        sum += p.stage.expert_counts(half)[rank * num_local + l];
      }
      const int64_t align = p.expert_alignment;
      p.num_recv_per_expert[l] =
          static_cast<int32_t>((sum + align - 1) / align * align);
    }
  }
}

// --- Combine ------------------------------------------------------------------

struct CombineParams {
  runtime::PeerView buffers;
  CombineStage stage;
  const char* y;
  const int32_t* recv_row;
  const int32_t* num_recv_tokens;
  const float* bias;
  int num_tokens, num_channels, num_ranks, capacity;
  char* out;
};

__global__ void __launch_bounds__(kThreads) StageCombine(CombineParams p) {
  char* half = Half(p.buffers, p.buffers.local_base,
                    (SequenceNow(p.buffers) + 1) & 1);
  const int64_t id = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  const int64_t count = int64_t{gridDim.x} * kThreads;
  const int64_t rows = min(int64_t{*p.num_recv_tokens}, int64_t{p.capacity});
  CopyBytes(reinterpret_cast<char*>(p.stage.recv_row(half)),
            reinterpret_cast<const char*>(p.recv_row),
            int64_t{p.num_ranks} * p.num_tokens * 4, id, count);
  CopyBytes(p.stage.rows(half), p.y, max(rows, int64_t{0}) * p.stage.row_bytes,
            id, count);
}

// V elements of type In at `src` as floats (exact: bf16 -> f32 is a shift).
template <typename In, int V>
__device__ __forceinline__ void LoadFloats(const char* src, float* out) {
  if constexpr (sizeof(In) == 2 && V == 8) {
    const int4 raw = *reinterpret_cast<const int4*>(src);
    const uint32_t words[4] = {static_cast<uint32_t>(raw.x),
                               static_cast<uint32_t>(raw.y),
                               static_cast<uint32_t>(raw.z),
                               static_cast<uint32_t>(raw.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  } else if constexpr (sizeof(In) == 2) {
    static_assert(V == 1);
    out[0] = __uint_as_float(
        static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(src)) << 16);
  } else if constexpr (V == 4) {
    const float4 raw = *reinterpret_cast<const float4*>(src);
    out[0] = raw.x;
    out[1] = raw.y;
    out[2] = raw.z;
    out[3] = raw.w;
  } else {
    static_assert(V == 1);
    out[0] = *reinterpret_cast<const float*>(src);
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float FromFloat(float v) {
  return v;
}

// Sums `V` consecutive elements starting at element `c` of token t's rows.
template <typename In, typename Out, int V>
__device__ __forceinline__ void ReduceChunk(const CombineParams& p,
                                            char* const* halves,
                                            const int* rows, int64_t t,
                                            int64_t c) {
  float total[V];
#pragma unroll
  for (int i = 0; i < V; ++i) total[i] = 0.0f;
  for (int r = 0; r < p.num_ranks; ++r) {
    float v[V];
    if (rows[r] < p.capacity) {
      LoadFloats<In, V>(p.stage.rows(halves[r]) +
                            int64_t{rows[r]} * p.stage.row_bytes +
                            c * int64_t{sizeof(In)},
                        v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = 0.0f;
    }
    // The reference: total = v_0, then total = total + v_r.
#pragma unroll
    for (int i = 0; i < V; ++i) {
      total[i] = r == 0 ? v[i] : __fadd_rn(total[i], v[i]);
    }
  }
  if (p.bias != nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      total[i] = __fadd_rn(total[i], p.bias[t * p.num_channels + c + i]);
    }
  }
  Out* dst = reinterpret_cast<Out*>(p.out) + t * p.num_channels + c;
#pragma unroll
  for (int i = 0; i < V; ++i) dst[i] = FromFloat<Out>(total[i]);
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) ReduceCombine(CombineParams p) {
  __shared__ char* halves[runtime::kMaxPeerRanks];
  __shared__ int rows[kWarps][runtime::kMaxPeerRanks];
  const int lane = threadIdx.x % 32, warp_in_block = threadIdx.x / 32;
  const int64_t parity = SequenceNow(p.buffers) & 1;
  char* const* peer_bases = p.buffers.layout.peer_bases(p.buffers.local_base);
  if (threadIdx.x < p.num_ranks) {
    halves[threadIdx.x] = Half(p.buffers, peer_bases[threadIdx.x], parity);
  }
  __syncthreads();
  constexpr int V = 16 / sizeof(In);
  const bool vectorized = p.stage.row_bytes % 16 == 0;
  const int warp = blockIdx.x * kWarps + warp_in_block;
  const int num_warps = gridDim.x * kWarps;
  int* my_rows = rows[warp_in_block];
  for (int t = warp; t < p.num_tokens; t += num_warps) {
    for (int r = lane; r < p.num_ranks; r += 32) {
      my_rows[r] = p.stage.recv_row(halves[r])[int64_t{p.buffers.rank} *
                                                   p.num_tokens + t];
    }
    __syncwarp();
    if (vectorized) {
      for (int64_t c = int64_t{lane} * V; c < p.num_channels; c += 32 * V) {
        ReduceChunk<In, Out, V>(p, halves, my_rows, t, c);
      }
    } else {
      for (int64_t c = lane; c < p.num_channels; c += 32) {
        ReduceChunk<In, Out, 1>(p, halves, my_rows, t, c);
      }
    }
    __syncwarp();
  }
}

// --- Host ---------------------------------------------------------------------

Status Fail(const char* op, const std::string& what) {
  return Status::InvalidArgument(std::string("intranode ") + op + ": " + what);
}

Status CheckRanksAndTimeout(const char* op, const runtime::PeerView& buffers,
                            int64_t num_ranks, int64_t timeout_ns,
                            int64_t num_sms) {
  if (num_ranks != buffers.layout.num_ranks) {
    return Fail(op, "num_ranks is " + std::to_string(num_ranks) +
                        " but this device's peer buffers were created for " +
                        std::to_string(buffers.layout.num_ranks) + " ranks");
  }
  if (timeout_ns <= 0) {
    return Fail(op, "timeout_ns must be > 0, got " + std::to_string(timeout_ns));
  }
  if (num_sms < 1 || num_sms > 1024) {
    return Fail(op, "num_sms must be in [1, 1024], got " +
                        std::to_string(num_sms));
  }
  return Status();
}

Status CheckFits(const char* op, const runtime::PeerView& buffers,
                 int64_t stage_bytes) {
  const int64_t half = StageHalfBytes(buffers.layout.data_bytes);
  if (stage_bytes > half) {
    return Fail(op, "the peer buffers' data region (" +
                        std::to_string(buffers.layout.data_bytes) +
                        " bytes) is too small: this call stages " +
                        std::to_string(stage_bytes) +
                        " bytes in each of its two halves; create the "
                        "buffers with intranode_buffer_bytes(...) bytes");
  }
  return Status();
}

}  // namespace

Status LaunchDispatch(const runtime::PeerView& buffers, const DispatchArgs& a,
                      cudaStream_t stream) {
  const char* op = "dispatch";
  if (Status s = CheckRanksAndTimeout(op, buffers, a.num_ranks, a.timeout_ns,
                                      a.num_sms);
      !s.ok()) {
    return s;
  }
  if (a.num_experts < 1 || a.num_experts > runtime::kMaxNotifyExperts ||
      a.num_experts % a.num_ranks != 0) {
    return Fail(op, "num_experts must be a multiple of num_ranks in [1, " +
                        std::to_string(runtime::kMaxNotifyExperts) + "], got " +
                        std::to_string(a.num_experts));
  }
  if (a.num_tokens < 1 || a.num_tokens >= (int64_t{1} << 31) / a.num_ranks ||
      a.num_topk < 1 || a.num_topk > kMaxTopk || a.capacity < 1 ||
      a.capacity >= (int64_t{1} << 31) || a.expert_alignment < 1) {
    return Fail(op, "need 1 <= T < 2^31 / R, 1 <= K <= 32, 1 <= capacity < "
                    "2^31 and expert_alignment >= 1, got T=" +
                        std::to_string(a.num_tokens) + ", K=" +
                        std::to_string(a.num_topk) + ", capacity=" +
                        std::to_string(a.capacity));
  }
  for (int i = 0; i < 2; ++i) {
    if (a.row_bytes[i] < 0 || a.row_bytes[i] % 4 != 0) {
      return Fail(op, "row bytes must be a multiple of 4, got " +
                          std::to_string(a.row_bytes[i]));
    }
  }
  const DispatchStage stage{a.num_tokens, a.num_ranks, a.num_topk,
                            {a.row_bytes[0], a.row_bytes[1]}};
  if (Status s = CheckFits(op, buffers, stage.bytes()); !s.ok()) return s;
  DispatchParams p{buffers, stage};
  for (int i = 0; i < 2; ++i) {
    p.rows[i] = static_cast<const char*>(a.rows[i]);
    p.recv_rows[i] = static_cast<char*>(a.recv_rows[i]);
  }
  p.topk_idx = a.topk_idx;
  p.topk_weights = a.topk_weights;
  p.num_tokens = static_cast<int>(a.num_tokens);
  p.num_topk = static_cast<int>(a.num_topk);
  p.num_ranks = static_cast<int>(a.num_ranks);
  p.num_local_experts = static_cast<int>(a.num_experts / a.num_ranks);
  p.capacity = static_cast<int>(a.capacity);
  p.expert_alignment = static_cast<int>(std::min<int64_t>(a.expert_alignment,
                                                          1 << 30));
  p.recv_topk_idx = a.recv_topk_idx;
  p.recv_topk_weights = a.recv_topk_weights;
  p.num_recv_per_expert = a.num_recv_per_expert;
  p.src_index = a.src_index;
  p.recv_row = a.recv_row;
  p.num_recv_tokens = a.num_recv_tokens;
  const int blocks = static_cast<int>(a.num_sms);
  StageDispatch<<<p.num_ranks + blocks, kThreads, 0, stream>>>(p);
  if (Status s = Status::FromCuda(cudaGetLastError(), "StageDispatch launch");
      !s.ok()) {
    return s;
  }
  Barrier<<<1, runtime::kMaxPeerRanks, 0, stream>>>(
      buffers, p.num_ranks, a.timeout_ns, /*combine=*/false);
  if (Status s = Status::FromCuda(cudaGetLastError(), "Barrier launch");
      !s.ok()) {
    return s;
  }
  ReceiveDispatch<<<blocks, kThreads, 0, stream>>>(p);
  return Status::FromCuda(cudaGetLastError(), "ReceiveDispatch launch");
}

Status LaunchCombine(const runtime::PeerView& buffers, const CombineArgs& a,
                     cudaStream_t stream) {
  const char* op = "combine";
  if (Status s = CheckRanksAndTimeout(op, buffers, a.num_ranks, a.timeout_ns,
                                      a.num_sms);
      !s.ok()) {
    return s;
  }
  if (a.num_tokens < 1 || a.num_tokens >= (int64_t{1} << 31) / a.num_ranks ||
      a.capacity < 1 || a.capacity >= (int64_t{1} << 31) ||
      a.num_channels < 1) {
    return Fail(op, "need 1 <= T < 2^31 / R, 1 <= capacity < 2^31 and C >= 1");
  }
  const int64_t element = a.y_type == ElementType::kBF16 ? 2 : 4;
  if (a.out_type != ElementType::kF32 && a.out_type != a.y_type) {
    return Fail(op, "the output must be f32 or y's type");
  }
  const CombineStage stage{a.num_tokens, a.num_ranks, a.capacity,
                           a.num_channels * element};
  if (stage.row_bytes % 4 != 0) {
    return Fail(op, "y's rows must be a multiple of 4 bytes");
  }
  if (Status s = CheckFits(op, buffers, stage.bytes()); !s.ok()) return s;
  CombineParams p{buffers, stage};
  p.y = static_cast<const char*>(a.y);
  p.recv_row = a.recv_row;
  p.num_recv_tokens = a.num_recv_tokens;
  p.bias = a.bias;
  p.num_tokens = static_cast<int>(a.num_tokens);
  p.num_channels = static_cast<int>(a.num_channels);
  p.num_ranks = static_cast<int>(a.num_ranks);
  p.capacity = static_cast<int>(a.capacity);
  p.out = static_cast<char*>(a.out);
  const int blocks = static_cast<int>(a.num_sms);
  StageCombine<<<blocks, kThreads, 0, stream>>>(p);
  if (Status s = Status::FromCuda(cudaGetLastError(), "StageCombine launch");
      !s.ok()) {
    return s;
  }
  Barrier<<<1, runtime::kMaxPeerRanks, 0, stream>>>(
      buffers, p.num_ranks, a.timeout_ns, /*combine=*/true);
  if (Status s = Status::FromCuda(cudaGetLastError(), "Barrier launch");
      !s.ok()) {
    return s;
  }
  if (a.y_type == ElementType::kBF16 && a.out_type == ElementType::kF32) {
    ReduceCombine<__nv_bfloat16, float><<<blocks, kThreads, 0, stream>>>(p);
  } else if (a.y_type == ElementType::kBF16) {
    ReduceCombine<__nv_bfloat16, __nv_bfloat16>
        <<<blocks, kThreads, 0, stream>>>(p);
  } else {
    ReduceCombine<float, float><<<blocks, kThreads, 0, stream>>>(p);
  }
  return Status::FromCuda(cudaGetLastError(), "ReduceCombine launch");
}

}  // namespace jax_ep::intranode
