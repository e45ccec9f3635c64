// What libdeep_ep_ops (csrc/ops.cpp: the NVLink op kernels and runtimes) offers its front ends:
// the Python bindings (csrc/python.cpp, deep_ep_ops._C) and the C++ Buffer (csrc/buffer.cpp).
// Python-free; both front ends reach the one registry of NVLink runtimes by buffer name.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bridge_common.h"

namespace deep_ep_ops {

// The sources the library was built from (csrc/generated/build_id.h).
const char* nvl_source_hash();

// --- NVLink runtimes by buffer name -----------------------------------------------------------

// Allocates a buffer's NVLink memory; returns its CUDA IPC handle as bytes.
std::string intranode_create(const std::string& name, int device, int rank, int num_ranks,
                             int64_t num_nvl_bytes, double timeout_s);
// Maps the peers' memory (their handles indexed by rank, this rank's own included).
void intranode_open(const std::string& name, const std::vector<std::string>& handles);
// Collective teardown with free_memory (the caller synchronised), else only forgets the name.
void intranode_destroy(const std::string& name, bool free_memory);
// The NVLink bytes the kernels need for calls under `config` (Config.get_nvl_buffer_size_hint).
int64_t nvl_buffer_size_hint(const std::vector<int64_t>& config, int64_t hidden_bytes,
                             int64_t num_ranks);
// Raises an error a kernel on this device reported since the last op call.
void check_device_errors(int device);

// --- what the Python package lends (csrc/python_common.h) ------------------------------------

void set_nvl_fallback_hook(BoxedHook hook);
void set_nvl_check_hook(BoxedHook hook);
std::map<std::string, std::pair<int64_t, double>> nvl_host_trace_take();
std::map<int, std::string> nvl_op_names();

// --- the eager direct entries (deep_ep_ops.ops._direct; docs/DESIGN.md section 7) -------------
// The op kernels called without the dispatcher, with the backward recorded from C++ where the
// inputs require grad; std::nullopt where the call must take the ops instead.

std::optional<std::vector<at::Tensor>> direct_get_dispatch_layout(const at::Tensor& topk_idx,
                                                                  int64_t num_experts,
                                                                  int64_t num_ranks,
                                                                  int64_t num_rdma_ranks);

struct DirectDispatch {
  std::vector<at::Tensor> out;  // the op's ten outputs (DispatchResult's order)
  // The rows per local expert read on the host (data-dependent dispatch on the kernels).
  std::optional<std::vector<int>> recv_per_expert;
};

std::optional<DirectDispatch> direct_dispatch(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
    const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
    const at::Tensor& num_tokens_per_rank, const at::Tensor& is_token_in_rank,
    const std::optional<at::Tensor>& num_tokens_per_expert, const std::string& buffer,
    int64_t expert_alignment, bool capacity, int64_t num_worst_tokens,
    const std::vector<int64_t>& config, bool lean);

std::optional<std::vector<at::Tensor>> direct_cached_dispatch(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
    const std::optional<at::Tensor>& topk_weights, const std::vector<at::Tensor>& handle,
    const std::string& buffer, int64_t num_worst_tokens, const std::vector<int64_t>& config);

std::optional<std::vector<at::Tensor>> direct_combine(
    const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
    const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
    const std::vector<at::Tensor>& handle, const std::string& buffer, int64_t num_worst_tokens,
    const std::vector<int64_t>& config);

}  // namespace deep_ep_ops

namespace deep_ep_ops {

// --- the NVSHMEM runtime, lent by libdeep_ep_ops_nvshmem when loaded --------------------------
// (csrc/nvshmem/register.cpp), so the C++ Buffer reaches it without linking it: a build
// without NVSHMEM has no low-latency mode, and says so.
struct NvshmemApi {
  std::function<std::string()> unique_id;  // NVSHMEM's unique id bytes
  // Joins the job as PE `rank` of `num_ranks` on `device` (once per process).
  std::function<void(const std::string& unique_id, int rank, int num_ranks, int device)> join;
  // {my PE, PEs}, {-1, 0} before joining.
  std::function<std::pair<int, int>()> world;
  // Collective: a buffer's symmetric memory (zeroed) as a uint8 tensor, its runtime by name.
  std::function<at::Tensor(const std::string& name, int device, int64_t bytes, double timeout_s,
                           bool force_put)>
      create;
  std::function<void(const std::string& name, bool free_memory)> destroy;
  // Symmetric bytes the low-latency ops need for calls of this shape.
  std::function<int64_t(int64_t num_max, int64_t hidden, int64_t num_ranks, int64_t num_experts)>
      bytes_needed;
};

void set_nvshmem_api(NvshmemApi api);
const NvshmemApi* nvshmem_api();  // nullptr: libdeep_ep_ops_nvshmem is not loaded

}  // namespace deep_ep_ops
