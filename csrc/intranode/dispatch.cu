// Intranode fresh and cached dispatch kernels: the staging kernel each runs
// before the call's barrier and the main kernel after it. The call around
// them (the kernel sequence, the barrier, the data region and why one copy of
// it suffices) is described at the top of launch.cu; kernels.cuh has what
// these kernels share with combine.cu's.
//
// Fresh dispatch. StageDispatch: block d finds the tokens that select an
// expert of rank d (any k with topk_idx[t,k] - d*L in [0, L), L = E/R: the
// reference's test), writes positions[d, t] (rank of t among them, or -1)
// into the scratch, then its count into every peer's count slot and its
// per-expert counts into d's (the count slots of the coming seq's parity).
// After the barrier each rank knows the whole count matrix, hence where
// every source's rows start in every destination's output: rows ordered by
// source, then token. Two slot sets suffice: to write set p again, rank s
// must reach call seq + 2, hence pass the barrier of seq + 1, which needs
// d's flag of seq + 1, which d releases only after its main kernel of call
// seq, the last to read set p, has run (a device's calls run in stream
// order). A writer is at most one call ahead of any reader, on the other
// set.
// Two ways move the rows and routing into a destination's slot:
//   copy engines (Tuning::nvl_copy_engine): a side stream forked off XLA's
//     after the barrier copies ALL T rows, the routing (positions[d],
//     topk_idx, weights) and, piece by piece, releases the arrival flags of
//     the piece's chunks with a one-block kernel (ForkCopies, launch.cu);
//     XLA's stream waits for it after the main kernel. No warp pushes.
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

#include "intranode/kernels.cuh"

namespace jax_ep::intranode {
namespace {

// --- Helpers ------------------------------------------------------------------

__device__ __forceinline__ void ZeroRow(char* dst, int64_t bytes) {
  if (bytes % 16 == 0 && Aligned16(dst)) {
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = Lane(); i < bytes / 16; i += 32) d[i] = make_int4(0, 0, 0, 0);
  } else {
    int32_t* d = reinterpret_cast<int32_t*>(dst);
    for (int64_t i = Lane(); i < bytes / 4; i += 32) d[i] = 0;
  }
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

// --- Fresh dispatch -----------------------------------------------------------

// Block d: positions[d, t] into the scratch; d's count into every peer's
// count slot and the counts of d's experts into d's.
__global__ void __launch_bounds__(kThreads) StageDispatch(DispatchParams p) {
  __shared__ int expert_counts[kMaxNormalExperts];
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
  __shared__ int offset_at[kMaxRanks];
  __shared__ int offset_from[kMaxRanks + 1];
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

__global__ void __launch_bounds__(kThreads) StageCached(CachedParams p) {
  const Common& c = p.c;
  int32_t* scratch = c.call.scratch(c.buffers.local_base);
  const int64_t n = int64_t{c.num_ranks} * c.num_tokens;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kThreads) {
    scratch[i] = p.recv_row[i];
  }
}

__global__ void __launch_bounds__(kThreads)
    CachedDispatchKernel(CachedParams p) {
  const Common& c = p.c;
  char* const local = c.buffers.local_base;
  const int me = c.buffers.rank, R = c.num_ranks, n = c.num_chunks,
            T = c.num_tokens, M = c.capacity;
  const uint64_t seq = SequenceNow(c.buffers);
  const WarpRole role = Role(c);
  if (role.sends) {
    PushChunks(c, role, seq, [&](int, int q, char* base, int t0, int t1) {
      const int32_t* staged = c.call.scratch(base) + int64_t{me} * T;
      ForEachToken(
          t0, t1, [&](int t) { return KeptRow(__ldcg(staged + t), M); },
          [&](int t, int row) {
            if (row == M) return;
            for (int i = 0; i < 2; ++i) {
              const int64_t rb = p.row_bytes[i];
              CopyRow(c.call.rows(base, q, i) + t * rb, p.rows[i] + t * rb, rb);
            }
          });
    });
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

}  // namespace

Status LaunchStageDispatch(const DispatchParams& p, cudaStream_t stream) {
  StageDispatch<<<p.c.num_ranks, kThreads, 0, stream>>>(p);
  return Launched("StageDispatch launch");
}

Status LaunchDispatchKernel(const DispatchParams& p, int blocks,
                            cudaStream_t stream) {
  DispatchKernel<<<blocks, kThreads, 0, stream>>>(p);
  return Launched("DispatchKernel launch");
}

Status LaunchStageCached(const CachedParams& p, int blocks,
                         cudaStream_t stream) {
  StageCached<<<blocks, kThreads, 0, stream>>>(p);
  return Launched("StageCached launch");
}

Status LaunchCachedDispatchKernel(const CachedParams& p, int blocks,
                                  cudaStream_t stream) {
  CachedDispatchKernel<<<blocks, kThreads, 0, stream>>>(p);
  return Launched("CachedDispatchKernel launch");
}

}  // namespace jax_ep::intranode
