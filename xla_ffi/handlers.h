// Every FFI handler the _jax_ep module exports. Adding a handler: declare its
// symbol here, define it in its own file with XLA_FFI_DEFINE_HANDLER_SYMBOL and
// add one line to module.cc.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpGetDispatchLayout);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeNotify);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeCachedDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeCombine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineRecv);
