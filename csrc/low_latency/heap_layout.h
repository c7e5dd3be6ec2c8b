// The NVSHMEM heap of the low-latency kernels: the shapes of a call, where a
// buffer set keeps its flags and data, and the heap a shape needs. The
// kernels find things with SetLayout, the launchers check the heap with it,
// and the _jax_ep_sizes module sizes the heap with HeapBytes (plain C++: g++
// builds that module without CUDA), so the three cannot disagree.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/host_device.h"
#include "common/limits.h"

namespace jax_ep::low_latency {

constexpr int64_t kAlign = 256;

// The shapes of one call; every rank derives the same heap offsets from them.
struct Shape {
  int64_t num_tokens;   // T (this rank's tokens; <= Tmax)
  int64_t max_tokens;   // Tmax
  int64_t hidden;       // H
  int64_t num_topk;     // K
  int64_t num_experts;  // E
  int64_t num_ranks;    // R

  JAX_EP_HOST_DEVICE int64_t num_local() const {
    return num_experts / num_ranks;
  }
  // Message and combine-row slots: one per (expert, token index) pair.
  JAX_EP_HOST_DEVICE int64_t num_slots() const {
    return num_experts * max_tokens;
  }
  // A dispatched message: the bf16 row, or the e4m3 row then its f32 scales.
  JAX_EP_HOST_DEVICE int64_t message_bytes() const {
    return AlignUp(2 * hidden, 16);
  }
  JAX_EP_HOST_DEVICE int64_t combine_row_bytes() const { return 2 * hidden; }
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
//     counts          u64[kMaxLowLatencyExperts]
//                                       count signal of (l, s) at l * R + s
//     dispatch_flags  u64[E, Tmax]   message (local expert l of the receiver,
//                                    source s, token t) at
//                                    (l * R + s) * Tmax + t
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
  JAX_EP_HOST_DEVICE int64_t received() const { return 0; }
  JAX_EP_HOST_DEVICE int64_t counts() const { return kMaxRanks * 8; }
  JAX_EP_HOST_DEVICE int64_t dispatch_flags() const {
    return (kMaxRanks + kMaxLowLatencyExperts) * 8;
  }
  JAX_EP_HOST_DEVICE int64_t combine_flags() const {
    return dispatch_flags() + shape.num_slots() * 8;
  }
  JAX_EP_HOST_DEVICE int64_t flags_bytes() const {
    return AlignUp(combine_flags() + shape.num_slots() * 8, kAlign);
  }
  // Offsets from the start of the data region.
  JAX_EP_HOST_DEVICE int64_t dispatch_data() const { return 0; }
  JAX_EP_HOST_DEVICE int64_t combine_data() const {
    return AlignUp(shape.num_slots() * shape.message_bytes(), kAlign);
  }
  JAX_EP_HOST_DEVICE int64_t dispatch_stage() const {
    return combine_data() +
           AlignUp(shape.num_slots() * shape.combine_row_bytes(), kAlign);
  }
  JAX_EP_HOST_DEVICE int64_t combine_stage() const {
    return dispatch_stage() +
           AlignUp(shape.max_tokens * shape.message_bytes(), kAlign);
  }
  JAX_EP_HOST_DEVICE int64_t data_bytes() const {
    return combine_stage() +
           AlignUp(shape.num_slots() * shape.combine_row_bytes(), kAlign);
  }
};

// Bytes of the whole heap (both sets) that calls of `shape` need.
inline int64_t HeapBytes(const Shape& shape) {
  const SetLayout layout{shape};
  const int64_t unit = kFlagShare * kAlign;
  // The flags fit in set / kFlagShare, the data in the rest.
  const int64_t set = std::max(layout.flags_bytes() * kFlagShare,
                               (layout.data_bytes() * kFlagShare +
                                kFlagShare - 2) / (kFlagShare - 1));
  return 2 * AlignUp(set, unit);
}

}  // namespace jax_ep::low_latency
