// Torch-free entry points of the low-latency (decode) kernels over NVSHMEM: raw pointers and a
// cudaStream_t. csrc/nvshmem/ops.cpp checks arguments, allocates outputs and calls these.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "generated/op_table.h"  // written by setup.py from the op table

namespace deep_ep_ops {

constexpr int kLowLatencyMaxTopk = 16;      // top-k entries a message carries
constexpr int kLowLatencyMaxTokens = 1024;  // tokens per rank (num_max_dispatch_tokens_per_rank)
constexpr int kLowLatencyMaxRanks = 64;
constexpr int kLowLatencyMaxMembers = 8192;  // num_ranks * num_max_dispatch_tokens_per_rank

// Op ids (kOpLowLatencyDispatch, ...): generated/op_table.h.

// Byte offsets of the kernels' regions inside one rank's symmetric allocation (the same on
// every rank). The regions sit at the end of the allocation, after the zero-copy combine area
// that Buffer.get_next_low_latency_combine_buffer hands out. "[2]" is the parity of the call's
// sequence number: two calls in a row never write the same half.
//
// dispatch: a message per (source rank, token) = 64 bytes of top-k (int32, -1 padded) and the
//   payload (BF16 row, or FP8 row then float32 scales); a flag per message; a count word per
//   source ((seq << 32) | (num_topk << 16) | num_tokens); an ack per receiver (the last call
//   it finished reading from me).
// combine: a route per (source rank, token) = top-k (int32) and weights (float32), 16 each, with
//   flags and count words as above, sent by sources to every rank; partial rows (BF16) per
//   (owner rank, token) with flags, sent by owners to sources; route acks (owners that finished
//   reading my routes) and row acks (sources that finished reading my partial rows).
// staging: what a rank sends through NVSHMEM puts to peers without a peer-to-peer mapping.
// counters: this rank's sequence numbers, the blocks-done tickets and the work queues of its
//   kernels.
struct LowLatencyLayout {
  int64_t message_bytes;
  int64_t dispatch_messages, dispatch_flags, dispatch_counts, dispatch_acks;
  int64_t combine_routes, combine_route_flags, combine_counts, combine_rows, combine_row_flags;
  int64_t combine_route_acks, combine_row_acks;
  int64_t staging_messages, staging_routes, staging_rows;
  int64_t counters;
  int64_t bytes;  // the whole kernel region
};
LowLatencyLayout low_latency_layout(int num_ranks, int num_max_tokens, int hidden);

// The counters region (local to each rank, never written by peers).
struct LowLatencyCounters {
  uint64_t dispatch_sent, dispatch_received, combine_sent, combine_received;
  unsigned tickets[4];  // blocks done of the running send/recv kernel of each direction
  int aborted;          // a wait timed out: every later kernel returns at once
  // Work queues of the running send halves (next unit to claim): dispatch tokens, combine
  // routes, combine partial rows. Zero between launches (the last block resets them).
  unsigned claims[3];
};

// One rank's view of a low-latency buffer, passed by value to the kernels.
struct LowLatency {
  uint8_t* base;          // this rank's kernel region (a symmetric address)
  int64_t region;         // its offset in the symmetric allocation
  uint8_t* const* peers;  // device array [num_ranks]: the peers' allocations mapped here, or
                          // nullptr where NVSHMEM offers no load/store access (puts are used)
  bool all_peers_mapped;  // no puts needed
  int rank;
  int num_ranks;
  int num_max_tokens;
  int hidden;
  LowLatencyLayout layout;
  uint64_t timeout_ns;
  int* error;             // the device error word (kErrorWordInts ints, mapped host memory)
  int op;                 // OpId of the call, for error reports
  int num_sms;            // blocks of a launch at most
};

struct LowLatencyDispatchSend {
  const uint16_t* x;          // [num_tokens, hidden] bfloat16, contiguous
  const int64_t* topk_idx;    // [num_tokens, num_topk] global experts, -1 = none
  int num_tokens;
  int num_topk;
  int num_experts;
  bool use_fp8;
  bool round_scale;
};
cudaError_t launch_low_latency_dispatch_send(const LowLatency& ll, const LowLatencyDispatchSend& a,
                                             cudaStream_t stream);

struct LowLatencyDispatchRecv {
  uint8_t* recv_x;            // [L, R*M, hidden] of float8_e4m3fn or bfloat16
  void* recv_x_scales;        // [L, R*M, S] float32 (S = hidden/128) or int32 UE8M0 (S = hidden/512),
                              // last two dims column-major; nullptr for BF16
  int* recv_count;            // [L]
  int* src_info;              // [L, R*M]
  int64_t* layout_range;      // [L, R]
  int* cumulative_stats;      // [L] or nullptr
  int num_local_experts;
  bool use_fp8;
  bool use_ue8m0;
};
cudaError_t launch_low_latency_dispatch_recv(const LowLatency& ll, const LowLatencyDispatchRecv& a,
                                             cudaStream_t stream);
// Both halves in one kernel.
cudaError_t launch_low_latency_dispatch(const LowLatency& ll, const LowLatencyDispatchSend& send,
                                        const LowLatencyDispatchRecv& recv, cudaStream_t stream);

struct LowLatencyCombineSend {
  const uint16_t* x;           // [L, R*M, hidden] bfloat16, contiguous
  const int* src_info;         // [L, R*M]
  const int64_t* layout_range;  // [L, R]
  const int64_t* topk_idx;     // [num_tokens, num_topk]
  const float* topk_weights;   // [num_tokens, num_topk]
  int num_tokens;
  int num_topk;
  int num_local_experts;
};
cudaError_t launch_low_latency_combine_send(const LowLatency& ll, const LowLatencyCombineSend& a,
                                            cudaStream_t stream);

struct LowLatencyCombineRecv {
  uint16_t* combined_x;       // [num_tokens, hidden] bfloat16
  const int64_t* topk_idx;    // [num_tokens, num_topk]
  int num_tokens;
  int num_topk;
  int num_local_experts;
};
cudaError_t launch_low_latency_combine_recv(const LowLatency& ll, const LowLatencyCombineRecv& a,
                                            cudaStream_t stream);
// Both halves in one kernel.
cudaError_t launch_low_latency_combine(const LowLatency& ll, const LowLatencyCombineSend& send,
                                       const LowLatencyCombineRecv& recv, cudaStream_t stream);

}  // namespace deep_ep_ops
