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

}  // namespace deep_ep_ops
