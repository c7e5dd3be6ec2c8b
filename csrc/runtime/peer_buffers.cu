// Peer buffers: allocation, IPC export/import, peer access and the registry.
// See peer_buffers.cuh for the layout and the lifetime rules.

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "runtime/peer_buffers.cuh"

namespace jax_ep::runtime {
namespace {

// Makes `device` current for the scope and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int32_t device)
      : previous_ok_(cudaGetDevice(&previous_) == cudaSuccess),
        status_(Status::FromCuda(cudaSetDevice(device), "cudaSetDevice")) {}
  ~DeviceGuard() {
    if (previous_ok_) cudaSetDevice(previous_);
  }
  const Status& status() const { return status_; }

 private:
  int previous_ = 0;
  bool previous_ok_;
  Status status_;
};

std::string Where(int32_t device) {
  return "CUDA device " + std::to_string(device) + ": ";
}

// Lets `device` (current) address `peer`'s memory; already enabled is fine.
Status EnablePeerAccess(int32_t device, int32_t peer) {
  int can_access = 0;
  if (Status status =
          Status::FromCuda(cudaDeviceCanAccessPeer(&can_access, device, peer),
                           "cudaDeviceCanAccessPeer");
      !status.ok()) {
    return status;
  }
  if (!can_access) {
    return Status::InvalidArgument(
        "no peer access from CUDA device " + std::to_string(device) + " to " +
        std::to_string(peer) + " (not NVLink/P2P peers)");
  }
  cudaError_t error = cudaDeviceEnablePeerAccess(peer, 0);
  if (error == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // clear it: enabled is what we want
    error = cudaSuccess;
  }
  return Status::FromCuda(error, "cudaDeviceEnablePeerAccess");
}

struct Registry {
  std::mutex mutex;
  std::map<int32_t, std::shared_ptr<PeerBuffers>> entries;
};

// Never destroyed: the CUDA runtime may be gone by the time static
// destructors run; Python closes every entry at exit instead.
Registry& GetRegistry() {
  static Registry* registry = new Registry;
  return *registry;
}

}  // namespace

Status PeerBuffers::Create(int32_t device, int64_t data_bytes, int32_t rank,
                           int32_t num_ranks,
                           std::unique_ptr<PeerBuffers>* out) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    return Status::InvalidArgument("num_ranks must be in [1, " +
                                   std::to_string(kMaxRanks) + "], got " +
                                   std::to_string(num_ranks));
  }
  if (rank < 0 || rank >= num_ranks) {
    return Status::InvalidArgument("rank must be in [0, " +
                                   std::to_string(num_ranks) + "), got " +
                                   std::to_string(rank));
  }
  if (data_bytes < 0) {
    return Status::InvalidArgument("num_bytes must be >= 0, got " +
                                   std::to_string(data_bytes));
  }
  DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  std::unique_ptr<PeerBuffers> buffers(
      new PeerBuffers(device, rank, BufferLayout(data_bytes, num_ranks)));
  const int64_t total = buffers->layout_.total_bytes();
  void* base = nullptr;
  if (cudaError_t error = cudaMalloc(&base, total); error != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return Status::FromCuda(
        error,
        ("cudaMalloc of " + std::to_string(total) + " bytes (" +
         std::to_string(data_bytes) + " data + control) failed. JAX "
         "preallocates most GPU memory: leave room for jax_ep's buffers with "
         "XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.7) or "
         "XLA_PYTHON_CLIENT_PREALLOCATE=false, set before JAX starts")
            .c_str());
  }
  buffers->base_ = static_cast<char*>(base);
  // On failure the destructor frees base_.
  const BufferLayout& layout = buffers->layout_;
  char* control = buffers->base_ + layout.sequence_offset();
  if (Status status = Status::FromCuda(
          cudaMemset(control, 0, total - layout.sequence_offset()),
          "cudaMemset of the control region");
      !status.ok()) {
    return status;
  }
  if (Status status = Status::FromCuda(cudaDeviceSynchronize(),
                                       "cudaDeviceSynchronize after zeroing");
      !status.ok()) {
    return status;
  }
  if (Status status = Status::FromCuda(
          cudaIpcGetMemHandle(&buffers->ipc_handle_, base),
          "cudaIpcGetMemHandle");
      !status.ok()) {
    return status;
  }
  CopyQueue& queue = buffers->copy_queue_;
  for (Status status : {
           Status::FromCuda(cudaStreamCreateWithFlags(&queue.stream,
                                                      cudaStreamNonBlocking),
                            "cudaStreamCreate (copy queue)"),
           Status::FromCuda(cudaEventCreateWithFlags(&queue.fork,
                                                     cudaEventDisableTiming),
                            "cudaEventCreate (copy queue)"),
           Status::FromCuda(cudaEventCreateWithFlags(&queue.join,
                                                     cudaEventDisableTiming),
                            "cudaEventCreate (copy queue)")}) {
    if (!status.ok()) return status;
  }
  *out = std::move(buffers);
  return Status();
}

PeerBuffers::~PeerBuffers() {
  DeviceGuard guard(device_);
  if (copy_queue_.stream != nullptr) {
    cudaStreamSynchronize(copy_queue_.stream);
    cudaStreamDestroy(copy_queue_.stream);
  }
  if (copy_queue_.fork != nullptr) cudaEventDestroy(copy_queue_.fork);
  if (copy_queue_.join != nullptr) cudaEventDestroy(copy_queue_.join);
  for (char* mapped : ipc_mapped_) cudaIpcCloseMemHandle(mapped);
  if (base_ != nullptr) cudaFree(base_);
  cudaGetLastError();  // a destructor has nobody to report to
}

Status CreatePeerBuffers(int32_t device, int64_t data_bytes, int32_t rank,
                         int32_t num_ranks, cudaIpcMemHandle_t* handle) {
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  if (registry.entries.count(device) != 0) {
    return Status::InvalidArgument(
        Where(device) + "already created; close them first");
  }
  std::unique_ptr<PeerBuffers> buffers;
  if (Status status =
          PeerBuffers::Create(device, data_bytes, rank, num_ranks, &buffers);
      !status.ok()) {
    return status;
  }
  *handle = buffers->ipc_handle();
  registry.entries[device] = std::move(buffers);
  return Status();
}

Status OpenPeerBuffers(int32_t device,
                       const std::vector<PeerBuffers::Peer>& peers,
                       int64_t this_process) {
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  auto it = registry.entries.find(device);
  if (it == registry.entries.end()) {
    return Status::InvalidArgument(Where(device) + "open before create");
  }
  PeerBuffers& self = *it->second;
  if (self.open_) return Status::InvalidArgument(Where(device) + "already open");
  if (static_cast<int64_t>(peers.size()) != self.num_ranks()) {
    return Status::InvalidArgument(
        Where(device) + "expected " + std::to_string(self.num_ranks()) +
        " peers, got " + std::to_string(peers.size()));
  }
  DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  std::vector<char*> bases(peers.size(), nullptr);
  // On failure the mappings made so far are closed by the destructor.
  for (size_t r = 0; r < peers.size(); ++r) {
    const PeerBuffers::Peer& peer = peers[r];
    const std::string who = "rank " + std::to_string(r);
    if (static_cast<int32_t>(r) == self.rank()) {
      bases[r] = self.base();
    } else if (peer.process == this_process) {
      auto peer_it = registry.entries.find(peer.device);
      if (peer_it == registry.entries.end() ||
          peer_it->second->rank() != static_cast<int32_t>(r)) {
        return Status::InvalidArgument(
            Where(device) + who + " is CUDA device " +
            std::to_string(peer.device) +
            " of this process, which has no buffers for that rank");
      }
      if (Status status = EnablePeerAccess(device, peer.device);
          !status.ok()) {
        return status;
      }
      bases[r] = peer_it->second->base();
    } else {
      void* mapped = nullptr;
      cudaError_t error = cudaIpcOpenMemHandle(&mapped, peer.handle,
                                               cudaIpcMemLazyEnablePeerAccess);
      if (error != cudaSuccess) {
        cudaGetLastError();
        return Status::FromCuda(
            error, (Where(device) + "cudaIpcOpenMemHandle of " + who +
                    " (process " + std::to_string(peer.process) + ")")
                       .c_str());
      }
      self.ipc_mapped_.push_back(static_cast<char*>(mapped));
      bases[r] = static_cast<char*>(mapped);
    }
  }
  const BufferLayout& layout = self.layout();
  if (Status status = Status::FromCuda(
          cudaMemcpy(layout.peer_bases(self.base()), bases.data(),
                     bases.size() * sizeof(char*), cudaMemcpyHostToDevice),
          "cudaMemcpy of the peer base table");
      !status.ok()) {
    return status;
  }
  self.peer_bases_ = std::move(bases);
  self.open_ = true;
  return Status();
}

bool ClosePeerBuffers(int32_t device) {
  std::shared_ptr<PeerBuffers> buffers;
  {
    Registry& registry = GetRegistry();
    std::lock_guard<std::mutex> lock(registry.mutex);
    auto it = registry.entries.find(device);
    if (it == registry.entries.end()) return false;
    buffers = std::move(it->second);
    registry.entries.erase(it);
  }
  return true;  // freed here, or by the last holder of a reference
}

std::shared_ptr<const PeerBuffers> FindPeerBuffers(int32_t device,
                                                   std::string* why) {
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  auto it = registry.entries.find(device);
  if (it == registry.entries.end()) {
    *why = Where(device) + "none were created for this device (call "
                           "jax_ep._src.cuda.peer_buffers.create_peer_buffers "
                           "with every EP device first)";
    return nullptr;
  }
  if (!it->second->is_open()) {
    *why = Where(device) + "created but not opened";
    return nullptr;
  }
  return it->second;
}

}  // namespace jax_ep::runtime
