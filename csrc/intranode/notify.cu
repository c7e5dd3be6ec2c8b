// Intranode notify: every EP rank of a host learns how many tokens every rank
// sends to every other rank, and how many it will receive per local expert.
//
// Inputs per rank r (from get_dispatch_layout): num_tokens_per_rank[R] (the
// row r of the count matrix) and num_tokens_per_expert[E]. Outputs, per rank:
//   count_matrix[s, d]         tokens rank s sends to rank d (every rank gets
//                              the same matrix)
//   recv_tokens_per_expert[l]  sum over s of s's num_tokens_per_expert[r*L+l],
//                              rounded up to expert_alignment (L = E / R).
//
// Protocol (one block of kThreads threads per rank; memory: BufferLayout's
// control region of each rank's peer buffer, reached through the peer-base
// table in this rank's own control region):
//   1. Thread 0 increments this device's call counter: seq = ++*sequence.
//      Only this device writes its counter, and every rank makes the same
//      sequence of notify calls, so seq is the same on every rank for the
//      same call. Parity p = seq & 1 picks one of two slot sets.
//   2. Rank r writes into every peer d's slot(p, r): its count row (R ints)
//      and the L per-expert counts of d's experts. Plain stores over NVLink.
//   3. __syncthreads, then thread d does st.release.sys flags[r] = seq in
//      peer d's control region: the release (after the block barrier) makes
//      all of the block's slot writes visible before the flag.
//   4. Thread s waits with ld.acquire.sys until this rank's flags[s] >= seq
//      (sync::wait_at_least_acquire_sys: prints rank, phase, expected and
//      seen value and traps after timeout_ns).
//   5. __syncthreads, then the block reads its R slots (p, s) with
//      ld.relaxed.sys and writes the outputs.
// Why two slot sets are enough: for rank s to write slot set p again it must
// reach call seq + 2, hence finish call seq + 1, hence see d's flag for
// seq + 1, which d releases only in its call seq + 1, i.e. after its call seq
// has finished reading slot set p (the calls of one device run in stream
// order). A writer is therefore at most one call ahead of any reader, and the
// call it is ahead on uses the other slot set. Flags only grow, so a flag
// already at seq + 1 when d waits for seq also satisfies the wait.
// Counters start at 0 (the control region is zeroed when it is created);
// a rank that skips a notify call desynchronizes the group, and the next
// wait times out.

#include <string>

#include "intranode/notify.cuh"
#include "runtime/sync.cuh"

namespace jax_ep::intranode {
namespace {

constexpr int kThreads = 256;
static_assert(kMaxRanks <= kThreads, "a thread per rank");

struct Params {
  runtime::PeerView buffers;
  const int32_t* num_tokens_per_rank;
  const int32_t* num_tokens_per_expert;
  int num_ranks;
  int num_local_experts;
  int expert_alignment;
  int64_t timeout_ns;
  int32_t* count_matrix;
  int32_t* recv_tokens_per_expert;
};

// Step 2: this rank's row and per-expert counts into every peer's slot.
__device__ void WriteSlots(const Params& p, char* const* peer_bases,
                           int64_t parity) {
  const runtime::BufferLayout& layout = p.buffers.layout;
  const int row_ints = p.num_ranks + p.num_local_experts;
  for (int i = threadIdx.x; i < p.num_ranks * row_ints; i += kThreads) {
    const int dest = i / row_ints;
    const int j = i % row_ints;
    const int32_t value =
        j < p.num_ranks
            ? p.num_tokens_per_rank[j]
            : p.num_tokens_per_expert[dest * p.num_local_experts +
                                      (j - p.num_ranks)];
    layout.slot(peer_bases[dest], parity, p.buffers.rank)[j] = value;
  }
}

// Step 5: the count matrix and this rank's per-expert receive counts.
__device__ void ReadSlots(const Params& p, int64_t parity) {
  const runtime::BufferLayout& layout = p.buffers.layout;
  char* const local = p.buffers.local_base;
  const int num_ranks = p.num_ranks;
  for (int i = threadIdx.x; i < num_ranks * num_ranks; i += kThreads) {
    const int source = i / num_ranks;
    p.count_matrix[i] = sync::ld_relaxed_sys_global(
        layout.slot(local, parity, source) + i % num_ranks);
  }
  for (int l = threadIdx.x; l < p.num_local_experts; l += kThreads) {
    int64_t sum = 0;
    for (int source = 0; source < num_ranks; ++source) {
      sum += sync::ld_relaxed_sys_global(layout.slot(local, parity, source) +
                                         num_ranks + l);
    }
    const int64_t align = p.expert_alignment;
    p.recv_tokens_per_expert[l] =
        static_cast<int32_t>((sum + align - 1) / align * align);
  }
}

__global__ void __launch_bounds__(kThreads) NotifyKernel(Params p) {
  __shared__ uint64_t sequence;
  const runtime::BufferLayout& layout = p.buffers.layout;
  char* const local = p.buffers.local_base;
  char* const* peer_bases = layout.peer_bases(local);
  if (threadIdx.x == 0) {
    uint64_t* counter = layout.sequence(local);
    sequence = *counter + 1;
    *counter = sequence;
  }
  __syncthreads();
  const uint64_t seq = sequence;
  const int64_t parity = static_cast<int64_t>(seq & 1);

  WriteSlots(p, peer_bases, parity);
  __syncthreads();
  const int rank = p.buffers.rank;
  if (threadIdx.x < p.num_ranks) {
    sync::st_release_sys_global(layout.flags(peer_bases[threadIdx.x]) + rank,
                                seq);
    const sync::WaitSite site{"intranode_notify",
                              "wait for the peers' count slots", rank,
                              static_cast<int>(threadIdx.x)};
    sync::wait_at_least_acquire_sys(layout.flags(local) + threadIdx.x, seq,
                                    p.timeout_ns, site);
  }
  __syncthreads();
  ReadSlots(p, parity);
}

Status Validate(const runtime::PeerView& buffers, const NotifyArgs& a) {
  auto fail = [](const std::string& what) {
    return Status::InvalidArgument("intranode notify: " + what);
  };
  const int64_t ranks = buffers.layout.num_ranks;
  if (a.num_ranks != ranks) {
    return fail("num_ranks is " + std::to_string(a.num_ranks) +
                " but this device's peer buffers were created for " +
                std::to_string(ranks) + " ranks");
  }
  if (a.num_experts < 1 || a.num_experts > kMaxNormalExperts ||
      a.num_experts % ranks != 0) {
    return fail("num_experts must be a multiple of num_ranks (" +
                std::to_string(ranks) + ") in [1, " +
                std::to_string(kMaxNormalExperts) + "], got " +
                std::to_string(a.num_experts));
  }
  if (a.expert_alignment < 1 || a.expert_alignment > (1 << 20)) {
    return fail("expert_alignment must be in [1, 2^20], got " +
                std::to_string(a.expert_alignment));
  }
  if (a.timeout_ns <= 0) {
    return fail("timeout_ns must be > 0, got " + std::to_string(a.timeout_ns));
  }
  return Status();
}

}  // namespace

Status LaunchNotify(const runtime::PeerView& buffers, const NotifyArgs& args,
                    cudaStream_t stream) {
  if (Status status = Validate(buffers, args); !status.ok()) return status;
  const Params params{
      buffers,
      args.num_tokens_per_rank,
      args.num_tokens_per_expert,
      static_cast<int>(args.num_ranks),
      static_cast<int>(args.num_experts / args.num_ranks),
      static_cast<int>(args.expert_alignment),
      args.timeout_ns,
      args.count_matrix,
      args.recv_tokens_per_expert,
  };
  NotifyKernel<<<1, kThreads, 0, stream>>>(params);
  return Status::FromCuda(cudaGetLastError(), "intranode notify launch");
}

}  // namespace jax_ep::intranode
