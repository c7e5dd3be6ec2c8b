// NVLink write ceilings with a given SM budget: how fast can N SMs push
// bytes into the peer GPU, both GPUs at once (as a dispatch does)?
//
//   nvcc -std=c++17 -O3 -arch=sm_90 bench/probes/nvlink_write.cu -o /tmp/probe
//   /tmp/probe [bytes=58720256]
//
// One process, GPUs 0 and 1 with peer access. Each GPU copies `bytes` from
// its own memory into the other's, concurrently. Ways:
//   lsu W   B blocks, W warps each, 16-byte ld/st with 8 loads in flight/lane
//   tma W   B blocks, W warps each; lane 0 of a warp moves 8 KiB pieces with
//           bulk copies global -> shared -> peer (cp.async.bulk), 4 stages
//   local   lsu 16 warps, into its own memory (HBM copy, for comparison)
//   ce      cudaMemcpyPeerAsync (copy engines, no SM)
// Prints one line per (way, blocks): time and GB/s per direction.

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

__global__ void LsuCopy(const int4* src, int4* dst, int64_t n) {
  const int warps = blockDim.x / 32;
  const int64_t warp = int64_t{blockIdx.x} * warps + threadIdx.x / 32;
  const int64_t num_warps = int64_t{gridDim.x} * warps;
  const int lane = threadIdx.x % 32;
  constexpr int kUnroll = 8;
  const int64_t per_piece = 32 * kUnroll;
  for (int64_t base = warp * per_piece; base < n; base += num_warps * per_piece) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n) v[u] = __ldcg(src + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n) dst[i] = v[u];
    }
  }
}

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__global__ void TmaCopy(const char* src, char* dst, int64_t bytes) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t bars[32][kStages];
  const int warps = blockDim.x / 32;
  const int w = threadIdx.x / 32;
  if (threadIdx.x % 32 != 0) return;
  char* buf = smem + w * kStages * kPiece;
  for (int s = 0; s < kStages; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(Smem(&bars[w][s])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const int64_t pieces = bytes / kPiece;
  const int64_t warp = int64_t{blockIdx.x} * warps + w;
  const int64_t num_warps = int64_t{gridDim.x} * warps;
  int64_t k = 0;  // pieces this warp has moved
  for (int64_t p = warp; p < pieces; p += num_warps, ++k) {
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
        "l"(src + p * kPiece), "r"(kPiece), "r"(bar) : "memory");
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
  cudaStream_t stream;
  cudaEvent_t start, stop;
};

int main(int argc, char** argv) {
  const int64_t bytes = argc > 1 ? std::atoll(argv[1]) : 58720256;
  Gpu g[2];
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaDeviceEnablePeerAccess(1 - d, 0));
    CHECK(cudaMalloc(&g[d].src, bytes));
    CHECK(cudaMalloc(&g[d].dst, bytes));
    CHECK(cudaMemset(g[d].src, d + 1, bytes));
    CHECK(cudaStreamCreateWithFlags(&g[d].stream, cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&g[d].start));
    CHECK(cudaEventCreate(&g[d].stop));
    CHECK(cudaFuncSetAttribute(TmaCopy, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               4 * kStages * kPiece));
  }
  auto run = [&](const char* way, int warps, int blocks) {
    float best = 1e30f;
    for (int rep = 0; rep < 6; ++rep) {
      for (int d = 0; d < 2; ++d) {
        CHECK(cudaSetDevice(d));
        char* to = std::string(way) == "local" ? g[d].dst : g[1 - d].dst;
        CHECK(cudaEventRecord(g[d].start, g[d].stream));
        if (std::string(way) == "ce") {
          CHECK(cudaMemcpyPeerAsync(to, 1 - d, g[d].src, d, bytes, g[d].stream));
        } else if (std::string(way) == "tma") {
          TmaCopy<<<blocks, warps * 32, warps * kStages * kPiece, g[d].stream>>>(
              g[d].src, to, bytes);
        } else {
          LsuCopy<<<blocks, warps * 32, 0, g[d].stream>>>(
              reinterpret_cast<const int4*>(g[d].src), reinterpret_cast<int4*>(to),
              bytes / 16);
        }
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(g[d].stop, g[d].stream));
      }
      float worst = 0;
      for (int d = 0; d < 2; ++d) {
        CHECK(cudaSetDevice(d));
        CHECK(cudaEventSynchronize(g[d].stop));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, g[d].start, g[d].stop));
        worst = ms > worst ? ms : worst;
      }
      if (rep > 0 && worst < best) best = worst;
    }
    std::printf("%-6s warps %2d blocks %3d: %8.1f us  %6.1f GB/s per direction\n",
                way, warps, blocks, best * 1e3, bytes / (best * 1e-3) / 1e9);
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
