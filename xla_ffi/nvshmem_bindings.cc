// Python bindings of the NVSHMEM runtime (csrc/runtime/nvshmem_heap.cuh), used
// by jax_ep/_src/cuda/nvshmem.py: nvshmem_unique_id, nvshmem_open and
// nvshmem_close. Failures raise ValueError (bad arguments) or RuntimeError
// (CUDA, NVSHMEM) with csrc's message.

#include <cstdint>
#include <string>

#include "bindings.h"
#include "nanobind/nanobind.h"
#include "runtime/nvshmem_heap.cuh"

namespace nb = nanobind;

namespace jax_ep {
namespace {

void RaiseUnlessOk(const Status& status) {
  if (status.ok()) return;
  const std::string message = "jax_ep NVSHMEM: " + status.message();
  if (status.code() == StatusCode::kInvalidArgument) {
    throw nb::value_error(message.c_str());
  }
  throw std::runtime_error(message);
}

}  // namespace

void BindNvshmem(nb::module_& m) {
  m.def("nvshmem_unique_id", [] {
    std::string id;
    RaiseUnlessOk(runtime::NvshmemUniqueId(&id));
    return nb::bytes(id.data(), id.size());
  });
  m.def("nvshmem_open", [](nb::bytes unique_id, int rank, int num_ranks,
                           int device, int64_t heap_bytes,
                           int64_t exchange_bytes) {
    RaiseUnlessOk(runtime::OpenNvshmemHeap(
        std::string(unique_id.c_str(), unique_id.size()), rank, num_ranks,
        device, heap_bytes, exchange_bytes));
  });
  m.def("nvshmem_close", [] { RaiseUnlessOk(runtime::CloseNvshmemHeap()); });
}

}  // namespace jax_ep
