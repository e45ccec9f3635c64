#include "nvshmem/runtime.h"

#include <cstring>
#include <utility>

#include <nvshmem.h>
#include <nvshmemx.h>

namespace deep_ep_ops {

std::string nvshmem_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) return std::string();
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

std::string nvshmem_join(const std::string& unique_id, int rank, int num_ranks, int device) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (unique_id.size() != sizeof(id))
    return "the unique id has " + std::to_string(unique_id.size()) + " bytes, expected " +
           std::to_string(sizeof(id));
  std::memcpy(&id, unique_id.data(), sizeof(id));
  if (cudaSetDevice(device) != cudaSuccess) return "cudaSetDevice failed";
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) != 0)
    return "nvshmemx_set_attr_uniqueid_args failed";
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0)
    return "nvshmemx_init_attr failed";
  // NVSHMEM's start-up visits every module that registered its device state, torch's own
  // NVSHMEM library among them; one it cannot read ("Bad device pointer callback ... Skipping")
  // leaves cudaErrorInvalidSymbol as the last error, which the next CUDA call of torch would
  // report as its own (seen in a libtorch process: the caching allocator's next cudaMalloc).
  (void)cudaGetLastError();
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks)
    return "NVSHMEM gave PE " + std::to_string(nvshmem_my_pe()) + " of " +
           std::to_string(nvshmem_n_pes()) + ", expected " + std::to_string(rank) + " of " +
           std::to_string(num_ranks);
  return std::string();
}

std::pair<int, int> nvshmem_world() {
  if (nvshmemx_init_status() < NVSHMEM_STATUS_IS_INITIALIZED) return {-1, 0};
  return {nvshmem_my_pe(), nvshmem_n_pes()};
}

LowLatencyRuntime::LowLatencyRuntime(std::string name, int device, int64_t bytes,
                                     uint64_t timeout_ns, bool force_put)
    : name(std::move(name)), device(device), rank(nvshmem_my_pe()), num_ranks(nvshmem_n_pes()),
      bytes(bytes), timeout_ns(timeout_ns), peers_(nvshmem_n_pes(), nullptr) {
  cudaSetDevice(device);
  memory = static_cast<uint8_t*>(nvshmem_malloc(static_cast<size_t>(bytes)));
  if (memory == nullptr) return;
  cudaMemset(memory, 0, static_cast<size_t>(bytes));
  cudaDeviceSynchronize();
  for (int pe = 0; pe < num_ranks; ++pe)
    peers_[pe] = force_put ? nullptr : static_cast<uint8_t*>(nvshmem_ptr(memory, pe));
  cudaMalloc(reinterpret_cast<void**>(&peers_device_), sizeof(uint8_t*) * num_ranks);
  cudaMemcpy(peers_device_, peers_.data(), sizeof(uint8_t*) * num_ranks, cudaMemcpyHostToDevice);
  nvshmem_barrier_all();  // nobody writes into a peer's memory before it is zeroed
}

void LowLatencyRuntime::release() {
  cudaSetDevice(device);
  if (memory != nullptr) nvshmem_free(memory);
  if (peers_device_ != nullptr) cudaFree(peers_device_);
  memory = nullptr;
  peers_device_ = nullptr;
}

cudaError_t LowLatencyRuntime::clean(cudaStream_t stream) {
  nvshmemx_barrier_all_on_stream(stream);  // no peer still writes here
  const cudaError_t status = cudaMemsetAsync(memory, 0, static_cast<size_t>(bytes), stream);
  nvshmemx_barrier_all_on_stream(stream);  // nobody writes before everyone is clean
  return status;
}

LowLatency LowLatencyRuntime::view(int num_max_tokens, int hidden, int* error, int op,
                                   int num_sms) const {
  LowLatency ll{};
  ll.layout = low_latency_layout(num_ranks, num_max_tokens, hidden);
  ll.region = (bytes - ll.layout.bytes) / 128 * 128;  // the kernels' region ends the allocation
  ll.base = memory + ll.region;
  ll.peers = peers_device_;
  ll.all_peers_mapped = num_mapped_peers() == num_ranks;
  ll.rank = rank;
  ll.num_ranks = num_ranks;
  ll.num_max_tokens = num_max_tokens;
  ll.hidden = hidden;
  ll.timeout_ns = timeout_ns;
  ll.error = error;
  ll.op = op;
  ll.num_sms = num_sms;
  return ll;
}

int LowLatencyRuntime::num_mapped_peers() const {
  int n = 0;
  for (uint8_t* peer : peers_) n += peer != nullptr;
  return n;
}

}  // namespace deep_ep_ops
