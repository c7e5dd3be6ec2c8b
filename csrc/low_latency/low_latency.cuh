// Low-latency (decoding) dispatch and combine over NVSHMEM: the arguments and
// the host launchers of the four halves (dispatch send / receive, combine
// send / receive). The symmetric heap's layout is in heap_layout.h; the
// protocol is described at the top of kernels.cuh (what both halves share),
// send.cu and receive.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "low_latency/heap_layout.h"

namespace jax_ep::low_latency {

constexpr int64_t kScaleGroup = 128;  // channels per fp8 scale
// A count signal is (sequence << kCountBits) | count.
constexpr int kCountBits = 24;

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
