// Torch-free entry points of the internode (several nodes) normal-mode kernels over NVSHMEM:
// raw pointers and a cudaStream_t. docs/DESIGN.md section 5 ("Internode") has the design; this
// is its first stage, the forward: every rank (node n, local index l) puts each of its tokens
// once into each destination node m's forwarder (m, l), into that forwarder's receive region for
// source node n, at the token's index in the stream from (n, l) to node m.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace deep_ep_ops {

constexpr int kInternodeMaxNodes = 16;
constexpr int kInternodeMaxRanks = 64;  // every destination bit of a token fits a uint64 mask

// What a region slot carries beside the row ("meta", one record per token, 16-byte aligned):
// the scales (num_scales 4-byte words), the top-k (num_topk int64 global experts), the weights
// (num_topk 4-byte words), the token's destination mask over all ranks (bit r: rank r holds
// one of its experts), its index at the source rank and the source's token count (which fixes
// the token's channel for the handle's channel matrices; tests/staged_internode.py).
struct InternodeMeta {
  int num_scales;
  int num_topk;
  int64_t scales, topk, weights, mask, src, src_tokens, bytes;  // offsets in the record; its size
};
InternodeMeta internode_meta(int num_scales, int num_topk);

// Byte offsets inside one rank's RDMA (symmetric) allocation, the same on every rank. After the
// fixed part (counters, arrival and ready words, region headers), the rest is cut into S + 1
// equal shares whatever the call's shape: the staging share (this rank's outgoing records, which
// puts read) and S receive regions (one per source node). A share holds `slots` tokens: rows
// (row_stride bytes each), then metas. The regions sit at fixed addresses (a CUDA graph can hold
// views of them); a source writes one only after its forwarder said it is free for that call
// (the ready words), so each is written once per call and read in between.
struct InternodeLayout {
  int num_nodes;
  int64_t row_bytes;   // a row's bytes
  int64_t row_stride;  // its slot: row_bytes rounded up to 16
  InternodeMeta meta;
  int64_t counters;  // InternodeCounters (local)
  int64_t arrivals;  // [S] uint64: blocks of source node n that finished sending here (peers add)
  int64_t readys;    // [S] uint64: calls for which forwarder (m, my local index) freed its region
                     // of my node (peers add)
  int64_t headers;   // [S] records of header_stride bytes: uint64 (call << 32) | rows of
                     // region n, then the source's num_tokens_per_expert for my node's
                     // experts (experts_per_node int32), put by the source
  int64_t out_headers;  // [S] the same records, staged here for the puts
  int64_t header_stride;
  int experts_per_node;
  int64_t shares;    // the first share (staging); share i at shares + i * share_bytes
  int64_t share_bytes;
  int64_t slots;     // tokens per share
  int64_t bytes;     // all of it (<= the allocation)
};
// `bytes`: the allocation's size. slots < 1 when even one token does not fit.
InternodeLayout internode_layout(int64_t bytes, int num_nodes, int64_t row_bytes,
                                 const InternodeMeta& meta, int experts_per_node);

// The combine's way back: forwarder (m, l) puts its partials of region n (the rows of source
// (n, l)'s stream to node m, in stream order) to source (n, l), into its receive share for node
// m. Same fixed part as the forward's; then 2S shares of `slots` rows: S staging shares (region
// n's partials, which the puts read) and S receive shares (from node m). A share: rows
// (row_stride bytes each), then the weights (weight_bytes each).
struct InternodeReturnLayout {
  int num_nodes;
  int64_t row_bytes, row_stride, weight_bytes;
  int64_t counters;  // InternodeCounters of the way back (local)
  int64_t arrivals;  // [S] uint64: blocks of node m's forwarder that finished sending here
  int64_t readys;    // [S] uint64: calls for which source (n, my local index) freed its share
  int64_t shares, share_bytes, slots, weights;  // weights: their offset in a share
  int64_t bytes;
};
InternodeReturnLayout internode_return_layout(int64_t bytes, int num_nodes, int64_t row_bytes,
                                              int64_t weight_bytes);
__host__ __device__ inline int64_t internode_return_staging(const InternodeReturnLayout& l,
                                                            int node) {
  return l.shares + static_cast<int64_t>(node) * l.share_bytes;
}
__host__ __device__ inline int64_t internode_return_receive(const InternodeReturnLayout& l,
                                                            int node) {
  return l.shares + (static_cast<int64_t>(l.num_nodes) + node) * l.share_bytes;
}

struct InternodeReturnArgs {
  const int* region_prefix;  // [S] inclusive prefix of my regions' lengths (the handle's
                             // recv_rdma_rank_prefix_sum)
};

// Local to each rank (never written by peers).
struct InternodeCounters {
  uint64_t seq;       // forward calls finished here
  uint64_t expected;  // arrivals each source node has made here after the last finished call
  unsigned ticket;    // blocks done of the running forward
  int aborted;        // a wait timed out: later kernels return at once
};

// One rank's view of an internode buffer's RDMA memory, passed by value to the kernels.
struct InternodeRdma {
  uint8_t* base;       // this rank's symmetric allocation
  int64_t bytes;
  int rank;            // = NVSHMEM PE
  int num_ranks;
  int ranks_per_node;  // L; node of rank r = r / L, its local index r % L
  uint64_t timeout_ns;
  int* error;          // the device error word (kErrorWordInts ints, mapped host memory)
  int op;              // OpId of the call, for error reports
};

struct InternodeForwardArgs {
  const uint8_t* x;             // [num_tokens, layout.row_bytes], contiguous
  const uint32_t* x_scales;     // element (t, g) at t * scale_stride_token + g * scale_stride_group
  int64_t scale_stride_token;
  int64_t scale_stride_group;
  const int64_t* topk_idx;      // [num_tokens, num_topk] or nullptr (then -1 is carried)
  const uint32_t* topk_weights;  // [num_tokens, num_topk] 4-byte weights, or nullptr (0);
                                 // num_topk: their width (0 without either)
  const bool* is_token_in_rank;  // [num_tokens, num_ranks]
  int num_tokens;
  const int* num_tokens_per_expert;  // [S * layout.experts_per_node], or nullptr
  int* send_rdma_head;          // [num_tokens, S]: the token's index in the stream to node m, or -1
  int* num_tokens_per_node;     // [S]: tokens sent to each node (its stream's length), or nullptr
};

// The forward stage: frees this rank's regions for the call (ready words to their sources),
// waits until its forwarders freed theirs, puts (and, for this rank's own node, copies) every
// token into them, then waits, bounded, until every source node's blocks have arrived here (the
// error names the rank of that node with this local index). After it, region n here holds the
// stream from (n, my local index) to my node in source token order: rows at
// internode_region(n), metas at internode_region_metas(n), the length in the header.
// `num_blocks` must be the same on every rank (the arrival count is num_blocks per source).
cudaError_t launch_internode_forward(const InternodeRdma& rdma, const InternodeLayout& layout,
                                     const InternodeForwardArgs& args, int num_blocks,
                                     cudaStream_t stream);

// Puts region n's staged partials to source (n, my local index) for every n, after it freed its
// receive share, then waits, bounded, until my forwarders' partials have all arrived here.
cudaError_t launch_internode_return(const InternodeRdma& rdma, const InternodeReturnLayout& layout,
                                    const InternodeReturnArgs& args, int num_blocks,
                                    cudaStream_t stream);

// Where region n starts (rows; the metas follow its slots of rows).
__host__ __device__ inline int64_t internode_region(const InternodeLayout& l, int node) {
  return l.shares + (1 + static_cast<int64_t>(node)) * l.share_bytes;
}
__host__ __device__ inline int64_t internode_region_metas(const InternodeLayout& l, int node) {
  return internode_region(l, node) + l.slots * l.row_stride;
}

}  // namespace deep_ep_ops
