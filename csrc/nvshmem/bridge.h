// What libdeep_ep_ops_nvshmem (csrc/nvshmem/ops.cpp: the low-latency NVSHMEM op kernels and
// runtimes) offers its front ends, the Python bindings (csrc/nvshmem/python.cpp,
// deep_ep_ops._C_nvshmem) first. Python-free. Both libraries load into one process, so names
// that csrc/bridge.h (libdeep_ep_ops) has too carry ll_ here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bridge_common.h"

namespace deep_ep_ops {

// The sources the library was built from (csrc/generated/build_id.h).
const char* ll_source_hash();

// --- the NVSHMEM job (once per process) -------------------------------------------------------

// NVSHMEM's unique id as bytes (rank 0 makes it and hands it to the others).
std::string nvshmem_unique_id_bytes();
// Joins the job as PE `rank` of `num_ranks`, on `device`.
void nvshmem_join_job(const std::string& id, int rank, int num_ranks, int device);

// --- low-latency runtimes by buffer name ------------------------------------------------------

// Collective: a buffer's symmetric memory, as a uint8 CUDA tensor over it (the workspace of the
// low-latency ops and the zero-copy combine buffer). `timeout_s` bounds the kernels' waits;
// `force_put` reaches every peer through NVSHMEM puts (no load/store mappings).
at::Tensor ll_create(const std::string& name, int device, int64_t bytes, double timeout_s,
                     bool force_put);
// Peers of a buffer reached with loads/stores (the others through NVSHMEM puts).
int ll_mapped_peers(const std::string& name);
// Collective teardown (frees the symmetric memory) with free_memory, else only forgets the name.
void ll_destroy(const std::string& name, bool free_memory);
// The symmetric bytes the kernels need for calls of these shapes
// (config.get_low_latency_rdma_size_hint).
int64_t low_latency_buffer_bytes(int64_t num_max, int64_t hidden, int64_t num_ranks,
                                 int64_t num_experts);
// Raises an error a low-latency kernel on this device reported since the last call.
void ll_check_device_errors(int device);

// --- what the Python package lends (csrc/python_common.h) ------------------------------------

void set_ll_fallback_hook(BoxedHook hook);
void set_ll_check_hook(BoxedHook hook);
// The ranks' agreement on the shapes (num_max, hidden, num_experts) a buffer's first kernel call
// pins, made by every rank at that call: throws c10::ValueError on every rank when they differ
// (the buffer stays usable and unpinned); any other exception (a failed exchange) leaves the
// buffer broken. Without the hook the ranks are trusted to agree.
using PinAgreement =
    std::function<void(const std::string& op, const std::string& buffer, int64_t num_max,
                       int64_t hidden, int64_t num_experts)>;
void set_pin_agreement_hook(PinAgreement hook);
std::map<std::string, std::pair<int64_t, double>> ll_host_trace_take();
std::map<int, std::string> ll_op_names();

// --- the internode stages on their own (development: tests/test_cuda_internode_forward.py,
// deep_ep_ops/internode_staged.py), on a buffer's symmetric memory ---------------------------

// Offsets and sizes of a layout by name, in a fixed order.
using LayoutOffsets = std::vector<std::pair<std::string, int64_t>>;

struct InternodeForwardResult {
  at::Tensor send_rdma_head;       // [T, S] int32
  at::Tensor num_tokens_per_node;  // [S] int32
  LayoutOffsets offsets;           // where the caller reads the regions from the memory tensor
};

// The forward of docs/DESIGN.md section 5 with `ranks_per_node` ranks per node.
InternodeForwardResult internode_forward(const std::string& buffer, const at::Tensor& x,
                                         const std::optional<at::Tensor>& x_scales,
                                         const std::optional<at::Tensor>& topk_idx,
                                         const std::optional<at::Tensor>& topk_weights,
                                         const at::Tensor& is_token_in_rank,
                                         const std::optional<at::Tensor>& num_tokens_per_expert,
                                         int64_t ranks_per_node, int64_t num_blocks);
// The layout of the combine's way back for rows of `row_bytes` and weights of `weight_bytes`.
LayoutOffsets internode_return_offsets(const std::string& buffer, int64_t row_bytes,
                                       int64_t weight_bytes, int64_t ranks_per_node);
// The way back: the staged partials to their sources; waits for this rank's.
void internode_return(const std::string& buffer, const at::Tensor& region_prefix,
                      int64_t row_bytes, int64_t weight_bytes, int64_t ranks_per_node,
                      int64_t num_blocks);

// --- the eager direct entries (deep_ep_ops.ops._direct; docs/DESIGN.md section 7) -------------
// The op kernels called without the dispatcher, with the backward recorded from C++ where the
// inputs require grad; std::nullopt (false) where the call must take the ops instead. The
// dispatches return the op's five outputs (recv_x, recv_x_scales, recv_count, src_info,
// layout_range); the fused one adds the received counts to `stats` in place.

std::optional<std::vector<at::Tensor>> direct_low_latency_dispatch(
    const at::Tensor& x, const at::Tensor& topk_idx, const std::string& buffer, int64_t num_ranks,
    int64_t num_max, int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
    const std::optional<at::Tensor>& stats);

std::optional<std::vector<at::Tensor>> direct_low_latency_dispatch_send(
    const at::Tensor& x, const at::Tensor& topk_idx, const std::string& buffer, int64_t num_ranks,
    int64_t num_max, int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0);

// Completes the send half's outputs in place; true when it ran.
bool direct_low_latency_dispatch_recv(const at::Tensor& recv_x, const at::Tensor& recv_x_scales,
                                      const at::Tensor& recv_count, const at::Tensor& src_info,
                                      const at::Tensor& layout_range,
                                      const std::optional<at::Tensor>& stats,
                                      const std::string& buffer);

std::optional<at::Tensor> direct_low_latency_combine(
    const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
    const at::Tensor& src_info, const at::Tensor& layout_range, const std::string& buffer,
    int64_t num_ranks, int64_t num_max, int64_t num_experts, bool zero_copy);

// The combine into `out`; true when it ran.
bool direct_low_latency_combine_out(const at::Tensor& x, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_weights, const at::Tensor& src_info,
                                    const at::Tensor& layout_range, const std::string& buffer,
                                    int64_t num_ranks, int64_t num_max, int64_t num_experts,
                                    bool zero_copy, const at::Tensor& out);

std::optional<at::Tensor> direct_low_latency_combine_send(
    const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
    const at::Tensor& src_info, const at::Tensor& layout_range, const std::string& buffer,
    int64_t num_ranks, int64_t num_max, int64_t num_experts, bool zero_copy);

// Completes `combined_x` (from the send half) in place; true when it ran.
bool direct_low_latency_combine_recv(const at::Tensor& combined_x, const at::Tensor& topk_idx,
                                     const at::Tensor& topk_weights, const std::string& buffer);

}  // namespace deep_ep_ops
