// The C++ API of deep_ep_ops: a Buffer with DeepEP V1's C++ shape (deep_ep::Buffer of
// csrc/deep_ep.hpp) for engines that hold DeepEP in C++, in a process with or without Python.
// Link libdeep_ep_ops (and libdeep_ep_ops_nvshmem for the low-latency mode); compile and link
// flags: `python -m deep_ep_ops.cpp_api --cflags --libs` (docs/CPP_API.md). Everything runs on
// the caller's current CUDA stream. Errors are c10::Error (ValueError / TypeError /
// NotImplementedError where the Python package raises those), with the op layer's messages.
//
// Names are DeepEP's; strings replace pybind11's bytearrays. What differs or is not covered:
// docs/CPP_API.md.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
// torch >= 2.10 keeps the event in c10 (its header needs no cuBLAS/cuSPARSE headers, which a
// CUDA toolkit without those libraries lacks); older releases define it in ATen.
#if __has_include(<c10/cuda/CUDAEvent.h>)
#include <c10/cuda/CUDAEvent.h>
#define DEEP_EP_OPS_CUDA_EVENT c10::cuda::CUDAEvent
#else
#include <ATen/cuda/CUDAEvent.h>
#define DEEP_EP_OPS_CUDA_EVENT at::cuda::CUDAEvent
#endif

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace deep_ep_ops {

// DeepEP's Config: SMs of a normal-mode kernel (two per channel) and the chunk sizes a channel
// moves (send) and holds (recv) over NVLink and RDMA.
struct Config {
  int num_sms = 20;
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 256;

  Config() = default;
  // Checked as the Python Config: positive values, even num_sms, send <= recv over NVLink.
  Config(int num_sms, int num_max_nvl_chunked_send_tokens, int num_max_nvl_chunked_recv_tokens,
         int num_max_rdma_chunked_send_tokens, int num_max_rdma_chunked_recv_tokens);
  // NVLink bytes a normal-mode call needs for `hidden_bytes` per token.
  int64_t get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const;
  // RDMA bytes a normal-mode call needs (0 within one NVLink domain).
  int64_t get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const;
  // The ops' `int[] config`.
  std::vector<int64_t> to_list() const;
};

// Buffer.get_dispatch_config / get_combine_config of the Python package.
Config get_dispatch_config(int num_ranks, int num_sms = 20);
Config get_combine_config(int num_ranks, int num_sms = 20);
// Symmetric bytes the low-latency mode needs (the zero-copy combine rows, then the kernels').
int64_t get_low_latency_rdma_size_hint(int num_max_dispatch_tokens_per_rank, int hidden,
                                       int num_ranks, int num_experts);

// DeepEP's EventHandle: a CUDA event recorded on the current stream when made.
struct EventHandle {
  using CUDAEvent = DEEP_EP_OPS_CUDA_EVENT;
  std::shared_ptr<CUDAEvent> event;
  EventHandle();
  void current_stream_wait() const;
};

class Buffer {
 public:
  // Allocates this rank's memory (the NVLink buffer at once; NVSHMEM's symmetric memory in
  // sync, NVSHMEM being started there). `enable_shrink` and `use_fabric` are not supported.
  Buffer(int rank, int num_ranks, int64_t num_nvl_bytes, int64_t num_rdma_bytes,
         bool low_latency_mode, bool explicitly_destroy = false, bool enable_shrink = false,
         bool use_fabric = false);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  bool is_available() const;
  bool is_internode_available() const;
  int get_num_rdma_ranks() const;
  int get_rdma_rank() const;
  int get_root_rdma_rank(bool global) const;
  int get_local_device_id() const;
  // This rank's CUDA IPC handle (empty without NVLink bytes) and, on rank 0 of a buffer with
  // RDMA bytes, NVSHMEM's unique id (empty elsewhere), as bytes for the peers.
  std::string get_local_ipc_handle() const;
  std::string get_local_nvshmem_unique_id() const;
  // A view of this rank's NVLink (or, with use_rdma_buffer, symmetric) memory from `offset`.
  at::Tensor get_local_buffer_tensor(at::ScalarType dtype, int64_t offset,
                                     bool use_rdma_buffer) const;
  // The stream the calls run on: the current one (there is no separate communication stream).
  c10::cuda::CUDAStream get_comm_stream() const;

  // Collective: maps the peers' NVLink memory from their handles (indexed by rank) and joins
  // NVSHMEM with rank 0's unique id (required with RDMA bytes).
  void sync(const std::vector<int>& device_ids,
            const std::vector<std::optional<std::string>>& all_gathered_handles,
            const std::optional<std::string>& root_unique_id_opt);
  // Collective release (every rank calls it after its last use of the buffer).
  void destroy();

  // (num_tokens_per_rank, num_tokens_per_rdma_rank (none on one node), num_tokens_per_expert,
  // is_token_in_rank, event).
  std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor,
             std::optional<EventHandle>>
  get_dispatch_layout(const at::Tensor& topk_idx, int num_experts,
                      std::optional<EventHandle>& previous_event, bool async,
                      bool allocate_on_comm_stream);

  // Dispatch, or with cached_rank_prefix_matrix a cached dispatch along an earlier handle of
  // this buffer. Returns (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
  // num_recv_tokens_per_expert_list, rank_prefix_matrix, channel_prefix_matrix,
  // recv_channel_prefix_matrix, recv_src_idx, send_head, event), as DeepEP's.
  // num_worst_tokens > 0: capacity mode (that many rows, no host synchronisation).
  std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
             std::optional<at::Tensor>, std::vector<int>, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor, std::optional<EventHandle>>
  intranode_dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                     const std::optional<at::Tensor>& topk_idx,
                     const std::optional<at::Tensor>& topk_weights,
                     const std::optional<at::Tensor>& num_tokens_per_rank,
                     const at::Tensor& is_token_in_rank,
                     const std::optional<at::Tensor>& num_tokens_per_expert,
                     int cached_num_recv_tokens,
                     const std::optional<at::Tensor>& cached_rank_prefix_matrix,
                     const std::optional<at::Tensor>& cached_channel_prefix_matrix,
                     int expert_alignment, int num_worst_tokens, const Config& config,
                     std::optional<EventHandle>& previous_event, bool async,
                     bool allocate_on_comm_stream);

  // Combine along a handle of this buffer's intranode_dispatch (DeepEP passes the receive side
  // of the handle: src_idx = recv_src_idx, channel_prefix_matrix = recv_channel_prefix_matrix).
  // Returns (combined_x, combined_topk_weights, event).
  std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<EventHandle>>
  intranode_combine(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
                    const std::optional<at::Tensor>& bias_0,
                    const std::optional<at::Tensor>& bias_1, const at::Tensor& src_idx,
                    const at::Tensor& rank_prefix_matrix, const at::Tensor& channel_prefix_matrix,
                    const at::Tensor& send_head, const Config& config,
                    std::optional<EventHandle>& previous_event, bool async,
                    bool allocate_on_comm_stream);

  // Internode (several NVLink domains): DeepEP's signatures, so code written for both paths
  // compiles, but the staged internode path lives in the Python package for now: these raise
  // c10::NotImplementedError (docs/CPP_API.md).
  std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
             std::optional<at::Tensor>, std::vector<int>, at::Tensor, at::Tensor,
             std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor,
             std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
             std::optional<EventHandle>>
  internode_dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                     const std::optional<at::Tensor>& topk_idx,
                     const std::optional<at::Tensor>& topk_weights,
                     const std::optional<at::Tensor>& num_tokens_per_rank,
                     const std::optional<at::Tensor>& num_tokens_per_rdma_rank,
                     const at::Tensor& is_token_in_rank,
                     const std::optional<at::Tensor>& num_tokens_per_expert,
                     int cached_num_recv_tokens, int cached_num_rdma_recv_tokens,
                     const std::optional<at::Tensor>& cached_rdma_channel_prefix_matrix,
                     const std::optional<at::Tensor>& cached_recv_rdma_rank_prefix_sum,
                     const std::optional<at::Tensor>& cached_gbl_channel_prefix_matrix,
                     const std::optional<at::Tensor>& cached_recv_gbl_rank_prefix_sum,
                     int expert_alignment, int num_worst_tokens, const Config& config,
                     std::optional<EventHandle>& previous_event, bool async,
                     bool allocate_on_comm_stream);
  std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<EventHandle>>
  internode_combine(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
                    const std::optional<at::Tensor>& bias_0,
                    const std::optional<at::Tensor>& bias_1, const at::Tensor& src_meta,
                    const at::Tensor& is_combined_token_in_rank,
                    const at::Tensor& rdma_channel_prefix_matrix,
                    const at::Tensor& rdma_rank_prefix_sum,
                    const at::Tensor& gbl_channel_prefix_matrix,
                    const at::Tensor& combined_rdma_head, const at::Tensor& combined_nvl_head,
                    const Config& config, std::optional<EventHandle>& previous_event, bool async,
                    bool allocate_on_comm_stream);

  void clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts);

  // (recv_x, recv_x_scales (FP8 only), recv_count, src_info, layout_range, event, hook). With
  // return_recv_hook only the send half runs now; calling the hook receives.
  // dispatch_wait_recv_cost_stats must be none (not measured).
  std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor,
             std::optional<EventHandle>, std::optional<std::function<void()>>>
  low_latency_dispatch(const at::Tensor& x, const at::Tensor& topk_idx,
                       const std::optional<at::Tensor>& cumulative_local_expert_recv_stats,
                       const std::optional<at::Tensor>& dispatch_wait_recv_cost_stats,
                       int num_max_dispatch_tokens_per_rank, int num_experts, bool use_fp8,
                       bool round_scale, bool use_ue8m0, bool async, bool return_recv_hook);

  // (combined_x, event, hook). use_logfmt and combine_wait_recv_cost_stats are not supported.
  std::tuple<at::Tensor, std::optional<EventHandle>, std::optional<std::function<void()>>>
  low_latency_combine(const at::Tensor& x, const at::Tensor& topk_idx,
                      const at::Tensor& topk_weights, const at::Tensor& src_info,
                      const at::Tensor& layout_range,
                      const std::optional<at::Tensor>& combine_wait_recv_cost_stats,
                      int num_max_dispatch_tokens_per_rank, int num_experts, bool use_logfmt,
                      bool zero_copy, bool async, bool return_recv_hook,
                      const std::optional<at::Tensor>& out = std::nullopt);

  // The [num_experts / num_ranks, num_ranks * num_max, hidden] bfloat16 rows a zero-copy
  // low_latency_combine reads.
  at::Tensor get_next_low_latency_combine_buffer(int num_max_dispatch_tokens_per_rank, int hidden,
                                                 int num_experts) const;

  // The name the deep_ep ops take for this buffer (torch.ops.deep_ep.* / the dispatcher).
  const std::string& name() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace deep_ep_ops
