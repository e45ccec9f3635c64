// Low-latency (decode) dispatch and combine over NVSHMEM. Torch-free: raw pointers and a stream;
// csrc/nvshmem/ops.cpp checks arguments and allocates.
//
// Dispatch sends each token once per destination rank (not once per expert): the sender casts
// the token to FP8 once and writes the message (its top-k row and the payload) into the slot
// [half][sender][token] of every rank that owns one of its experts; every other rank gets the
// top-k row only. The receiver expands: the blocks of a local expert scan every (source rank,
// token) slot in ascending order, a block prefix sum gives each member its row, and they copy
// the members' rows out of the symmetric buffer into the outputs, so rows come out exactly in
// the reference backend's order (source rank major, ascending source token).
//
// Combine runs the other way and also sends once per (token, rank): each source first sends
// every rank its top-k row and weights (the "route"); each owner reduces, for every source
// token with experts here, w_k * x[e_k][row] over its experts in top-k order in fp32 and sends
// the partial row, rounded to BF16, back to the source; the source adds the partials in fp32 in
// ascending owner order and rounds once. (That is within BF16 rounding of the reference, not bit
// identical: the partial sums are rounded once more.)
//
// The fused ops run both halves in one kernel (blocks do their send work, then their receive
// work); the split ops launch the same kernel with one half each (a runtime argument: one
// kernel name per direction in a profile, whichever form runs).
//
// Graph safety: every call reads its sequence number from this rank's counters on the device
// (one counter per direction and half of the op), so a captured call and an eager call
// interleave freely and an odd number of calls may sit in a graph. Flags hold the sequence
// number of the call that wrote them; a call writes the half `seq & 1` of a peer only after
// that peer acknowledged reading the same half two calls earlier (acks, also sequence numbers).
//
// Peers with a load/store mapping (NVLink peer to peer, nvshmem_ptr) are written with plain
// 16-byte stores and a release store of the flag; others through a local staging copy and
// nvshmemx_putmem_signal_nbi_warp (the network transports, or DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT).
//
// Waits read %globaltimer and give up after the timeout: the kernel records the op and the peer
// in the error word, marks the buffer aborted (later kernels return at once) and exits.

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "kernels/api.h"
#include "kernels/device_utils.cuh"
#include "nvshmem/api.h"

namespace deep_ep_ops {

LowLatencyLayout low_latency_layout(int num_ranks, int num_max_tokens, int hidden) {
  // Mirrored by deep_ep_ops.config._low_latency_kernel_bytes: keep the two in step.
  LowLatencyLayout l{};
  auto align = [](int64_t n) { return (n + 127) / 128 * 128; };
  const int64_t slots = 2LL * num_ranks * num_max_tokens, row = 2LL * hidden;
  l.message_bytes = 4 * kLowLatencyMaxTopk + row;
  int64_t offset = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = offset;
    offset += align(bytes);
    return at;
  };
  l.dispatch_messages = take(slots * l.message_bytes);
  l.combine_rows = take(slots * row);
  l.combine_routes = take(slots * 8 * kLowLatencyMaxTopk);
  l.dispatch_flags = take(slots * 8);
  l.combine_route_flags = take(slots * 8);
  l.combine_row_flags = take(slots * 8);
  l.dispatch_counts = take(2LL * num_ranks * 8);
  l.combine_counts = take(2LL * num_ranks * 8);
  l.dispatch_acks = take(num_ranks * 8LL);
  l.combine_route_acks = take(num_ranks * 8LL);
  l.combine_row_acks = take(num_ranks * 8LL);
  l.staging_messages = take(num_max_tokens * l.message_bytes);
  l.staging_routes = take(num_max_tokens * 8LL * kLowLatencyMaxTopk);
  l.staging_rows = take(static_cast<int64_t>(num_ranks) * num_max_tokens * row);
  l.counters = take(64);
  l.bytes = offset;
  return l;
}

namespace {

static_assert(sizeof(LowLatencyCounters) <= 64, "counters outgrew their region");

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRouteBytes = 8 * kLowLatencyMaxTopk;  // int32 top-k, then float32 weights
constexpr int kFp8Group = 128;

__device__ __forceinline__ LowLatencyCounters* counters(const LowLatency& ll) {
  return reinterpret_cast<LowLatencyCounters*>(ll.base + ll.layout.counters);
}

__device__ __forceinline__ bool is_aborted(const LowLatency& ll) {
  return *reinterpret_cast<volatile int*>(&counters(ll)->aborted) != 0;
}

__device__ __forceinline__ uint64_t* local_word(const LowLatency& ll, int64_t offset) {
  return reinterpret_cast<uint64_t*>(ll.base + offset);
}

// Where `offset` of rank `pe`'s region is mapped here, or nullptr (reach it with puts).
__device__ __forceinline__ uint8_t* mapped(const LowLatency& ll, int pe, int64_t offset) {
  uint8_t* peer = ll.peers[pe];
  return peer == nullptr ? nullptr : peer + ll.region + offset;
}

// Set a 64-bit flag of rank `pe`, after every write this block made before (the caller
// synchronised the block; a system-scope release is cumulative over what the barrier ordered).
__device__ __forceinline__ void signal(const LowLatency& ll, int pe, int64_t offset,
                                       uint64_t value) {
  if (uint8_t* p = mapped(ll, pe, offset)) {
    store_release(reinterpret_cast<uint64_t*>(p), value);
  } else {
    nvshmem_fence();
    nvshmemx_signal_op(local_word(ll, offset), value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// One thread spins until (*flag >> shift) >= target. False when `peer` did not arrive in time
// (the error is recorded, the buffer marked aborted) or another wait timed out.
__device__ bool wait_at_least(const LowLatency& ll, int64_t offset, uint64_t target, int peer,
                              int shift = 0) {
  const uint64_t* flag = local_word(ll, offset);
  uint64_t start = 0;
  while ((load_acquire(flag) >> shift) < target) {
    if (is_aborted(ll)) return false;
    const uint64_t t = now_ns();
    if (start == 0) {
      start = t;
    } else if (t - start > ll.timeout_ns) {
      if (atomicExch(&counters(ll)->aborted, 1) == 0)
        report_error(ll.error, ll.op, kErrorTimeout, peer,
                     static_cast<int>(ll.timeout_ns / 1000000000ull));
      return false;
    }
  }
  return true;
}

// True in every thread of the block that finishes last (the others are done with their work).
__device__ bool last_block(unsigned* ticket) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    if (last) atomicExch(ticket, 0u);
  }
  __syncthreads();
  return last;
}

// The next unit of a launch's work queue, for the whole block. The send halves take their
// units this way rather than by block index, so that the blocks that run do all the send work
// before any of them starts waiting: no kernel needs all its blocks resident at once (a grid
// larger than the SMs the process has under MPS, a compute kernel holding SMs on another
// stream, two buffers in flight). A block moves on to the next phase only when a queue is
// empty, so every wait is for work some running block (here or on a peer) has claimed.
__device__ int claim(unsigned* queue) {
  __shared__ int unit;
  __syncthreads();  // the previous unit's shared values are read
  if (threadIdx.x == 0) unit = static_cast<int>(atomicAdd(queue, 1u));
  __syncthreads();
  return unit;
}

// A top-k entry, or -1 (with an error report) when it is outside [-1, num_experts).
__device__ int checked_expert(const LowLatency& ll, int64_t e, int num_experts) {
  if (e >= -1 && e < num_experts) return static_cast<int>(e);
  report_error(ll.error, ll.op, kErrorExpertOutOfRange, ll.rank, static_cast<int>(e));
  return -1;
}

// The distinct owner ranks of a top-k row, ascending; returns how many.
__device__ int owners_of(const int* topk, int num_topk, int num_local, int* owners) {
  int n = 0;
  for (int k = 0; k < num_topk; ++k) {
    if (topk[k] < 0) continue;
    const int owner = topk[k] / num_local;
    int at = n;
    while (at > 0 && owners[at - 1] > owner) --at;
    if (at > 0 && owners[at - 1] == owner) continue;
    for (int i = n; i > at; --i) owners[i] = owners[i - 1];
    owners[at] = owner;
    ++n;
  }
  return n;
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

__device__ __forceinline__ void unpack_bf16x8(const int4& w, float* v) {
  const uint32_t words[4] = {static_cast<uint32_t>(w.x), static_cast<uint32_t>(w.y),
                             static_cast<uint32_t>(w.z), static_cast<uint32_t>(w.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = bf16_bits_to_float(words[i] & 0xffffu);
    v[2 * i + 1] = bf16_bits_to_float(words[i] >> 16);
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float* v) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    words[i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  return make_int4(words[0], words[1], words[2], words[3]);
}

// The FP8 cast of docs/DESIGN.md §5, bit for bit: per 128 channels amax = max(1e-4, max|x|),
// scale = 448 / amax (or a power of two with round_scale), values clamped to ±448.
struct Fp8Scale {
  float scale, scale_inv;
};

__device__ __forceinline__ Fp8Scale fp8_scale(float amax, bool round_scale) {
  amax = fmaxf(amax, 1e-4f);
  const float inv = __fmul_rn(amax, 1.0f / 448.0f);
  if (!round_scale) return {__fdiv_rn(448.0f, amax), inv};
  const uint32_t bits = __float_as_uint(inv);
  const uint32_t exponent = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0 ? 1u : 0u);
  return {__uint_as_float((254u - exponent) << 23), __uint_as_float(exponent << 23)};
}

__device__ __forceinline__ uint32_t fp8x4(const float* v, float scale) {
  uint32_t out = 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float a = fminf(fmaxf(__fmul_rn(v[2 * i], scale), -448.0f), 448.0f);
    const float b = fminf(fmaxf(__fmul_rn(v[2 * i + 1], scale), -448.0f), 448.0f);
    const __nv_fp8x2_storage_t pair =
        __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    out |= static_cast<uint32_t>(pair) << (16 * i);
  }
  return out;
}

// The start of a send half: every rank must have acknowledged reading my call seq - 2 (acks:
// their words in my region), then the block that claimed the first unit (`publish`) publishes
// this call's count word to every rank ((seq << 32) | (flags << 24) | (num_topk << 16) |
// num_tokens in `counts` [half][me]; `flags`: the per-call arguments every rank must pass
// alike, which the receivers compare with theirs). False after a timeout.
__device__ bool open_send(const LowLatency& ll, int64_t acks, int64_t counts, uint64_t seq,
                          int num_topk, int num_tokens, bool publish, unsigned flags = 0) {
  __shared__ int ok;
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();
  if (seq > 2)
    for (int d = threadIdx.x; d < ll.num_ranks; d += blockDim.x)
      if (!wait_at_least(ll, acks + 8LL * d, seq - 2, d)) ok = 0;
  __syncthreads();
  if (!ok) return false;
  const int64_t mine = counts + 8LL * ((seq & 1) * ll.num_ranks + ll.rank);
  if (publish)
    for (int d = threadIdx.x; d < ll.num_ranks; d += blockDim.x)
      signal(ll, d, mine, (seq << 32) | (static_cast<uint64_t>(flags & 0xffu) << 24) |
                              (static_cast<uint64_t>(num_topk) << 16) |
                              static_cast<uint64_t>(num_tokens));
  return true;
}

// --- dispatch ---------------------------------------------------------------------------------

struct __align__(16) TokenRoute {
  int topk[kLowLatencyMaxTopk];
  int owners[kLowLatencyMaxTopk];
  int num_owners;
};

// Returns the call's sequence number (0 after a timeout). With `finish` the last block records
// it; otherwise the receive half of the same kernel does.
__device__ uint64_t dispatch_send(const LowLatency& ll, const LowLatencyDispatchSend& a,
                                  bool finish) {
  LowLatencyCounters* ctr = counters(ll);
  const uint64_t seq = ctr->dispatch_sent + 1;  // loaded alongside the abort flag
  if (is_aborted(ll)) return 0;
  const int half = static_cast<int>(seq & 1), me = ll.rank, num_ranks = ll.num_ranks;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int hidden = ll.hidden, num_local = a.num_experts / num_ranks;
  const int64_t message = ll.layout.message_bytes;
  const bool staged = !ll.all_peers_mapped;
  __shared__ TokenRoute route;

  const int first = claim(&ctr->claims[0]);
  if (!open_send(ll, ll.layout.dispatch_acks, ll.layout.dispatch_counts, seq, a.num_topk,
                 a.num_tokens, first == 0, a.use_fp8 ? 1u : 0u))
    return 0;

  for (int t = first; t < a.num_tokens; t = claim(&ctr->claims[0])) {
    const int64_t slot = (static_cast<int64_t>(half) * num_ranks + me) * ll.num_max_tokens + t;
    const int64_t at = ll.layout.dispatch_messages + slot * message;
    uint8_t* staging = ll.base + ll.layout.staging_messages + t * message;
    if (tid < kLowLatencyMaxTopk)
      route.topk[tid] = tid < a.num_topk
                            ? checked_expert(ll, a.topk_idx[int64_t(t) * a.num_topk + tid],
                                             a.num_experts)
                            : -1;
    __syncthreads();
    if (tid == 0) route.num_owners = owners_of(route.topk, a.num_topk, num_local, route.owners);
    // Every rank gets the top-k row: receivers decide membership from it.
    for (int i = tid; i < num_ranks * 4; i += kThreads)
      if (uint8_t* p = mapped(ll, i / 4, at))
        reinterpret_cast<int4*>(p)[i % 4] = reinterpret_cast<const int4*>(route.topk)[i % 4];
    if (staged && tid < kLowLatencyMaxTopk) reinterpret_cast<int*>(staging)[tid] = route.topk[tid];
    __syncthreads();
    const int num_owners = route.num_owners;
    const uint16_t* x = a.x + static_cast<int64_t>(t) * hidden;
    const int64_t payload = at + 4 * kLowLatencyMaxTopk;
    if (a.use_fp8) {
      // 8 lanes per 128-channel group, 16 channels each: 4 groups per warp and step.
      const int num_groups = hidden / kFp8Group, sub = lane % 8;
      for (int step = warp; step * 4 < num_groups; step += kWarps) {
        const int g = step * 4 + lane / 8;
        const bool valid = g < num_groups;
        float v[16];
        float amax = 0.0f;
        if (valid) {
          const int4* src = reinterpret_cast<const int4*>(x + g * kFp8Group + sub * 16);
          unpack_bf16x8(src[0], v);
          unpack_bf16x8(src[1], v + 8);
#pragma unroll
          for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
        }
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
        if (!valid) continue;
        const Fp8Scale s = fp8_scale(amax, a.round_scale);
        const int4 bytes = make_int4(fp8x4(v, s.scale), fp8x4(v + 4, s.scale),
                                     fp8x4(v + 8, s.scale), fp8x4(v + 12, s.scale));
        const int64_t value_at = g * kFp8Group + sub * 16, scale_at = hidden + 4LL * g;
        for (int o = 0; o < num_owners; ++o) {
          if (uint8_t* p = mapped(ll, route.owners[o], payload)) {
            *reinterpret_cast<int4*>(p + value_at) = bytes;
            if (sub == 0) *reinterpret_cast<float*>(p + scale_at) = s.scale_inv;
          }
        }
        if (staged) {
          uint8_t* p = staging + 4 * kLowLatencyMaxTopk;
          *reinterpret_cast<int4*>(p + value_at) = bytes;
          if (sub == 0) *reinterpret_cast<float*>(p + scale_at) = s.scale_inv;
        }
      }
    } else {
      for (int i = tid; i < hidden / 8; i += kThreads) {
        const int4 v = reinterpret_cast<const int4*>(x)[i];
        for (int o = 0; o < num_owners; ++o)
          if (uint8_t* p = mapped(ll, route.owners[o], payload))
            reinterpret_cast<int4*>(p)[i] = v;
        if (staged) reinterpret_cast<int4*>(staging + 4 * kLowLatencyMaxTopk)[i] = v;
      }
    }
    __syncthreads();
    const int64_t flag = ll.layout.dispatch_flags + 8 * slot;
    for (int d = tid; d < num_ranks; d += kThreads)
      if (ll.peers[d] != nullptr) signal(ll, d, flag, seq);
    if (staged) {
      for (int d = warp; d < num_ranks; d += kWarps) {
        if (ll.peers[d] != nullptr) continue;
        bool owner = false;
        for (int o = 0; o < num_owners; ++o) owner |= route.owners[o] == d;
        nvshmemx_putmem_signal_nbi_warp(ll.base + at, staging, owner ? message : 4 * kLowLatencyMaxTopk,
                                        local_word(ll, flag), seq, NVSHMEM_SIGNAL_SET, d);
      }
    }
    __syncthreads();
  }
  if (staged) nvshmem_quiet();  // the staging copies are read before the next call rewrites them
  if (finish && last_block(&ctr->tickets[0]) && tid == 0) {
    ctr->dispatch_sent = seq;
    ctr->claims[0] = 0;
  }
  return seq;
}

// One block per (local expert, part): every part scans all (source rank, token) pairs, so all
// know each member's row (its index in source-major, token order); part p copies rows p, p +
// parts, ... (in warp units).
// `sent`: the sequence number of a send half of the same kernel still to be recorded, or 0.
__device__ void dispatch_recv(const LowLatency& ll, const LowLatencyDispatchRecv& a, int parts,
                              uint64_t sent) {
  LowLatencyCounters* ctr = counters(ll);
  const uint64_t seq = ctr->dispatch_received + 1;
  if (is_aborted(ll)) return;
  const int half = static_cast<int>(seq & 1), me = ll.rank, num_ranks = ll.num_ranks;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int hidden = ll.hidden, num_max = ll.num_max_tokens;
  const int64_t rows = static_cast<int64_t>(num_ranks) * num_max;
  const int64_t message = ll.layout.message_bytes;
  const int num_groups = hidden / kFp8Group;
  const int64_t row_bytes = a.use_fp8 ? hidden : 2LL * hidden;
  __shared__ int members[kLowLatencyMaxMembers];  // (source << 16) | token, in row order
  __shared__ int warp_counts[kWarps];
  __shared__ int first_pair[kLowLatencyMaxRanks + 1];
  __shared__ int per_source[kLowLatencyMaxRanks];
  __shared__ int ok;

  for (int unit = blockIdx.x; unit < a.num_local_experts * parts; unit += gridDim.x) {
    const int e = unit / parts, part = unit % parts, expert = me * a.num_local_experts + e;
    if (tid == 0) ok = 1;
    __syncthreads();
    for (int r = tid; r < num_ranks; r += kThreads) {
      const int64_t count = ll.layout.dispatch_counts + 8 * (int64_t(half) * num_ranks + r);
      const bool arrived = wait_at_least(ll, count, seq, r, 32);
      if (!arrived) ok = 0;
      const uint64_t word = load_acquire(local_word(ll, count));
      first_pair[r + 1] = static_cast<int>(word & 0xffffu);
      per_source[r] = 0;
      // A sender that called with another use_fp8 (its messages are laid out for that): the
      // outputs of this call are invalid; the next call raises. The protocol still completes.
      const int sender_fp8 = static_cast<int>((word >> 24) & 1u);
      if (arrived && sender_fp8 != (a.use_fp8 ? 1 : 0))
        report_error(ll.error, ll.op, kErrorDisagree, r, (me << 8) | sender_fp8);
    }
    __syncthreads();
    if (!ok) return;
    if (tid == 0) {
      first_pair[0] = 0;
      for (int r = 0; r < num_ranks; ++r) first_pair[r + 1] += first_pair[r];
    }
    __syncthreads();
    const int pairs = first_pair[num_ranks];
    int taken = 0;
    for (int begin = 0; begin < pairs; begin += kThreads) {
      const int p = begin + tid;
      bool member = false;
      int r = 0, t = 0;
      if (p < pairs) {
        while (first_pair[r + 1] <= p) ++r;
        t = p - first_pair[r];
        const int64_t slot = (static_cast<int64_t>(half) * num_ranks + r) * num_max + t;
        if (wait_at_least(ll, ll.layout.dispatch_flags + 8 * slot, seq, r)) {
          // The 64-byte top-k row in four loads at once (-1 past num_topk).
          const int4* row =
              reinterpret_cast<const int4*>(ll.base + ll.layout.dispatch_messages + slot * message);
          int4 words[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) words[q] = __ldcg(row + q);
#pragma unroll
          for (int q = 0; q < 4; ++q)
            member |= words[q].x == expert || words[q].y == expert || words[q].z == expert ||
                      words[q].w == expert;
        } else {
          ok = 0;
        }
      }
      int total;
      const int position = block_prefix<kWarps>(member, warp_counts, total);
      if (member) {
        members[taken + position] = (r << 16) | t;
        atomicAdd(&per_source[r], 1);
      }
      taken += total;
    }
    __syncthreads();
    if (!ok) return;
    if (part == 0 && tid == 0) {
      int64_t first_row = 0;
      for (int r = 0; r < num_ranks; ++r) {
        a.layout_range[static_cast<int64_t>(e) * num_ranks + r] = (first_row << 32) | per_source[r];
        first_row += per_source[r];
      }
      a.recv_count[e] = taken;
      if (a.cumulative_stats != nullptr) a.cumulative_stats[e] += taken;
    }
    for (int i = part * kWarps + warp; i < taken; i += parts * kWarps) {
      const int r = members[i] >> 16, t = members[i] & 0xffff;
      const int64_t row = e * rows + i;
      const uint8_t* payload =
          ll.base + ll.layout.dispatch_messages +
          ((static_cast<int64_t>(half) * num_ranks + r) * num_max + t) * message +
          4 * kLowLatencyMaxTopk;
      warp_copy_words<16>(a.recv_x + row * row_bytes, payload, row_bytes, lane);
      if (lane == 0) a.src_info[row] = t;
      if (!a.use_fp8) continue;
      const float* scales = reinterpret_cast<const float*>(payload + hidden);
      if (!a.use_ue8m0) {
        float* out = static_cast<float*>(a.recv_x_scales);
        for (int g = lane; g < num_groups; g += 32)
          out[(static_cast<int64_t>(e) * num_groups + g) * rows + i] = __ldcg(scales + g);
      } else {
        int* out = static_cast<int*>(a.recv_x_scales);
        const int packs = num_groups / 4;
        for (int j = lane; j < packs; j += 32) {
          uint32_t word = 0;
          for (int b = 0; b < 4; ++b)
            word |= ((__float_as_uint(__ldcg(scales + 4 * j + b)) >> 23) & 0xffu) << (8 * b);
          out[(static_cast<int64_t>(e) * packs + j) * rows + i] = static_cast<int>(word);
        }
      }
    }
    __syncthreads();
  }
  if (last_block(&ctr->tickets[1])) {
    if (tid == 0) ctr->dispatch_received = seq;
    if (tid == 0 && sent != 0) {  // the fused launch's send half: its queue is done too
      ctr->dispatch_sent = sent;
      ctr->claims[0] = 0;
    }
    for (int d = tid; d < num_ranks; d += kThreads)
      signal(ll, d, ll.layout.dispatch_acks + 8LL * me, seq);
  }
}

// --- combine ----------------------------------------------------------------------------------

// Row of (local expert, source rank, source token) in the dispatch layout given by the handle,
// or -1. Rows of one source are ascending in token order when they come from our dispatch;
// other orders are found by a linear scan.
__device__ int64_t find_row(const LowLatencyCombineSend& a, int num_ranks, int64_t rows, int local,
                            int source, int token) {
  const int64_t range = a.layout_range[static_cast<int64_t>(local) * num_ranks + source];
  const int64_t begin = range >> 32, count = range & 0xffffffffLL;
  const int* info = a.src_info + local * rows;
  if (begin < 0 || count < 0 || begin + count > rows) return -1;
  int64_t lo = begin, hi = begin + count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (info[mid] < token) lo = mid + 1; else hi = mid;
  }
  if (lo < begin + count && info[lo] == token) return lo;
  for (int64_t j = begin; j < begin + count; ++j)
    if (info[j] == token) return j;
  return -1;
}

// acc[h] += (weights[j] *) rows[j][chunk h] over up to 16 rows of 8 BF16 channels, in row order,
// for two chunks at once (the second may be absent: -1), with four rows' loads ahead of the
// adds. Unweighted rows (weights == nullptr) are partial rows peers wrote here: read past L1.
__device__ __forceinline__ void add_rows(float (&acc)[2][8], const int4* const* rows,
                                         const float* weights, int num_rows, int64_t chunk0,
                                         int64_t chunk1) {
  for (int j = 0; j < num_rows; j += 4) {
    int4 w[4][2];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (j + u >= num_rows) continue;
      const int4* row = rows[j + u];
      w[u][0] = weights == nullptr ? __ldcg(row + chunk0) : row[chunk0];
      if (chunk1 >= 0) w[u][1] = weights == nullptr ? __ldcg(row + chunk1) : row[chunk1];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (j + u >= num_rows) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && chunk1 < 0) continue;
        float v[8];
        unpack_bf16x8(w[u][h], v);
#pragma unroll
        for (int c = 0; c < 8; ++c)
          acc[h][c] = __fadd_rn(acc[h][c],
                                weights == nullptr ? v[c] : __fmul_rn(weights[j + u], v[c]));
      }
    }
  }
}

// out[chunk] = bf16(sum of add_rows) for every chunk of a row, two per thread and step.
__device__ __forceinline__ void reduce_rows(int4* out, const int4* const* rows, const float* weights,
                                            int num_rows, int num_chunks, int threads) {
  for (int i = threadIdx.x; i < num_chunks; i += 2 * threads) {
    const int64_t second = i + threads < num_chunks ? i + threads : -1;
    float acc[2][8] = {};
    add_rows(acc, rows, weights, num_rows, i, second);
    out[i] = pack_bf16x8(acc[0]);
    if (second >= 0) out[second] = pack_bf16x8(acc[1]);
  }
}

constexpr int kCombineThreads = 256;  // small blocks: every (source, token) unit at once

// The end of a combine send (every block done): record the call, tell every rank its routes of
// this call are read.
__device__ void finish_combine_send(const LowLatency& ll, uint64_t seq) {
  if (threadIdx.x == 0) {
    counters(ll)->combine_sent = seq;
    counters(ll)->claims[1] = counters(ll)->claims[2] = 0;
  }
  for (int d = threadIdx.x; d < ll.num_ranks; d += kCombineThreads)
    signal(ll, d, ll.layout.combine_route_acks + 8LL * ll.rank, seq);
}

// Returns the call's sequence number (0 after a timeout). With `finish` the last block records it
// and acknowledges the routes; otherwise the receive half of the same kernel does.
__device__ uint64_t combine_send(const LowLatency& ll, const LowLatencyCombineSend& a,
                                 bool finish) {
  LowLatencyCounters* ctr = counters(ll);
  const uint64_t seq = ctr->combine_sent + 1;
  if (is_aborted(ll)) return 0;
  const int half = static_cast<int>(seq & 1), me = ll.rank, num_ranks = ll.num_ranks;
  const int tid = threadIdx.x, warp = tid / 32;
  constexpr int kBlockWarps = kCombineThreads / 32;
  const int hidden = ll.hidden, num_max = ll.num_max_tokens, num_local = a.num_local_experts;
  const int64_t rows = static_cast<int64_t>(num_ranks) * num_max, row_bytes = 2LL * hidden;
  const bool staged = !ll.all_peers_mapped;
  __shared__ int ok, skip, source_topk, num_rows;
  __shared__ __align__(16) int route[2 * kLowLatencyMaxTopk];
  __shared__ const int4* row_of[kLowLatencyMaxTopk];
  __shared__ float weight_of[kLowLatencyMaxTopk];

  // Routes: every rank must have finished reading my routes of call seq - 2.
  const int first = claim(&ctr->claims[1]);
  if (!open_send(ll, ll.layout.combine_route_acks, ll.layout.combine_counts, seq, a.num_topk,
                 a.num_tokens, first == 0))
    return 0;
  for (int t = first; t < a.num_tokens; t = claim(&ctr->claims[1])) {
    const int64_t slot = (static_cast<int64_t>(half) * num_ranks + me) * num_max + t;
    const int64_t at = ll.layout.combine_routes + slot * kRouteBytes;
    uint8_t* staging = ll.base + ll.layout.staging_routes + static_cast<int64_t>(t) * kRouteBytes;
    // The route: 16 top-k entries (-1 padded), then 16 weights.
    if (tid < 2 * kLowLatencyMaxTopk) {
      const int k = tid % kLowLatencyMaxTopk;
      int value = tid < kLowLatencyMaxTopk ? -1 : 0;
      if (k < a.num_topk) {
        const int64_t at_k = int64_t(t) * a.num_topk + k;
        value = tid < kLowLatencyMaxTopk
                    ? checked_expert(ll, a.topk_idx[at_k], num_ranks * num_local)
                    : __float_as_int(a.topk_weights[at_k]);
      }
      route[tid] = value;
    }
    __syncthreads();
    for (int i = tid; i < num_ranks * 8; i += kCombineThreads)
      if (uint8_t* p = mapped(ll, i / 8, at))
        reinterpret_cast<int4*>(p)[i % 8] = reinterpret_cast<const int4*>(route)[i % 8];
    if (staged && tid < 8)
      reinterpret_cast<int4*>(staging)[tid] = reinterpret_cast<const int4*>(route)[tid];
    __syncthreads();
    const int64_t flag = ll.layout.combine_route_flags + 8 * slot;
    for (int d = tid; d < num_ranks; d += kCombineThreads)
      if (ll.peers[d] != nullptr) signal(ll, d, flag, seq);
    if (staged)
      for (int d = warp; d < num_ranks; d += kBlockWarps)
        if (ll.peers[d] == nullptr)
          nvshmemx_putmem_signal_nbi_warp(ll.base + at, staging, kRouteBytes, local_word(ll, flag),
                                          seq, NVSHMEM_SIGNAL_SET, d);
    __syncthreads();
  }

  // Partial rows: unit u is token u / R of source u % R.
  for (int u = claim(&ctr->claims[2]); u < num_ranks * num_max; u = claim(&ctr->claims[2])) {
    const int source = u % num_ranks, t = u / num_ranks;
    const int64_t from = static_cast<int64_t>(half) * num_ranks + source;
    __syncthreads();  // the shared words of the previous unit are read
    if (tid == 0) {
      const int64_t count = ll.layout.combine_counts + 8 * from;
      ok = wait_at_least(ll, count, seq, source, 32);
      const uint64_t word = load_acquire(local_word(ll, count));
      source_topk = static_cast<int>((word >> 16) & 0xffu);
      skip = t >= static_cast<int>(word & 0xffffu);
      if (ok && !skip)
        ok = wait_at_least(ll, ll.layout.combine_route_flags + 8 * (from * num_max + t), seq, source);
      num_rows = 0;
    }
    __syncthreads();
    if (!ok) return 0;
    if (skip) continue;
    const int* route = reinterpret_cast<const int*>(ll.base + ll.layout.combine_routes +
                                                    (from * num_max + t) * kRouteBytes);
    // The token's experts here, in top-k order (a warp: lanes are k).
    if (warp == 0) {
      const int k = tid;
      const int e = k < source_topk && k < kLowLatencyMaxTopk ? __ldcg(route + k) : -1;
      int64_t row = -1;
      if (e >= 0 && e / num_local == me) {
        row = find_row(a, num_ranks, rows, e % num_local, source, t);
        if (row < 0) report_error(ll.error, ll.op, kErrorBadHandle, source, t);
      }
      const unsigned local = __ballot_sync(0xffffffffu, row >= 0);
      if (row >= 0) {
        const int at = __popc(local & ((1u << k) - 1u));
        row_of[at] = reinterpret_cast<const int4*>(
            a.x + (static_cast<int64_t>(e % num_local) * rows + row) * hidden);
        weight_of[at] = __int_as_float(__ldcg(route + kLowLatencyMaxTopk + k));
      }
      if (k == 0) num_rows = __popc(local);
    }
    __syncthreads();
    if (num_rows == 0) continue;  // nothing of this token here: the source does not wait for me
    if (tid == 0)
      ok = seq <= 2 || wait_at_least(ll, ll.layout.combine_row_acks + 8LL * source, seq - 2, source);
    __syncthreads();
    if (!ok) return 0;
    const int64_t slot = (static_cast<int64_t>(half) * num_ranks + me) * num_max + t;
    uint8_t* peer_row = mapped(ll, source, ll.layout.combine_rows + slot * row_bytes);
    uint8_t* out = peer_row != nullptr ? peer_row
                                       : ll.base + ll.layout.staging_rows +
                                             (static_cast<int64_t>(source) * num_max + t) * row_bytes;
    reduce_rows(reinterpret_cast<int4*>(out), row_of, weight_of, num_rows, hidden / 8,
                kCombineThreads);
    __syncthreads();
    const int64_t flag = ll.layout.combine_row_flags + 8 * slot;
    if (peer_row != nullptr) {
      if (tid == 0) signal(ll, source, flag, seq);
    } else if (warp == 0) {
      nvshmemx_putmem_signal_nbi_warp(ll.base + ll.layout.combine_rows + slot * row_bytes, out,
                                      row_bytes, local_word(ll, flag), seq, NVSHMEM_SIGNAL_SET,
                                      source);
    }
  }
  if (staged) nvshmem_quiet();
  if (finish && last_block(&ctr->tickets[2])) finish_combine_send(ll, seq);
  return seq;
}

// `sent`: the sequence number of a send half of the same kernel still to be finished, or 0.
__device__ void combine_recv(const LowLatency& ll, const LowLatencyCombineRecv& a, uint64_t sent) {
  LowLatencyCounters* ctr = counters(ll);
  const uint64_t seq = ctr->combine_received + 1;
  if (is_aborted(ll)) return;
  const int half = static_cast<int>(seq & 1), num_ranks = ll.num_ranks, tid = threadIdx.x;
  const int hidden = ll.hidden, num_max = ll.num_max_tokens;
  const int64_t row_bytes = 2LL * hidden;
  __shared__ TokenRoute route;
  __shared__ int ok;

  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    if (tid < kLowLatencyMaxTopk) {
      const int64_t e = tid < a.num_topk ? a.topk_idx[int64_t(t) * a.num_topk + tid] : -1;
      route.topk[tid] = e >= 0 && e < int64_t(num_ranks) * a.num_local_experts ? int(e) : -1;
    }
    if (tid == 0) ok = 1;
    __syncthreads();
    if (tid == 0) route.num_owners = owners_of(route.topk, a.num_topk, a.num_local_experts, route.owners);
    __syncthreads();
    const int num_owners = route.num_owners;
    if (tid < num_owners) {
      const int owner = route.owners[tid];
      const int64_t slot = (static_cast<int64_t>(half) * num_ranks + owner) * num_max + t;
      if (!wait_at_least(ll, ll.layout.combine_row_flags + 8 * slot, seq, owner)) ok = 0;
    }
    __syncthreads();
    if (!ok) return;
    __shared__ const int4* owner_rows[kLowLatencyMaxTopk];
    if (tid < num_owners)
      owner_rows[tid] = reinterpret_cast<const int4*>(
          ll.base + ll.layout.combine_rows +
          ((static_cast<int64_t>(half) * num_ranks + route.owners[tid]) * num_max + t) * row_bytes);
    __syncthreads();
    reduce_rows(reinterpret_cast<int4*>(a.combined_x + static_cast<int64_t>(t) * hidden),
                owner_rows, nullptr, num_owners, hidden / 8, kCombineThreads);
    __syncthreads();
  }
  if (last_block(&ctr->tickets[3])) {
    if (sent != 0) finish_combine_send(ll, sent);
    if (tid == 0) ctr->combine_received = seq;
    for (int d = tid; d < num_ranks; d += kCombineThreads)
      signal(ll, d, ll.layout.combine_row_acks + 8LL * ll.rank, seq);
  }
}

// Halves a launch runs (the kernels' `phases`): a runtime mask rather than template
// parameters, so that the fused launch and both split launches are one kernel, one name in a
// CUDA profile (DeepEP's bench_kineto finds the kernels by name and splits the split form's
// launches by period).
constexpr int kSendPhase = 1, kRecvPhase = 2, kBothPhases = kSendPhase | kRecvPhase;

}  // namespace

// The kernels have external linkage in a named namespace: with -rdc, internal-linkage kernels
// get a __nv_static_<hash> prefix that hides their names in a profile.
namespace low_latency {

// A send and a receive half in one kernel: the send units are claimed from a queue (`claim`),
// so the receive waits only for send work that running blocks have claimed.
__global__ void __launch_bounds__(kThreads)
    dispatch(LowLatency ll, LowLatencyDispatchSend send, LowLatencyDispatchRecv recv, int parts,
             int phases) {
  const bool recv_too = (phases & kRecvPhase) != 0;
  const uint64_t sent = phases & kSendPhase ? dispatch_send(ll, send, !recv_too) : 0;
  if (recv_too) dispatch_recv(ll, recv, parts, sent);
}

__global__ void __launch_bounds__(kCombineThreads, 2)
    combine(LowLatency ll, LowLatencyCombineSend send, LowLatencyCombineRecv recv, int phases) {
  const bool recv_too = (phases & kRecvPhase) != 0;
  const uint64_t sent = phases & kSendPhase ? combine_send(ll, send, !recv_too) : 0;
  if (recv_too) combine_recv(ll, recv, sent);
}

}  // namespace low_latency

namespace {

// Blocks for `work` units of `kKernel`: at most `work`, and all resident at once (the number
// resident per SM is queried once per kernel; the halves and the fused form share it, as they
// share the kernel's registers and shared memory).
template <auto kKernel>
int blocks_for(int threads, const LowLatency& ll, int64_t work, cudaError_t* status) {
  static int per_sm = 0;
  if (per_sm == 0) {
    *status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, threads, 0);
    per_sm = std::max(1, per_sm);
  }
  const int64_t resident = static_cast<int64_t>(per_sm) * ll.num_sms;
  return static_cast<int>(std::max<int64_t>(1, std::min(work, resident)));
}

// Parts per expert in the dispatch receive: enough blocks to cover the SMs.
int recv_parts(const LowLatency& ll, int num_local_experts) {
  return std::max(1, std::min(8, ll.num_sms / std::max(1, num_local_experts)));
}

cudaError_t launch_dispatch(const LowLatency& ll, const LowLatencyDispatchSend& send,
                            const LowLatencyDispatchRecv& recv, int phases, cudaStream_t stream) {
  const int parts = recv_parts(ll, recv.num_local_experts);
  const int64_t work =
      std::max<int64_t>(phases & kSendPhase ? send.num_tokens : 0,
                        phases & kRecvPhase ? int64_t(recv.num_local_experts) * parts : 0);
  cudaError_t status = cudaSuccess;
  const int blocks = blocks_for<low_latency::dispatch>(kThreads, ll, work, &status);
  if (status != cudaSuccess) return status;
  low_latency::dispatch<<<blocks, kThreads, 0, stream>>>(ll, send, recv, parts, phases);
  return cudaGetLastError();
}

cudaError_t launch_combine(const LowLatency& ll, const LowLatencyCombineSend& send,
                           const LowLatencyCombineRecv& recv, int phases, cudaStream_t stream) {
  const int64_t work =
      std::max<int64_t>(phases & kSendPhase ? int64_t(ll.num_ranks) * ll.num_max_tokens : 0,
                        phases & kRecvPhase ? recv.num_tokens : 0);
  cudaError_t status = cudaSuccess;
  const int blocks = blocks_for<low_latency::combine>(kCombineThreads, ll, work, &status);
  if (status != cudaSuccess) return status;
  low_latency::combine<<<blocks, kCombineThreads, 0, stream>>>(ll, send, recv, phases);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_low_latency_dispatch_send(const LowLatency& ll, const LowLatencyDispatchSend& a,
                                             cudaStream_t stream) {
  return launch_dispatch(ll, a, LowLatencyDispatchRecv{}, kSendPhase, stream);
}

cudaError_t launch_low_latency_dispatch_recv(const LowLatency& ll, const LowLatencyDispatchRecv& a,
                                             cudaStream_t stream) {
  return launch_dispatch(ll, LowLatencyDispatchSend{}, a, kRecvPhase, stream);
}

cudaError_t launch_low_latency_dispatch(const LowLatency& ll, const LowLatencyDispatchSend& send,
                                        const LowLatencyDispatchRecv& recv, cudaStream_t stream) {
  return launch_dispatch(ll, send, recv, kBothPhases, stream);
}

cudaError_t launch_low_latency_combine_send(const LowLatency& ll, const LowLatencyCombineSend& a,
                                            cudaStream_t stream) {
  return launch_combine(ll, a, LowLatencyCombineRecv{}, kSendPhase, stream);
}

cudaError_t launch_low_latency_combine_recv(const LowLatency& ll, const LowLatencyCombineRecv& a,
                                            cudaStream_t stream) {
  return launch_combine(ll, LowLatencyCombineSend{}, a, kRecvPhase, stream);
}

cudaError_t launch_low_latency_combine(const LowLatency& ll, const LowLatencyCombineSend& send,
                                       const LowLatencyCombineRecv& recv, cudaStream_t stream) {
  return launch_combine(ll, send, recv, kBothPhases, stream);
}

}  // namespace deep_ep_ops
