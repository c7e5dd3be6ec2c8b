// The _jax_ep_sizes module: the kernels' limits and the buffer bytes their
// calls need, from the plain-C++ headers the kernels themselves use
// (common/limits.h, intranode/call_layout.h, low_latency/heap_layout.h,
// internode/exchange_layout.h).
// Every install builds it, with or without CUDA (a C++ compiler is enough),
// so that jax_ep/_src/sizes.py answers on a CPU-only install too.

#include <cstdint>

#include "common/limits.h"
#include "internode/exchange_layout.h"
#include "intranode/call_layout.h"
#include "low_latency/heap_layout.h"
#include "nanobind/nanobind.h"

namespace nb = nanobind;

namespace {

// Each limit under its C++ name in snake case, without the k.
nb::dict Limits() {
  nb::dict out;
  out["max_topk"] = jax_ep::kMaxTopk;
  out["max_ranks"] = jax_ep::kMaxRanks;
  out["max_internode_ranks"] = jax_ep::kMaxInternodeRanks;
  out["max_normal_experts"] = jax_ep::kMaxNormalExperts;
  out["max_low_latency_experts"] = jax_ep::kMaxLowLatencyExperts;
  out["max_low_latency_tokens"] = jax_ep::kMaxLowLatencyTokens;
  out["max_low_latency_slots_per_expert"] =
      jax_ep::kMaxLowLatencySlotsPerExpert;
  return out;
}

int64_t IntranodeDataBytes(int64_t num_tokens, int64_t num_ranks,
                           int64_t num_topk, int64_t row_bytes,
                           int64_t scale_row_bytes,
                           int64_t combine_row_bytes) {
  if (num_tokens < 0 || num_ranks < 1 || num_topk < 0 || row_bytes < 0 ||
      scale_row_bytes < 0 || combine_row_bytes < 0) {
    throw nb::value_error(
        "jax_ep intranode_data_bytes: sizes must be >= 0 (num_ranks >= 1)");
  }
  return jax_ep::intranode::RequiredDataBytes(num_tokens, num_ranks, num_topk,
                                              row_bytes, scale_row_bytes,
                                              combine_row_bytes);
}

int64_t LowLatencyHeapBytes(int64_t max_tokens, int64_t hidden,
                            int64_t num_experts) {
  if (max_tokens < 0 || hidden < 0 || num_experts < 0) {
    throw nb::value_error("jax_ep ll_heap_bytes: sizes must be >= 0");
  }
  // Neither K nor R changes the layout (L * R = E): 1 for both.
  return jax_ep::low_latency::HeapBytes(
      {max_tokens, max_tokens, hidden, 1, num_experts, 1});
}

int64_t ExchangeRegionBytes(int64_t team_size, int64_t num_tokens,
                            int64_t row_bytes) {
  if (team_size < 1 || num_tokens < 0 || row_bytes < 0) {
    throw nb::value_error(
        "jax_ep exchange_region_bytes: sizes must be >= 0 (team_size >= 1)");
  }
  return jax_ep::internode::RegionBytes({team_size, num_tokens, row_bytes});
}

}  // namespace

NB_MODULE(_jax_ep_sizes, m) {
  m.def("limits", &Limits,
        "The largest sizes the kernels take: max_topk for every kernel, "
        "max_ranks for all but the internode exchange, which takes "
        "max_internode_ranks, max_normal_experts for get_dispatch_layout and "
        "the intranode kernels, max_low_latency_* for the low-latency "
        "kernels.");
  m.def("intranode_data_bytes", &IntranodeDataBytes, nb::arg("num_tokens"),
        nb::arg("num_ranks"), nb::arg("num_topk"), nb::arg("row_bytes"),
        nb::arg("scale_row_bytes"), nb::arg("combine_row_bytes"),
        "Peer-buffer data-region bytes that intranode dispatch (rows of "
        "row_bytes + scale_row_bytes, top-k) and combine (rows of "
        "combine_row_bytes) of num_tokens over num_ranks need.");
  m.def("ll_heap_bytes", &LowLatencyHeapBytes, nb::arg("max_tokens"),
        nb::arg("hidden"), nb::arg("num_experts"),
        "NVSHMEM heap bytes (both buffer sets) that low-latency calls of "
        "these shapes need.");
  m.def("exchange_region_bytes", &ExchangeRegionBytes, nb::arg("team_size"),
        nb::arg("num_tokens"), nb::arg("row_bytes"),
        "NVSHMEM bytes that internode exchanges of num_tokens rows of "
        "row_bytes within a team of team_size ranks need.");
}
