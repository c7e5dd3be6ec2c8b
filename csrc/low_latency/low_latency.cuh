// Low-latency (decoding) dispatch and combine over NVSHMEM: the symmetric
// heap layout, the arguments and the host launchers of the four halves
// (dispatch send / receive, combine send / receive). The protocol is
// described at the top of kernels.cuh (what both halves share), send.cu and
// receive.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"

namespace jax_ep::low_latency {

constexpr int64_t kAlign = 256;
constexpr int64_t kScaleGroup = 128;  // channels per fp8 scale
// A count signal is (sequence << kCountBits) | count.
constexpr int kCountBits = 24;
// R * Tmax slots per local expert are indexed in shared memory (int32 each).
constexpr int64_t kMaxSlotsPerExpert = 8192;
constexpr int64_t kMaxRanks = 64;
constexpr int64_t kMaxExperts = 4096;
constexpr int kMaxTopk = 32;
// Tokens per source are swept 32 at a time with one bit per sweep and lane
// (WaitRows, receive.cu).
constexpr int64_t kMaxTokens = 32 * 32;

__host__ __device__ inline int64_t AlignUp(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

// The shapes of one call; every rank derives the same heap offsets from them.
struct Shape {
  int64_t num_tokens;   // T (this rank's tokens; <= Tmax)
  int64_t max_tokens;   // Tmax
  int64_t hidden;       // H
  int64_t num_topk;     // K
  int64_t num_experts;  // E
  int64_t num_ranks;    // R

  __host__ __device__ int64_t num_local() const { return num_experts / num_ranks; }
  // Message and combine-row slots: one per (expert, token index) pair.
  __host__ __device__ int64_t num_slots() const { return num_experts * max_tokens; }
  // A dispatched message: the bf16 row, or the e4m3 row then its f32 scales.
  __host__ __device__ int64_t message_bytes() const {
    return AlignUp(2 * hidden, 16);
  }
  __host__ __device__ int64_t combine_row_bytes() const { return 2 * hidden; }
};

// One buffer set of the symmetric heap (two sets alternate, by sequence
// parity). Flags come first, in a region of a fixed share of the set, so that
// calls of different shapes never read another call's data as a flag. The
// words whose values are not plain sequence numbers sit at fixed offsets, so
// that no call reads another shape's count signal as a flag.
//
//   flags region (set_bytes / kFlagShare):
//     received        u64[kMaxRanks]    the last call rank s has received
//                                       from this set, at s
//     counts          u64[kMaxExperts]  count signal of (l, s) at l * R + s
//     dispatch_flags  u64[E, Tmax]   message (local expert l of the receiver,
//                                    source s, token t) at (l * R + s) * Tmax + t
//     combine_flags   u64[E, Tmax]   combine row (global expert e, token t)
//   data region:
//     dispatch_data   [E * Tmax] messages, indexed like dispatch_flags
//     combine_data    [E * Tmax] bf16 rows of H, indexed like combine_flags
//     dispatch_stage  [T] messages: the send half's cast rows (put transport)
//     combine_stage   [E * Tmax] bf16 rows: y staged for puts (put transport
//                     without zero_copy)
constexpr int64_t kFlagShare = 64;

struct SetLayout {
  Shape shape;
  __host__ __device__ int64_t received() const { return 0; }
  __host__ __device__ int64_t counts() const { return kMaxRanks * 8; }
  __host__ __device__ int64_t dispatch_flags() const {
    return (kMaxRanks + kMaxExperts) * 8;
  }
  __host__ __device__ int64_t combine_flags() const {
    return dispatch_flags() + shape.num_slots() * 8;
  }
  __host__ __device__ int64_t flags_bytes() const {
    return AlignUp(combine_flags() + shape.num_slots() * 8, kAlign);
  }
  // Offsets from the start of the data region.
  __host__ __device__ int64_t dispatch_data() const { return 0; }
  __host__ __device__ int64_t combine_data() const {
    return AlignUp(shape.num_slots() * shape.message_bytes(), kAlign);
  }
  __host__ __device__ int64_t dispatch_stage() const {
    return combine_data() +
           AlignUp(shape.num_slots() * shape.combine_row_bytes(), kAlign);
  }
  __host__ __device__ int64_t combine_stage() const {
    return dispatch_stage() +
           AlignUp(shape.max_tokens * shape.message_bytes(), kAlign);
  }
  __host__ __device__ int64_t data_bytes() const {
    return combine_stage() +
           AlignUp(shape.num_slots() * shape.combine_row_bytes(), kAlign);
  }
};

// Bytes of the whole heap (both sets) that calls of `shape` need.
int64_t HeapBytes(const Shape& shape);

// Where a call's set lives, as the kernels see it.
struct SetView {
  char* flags;  // the set's flags region (symmetric address)
  char* data;   // the set's data region (symmetric address)
};

// Device-resident state shared by every low-latency call of this process:
// the sequence number of the last send (its parity picks the set), and the
// finished-block counts the send kernels use to advance it once and the
// receive kernels to tell the peers once that they are done.
struct State {
  unsigned long long sequence;
  unsigned int send_blocks_done;
  unsigned int recv_blocks_done;
};

// The heap as the launchers get it from the runtime (csrc/runtime/nvshmem_heap).
struct Heap {
  char* base = nullptr;      // symmetric: the same offsets on every PE
  int64_t set_bytes = 0;     // bytes per set; set i starts at base + i * set_bytes
  State* state = nullptr;    // device memory, zero at start
  int rank = 0;              // this PE
  int num_ranks = 0;
  int num_sms = 0;
};

// InvalidArgument, naming `op`, unless the kernels take calls of `shape` and
// `heap` is large enough for them (shape.cu). Every launcher checks it first.
Status CheckShape(const char* op, const Heap& heap, const Shape& shape);

struct Options {
  bool force_put = false;  // NVSHMEM puts even to peers reachable by P2P stores
  int64_t timeout_ns = 0;
};

// --- Dispatch -----------------------------------------------------------------

struct DispatchSendArgs {
  Shape shape;
  const void* x;           // bf16[T, H]
  const int32_t* topk_idx;  // [T, K]
  bool use_fp8 = false;
  bool round_scale = false;
  Options options;
  uint32_t* ticket;        // out u32[2]: the call's sequence number (lo, hi)
};

struct DispatchRecvArgs {
  Shape shape;
  const uint32_t* ticket;  // the send half's
  bool use_fp8 = false;
  bool use_ue8m0 = false;
  bool zero_padding = true;
  Options options;
  void* recv_x;            // [L, R*Tmax, H] e4m3 or bf16
  void* recv_scales;       // f32[L, R*Tmax, H/128], i32[L, R*Tmax, H/512] or null
  int32_t* count;          // [L]
  int32_t* src_index;      // [L, R*Tmax]
  int32_t* slot;           // [L, R*Tmax]
};

// --- Combine ------------------------------------------------------------------

struct CombineSendArgs {
  Shape shape;
  const void* y;            // bf16[L, R*Tmax, H]
  const int32_t* src_index;  // [L, R*Tmax], the dispatch handle's
  bool zero_copy = false;    // puts read y in place instead of a staged copy
  Options options;
  uint32_t* ticket;
};

struct CombineRecvArgs {
  Shape shape;
  const uint32_t* ticket;
  const int32_t* topk_idx;   // [T, K]
  const float* weights;      // [T, K]
  Options options;
  void* out;                 // bf16[T, H]
};

// Each launcher checks the shapes against the heap and enqueues one kernel on
// `stream`; it allocates nothing and never waits for the device.
Status LaunchDispatchSend(const Heap& heap, const DispatchSendArgs& a,
                          cudaStream_t stream);
Status LaunchDispatchRecv(const Heap& heap, const DispatchRecvArgs& a,
                          cudaStream_t stream);
Status LaunchCombineSend(const Heap& heap, const CombineSendArgs& a,
                         cudaStream_t stream);
Status LaunchCombineRecv(const Heap& heap, const CombineRecvArgs& a,
                         cudaStream_t stream);

}  // namespace jax_ep::low_latency
