// The NVSHMEM region of the internode row exchange (exchange.cu): where its
// flags and slots are, and the bytes a call shape needs. The kernels find
// things with RegionLayout, the launcher checks the region with it, and the
// _jax_ep_sizes module sizes the region with RegionBytes (plain C++: g++
// builds that module without CUDA), so the three cannot disagree.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "common/limits.h"

namespace jax_ep::internode {

constexpr int64_t kAlign = 256;
// A source's T tokens travel in at most this many chunks, each announced by
// one signal: the receiver starts on a chunk as soon as it is complete.
constexpr int64_t kMaxChunks = 64;
// The fewest tokens a chunk holds (a warp's sweep).
constexpr int64_t kMinChunkTokens = 32;

// One exchange call: every PE of the team (exchange.cuh: this rank's peers
// with its local index on every node, or the ranks of its node) sends rows
// of `row_bytes` to token slots [member][t].
struct ExchangeShape {
  int64_t team_size;   // Z, the PEs of the team
  int64_t num_tokens;  // T, slots per member
  int64_t row_bytes;   // B, a multiple of 16
  int64_t min_chunk_tokens = kMinChunkTokens;  // Config.rdma_chunk, or 32

  JAX_EP_HOST_DEVICE int64_t num_slots() const { return team_size * num_tokens; }
  JAX_EP_HOST_DEVICE int64_t chunk_tokens() const {
    const int64_t even = (num_tokens + kMaxChunks - 1) / kMaxChunks;
    return AlignUp(even > min_chunk_tokens ? even : min_chunk_tokens,
                   kMinChunkTokens);
  }
  JAX_EP_HOST_DEVICE int64_t num_chunks() const {
    return (num_tokens + chunk_tokens() - 1) / chunk_tokens();
  }
};

// Offsets from the region's base (the same on every PE). The flags sit at
// fixed offsets and are indexed by EP rank, so calls of any shape and team
// agree on them; the slots follow, laid out by the call's shape.
//
//   free      u64[kMaxInternodeRanks]  at rank p: the last call whose slots
//                              rank p has read out (it may take the next)
//   arrived   u64[kMaxInternodeRanks * kMaxChunks]  at p * kMaxChunks + c:
//                              the last call whose chunk c from rank p is
//                              complete
//   send_mask int32[Z * T]    the sender's own staging of the masks it puts
//   recv_mask int32[Z * T]    at i * T + t: 1 when member i sent token t
//   send_rows [Z * T] rows    the sender's staging of the rows it puts
//   recv_rows [Z * T] rows    at i * T + t: member i's row of token t
struct RegionLayout {
  ExchangeShape shape;
  JAX_EP_HOST_DEVICE static int64_t free_flags() { return 0; }
  JAX_EP_HOST_DEVICE static int64_t arrived() {
    return kMaxInternodeRanks * 8;
  }
  JAX_EP_HOST_DEVICE static int64_t flags_bytes() {
    return AlignUp(arrived() + kMaxInternodeRanks * kMaxChunks * 8, kAlign);
  }
  JAX_EP_HOST_DEVICE int64_t mask_bytes() const {
    return AlignUp(shape.num_slots() * 4, kAlign);
  }
  JAX_EP_HOST_DEVICE int64_t rows_bytes() const {
    return AlignUp(shape.num_slots() * shape.row_bytes, kAlign);
  }
  JAX_EP_HOST_DEVICE int64_t send_mask() const { return flags_bytes(); }
  JAX_EP_HOST_DEVICE int64_t recv_mask() const { return send_mask() + mask_bytes(); }
  JAX_EP_HOST_DEVICE int64_t send_rows() const { return recv_mask() + mask_bytes(); }
  JAX_EP_HOST_DEVICE int64_t recv_rows() const { return send_rows() + rows_bytes(); }
  JAX_EP_HOST_DEVICE int64_t total_bytes() const { return recv_rows() + rows_bytes(); }
};

// Region bytes that exchanges of `shape` need.
inline int64_t RegionBytes(const ExchangeShape& shape) {
  return RegionLayout{shape}.total_bytes();
}

}  // namespace jax_ep::internode
