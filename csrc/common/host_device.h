// What the buffer layouts share between host and device code, in plain C++:
// the layouts size buffers on the host (also in the _jax_ep_sizes module,
// which g++ builds without CUDA) and find things in them on the device.
#pragma once

#include <cstdint>

// Marks a function the kernels call too; g++ sees a plain function.
#ifdef __CUDACC__
#define JAX_EP_HOST_DEVICE __host__ __device__
#else
#define JAX_EP_HOST_DEVICE
#endif

namespace jax_ep {

// `value` rounded up to a multiple of `align`.
constexpr JAX_EP_HOST_DEVICE int64_t AlignUp(int64_t value, int64_t align) {
  return (value + align - 1) / align * align;
}

}  // namespace jax_ep
