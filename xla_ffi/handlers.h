// Every FFI handler the _jax_ep module exports: its symbol, and its target
// name, under which module.cc registers it and with which its errors start.
// One name per op: target jax_ep_<op>, symbol JaxEp<Op>, defined in
// <family>_handlers.cc.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpGetDispatchLayout);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeCachedDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeCombine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeExchange);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineRecv);

namespace jax_ep::targets {

inline constexpr char kGetDispatchLayout[] = "jax_ep_get_dispatch_layout";
inline constexpr char kIntranodeDispatch[] = "jax_ep_intranode_dispatch";
inline constexpr char kIntranodeCachedDispatch[] =
    "jax_ep_intranode_cached_dispatch";
inline constexpr char kIntranodeCombine[] = "jax_ep_intranode_combine";
inline constexpr char kInternodeExchange[] = "jax_ep_internode_exchange";
inline constexpr char kLowLatencyDispatch[] = "jax_ep_low_latency_dispatch";
inline constexpr char kLowLatencyDispatchSend[] =
    "jax_ep_low_latency_dispatch_send";
inline constexpr char kLowLatencyDispatchRecv[] =
    "jax_ep_low_latency_dispatch_recv";
inline constexpr char kLowLatencyCombine[] = "jax_ep_low_latency_combine";
inline constexpr char kLowLatencyCombineSend[] =
    "jax_ep_low_latency_combine_send";
inline constexpr char kLowLatencyCombineRecv[] =
    "jax_ep_low_latency_combine_recv";

}  // namespace jax_ep::targets
