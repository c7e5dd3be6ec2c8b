#include "runtime/nvshmem_heap.cuh"

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstring>
#include <mutex>

namespace jax_ep::runtime {
namespace {

std::mutex mu;
void* allocation = nullptr;  // the one symmetric allocation, or none
low_latency::Heap open_heap;          // base == nullptr: no low-latency part
internode::Region open_region;        // base == nullptr: no exchange part
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
                       int device, int64_t heap_bytes,
                       int64_t exchange_bytes) {
  std::lock_guard<std::mutex> lock(mu);
  if (allocation != nullptr || nvshmem_up) {
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
  if (heap_bytes < 0 || exchange_bytes < 0 ||
      heap_bytes + exchange_bytes <= 0 || rank < 0 || rank >= num_ranks) {
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
  // The low-latency sets first, then the exchange region, 256-aligned.
  const int64_t heap_part = AlignUp(heap_bytes, internode::kAlign);
  const int64_t total = heap_part + exchange_bytes;
  void* base = nvshmem_malloc(static_cast<size_t>(total));
  if (base == nullptr) {
    return Status::InvalidArgument(
        "nvshmem_malloc of " + std::to_string(total) +
        " bytes failed: NVSHMEM_SYMMETRIC_SIZE must exceed it (jax_ep sets it "
        "unless you did) and the GPU needs that much memory outside JAX's "
        "pool (lower XLA_PYTHON_CLIENT_MEM_FRACTION)");
  }
  allocation = base;
  low_latency::State* state = nullptr;
  unsigned long long* sequence = nullptr;
  for (Status s : {Cuda(cudaMemset(base, 0, total), "zeroing the heap"),
                   Cuda(cudaMalloc(&state, sizeof(*state)), "cudaMalloc state"),
                   Cuda(cudaMemset(state, 0, sizeof(*state)), "zeroing state"),
                   Cuda(cudaMalloc(&sequence, sizeof(*sequence)),
                        "cudaMalloc sequence"),
                   Cuda(cudaMemset(sequence, 0, sizeof(*sequence)),
                        "zeroing sequence"),
                   Cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize")}) {
    if (!s.ok()) return s;
  }
  nvshmem_barrier_all();
  if (Status s = low_latency::PrepareKernels(); !s.ok()) return s;
  int sms = 0;
  if (Status s = Cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                             device), "SM count");
      !s.ok()) {
    return s;
  }
  constexpr int64_t unit = low_latency::kFlagShare * low_latency::kAlign;
  if (heap_bytes > 0) {
    open_heap.base = static_cast<char*>(base);
    open_heap.set_bytes = heap_bytes / 2 / unit * unit;
    open_heap.rank = rank;
    open_heap.num_ranks = num_ranks;
    open_heap.num_sms = sms;
    // The kernels take PEs below kMaxRanks (low_latency::CheckShape).
    for (int pe = 0; pe < std::min<int64_t>(num_ranks, kMaxRanks); ++pe) {
      open_heap.peer_base[pe] = static_cast<char*>(nvshmem_ptr(base, pe));
    }
  }
  open_heap.state = state;  // freed with the heap either way
  if (exchange_bytes > 0) {
    open_region.base = static_cast<char*>(base) + heap_part;
    open_region.bytes = exchange_bytes;
    open_region.rank = rank;
    open_region.num_ranks = num_ranks;
    open_region.num_sms = sms;
  }
  open_region.sequence = sequence;
  return Status();
}

Status CloseNvshmemHeap() {
  std::lock_guard<std::mutex> lock(mu);
  if (!nvshmem_up) return Status();
  Status status;
  if (allocation != nullptr) {
    status = Cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    nvshmem_barrier_all();
    nvshmem_free(allocation);
    if (Status s = Cuda(cudaFree(open_heap.state), "cudaFree state"); !s.ok()) {
      status = s;
    }
    if (Status s = Cuda(cudaFree(open_region.sequence), "cudaFree sequence");
        !s.ok()) {
      status = s;
    }
  }
  nvshmem_finalize();
  nvshmem_up = false;
  allocation = nullptr;
  open_heap = low_latency::Heap();
  open_region = internode::Region();
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

Status CurrentExchangeRegion(const char* op, internode::Region* region) {
  std::lock_guard<std::mutex> lock(mu);
  if (open_region.base == nullptr) {
    return Status::InvalidArgument(
        std::string(op) + ": no internode exchange region is open in this "
        "process: create the jax_ep.Buffer with num_rdma_bytes on the cuda "
        "backend");
  }
  *region = open_region;
  return Status();
}

}  // namespace jax_ep::runtime
