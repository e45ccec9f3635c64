#include "runtime.h"

#include <utility>

namespace deep_ep_ops {

#define DEEP_EP_OPS_RETURN_IF_ERROR(call) \
  do {                                    \
    const cudaError_t status = (call);    \
    if (status != cudaSuccess) return status; \
  } while (0)

NvlRuntime::NvlRuntime(std::string name, int device, int rank, int num_ranks,
                       int64_t data_bytes, uint64_t timeout_ns)
    : name(std::move(name)), device(device), rank(rank), num_ranks(num_ranks),
      data_bytes(data_bytes), timeout_ns(timeout_ns), peers_(num_ranks, nullptr) {}

cudaError_t NvlRuntime::allocate(cudaIpcMemHandle_t* handle) {
  DEEP_EP_OPS_RETURN_IF_ERROR(cudaSetDevice(device));
  const size_t bytes = intranode_control_bytes() + static_cast<size_t>(data_bytes);
  DEEP_EP_OPS_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&local_), bytes));
  // Counters start at zero; the peers only write after the collective open.
  DEEP_EP_OPS_RETURN_IF_ERROR(cudaMemset(local_, 0, intranode_control_bytes()));
  DEEP_EP_OPS_RETURN_IF_ERROR(cudaDeviceSynchronize());
  peers_[rank] = local_;
  int* host = nullptr;
  DEEP_EP_OPS_RETURN_IF_ERROR(
      cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int) * (1 + kMaxNotifyInts),
                    cudaHostAllocMapped));
  *host = 0;
  num_recv_host = host;
  DEEP_EP_OPS_RETURN_IF_ERROR(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&num_recv_device), host, 0));
  return cudaIpcGetMemHandle(handle, local_);
}

cudaError_t NvlRuntime::open(const std::vector<cudaIpcMemHandle_t>& handles) {
  DEEP_EP_OPS_RETURN_IF_ERROR(cudaSetDevice(device));
  for (int r = 0; r < num_ranks; ++r) {
    if (r == rank) continue;
    void* peer = nullptr;
    DEEP_EP_OPS_RETURN_IF_ERROR(
        cudaIpcOpenMemHandle(&peer, handles[r], cudaIpcMemLazyEnablePeerAccess));
    peers_[r] = static_cast<uint8_t*>(peer);
  }
  DEEP_EP_OPS_RETURN_IF_ERROR(
      cudaMalloc(reinterpret_cast<void**>(&peers_device_), sizeof(uint8_t*) * num_ranks));
  return cudaMemcpy(peers_device_, peers_.data(), sizeof(uint8_t*) * num_ranks,
                    cudaMemcpyHostToDevice);
}

void NvlRuntime::release() {
  cudaSetDevice(device);
  for (int r = 0; r < num_ranks; ++r)
    if (r != rank && peers_[r] != nullptr) cudaIpcCloseMemHandle(peers_[r]);
  if (peers_device_ != nullptr) cudaFree(peers_device_);
  if (local_ != nullptr) cudaFree(local_);
  if (num_recv_host != nullptr) cudaFreeHost(const_cast<int*>(num_recv_host));
  peers_.assign(num_ranks, nullptr);
  local_ = nullptr;
  peers_device_ = nullptr;
  num_recv_host = nullptr;
  num_recv_device = nullptr;
}

Intranode NvlRuntime::view(int* error, int op) const {
  Intranode nvl;
  nvl.local = local_;
  nvl.peers = peers_device_;
  nvl.rank = rank;
  nvl.num_ranks = num_ranks;
  nvl.data_bytes = data_bytes;
  nvl.timeout_ns = timeout_ns;
  nvl.error = error;
  nvl.op = op;
  nvl.call = 0;  // the data kernels' call word: set by the call that launches one
  return nvl;
}

}  // namespace deep_ep_ops
