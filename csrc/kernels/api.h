// Torch-free kernel entry points of deep_ep_ops: raw device pointers and a cudaStream_t.
// The torch bindings (csrc/bindings.cpp) check arguments, allocate outputs and call these.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace deep_ep_ops {

// Codes of the device error word: a kernel stores one on bad data, and the next op call on
// that device raises it as a Python exception (the word is mapped host memory: no sync).
enum DeviceError : int {
  kErrorNone = 0,
  kErrorExpertOutOfRange = 1,
};

// get_dispatch_layout: topk_idx [num_tokens, num_topk] int64 (-1 = no expert) ->
// num_tokens_per_rank [num_ranks], num_tokens_per_rdma_rank [num_rdma_ranks],
// num_tokens_per_expert [num_experts] (int32; a token counts once per rank and per expert)
// and is_token_in_rank [num_tokens, num_ranks] bool. Out-of-range experts set
// kErrorExpertOutOfRange in *error and are skipped. `workspace` holds
// layout_workspace_ints(...) ints and `ticket` one zero-initialised counter, both persistent
// (the kernel leaves the ticket at zero again).
int layout_workspace_ints(int num_experts, int num_ranks, int num_rdma_ranks, int num_sms);
cudaError_t launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk,
                                       int num_experts, int num_ranks, int num_rdma_ranks,
                                       int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                                       int* num_tokens_per_expert, bool* is_token_in_rank,
                                       int* error, int* workspace, unsigned* ticket, int num_sms,
                                       cudaStream_t stream);

}  // namespace deep_ep_ops
