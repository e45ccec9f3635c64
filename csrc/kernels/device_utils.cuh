// Device helpers shared by the NVLink (intranode) and NVSHMEM (low-latency) kernels: system-scope
// acquire/release on 64-bit flags that peers write over NVLink, and the global timer the waits
// measure their timeouts with.
#pragma once

#include <cstdint>

namespace deep_ep_ops {

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Record an error in the device error word {code, op, peer, value} (mapped host memory that the
// next op call reads without synchronising); the code is stored last.
__device__ __forceinline__ void report_error(int* error, int op, int code, int peer, int value) {
  volatile int* word = error;
  word[1] = op;
  word[2] = peer;
  word[3] = value;
  __threadfence_system();
  word[0] = code;
}

// --- warp-wide copies ------------------------------------------------------------------------

template <int kBytes> struct Word;
template <> struct Word<16> { using type = int4; };
template <> struct Word<8> { using type = int2; };
template <> struct Word<4> { using type = int; };
template <> struct Word<2> { using type = short; };
template <> struct Word<1> { using type = signed char; };

// Several loads in flight per lane before the stores; __ldcg skips L1, whose lines may be
// stale for memory peers write.
template <int kBytes>
__device__ __forceinline__ void warp_copy_words(uint8_t* dst, const uint8_t* src, int64_t bytes,
                                                int lane) {
  using W = typename Word<kBytes>::type;
  constexpr int kUnroll = kBytes == 16 ? 8 : 4;
  const W* s = reinterpret_cast<const W*>(src);
  W* d = reinterpret_cast<W*>(dst);
  const int64_t n = bytes / kBytes;
  for (int64_t i = lane; i < n; i += 32 * kUnroll) {
    W v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n) v[u] = __ldcg(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n) d[i + u * 32] = v[u];
  }
}

// Exclusive prefix of `flag` over a block of kWarps full warps; `total` gets the block's count
// (every thread of the block calls it).
template <int kWarps>
__device__ __forceinline__ int block_prefix(bool flag, int* warp_counts, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_counts[w] : 0;
    total += warp_counts[w];
  }
  __syncthreads();
  return before + __popc(ballot & ((1u << lane) - 1u));
}

}  // namespace deep_ep_ops
