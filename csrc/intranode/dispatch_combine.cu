// Intranode normal dispatch, cached dispatch and combine over NVLink peer
// buffers, by "push": a rank writes the rows a peer needs straight from its
// input into that peer's data region, and the peer copies (dispatch) or sums
// (combine) them into XLA's output while the rest is still arriving. Rows
// that stay on a rank never touch the peer buffers. docs/contract.md gives the
// results, bit for bit (the pure-JAX reference is the oracle).
//
// Kernels per call, in stream order on each rank (R ranks, T tokens):
//   dispatch:         StageDispatch -> Barrier -> DispatchKernel
//   cached dispatch:  StageCached   -> Barrier -> CachedDispatchKernel
//   combine:                           Barrier -> CombineKernel
//
// Call sequence. All intranode calls of a device (notify and these) share
// its call counter and flags (BufferLayout's control region): the Barrier
// kernel does seq = ++*sequence; every rank makes the same sequence of
// calls, so seq names the same call everywhere. Barrier: thread d releases
// flags[me] = seq in peer d (after __threadfence_system), then waits with
// acquire until its own flags[d] >= seq (sync::wait_at_least_acquire_sys:
// reports rank, phase and peer, then traps after the timeout).
//
// Data region (CallLayout): a scratch array, then one slot per other rank,
// indexed by token. The main kernels write peers' slots and read their own
// only after the call's barrier, and a rank leaves the main kernel only
// after every chunk of every peer arrived. So when rank s passes the barrier
// of call seq + 1, every peer has finished reading its slots (and, for a
// cached dispatch, s has finished reading its peers' scratch) of call seq:
// one copy of the region suffices. Arrival flags hold seq, and flags only
// grow, so no flag needs resetting.
//
// Fresh dispatch. StageDispatch: block d finds the tokens that select an
// expert of rank d (any k with topk_idx[t,k] - d*L in [0, L), L = E/R: the
// reference's test), writes positions[d, t] (rank of t among them, or -1)
// into the scratch, then its count into every peer's count slot and its
// per-expert counts into d's (the notify slots, parity of the coming seq;
// notify.cu argues why two parities suffice). After the barrier each rank
// knows the whole count matrix, hence where every source's rows start in
// every destination's output: rows ordered by source, then token.
// Two ways move the rows and routing into a destination's slot:
//   copy engines (Tuning::copy_engine): a side stream forked off XLA's after
//     the barrier copies ALL T rows, the routing (positions[d], topk_idx,
//     weights) and, piece by piece, releases the arrival flags of the
//     piece's chunks with a one-block kernel (ForkCopies); XLA's stream
//     waits for it after the main kernel. No warp pushes.
//   pushing warps: each block has `send_warps` pushing warps; a pushing warp
//     takes (chunk, destination) items: it writes the chunk's positions,
//     and for each token kept at the destination the row, expert ids and
//     weights, then releases the chunk's arrival flag (__syncwarp,
//     __threadfence_system, st.release.sys).
// DispatchKernel's receiving warps first fill the padding rows
// [min(total, M), M), then take chunks: their own (copied from x directly),
// then the peers' in chunk order, each after an acquire wait on the chunk's
// flag; they write recv_row[s, t] (off[s] + position, or M), src_index, the
// expert ids made local, the weights and the row. Nothing that pushes ever
// waits, so with all blocks resident no rank can block another's progress.
//
// Cached dispatch (the backward of combine) replays a handle. With the copy
// engines every row goes to every peer as above. With pushing warps,
// StageCached first copies the handle's recv_row into the scratch; after
// the barrier a pusher reads its destination's staged recv_row[me, t] and
// sends the kept rows. Receivers place them (and their own) at
// recv_row[s, t].
//
// Combine. A pushing warp on rank r sends, for each owner s and chunk, the
// rows y[recv_row[s, t]] into s's slot at t and row_of[t] = recv_row[s, t];
// a receiving warp on s waits for the chunk from every peer, then sums for
// each token, in fp32 and rank order, the R contributions (its own from y,
// +0.0 where the row is M): total = v_0, total = total + v_r, then adds the
// bias (f32) and rounds once to the output type, exactly as the reference.

#include <string>

#include <cuda_bf16.h>

#include "intranode/dispatch_combine.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::intranode {
namespace {

// 512 threads leave 128 registers per thread: the copy loops keep 8 16-byte
// loads in flight without spilling.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTopk = 32;
constexpr int kUnroll = 8;  // 16-byte loads in flight per lane
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(runtime::kMaxPeerRanks <= kThreads, "a thread per rank");

enum class Op { kDispatch, kCachedDispatch, kCombine };

__device__ const char* OpName(Op op) {
  switch (op) {
    case Op::kDispatch:
      return "intranode_dispatch";
    case Op::kCachedDispatch:
      return "intranode_cached_dispatch";
    default:
      return "intranode_combine";
  }
}

// --- Helpers ------------------------------------------------------------------

__device__ __forceinline__ int Lane() { return threadIdx.x % 32; }

__device__ __forceinline__ uint64_t SequenceNow(const runtime::PeerView& v) {
  return *reinterpret_cast<volatile uint64_t*>(v.layout.sequence(v.local_base));
}

// The q-th rank other than `me` (the inverse of PeerSlot).
__host__ __device__ __forceinline__ int OtherRank(int q, int me) {
  return q < me ? q : q + 1;
}

__device__ __forceinline__ bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Copies one row of `bytes` (a multiple of 4) with the 32 lanes of a warp;
// 16-byte accesses when both ends allow them. Loads skip L1 (.cg): the
// source may have been written by a peer during this kernel.
__device__ __forceinline__ void CopyRow(char* dst, const char* src,
                                        int64_t bytes) {
  const int lane = Lane();
  if (bytes % 16 == 0 && Aligned16(dst) && Aligned16(src)) {
    const int n = static_cast<int>(bytes / 16);
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int i = lane; i < n; i += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * 32 < n) v[u] = __ldcg(s + i + u * 32);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * 32 < n) d[i + u * 32] = v[u];
      }
    }
  } else {
    const int n = static_cast<int>(bytes / 4);
    const int32_t* s = reinterpret_cast<const int32_t*>(src);
    int32_t* d = reinterpret_cast<int32_t*>(dst);
    for (int i = lane; i < n; i += 32) d[i] = __ldcg(s + i);
  }
}

__device__ __forceinline__ void ZeroRow(char* dst, int64_t bytes) {
  if (bytes % 16 == 0 && Aligned16(dst)) {
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = Lane(); i < bytes / 16; i += 32) d[i] = make_int4(0, 0, 0, 0);
  } else {
    int32_t* d = reinterpret_cast<int32_t*>(dst);
    for (int64_t i = Lane(); i < bytes / 4; i += 32) d[i] = 0;
  }
}

// What every main kernel needs: the buffers, the call's layout and sizes,
// and how its work is cut.
struct Common {
  runtime::PeerView buffers;
  CallLayout call;
  int num_tokens, num_ranks, capacity;
  int send_warps, chunk_tokens, num_chunks;
  int64_t timeout_ns;
};

// A warp either pushes to peers or receives; `id` of `count` in its role.
struct WarpRole {
  bool sends;
  int id;
  int count;
};
__device__ __forceinline__ WarpRole Role(const Common& c) {
  const int warp = threadIdx.x / 32;
  const bool sends = warp < c.send_warps;
  const int per_block = sends ? c.send_warps : kWarps - c.send_warps;
  return {sends,
          static_cast<int>(blockIdx.x) * per_block +
              (sends ? warp : warp - c.send_warps),
          static_cast<int>(gridDim.x) * per_block};
}

// Tokens [*t0, *t1) of chunk `chunk`.
__device__ __forceinline__ void ChunkTokens(const Common& c, int chunk,
                                            int* t0, int* t1) {
  *t0 = chunk * c.chunk_tokens;
  *t1 = min(c.num_tokens, *t0 + c.chunk_tokens);
}

// Walks tokens [t0, t1) with a warp: lane i evaluates row_of(t) for the i-th
// token of each group of 32 (so the loads run in parallel), group(base, n,
// mine) sees the whole group (lane u's row in `mine`), then body(t, row)
// runs for each token in order with the whole warp (row is warp-uniform).
template <typename RowOf, typename Group, typename Body>
__device__ __forceinline__ void ForEachToken(int t0, int t1, RowOf row_of,
                                             Group group, Body body) {
  for (int base = t0; base < t1; base += 32) {
    const int t = base + Lane();
    const int mine = t < t1 ? row_of(t) : 0;
    const int n = min(32, t1 - base);
    group(base, n, mine);
    for (int u = 0; u < n; ++u) body(base + u, __shfl_sync(kFullMask, mine, u));
  }
}
template <typename RowOf, typename Body>
__device__ __forceinline__ void ForEachToken(int t0, int t1, RowOf row_of,
                                             Body body) {
  ForEachToken(t0, t1, row_of, [](int, int, int) {}, body);
}

// Moves the top-k entries of a group of n tokens (from ForEachToken: token
// base + u has row `mine` of lane u; rows equal to `skip` move nothing):
// lane j of a pass takes entry j % K of token j / K, and a pass issues all
// its loads before its stores, so the warp waits for memory once per group,
// not once per token. load(t, k, &id, &weight); store(t, row, k, id, weight).
template <typename Load, typename Store>
__device__ __forceinline__ void MoveTopk(int base, int n, int mine, int K,
                                         int skip, Load load, Store store) {
  constexpr int kBatch = 4;
  const int total = n * K;
  for (int j0 = 0; j0 < total; j0 += 32 * kBatch) {
    int32_t ids[kBatch];
    float weights[kBatch];
    int rows[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int j = j0 + b * 32 + Lane();
      rows[b] = __shfl_sync(kFullMask, mine, min(j / K, n - 1));
      if (j < total && rows[b] != skip) {
        load(base + j / K, j % K, &ids[b], &weights[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int j = j0 + b * 32 + Lane();
      if (j < total && rows[b] != skip) {
        store(base + j / K, rows[b], j % K, ids[b], weights[b]);
      }
    }
  }
}

__device__ __forceinline__ uint64_t* Arrival(const Common& c, char* base,
                                             int source, int chunk) {
  return c.buffers.layout.arrivals(base) + int64_t{source} * runtime::kMaxChunks +
         chunk;
}

// Publishes a chunk the warp wrote into a peer: __syncwarp orders the other
// lanes' stores before lane 0's fence and release.
__device__ __forceinline__ void ReleaseChunk(uint64_t* flag, uint64_t seq) {
  __syncwarp();
  if (Lane() == 0) {
    __threadfence_system();
    sync::st_release_sys_global(flag, seq);
  }
}

__device__ __forceinline__ void WaitChunk(const Common& c, Op op, int source,
                                          int chunk, uint64_t seq) {
  if (Lane() == 0) {
    const sync::WaitSite site{OpName(op), "wait for a peer's rows",
                              c.buffers.rank, source};
    sync::wait_at_least_acquire_sys(Arrival(c, c.buffers.local_base, source,
                                            chunk),
                                    seq, c.timeout_ns, site);
  }
  __syncwarp();
}

// --- Barrier ------------------------------------------------------------------

__global__ void __launch_bounds__(runtime::kMaxPeerRanks)
    Barrier(runtime::PeerView v, int num_ranks, int64_t timeout_ns, Op op) {
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
    const sync::WaitSite site{OpName(op), "wait for the peers to start the call",
                              v.rank, static_cast<int>(threadIdx.x)};
    sync::wait_at_least_acquire_sys(layout.flags(local) + threadIdx.x,
                                    sequence, timeout_ns, site);
  }
}

// --- Fresh dispatch -----------------------------------------------------------

struct DispatchParams {
  Common c;
  const char* rows[2];
  int64_t row_bytes[2];
  const int32_t* topk_idx;
  const float* topk_weights;
  int num_topk, num_local_experts, expert_alignment;
  char* recv_rows[2];
  int32_t* recv_topk_idx;
  float* recv_topk_weights;
  int32_t* num_recv_per_expert;
  int32_t* src_index;
  int32_t* recv_row;
  int32_t* num_recv_tokens;
};

// Block d: positions[d, t] into the scratch; d's count into every peer's
// count slot and the counts of d's experts into d's.
__global__ void __launch_bounds__(kThreads) StageDispatch(DispatchParams p) {
  __shared__ int expert_counts[runtime::kMaxNotifyExperts];
  __shared__ int warp_offsets[kWarps];
  __shared__ int chunk_total;
  const Common& c = p.c;
  const int dest = blockIdx.x;
  const int num_local = p.num_local_experts;
  const int lane = Lane(), warp = threadIdx.x / 32;
  for (int l = threadIdx.x; l < num_local; l += kThreads) expert_counts[l] = 0;
  __syncthreads();
  int32_t* positions =
      c.call.scratch(c.buffers.local_base) + int64_t{dest} * c.num_tokens;
  int running = 0;
  for (int base = 0; base < c.num_tokens; base += kThreads) {
    const int t = base + threadIdx.x;
    bool selected = false;
    if (t < c.num_tokens) {
      for (int k = 0; k < p.num_topk; ++k) {
        const int local =
            p.topk_idx[int64_t{t} * p.num_topk + k] - dest * num_local;
        if (local >= 0 && local < num_local) {
          selected = true;
          atomicAdd(&expert_counts[local], 1);
        }
      }
    }
    const unsigned mask = __ballot_sync(kFullMask, selected);
    const int before_in_warp = __popc(mask & ((1u << lane) - 1u));
    if (lane == 0) warp_offsets[warp] = __popc(mask);
    __syncthreads();
    if (warp == 0) {
      const int own = lane < kWarps ? warp_offsets[lane] : 0;
      int inclusive = own;
#pragma unroll
      for (int shift = 1; shift < 32; shift *= 2) {
        const int other = __shfl_up_sync(kFullMask, inclusive, shift);
        if (lane >= shift) inclusive += other;
      }
      if (lane < kWarps) warp_offsets[lane] = inclusive - own;
      if (lane == 31) chunk_total = inclusive;
    }
    __syncthreads();
    if (t < c.num_tokens) {
      positions[t] = selected ? running + warp_offsets[warp] + before_in_warp
                              : -1;
    }
    running += chunk_total;
    __syncthreads();
  }
  const runtime::BufferLayout& layout = c.buffers.layout;
  char* const* peer_bases = layout.peer_bases(c.buffers.local_base);
  const int64_t parity = (SequenceNow(c.buffers) + 1) & 1;
  const int me = c.buffers.rank;
  if (threadIdx.x < c.num_ranks) {
    layout.slot(peer_bases[threadIdx.x], parity, me)[dest] = running;
  }
  int32_t* out = layout.slot(peer_bases[dest], parity, me) + c.num_ranks;
  for (int l = threadIdx.x; l < num_local; l += kThreads) out[l] = expert_counts[l];
}

// Entry k of row `row` of recv_topk_idx / recv_topk_weights: expert id `id`
// made local to this rank (else -1) and its weight (0 where not local).
__device__ __forceinline__ void StoreLocalTopk(const DispatchParams& p, int row,
                                               int k, int id, float weight) {
  const int num_local = p.num_local_experts;
  int local = id - p.c.buffers.rank * num_local;
  local = (local >= 0 && local < num_local) ? local : -1;
  const int64_t at = int64_t{row} * p.num_topk + k;
  p.recv_topk_idx[at] = local;
  p.recv_topk_weights[at] = local >= 0 ? weight : 0.0f;
}

// MoveTopk's load from [T, K] arrays `idx` and `weights`.
__device__ __forceinline__ auto LoadTopk(const int32_t* idx,
                                         const float* weights, int K) {
  return [=](int t, int k, int32_t* id, float* weight) {
    const int64_t at = int64_t{t} * K + k;
    *id = __ldcg(idx + at);
    *weight = __ldcg(weights + at);
  };
}

// The row at the destination of a token at `position` among the tokens this
// source sends there (-1: none), the source's rows starting at `offset`: M
// when the token is not sent or falls past the capacity.
__device__ __forceinline__ int DestinationRow(int position, int offset,
                                              int capacity) {
  return position >= 0 && int64_t{offset} + position < capacity
             ? offset + position
             : capacity;
}

__device__ void PushDispatchChunk(const DispatchParams& p, int dest, int chunk,
                                  int offset, uint64_t seq) {
  const Common& c = p.c;
  const int me = c.buffers.rank, q = PeerSlot(me, dest), K = p.num_topk;
  char* const base = c.buffers.layout.peer_bases(c.buffers.local_base)[dest];
  const int32_t* positions =
      c.call.scratch(c.buffers.local_base) + int64_t{dest} * c.num_tokens;
  int32_t* row_of = c.call.row_of(base, q);
  int t0, t1;
  ChunkTokens(c, chunk, &t0, &t1);
  ForEachToken(
      t0, t1,
      [&](int t) {
        const int position = positions[t];
        row_of[t] = position;
        return DestinationRow(position, offset, c.capacity);
      },
      [&](int group, int n, int mine) {
        MoveTopk(group, n, mine, K, c.capacity,
                 LoadTopk(p.topk_idx, p.topk_weights, K),
                 [&](int t, int, int k, int32_t id, float weight) {
                   const int64_t at = int64_t{t} * K + k;
                   c.call.topk_idx(base, q)[at] = id;
                   c.call.weights(base, q)[at] = weight;
                 });
      },
      [&](int t, int row) {
        if (row == c.capacity) return;
        for (int i = 0; i < 2; ++i) {
          const int64_t rb = p.row_bytes[i];
          CopyRow(c.call.rows(base, q, i) + t * rb, p.rows[i] + t * rb, rb);
        }
      });
  ReleaseChunk(Arrival(c, base, me, chunk), seq);
}

// Receives chunk `chunk` of rank `source`'s tokens, whose rows start at
// `offset` here: `positions` (position among the tokens source sends here,
// or -1), the routing and the rows are this rank's own inputs when source is
// this rank, else what source wrote into its slot.
__device__ void ReceiveChunk(const DispatchParams& p, int source, int chunk,
                             int offset) {
  const Common& c = p.c;
  const int me = c.buffers.rank, q = PeerSlot(source, me);
  char* const local = c.buffers.local_base;
  const bool own = source == me;
  const int32_t* positions =
      own ? c.call.scratch(local) + int64_t{me} * c.num_tokens
          : c.call.row_of(local, q);
  const int32_t* topk_idx = own ? p.topk_idx : c.call.topk_idx(local, q);
  const float* weights = own ? p.topk_weights : c.call.weights(local, q);
  int t0, t1;
  ChunkTokens(c, chunk, &t0, &t1);
  ForEachToken(
      t0, t1,
      [&](int t) {
        const int row =
            DestinationRow(__ldcg(positions + t), offset, c.capacity);
        p.recv_row[int64_t{source} * c.num_tokens + t] = row;
        if (row < c.capacity) p.src_index[row] = source * c.num_tokens + t;
        return row;
      },
      [&](int group, int n, int mine) {
        MoveTopk(group, n, mine, p.num_topk, c.capacity,
                 LoadTopk(topk_idx, weights, p.num_topk),
                 [&](int, int row, int k, int32_t id, float weight) {
                   StoreLocalTopk(p, row, k, id, weight);
                 });
      },
      [&](int t, int row) {
        if (row == c.capacity) return;
        for (int i = 0; i < 2; ++i) {
          const int64_t rb = p.row_bytes[i];
          const char* rows = own ? p.rows[i] : c.call.rows(local, q, i);
          CopyRow(p.recv_rows[i] + row * rb, rows + t * rb, rb);
        }
      });
}

__device__ void PadDispatchRow(const DispatchParams& p, int row) {
  const Common& c = p.c;
  const int lane = Lane(), K = p.num_topk;
  if (lane == 0) p.src_index[row] = c.num_ranks * c.num_tokens;
  if (lane < K) {
    p.recv_topk_idx[int64_t{row} * K + lane] = -1;
    p.recv_topk_weights[int64_t{row} * K + lane] = 0.0f;
  }
  for (int i = 0; i < 2; ++i) {
    ZeroRow(p.recv_rows[i] + row * p.row_bytes[i], p.row_bytes[i]);
  }
}

__global__ void __launch_bounds__(kThreads) DispatchKernel(DispatchParams p) {
  // offset_at[d]: where this rank's rows start at rank d; offset_from[s]:
  // where rank s's rows start here ([R]: the total received).
  __shared__ int offset_at[runtime::kMaxPeerRanks];
  __shared__ int offset_from[runtime::kMaxPeerRanks + 1];
  const Common& c = p.c;
  const runtime::BufferLayout& layout = c.buffers.layout;
  char* const local = c.buffers.local_base;
  const int me = c.buffers.rank, R = c.num_ranks, n = c.num_chunks;
  const uint64_t seq = SequenceNow(c.buffers);
  const int64_t parity = seq & 1;
  if (threadIdx.x < R) {
    const int x = threadIdx.x;  // count[s][d] = slot(parity, s)[d]
    int before = 0;
    for (int s = 0; s < me; ++s) {
      before += sync::ld_relaxed_sys_global(layout.slot(local, parity, s) + x);
    }
    offset_at[x] = before;
    offset_from[x] =
        sync::ld_relaxed_sys_global(layout.slot(local, parity, x) + me);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int s = 0; s < R; ++s) {
      const int count = offset_from[s];
      offset_from[s] = sum;
      sum += count;
    }
    offset_from[R] = sum;
  }
  __syncthreads();

  const WarpRole role = Role(c);
  if (role.sends) {
    for (int i = role.id; i < (R - 1) * n; i += role.count) {
      const int dest = OtherRank(i % (R - 1), me);
      PushDispatchChunk(p, dest, i / (R - 1), offset_at[dest], seq);
    }
    return;
  }
  const int total = offset_from[R];
  for (int row = min(total, c.capacity) + role.id; row < c.capacity;
       row += role.count) {
    PadDispatchRow(p, row);
  }
  for (int i = role.id; i < R * n; i += role.count) {
    const int source = i < n ? me : OtherRank((i - n) % (R - 1), me);
    const int chunk = i < n ? i : (i - n) / (R - 1);
    if (source != me) WaitChunk(c, Op::kDispatch, source, chunk, seq);
    ReceiveChunk(p, source, chunk, offset_from[source]);
  }
  if (role.id == 0) {
    if (Lane() == 0) *p.num_recv_tokens = total;
    for (int l = Lane(); l < p.num_local_experts; l += 32) {
      int64_t sum = 0;
      for (int s = 0; s < R; ++s) {
        sum += sync::ld_relaxed_sys_global(layout.slot(local, parity, s) + R + l);
      }
      const int64_t align = p.expert_alignment;
      p.num_recv_per_expert[l] =
          static_cast<int32_t>((sum + align - 1) / align * align);
    }
  }
}

// --- Cached dispatch ----------------------------------------------------------

struct CachedParams {
  Common c;
  const char* rows[2];
  int64_t row_bytes[2];
  const int32_t* recv_row;
  const int32_t* num_recv_tokens;
  char* recv_rows[2];
};

__global__ void __launch_bounds__(kThreads) StageCached(CachedParams p) {
  const Common& c = p.c;
  int32_t* scratch = c.call.scratch(c.buffers.local_base);
  const int64_t n = int64_t{c.num_ranks} * c.num_tokens;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kThreads) {
    scratch[i] = p.recv_row[i];
  }
}

// A handle's row, or M for anything outside [0, M): a bad handle must not
// make the kernel write out of bounds.
__device__ __forceinline__ int KeptRow(int row, int capacity) {
  return row >= 0 && row < capacity ? row : capacity;
}

__global__ void __launch_bounds__(kThreads)
    CachedDispatchKernel(CachedParams p) {
  const Common& c = p.c;
  char* const local = c.buffers.local_base;
  char* const* peer_bases = c.buffers.layout.peer_bases(local);
  const int me = c.buffers.rank, R = c.num_ranks, n = c.num_chunks,
            T = c.num_tokens, M = c.capacity;
  const uint64_t seq = SequenceNow(c.buffers);
  const WarpRole role = Role(c);
  if (role.sends) {
    for (int i = role.id; i < (R - 1) * n; i += role.count) {
      const int dest = OtherRank(i % (R - 1), me), chunk = i / (R - 1);
      const int q = PeerSlot(me, dest);
      char* const base = peer_bases[dest];
      const int32_t* staged = c.call.scratch(base) + int64_t{me} * T;
      int t0, t1;
      ChunkTokens(c, chunk, &t0, &t1);
      ForEachToken(
          t0, t1, [&](int t) { return KeptRow(__ldcg(staged + t), M); },
          [&](int t, int row) {
            if (row == M) return;
            for (int i = 0; i < 2; ++i) {
              const int64_t rb = p.row_bytes[i];
              CopyRow(c.call.rows(base, q, i) + t * rb, p.rows[i] + t * rb, rb);
            }
          });
      ReleaseChunk(Arrival(c, base, me, chunk), seq);
    }
    return;
  }
  const int kept = KeptRow(*p.num_recv_tokens, M);
  for (int row = kept + role.id; row < M; row += role.count) {
    for (int i = 0; i < 2; ++i) {
      ZeroRow(p.recv_rows[i] + row * p.row_bytes[i], p.row_bytes[i]);
    }
  }
  for (int i = role.id; i < R * n; i += role.count) {
    const int source = i < n ? me : OtherRank((i - n) % (R - 1), me);
    const int chunk = i < n ? i : (i - n) / (R - 1);
    if (source != me) WaitChunk(c, Op::kCachedDispatch, source, chunk, seq);
    const int q = PeerSlot(source, me);
    int t0, t1;
    ChunkTokens(c, chunk, &t0, &t1);
    ForEachToken(
        t0, t1,
        [&](int t) {
          return KeptRow(p.recv_row[int64_t{source} * T + t], M);
        },
        [&](int t, int row) {
          if (row == M) return;
          for (int i = 0; i < 2; ++i) {
            const int64_t rb = p.row_bytes[i];
            const char* src = source == me ? p.rows[i] + t * rb
                                           : c.call.rows(local, q, i) + t * rb;
            CopyRow(p.recv_rows[i] + row * rb, src, rb);
          }
        });
  }
}

// --- Combine ------------------------------------------------------------------

struct CombineParams {
  Common c;
  const char* y;
  int64_t row_bytes;  // of y
  const int32_t* recv_row;
  const float* bias;
  int num_channels;
  char* out;
};

// V elements of type In at `src` as floats (exact: bf16 -> f32 is a shift).
template <typename In, int V>
__device__ __forceinline__ void LoadFloats(const char* src, float* out) {
  if constexpr (sizeof(In) == 2 && V == 8) {
    const int4 raw = __ldcg(reinterpret_cast<const int4*>(src));
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
        static_cast<uint32_t>(__ldcg(reinterpret_cast<const uint16_t*>(src)))
        << 16);
  } else if constexpr (V == 4) {
    const float4 raw = __ldcg(reinterpret_cast<const float4*>(src));
    out[0] = raw.x;
    out[1] = raw.y;
    out[2] = raw.z;
    out[3] = raw.w;
  } else {
    static_assert(V == 1);
    out[0] = __ldcg(reinterpret_cast<const float*>(src));
  }
}

// Stores V floats at `dst` as Out, rounding to nearest even once.
template <typename Out, int V>
__device__ __forceinline__ void StoreFloats(char* dst, const float* v) {
  if constexpr (sizeof(Out) == 2 && V == 8) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      words[i] = *reinterpret_cast<const uint32_t*>(&pair);
    }
    *reinterpret_cast<int4*>(dst) = make_int4(words[0], words[1], words[2],
                                              words[3]);
  } else if constexpr (sizeof(Out) == 2) {
    static_assert(V == 1);
    *reinterpret_cast<__nv_bfloat16*>(dst) = __float2bfloat16_rn(v[0]);
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      reinterpret_cast<float4*>(dst)[i / 4] =
          make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  } else {
    static_assert(V == 1);
    *reinterpret_cast<float*>(dst) = v[0];
  }
}

// out[t, c .. c+V) for the U channel groups c = channel + u * stride (those
// below C): the sum over ranks, in order, of their rows (null: +0.0), plus
// the bias; one rounding. A lane keeps U loads per rank in flight.
template <typename In, typename Out, int V, int U>
__device__ __forceinline__ void ReduceElements(const CombineParams& p,
                                               const char* const* rows,
                                               int64_t t, int channel,
                                               int stride) {
  const int C = p.num_channels;
  float total[U][V];
  for (int r = 0; r < p.c.num_ranks; ++r) {
    float v[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int at = channel + u * stride;
      if (rows[r] != nullptr && at < C) {
        LoadFloats<In, V>(rows[r] + int64_t{at} * sizeof(In), v[u]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        total[u][i] = r == 0 ? v[u][i] : __fadd_rn(total[u][i], v[u][i]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int at = channel + u * stride;
    if (at >= C) break;
    const int64_t element = t * C + at;
    if (p.bias != nullptr) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        total[u][i] = __fadd_rn(total[u][i], p.bias[element + i]);
      }
    }
    StoreFloats<Out, V>(p.out + element * int64_t{sizeof(Out)}, total[u]);
  }
}

template <typename In, typename Out>
__device__ void ReduceToken(const CombineParams& p, const char* const* rows,
                            int64_t t) {
  constexpr int V = 16 / sizeof(In);
  constexpr int U = 4;
  const int C = p.num_channels, lane = Lane();
  if (p.row_bytes % 16 == 0 && Aligned16(p.out) && Aligned16(p.y)) {
    for (int channel = lane * V; channel < C; channel += 32 * V * U) {
      ReduceElements<In, Out, V, U>(p, rows, t, channel, 32 * V);
    }
  } else {
    for (int channel = lane; channel < C; channel += 32 * U) {
      ReduceElements<In, Out, 1, U>(p, rows, t, channel, 32);
    }
  }
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) CombineKernel(CombineParams p) {
  __shared__ const char* token_rows[kWarps][runtime::kMaxPeerRanks];
  const Common& c = p.c;
  char* const local = c.buffers.local_base;
  char* const* peer_bases = c.buffers.layout.peer_bases(local);
  const int me = c.buffers.rank, R = c.num_ranks, n = c.num_chunks,
            T = c.num_tokens, M = c.capacity;
  const int64_t rb = p.row_bytes;
  const uint64_t seq = SequenceNow(c.buffers);
  const WarpRole role = Role(c);
  if (role.sends) {
    for (int i = role.id; i < (R - 1) * n; i += role.count) {
      const int owner = OtherRank(i % (R - 1), me), chunk = i / (R - 1);
      const int q = PeerSlot(me, owner);
      char* const base = peer_bases[owner];
      int32_t* row_of = c.call.row_of(base, q);
      int t0, t1;
      ChunkTokens(c, chunk, &t0, &t1);
      ForEachToken(
          t0, t1,
          [&](int t) {
            const int row = KeptRow(p.recv_row[int64_t{owner} * T + t], M);
            row_of[t] = row;
            return row;
          },
          [&](int t, int row) {
            if (row == M) return;
            CopyRow(c.call.rows(base, q, 0) + t * rb, p.y + row * rb, rb);
          });
      ReleaseChunk(Arrival(c, base, me, chunk), seq);
    }
    return;
  }
  const char** rows = token_rows[threadIdx.x / 32];
  for (int chunk = role.id; chunk < n; chunk += role.count) {
    for (int s = 0; s < R; ++s) {
      if (s != me) WaitChunk(c, Op::kCombine, s, chunk, seq);
    }
    int t0, t1;
    ChunkTokens(c, chunk, &t0, &t1);
    // The rows of `group` tokens at a time, one (token, rank) per lane, so
    // the warp waits for their loads once per group.
    const int group = max(1, 32 / R);
    for (int base = t0; base < t1; base += group) {
      const int n = min(group, t1 - base);
      for (int j = Lane(); j < n * R; j += 32) {
        const int t = base + j / R, r = j % R, q = PeerSlot(r, me);
        const int row = r == me ? KeptRow(p.recv_row[int64_t{me} * T + t], M)
                                : __ldcg(c.call.row_of(local, q) + t);
        rows[j] = row == M ? nullptr
                  : r == me ? p.y + row * rb
                            : c.call.rows(local, q, 0) + t * rb;
      }
      __syncwarp();
      for (int u = 0; u < n; ++u) {
        ReduceToken<In, Out>(p, rows + u * R, base + u);
      }
      __syncwarp();
    }
  }
}

// --- Host ---------------------------------------------------------------------

Status Fail(const char* op, const std::string& what) {
  return Status::InvalidArgument(std::string("intranode ") + op + ": " + what);
}

// Receivers spin on chunks that pushers in other blocks (on every GPU)
// release, so every block of the main kernel must be resident at once: one
// 512-thread block per SM, at most the GPU's SM count.
Status CheckResident(const char* op, const runtime::PeerBuffers& buffers,
                     int64_t num_sms) {
  int sms = 0;
  if (Status s = Status::FromCuda(
          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                 buffers.device()),
          "cudaDeviceGetAttribute (SM count)");
      !s.ok()) {
    return s;
  }
  if (num_sms > sms) {
    return Fail(op, "num_sms is " + std::to_string(num_sms) + " but the GPU "
                    "has " + std::to_string(sms) + " SMs; the kernel needs "
                    "all its blocks resident at once");
  }
  return Status();
}

// Checks the sizes every call shares and cuts the work: fills *c but its
// buffers (already set to `peer_buffers`' view) and its layout.
// `warps_push`: whether warps push to peers (else the copy engines do, or
// there is no peer).
Status Plan(const char* op, const runtime::PeerBuffers& peer_buffers,
            int64_t num_ranks, int64_t num_tokens, int64_t capacity,
            const Tuning& tuning, bool warps_push, Common* c) {
  const runtime::PeerView& buffers = c->buffers;
  if (num_ranks != buffers.layout.num_ranks) {
    return Fail(op, "num_ranks is " + std::to_string(num_ranks) +
                        " but this device's peer buffers were created for " +
                        std::to_string(buffers.layout.num_ranks) + " ranks");
  }
  if (num_tokens < 1 || num_tokens >= (int64_t{1} << 31) / num_ranks ||
      capacity < 1 || capacity >= (int64_t{1} << 31)) {
    return Fail(op, "need 1 <= num_tokens < 2^31 / num_ranks and 1 <= "
                    "capacity < 2^31, got num_tokens=" +
                        std::to_string(num_tokens) +
                        ", capacity=" + std::to_string(capacity));
  }
  if (tuning.timeout_ns <= 0) {
    return Fail(op, "timeout_ns must be > 0, got " +
                        std::to_string(tuning.timeout_ns));
  }
  if (tuning.num_sms < 1 || tuning.num_sms > 1024) {
    return Fail(op, "num_sms must be in [1, 1024], got " +
                        std::to_string(tuning.num_sms));
  }
  if (Status s = CheckResident(op, peer_buffers, tuning.num_sms); !s.ok()) {
    return s;
  }
  if (tuning.send_warps < 1 || tuning.send_warps >= kWarps) {
    return Fail(op, "send_warps must be in [1, " + std::to_string(kWarps - 1) +
                        "], got " + std::to_string(tuning.send_warps));
  }
  if (tuning.chunk_tokens < 0) {
    return Fail(op, "chunk_tokens must be >= 0 (0: automatic), got " +
                        std::to_string(tuning.chunk_tokens));
  }
  const int64_t send_warps = num_ranks > 1 && warps_push ? tuning.send_warps : 0;
  int64_t chunk = tuning.chunk_tokens;
  if (chunk == 0 && send_warps > 0) {
    // About four chunks per pushing warp, so that receivers start early.
    const int64_t pushers = tuning.num_sms * send_warps;
    const int64_t per_peer = (4 * pushers + num_ranks - 2) / (num_ranks - 1);
    chunk = (num_tokens + per_peer - 1) / per_peer;
  } else if (chunk == 0) {
    // About two chunks per receiving warp.
    const int64_t per_source =
        (2 * tuning.num_sms * kWarps + num_ranks - 1) / num_ranks;
    chunk = (num_tokens + per_source - 1) / per_source;
  }
  chunk = std::max(chunk, (num_tokens + runtime::kMaxChunks - 1) /
                              runtime::kMaxChunks);
  chunk = std::min(chunk, num_tokens);
  c->num_tokens = static_cast<int>(num_tokens);
  c->num_ranks = static_cast<int>(num_ranks);
  c->capacity = static_cast<int>(capacity);
  c->send_warps = static_cast<int>(send_warps);
  c->chunk_tokens = static_cast<int>(chunk);
  c->num_chunks = static_cast<int>((num_tokens + chunk - 1) / chunk);
  c->timeout_ns = tuning.timeout_ns;
  return Status();
}

Status CheckRowBytes(const char* op, const int64_t* row_bytes) {
  for (int i = 0; i < 2; ++i) {
    if (row_bytes[i] < 0 || row_bytes[i] % 4 != 0) {
      return Fail(op, "row bytes must be a multiple of 4, got " +
                          std::to_string(row_bytes[i]));
    }
  }
  return Status();
}

Status CheckFits(const char* op, const runtime::PeerView& buffers,
                 const CallLayout& call) {
  if (call.bytes() > buffers.layout.data_bytes) {
    return Fail(op, "the peer buffers' data region (" +
                        std::to_string(buffers.layout.data_bytes) +
                        " bytes) is too small: this call needs " +
                        std::to_string(call.bytes()) +
                        " bytes; create the buffers with "
                        "intranode_buffer_bytes(...) for the largest shapes");
  }
  return Status();
}

// The row arrays a dispatch moves: checks them, lays the call out, and fills
// the kernels' row pointers.
Status SetRows(const char* op, const runtime::PeerView& buffers,
               const void* const rows[2], const int64_t row_bytes[2],
               void* const recv_rows[2], int64_t num_topk, Common* c,
               const char* rows_out[2], int64_t row_bytes_out[2],
               char* recv_rows_out[2]) {
  if (Status s = CheckRowBytes(op, row_bytes); !s.ok()) return s;
  c->call = CallLayout{c->num_tokens, c->num_ranks, num_topk,
                       {row_bytes[0], row_bytes[1]}};
  if (Status s = CheckFits(op, buffers, c->call); !s.ok()) return s;
  for (int i = 0; i < 2; ++i) {
    rows_out[i] = static_cast<const char*>(rows[i]);
    row_bytes_out[i] = row_bytes[i];
    recv_rows_out[i] = static_cast<char*>(recv_rows[i]);
  }
  return Status();
}

Status Launched(const char* kernel) {
  return Status::FromCuda(cudaGetLastError(), kernel);
}

Status LaunchBarrier(const Common& c, Op op, cudaStream_t stream) {
  Barrier<<<1, runtime::kMaxPeerRanks, 0, stream>>>(c.buffers, c.num_ranks,
                                                    c.timeout_ns, op);
  return Launched("Barrier launch");
}

// Releases arrival flags [first, last) of this rank in a peer's control
// region (`flags` points there) for the current call, after the copy-engine
// transfers before it on the copy queue have completed.
__global__ void ReleaseChunks(runtime::PeerView v, uint64_t* flags, int first,
                              int last) {
  const uint64_t seq = SequenceNow(v);
  __threadfence_system();
  for (int chunk = first + threadIdx.x; chunk < last; chunk += blockDim.x) {
    sync::st_release_sys_global(flags + chunk, seq);
  }
}

// What a dispatch moves with the copy engines: every token's rows, and for
// a fresh dispatch its routing (positions, expert ids, weights).
struct CopyPlan {
  const char* rows[2];
  int64_t row_bytes[2];
  bool routing;
  const int32_t* topk_idx;
  const float* topk_weights;
  int64_t num_topk;
};

// Forks the copy queue off `stream` after the barrier and enqueues, piece
// by piece (a piece: consecutive chunks) and peer by peer, the piece's rows
// into the peer's slot for this rank, then a kernel that releases the
// piece's arrival flags there; the routing goes with the first piece. The
// main kernel runs meanwhile; JoinCopies makes `stream` wait for the queue.
Status ForkCopies(const runtime::PeerBuffers& buffers, const Common& c,
                  const CopyPlan& plan, cudaStream_t stream) {
  const runtime::CopyQueue& queue = buffers.copy_queue();
  const runtime::BufferLayout& layout = buffers.layout();
  if (Status s = Status::FromCuda(cudaEventRecord(queue.fork, stream),
                                  "cudaEventRecord (fork)");
      !s.ok()) {
    return s;
  }
  if (Status s = Status::FromCuda(
          cudaStreamWaitEvent(queue.stream, queue.fork, 0),
          "cudaStreamWaitEvent (fork)");
      !s.ok()) {
    return s;
  }
  const int me = c.buffers.rank, T = c.num_tokens;
  const int pieces = std::min(c.num_chunks, 8);
  const int chunks_per_piece = (c.num_chunks + pieces - 1) / pieces;
  auto copy = [&](void* dst, const void* src, int64_t bytes) {
    return bytes == 0 ? Status()
                      : Status::FromCuda(
                            cudaMemcpyAsync(dst, src, bytes,
                                            cudaMemcpyDeviceToDevice,
                                            queue.stream),
                            "cudaMemcpyAsync (copy engine)");
  };
  for (int first = 0; first < c.num_chunks; first += chunks_per_piece) {
    const int last = std::min(c.num_chunks, first + chunks_per_piece);
    const int64_t t0 = int64_t{first} * c.chunk_tokens;
    const int64_t t1 = std::min<int64_t>(T, int64_t{last} * c.chunk_tokens);
    for (int q = 0; q < c.num_ranks - 1; ++q) {
      const int dest = OtherRank(q, me);
      char* base = buffers.peer_base(dest);
      const int slot = PeerSlot(me, dest);
      if (plan.routing && first == 0) {
        const int64_t topk_bytes = T * plan.num_topk * 4;
        for (Status s : {
                 copy(c.call.row_of(base, slot),
                      c.call.scratch(buffers.base()) + int64_t{dest} * T,
                      T * 4),
                 copy(c.call.topk_idx(base, slot), plan.topk_idx, topk_bytes),
                 copy(c.call.weights(base, slot), plan.topk_weights,
                      topk_bytes)}) {
          if (!s.ok()) return s;
        }
      }
      for (int i = 0; i < 2; ++i) {
        const int64_t rb = plan.row_bytes[i];
        if (Status s = copy(c.call.rows(base, slot, i) + t0 * rb,
                            plan.rows[i] + t0 * rb, (t1 - t0) * rb);
            !s.ok()) {
          return s;
        }
      }
      ReleaseChunks<<<1, 256, 0, queue.stream>>>(
          c.buffers, layout.arrivals(base) + int64_t{me} * runtime::kMaxChunks,
          first, last);
      if (Status s = Launched("ReleaseChunks launch"); !s.ok()) return s;
    }
  }
  return Status::FromCuda(cudaEventRecord(queue.join, queue.stream),
                          "cudaEventRecord (join)");
}

Status JoinCopies(const runtime::PeerBuffers& buffers, cudaStream_t stream) {
  return Status::FromCuda(
      cudaStreamWaitEvent(stream, buffers.copy_queue().join, 0),
      "cudaStreamWaitEvent (join)");
}

}  // namespace

Status LaunchDispatch(const runtime::PeerBuffers& peer_buffers,
                      const DispatchArgs& a, cudaStream_t stream) {
  const char* op = "dispatch";
  const runtime::PeerView buffers = peer_buffers.view();
  const bool copy_engine = a.tuning.copy_engine != 0 && a.num_ranks > 1;
  Common common{buffers};
  if (Status s = Plan(op, peer_buffers, a.num_ranks, a.num_tokens,
                      a.capacity, a.tuning, !copy_engine, &common);
      !s.ok()) {
    return s;
  }
  DispatchParams p{common};
  if (a.num_experts < 1 || a.num_experts > runtime::kMaxNotifyExperts ||
      a.num_experts % a.num_ranks != 0) {
    return Fail(op, "num_experts must be a multiple of num_ranks in [1, " +
                        std::to_string(runtime::kMaxNotifyExperts) + "], got " +
                        std::to_string(a.num_experts));
  }
  if (a.num_topk < 1 || a.num_topk > kMaxTopk || a.expert_alignment < 1) {
    return Fail(op, "need 1 <= num_topk <= 32 and expert_alignment >= 1, got "
                    "num_topk=" + std::to_string(a.num_topk) +
                        ", expert_alignment=" +
                        std::to_string(a.expert_alignment));
  }
  if (Status s = SetRows(op, buffers, a.rows, a.row_bytes, a.recv_rows,
                         a.num_topk, &p.c, p.rows, p.row_bytes, p.recv_rows);
      !s.ok()) {
    return s;
  }
  p.topk_idx = a.topk_idx;
  p.topk_weights = a.topk_weights;
  p.num_topk = static_cast<int>(a.num_topk);
  p.num_local_experts = static_cast<int>(a.num_experts / a.num_ranks);
  p.expert_alignment =
      static_cast<int>(std::min<int64_t>(a.expert_alignment, 1 << 30));
  p.recv_topk_idx = a.recv_topk_idx;
  p.recv_topk_weights = a.recv_topk_weights;
  p.num_recv_per_expert = a.num_recv_per_expert;
  p.src_index = a.src_index;
  p.recv_row = a.recv_row;
  p.num_recv_tokens = a.num_recv_tokens;
  StageDispatch<<<p.c.num_ranks, kThreads, 0, stream>>>(p);
  if (Status s = Launched("StageDispatch launch"); !s.ok()) return s;
  if (Status s = LaunchBarrier(p.c, Op::kDispatch, stream); !s.ok()) return s;
  if (copy_engine) {
    const CopyPlan plan{{p.rows[0], p.rows[1]},
                        {p.row_bytes[0], p.row_bytes[1]},
                        /*routing=*/true,
                        a.topk_idx,
                        a.topk_weights,
                        a.num_topk};
    if (Status s = ForkCopies(peer_buffers, p.c, plan, stream); !s.ok()) {
      return s;
    }
  }
  DispatchKernel<<<static_cast<int>(a.tuning.num_sms), kThreads, 0, stream>>>(p);
  if (Status s = Launched("DispatchKernel launch"); !s.ok()) return s;
  return copy_engine ? JoinCopies(peer_buffers, stream) : Status();
}

Status LaunchCachedDispatch(const runtime::PeerBuffers& peer_buffers,
                            const CachedDispatchArgs& a, cudaStream_t stream) {
  const char* op = "cached dispatch";
  const runtime::PeerView buffers = peer_buffers.view();
  const bool copy_engine = a.tuning.copy_engine != 0 && a.num_ranks > 1;
  Common common{buffers};
  if (Status s = Plan(op, peer_buffers, a.num_ranks, a.num_tokens,
                      a.capacity, a.tuning, !copy_engine, &common);
      !s.ok()) {
    return s;
  }
  CachedParams p{common};
  if (Status s = SetRows(op, buffers, a.rows, a.row_bytes, a.recv_rows, 0,
                         &p.c, p.rows, p.row_bytes, p.recv_rows);
      !s.ok()) {
    return s;
  }
  p.recv_row = a.recv_row;
  p.num_recv_tokens = a.num_recv_tokens;
  const int blocks = static_cast<int>(a.tuning.num_sms);
  if (!copy_engine) {  // pushers read the destinations' staged recv_row
    StageCached<<<blocks, kThreads, 0, stream>>>(p);
    if (Status s = Launched("StageCached launch"); !s.ok()) return s;
  }
  if (Status s = LaunchBarrier(p.c, Op::kCachedDispatch, stream); !s.ok()) {
    return s;
  }
  if (copy_engine) {
    const CopyPlan plan{{p.rows[0], p.rows[1]},
                        {p.row_bytes[0], p.row_bytes[1]},
                        /*routing=*/false, nullptr, nullptr, 0};
    if (Status s = ForkCopies(peer_buffers, p.c, plan, stream); !s.ok()) {
      return s;
    }
  }
  CachedDispatchKernel<<<blocks, kThreads, 0, stream>>>(p);
  if (Status s = Launched("CachedDispatchKernel launch"); !s.ok()) return s;
  return copy_engine ? JoinCopies(peer_buffers, stream) : Status();
}

Status LaunchCombine(const runtime::PeerBuffers& peer_buffers,
                     const CombineArgs& a, cudaStream_t stream) {
  const char* op = "combine";
  const runtime::PeerView buffers = peer_buffers.view();
  Common common{buffers};
  if (Status s = Plan(op, peer_buffers, a.num_ranks, a.num_tokens,
                      a.capacity, a.tuning, /*warps_push=*/true, &common);
      !s.ok()) {
    return s;
  }
  CombineParams p{common};
  if (a.num_channels < 1) {
    return Fail(op, "need num_channels >= 1, got " +
                        std::to_string(a.num_channels));
  }
  if (a.out_type != ElementType::kF32 && a.out_type != a.y_type) {
    return Fail(op, "the output must be f32 or y's type");
  }
  const int64_t element = a.y_type == ElementType::kBF16 ? 2 : 4;
  p.row_bytes = a.num_channels * element;
  if (p.row_bytes % 4 != 0) {
    return Fail(op, "y's rows must be a multiple of 4 bytes");
  }
  p.c.call = CallLayout{a.num_tokens, a.num_ranks, 0, {p.row_bytes, 0}};
  if (Status s = CheckFits(op, buffers, p.c.call); !s.ok()) return s;
  p.y = static_cast<const char*>(a.y);
  p.recv_row = a.recv_row;
  p.bias = a.bias;
  p.num_channels = static_cast<int>(a.num_channels);
  p.out = static_cast<char*>(a.out);
  if (Status s = LaunchBarrier(p.c, Op::kCombine, stream); !s.ok()) return s;
  const int blocks = static_cast<int>(a.tuning.num_sms);
  if (a.y_type == ElementType::kBF16 && a.out_type == ElementType::kF32) {
    CombineKernel<__nv_bfloat16, float><<<blocks, kThreads, 0, stream>>>(p);
  } else if (a.y_type == ElementType::kBF16) {
    CombineKernel<__nv_bfloat16, __nv_bfloat16>
        <<<blocks, kThreads, 0, stream>>>(p);
  } else {
    CombineKernel<float, float><<<blocks, kThreads, 0, stream>>>(p);
  }
  return Launched("CombineKernel launch");
}

}  // namespace jax_ep::intranode
