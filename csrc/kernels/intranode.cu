// Normal-mode dispatch and combine between the GPUs of one NVLink domain, through CUDA IPC
// buffers. Torch-free: raw pointers and a stream; csrc/ops.cpp checks and allocates.
//
// Every rank's NVLink allocation starts with a Control block, then the staging area: one
// region per sending rank, split in two halves (double buffering), each half split in equal
// sub-regions, one per block of the call. Block j of a sender only talks to block j of a
// receiver, through two monotonic 64-bit counters per (pair, block): `ready` (rounds staged,
// written by the sender into the receiver's control block) and `consumed` (rounds read back,
// written by the receiver into the sender's). Counters live on the device and are never reset,
// so eager calls and CUDA-graph replays interleave freely. A round moves up to
// `rows_per_block` rows; the sender may run one round ahead of the receiver.
//
// Dispatch: notify (count rows per destination, exchange counts, derive the handle), then the
// data kernel (capacity dispatch: both in one launch; cached dispatch: counts from the handle,
// one launch) stages rows at their receivers in rounds; row i of a pair belongs to block
// i % blocks, so every block moves the same share. Half of a block's warps stage, the other
// half copy what peers staged here to its final place (source-rank-major, source-token order),
// each half at its own pace. Rows a rank sends to itself are copied directly. Combine runs the
// other way in rounds of owner-token windows: the expert rank stages each row at the slot of
// its source token, then the owner reduces its tokens in fp32 over ranks in ascending order,
// exactly as the reference backend does. Both kernels interleave their peers, starting at a
// different peer on every rank, so that all links carry data at once.
//
// Waits read %globaltimer and give up after the timeout: the kernel records the op and the
// peer in the error word, marks the buffer aborted (later kernels on it return at once) and
// exits; the host raises.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/api.h"
#include "kernels/device_utils.cuh"

namespace deep_ep_ops {
namespace {

constexpr int kThreads = 1024;             // count and notify kernels
constexpr int kWarps = kThreads / 32;
constexpr int kDataThreads = 512;          // data kernels: room for registers
constexpr int kDataWarps = kDataThreads / 32;
constexpr int kRoleWarps = kDataWarps / 2;  // data kernels: sending warps, then receiving
constexpr int kRoleThreads = kRoleWarps * 32;
constexpr int kSendRole = 1, kRecvRole = 2;  // named barriers of the two roles (0: the block's)
constexpr int kMaxRowsPerBlock = 64;  // rows a block moves per round: pipelining granularity
constexpr int kMaxChannels = kMaxBlocks / 2;

struct Control {
  uint64_t ready[kMaxNvlRanks][kMaxBlocks];     // [src][block]: rounds src staged here
  uint64_t consumed[kMaxNvlRanks][kMaxBlocks];  // [dst][block]: rounds dst took from my staging
  uint64_t sent[kMaxNvlRanks][kMaxBlocks];      // [dst][block]: rounds I staged at dst (local)
  uint64_t received[kMaxNvlRanks][kMaxBlocks];  // [src][block]: rounds I took from src (local)
  uint64_t call_word[kMaxNvlRanks][kMaxBlocks];  // [src][block]: src's call word, written
                                                 // before each `ready` of its rounds here
  uint64_t barrier_signal[kMaxNvlRanks];        // [src]: barriers src entered
  uint64_t barrier_epoch;                       // barriers I entered (local)
  uint64_t notify_epoch;                        // count exchanges done (local)
  uint64_t counted;                             // notify blocks done counting (local)
  uint64_t counts_ready;   // one-launch capacity dispatch: 1 counts exchanged, 2 failed (local)
  uint64_t counts_seen;    // and its blocks that read them; the last resets both to 0
  int aborted;                                  // a wait timed out: the buffer is unusable
  int padding;
  int notify_rows[2][kMaxNvlRanks][kMaxNotifyInts];  // [parity][src]: src's counts for me
};
constexpr size_t kControlBytes = (sizeof(Control) + 4095) / 4096 * 4096;

__device__ __forceinline__ Control* control(uint8_t* base) {
  return reinterpret_cast<Control*>(base);
}

__device__ void report(const Intranode& nvl, int code, int peer, int value) {
  report_error(nvl.error, nvl.op, code, peer, value);
}

__device__ __forceinline__ bool is_aborted(const Intranode& nvl) {
  return *reinterpret_cast<volatile int*>(&control(nvl.local)->aborted) != 0;
}

// The thread that takes src's round (after its `ready`): does src's call word match this
// rank's? If not, the first field that differs is reported and the buffer marked aborted.
__device__ bool same_call(const Intranode& nvl, int src, int block) {
  Control* ctl = control(nvl.local);
  const uint64_t theirs = *reinterpret_cast<volatile uint64_t*>(&ctl->call_word[src][block]);
  if (theirs == nvl.call) return true;
  int field = 0;
  while (field + 1 < kCallWordFields &&
         call_word_field(theirs, field) == call_word_field(nvl.call, field))
    ++field;
  report(nvl, kErrorCallMismatch, src, (field << 28) | call_word_field(theirs, field));
  atomicExch(&ctl->aborted, 1);
  return false;
}

// One thread spins until *flag >= target. False when the peer did not arrive in time (the
// error is recorded and the buffer marked aborted) or another wait of this rank timed out.
__device__ bool wait_for(const Intranode& nvl, const uint64_t* flag, uint64_t target, int peer) {
  uint64_t start = 0;
  while (load_acquire(flag) < target) {
    if (is_aborted(nvl)) return false;
    const uint64_t t = now_ns();
    if (start == 0) {
      start = t;
    } else if (t - start > nvl.timeout_ns) {
      if (atomicExch(&control(nvl.local)->aborted, 1) == 0)
        report(nvl, kErrorTimeout, peer, static_cast<int>(nvl.timeout_ns / 1000000000ull));
      return false;
    }
  }
  return true;
}

// Before a call stages anything, every round staged by earlier calls must have been consumed:
// the staging layout (rows per round, slot size, blocks) may differ from call to call.
__device__ bool drain(const Intranode& nvl) {
  Control* ctl = control(nvl.local);
  bool ok = true;
  for (int i = threadIdx.x; i < nvl.num_ranks * kMaxBlocks && ok; i += blockDim.x) {
    const int peer = i / kMaxBlocks, block = i % kMaxBlocks;
    const uint64_t staged = ctl->sent[peer][block];
    if (peer != nvl.rank && staged != 0) ok = wait_for(nvl, &ctl->consumed[peer][block], staged, peer);
  }
  return __syncthreads_and(ok);
}

// Barrier of one role's warps (kRoleThreads threads), and the same with an AND of `ok`.
__device__ __forceinline__ void role_sync(int role) {
  asm volatile("bar.sync %0, %1;" ::"r"(role), "r"(kRoleThreads) : "memory");
}

__device__ __forceinline__ bool role_sync_and(int role, bool ok) {
  int all;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.s32 p, %1, 0;\n bar.red.and.pred q, %2, %3, p;\n"
      " selp.s32 %0, 1, 0, q;\n}"
      : "=r"(all)
      : "r"(static_cast<int>(ok)), "r"(role), "r"(kRoleThreads)
      : "memory");
  return all != 0;
}

// --- warp-wide copies ------------------------------------------------------------------------

__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes,
                                          int vector_bytes, int lane) {
  switch (vector_bytes) {
    case 16: warp_copy_words<16>(dst, src, bytes, lane); break;
    case 8: warp_copy_words<8>(dst, src, bytes, lane); break;
    case 4: warp_copy_words<4>(dst, src, bytes, lane); break;
    case 2: warp_copy_words<2>(dst, src, bytes, lane); break;
    default: warp_copy_words<1>(dst, src, bytes, lane); break;
  }
}

__device__ __forceinline__ void copy_weight(uint8_t* dst, const uint8_t* src, int bytes) {
  if (bytes == 8) {
    *reinterpret_cast<uint64_t*>(dst) = __ldcg(reinterpret_cast<const unsigned long long*>(src));
  } else {
    *reinterpret_cast<uint32_t*>(dst) = __ldcg(reinterpret_cast<const unsigned*>(src));
  }
}

// --- staging geometry ------------------------------------------------------------------------

}  // namespace

// The kernels live here, with external linkage: in a CUDA profile they read as
// deep_ep_ops::intranode::dispatch / combine (DeepEP's bench_kineto finds kernels by name), not
// as (anonymous namespace) members. A parameter type of internal linkage would make its kernel
// internal again, hence Staging here too.
namespace intranode {

struct Staging {
  int64_t region_bytes;  // per sending rank
  int64_t half_bytes;    // per round parity
  int64_t slot_bytes;
  int rows_per_block;

  __device__ uint8_t* slot(uint8_t* holder, int sender, uint64_t round, int64_t index) const {
    return holder + kControlBytes + sender * region_bytes + ((round - 1) & 1) * half_bytes +
           index * slot_bytes;
  }
};

}  // namespace intranode

namespace {

__host__ __device__ inline intranode::Staging staging_of(int64_t data_bytes, int num_ranks,
                                                         int64_t slot_bytes, int num_blocks) {
  intranode::Staging s;
  s.region_bytes = data_bytes / num_ranks / 16 * 16;
  s.half_bytes = s.region_bytes / 2 / 16 * 16;
  s.slot_bytes = slot_bytes;
  const int64_t rows = s.half_bytes / slot_bytes / num_blocks;
  s.rows_per_block = static_cast<int>(rows < kMaxRowsPerBlock ? rows : kMaxRowsPerBlock);
  return s;
}

// --- dispatch: count and notify --------------------------------------------------------------

// Device-wide barrier of all ranks (one block): monotonic epochs, nothing to reset.
__device__ bool barrier(const Intranode& nvl, uint8_t* const* peer_base) {
  Control* ctl = control(nvl.local);
  __shared__ uint64_t epoch;
  __syncthreads();
  if (threadIdx.x == 0) epoch = ++ctl->barrier_epoch;
  __threadfence_system();
  __syncthreads();
  bool ok = true;
  const int peer = threadIdx.x;
  if (peer < nvl.num_ranks && peer != nvl.rank) {
    store_release(&control(peer_base[peer])->barrier_signal[nvl.rank], epoch);
    ok = wait_for(nvl, &ctl->barrier_signal[peer], epoch, peer);
  }
  return __syncthreads_and(ok);
}

}  // namespace

namespace intranode {

// One block per destination dst (block dst of the notify kernel, or of a one-launch capacity
// dispatch): a block-wide scan of is_token_in_rank[:, dst] gives each token's row among those
// sent to dst (send_list, send_head before the offset) and the per-channel prefix.
__device__ void count_rows(const Intranode& nvl, const DispatchLayoutArgs& args, int dst) {
  const int num_ranks = nvl.num_ranks, num_tokens = args.num_tokens;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __shared__ int warp_totals[kWarps];
  __shared__ int channel_counts[kMaxChannels];
  for (int c = threadIdx.x; c < args.num_channels; c += blockDim.x) channel_counts[c] = 0;
  int per_channel = (num_tokens + args.num_channels - 1) / args.num_channels;
  per_channel = per_channel < 1 ? 1 : per_channel;
  int carry = 0;
  __syncthreads();
  for (int base = 0; base < num_tokens; base += blockDim.x) {
    const int t = base + threadIdx.x;
    const bool present = t < num_tokens && args.is_token_in_rank[int64_t(t) * num_ranks + dst];
    const unsigned ballot = __ballot_sync(0xffffffffu, present);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_totals[w] : 0;
      total += warp_totals[w];
    }
    const int slot = carry + before + __popc(ballot & ((1u << lane) - 1));
    if (t < num_tokens) {
      if (present) {
        args.send_list[int64_t(dst) * num_tokens + slot] = t;
        atomicAdd(&channel_counts[t / per_channel], 1);
      }
      args.send_head[int64_t(t) * num_ranks + dst] = present ? slot : -1;
    }
    carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    args.counts[dst] = carry;
    if (carry != args.num_tokens_per_rank[dst]) report(nvl, kErrorCountMismatch, dst, carry);
    int prefix = 0;
    for (int c = 0; c < args.num_channels; ++c) {
      prefix += channel_counts[c];
      args.channel_prefix_matrix[dst * args.num_channels + c] = prefix;
    }
  }
}

// The last block to finish counting: publish this rank's row for every destination (rows sent
// to every rank, the destination's channel prefix and per-expert counts), barrier, derive the
// handle. False when the exchange failed (a timeout, an aborted buffer, a disagreement).
__device__ bool exchange_counts(const Intranode& nvl, const DispatchLayoutArgs& args) {
  const int num_ranks = nvl.num_ranks, me = nvl.rank, channels = args.num_channels;
  const int num_local = args.num_tokens_per_expert ? args.num_experts / num_ranks : 0;
  const int row_ints = num_ranks + channels + num_local, meta_at = kMaxNotifyInts - kNotifyMetaInts;
  Control* ctl = control(nvl.local);
  __shared__ uint8_t* peer_base[kMaxNvlRanks];
  __shared__ int parity, aborted, num_recv, disagree;
  __shared__ int my_start[kMaxNvlRanks], recv_offset[kMaxNvlRanks];
  if (threadIdx.x < num_ranks) peer_base[threadIdx.x] = nvl.peers[threadIdx.x];
  if (threadIdx.x == 0) {
    parity = static_cast<int>(ctl->notify_epoch & 1);
    aborted = is_aborted(nvl);
    disagree = 0;
  }
  __syncthreads();
  if (aborted) {
    if (threadIdx.x == 0 && args.num_recv_host) *reinterpret_cast<volatile int*>(args.num_recv_host) = -2;
    return false;
  }
  for (int i = threadIdx.x; i < num_ranks * row_ints; i += blockDim.x) {
    const int dst = i / row_ints, k = i % row_ints;
    // The other blocks' counts: read from L2 (__ldcg), past this SM's L1.
    const int value = k < num_ranks ? __ldcg(&args.counts[k])
                    : k < num_ranks + channels
                        ? __ldcg(&args.channel_prefix_matrix[dst * channels + k - num_ranks])
                        : args.num_tokens_per_expert[dst * num_local + k - num_ranks - channels];
    control(peer_base[dst])->notify_rows[parity][me][k] = value;
  }
  for (int i = threadIdx.x; i < num_ranks * kNotifyMetaInts; i += blockDim.x)
    control(peer_base[i / kNotifyMetaInts])->notify_rows[parity][me][meta_at + i % kNotifyMetaInts] =
        args.meta[i % kNotifyMetaInts];
  if (!barrier(nvl, peer_base)) {
    if (threadIdx.x == 0 && args.num_recv_host) *reinterpret_cast<volatile int*>(args.num_recv_host) = -2;
    return false;
  }
  const volatile int(*rows)[kMaxNotifyInts] = ctl->notify_rows[parity];
  // Every rank compares every peer's arguments with its own, so all of them see a
  // disagreement: none launches the data kernel (the host raises on -3; capacity mode, which
  // does not wait, marks the buffer aborted and the next call raises). In step either way.
  for (int i = threadIdx.x; i < num_ranks * kNotifyMetaInts; i += blockDim.x) {
    const int src = i / kNotifyMetaInts, f = i % kNotifyMetaInts;
    const int theirs = rows[src][meta_at + f];
    if (theirs != args.meta[f] && atomicCAS(&disagree, 0, 1) == 0)
      report(nvl, kErrorDisagree, src, (f << 28) | (theirs & 0x0fffffff));
  }
  __syncthreads();
  if (disagree) {
    if (threadIdx.x == 0) {
      if (args.num_recv_host) {
        __threadfence_system();
        *reinterpret_cast<volatile int*>(args.num_recv_host) = -3;
      } else {
        atomicExch(&ctl->aborted, 1);
      }
      ctl->notify_epoch += 1;
    }
    return false;
  }
  for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
    const int src = i / num_ranks, dst = i % num_ranks;
    int sum = 0;
    for (int s = 0; s <= src; ++s) sum += rows[s][dst];
    args.rank_prefix_matrix[i] = sum;
  }
  if (threadIdx.x == 0) {
    int offset = 0;
    for (int src = 0; src < num_ranks; ++src) {
      const int count = rows[src][me];
      args.counts[num_ranks + src] = count;
      args.counts[2 * num_ranks + src] = recv_offset[src] = offset;
      offset += count;
    }
    args.counts[3 * num_ranks] = offset;
    if (args.num_worst_tokens > 0 && offset > args.num_worst_tokens)
      report(nvl, kErrorCapacity, me, offset);
    num_recv = offset;
  }
  if (threadIdx.x < num_ranks) {
    int start = 0;
    for (int s = 0; s < me; ++s) start += rows[s][threadIdx.x];
    my_start[threadIdx.x] = start;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks * channels; i += blockDim.x) {
    const int src = i / channels, c = i % channels;
    args.recv_channel_prefix_matrix[i] =
        recv_offset[src] + (c == 0 ? 0 : rows[src][num_ranks + c - 1]);
  }
  for (int l = threadIdx.x; l < num_local; l += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < num_ranks; ++s) sum += rows[s][num_ranks + channels + l];
    const int align = args.expert_alignment;
    const int aligned = (sum + align - 1) / align * align;
    args.num_recv_tokens_per_expert[l] = aligned;
    if (args.num_recv_host) reinterpret_cast<volatile int*>(args.num_recv_host)[1 + l] = aligned;
  }
  if (args.num_recv_host) {  // the per-expert counts before the total the host waits for
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      *reinterpret_cast<volatile int*>(args.num_recv_host) = num_recv;
    }
  }
  const int64_t entries = int64_t(args.num_tokens) * num_ranks;
  for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) {
    const int head = __ldcg(&args.send_head[i]);
    if (head >= 0) args.send_head[i] = head + my_start[i % num_ranks];
  }
  __syncthreads();
  if (threadIdx.x == 0) ctl->notify_epoch += 1;
  return true;
}

// Block dst < num_ranks counts its rows and takes a ticket of a monotonic counter in Control
// (launches of one buffer run in stream order, so each adds exactly num_ranks): true for the
// block that finished counting last, which goes on to the exchange.
__device__ bool count_rows_last(const Intranode& nvl, const DispatchLayoutArgs& args, int dst) {
  count_rows(nvl, args, dst);
  __shared__ int last;
  __threadfence();  // this block's counts and rows before its share of the counter
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(&control(nvl.local)->counted), 1ull) + 1;
    last = done % static_cast<unsigned long long>(nvl.num_ranks) == 0;
    __threadfence();  // and the other blocks' after it
  }
  __syncthreads();
  return last != 0;
}

// Data-dependent dispatch (and capacity dispatch with fewer blocks than ranks): one block per
// destination rank counts, the last one exchanges. One launch for both steps: a launch costs
// the eager host about 5 us (issue 11's host table).
__global__ void __launch_bounds__(kThreads)
notify(Intranode nvl, DispatchLayoutArgs args) {
  if (count_rows_last(nvl, args, blockIdx.x)) exchange_counts(nvl, args);
}

// Capacity dispatch in one launch, before the data kernel's rounds: its blocks 0..num_ranks-1
// count (as the notify kernel's), the last of them exchanges and publishes the counts in
// Control::counts_ready; every other block waits for them there. All blocks of a data kernel
// are resident at once (the bindings check it), so the waits cannot starve the counters.
// False (for the whole block) when the exchange failed or timed out.
__device__ bool notify_in_data_kernel(const Intranode& nvl, const DispatchLayoutArgs& args) {
  Control* ctl = control(nvl.local);
  const bool last = blockIdx.x < nvl.num_ranks && count_rows_last(nvl, args, blockIdx.x);
  __shared__ int ok;
  if (last) {
    const bool exchanged = exchange_counts(nvl, args);
    __threadfence();  // every thread's handle and counts before the flag
    __syncthreads();
    if (threadIdx.x == 0) store_release(&ctl->counts_ready, exchanged ? 1 : 2);
    return exchanged;
  }
  if (threadIdx.x == 0) {
    // The exchanging block's barrier times out on a missing peer (and marks the buffer
    // aborted); this wait's own limit only covers a block that never runs.
    uint64_t start = 0, ready = 0;
    while ((ready = load_acquire(&ctl->counts_ready)) == 0 && !is_aborted(nvl)) {
      const uint64_t t = now_ns();
      if (start == 0) {
        start = t;
      } else if (t - start > 2 * nvl.timeout_ns + 1000000000ull) {
        if (atomicExch(&ctl->aborted, 1) == 0)
          report(nvl, kErrorTimeout, nvl.rank, static_cast<int>(nvl.timeout_ns / 1000000000ull));
        break;
      }
    }
    ok = ready == 1;
  }
  __syncthreads();
  return ok != 0;
}

// After a one-launch capacity dispatch's block read the counts: the last block of the launch
// to do so clears the flag for the next launch (which starts after this one ends).
__device__ void counts_read(const Intranode& nvl) {
  Control* ctl = control(nvl.local);
  if (threadIdx.x == 0 &&
      atomicAdd(reinterpret_cast<unsigned long long*>(&ctl->counts_seen), 1ull) + 1 == gridDim.x) {
    ctl->counts_seen = 0;
    atomicExch(reinterpret_cast<unsigned long long*>(&ctl->counts_ready), 0ull);
  }
}

// Cached dispatch: the rows every rank gets from the handle's rank_prefix_matrix (row src,
// column dst: rows ranks 0..src send to dst), and this block's share of the send list (row i
// of a pair is block i % blocks's) by inverting send_head. Every block reads all of send_head
// and keeps its own rows; no other block's are needed, so no second launch.
__device__ void counts_from_handle(const Intranode& nvl, const DispatchDataArgs& a,
                                   int* send_count, int* recv_count, int* recv_offset,
                                   int* recv_total) {
  const int num_ranks = nvl.num_ranks, me = nvl.rank, block = blockIdx.x, blocks = gridDim.x;
  const int* rpm = a.handle_rank_prefix;
  __shared__ int my_start[kMaxNvlRanks];
  auto before = [&](int src, int dst) { return src == 0 ? 0 : rpm[(src - 1) * num_ranks + dst]; };
  if (threadIdx.x < num_ranks) {
    const int r = threadIdx.x;
    my_start[r] = before(me, r);
    send_count[r] = rpm[me * num_ranks + r] - my_start[r];
    recv_offset[r] = before(r, me);
    recv_count[r] = rpm[r * num_ranks + me] - recv_offset[r];
  }
  if (threadIdx.x == 0) *recv_total = rpm[(num_ranks - 1) * num_ranks + me];
  __syncthreads();
  const int64_t entries = int64_t(a.num_tokens) * num_ranks;
  for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) {
    const int head = __ldg(a.handle_send_head + i);
    if (head < 0) continue;
    const int dst = static_cast<int>(i % num_ranks), slot = head - my_start[dst];
    if (slot < 0 || slot >= send_count[dst]) {
      if (block == 0) report(nvl, kErrorBadHandle, dst, head);
    } else if (slot % blocks == block) {
      a.send_list[int64_t(dst) * a.num_tokens + slot] = static_cast<int>(i / num_ranks);
    }
  }
  __syncthreads();
}

}  // namespace intranode

namespace {

// --- dispatch: data ----------------------------------------------------------------------------

// Where the parts of one row go: a staging slot or the output rows.
struct RowOut {
  uint8_t* x;
  uint32_t* scales;
  int64_t* topk_idx;
  uint8_t* topk_weights;
  int* src_idx;
};

struct SlotLayout {
  int64_t scales, topk_idx, topk_weights, src_idx, bytes;
};

__host__ __device__ inline SlotLayout slot_layout(const DispatchDataArgs& a) {
  SlotLayout s;
  auto align = [](int64_t n) { return (n + 15) / 16 * 16; };
  s.scales = align(a.row_bytes);
  s.topk_idx = s.scales + align(int64_t(4) * a.num_scales);
  s.topk_weights = s.topk_idx + int64_t(8) * a.num_topk;
  s.src_idx = s.topk_weights + int64_t(a.weight_bytes) * a.num_topk;
  s.bytes = align(s.src_idx + 4);
  return s;
}

__device__ __forceinline__ RowOut slot_row(uint8_t* slot, const SlotLayout& s) {
  return {slot, reinterpret_cast<uint32_t*>(slot + s.scales),
          reinterpret_cast<int64_t*>(slot + s.topk_idx), slot + s.topk_weights,
          reinterpret_cast<int*>(slot + s.src_idx)};
}

__device__ __forceinline__ RowOut output_row(const DispatchDataArgs& a, int64_t row) {
  return {a.recv_x + row * a.row_bytes, a.recv_x_scales + row * a.num_scales,
          a.recv_topk_idx + row * a.num_topk, a.recv_topk_weights + row * a.num_topk * a.weight_bytes,
          a.recv_src_idx ? a.recv_src_idx + row : nullptr};
}

// Token t as rank dst receives it: payload, scales, top-k as dst's local experts (-1 and zero
// weight for experts elsewhere), source index.
__device__ void put_token(const DispatchDataArgs& a, int t, int dst, const RowOut& out, int lane) {
  warp_copy(out.x, a.x + int64_t(t) * a.row_bytes, a.row_bytes, a.vector_bytes, lane);
  for (int g = lane; g < a.num_scales; g += 32)
    out.scales[g] = __ldg(a.x_scales + t * a.scale_stride_token + g * a.scale_stride_group);
  for (int k = lane; k < a.num_topk; k += 32) {
    const int64_t i = int64_t(t) * a.num_topk + k;
    bool keep = true;
    if (a.has_topk_idx) {
      const int64_t expert = __ldg(a.topk_idx + i);
      const int64_t local = expert - int64_t(dst) * a.num_local_experts;
      keep = expert >= 0 && local >= 0 && local < a.num_local_experts;
      out.topk_idx[k] = keep ? local : -1;
    }
    uint8_t* w = out.topk_weights + k * a.weight_bytes;
    if (keep) {
      copy_weight(w, a.topk_weights + i * a.weight_bytes, a.weight_bytes);
    } else if (a.weight_bytes == 8) {
      *reinterpret_cast<uint64_t*>(w) = 0;
    } else {
      *reinterpret_cast<uint32_t*>(w) = 0;
    }
  }
  if (lane == 0 && out.src_idx) *out.src_idx = t;
}

__device__ void take_row(const DispatchDataArgs& a, const SlotLayout& s, const uint8_t* slot,
                         const RowOut& out, int lane) {
  warp_copy(out.x, slot, a.row_bytes, a.vector_bytes, lane);
  const RowOut in = slot_row(const_cast<uint8_t*>(slot), s);
  for (int g = lane; g < a.num_scales; g += 32) out.scales[g] = __ldcg(in.scales + g);
  for (int k = lane; k < a.num_topk; k += 32) {
    if (a.has_topk_idx) out.topk_idx[k] = __ldcg(reinterpret_cast<const long long*>(in.topk_idx) + k);
    copy_weight(out.topk_weights + k * a.weight_bytes, in.topk_weights + k * a.weight_bytes,
                a.weight_bytes);
  }
  if (lane == 0 && out.src_idx) *out.src_idx = __ldcg(in.src_idx);
}

__device__ void clear_row(const DispatchDataArgs& a, int64_t row, int lane) {
  const RowOut out = output_row(a, row);
  if (a.vector_bytes == 16) {
    for (int64_t w = lane; w < a.row_bytes / 16; w += 32)
      reinterpret_cast<int4*>(out.x)[w] = make_int4(0, 0, 0, 0);
  } else {
    for (int64_t b = lane; b < a.row_bytes; b += 32) out.x[b] = 0;
  }
  for (int g = lane; g < a.num_scales; g += 32) out.scales[g] = 0;
  for (int k = lane; k < a.num_topk; k += 32) {
    if (a.has_topk_idx) out.topk_idx[k] = -1;
    for (int b = 0; b < a.weight_bytes; ++b) out.topk_weights[k * a.weight_bytes + b] = 0;
  }
  if (lane == 0 && out.src_idx) *out.src_idx = -1;
}

// Rows of a (sender, receiver) pair go to the blocks in turn: row i to block i % blocks, at
// position i / blocks of that block's share; every block moves the same number of rows (to one).
__device__ __forceinline__ int64_t block_share(int64_t count, int block, int num_blocks) {
  return count > block ? (count - 1 - block) / num_blocks + 1 : 0;
}

}  // namespace

namespace intranode {

// Where a dispatch kernel finds its counts and send list (one instance each: the two extra
// steps would cost the plain kernel registers).
enum CountsFrom : int {
  kCountsFromNotify = 0,  // the notify kernel's a.counts
  kCountsHere = 1,        // capacity dispatch in one launch: the notify step first (`notify`)
  kCountsFromHandle = 2,  // cached dispatch: the handle's rank_prefix_matrix and send_head
};

template <int kFrom>
__global__ void __launch_bounds__(kDataThreads, 1)
dispatch(Intranode nvl, DispatchDataArgs a, Staging st, DispatchLayoutArgs notify) {
  const int num_ranks = nvl.num_ranks, me = nvl.rank, block = blockIdx.x, blocks = gridDim.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const SlotLayout layout = slot_layout(a);
  Control* ctl = control(nvl.local);
  __shared__ uint8_t* peer_base[kMaxNvlRanks];
  __shared__ int send_count[kMaxNvlRanks], recv_count[kMaxNvlRanks], recv_offset[kMaxNvlRanks];
  __shared__ uint64_t send_round[kMaxNvlRanks], recv_round[kMaxNvlRanks];
  __shared__ int aborted, recv_total;
  if (tid < num_ranks) peer_base[tid] = nvl.peers[tid];
  if (tid == 0) aborted = is_aborted(nvl);
  __syncthreads();
  if (aborted) return;
  if (kFrom == kCountsHere && !notify_in_data_kernel(nvl, notify)) return;
  if (kFrom == kCountsFromHandle) {
    counts_from_handle(nvl, a, send_count, recv_count, recv_offset, &recv_total);
  } else {
    // Written by other blocks or by the notify kernel: read from L2 (__ldcg), past L1.
    if (tid < num_ranks) {
      send_count[tid] = __ldcg(&a.counts[tid]);
      recv_count[tid] = __ldcg(&a.counts[num_ranks + tid]);
      recv_offset[tid] = __ldcg(&a.counts[2 * num_ranks + tid]);
    }
    if (tid == 0) recv_total = __ldcg(&a.counts[3 * num_ranks]);
    __syncthreads();
    if (kFrom == kCountsHere) counts_read(nvl);
  }
  if (!drain(nvl)) return;

  const int64_t per_block = st.rows_per_block;
  auto rounds_of = [&](int64_t count) {
    return (block_share(count, block, blocks) + per_block - 1) / per_block;
  };
  auto in_round = [&](int64_t count, int64_t round) {
    return round * per_block < block_share(count, block, blocks);
  };
  // The block's two roles run side by side, each at its own pace: the sending warps stage
  // rounds at the receivers (and copy this rank's own rows to the output), the receiving warps
  // take the rounds peers staged here to the output. A sender runs at most one round ahead
  // of its receiver (two halves).
  bool ok = true;
  if (warp < kRoleWarps) {
    int64_t rounds = 0;
    for (int r = 0; r < num_ranks; ++r) rounds = max(rounds, rounds_of(send_count[r]));
    for (int64_t round = 0; round < rounds && ok; ++round) {
      if (tid < num_ranks && tid != me && in_round(send_count[tid], round)) {
        const uint64_t n = ctl->sent[tid][block] + 1;
        send_round[tid] = n;
        if (n >= 3) ok = wait_for(nvl, &ctl->consumed[tid][block], n - 2, tid);
      }
      if (!(ok = role_sync_and(kSendRole, ok))) break;
      // Consecutive items go to different ranks, starting at a different rank on every rank:
      // all peers' links carry data at once (destination-major order would make every rank
      // write to the same peer at the same time and share that peer's ingress).
      for (int item = warp; item < num_ranks * per_block; item += kRoleWarps) {
        const int dst = (me + item) % num_ranks;
        const int64_t q = item / num_ranks, i = (round * per_block + q) * blocks + block;
        if (i >= send_count[dst]) continue;
        const int t = __ldcg(&a.send_list[int64_t(dst) * a.num_tokens + i]);
        if (t < 0 || t >= a.num_tokens) continue;  // a bad handle (reported) left it unset
        if (dst == me) {
          const int64_t row = recv_offset[me] + i;
          if (row < a.num_recv_rows) put_token(a, t, me, output_row(a, row), lane);
        } else {
          uint8_t* slot = st.slot(peer_base[dst], me, send_round[dst], block * per_block + q);
          put_token(a, t, dst, slot_row(slot, layout), lane);
        }
      }
      role_sync(kSendRole);
      if (tid < num_ranks && tid != me && in_round(send_count[tid], round)) {
        ctl->sent[tid][block] = send_round[tid];
        control(peer_base[tid])->call_word[me][block] = nvl.call;  // ordered by the release
        store_release(&control(peer_base[tid])->ready[me][block], send_round[tid]);
      }
    }
  } else {
    const int rtid = tid - kRoleThreads, rwarp = warp - kRoleWarps;
    int64_t rounds = 0;
    for (int r = 0; r < num_ranks; ++r)
      if (r != me) rounds = max(rounds, rounds_of(recv_count[r]));
    for (int64_t round = 0; round < rounds && ok; ++round) {
      if (rtid < num_ranks && rtid != me && in_round(recv_count[rtid], round)) {
        const uint64_t n = ctl->received[rtid][block] + 1;
        recv_round[rtid] = n;
        ok = wait_for(nvl, &ctl->ready[rtid][block], n, rtid) && same_call(nvl, rtid, block);
      }
      if (!(ok = role_sync_and(kRecvRole, ok))) break;
      for (int item = rwarp; item < num_ranks * per_block; item += kRoleWarps) {
        const int src = item % num_ranks;
        const int64_t q = item / num_ranks, i = (round * per_block + q) * blocks + block;
        if (src == me || i >= recv_count[src]) continue;
        const int64_t row = recv_offset[src] + i;
        if (row >= a.num_recv_rows) continue;  // capacity overflow, reported by notify
        const uint8_t* slot = st.slot(nvl.local, src, recv_round[src], block * per_block + q);
        take_row(a, layout, slot, output_row(a, row), lane);
      }
      role_sync(kRecvRole);
      if (rtid < num_ranks && rtid != me && in_round(recv_count[rtid], round)) {
        ctl->received[rtid][block] = recv_round[rtid];
        store_release(&control(peer_base[rtid])->consumed[me][block], recv_round[rtid]);
      }
    }
  }
  if (!__syncthreads_and(ok)) return;
  if (a.fill_tail) {
    for (int64_t row = recv_total + block * kDataWarps + warp; row < a.num_recv_rows;
         row += int64_t(blocks) * kDataWarps)
      clear_row(a, row, lane);
  }
}

}  // namespace intranode

namespace {

// --- combine -----------------------------------------------------------------------------------

template <typename T> struct Scalar;
template <> struct Scalar<__nv_bfloat16> {
  using Acc = float;
  static __device__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Scalar<__half> {
  using Acc = float;
  static __device__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <> struct Scalar<float> {
  using Acc = float;
  static __device__ float to_acc(float v) { return v; }
  static __device__ float from_acc(float v) { return v; }
};
template <> struct Scalar<double> {
  using Acc = double;
  static __device__ double to_acc(double v) { return v; }
  static __device__ double from_acc(double v) { return v; }
};

__host__ __device__ inline int64_t combine_weights_offset(const CombineArgs& a, int element) {
  return (int64_t(a.hidden) * element + 15) / 16 * 16;
}

// Lower bound of `value` in the ascending range [begin, end) of recv_src_idx.
__device__ int64_t lower_bound(const int* keys, int64_t begin, int64_t end, int64_t value) {
  while (begin < end) {
    const int64_t mid = (begin + end) / 2;
    if (keys[mid] < value) begin = mid + 1; else end = mid;
  }
  return begin;
}

// Warp: token t's combined row from up to num_ranks sources (ascending rank order).
template <typename T>
__device__ void reduce_token(const CombineArgs& a, int64_t t, const uint8_t* const* sources,
                             const uint8_t* const* weight_sources, int num_sources, int lane) {
  using S = Scalar<T>;
  using Acc = typename S::Acc;
  constexpr int kPerWord = 16 / sizeof(T);
  const Acc* bias_0 = static_cast<const Acc*>(a.bias_0);
  const Acc* bias_1 = static_cast<const Acc*>(a.bias_1);
  T* out = reinterpret_cast<T*>(a.combined_x) + t * a.hidden;
  const int64_t row_offset = t * a.hidden;
  if (a.hidden % kPerWord == 0) {
    // kGroup x kWords 16-byte words per lane in flight: the loop is latency-bound.
    constexpr int kWords = 2, kGroup = 4;
    const int num_words = a.hidden / kPerWord;
    for (int w0 = lane; w0 < num_words; w0 += 32 * kWords) {
      Acc acc[kWords][kPerWord];
#pragma unroll
      for (int u = 0; u < kWords; ++u)
#pragma unroll
        for (int e = 0; e < kPerWord; ++e) acc[u][e] = Acc(0);
      // Sources in groups of kGroup, all their words loaded before the first is added; the
      // additions stay in ascending source order.
      for (int s0 = 0; s0 < num_sources; s0 += kGroup) {
        int4 words[kGroup][kWords];
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
#pragma unroll
          for (int u = 0; u < kWords; ++u)
            if (s0 + g < num_sources && w0 + u * 32 < num_words)
              words[g][u] = __ldcg(reinterpret_cast<const int4*>(sources[s0 + g]) + w0 + u * 32);
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          if (s0 + g >= num_sources) break;
#pragma unroll
          for (int u = 0; u < kWords; ++u) {
            if (w0 + u * 32 >= num_words) continue;
            const T* v = reinterpret_cast<const T*>(&words[g][u]);
#pragma unroll
            for (int e = 0; e < kPerWord; ++e) acc[u][e] += S::to_acc(v[e]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kWords; ++u) {
        const int w = w0 + u * 32;
        if (w >= num_words) continue;
        if (bias_0)
          for (int e = 0; e < kPerWord; ++e) acc[u][e] += bias_0[row_offset + w * kPerWord + e];
        if (bias_1)
          for (int e = 0; e < kPerWord; ++e) acc[u][e] += bias_1[row_offset + w * kPerWord + e];
        int4 result;
        T* r = reinterpret_cast<T*>(&result);
#pragma unroll
        for (int e = 0; e < kPerWord; ++e) r[e] = S::from_acc(acc[u][e]);
        reinterpret_cast<int4*>(out)[w] = result;
      }
    }
  } else {
    for (int e = lane; e < a.hidden; e += 32) {
      Acc acc = Acc(0);
      for (int s = 0; s < num_sources; ++s)
        acc += S::to_acc(reinterpret_cast<const T*>(sources[s])[e]);
      if (bias_0) acc += bias_0[row_offset + e];
      if (bias_1) acc += bias_1[row_offset + e];
      out[e] = S::from_acc(acc);
    }
  }
  for (int k = lane; k < a.num_topk; k += 32) {
    if (a.weight_bytes == 8) {
      double acc = 0;
      for (int s = 0; s < num_sources; ++s)
        acc += __ldcg(reinterpret_cast<const double*>(weight_sources[s]) + k);
      reinterpret_cast<double*>(a.combined_topk_weights)[t * a.num_topk + k] = acc;
    } else {
      float acc = 0;
      for (int s = 0; s < num_sources; ++s)
        acc += __ldcg(reinterpret_cast<const float*>(weight_sources[s]) + k);
      reinterpret_cast<float*>(a.combined_topk_weights)[t * a.num_topk + k] = acc;
    }
  }
}

}  // namespace

namespace intranode {

template <typename T>
__global__ void __launch_bounds__(kDataThreads, 1)
combine(Intranode nvl, CombineArgs a, Staging st) {
  const int num_ranks = nvl.num_ranks, me = nvl.rank, block = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const int64_t row_bytes = int64_t(a.hidden) * sizeof(T);
  const int64_t weights_offset = combine_weights_offset(a, sizeof(T));
  const int64_t weight_row = int64_t(a.num_topk) * a.weight_bytes;
  Control* ctl = control(nvl.local);
  __shared__ uint8_t* peer_base[kMaxNvlRanks];
  __shared__ int recv_count[kMaxNvlRanks], recv_offset[kMaxNvlRanks];
  __shared__ int64_t lo[kMaxNvlRanks], hi[kMaxNvlRanks];
  __shared__ uint64_t send_round[kMaxNvlRanks], recv_round[kMaxNvlRanks];
  __shared__ int64_t windows;
  __shared__ int aborted, owners_mask;
  if (tid < num_ranks) {
    const int* rpm = a.rank_prefix_matrix;
    const int before = tid == 0 ? 0 : rpm[(tid - 1) * num_ranks + me];
    peer_base[tid] = nvl.peers[tid];
    recv_offset[tid] = before;
    recv_count[tid] = rpm[tid * num_ranks + me] - before;
  }
  if (tid == 0) aborted = is_aborted(nvl);
  __syncthreads();
  if (aborted || !drain(nvl)) return;

  const int64_t per_block = st.rows_per_block, per_window = per_block * gridDim.x;
  if (tid == 0) {
    int64_t n = (a.num_tokens + per_window - 1) / per_window;
    for (int r = 0; r < num_ranks; ++r) {
      if (r == me || recv_count[r] == 0) continue;
      const int64_t last = a.recv_src_idx[recv_offset[r] + recv_count[r] - 1];
      const int64_t m = last / per_window + 1;
      n = m > n ? m : n;
    }
    windows = n;
  }
  __syncthreads();
  // Software pipeline: step k stages window k, then reduces window k - 1, which the peers
  // staged a step earlier (one group of warps does both; split roles were slower here).
  for (int64_t step = 0; step <= windows; ++step) {
    if (step < windows) {
      const int64_t window = step;
      const int64_t t0 = window * per_window + block * per_block, t1 = t0 + per_block;
      // Expert side: stage my rows of tokens [t0, t1) of every owner at the slot of the token.
      bool ok = true;
      if (tid < num_ranks && tid != me) {
        const int64_t begin = recv_offset[tid], end = begin + recv_count[tid];
        lo[tid] = lower_bound(a.recv_src_idx, begin, end, t0);
        hi[tid] = lower_bound(a.recv_src_idx, lo[tid], end, t1);
        if (hi[tid] > lo[tid]) {
          const uint64_t n = ctl->sent[tid][block] + 1;
          send_round[tid] = n;
          if (n >= 3) ok = wait_for(nvl, &ctl->consumed[tid][block], n - 2, tid);
        }
      }
      if (!__syncthreads_and(ok)) return;
      // Owners interleaved and rotated per rank, as in dispatch: every link busy at once.
      int64_t most = 0;
      for (int r = 0; r < num_ranks; ++r)
        if (r != me) most = hi[r] - lo[r] > most ? hi[r] - lo[r] : most;
      const int peers = num_ranks - 1;
      for (int64_t item = warp; item < most * peers; item += kDataWarps) {
        const int owner = (me + 1 + static_cast<int>(item % peers)) % num_ranks;
        const int64_t i = lo[owner] + item / peers;
        if (i < hi[owner]) {
          const int64_t token = a.recv_src_idx[i];
          uint8_t* slot =
              st.slot(peer_base[owner], me, send_round[owner], token - window * per_window);
          warp_copy(slot, a.x + i * row_bytes, row_bytes, row_bytes % 16 == 0 ? 16 : sizeof(T),
                    lane);
          if (a.num_topk > 0)
            for (int64_t b = lane * 4; b < weight_row; b += 32 * 4)
              *reinterpret_cast<uint32_t*>(slot + weights_offset + b) =
                  __ldg(reinterpret_cast<const unsigned*>(a.topk_weights + i * weight_row + b));
        }
      }
      __syncthreads();
      if (tid < num_ranks && tid != me && hi[tid] > lo[tid]) {
        ctl->sent[tid][block] = send_round[tid];
        control(peer_base[tid])->call_word[me][block] = nvl.call;  // ordered by the release
        store_release(&control(peer_base[tid])->ready[me][block], send_round[tid]);
      }
    }
    if (step > 0) {
      const int64_t window = step - 1;
      const int64_t t0 = window * per_window + block * per_block, t1 = t0 + per_block;
      // Owner side: which ranks hold some of my tokens [t0, t1)?
      const int64_t end = t1 < a.num_tokens ? t1 : a.num_tokens;
      if (tid == 0) owners_mask = 0;
      __syncthreads();
      int mask = 0;
      for (int64_t i = t0 * num_ranks + tid; i < end * num_ranks; i += blockDim.x)
        if (a.send_head[i] >= 0) mask |= 1 << (i % num_ranks);
      if (mask) atomicOr(&owners_mask, mask);
      __syncthreads();
      const bool holds = tid < num_ranks && tid != me && ((owners_mask >> tid) & 1);
      bool ok = true;
      if (holds) {
        const uint64_t n = ctl->received[tid][block] + 1;
        recv_round[tid] = n;
        ok = wait_for(nvl, &ctl->ready[tid][block], n, tid) && same_call(nvl, tid, block);
      }
      if (!__syncthreads_and(ok)) return;
      for (int64_t t = t0 + warp; t < end; t += kDataWarps) {
        const uint8_t* sources[kMaxNvlRanks];
        const uint8_t* weight_sources[kMaxNvlRanks];
        int num_sources = 0;
        for (int r = 0; r < num_ranks; ++r) {
          const int row = a.send_head[t * num_ranks + r];
          if (row < 0) continue;
          if (r == me) {
            sources[num_sources] = a.x + row * row_bytes;
            weight_sources[num_sources] = a.topk_weights + row * weight_row;
          } else {
            const uint8_t* slot = st.slot(nvl.local, r, recv_round[r], t - window * per_window);
            sources[num_sources] = slot;
            weight_sources[num_sources] = slot + weights_offset;
          }
          ++num_sources;
        }
        reduce_token<T>(a, t, sources, weight_sources, num_sources, lane);
      }
      __syncthreads();
      if (holds) {
        ctl->received[tid][block] = recv_round[tid];
        store_release(&control(peer_base[tid])->consumed[me][block], recv_round[tid]);
      }
    }
    __syncthreads();
  }
}

}  // namespace intranode

size_t intranode_control_bytes() { return kControlBytes; }

namespace {
bool notify_fits(const Intranode& nvl, const DispatchLayoutArgs& args) {
  return nvl.num_ranks <= kMaxNvlRanks && args.num_channels <= kMaxChannels &&
         nvl.num_ranks + args.num_channels + args.num_experts / nvl.num_ranks <=
             kMaxNotifyInts - kNotifyMetaInts;
}
}  // namespace

cudaError_t launch_dispatch_notify(const Intranode& nvl, const DispatchLayoutArgs& args,
                                   cudaStream_t stream) {
  if (!notify_fits(nvl, args)) return cudaErrorInvalidValue;
  intranode::notify<<<nvl.num_ranks, kThreads, 0, stream>>>(nvl, args);
  return cudaGetLastError();
}

int64_t dispatch_slot_bytes(const DispatchDataArgs& args) { return slot_layout(args).bytes; }

int intranode_rows_per_block(const Intranode& nvl, int64_t slot_bytes, int num_blocks) {
  return staging_of(nvl.data_bytes, nvl.num_ranks, slot_bytes, num_blocks).rows_per_block;
}

cudaError_t launch_dispatch_data(const Intranode& nvl, const DispatchDataArgs& args,
                                 int num_blocks, cudaStream_t stream,
                                 const DispatchLayoutArgs* notify) {
  const intranode::Staging st =
      staging_of(nvl.data_bytes, nvl.num_ranks, slot_layout(args).bytes, num_blocks);
  if (st.rows_per_block < 1 || num_blocks > kMaxBlocks) return cudaErrorInvalidValue;
  if (args.notify_here && (notify == nullptr || num_blocks < nvl.num_ranks || !notify_fits(nvl, *notify)))
    return cudaErrorInvalidValue;
  using intranode::dispatch;
  const DispatchLayoutArgs none{};
  if (args.notify_here) {
    dispatch<intranode::kCountsHere><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st, *notify);
  } else if (args.handle_rank_prefix) {
    dispatch<intranode::kCountsFromHandle><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st, none);
  } else {
    dispatch<intranode::kCountsFromNotify><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st, none);
  }
  return cudaGetLastError();
}

int intranode_resident_blocks_per_sm() {
  static const int per_sm = [] {
    int least = 1 << 30;
    auto take = [&](const void* kernel) {
      int blocks = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kDataThreads, 0) ==
          cudaSuccess)
        least = std::min(least, blocks);
    };
    take(reinterpret_cast<const void*>(intranode::dispatch<intranode::kCountsFromNotify>));
    take(reinterpret_cast<const void*>(intranode::dispatch<intranode::kCountsHere>));
    take(reinterpret_cast<const void*>(intranode::dispatch<intranode::kCountsFromHandle>));
    take(reinterpret_cast<const void*>(intranode::combine<__nv_bfloat16>));
    take(reinterpret_cast<const void*>(intranode::combine<__half>));
    take(reinterpret_cast<const void*>(intranode::combine<float>));
    take(reinterpret_cast<const void*>(intranode::combine<double>));
    return least == (1 << 30) ? 1 : std::max(1, least);
  }();
  return per_sm;
}

int64_t combine_slot_bytes(const CombineArgs& args) {
  static const int kElement[] = {2, 2, 4, 8};
  const int64_t weights = combine_weights_offset(args, kElement[args.kind]);
  return (weights + int64_t(args.num_topk) * args.weight_bytes + 15) / 16 * 16;
}

cudaError_t launch_combine(const Intranode& nvl, const CombineArgs& args, int num_blocks,
                           cudaStream_t stream) {
  const intranode::Staging st =
      staging_of(nvl.data_bytes, nvl.num_ranks, combine_slot_bytes(args), num_blocks);
  if (st.rows_per_block < 1 || num_blocks > kMaxBlocks) return cudaErrorInvalidValue;
  using intranode::combine;
  switch (args.kind) {
    case kBFloat16: combine<__nv_bfloat16><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st); break;
    case kFloat16: combine<__half><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st); break;
    case kFloat32: combine<float><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st); break;
    case kFloat64: combine<double><<<num_blocks, kDataThreads, 0, stream>>>(nvl, args, st); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
