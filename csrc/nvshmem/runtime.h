// The NVSHMEM runtime of low-latency Buffers: process-wide NVSHMEM bootstrap from a unique id,
// and per buffer the symmetric allocation and the peers' mappings. Torch-free; the bindings keep
// the runtimes by buffer name.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "nvshmem/api.h"

namespace deep_ep_ops {

// NVSHMEM's unique id as bytes (any process may create it; rank 0 does).
std::string nvshmem_unique_id();
// Joins the NVSHMEM job as PE `rank` of `num_ranks` (once per process, on `device`). Returns an
// empty string, or why it failed.
std::string nvshmem_join(const std::string& unique_id, int rank, int num_ranks, int device);
// {my PE, number of PEs}, or {-1, 0} before nvshmem_join.
std::pair<int, int> nvshmem_world();

class LowLatencyRuntime {
 public:
  // Collective over the NVSHMEM job: allocates `bytes` of symmetric memory (zeroed) and maps the
  // peers that NVSHMEM offers load/store access to (none with force_put).
  LowLatencyRuntime(std::string name, int device, int64_t bytes, uint64_t timeout_ns,
                    bool force_put);
  LowLatencyRuntime(const LowLatencyRuntime&) = delete;
  LowLatencyRuntime& operator=(const LowLatencyRuntime&) = delete;
  // Collective, stream ordered: zero every rank's memory between two barriers of the job.
  cudaError_t clean(cudaStream_t stream);
  // Collective: frees the symmetric memory (the caller synchronised with the peers).
  void release();

  // The kernels' view for calls of shape (num_max_tokens, hidden), reporting into `error`.
  LowLatency view(int num_max_tokens, int hidden, int* error, int op, int num_sms) const;
  int num_mapped_peers() const;

  const std::string name;
  const int device, rank, num_ranks;
  const int64_t bytes;
  const uint64_t timeout_ns;
  uint8_t* memory = nullptr;  // the symmetric allocation
  bool broken = false;        // a kernel on this device timed out: refuse further calls
  // Shape pinned by the first call since creation or clean_low_latency_buffer (0: none).
  int num_max_tokens = 0, hidden = 0, num_experts = 0;
  // Send halves waiting for their receive: true where the kernels took the send.
  std::deque<bool> pending_dispatch, pending_combine;

 private:
  std::vector<uint8_t*> peers_;   // [num_ranks]: mapped allocations, nullptr without
  uint8_t** peers_device_ = nullptr;
};

}  // namespace deep_ep_ops
