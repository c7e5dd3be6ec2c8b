// The _jax_ep extension: hands each FFI handler to Python as a capsule, keyed
// by its FFI target name (jax_ep/_src/native.py registers them with XLA),
// exports the kernels' limits, and binds the host runtime functions
// (bindings.h).

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bindings.h"
#include "handlers.h"
#include "layout/dispatch_layout.cuh"
#include "low_latency/low_latency.cuh"
#include "nanobind/nanobind.h"
#include "runtime/peer_buffers.cuh"

namespace nb = nanobind;

namespace {

template <typename Handler>
nb::capsule Capsule(Handler* handler) {
  static_assert(
      std::is_invocable_r_v<XLA_FFI_Error*, Handler, XLA_FFI_CallFrame*>,
      "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(handler));
}

nb::dict Registrations() {
  namespace targets = jax_ep::targets;
  nb::dict out;
  out[targets::kGetDispatchLayout] = Capsule(JaxEpGetDispatchLayout);
  out[targets::kIntranodeNotify] = Capsule(JaxEpIntranodeNotify);
  out[targets::kIntranodeDispatch] = Capsule(JaxEpIntranodeDispatch);
  out[targets::kIntranodeCachedDispatch] =
      Capsule(JaxEpIntranodeCachedDispatch);
  out[targets::kIntranodeCombine] = Capsule(JaxEpIntranodeCombine);
  out[targets::kLowLatencyDispatchSend] = Capsule(JaxEpLowLatencyDispatchSend);
  out[targets::kLowLatencyDispatchRecv] = Capsule(JaxEpLowLatencyDispatchRecv);
  out[targets::kLowLatencyCombineSend] = Capsule(JaxEpLowLatencyCombineSend);
  out[targets::kLowLatencyCombineRecv] = Capsule(JaxEpLowLatencyCombineRecv);
  return out;
}

// The largest sizes each kernel family takes, as csrc defines them, so that
// Python refuses a call at trace time with the kernels' own numbers.
nb::dict Limits() {
  namespace layout = jax_ep::layout;
  namespace low_latency = jax_ep::low_latency;
  namespace runtime = jax_ep::runtime;
  nb::dict out;
  out["layout_max_experts"] = layout::kMaxExperts;
  out["layout_max_ranks"] = layout::kMaxRanks;
  out["intranode_max_experts"] = runtime::kMaxNotifyExperts;
  out["intranode_max_ranks"] = runtime::kMaxPeerRanks;
  out["ll_max_experts"] = low_latency::kMaxExperts;
  out["ll_max_ranks"] = low_latency::kMaxRanks;
  out["ll_max_tokens"] = low_latency::kMaxTokens;
  out["ll_max_slots_per_expert"] = low_latency::kMaxSlotsPerExpert;
  out["ll_max_topk"] = int64_t{low_latency::kMaxTopk};
  // Every op checks top-k before it picks a family. The intranode kernels'
  // own bound (csrc/intranode/kernels.cuh) is not in a host header; their
  // launcher checks it.
  out["max_topk"] = std::min(layout::kMaxTopk, int64_t{low_latency::kMaxTopk});
  return out;
}

}  // namespace

NB_MODULE(_jax_ep, m) {
  m.def("registrations", &Registrations,
        "The FFI handler capsules, keyed by target name.");
  m.def("limits", &Limits,
        "The largest sizes the CUDA kernels take, by family: layout_*, "
        "intranode_*, ll_* (low-latency), and max_topk for every op.");
  jax_ep::BindPeerBuffers(m);
  jax_ep::BindNvshmem(m);
}
