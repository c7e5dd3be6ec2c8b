// Low-latency (decoding) dispatch and combine over NVSHMEM: the arguments and
// the host launchers of the two ops, each as one kernel or as its send and
// receive halves. The symmetric heap's layout is in heap_layout.h; the
// protocol is described at the top of kernels.cuh (what both ops share),
// dispatch.cu and combine.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/limits.h"
#include "common/status.h"
#include "low_latency/heap_layout.h"

namespace jax_ep::low_latency {

constexpr int64_t kScaleGroup = 128;  // channels per fp8 scale
// A count signal is (sequence << kCountBits) | count.
constexpr int kCountBits = 24;

// Device-resident state shared by every low-latency call of this process:
// the sequence number of the last send (its parity picks the set), and the
// finished-block counts the kernels use to act once per call: a send (or
// whole-op) kernel's last block advances the sequence, a receive (or
// whole-op) kernel's tells the peers that it is done.
struct State {
  unsigned long long sequence;
  unsigned int send_blocks_done;
  unsigned int recv_blocks_done;
};

// The heap as the launchers get it from the runtime (csrc/runtime/nvshmem_heap).
// A kernel parameter: the peers' mappings are read from the constant bank, not
// looked up per access (nvshmem_ptr's lookup cost microseconds per kernel).
struct Heap {
  char* base = nullptr;      // symmetric: the same offsets on every PE
  int64_t set_bytes = 0;     // bytes per set; set i starts at base + i * set_bytes
  State* state = nullptr;    // device memory, zero at start
  int rank = 0;              // this PE
  int num_ranks = 0;
  int num_sms = 0;
  // nvshmem_ptr(base, pe): where PE pe's heap is mapped in this process
  // (NVLink P2P, or this PE's own), null where only NVSHMEM puts reach it.
  char* peer_base[kMaxRanks] = {};
};

// InvalidArgument, naming `op`, unless the kernels take calls of `shape` and
// `heap` is large enough for them (shape.cu). Every launcher checks it first.
Status CheckShape(const char* op, const Heap& heap, const Shape& shape);

struct Options {
  bool force_put = false;  // NVSHMEM puts even to peers reachable by P2P stores
  int64_t timeout_ns = 0;
};

// Which halves a launch runs: the send half returns a ticket that the receive
// half takes; the whole op runs both in one kernel.
enum class Halves { kSend, kReceive, kBoth };

// --- Dispatch -----------------------------------------------------------------

struct DispatchArgs {
  Shape shape;
  Options options;
  bool use_fp8 = false;
  bool round_scale = false;  // fp8 scales rounded to powers of 2
  bool use_ue8m0 = false;    // receive: scales as packed exponents
  bool zero_padding = true;  // receive: zero the slots past each count
  // Both: the tokens (the receive casts the rows of this rank's experts
  // itself).
  const void* x = nullptr;            // bf16[T, H]
  const int32_t* topk_idx = nullptr;  // [T, K]
  // Send.
  // The call's sequence number as u32[2] (lo, hi): written by the send half,
  // read by the receive half; unused by the whole op.
  uint32_t* ticket = nullptr;
  // Receive.
  void* recv_x = nullptr;          // [L, R*Tmax, H] e4m3 or bf16
  void* recv_scales = nullptr;     // f32[L, R*Tmax, H/128], i32[L, R*Tmax, H/512]
                                   // or null
  int32_t* count = nullptr;        // [L]
  int32_t* src_index = nullptr;    // [L, R*Tmax]
  int32_t* slot = nullptr;         // [L, R*Tmax]
};

// --- Combine ------------------------------------------------------------------

struct CombineArgs {
  Shape shape;
  Options options;
  // Both: the rows of this rank's experts (the receive reads its own tokens'
  // in place).
  const void* y = nullptr;  // bf16[L, R*Tmax, H]
  // Send.
  const int32_t* src_index = nullptr;  // [L, R*Tmax], the dispatch handle's
  bool zero_copy = false;  // puts read y in place instead of a staged copy
  uint32_t* ticket = nullptr;  // as DispatchArgs::ticket
  // Receive.
  const int32_t* slot = nullptr;      // [L, R*Tmax], the dispatch handle's
  const int32_t* topk_idx = nullptr;  // [T, K]
  const float* weights = nullptr;     // [T, K]
  void* out = nullptr;                // bf16[T, H]
};

// Sets the kernels' attributes (their shared memory) once per process; the
// runtime calls it when it opens the heap, before any launch.
Status PrepareKernels();

// Each launcher checks the shapes against the heap and enqueues one kernel on
// `stream` that runs `halves` of the op; it allocates nothing and never waits
// for the device.
Status LaunchDispatch(const Heap& heap, const DispatchArgs& a, Halves halves,
                      cudaStream_t stream);
Status LaunchCombine(const Heap& heap, const CombineArgs& a, Halves halves,
                     cudaStream_t stream);

}  // namespace jax_ep::low_latency
