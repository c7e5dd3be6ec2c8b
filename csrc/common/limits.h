// The largest sizes the kernels take, one definition each. The launchers
// refuse calls outside them, the layouts size buffers from them, and the
// _jax_ep_sizes module hands them to Python, which refuses such calls at
// trace time with these numbers. Plain C++: g++ builds that module without
// CUDA.
#pragma once

#include <cstdint>

namespace jax_ep {

// K, the experts one token selects, for every op. The API promises it on
// every backend, so the reference backend refuses more too
// (jax_ep/_src/checks.py).
inline constexpr int64_t kMaxTopk = 32;

// R, the EP size, for every kernel (a Buffer serves every op family over one
// EP axis): get_dispatch_layout keeps a token's ranks in one 64-bit mask, and
// the intranode barrier and the dispatch's stage kernel give each rank a
// thread or a block.
inline constexpr int64_t kMaxRanks = 64;

// R for the internode exchange (dispatch, cached dispatch and combine across
// nodes): its flags are per rank at fixed offsets of the NVSHMEM region
// (internode/exchange_layout.h), 8 + 512 bytes a rank. The internode ops use
// no other kernel, so they serve EP sizes past kMaxRanks.
inline constexpr int64_t kMaxInternodeRanks = 1024;

// E for the normal ops' kernels. They count per expert in shared memory
// (get_dispatch_layout, the dispatch's stage kernel) and in the peer buffers'
// count slots, which hold kMaxNormalExperts / R local experts per source; one
// limit for both, as a dispatch counts the experts get_dispatch_layout does.
inline constexpr int64_t kMaxNormalExperts = 1024;

// E for the low-latency kernels: a send block counts every expert's tokens
// in shared memory, and each buffer set has a count signal per expert at a
// fixed offset (low_latency/heap_layout.h).
inline constexpr int64_t kMaxLowLatencyExperts = 4096;

// Tmax, the tokens per rank of a low-latency call: a receive sweeps a
// source's tokens 32 at a time, with one bit per sweep and lane (WaitRows,
// low_latency/dispatch.cu).
inline constexpr int64_t kMaxLowLatencyTokens = 32 * 32;

// R * Tmax, the slots of one local expert in a low-latency receive, each
// indexed in shared memory (int32).
inline constexpr int64_t kMaxLowLatencySlotsPerExpert = 8192;

}  // namespace jax_ep
