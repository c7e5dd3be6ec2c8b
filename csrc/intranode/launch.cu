// Intranode normal dispatch, cached dispatch and combine over NVLink peer
// buffers, by "push": a rank writes the rows a peer needs straight from its
// input into that peer's data region, and the peer copies (dispatch) or sums
// (combine) them into XLA's output while the rest is still arriving. Rows
// that stay on a rank never touch the peer buffers. docs/contract.md gives the
// results, bit for bit (the pure-JAX reference is the oracle).
//
// This file runs a call: it checks the sizes, cuts the work (Plan), orders
// the call's kernels on the stream and drives the copy engines. The dispatch
// kernels are in dispatch.cu, the combine kernel in combine.cu, each file
// opening with its protocol; kernels.cuh has what they share.
//
// Kernels per call, in stream order on each rank (R ranks, T tokens):
//   dispatch:         StageDispatch -> Barrier -> DispatchKernel
//   cached dispatch:  StageCached   -> Barrier -> CachedDispatchKernel
//   combine:                           Barrier -> CombineKernel
//
// Call sequence. All intranode calls of a device share
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

#include <algorithm>
#include <string>

#include "intranode/kernels.cuh"

namespace jax_ep::intranode {
namespace {

// --- Checks and the plan ------------------------------------------------------

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
  if (tuning.nvl_send_warps < 1 || tuning.nvl_send_warps >= kWarps) {
    return Fail(op, "nvl_send_warps must be in [1, " +
                        std::to_string(kWarps - 1) + "], got " +
                        std::to_string(tuning.nvl_send_warps));
  }
  if (tuning.nvl_chunk < 0) {
    return Fail(op, "nvl_chunk must be >= 0 (0: automatic), got " +
                        std::to_string(tuning.nvl_chunk));
  }
  const int64_t send_warps =
      num_ranks > 1 && warps_push ? tuning.nvl_send_warps : 0;
  int64_t chunk = tuning.nvl_chunk;
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

// Whether the copy engines move a dispatch's rows (else warps push them).
bool CopiesByEngine(const DispatchRows& m) {
  return m.tuning.nvl_copy_engine != 0 && m.num_ranks > 1;
}

// What both dispatches do first: Plan, then check the rows they move, lay
// the call out, and fill the kernels' row pointers.
Status PlanDispatch(const char* op, const runtime::PeerBuffers& peer_buffers,
                    const DispatchRows& m, int64_t num_topk, Common* c,
                    const char* rows[2], int64_t row_bytes[2],
                    char* recv_rows[2]) {
  if (Status s = Plan(op, peer_buffers, m.num_ranks, m.num_tokens,
                      m.capacity, m.tuning, !CopiesByEngine(m), c);
      !s.ok()) {
    return s;
  }
  if (Status s = CheckRowBytes(op, m.row_bytes); !s.ok()) return s;
  c->call = CallLayout{c->num_tokens, c->num_ranks, num_topk,
                       {m.row_bytes[0], m.row_bytes[1]}};
  if (Status s = CheckFits(op, c->buffers, c->call); !s.ok()) return s;
  for (int i = 0; i < 2; ++i) {
    rows[i] = static_cast<const char*>(m.rows[i]);
    row_bytes[i] = m.row_bytes[i];
    recv_rows[i] = static_cast<char*>(m.recv_rows[i]);
  }
  return Status();
}

// --- Barrier ------------------------------------------------------------------

__global__ void __launch_bounds__(kMaxRanks)
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

Status LaunchBarrier(const Common& c, Op op, cudaStream_t stream) {
  Barrier<<<1, kMaxRanks, 0, stream>>>(c.buffers, c.num_ranks, c.timeout_ns,
                                       op);
  return Launched("Barrier launch");
}

// --- Copy engines -------------------------------------------------------------

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

// What both dispatches do after their stage kernel: the barrier, then the
// main kernel (`launch_kernel`), beside the copy engines' transfers of
// `plan` when they move the rows.
template <typename LaunchKernel>
Status RunDispatch(const runtime::PeerBuffers& peer_buffers,
                   const DispatchRows& m, const Common& c, Op op,
                   const CopyPlan& plan, LaunchKernel launch_kernel,
                   cudaStream_t stream) {
  if (Status s = LaunchBarrier(c, op, stream); !s.ok()) return s;
  const bool copy_engine = CopiesByEngine(m);
  if (copy_engine) {
    if (Status s = ForkCopies(peer_buffers, c, plan, stream); !s.ok()) {
      return s;
    }
  }
  if (Status s = launch_kernel(); !s.ok()) return s;
  return copy_engine ? JoinCopies(peer_buffers, stream) : Status();
}

}  // namespace

Status LaunchDispatch(const runtime::PeerBuffers& peer_buffers,
                      const DispatchArgs& a, cudaStream_t stream) {
  const char* op = "dispatch";
  const DispatchRows& m = a.moved;
  DispatchParams p{Common{peer_buffers.view()}};
  if (Status s = PlanDispatch(op, peer_buffers, m, a.num_topk, &p.c, p.rows,
                              p.row_bytes, p.recv_rows);
      !s.ok()) {
    return s;
  }
  if (a.num_experts < 1 || a.num_experts > kMaxNormalExperts ||
      a.num_experts % m.num_ranks != 0) {
    return Fail(op, "num_experts must be a multiple of num_ranks in [1, " +
                        std::to_string(kMaxNormalExperts) + "], got " +
                        std::to_string(a.num_experts));
  }
  if (a.num_topk < 1 || a.num_topk > kMaxTopk || a.expert_alignment < 1) {
    return Fail(op, "need 1 <= num_topk <= " + std::to_string(kMaxTopk) +
                        " and expert_alignment >= 1, got num_topk=" +
                        std::to_string(a.num_topk) + ", expert_alignment=" +
                        std::to_string(a.expert_alignment));
  }
  p.topk_idx = a.topk_idx;
  p.topk_weights = a.topk_weights;
  p.num_topk = static_cast<int>(a.num_topk);
  p.num_local_experts = static_cast<int>(a.num_experts / m.num_ranks);
  p.expert_alignment =
      static_cast<int>(std::min<int64_t>(a.expert_alignment, 1 << 30));
  p.recv_topk_idx = a.recv_topk_idx;
  p.recv_topk_weights = a.recv_topk_weights;
  p.num_recv_per_expert = a.num_recv_per_expert;
  p.src_index = a.src_index;
  p.recv_row = a.recv_row;
  p.num_recv_tokens = a.num_recv_tokens;
  if (Status s = LaunchStageDispatch(p, stream); !s.ok()) return s;
  const CopyPlan plan{{p.rows[0], p.rows[1]},
                      {p.row_bytes[0], p.row_bytes[1]},
                      /*routing=*/true,
                      a.topk_idx,
                      a.topk_weights,
                      a.num_topk};
  return RunDispatch(
      peer_buffers, m, p.c, Op::kDispatch, plan,
      [&] {
        return LaunchDispatchKernel(p, static_cast<int>(m.tuning.num_sms),
                                    stream);
      },
      stream);
}

Status LaunchCachedDispatch(const runtime::PeerBuffers& peer_buffers,
                            const CachedDispatchArgs& a, cudaStream_t stream) {
  const char* op = "cached dispatch";
  const DispatchRows& m = a.moved;
  CachedParams p{Common{peer_buffers.view()}};
  if (Status s = PlanDispatch(op, peer_buffers, m, 0, &p.c, p.rows,
                              p.row_bytes, p.recv_rows);
      !s.ok()) {
    return s;
  }
  p.recv_row = a.recv_row;
  p.num_recv_tokens = a.num_recv_tokens;
  const int blocks = static_cast<int>(m.tuning.num_sms);
  if (!CopiesByEngine(m)) {  // pushers read the destinations' staged recv_row
    if (Status s = LaunchStageCached(p, blocks, stream); !s.ok()) return s;
  }
  const CopyPlan plan{{p.rows[0], p.rows[1]},
                      {p.row_bytes[0], p.row_bytes[1]},
                      /*routing=*/false, nullptr, nullptr, 0};
  return RunDispatch(
      peer_buffers, m, p.c, Op::kCachedDispatch, plan,
      [&] { return LaunchCachedDispatchKernel(p, blocks, stream); }, stream);
}

Status LaunchCombine(const runtime::PeerBuffers& peer_buffers,
                     const CombineArgs& a, cudaStream_t stream) {
  const char* op = "combine";
  CombineParams p{Common{peer_buffers.view()}};
  if (Status s = Plan(op, peer_buffers, a.num_ranks, a.num_tokens,
                      a.capacity, a.tuning, /*warps_push=*/true, &p.c);
      !s.ok()) {
    return s;
  }
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
  if (Status s = CheckFits(op, p.c.buffers, p.c.call); !s.ok()) return s;
  p.y = static_cast<const char*>(a.y);
  p.recv_row = a.recv_row;
  p.bias = a.bias;
  p.num_channels = static_cast<int>(a.num_channels);
  p.out = static_cast<char*>(a.out);
  if (Status s = LaunchBarrier(p.c, Op::kCombine, stream); !s.ok()) return s;
  const int blocks = static_cast<int>(a.tuning.num_sms);
  return LaunchCombineKernel(p, a.y_type, a.out_type, blocks, stream);
}

}  // namespace jax_ep::intranode
