// get_dispatch_layout on the GPU: per-rank, per-RDMA-rank and per-expert token counts and the
// token-to-rank map, from top-k expert indices. Pure: no communication.
//
// One thread per token: it de-duplicates the token's experts (a token counts once per expert
// and once per rank), writes its row of is_token_in_rank, and adds to its block's histograms in
// shared memory; the last block to finish sums the blocks' histograms into the outputs.

#include "kernels/api.h"

namespace deep_ep_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRanks = 64;  // ranks a token's mask can name
constexpr int kTokensPerBlock = kThreads;  // one token per thread: many blocks in flight

}  // namespace

// External linkage in a named namespace: a profile shows deep_ep_ops::layout::get_dispatch_layout,
// not an (anonymous namespace) member.
namespace layout {

__global__ void __launch_bounds__(kThreads)
get_dispatch_layout(const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk,
                    int num_experts, int num_ranks, int num_rdma_ranks,
                    int* __restrict__ num_tokens_per_rank,
                    int* __restrict__ num_tokens_per_rdma_rank,
                    int* __restrict__ num_tokens_per_expert, bool* __restrict__ is_token_in_rank,
                    int* __restrict__ error, int* __restrict__ workspace,
                    unsigned* __restrict__ ticket) {
  extern __shared__ int histogram[];  // [num_experts | num_ranks | num_rdma_ranks]
  int* per_expert = histogram;
  int* per_rank = per_expert + num_experts;
  int* per_rdma_rank = per_rank + num_ranks;
  const int num_bins = num_experts + num_ranks + num_rdma_ranks;
  for (int i = threadIdx.x; i < num_bins; i += blockDim.x) histogram[i] = 0;
  __syncthreads();

  const int experts_per_rank = num_experts / num_ranks;
  const int ranks_per_rdma_rank = num_ranks / num_rdma_ranks;
  for (int token = blockIdx.x * blockDim.x + threadIdx.x; token < num_tokens;
       token += gridDim.x * blockDim.x) {
    const int64_t* row = topk_idx + static_cast<int64_t>(token) * num_topk;
    uint64_t rank_mask = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = row[k];
      if (expert < -1 || expert >= num_experts) {
        // A plain store: the word lives in mapped host memory, where PCIe has no atomics.
        *reinterpret_cast<volatile int*>(error) = kErrorExpertOutOfRange;
        continue;
      }
      if (expert < 0) continue;
      bool repeated = false;
      for (int j = 0; j < k; ++j) repeated |= row[j] == expert;
      if (repeated) continue;
      atomicAdd(&per_expert[expert], 1);
      rank_mask |= uint64_t{1} << (expert / experts_per_rank);
    }
    bool* in_rank = is_token_in_rank + static_cast<int64_t>(token) * num_ranks;
    uint64_t rdma_mask = 0;
    for (int r = 0; r < num_ranks; ++r) {
      const bool present = (rank_mask >> r) & 1;
      in_rank[r] = present;
      if (present) {
        atomicAdd(&per_rank[r], 1);
        rdma_mask |= uint64_t{1} << (r / ranks_per_rdma_rank);
      }
    }
    for (int r = 0; r < num_rdma_ranks; ++r)
      if ((rdma_mask >> r) & 1) atomicAdd(&per_rdma_rank[r], 1);
  }
  __syncthreads();

  auto output = [&](int i) -> int* {
    return i < num_experts ? num_tokens_per_expert + i
         : i < num_experts + num_ranks ? num_tokens_per_rank + (i - num_experts)
         : num_tokens_per_rdma_rank + (i - num_experts - num_ranks);
  };
  if (gridDim.x == 1) {  // the only block writes the counts directly
    for (int i = threadIdx.x; i < num_bins; i += blockDim.x) *output(i) = histogram[i];
    return;
  }
  // Several blocks: each leaves its histogram in the workspace, and the last block to finish
  // (by ticket) sums them in block order. No zero-fill launches, no global atomics on outputs.
  int* partial = workspace + static_cast<int64_t>(blockIdx.x) * num_bins;
  for (int i = threadIdx.x; i < num_bins; i += blockDim.x) partial[i] = histogram[i];
  __threadfence();
  __syncthreads();
  __shared__ bool is_last;
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < num_bins; i += blockDim.x) {
    int total = 0;
    for (int b = 0; b < static_cast<int>(gridDim.x); ++b)
      total += __ldcg(workspace + static_cast<int64_t>(b) * num_bins + i);
    *output(i) = total;
  }
  if (threadIdx.x == 0) *ticket = 0;  // ready for the next launch (and graph replay)
}

}  // namespace layout

int layout_workspace_ints(int num_experts, int num_ranks, int num_rdma_ranks, int num_sms) {
  return num_sms * (num_experts + num_ranks + num_rdma_ranks);
}

cudaError_t launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk,
                                       int num_experts, int num_ranks, int num_rdma_ranks,
                                       int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                                       int* num_tokens_per_expert, bool* is_token_in_rank,
                                       int* error, int* workspace, unsigned* ticket, int num_sms,
                                       cudaStream_t stream) {
  if (num_ranks > kMaxRanks || num_rdma_ranks > kMaxRanks) return cudaErrorInvalidValue;
  int blocks = (num_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  blocks = blocks < 1 ? 1 : (blocks > num_sms ? num_sms : blocks);
  const size_t shared = sizeof(int) * (num_experts + num_ranks + num_rdma_ranks);
  layout::get_dispatch_layout<<<blocks, kThreads, shared, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, num_rdma_ranks,
      num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
      error, workspace, ticket);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
