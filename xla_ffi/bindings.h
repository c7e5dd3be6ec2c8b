// Python functions of the _jax_ep module besides the FFI handler capsules.
// Each Bind* adds its functions to the module; module.cc calls them all.
#pragma once

#include "nanobind/nanobind.h"

namespace jax_ep {

// peer_buffers_{create,open,close,layout}: the NVLink peer-buffer registry.
void BindPeerBuffers(nanobind::module_& m);

// nvshmem_{unique_id,open,close}: the NVSHMEM heap of the low-latency
// kernels.
void BindNvshmem(nanobind::module_& m);

}  // namespace jax_ep
