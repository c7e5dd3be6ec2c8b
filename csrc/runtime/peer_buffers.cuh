// Peer buffers: one device allocation per EP rank of a host, writable by every
// other rank of the host over NVLink.
//
// Each local device of the EP axis gets ONE cudaMalloc of
// BufferLayout::total_bytes():
//
//   [0, data_bytes)            data region, for the dispatch/combine kernels
//   [data_bytes, total_bytes)  control region (ControlLayout): this device's
//                              call sequence counter, one flag per source
//                              rank, the count slots (double-buffered), the
//                              R peer base pointers the kernels use and the
//                              chunk arrival flags of dispatch and combine.
//
// Peers are opened with cudaIpcOpenMemHandle when they live in another
// process and by raw pointer plus cudaDeviceEnablePeerAccess when they live
// in this one (a process may drive several GPUs). The control region is zeroed
// (and the device synchronized) before Create returns, so no peer can see
// stale flags once handles have been exchanged.
//
// The registry maps a CUDA device ordinal of this process to its PeerBuffers;
// the FFI handlers look their device up there. Closing a device's buffers
// while a kernel that uses them runs, on this or any peer rank, is undefined:
// close collectively, after every rank's work has finished.
#pragma once

#include <cuda_runtime.h>  // also defines __host__ and __device__ for g++

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/host_device.h"
#include "common/limits.h"
#include "common/status.h"

namespace jax_ep::runtime {

// Arrival flags per source rank: the most chunks one dispatch or combine call
// may split a source's tokens into.
inline constexpr int64_t kMaxChunks = 4096;
inline constexpr int64_t kIpcHandleBytes = sizeof(cudaIpcMemHandle_t);
static_assert(kIpcHandleBytes == 64, "cudaIpcMemHandle_t is 64 bytes");

// Byte layout of one rank's allocation, used both to size it (host) and to
// find things in it (host and device). Every rank of an EP group has the same
// layout, so an offset into one rank's allocation is valid in every peer's.
struct BufferLayout {
  int64_t data_bytes;  // requested data region, rounded up to 256 bytes
  int64_t num_ranks;   // R
  // Ints per count slot: a source's count row (R) plus the per-expert counts
  // it sends to one destination (L = E / R <= kMaxNormalExperts / R).
  int64_t slot_ints;

  __host__ __device__ BufferLayout(int64_t requested_data_bytes,
                                   int64_t ranks)
      : data_bytes(AlignUp(requested_data_bytes, 256)),
        num_ranks(ranks),
        slot_ints(AlignUp(ranks + kMaxNormalExperts / ranks, 4)) {}

  // Control region, relative to the allocation's base. 128-byte sections.
  __host__ __device__ int64_t sequence_offset() const { return data_bytes; }
  __host__ __device__ int64_t flags_offset() const {
    return sequence_offset() + 128;
  }
  __host__ __device__ int64_t peer_bases_offset() const {
    return flags_offset() + AlignUp(num_ranks * sizeof(uint64_t), 128);
  }
  __host__ __device__ int64_t slots_offset() const {
    return peer_bases_offset() + AlignUp(num_ranks * sizeof(void*), 128);
  }
  __host__ __device__ int64_t arrivals_offset() const {
    return slots_offset() +
           AlignUp(2 * num_ranks * slot_ints * sizeof(int32_t), 128);
  }
  __host__ __device__ int64_t total_bytes() const {
    return arrivals_offset() + num_ranks * kMaxChunks * sizeof(uint64_t);
  }

  // This device's call counter (only this device writes it).
  __host__ __device__ uint64_t* sequence(char* base) const {
    return reinterpret_cast<uint64_t*>(base + sequence_offset());
  }
  // flags(base)[s]: the last call sequence rank s released to this rank.
  __host__ __device__ uint64_t* flags(char* base) const {
    return reinterpret_cast<uint64_t*>(base + flags_offset());
  }
  // peer_bases(base)[r]: rank r's allocation as this device addresses it.
  __host__ __device__ char** peer_bases(char* base) const {
    return reinterpret_cast<char**>(base + peer_bases_offset());
  }
  // arrivals(base)[s * kMaxChunks + c]: the last call sequence for which rank
  // s finished writing chunk c into this rank's data region.
  __host__ __device__ uint64_t* arrivals(char* base) const {
    return reinterpret_cast<uint64_t*>(base + arrivals_offset());
  }
  // The count slot rank `source` writes for call sequences of parity
  // `parity` (the stage kernel of a fresh dispatch).
  __host__ __device__ int32_t* slot(char* base, int64_t parity,
                                    int64_t source) const {
    return reinterpret_cast<int32_t*>(base + slots_offset()) +
           (parity * num_ranks + source) * slot_ints;
  }
};

// A side stream of the device, for copy-engine transfers into the peers'
// buffers that overlap the kernels on XLA's stream: `fork` is recorded on
// XLA's stream and waited for here, `join` the other way round.
struct CopyQueue {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr;
  cudaEvent_t join = nullptr;
};

// What a kernel needs to reach this rank's and its peers' buffers.
struct PeerView {
  char* local_base;  // this rank's allocation (device pointer)
  BufferLayout layout;
  int32_t rank;
};

// One rank's allocation and its mappings of the peers'. Owned by the
// registry; copy and move deleted.
class PeerBuffers {
 public:
  // How to reach one peer: its IPC handle, its process and (when it is in
  // this process) its CUDA device ordinal.
  struct Peer {
    cudaIpcMemHandle_t handle;
    int64_t process;
    int32_t device;  // meaningful only when process == this process
  };

  // Allocates and zeroes the buffer on `device`. The failure message of an
  // out-of-memory cudaMalloc says how to make room under JAX.
  static Status Create(int32_t device, int64_t data_bytes, int32_t rank,
                       int32_t num_ranks, std::unique_ptr<PeerBuffers>* out);
  ~PeerBuffers();
  PeerBuffers(const PeerBuffers&) = delete;
  PeerBuffers& operator=(const PeerBuffers&) = delete;

  const cudaIpcMemHandle_t& ipc_handle() const { return ipc_handle_; }
  int32_t device() const { return device_; }
  int32_t rank() const { return rank_; }
  int32_t num_ranks() const { return layout_.num_ranks; }
  const BufferLayout& layout() const { return layout_; }
  char* base() const { return base_; }
  bool is_open() const { return open_; }
  PeerView view() const { return PeerView{base_, layout_, rank_}; }
  // Rank r's allocation as this device addresses it (host side of the
  // table the kernels read), once open.
  char* peer_base(int r) const { return peer_bases_[r]; }
  const CopyQueue& copy_queue() const { return copy_queue_; }

 private:
  friend Status OpenPeerBuffers(int32_t device, const std::vector<Peer>& peers,
                                int64_t this_process);
  PeerBuffers(int32_t device, int32_t rank, BufferLayout layout)
      : device_(device), rank_(rank), layout_(layout) {}

  int32_t device_;
  int32_t rank_;
  BufferLayout layout_;
  char* base_ = nullptr;
  cudaIpcMemHandle_t ipc_handle_{};
  std::vector<char*> peer_bases_;      // indexed by rank
  std::vector<char*> ipc_mapped_;      // to close with cudaIpcCloseMemHandle
  bool open_ = false;
  CopyQueue copy_queue_;
};

// --- Registry: one PeerBuffers per CUDA device ordinal of this process. ------

// Creates and registers the buffers of `device`; fails if it has some.
Status CreatePeerBuffers(int32_t device, int64_t data_bytes, int32_t rank,
                         int32_t num_ranks, cudaIpcMemHandle_t* handle);
// Maps every peer (`peers` in rank order) and writes the device-side
// peer-base table. Same-process peers must already be created.
Status OpenPeerBuffers(int32_t device, const std::vector<PeerBuffers::Peer>& peers,
                       int64_t this_process);
// Unregisters and frees the buffers of `device`; false when it had none.
bool ClosePeerBuffers(int32_t device);
// The opened buffers of `device`, or null (with a reason in `why`).
std::shared_ptr<const PeerBuffers> FindPeerBuffers(int32_t device,
                                                   std::string* why);

}  // namespace jax_ep::runtime
