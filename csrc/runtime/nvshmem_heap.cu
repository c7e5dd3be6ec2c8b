#include "runtime/nvshmem_heap.cuh"

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <mutex>

namespace jax_ep::runtime {
namespace {

std::mutex mu;
low_latency::Heap open_heap;  // base == nullptr: none open
bool nvshmem_up = false;

Status Cuda(cudaError_t e, const char* what) { return Status::FromCuda(e, what); }

}  // namespace

Status NvshmemUniqueId(std::string* id) {
  nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (int rc = nvshmemx_get_uniqueid(&uid); rc != 0) {
    return Status::InvalidArgument("nvshmemx_get_uniqueid failed with " +
                                   std::to_string(rc));
  }
  id->assign(reinterpret_cast<const char*>(&uid), sizeof(uid));
  return Status();
}

Status OpenNvshmemHeap(const std::string& unique_id, int rank, int num_ranks,
                       int device, int64_t heap_bytes) {
  std::lock_guard<std::mutex> lock(mu);
  if (open_heap.base != nullptr || nvshmem_up) {
    return Status::InvalidArgument(
        "an NVSHMEM heap is already open in this process (one per process; "
        "close the Buffer that owns it first)");
  }
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    return Status::InvalidArgument(
        "the NVSHMEM unique id must have " +
        std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes, got " +
        std::to_string(unique_id.size()));
  }
  if (heap_bytes <= 0 || rank < 0 || rank >= num_ranks) {
    return Status::InvalidArgument("bad heap size, rank or number of ranks");
  }
  if (Status s = Cuda(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  nvshmemx_uniqueid_t uid;
  std::memcpy(&uid, unique_id.data(), sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &uid, &attr);
  // nvshmemx_init_attr without its exit(): a failure becomes an error.
  nvshmemx_init_init_attr_ver_only(attr);
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION,
                                      NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  if (int rc = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided,
                                    NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
      rc != 0) {
    return Status::InvalidArgument(
        "NVSHMEM initialization failed (" + std::to_string(rc) +
        "); NVSHMEM's own log above says why (NVSHMEM_DEBUG=INFO for more)");
  }
  nvshmem_up = true;
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    return Status::InvalidArgument("NVSHMEM numbered this process " +
                                   std::to_string(nvshmem_my_pe()) + " of " +
                                   std::to_string(nvshmem_n_pes()) +
                                   ", expected " + std::to_string(rank) +
                                   " of " + std::to_string(num_ranks));
  }
  void* base = nvshmem_malloc(static_cast<size_t>(heap_bytes));
  if (base == nullptr) {
    return Status::InvalidArgument(
        "nvshmem_malloc of " + std::to_string(heap_bytes) +
        " bytes failed: NVSHMEM_SYMMETRIC_SIZE must exceed it (jax_ep sets it "
        "unless you did) and the GPU needs that much memory outside JAX's "
        "pool (lower XLA_PYTHON_CLIENT_MEM_FRACTION)");
  }
  low_latency::State* state = nullptr;
  for (Status s : {Cuda(cudaMemset(base, 0, heap_bytes), "zeroing the heap"),
                   Cuda(cudaMalloc(&state, sizeof(*state)), "cudaMalloc state"),
                   Cuda(cudaMemset(state, 0, sizeof(*state)), "zeroing state"),
                   Cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize")}) {
    if (!s.ok()) return s;
  }
  nvshmem_barrier_all();
  int sms = 0;
  if (Status s = Cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                             device), "SM count");
      !s.ok()) {
    return s;
  }
  constexpr int64_t unit = low_latency::kFlagShare * low_latency::kAlign;
  open_heap.base = static_cast<char*>(base);
  open_heap.set_bytes = heap_bytes / 2 / unit * unit;
  open_heap.state = state;
  open_heap.rank = rank;
  open_heap.num_ranks = num_ranks;
  open_heap.num_sms = sms;
  return Status();
}

Status CloseNvshmemHeap() {
  std::lock_guard<std::mutex> lock(mu);
  if (!nvshmem_up) return Status();
  Status status;
  if (open_heap.base != nullptr) {
    status = Cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    nvshmem_barrier_all();
    nvshmem_free(open_heap.base);
    if (Status s = Cuda(cudaFree(open_heap.state), "cudaFree state"); !s.ok()) {
      status = s;
    }
  }
  nvshmem_finalize();
  nvshmem_up = false;
  open_heap = low_latency::Heap();
  return status;
}

Status CurrentHeap(const char* op, low_latency::Heap* heap) {
  std::lock_guard<std::mutex> lock(mu);
  if (open_heap.base == nullptr) {
    return Status::InvalidArgument(
        std::string(op) + ": no NVSHMEM heap is open in this process: create "
        "the jax_ep.Buffer with num_ll_bytes on the cuda backend");
  }
  *heap = open_heap;
  return Status();
}

}  // namespace jax_ep::runtime
