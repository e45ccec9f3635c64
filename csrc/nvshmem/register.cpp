// Lends libdeep_ep_ops (the C++ Buffer, csrc/buffer.cpp) this library's NVSHMEM runtime when
// loaded: the Buffer reaches it without linking it, so a build without NVSHMEM still has the
// NVLink path (csrc/bridge.h, NvshmemApi).

#include "../bridge.h"  // libdeep_ep_ops' (this directory has its own bridge.h)
#include "nvshmem/bridge.h"
#include "nvshmem/runtime.h"

namespace deep_ep_ops {
namespace {

const bool lent = [] {
  NvshmemApi api;
  api.unique_id = nvshmem_unique_id_bytes;
  api.join = nvshmem_join_job;
  api.world = nvshmem_world;
  api.create = ll_create;
  api.destroy = ll_destroy;
  api.bytes_needed = low_latency_buffer_bytes;
  set_nvshmem_api(std::move(api));
  return true;
}();

}  // namespace
}  // namespace deep_ep_ops
