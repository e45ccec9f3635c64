// The forward stage of internode normal-mode dispatch (docs/DESIGN.md section 5, "Internode"):
// rank (n, l) sends each token once to every node m that holds one of its destination ranks,
// into the region for source node n at the forwarder (m, l), at the token's index in the stream
// from (n, l) to m. Other nodes are reached with NVSHMEM puts only (between emulated nodes of
// one host too), from this rank's staging share of the symmetric buffer; the own node's region
// (the forwarder is this rank) with local copies.
//
// First, block 0 tells the sources of this rank's regions that they may write them for this
// call (a ready word at each, monotonic), and every block waits until the forwarders it writes
// to said so for theirs: they finished using the previous call's (stream order), so regions are
// single-buffered at fixed addresses. Each block takes a contiguous range of tokens. It counts,
// per node, the tokens before its range that go there (a scan of is_token_in_rank that every
// block makes itself), stages each token of its range once (row, then the meta record: scales,
// top-k, weights, destination mask, source index, the source's token count), then, node by
// node, gives the tokens going there their stream index (a block prefix) and writes them out.
// After its puts complete (nvshmem_quiet) the block adds one to its arrival word at every
// destination node's forwarder; the last block by index first puts each region's header (call
// number and length). Block 0 then waits, bounded, until every source node's blocks have
// arrived here: the regions of this call are complete when the kernel ends. The words only
// grow; the counts expected grow per call (InternodeCounters), so eager calls and graph replays
// interleave.

#include <nvshmem.h>
#include <nvshmemx.h>

#include "kernels/api.h"
#include "kernels/device_utils.cuh"
#include "nvshmem/internode.h"

namespace deep_ep_ops {

InternodeMeta internode_meta(int num_scales, int num_topk) {
  InternodeMeta m{};
  m.num_scales = num_scales;
  m.num_topk = num_topk;
  int64_t at = 0;
  m.scales = at;
  at += 4LL * num_scales;
  at = (at + 7) / 8 * 8;
  m.topk = at;
  at += 8LL * num_topk;
  m.weights = at;
  at += 4LL * num_topk;
  at = (at + 7) / 8 * 8;
  m.mask = at;
  at += 8;
  m.src = at;
  at += 4;
  m.src_tokens = at;
  at += 4;
  m.bytes = (at + 15) / 16 * 16;
  return m;
}

namespace {
int64_t align128(int64_t n) { return (n + 127) / 128 * 128; }
// The forward's counters, arrival and ready words come first; these of the way back next.
int64_t forward_words(int num_nodes) {
  return align128(sizeof(InternodeCounters)) + 2 * align128(8LL * num_nodes);
}
int64_t internode_return_words(int num_nodes) {
  return align128(sizeof(InternodeCounters)) + 2 * align128(8LL * num_nodes);
}
}  // namespace

InternodeReturnLayout internode_return_layout(int64_t bytes, int num_nodes, int64_t row_bytes,
                                              int64_t weight_bytes) {
  InternodeReturnLayout l{};
  l.num_nodes = num_nodes;
  l.row_bytes = row_bytes;
  l.row_stride = (row_bytes + 15) / 16 * 16;
  l.weight_bytes = weight_bytes;
  int64_t at = forward_words(num_nodes);
  l.counters = at;
  at += align128(sizeof(InternodeCounters));
  l.arrivals = at;
  at += align128(8LL * num_nodes);
  l.readys = at;
  at += align128(8LL * num_nodes);
  l.shares = at;
  const int64_t shares = 2LL * num_nodes;
  l.share_bytes = bytes > at ? (bytes - at) / shares / 128 * 128 : 0;
  const int64_t slot = l.row_stride + (weight_bytes + 15) / 16 * 16;
  l.slots = l.share_bytes / slot;
  l.weights = l.slots * l.row_stride;
  l.bytes = l.shares + shares * l.share_bytes;
  return l;
}

InternodeLayout internode_layout(int64_t bytes, int num_nodes, int64_t row_bytes,
                                 const InternodeMeta& meta, int experts_per_node) {
  auto align = [](int64_t n) { return (n + 127) / 128 * 128; };
  InternodeLayout l{};
  l.num_nodes = num_nodes;
  l.row_bytes = row_bytes;
  l.meta = meta;
  int64_t at = 0;
  l.counters = at;
  at += align(sizeof(InternodeCounters));
  l.arrivals = at;
  at += align(8LL * num_nodes);
  l.readys = at;
  at += align(8LL * num_nodes);
  at += internode_return_words(num_nodes);  // the way back's counters and words
  l.experts_per_node = experts_per_node;
  l.header_stride = (8 + 4LL * experts_per_node + 7) / 8 * 8;
  l.headers = at;
  at += align(l.header_stride * num_nodes);
  l.out_headers = at;
  at += align(l.header_stride * num_nodes);
  l.shares = at;
  const int64_t shares = num_nodes + 1LL;
  l.share_bytes = bytes > at ? (bytes - at) / shares / 128 * 128 : 0;
  const int64_t slot_bytes = (row_bytes + 15) / 16 * 16 + meta.bytes;
  l.slots = l.share_bytes / slot_bytes;
  l.row_stride = (row_bytes + 15) / 16 * 16;  // rows first, then the metas after `slots` rows
  l.bytes = l.shares + shares * l.share_bytes;
  return l;
}

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ InternodeCounters* counters(const InternodeRdma& r,
                                                      const InternodeLayout& l) {
  return reinterpret_cast<InternodeCounters*>(r.base + l.counters);
}

__device__ __forceinline__ uint64_t* arrival(const InternodeRdma& r, const InternodeLayout& l,
                                             int node) {
  return reinterpret_cast<uint64_t*>(r.base + l.arrivals) + node;
}

__device__ __forceinline__ uint64_t* header(const InternodeRdma& r, const InternodeLayout& l,
                                            int node) {
  return reinterpret_cast<uint64_t*>(r.base + l.headers + node * l.header_stride);
}

__device__ __forceinline__ uint64_t* ready(const InternodeRdma& r, const InternodeLayout& l,
                                           int node) {
  return reinterpret_cast<uint64_t*>(r.base + l.readys) + node;
}

// Adds one to word `offset` of rank `pe` (this rank: a local atomic after a system fence).
__device__ __forceinline__ void add_one(const InternodeRdma& r, uint64_t* word, int pe) {
  if (pe == r.rank) {
    __threadfence_system();
    atomicAdd(reinterpret_cast<unsigned long long*>(word), 1ull);
  } else {
    nvshmemx_signal_op(word, 1, NVSHMEM_SIGNAL_ADD, pe);
  }
}

// One thread spins until *word >= target. False when rank `peer` did not arrive in time (the
// error is recorded, the buffer marked aborted) or another wait timed out.
__device__ bool wait_for(const InternodeRdma& r, InternodeCounters* c, const uint64_t* word,
                         uint64_t target, int peer) {
  uint64_t start = 0;
  while (load_acquire(word) < target) {
    if (*reinterpret_cast<volatile int*>(&c->aborted) != 0) return false;
    const uint64_t now = now_ns();
    if (start == 0) {
      start = now;
    } else if (now - start > r.timeout_ns) {
      if (atomicExch(&c->aborted, 1) == 0)
        report_error(r.error, r.op, kErrorTimeout, peer,
                     static_cast<int>(r.timeout_ns / 1000000000ull));
      return false;
    }
  }
  return true;
}

// The last block of a launch to get here moves the call's sequence number and the arrivals
// expected on (the blocks read both at their start).
__device__ void finish_call(InternodeCounters* c, uint64_t seq, uint64_t expected) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&c->ticket, 1u) == gridDim.x - 1) {
      atomicExch(&c->ticket, 0u);
      c->expected = expected + gridDim.x;
      c->seq = seq + 1;
      __threadfence();
    }
  }
}

// A warp copies `bytes` with the widest word that divides the size and both addresses.
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes,
                                          int lane) {
  const uint64_t both = reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src) |
                        static_cast<uint64_t>(bytes);
  if (both % 16 == 0) warp_copy_words<16>(dst, src, bytes, lane);
  else if (both % 8 == 0) warp_copy_words<8>(dst, src, bytes, lane);
  else if (both % 4 == 0) warp_copy_words<4>(dst, src, bytes, lane);
  else warp_copy_words<1>(dst, src, bytes, lane);
}

// The nodes token t goes to (bit m: one of node m's ranks holds one of its experts).
__device__ __forceinline__ uint32_t node_mask(const bool* in_rank, int num_ranks, int L, int t) {
  const bool* row = in_rank + static_cast<int64_t>(t) * num_ranks;
  uint32_t mask = 0;
  for (int r = 0; r < num_ranks; ++r)
    if (row[r]) mask |= 1u << (r / L);
  return mask;
}

// The meta record of token t (scales, top-k, weights, destination mask, source index, the
// source's token count), by the lanes of one warp.
__device__ void write_meta(uint8_t* meta, const InternodeMeta& m, const InternodeForwardArgs& a,
                           int num_ranks, int t, int lane) {
  auto* scales = reinterpret_cast<uint32_t*>(meta + m.scales);
  for (int g = lane; g < m.num_scales; g += 32)
    scales[g] = a.x_scales[t * a.scale_stride_token + g * a.scale_stride_group];
  auto* topk = reinterpret_cast<int64_t*>(meta + m.topk);
  auto* weights = reinterpret_cast<uint32_t*>(meta + m.weights);
  for (int k = lane; k < m.num_topk; k += 32) {
    topk[k] = a.topk_idx ? a.topk_idx[static_cast<int64_t>(t) * m.num_topk + k] : -1;
    weights[k] = a.topk_weights ? a.topk_weights[static_cast<int64_t>(t) * m.num_topk + k] : 0u;
  }
  const bool* row = a.is_token_in_rank + static_cast<int64_t>(t) * num_ranks;
  uint64_t mask = 0;
  for (int r = lane; r < num_ranks; r += 32)
    if (row[r]) mask |= 1ull << r;
  for (int offset = 16; offset > 0; offset /= 2) mask |= __shfl_xor_sync(0xffffffffu, mask, offset);
  if (lane == 0) {
    *reinterpret_cast<uint64_t*>(meta + m.mask) = mask;
    *reinterpret_cast<int*>(meta + m.src) = t;
    *reinterpret_cast<int*>(meta + m.src_tokens) = a.num_tokens;
  }
}

}  // namespace

// External linkage in a named namespace, so that a profile shows the name (with -rdc an
// internal-linkage kernel gets a __nv_static_<hash> prefix): deep_ep_ops::internode::dispatch_forward.
namespace internode {

__global__ void __launch_bounds__(kThreads, 1)
    dispatch_forward(const InternodeRdma r, const InternodeLayout l,
                     const InternodeForwardArgs a) {
  __shared__ int before[kInternodeMaxNodes];  // per node: this block's tokens so far in its stream
  __shared__ int slot_of[kThreads];           // this chunk's stream index for the current node
  __shared__ uint32_t mask_of[kThreads];
  __shared__ int warp_counts[kWarps];
  __shared__ uint64_t seq, expected;
  __shared__ bool aborted;
  const int S = l.num_nodes, L = r.ranks_per_node, R = r.num_ranks;
  const int my_node = r.rank / L, my_local = r.rank % L;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  InternodeCounters* c = counters(r, l);
  if (threadIdx.x == 0) {
    seq = *reinterpret_cast<volatile uint64_t*>(&c->seq);
    expected = *reinterpret_cast<volatile uint64_t*>(&c->expected);
    aborted = *reinterpret_cast<volatile int*>(&c->aborted) != 0;
  }
  if (threadIdx.x < kInternodeMaxNodes) before[threadIdx.x] = 0;
  __syncthreads();
  if (aborted) return;  // the whole block (one read)
  // My regions are free for this call: tell their sources, (n, my local index) for every n.
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < S)
    add_one(r, ready(r, l, my_node), static_cast<int>(threadIdx.x) * L + my_local);
  // And wait until my forwarders freed theirs (thread m: forwarder (m, my local index)).
  __shared__ bool ready_failed;
  if (threadIdx.x == 0) ready_failed = false;
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < S) {
    const int m = threadIdx.x;
    if (!wait_for(r, c, ready(r, l, m), seq + 1, m * L + my_local)) ready_failed = true;
  }
  __syncthreads();
  if (ready_failed) return;
  const int per_block = (a.num_tokens + gridDim.x - 1) / gridDim.x;
  const int begin = min(a.num_tokens, static_cast<int>(blockIdx.x) * per_block);
  const int end = min(a.num_tokens, begin + per_block);

  // The tokens before this block's range, per node.
  for (int t = threadIdx.x; t < begin; t += blockDim.x) {
    const uint32_t mask = node_mask(a.is_token_in_rank, R, L, t);
    for (int m = 0; m < S; ++m)
      if (mask >> m & 1u) atomicAdd(&before[m], 1);
  }
  __syncthreads();

  uint8_t* staging_rows = r.base + l.shares;
  uint8_t* staging_metas = staging_rows + l.slots * l.row_stride;
  const int64_t row_bytes = l.row_bytes, stride = l.row_stride;
  for (int chunk = begin; chunk < end; chunk += kThreads) {
    const int count = min(kThreads, end - chunk);
    const int t_mine = chunk + static_cast<int>(threadIdx.x);
    mask_of[threadIdx.x] =
        threadIdx.x < count ? node_mask(a.is_token_in_rank, R, L, t_mine) : 0u;
    // Stage the chunk: each token once, whatever the number of nodes it goes to.
    for (int i = warp; i < count; i += kWarps) {
      const int t = chunk + i;
      warp_copy(staging_rows + t * stride, a.x + t * row_bytes, row_bytes, lane);
      write_meta(staging_metas + t * l.meta.bytes, l.meta, a, R, t, lane);
    }
    __syncthreads();
    for (int m = 0; m < S; ++m) {
      const bool goes = (mask_of[threadIdx.x] >> m & 1u) != 0;
      int total = 0;
      const int index = block_prefix<kWarps>(goes, warp_counts, total);
      const int slot = goes ? before[m] + index : -1;
      slot_of[threadIdx.x] = slot;
      if (threadIdx.x < count) a.send_rdma_head[static_cast<int64_t>(t_mine) * S + m] = slot;
      __syncthreads();
      const int forwarder = m * L + my_local;
      uint8_t* region_rows = r.base + internode_region(l, my_node);
      uint8_t* region_metas = r.base + internode_region_metas(l, my_node);
      for (int i = warp; i < count; i += kWarps) {
        const int at = slot_of[i], t = chunk + i;
        if (at < 0) continue;
        uint8_t* row_dst = region_rows + at * stride;
        uint8_t* meta_dst = region_metas + at * l.meta.bytes;
        const uint8_t* row_src = staging_rows + t * stride;
        const uint8_t* meta_src = staging_metas + t * l.meta.bytes;
        if (m == my_node) {  // the forwarder is this rank
          warp_copy(row_dst, row_src, row_bytes, lane);
          warp_copy(meta_dst, meta_src, l.meta.bytes, lane);
        } else {
          nvshmemx_putmem_nbi_warp(row_dst, row_src, row_bytes, forwarder);
          nvshmemx_putmem_nbi_warp(meta_dst, meta_src, l.meta.bytes, forwarder);
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) before[m] += total;
      __syncthreads();
    }
  }

  // The puts of this block are complete, its local copies visible, before it says so.
  nvshmem_quiet();
  __threadfence_system();
  __syncthreads();
  if (blockIdx.x == gridDim.x - 1 && static_cast<int>(threadIdx.x) < S) {
    // before[] now holds the streams' lengths (this block's range ends the tokens). The
    // record for node m: the length, then my per-expert counts for its experts.
    const int m = threadIdx.x, E = l.experts_per_node;
    if (a.num_tokens_per_node != nullptr) a.num_tokens_per_node[m] = before[m];
    uint8_t* record = r.base + l.out_headers + m * l.header_stride;
    *reinterpret_cast<uint64_t*>(record) = ((seq + 1) << 32) | static_cast<uint32_t>(before[m]);
    for (int e = 0; e < E; ++e)
      reinterpret_cast<int*>(record + 8)[e] =
          a.num_tokens_per_expert != nullptr ? a.num_tokens_per_expert[m * E + e] : 0;
    uint8_t* dst = reinterpret_cast<uint8_t*>(header(r, l, my_node));
    if (m == my_node) {
      for (int64_t b = 0; b < l.header_stride; b += 8)
        *reinterpret_cast<volatile uint64_t*>(dst + b) = *reinterpret_cast<uint64_t*>(record + b);
    } else {
      nvshmem_putmem(dst, record, l.header_stride, m * L + my_local);
    }
    nvshmem_quiet();
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int m = 0; m < S; ++m) add_one(r, arrival(r, l, my_node), m * L + my_local);

  // Block 0: every source node's blocks arrived here (the regions of this call are complete).
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < S) {
    const int n = threadIdx.x;
    wait_for(r, c, arrival(r, l, n), expected + gridDim.x, n * L + my_local);
  }

  finish_call(c, seq, expected);
}

// The combine's way back (InternodeReturnLayout): every block takes its share of the rows of
// every region and puts it in one piece (rows, then weights) to the region's source.
__global__ void __launch_bounds__(kThreads, 1)
    combine_return(const InternodeRdma r, const InternodeReturnLayout l,
                   const InternodeReturnArgs a) {
  __shared__ uint64_t seq, expected;
  __shared__ bool aborted, failed;
  const int S = l.num_nodes, L = r.ranks_per_node;
  const int my_node = r.rank / L, my_local = r.rank % L;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto* c = reinterpret_cast<InternodeCounters*>(r.base + l.counters);
  auto* arrivals = reinterpret_cast<uint64_t*>(r.base + l.arrivals);
  auto* readys = reinterpret_cast<uint64_t*>(r.base + l.readys);
  if (threadIdx.x == 0) {
    seq = *reinterpret_cast<volatile uint64_t*>(&c->seq);
    expected = *reinterpret_cast<volatile uint64_t*>(&c->expected);
    aborted = *reinterpret_cast<volatile int*>(&c->aborted) != 0;
    failed = false;
  }
  __syncthreads();
  if (aborted) return;
  // My receive shares are free: tell my forwarders (m, my local index); wait for my sources.
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < S)
    add_one(r, readys + my_node, static_cast<int>(threadIdx.x) * L + my_local);
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < S) {
    const int n = threadIdx.x;
    if (!wait_for(r, c, readys + n, seq + 1, n * L + my_local)) failed = true;
  }
  __syncthreads();
  if (failed) return;
  for (int n = warp; n < S; n += kWarps) {  // a warp per region: its block's slice of rows
    const int first = n == 0 ? 0 : a.region_prefix[n - 1], rows = a.region_prefix[n] - first;
    const int per_block = (rows + gridDim.x - 1) / gridDim.x;
    const int i0 = min(rows, static_cast<int>(blockIdx.x) * per_block);
    const int i1 = min(rows, i0 + per_block);
    if (i1 <= i0) continue;
    const int source = n * L + my_local;
    const uint8_t* src = r.base + internode_return_staging(l, n);
    uint8_t* dst = r.base + internode_return_receive(l, my_node);
    const int64_t wstride = (l.weight_bytes + 15) / 16 * 16;
    if (source == r.rank) {
      warp_copy(dst + i0 * l.row_stride, src + i0 * l.row_stride, (i1 - i0) * l.row_stride, lane);
      if (l.weight_bytes)
        warp_copy(dst + l.weights + i0 * wstride, src + l.weights + i0 * wstride,
                  (i1 - i0) * wstride, lane);
    } else {
      nvshmemx_putmem_nbi_warp(dst + i0 * l.row_stride, src + i0 * l.row_stride,
                               (i1 - i0) * l.row_stride, source);
      if (l.weight_bytes)
        nvshmemx_putmem_nbi_warp(dst + l.weights + i0 * wstride, src + l.weights + i0 * wstride,
                                 (i1 - i0) * wstride, source);
    }
  }
  nvshmem_quiet();
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int n = 0; n < S; ++n) add_one(r, arrivals + my_node, n * L + my_local);
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < S) {
    const int m = threadIdx.x;
    wait_for(r, c, arrivals + m, expected + gridDim.x, m * L + my_local);
  }
  finish_call(c, seq, expected);
}

}  // namespace internode

cudaError_t launch_internode_return(const InternodeRdma& rdma, const InternodeReturnLayout& layout,
                                    const InternodeReturnArgs& args, int num_blocks,
                                    cudaStream_t stream) {
  if (num_blocks < 1 || layout.num_nodes < 1 || layout.num_nodes > kInternodeMaxNodes ||
      layout.slots < 1 || layout.bytes > rdma.bytes)
    return cudaErrorInvalidValue;
  internode::combine_return<<<num_blocks, kThreads, 0, stream>>>(rdma, layout, args);
  return cudaGetLastError();
}

cudaError_t launch_internode_forward(const InternodeRdma& rdma, const InternodeLayout& layout,
                                     const InternodeForwardArgs& args, int num_blocks,
                                     cudaStream_t stream) {
  if (num_blocks < 1 || layout.num_nodes < 1 || layout.num_nodes > kInternodeMaxNodes ||
      rdma.num_ranks > kInternodeMaxRanks || layout.slots < args.num_tokens ||
      layout.bytes > rdma.bytes)
    return cudaErrorInvalidValue;
  internode::dispatch_forward<<<num_blocks, kThreads, 0, stream>>>(rdma, layout, args);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
