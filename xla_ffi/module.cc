// The _jax_ep extension: hands each FFI handler to Python as a capsule, keyed
// by its FFI target name (jax_ep/_src/native.py registers them with XLA), and
// binds the host runtime functions (bindings.h).

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

}  // namespace

NB_MODULE(_jax_ep, m) {
  m.def("registrations", [] {
    nb::dict targets;
    targets["jax_ep_get_dispatch_layout"] = Capsule(JaxEpGetDispatchLayout);
    targets["jax_ep_intranode_notify"] = Capsule(JaxEpIntranodeNotify);
    targets["jax_ep_intranode_dispatch"] = Capsule(JaxEpIntranodeDispatch);
    targets["jax_ep_intranode_cached_dispatch"] =
        Capsule(JaxEpIntranodeCachedDispatch);
    targets["jax_ep_intranode_combine"] = Capsule(JaxEpIntranodeCombine);
    targets["jax_ep_ll_dispatch_send"] = Capsule(JaxEpLowLatencyDispatchSend);
    targets["jax_ep_ll_dispatch_recv"] = Capsule(JaxEpLowLatencyDispatchRecv);
    targets["jax_ep_ll_combine_send"] = Capsule(JaxEpLowLatencyCombineSend);
    targets["jax_ep_ll_combine_recv"] = Capsule(JaxEpLowLatencyCombineRecv);
    return targets;
  });
  jax_ep::BindPeerBuffers(m);
  jax_ep::BindNvshmem(m);
}
