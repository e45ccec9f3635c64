// Torch-free kernel entry points of deep_ep_ops: raw device pointers and a cudaStream_t.
// The torch bindings (csrc/bindings.cpp) check arguments, allocate outputs and call these.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace deep_ep_ops {

// Codes of the device error word: a kernel stores one on bad data, and the next op call on
// that device raises it as a Python exception (the word is mapped host memory: no sync).
// The word is 4 ints: {code, op (IntranodeOp), peer rank, value}; the code is stored last.
enum DeviceError : int {
  kErrorNone = 0,
  kErrorExpertOutOfRange = 1,
  kErrorTimeout = 2,           // a peer never arrived; value = timeout in seconds
  kErrorCapacity = 3,          // capacity mode: more rows than num_worst_tokens; value = rows
  kErrorCountMismatch = 4,     // num_tokens_per_rank disagrees with is_token_in_rank
  kErrorBadHandle = 5,         // send_head / rank_prefix_matrix are not from one dispatch
};
constexpr int kErrorWordInts = 4;

enum IntranodeOp : int {
  kOpDispatch = 1,
  kOpCapacityDispatch = 2,
  kOpCachedDispatch = 3,
  kOpCombine = 4,
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

// --- intranode (NVLink) normal mode: csrc/kernels/intranode.cu ------------------------------

constexpr int kMaxNvlRanks = 8;     // ranks of one NVLink domain
constexpr int kMaxBlocks = 160;     // blocks (SMs) of one normal-mode call
constexpr int kMaxNotifyInts = 2048;  // one notify row: num_ranks + channels + local experts

// Bytes of the control region at the start of every rank's NVLink allocation (the data region,
// num_nvl_bytes of staging, follows). The allocation must be zeroed before first use.
size_t intranode_control_bytes();

// One rank's view of an NVLink buffer, passed by value to the kernels.
struct Intranode {
  uint8_t* local;          // this rank's allocation
  uint8_t* const* peers;   // device array [num_ranks]: every rank's allocation, mapped here
  int rank;
  int num_ranks;
  int64_t data_bytes;      // staging bytes after the control region
  uint64_t timeout_ns;     // spin limit of every wait on a peer
  int* error;              // the device error word (kErrorWordInts ints, mapped host memory)
  int op;                  // IntranodeOp, for error reports
};

// Dispatch, step 1 (no communication) and 2 (count exchange). Inputs: is_token_in_rank
// [num_tokens, num_ranks], num_tokens_per_rank [num_ranks], num_tokens_per_expert
// [num_experts] (nullptr without top-k). Outputs: send_list [num_ranks, num_tokens] (tokens
// sent to each rank, in order), the handle tensors, num_recv_tokens_per_expert [local experts]
// and `counts` [3 * num_ranks + 1] = rows sent to each rank, rows received from each rank,
// first row of each source, total rows received. When num_recv_host (mapped host memory) is
// not null, the per-expert counts go to num_recv_host[1..] and then the total to
// num_recv_host[0]: the host reads both without a copy once the total is set.
struct DispatchLayoutArgs {
  const bool* is_token_in_rank;
  const int* num_tokens_per_rank;
  const int* num_tokens_per_expert;
  int num_tokens;
  int num_experts;
  int num_channels;
  int expert_alignment;
  int64_t num_worst_tokens;  // 0: data-dependent mode
  int* send_list;
  int* send_head;
  int* channel_prefix_matrix;
  int* rank_prefix_matrix;
  int* recv_channel_prefix_matrix;
  int* num_recv_tokens_per_expert;
  int* counts;
  int* num_recv_host;
};
cudaError_t launch_dispatch_notify(const Intranode& nvl, const DispatchLayoutArgs& args,
                                   cudaStream_t stream);

// Cached dispatch and combine: send_list and counts (as above) from a dispatch handle.
cudaError_t launch_handle_counts(const Intranode& nvl, const int* rank_prefix_matrix,
                                 const int* send_head, int num_tokens, int* send_list,
                                 int* counts, cudaStream_t stream);

// Dispatch, step 3: rows of x (and their scales, top-k and source index) to every rank that
// receives them, through the peers' staging; received rows land in source-rank-major order.
struct DispatchDataArgs {
  // sent
  const uint8_t* x;            // [num_tokens, row_bytes]
  int64_t row_bytes;
  const uint32_t* x_scales;    // 4-byte scales, element (t, g) at t * stride_token + g * stride_group
  int64_t scale_stride_token;
  int64_t scale_stride_group;
  int num_scales;
  const int64_t* topk_idx;     // [num_tokens, num_topk] global experts (null when empty)
  bool has_topk_idx;           // rows carry top-k indices (recv_topk_idx is written)
  const uint8_t* topk_weights;  // [num_tokens, num_topk] of weight_bytes, or nullptr
  int num_topk;
  int weight_bytes;
  int num_local_experts;       // with topk_idx: experts become local indices (-1 elsewhere)
  int num_tokens;
  const int* send_list;
  const int* counts;
  // received
  uint8_t* recv_x;
  uint32_t* recv_x_scales;
  int64_t* recv_topk_idx;
  uint8_t* recv_topk_weights;
  int* recv_src_idx;           // or nullptr
  int64_t num_recv_rows;       // rows allocated
  bool fill_tail;              // capacity mode: clear the rows past the received count
  int vector_bytes;            // widest access that divides row_bytes and both x pointers
};
cudaError_t launch_dispatch_data(const Intranode& nvl, const DispatchDataArgs& args,
                                 int num_blocks, cudaStream_t stream);
// Staging slot of one dispatched row; rows a block moves per round (0: the buffer is too small).
int64_t dispatch_slot_bytes(const DispatchDataArgs& args);
int intranode_rows_per_block(const Intranode& nvl, int64_t slot_bytes, int num_blocks);
// Blocks of the data kernels (dispatch, combine) resident per SM at once (the least of them).
// A channel's sender and receiver blocks wait for each other through the peers, so a launch's
// blocks must all be resident: the bindings refuse a config.num_sms above this times the SMs
// the process has.
int intranode_resident_blocks_per_sm();

// Combine: combined_x[t] = sum over ranks r holding token t (ascending r) of x_r[row], in
// float (double for double x), plus bias_0 and bias_1 (already in the accumulation type), one
// rounding; combined_topk_weights likewise summed in their own type.
enum ScalarKind : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };
struct CombineArgs {
  const uint8_t* x;            // [num_rows, hidden] of `kind`
  int hidden;
  int kind;
  int64_t num_rows;
  const uint8_t* topk_weights;  // [num_rows, num_topk] of weight_bytes, or nullptr
  int num_topk;
  int weight_bytes;
  const void* bias_0;          // [num_tokens, hidden] float (double for double x), or nullptr
  const void* bias_1;
  const int* rank_prefix_matrix;
  const int* recv_src_idx;
  const int* send_head;        // [num_tokens, num_ranks]
  int num_tokens;
  uint8_t* combined_x;         // [num_tokens, hidden] of `kind`
  uint8_t* combined_topk_weights;
};
int64_t combine_slot_bytes(const CombineArgs& args);
cudaError_t launch_combine(const Intranode& nvl, const CombineArgs& args, int num_blocks,
                           cudaStream_t stream);

}  // namespace deep_ep_ops
