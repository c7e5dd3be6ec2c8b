// The _jax_ep extension: hands each FFI handler to Python as a capsule, keyed
// by its FFI target name (jax_ep/_src/native.py registers them with XLA), and
// binds the host runtime functions (bindings.h). The kernels' limits and
// buffer sizes are in _jax_ep_sizes (sizes_module.cc), which builds without
// CUDA.

#include <type_traits>

#include "bindings.h"
#include "handlers.h"
#include "nanobind/nanobind.h"

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
  out[targets::kIntranodeDispatch] = Capsule(JaxEpIntranodeDispatch);
  out[targets::kIntranodeCachedDispatch] =
      Capsule(JaxEpIntranodeCachedDispatch);
  out[targets::kIntranodeCombine] = Capsule(JaxEpIntranodeCombine);
  out[targets::kInternodeExchange] = Capsule(JaxEpInternodeExchange);
  out[targets::kLowLatencyDispatch] = Capsule(JaxEpLowLatencyDispatch);
  out[targets::kLowLatencyDispatchSend] = Capsule(JaxEpLowLatencyDispatchSend);
  out[targets::kLowLatencyDispatchRecv] = Capsule(JaxEpLowLatencyDispatchRecv);
  out[targets::kLowLatencyCombine] = Capsule(JaxEpLowLatencyCombine);
  out[targets::kLowLatencyCombineSend] = Capsule(JaxEpLowLatencyCombineSend);
  out[targets::kLowLatencyCombineRecv] = Capsule(JaxEpLowLatencyCombineRecv);
  return out;
}

}  // namespace

NB_MODULE(_jax_ep, m) {
  m.def("registrations", &Registrations,
        "The FFI handler capsules, keyed by target name.");
  jax_ep::BindPeerBuffers(m);
  jax_ep::BindNvshmem(m);
}
