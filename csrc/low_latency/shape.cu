// Which call shapes the low-latency kernels take, and whether the NVSHMEM heap
// is large enough for them (heap_layout.h). Host code only: no NVSHMEM.

#include <string>

#include "low_latency/low_latency.cuh"

namespace jax_ep::low_latency {

Status CheckShape(const char* op, const Heap& heap, const Shape& sh) {
  auto bad = [op](const std::string& what) {
    return Status::InvalidArgument(std::string(op) + ": " + what);
  };
  if (sh.num_ranks != heap.num_ranks) {
    return bad("the EP axis has " + std::to_string(sh.num_ranks) +
               " ranks but NVSHMEM has " + std::to_string(heap.num_ranks) +
               " PEs");
  }
  if (sh.num_experts <= 0 || sh.num_experts % sh.num_ranks != 0 ||
      sh.num_experts > kMaxLowLatencyExperts) {
    return bad("num_experts must be a positive multiple of the ranks, at most " +
               std::to_string(kMaxLowLatencyExperts) + ", got " +
               std::to_string(sh.num_experts));
  }
  if (sh.max_tokens < 1 || sh.max_tokens > kMaxLowLatencyTokens ||
      sh.num_tokens > sh.max_tokens) {
    return bad("need 1 <= T <= Tmax <= " +
               std::to_string(kMaxLowLatencyTokens) +
               ", got T=" + std::to_string(sh.num_tokens) +
               ", Tmax=" + std::to_string(sh.max_tokens));
  }
  if (sh.num_ranks > kMaxRanks ||
      sh.num_ranks * sh.max_tokens > kMaxLowLatencySlotsPerExpert) {
    return bad("R * Tmax must be <= " +
               std::to_string(kMaxLowLatencySlotsPerExpert) +
               " and R <= " + std::to_string(kMaxRanks));
  }
  if (sh.num_topk < 1 || sh.num_topk > kMaxTopk) {
    return bad("topk must be in [1, " + std::to_string(kMaxTopk) + "], got " +
               std::to_string(sh.num_topk));
  }
  if (sh.hidden <= 0 || sh.hidden % 8 != 0) {
    return bad("the hidden size must be a positive multiple of 8, got " +
               std::to_string(sh.hidden));
  }
  const SetLayout layout{sh};
  const int64_t flags_region = heap.set_bytes / kFlagShare;
  if (layout.flags_bytes() > flags_region ||
      layout.data_bytes() > heap.set_bytes - flags_region) {
    return bad("the NVSHMEM heap (" + std::to_string(2 * heap.set_bytes) +
               " bytes) is too small for this call, which needs " +
               std::to_string(HeapBytes(sh)) +
               ": size the Buffer's num_ll_bytes with jax_ep.ll_buffer_bytes "
               "for the largest shapes you run");
  }
  return Status();
}

}  // namespace jax_ep::low_latency
