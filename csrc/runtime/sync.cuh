// Device-side synchronization helpers shared by the kernels: the PTX
// memory-order wrappers (named <op>_<order>_<scope>_<space>) and the one
// spin-wait with a timeout (wait_until) that every kernel routes its waits
// through.
#pragma once

#include <cstdint>
#include <cstdio>

namespace jax_ep::sync {

// --- PTX loads and stores -----------------------------------------------------

__device__ __forceinline__ uint64_t ld_acquire_sys_global(const uint64_t* p) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];"
               : "=l"(value)
               : "l"(p)
               : "memory");
  return value;
}

__device__ __forceinline__ int32_t ld_relaxed_sys_global(const int32_t* p) {
  int32_t value;
  asm volatile("ld.relaxed.sys.global.s32 %0, [%1];"
               : "=r"(value)
               : "l"(p)
               : "memory");
  return value;
}

__device__ __forceinline__ uint64_t ld_relaxed_sys_global(const uint64_t* p) {
  uint64_t value;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];"
               : "=l"(value)
               : "l"(p)
               : "memory");
  return value;
}

// After relaxed loads that saw release stores: together an acquire, for all
// of them at once.
__device__ __forceinline__ void fence_acq_rel_sys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ void st_release_sys_global(uint64_t* p,
                                                      uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;"
               :
               : "l"(p), "l"(value)
               : "memory");
}

// --- Time ---------------------------------------------------------------------

// Nanoseconds from the GPU's global timer (the same clock on every SM).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// --- Waiting ------------------------------------------------------------------

// The one spin-wait: polls until `arrived()` returns true, timing the wait
// from the call. Once more than `timeout_ns` have passed, it calls `report()`,
// which prints where the wait was and what it last saw, then traps: the kernel
// fails instead of hanging the process. A wait that is usually over already
// polls once before the call, so that it reads no clock then.
template <typename Arrived, typename Report>
__device__ __forceinline__ void wait_until(Arrived arrived, int64_t timeout_ns,
                                           Report report) {
  const uint64_t start = global_timer_ns();
  while (!arrived()) {
    if (static_cast<int64_t>(global_timer_ns() - start) > timeout_ns) {
      report();
      __trap();
    }
  }
}

// Where a wait happens, for the timeout report.
struct WaitSite {
  const char* kernel;  // e.g. "dispatch"
  const char* phase;   // e.g. "wait for the peers' flags"
  int rank;            // this device's EP rank
  int peer;            // the rank being waited for, or -1
};

// Waits until *flag >= expected (acquire, system scope) and returns the value
// seen. The timeout report gives the site, the expected and the last seen
// value.
__device__ __noinline__ inline uint64_t wait_at_least_acquire_sys(
    const uint64_t* flag, uint64_t expected, int64_t timeout_ns,
    const WaitSite& site) {
  uint64_t seen;
  const auto arrived = [&] {
    return (seen = ld_acquire_sys_global(flag)) >= expected;
  };
  if (!arrived()) {
    wait_until(arrived, timeout_ns, [&] {
      printf("jax_ep %s timeout: rank %d, phase '%s', peer %d: expected >= "
             "%llu, seen %llu after %lld ns\n",
             site.kernel, site.rank, site.phase, site.peer,
             static_cast<unsigned long long>(expected),
             static_cast<unsigned long long>(seen),
             static_cast<long long>(timeout_ns));
    });
  }
  return seen;
}

}  // namespace jax_ep::sync
