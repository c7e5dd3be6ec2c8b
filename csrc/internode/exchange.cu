// The internode row exchange: the legs of the internode dispatch and combine
// (docs/internode.md). A call runs within a team of PEs (exchange.cuh): this
// rank's peers with its local index on every node (the network leg, where a
// token's row crosses to a node at most once), or the ranks of its node
// (the NVLink leg, which forwards rows inside the node), over NVSHMEM.
//
// Protocol. A call takes the sequence number seq = the last call's + 1 from
// device memory (Region::sequence); three kernels run in stream order:
//
//   send     Every block first waits until each member p has read out the
//            last call (free[p] >= seq - 1 here): the slots it writes are
//            then free. A warp takes (member i, chunk c) pairs: for each
//            token t of the chunk with a row to send (src_row[i, t] in
//            range) it copies the row to its own staging slot and puts it
//            to slot [my index, t] of member i; then, after nvshmem_fence
//            (which delivers those rows first), it puts the chunk's masks (1
//            where a row went) with the signal arrived[my rank, c] = seq.
//   receive  A warp takes (member i, chunk c) pairs: it waits until
//            arrived[member i's rank, c] >= seq, then copies the chunk's
//            rows (zero rows where the mask is 0) and masks to the outputs.
//   release  One block: tells every rank that may write here next (both
//            teams of this rank: the next call may use either) that this
//            rank has read out call seq (free[my rank] = seq there), then
//            stores seq as the last call.
//
// Flags are indexed by rank and never cleared: a flag holds the sequence
// number of the call that last set it, so a call waits until it reaches its
// own. Every rank must run the same exchanges in the same order. Every wait
// goes through sync::wait_at_least_acquire_sys; a timeout names the rank,
// the phase and the peer rank.

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/limits.h"
#include "common/warp_copy.cuh"
#include "internode/exchange.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::internode {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr const char* kKernel = "internode exchange";

// Who this PE talks to: member i of the team is first + i * stride.
struct Team {
  int rank, first, stride, size;
  __device__ int pe(int i) const { return first + i * stride; }
  __device__ int index() const { return (rank - first) / stride; }
};

__device__ __forceinline__ Team TeamOf(const Region& region,
                                       const ExchangeArgs& a) {
  const int stride = a.team_stride, size = static_cast<int>(a.shape.team_size);
  const int block = stride * size;
  return {region.rank, region.rank / block * block + region.rank % stride,
          stride, size};
}

__device__ __forceinline__ uint64_t CallSequence(const Region& region) {
  return *reinterpret_cast<volatile unsigned long long*>(region.sequence) + 1;
}

template <typename T>
__device__ __forceinline__ T* At(char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__global__ void __launch_bounds__(kThreads) SendKernel(Region region,
                                                       ExchangeArgs a) {
  const RegionLayout layout{a.shape};
  const Team team = TeamOf(region, a);
  const uint64_t seq = CallSequence(region);
  const int Z = team.size, me = team.index();
  const int64_t T = a.shape.num_tokens, B = a.shape.row_bytes;
  char* const base = region.base;
  for (int i = threadIdx.x; i < Z; i += kThreads) {
    const sync::WaitSite site{kKernel, "wait until a peer has read out the "
                              "last call", team.rank, team.pe(i)};
    sync::wait_at_least_acquire_sys(
        At<uint64_t>(base, RegionLayout::free_flags()) + team.pe(i), seq - 1,
        a.timeout_ns, site);
  }
  __syncthreads();
  int32_t* const send_mask = At<int32_t>(base, layout.send_mask());
  int32_t* const recv_mask = At<int32_t>(base, layout.recv_mask());
  char* const send_rows = base + layout.send_rows();
  char* const recv_rows = base + layout.recv_rows();
  uint64_t* const arrived = At<uint64_t>(base, RegionLayout::arrived());
  const int lane = threadIdx.x % 32;
  const int64_t C = a.shape.chunk_tokens(), chunks = a.shape.num_chunks();
  bool put = false;
  for (int64_t w = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
       w < Z * chunks; w += int64_t{gridDim.x} * kWarps) {
    // Chunk-major: every member gets its first chunk early.
    const int m = static_cast<int>(w % Z);
    const int64_t c = w / Z, t0 = c * C, t1 = t0 + C < T ? t0 + C : T;
    const int pe = team.pe(m);
    for (int64_t group = t0; group < t1; group += 32) {
      const int64_t t = group + lane;
      int32_t row = -1;
      if (t < t1) {
        row = a.src_row[m * T + t];
        if (row >= a.num_rows) row = -1;
        send_mask[m * T + t] = row >= 0;
      }
      const int n = t1 - group < 32 ? static_cast<int>(t1 - group) : 32;
      for (int u = 0; u < n; ++u) {
        const int32_t r = __shfl_sync(kFullMask, row, u);
        if (r < 0) continue;
        const int64_t slot = m * T + group + u;
        char* const stage = send_rows + slot * B;
        WarpCopy(reinterpret_cast<int4*>(stage),
                 reinterpret_cast<const int4*>(a.rows + r * B), B / 16, lane);
        __syncwarp();
        nvshmemx_putmem_nbi_warp(recv_rows + (me * T + group + u) * B, stage,
                                 B, pe);
      }
    }
    __syncwarp();
    nvshmem_fence();
    nvshmemx_putmem_signal_nbi_warp(
        recv_mask + me * T + t0, send_mask + m * T + t0,
        (t1 - t0) * sizeof(int32_t), arrived + team.rank * kMaxChunks + c, seq,
        NVSHMEM_SIGNAL_SET, pe);
    put = true;
  }
  if (put) nvshmem_quiet();
}

__global__ void __launch_bounds__(kThreads) ReceiveKernel(Region region,
                                                          ExchangeArgs a) {
  const RegionLayout layout{a.shape};
  const Team team = TeamOf(region, a);
  const uint64_t seq = CallSequence(region);
  const int Z = team.size;
  const int64_t T = a.shape.num_tokens, B = a.shape.row_bytes;
  char* const base = region.base;
  const int32_t* const recv_mask = At<int32_t>(base, layout.recv_mask());
  const char* const recv_rows = base + layout.recv_rows();
  const uint64_t* const arrived = At<uint64_t>(base, RegionLayout::arrived());
  const int lane = threadIdx.x % 32;
  const int64_t C = a.shape.chunk_tokens(), chunks = a.shape.num_chunks();
  for (int64_t w = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
       w < Z * chunks; w += int64_t{gridDim.x} * kWarps) {
    const int m = static_cast<int>(w % Z);
    const int64_t c = w / Z, t0 = c * C, t1 = t0 + C < T ? t0 + C : T;
    if (lane == 0) {
      const sync::WaitSite site{kKernel, "wait for a peer's chunk", team.rank,
                                team.pe(m)};
      sync::wait_at_least_acquire_sys(arrived + team.pe(m) * kMaxChunks + c,
                                      seq, a.timeout_ns, site);
    }
    __syncwarp();
    for (int64_t group = t0; group < t1; group += 32) {
      const int64_t t = group + lane;
      int32_t sent = 0;
      if (t < t1) {
        sent = __ldcv(recv_mask + m * T + t);
        a.recv_mask[m * T + t] = sent;
      }
      const int n = t1 - group < 32 ? static_cast<int>(t1 - group) : 32;
      for (int u = 0; u < n; ++u) {
        const int64_t slot = m * T + group + u;
        int4* const out = reinterpret_cast<int4*>(a.recv_rows + slot * B);
        // L2 loads (__ldcg): a slot may share a cache line with one that
        // had not arrived when this SM last read that line.
        const int4* const src =
            reinterpret_cast<const int4*>(recv_rows + slot * B);
        const bool came = __shfl_sync(kFullMask, sent, u);
        for (int64_t j = lane; j < B / 16; j += 32) {
          out[j] = came ? __ldcg(src + j) : int4{0, 0, 0, 0};
        }
      }
    }
  }
}

__global__ void ReleaseKernel(Region region, ExchangeArgs a) {
  const int rank = region.rank, G = a.ranks_per_node;
  const int N = region.num_ranks / G;
  const uint64_t seq = CallSequence(region);
  uint64_t* const free_flag =
      At<uint64_t>(region.base, RegionLayout::free_flags()) + rank;
  // Both teams of this rank: its local index on every node, its node.
  for (int j = threadIdx.x; j < N + G; j += blockDim.x) {
    const int pe = j < N ? j * G + rank % G : rank / G * G + (j - N);
    nvshmemx_signal_op(free_flag, seq, NVSHMEM_SIGNAL_SET, pe);
  }
  nvshmem_quiet();
  __syncthreads();
  if (threadIdx.x == 0) *region.sequence = seq;
}

Status Launched(const char* what) {
  return Status::FromCuda(cudaGetLastError(), what);
}

}  // namespace

Status LaunchExchange(const char* op, const Region& region,
                      const ExchangeArgs& a, cudaStream_t stream) {
  const ExchangeShape& s = a.shape;
  const auto refuse = [&](const std::string& why) {
    return Status::InvalidArgument(std::string(op) + ": " + why);
  };
  if (region.base == nullptr) {
    return refuse("no internode region is open in this process: create the "
                  "jax_ep.Buffer with num_rdma_bytes on the cuda backend");
  }
  const int64_t R = region.num_ranks, G = a.ranks_per_node,
                S = a.team_stride, Z = s.team_size;
  if (R > kMaxInternodeRanks) {
    return refuse("the exchange serves at most " +
                  std::to_string(kMaxInternodeRanks) +
                  " ranks (its flags are per rank), got " + std::to_string(R));
  }
  if (G < 1 || R % G || !((S == G && Z == R / G) || (S == 1 && Z == G))) {
    return refuse("a team of " + std::to_string(Z) + " ranks " +
                  std::to_string(S) + " apart is neither the ranks of a "
                  "local index nor those of a node of " + std::to_string(G) +
                  " among " + std::to_string(R));
  }
  if (s.num_tokens < 1 || s.num_tokens > int64_t{1} << 30) {
    return refuse("num_tokens must be in [1, 2^30], got " +
                  std::to_string(s.num_tokens));
  }
  if (s.row_bytes < 16 || s.row_bytes % 16) {
    return refuse("rows must be a positive multiple of 16 bytes, got " +
                  std::to_string(s.row_bytes));
  }
  if (a.num_rows < 0 || a.num_rows > int64_t{1} << 31) {
    return refuse("rows must number fewer than 2^31, got " +
                  std::to_string(a.num_rows));
  }
  const int64_t need = RegionBytes(s);
  if (need > region.bytes) {
    return refuse("the Buffer's num_rdma_bytes (" +
                  std::to_string(region.bytes) + ") is too small for " +
                  std::to_string(s.team_size) + " ranks' " +
                  std::to_string(s.num_tokens) + " rows of " +
                  std::to_string(s.row_bytes) + " bytes, which need " +
                  std::to_string(need) +
                  ": size it with jax_ep.rdma_buffer_bytes");
  }
  // Each warp takes (member, chunk) pairs; more blocks than pairs would idle.
  const int64_t warps_needed = s.team_size * s.num_chunks();
  const int64_t budget = std::min<int64_t>(region.num_sms, a.num_sms);
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(budget, (warps_needed + kWarps - 1) / kWarps)));
  SendKernel<<<blocks, kThreads, 0, stream>>>(region, a);
  if (Status st = Launched("internode SendKernel launch"); !st.ok()) return st;
  ReceiveKernel<<<blocks, kThreads, 0, stream>>>(region, a);
  if (Status st = Launched("internode ReceiveKernel launch"); !st.ok()) {
    return st;
  }
  ReleaseKernel<<<1, kThreads, 0, stream>>>(region, a);
  return Launched("internode ReleaseKernel launch");
}

}  // namespace jax_ep::internode
