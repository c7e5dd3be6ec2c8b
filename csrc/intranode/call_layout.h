// The data region of the intranode peer buffers as one dispatch or combine
// uses it (which rank writes which slot, where each array sits), and the
// bytes a call of given shapes needs. The kernels find
// things with CallLayout and the _jax_ep_sizes module sizes the region with
// RequiredDataBytes (plain C++: g++ builds that module without CUDA), so the
// two cannot disagree.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/host_device.h"

namespace jax_ep::intranode {

// Slot q of a receiver's data region holds what its q-th other rank sends it.
JAX_EP_HOST_DEVICE inline int PeerSlot(int source, int receiver) {
  return source < receiver ? source : source - 1;
}

// The data region as one call uses it. Every rank derives the same layout
// from the call's shapes, so an offset is valid in every peer's region.
//
//   scratch  int32[R, T]: a fresh dispatch's positions (read by this rank
//            only) or a cached dispatch's staged recv_row (read by peers)
//   R - 1 peer slots, slot PeerSlot(s, me) written by rank s only, each:
//     rows0    [T, row_bytes[0]]   token t's row at t (x, fp8 rows or y)
//     rows1    [T, row_bytes[1]]   fp8 scales, or empty
//     row_of   int32[T]            dispatch: t's position among the tokens s
//                                  sends here (-1: none); combine: t's row
//                                  at s, or M
//     topk_idx int32[T, K]         dispatch: token t's expert ids
//     weights  f32[T, K]           dispatch: token t's weights
// Sections are 256-byte aligned.
struct CallLayout {
  int64_t num_tokens;    // T
  int64_t num_ranks;     // R
  int64_t num_topk;      // K (0 for combine and cached dispatch)
  int64_t row_bytes[2];  // bytes per token of the (up to) two row arrays

  JAX_EP_HOST_DEVICE int64_t section(int64_t bytes) const {
    return AlignUp(bytes, 256);
  }
  JAX_EP_HOST_DEVICE int64_t scratch_bytes() const {
    return section(num_ranks * num_tokens * 4);
  }
  JAX_EP_HOST_DEVICE int64_t rows_offset(int i) const {
    return i == 0 ? 0 : section(num_tokens * row_bytes[0]);
  }
  JAX_EP_HOST_DEVICE int64_t row_of_offset() const {
    return rows_offset(1) + section(num_tokens * row_bytes[1]);
  }
  JAX_EP_HOST_DEVICE int64_t topk_idx_offset() const {
    return row_of_offset() + section(num_tokens * 4);
  }
  JAX_EP_HOST_DEVICE int64_t weights_offset() const {
    return topk_idx_offset() + section(num_tokens * num_topk * 4);
  }
  JAX_EP_HOST_DEVICE int64_t slot_bytes() const {
    return weights_offset() + section(num_tokens * num_topk * 4);
  }
  JAX_EP_HOST_DEVICE int64_t bytes() const {
    return scratch_bytes() + (num_ranks - 1) * slot_bytes();
  }

  JAX_EP_HOST_DEVICE int32_t* scratch(char* base) const {
    return reinterpret_cast<int32_t*>(base);
  }
  JAX_EP_HOST_DEVICE char* slot(char* base, int q) const {
    return base + scratch_bytes() + q * slot_bytes();
  }
  JAX_EP_HOST_DEVICE char* rows(char* base, int q, int i) const {
    return slot(base, q) + rows_offset(i);
  }
  JAX_EP_HOST_DEVICE int32_t* row_of(char* base, int q) const {
    return reinterpret_cast<int32_t*>(slot(base, q) + row_of_offset());
  }
  JAX_EP_HOST_DEVICE int32_t* topk_idx(char* base, int q) const {
    return reinterpret_cast<int32_t*>(slot(base, q) + topk_idx_offset());
  }
  JAX_EP_HOST_DEVICE float* weights(char* base, int q) const {
    return reinterpret_cast<float*>(slot(base, q) + weights_offset());
  }
};

// Data-region bytes that a dispatch (rows of row_bytes + scale_row_bytes,
// top-K) and a combine (rows of combine_row_bytes) of T tokens over R ranks
// need: the larger of the two layouts.
inline int64_t RequiredDataBytes(int64_t num_tokens, int64_t num_ranks,
                                 int64_t num_topk, int64_t row_bytes,
                                 int64_t scale_row_bytes,
                                 int64_t combine_row_bytes) {
  const CallLayout dispatch{num_tokens, num_ranks, num_topk,
                            {row_bytes, scale_row_bytes}};
  const CallLayout combine{num_tokens, num_ranks, 0, {combine_row_bytes, 0}};
  return std::max(dispatch.bytes(), combine.bytes());
}

}  // namespace jax_ep::intranode
