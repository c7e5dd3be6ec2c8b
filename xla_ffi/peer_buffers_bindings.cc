// Python bindings of csrc's peer-buffer registry (runtime/peer_buffers.cuh),
// used by jax_ep/_src/cuda/peer_buffers.py. Failures raise RuntimeError
// (CUDA) or ValueError (bad arguments) with csrc's message.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/limits.h"
#include "nanobind/nanobind.h"
#include "nanobind/stl/vector.h"
#include "runtime/peer_buffers.cuh"

namespace nb = nanobind;

namespace jax_ep {
namespace {

void RaiseUnlessOk(const Status& status) {
  if (status.ok()) return;
  const std::string message = "jax_ep peer buffers: " + status.message();
  if (status.code() == StatusCode::kInvalidArgument) {
    throw nb::value_error(message.c_str());
  }
  throw std::runtime_error(message);
}

nb::bytes Create(int32_t device, int64_t num_bytes, int32_t rank,
                 int32_t num_ranks) {
  cudaIpcMemHandle_t handle;
  RaiseUnlessOk(runtime::CreatePeerBuffers(device, num_bytes, rank, num_ranks,
                                           &handle));
  return nb::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void Open(int32_t device, nb::bytes handles,
          const std::vector<int64_t>& processes,
          const std::vector<int32_t>& devices, int64_t this_process) {
  const size_t num_ranks = processes.size();
  if (devices.size() != num_ranks ||
      handles.size() != num_ranks * runtime::kIpcHandleBytes) {
    throw nb::value_error(
        ("jax_ep peer buffers: open needs one process, device and " +
         std::to_string(runtime::kIpcHandleBytes) +
         "-byte handle per rank, got " + std::to_string(processes.size()) +
         ", " + std::to_string(devices.size()) + " and " +
         std::to_string(handles.size()) + " bytes")
            .c_str());
  }
  std::vector<runtime::PeerBuffers::Peer> peers(num_ranks);
  for (size_t r = 0; r < num_ranks; ++r) {
    std::memcpy(&peers[r].handle,
                static_cast<const char*>(handles.data()) +
                    r * runtime::kIpcHandleBytes,
                runtime::kIpcHandleBytes);
    peers[r].process = processes[r];
    peers[r].device = devices[r];
  }
  RaiseUnlessOk(runtime::OpenPeerBuffers(device, peers, this_process));
}

nb::dict Layout(int64_t num_bytes, int64_t num_ranks) {
  if (num_ranks < 1 || num_ranks > kMaxRanks || num_bytes < 0) {
    throw nb::value_error(
        ("jax_ep peer buffers: need 1 <= num_ranks <= " +
         std::to_string(kMaxRanks) + " and num_bytes >= 0, got " +
         std::to_string(num_ranks) + " and " + std::to_string(num_bytes))
            .c_str());
  }
  const runtime::BufferLayout layout(num_bytes, num_ranks);
  nb::dict out;
  out["data_bytes"] = layout.data_bytes;
  out["total_bytes"] = layout.total_bytes();
  return out;
}

}  // namespace

void BindPeerBuffers(nb::module_& m) {
  m.def("peer_buffers_create", &Create, nb::arg("device"),
        nb::arg("num_bytes"), nb::arg("rank"), nb::arg("num_ranks"),
        "Allocates and zeroes the peer buffer of CUDA device `device` "
        "(ordinal in this process) for EP rank `rank` of `num_ranks`; returns "
        "its 64-byte CUDA IPC handle.");
  m.def("peer_buffers_open", &Open, nb::arg("device"), nb::arg("handles"),
        nb::arg("processes"), nb::arg("devices"), nb::arg("this_process"),
        "Maps every rank's buffer into `device`'s: `handles` holds the ranks' "
        "IPC handles in rank order; ranks whose process is `this_process` are "
        "reached by peer access through their CUDA device `devices[r]`.");
  m.def("peer_buffers_close", &runtime::ClosePeerBuffers, nb::arg("device"),
        "Frees `device`'s buffers and closes its peer mappings; False when it "
        "had none.");
  m.def("peer_buffers_layout", &Layout, nb::arg("num_bytes"),
        nb::arg("num_ranks"),
        "Sizes of one rank's allocation for a data region of `num_bytes`.");
}

}  // namespace jax_ep
