// Device-side synchronization helpers shared by the NVLink kernels: the PTX
// memory-order wrappers (named <op>_<order>_<scope>_<space>) and the one
// spin-wait with a timeout that every kernel routes its waits through.
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

// Where a wait happens, for the timeout report.
struct WaitSite {
  const char* kernel;  // e.g. "intranode_notify"
  const char* phase;   // e.g. "wait for the peers' flags"
  int rank;            // this device's EP rank
  int peer;            // the rank being waited for, or -1
};

// Spins until *flag >= expected (acquire, system scope) and returns the value
// seen. After `timeout_ns` it prints the site, the expected and the last seen
// value, then traps: the kernel fails instead of hanging the process.
__device__ __noinline__ inline uint64_t wait_at_least_acquire_sys(
    const uint64_t* flag, uint64_t expected, int64_t timeout_ns,
    const WaitSite& site) {
  uint64_t seen = ld_acquire_sys_global(flag);
  if (seen >= expected) return seen;
  const uint64_t start = global_timer_ns();
  while ((seen = ld_acquire_sys_global(flag)) < expected) {
    if (static_cast<int64_t>(global_timer_ns() - start) > timeout_ns) {
      printf("jax_ep %s timeout: rank %d, phase '%s', peer %d: expected >= "
             "%llu, seen %llu after %lld ns\n",
             site.kernel, site.rank, site.phase, site.peer,
             static_cast<unsigned long long>(expected),
             static_cast<unsigned long long>(seen),
             static_cast<long long>(timeout_ns));
      __trap();
    }
  }
  return seen;
}

}  // namespace jax_ep::sync
