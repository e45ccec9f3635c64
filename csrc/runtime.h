// The NVLink runtime of one Buffer: its IPC allocation and the peers' allocations mapped into
// this process. Torch-free (CUDA runtime only); csrc/ops.cpp keeps them by buffer name.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kernels/api.h"

namespace deep_ep_ops {

class NvlRuntime {
 public:
  NvlRuntime(std::string name, int device, int rank, int num_ranks, int64_t data_bytes,
             uint64_t timeout_ns);
  NvlRuntime(const NvlRuntime&) = delete;
  NvlRuntime& operator=(const NvlRuntime&) = delete;

  // Allocates and zeroes this rank's buffer; returns its IPC handle for the peers.
  cudaError_t allocate(cudaIpcMemHandle_t* handle);
  // Maps every peer's buffer (handles indexed by rank) and publishes the pointer table.
  cudaError_t open(const std::vector<cudaIpcMemHandle_t>& handles);
  // Unmaps the peers and frees this rank's memory (the caller synchronised with the peers).
  void release();

  // The kernels' view, reporting errors into `error` on behalf of `op`.
  Intranode view(int* error, int op) const;

  const std::string name;
  const int device, rank, num_ranks;
  const int64_t data_bytes;
  const uint64_t timeout_ns;
  bool broken = false;           // a kernel on this device timed out: refuse further calls
  // Mapped host memory the notify kernel of a data-dependent dispatch writes: [0] the rows
  // received (-1 until then), [1 + l] the rows of local expert l (kMaxNotifyInts of them).
  volatile int* num_recv_host = nullptr;
  int* num_recv_device = nullptr;
  std::vector<int> recv_per_expert;  // host copy of [1 + l] after the last such dispatch

 private:
  uint8_t* local_ = nullptr;
  std::vector<uint8_t*> peers_;  // [num_ranks], local_ at rank
  uint8_t** peers_device_ = nullptr;
};

}  // namespace deep_ep_ops
