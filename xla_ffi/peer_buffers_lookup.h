// The peer buffers of the device an FFI call runs on, for the intranode
// handlers: one lookup with one error text for all of them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "runtime/peer_buffers.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ep::ffi_checks {

// Sets `*buffers` to the registry entry of `device`, or returns
// FailedPrecondition "<op>: jax_ep peer buffers: <why>".
inline ::xla::ffi::Error FindPeerBuffers(
    std::string_view op, int32_t device,
    std::shared_ptr<const runtime::PeerBuffers>* buffers) {
  std::string why;
  *buffers = runtime::FindPeerBuffers(device, &why);
  if (*buffers != nullptr) return ::xla::ffi::Error::Success();
  return ::xla::ffi::Error(::xla::ffi::ErrorCode::kFailedPrecondition,
                           std::string(op) + ": jax_ep peer buffers: " + why);
}

}  // namespace jax_ep::ffi_checks
