// NVLink write ceilings with a given SM budget: how fast can N SMs push
// bytes into the peer GPUs, every GPU at once (as a dispatch does)?
//
//   nvcc -std=c++17 -O3 -arch=sm_90 bench/probes/nvlink_write.cu -o /tmp/probe
//   /tmp/probe [bytes=58720256] [gpus=all]
//
// One process, `gpus` GPUs with peer access between every pair. Each GPU
// sends `bytes` from its own memory, split evenly over the other GPUs (all
// at once, into a slice of each one's buffer; with 2 GPUs, everything to the
// other one). Ways:
//   lsu W   B blocks, W warps each, 16-byte ld/st with 8 loads in flight/lane;
//           the warps take the peers in turn
//   tma W   B blocks, W warps each; lane 0 of a warp moves 8 KiB pieces with
//           bulk copies global -> shared -> peer (cp.async.bulk), 4 stages
//   local   lsu 16 warps, into its own memory (HBM copy, for comparison)
//   ce      cudaMemcpyPeerAsync (copy engines, no SM), one stream per peer
// Prints one line per (way, blocks): time and GB/s sent by each GPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(x)                                                        \
  do {                                                                  \
    cudaError_t e = (x);                                                \
    if (e != cudaSuccess) {                                             \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x,             \
                  cudaGetErrorString(e));                               \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

constexpr int kPiece = 8192;
constexpr int kStages = 4;
constexpr int kMaxGpus = 8;

// Where one GPU's bytes go: `slice` bytes of the source each, piece i of the
// source to dst[i].
struct Targets {
  char* dst[kMaxGpus];
  int n;
  int64_t slice;
};

// The grid's warps take the targets in turn: this warp's target, its index
// among that target's warps, and how many those are. The remainder of an
// uneven split has warp >= num_warps and moves nothing.
struct Share {
  int target;
  int64_t warp, num_warps;
};

__device__ __forceinline__ Share ShareOf(const Targets& t) {
  const int warps = blockDim.x / 32;
  const int64_t me = int64_t{blockIdx.x} * warps + threadIdx.x / 32;
  return {static_cast<int>(me % t.n), me / t.n,
          int64_t{gridDim.x} * warps / t.n};
}

__global__ void LsuCopy(const char* src, Targets t) {
  const Share share = ShareOf(t);
  if (share.warp >= share.num_warps) return;
  const int4* from =
      reinterpret_cast<const int4*>(src + share.target * t.slice);
  int4* to = reinterpret_cast<int4*>(t.dst[share.target]);
  const int64_t n = t.slice / 16;
  const int lane = threadIdx.x % 32;
  constexpr int kUnroll = 8;
  const int64_t per_piece = 32 * kUnroll;
  for (int64_t base = share.warp * per_piece; base < n;
       base += share.num_warps * per_piece) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n) v[u] = __ldcg(from + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n) to[i] = v[u];
    }
  }
}

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__global__ void TmaCopy(const char* src, Targets t) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t bars[32][kStages];
  const int w = threadIdx.x / 32;
  if (threadIdx.x % 32 != 0) return;
  char* buf = smem + w * kStages * kPiece;
  for (int s = 0; s < kStages; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(Smem(&bars[w][s])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const Share share = ShareOf(t);
  if (share.warp >= share.num_warps) return;
  const char* from = src + share.target * t.slice;
  char* dst = t.dst[share.target];
  const int64_t pieces = t.slice / kPiece;
  int64_t k = 0;  // pieces this warp has moved
  for (int64_t p = share.warp; p < pieces; p += share.num_warps, ++k) {
    const int s = static_cast<int>(k % kStages);
    const uint32_t phase = static_cast<uint32_t>((k / kStages) & 1);
    if (k >= kStages) {
      asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kStages - 1) : "memory");
    }
    const uint32_t bar = Smem(&bars[w][s]);
    const uint32_t sbuf = Smem(buf + s * kPiece);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                 "r"(kPiece) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], "
        "[%1], %2, [%3];" ::"r"(sbuf),
        "l"(from + p * kPiece), "r"(kPiece), "r"(bar) : "memory");
    asm volatile(
        "{\n .reg .pred done;\n wait:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra wait;\n}" ::"r"(bar),
        "r"(phase) : "memory");
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                     dst + p * kPiece),
                 "r"(sbuf), "r"(kPiece) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

struct Gpu {
  char* src;
  char* dst;
  cudaStream_t streams[kMaxGpus];  // [0] times the run; the others: ce peers
  cudaEvent_t start, stop, done[kMaxGpus];
};

int main(int argc, char** argv) {
  const int64_t bytes = argc > 1 ? std::atoll(argv[1]) : 58720256;
  int gpus = 0;
  CHECK(cudaGetDeviceCount(&gpus));
  if (argc > 2) gpus = std::atoi(argv[2]);
  if (gpus < 2 || gpus > kMaxGpus) {
    std::printf("needs 2 to %d GPUs, got %d\n", kMaxGpus, gpus);
    return 1;
  }
  const int peers = gpus - 1;
  // A whole number of TMA pieces per peer.
  const int64_t slice = bytes / peers / kPiece * kPiece;
  std::vector<Gpu> g(gpus);
  for (int d = 0; d < gpus; ++d) {
    CHECK(cudaSetDevice(d));
    for (int p = 0; p < gpus; ++p) {
      if (p != d) CHECK(cudaDeviceEnablePeerAccess(p, 0));
    }
    CHECK(cudaMalloc(&g[d].src, bytes));
    CHECK(cudaMalloc(&g[d].dst, bytes));
    CHECK(cudaMemset(g[d].src, d + 1, bytes));
    for (int p = 0; p < gpus; ++p) {
      CHECK(cudaStreamCreateWithFlags(&g[d].streams[p], cudaStreamNonBlocking));
      CHECK(cudaEventCreateWithFlags(&g[d].done[p], cudaEventDisableTiming));
    }
    CHECK(cudaEventCreate(&g[d].start));
    CHECK(cudaEventCreate(&g[d].stop));
    CHECK(cudaFuncSetAttribute(TmaCopy, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               4 * kStages * kPiece));
  }
  // GPU d's targets: its slice of every other GPU's buffer (or its own).
  auto targets_of = [&](int d, bool local) {
    Targets t{};
    if (local) {
      t.dst[0] = g[d].dst;
      t.n = 1;
      t.slice = slice * peers;
      return t;
    }
    for (int p = 0; p < gpus; ++p) {
      if (p == d) continue;
      t.dst[t.n++] = g[p].dst + (d < p ? d : d - 1) * slice;
    }
    t.slice = slice;
    return t;
  };
  auto run = [&](const char* way, int warps, int blocks) {
    const std::string w = way;
    float best = 1e30f;
    for (int rep = 0; rep < 6; ++rep) {
      for (int d = 0; d < gpus; ++d) {
        CHECK(cudaSetDevice(d));
        const Targets t = targets_of(d, w == "local");
        cudaStream_t main = g[d].streams[0];
        CHECK(cudaEventRecord(g[d].start, main));
        if (w == "ce") {
          for (int i = 0; i < t.n; ++i) {
            const int p = i < d ? i : i + 1;
            cudaStream_t s = g[d].streams[i + 1];
            CHECK(cudaStreamWaitEvent(s, g[d].start, 0));
            CHECK(cudaMemcpyPeerAsync(t.dst[i], p, g[d].src + i * t.slice, d,
                                      t.slice, s));
            CHECK(cudaEventRecord(g[d].done[i], s));
            CHECK(cudaStreamWaitEvent(main, g[d].done[i], 0));
          }
        } else if (w == "tma") {
          TmaCopy<<<blocks, warps * 32, warps * kStages * kPiece, main>>>(
              g[d].src, t);
        } else {
          LsuCopy<<<blocks, warps * 32, 0, main>>>(g[d].src, t);
        }
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(g[d].stop, main));
      }
      float worst = 0;
      for (int d = 0; d < gpus; ++d) {
        CHECK(cudaSetDevice(d));
        CHECK(cudaEventSynchronize(g[d].stop));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, g[d].start, g[d].stop));
        worst = ms > worst ? ms : worst;
      }
      if (rep > 0 && worst < best) best = worst;
    }
    std::printf("%-6s gpus %d warps %2d blocks %3d: %8.1f us  %6.1f GB/s sent "
                "per GPU\n", way, gpus, warps, blocks, best * 1e3,
                slice * peers / (best * 1e-3) / 1e9);
    std::fflush(stdout);
  };
  run("ce", 0, 0);
  for (int blocks : {8, 16, 24, 32, 48, 132}) {
    run("local", 16, blocks);
    for (int warps : {4, 8, 16}) run("lsu", warps, blocks);
    for (int warps : {1, 2, 4}) run("tma", warps, blocks);
  }
  return 0;
}
