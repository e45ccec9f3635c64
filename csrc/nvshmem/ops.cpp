// The op kernels of the low-latency NVSHMEM kernels (libdeep_ep_ops_nvshmem, no Python in it):
// argument checks, output allocation, launch on the current stream, and registration for the
// CUDA dispatch key of the deep_ep ops, whose schemas the library defines when loaded if nothing
// did (csrc/ops.h). The NVSHMEM runtimes by buffer name live here: the Python bindings
// (csrc/nvshmem/python.cpp, deep_ep_ops._C_nvshmem) reach them through csrc/nvshmem/bridge.h.
// Calls the kernels do not take (no NVSHMEM runtime for the buffer, x not bfloat16, hidden not a
// multiple of 8, top-k above 16, more than 1024 tokens per rank, more than 64 ranks or 8192 rows
// per expert) go to the Python package's reference backend when it set the hook, else raise.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "generated/build_id.h"  // written by setup.py
#include "autograd.h"
#include "nvshmem/api.h"
#include "nvshmem/bridge.h"
#include "nvshmem/internode.h"
#include "nvshmem/runtime.h"
#include "ops.h"
#include "torch_common.h"

namespace deep_ep_ops {
namespace {

auto& runtimes = *new RuntimeRegistry<LowLatencyRuntime>();  // leaked: see RuntimeRegistry


// Raise (once) an error a kernel reported since the last call; returns the device word.
int* checked_error_word(const std::string& op, int device) {
  const DeviceReport report = take_device_report(device);
  if (report.code != kErrorNone) {
    const std::string where = std::string(op_name(report.op)) + " on cuda:" + num(device);
    TORCH_CHECK_VALUE(report.code != kErrorExpertOutOfRange, "deep_ep::", op,
                      ": an earlier low-latency call on cuda:", num(device), " saw topk_idx entry ",
                      num(report.value), " outside [-1, num_experts); it was treated as -1");
    TORCH_CHECK_VALUE(report.code != kErrorDisagree, where, ": the ranks disagree on use_fp8 "
                      "(rank ", num(report.peer), ": ", report.value & 1 ? "True" : "False",
                      ", rank ", num(report.value >> 8), ": ", report.value & 1 ? "False" : "True",
                      "); that call's outputs are invalid; every rank must pass the same");
    TORCH_CHECK_VALUE(report.code != kErrorBadHandle, where, ": token ", num(report.value),
                      " of rank ", num(report.peer), " is routed to an expert here that the "
                      "handle holds no row for: topk_idx does not match the dispatch of the handle");
    if (report.code == kErrorTimeout) {
      runtimes.mark_broken(device);
      TORCH_CHECK(false, where, ": timed out after ", num(report.value), " s waiting for rank ",
                  num(report.peer), " (it never reached the matching call); every low-latency "
                  "buffer on this device is unusable now. Set DEEP_EP_OPS_TIMEOUT_S to change "
                  "the limit.");
    }
    TORCH_CHECK(false, "deep_ep::", op, ": an earlier kernel reported error code ",
                num(report.code));
  }
  return error_word(device).device;
}

LowLatencyRuntime* find_runtime(const std::string& name) { return runtimes.find(name); }

// --- argument checks (mirror meta/__init__.py) -----------------------------------------------

int64_t check_low_latency(const at::Tensor& topk_idx, int64_t num_ranks, int64_t num_max,
                          int64_t num_experts) {
  check_tensor(topk_idx, "topk_idx", 2, {at::kLong});
  TORCH_CHECK_VALUE(num_ranks >= 1, "num_ranks must be >= 1, got ", num(num_ranks));
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts % num_ranks == 0, "num_experts (",
                    num(num_experts), ") must be a positive multiple of num_ranks (",
                    num(num_ranks), ")");
  TORCH_CHECK_VALUE(num_max >= 1, "num_max_dispatch_tokens_per_rank must be >= 1, got ",
                    num(num_max));
  TORCH_CHECK_VALUE(topk_idx.size(0) <= num_max, "topk_idx has ", num(topk_idx.size(0)),
                    " tokens, more than num_max_dispatch_tokens_per_rank (", num(num_max), ")");
  return num_experts / num_ranks;
}

void check_handle(const at::Tensor& src_info, const at::Tensor& layout_range, int64_t num_ranks,
                  int64_t num_max, int64_t num_local) {
  check_tensor(src_info, "handle.src_info", 2, {at::kInt});
  check_tensor(layout_range, "handle.layout_range", 2, {at::kLong});
  TORCH_CHECK_VALUE(src_info.size(0) == num_local && src_info.size(1) == num_ranks * num_max,
                    "handle.src_info must have shape (", num(num_local), ", ",
                    num(num_ranks * num_max), "), got ", shape(src_info),
                    ": handle does not match num_max_dispatch_tokens_per_rank / num_experts / "
                    "num_ranks");
  TORCH_CHECK_VALUE(layout_range.size(0) == num_local && layout_range.size(1) == num_ranks,
                    "handle.layout_range must have shape (", num(num_local), ", ",
                    num(num_ranks), "), got ", shape(layout_range));
}

const std::initializer_list<at::ScalarType> kFloats = {at::kBFloat16, at::kHalf, at::kFloat,
                                                       at::kDouble};

// The runtime for a kernel call on `buffer`, or nullptr where the reference must run. Pins the
// call shape (num_max, hidden, num_experts) of the buffer's kernel region.
// The symmetric bytes a call of these shapes needs: the zero-copy combine rows, then the
// kernels' region (config.get_low_latency_rdma_size_hint; test_cuda_direct holds them equal).
int64_t low_latency_bytes_needed(int64_t num_max, int64_t hidden, int64_t num_ranks,
                                 int64_t num_experts) {
  const int64_t zero_copy = (num_experts * num_max * 2 * hidden + 127) / 128 * 128;
  return zero_copy + low_latency_layout(static_cast<int>(num_ranks), static_cast<int>(num_max),
                                        static_cast<int>(hidden)).bytes;
}

// The ranks' agreement on the shapes a buffer is pinned to (reference.agree_on_pinned_shapes,
// through the hook the Python bindings set): one exchange over the buffer's own group at the
// pinning call only (the first since creation or clean_low_latency_buffer), none on later calls.
// Leaked like the hooks.
PinAgreement& pin_agreement() {
  static auto& fn = *new PinAgreement();
  return fn;
}

// Raises on every rank when the ranks pin different shapes (a ValueError naming the argument
// and each rank's value); a failed exchange (timeout, a peer gone) leaves the buffer broken.
void agree_on_pinned_shapes(const char* op, const std::string& buffer, LowLatencyRuntime& runtime,
                            int64_t num_max, int64_t hidden, int64_t num_experts) {
  if (!pin_agreement()) return;
  try {
    pin_agreement()(op, buffer, num_max, hidden, num_experts);
  } catch (const c10::ValueError&) {
    throw;
  } catch (...) {
    runtime.broken = true;
    throw;
  }
}

LowLatencyRuntime* runtime_for(const char* op, const std::string& buffer, const at::Tensor& x,
                               int64_t hidden, int64_t num_topk, int64_t num_ranks,
                               int64_t num_max, int64_t num_experts) {
  LowLatencyRuntime* runtime = find_runtime(buffer);
  if (runtime == nullptr) return nullptr;
  check_runtime(op, buffer, *runtime, x, num_ranks);
  if (x.scalar_type() != at::kBFloat16 || hidden % 8 != 0 || num_topk > kLowLatencyMaxTopk ||
      num_max > kLowLatencyMaxTokens || num_ranks > kLowLatencyMaxRanks ||
      num_ranks * num_max > kLowLatencyMaxMembers)
    return nullptr;
  if (runtime->num_max_tokens == 0) {
    agree_on_pinned_shapes(op, buffer, *runtime, num_max, hidden, num_experts);
    runtime->num_max_tokens = static_cast<int>(num_max);
    runtime->hidden = static_cast<int>(hidden);
    runtime->num_experts = static_cast<int>(num_experts);
  }
  TORCH_CHECK_VALUE(
      runtime->num_max_tokens == num_max && runtime->hidden == hidden &&
          runtime->num_experts == num_experts,
      "deep_ep::", op, ": buffer ", buffer, " serves num_max_dispatch_tokens_per_rank=",
      num(runtime->num_max_tokens), ", hidden=", num(runtime->hidden), ", num_experts=",
      num(runtime->num_experts), " (fixed by its first low-latency call), got ", num(num_max),
      ", ", num(hidden), ", ", num(num_experts),
      "; call clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts) "
      "on every rank to switch");
  const int64_t needed = low_latency_bytes_needed(num_max, hidden, num_ranks, num_experts);
  TORCH_CHECK_VALUE(needed <= runtime->bytes, "deep_ep::", op, ": buffer '", buffer,
                    "' has num_rdma_bytes=", num(runtime->bytes), " but num_max_dispatch_tokens_"
                    "per_rank=", num(num_max), ", hidden=", num(hidden), ", num_experts=",
                    num(num_experts), " need ", num(needed), " (get_low_latency_rdma_size_hint)");
  return runtime;
}

LowLatency view_for(const LowLatencyRuntime& runtime, const std::string& op, int kind) {
  int* error = checked_error_word(op, runtime.device);
  const int sms = usable_sms(runtime.device);
  return runtime.view(runtime.num_max_tokens, runtime.hidden, error, kind, sms);
}

using DispatchOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Outputs as meta.new_low_latency_dispatch_outputs: scales [L, R*M, S] column-major in the last
// two dims (S = 0 for BF16).
DispatchOutputs new_dispatch_outputs(const at::Tensor& x, int64_t num_ranks, int64_t num_max,
                                     int64_t num_local, bool use_fp8, bool use_ue8m0) {
  const int64_t rows = num_ranks * num_max, hidden = x.size(1);
  const int64_t columns = use_fp8 ? (use_ue8m0 ? hidden / 512 : hidden / 128) : 0;
  const auto options = x.options();
  // scales [L, rows, columns], column-major in the last two dims (strides: no transpose call).
  auto [scales, count, src_info, layout_range] = empty_small<4>(options, {{
      {{num_local, rows, columns}, use_ue8m0 ? at::kInt : at::kFloat, {columns * rows, 1, rows}},
      {{num_local}, at::kInt}, {{num_local, rows}, at::kInt},
      {{num_local, num_ranks}, at::kLong}}});
  return {
      at::empty({num_local, rows, hidden}, options.dtype(use_fp8 ? at::kFloat8_e4m3fn : x.scalar_type())),
      scales, count, src_info, layout_range,
  };
}

void check_dispatch(const at::Tensor& x, const at::Tensor& topk_idx, int64_t num_ranks,
                    int64_t num_max, int64_t num_experts, bool use_fp8, bool round_scale,
                    bool use_ue8m0) {
  check_low_latency(topk_idx, num_ranks, num_max, num_experts);
  check_tensor(x, "x", 2, kFloats);
  TORCH_CHECK_VALUE(x.size(0) == topk_idx.size(0), "x.size(0) must equal topk_idx.size(0) (",
                    num(topk_idx.size(0)), "), got shape ", shape(x));
  if (use_fp8) {
    TORCH_CHECK_VALUE(x.size(1) % 128 == 0, "hidden (", num(x.size(1)),
                      ") must be a multiple of 128 for the FP8 cast");
    if (use_ue8m0) {
      TORCH_CHECK_VALUE(round_scale, "use_ue8m0=True requires round_scale=True");
      TORCH_CHECK_VALUE(x.size(1) % 512 == 0, "hidden (", num(x.size(1)),
                        ") must be a multiple of 512 for UE8M0 scales");
    }
  } else {
    TORCH_CHECK_VALUE(!use_ue8m0 && !round_scale, "round_scale/use_ue8m0 need use_fp8=True");
  }
}

LowLatencyDispatchSend dispatch_send_args(const at::Tensor& x, const at::Tensor& topk,
                                          int64_t num_experts, bool use_fp8, bool round_scale) {
  LowLatencyDispatchSend args{};
  args.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  args.topk_idx = topk.data_ptr<int64_t>();
  args.num_tokens = static_cast<int>(topk.size(0));
  args.num_topk = static_cast<int>(topk.size(1));
  args.num_experts = static_cast<int>(num_experts);
  args.use_fp8 = use_fp8;
  args.round_scale = round_scale;
  return args;
}

LowLatencyDispatchRecv dispatch_recv_args(const at::Tensor& recv_x, const at::Tensor& recv_x_scales,
                                          const at::Tensor& recv_count, const at::Tensor& src_info,
                                          const at::Tensor& layout_range,
                                          const c10::optional<at::Tensor>& stats) {
  const bool use_fp8 = recv_x.scalar_type() == at::kFloat8_e4m3fn;
  // The receive writes straight into the outputs: they must have the layout the send half
  // allocated.
  TORCH_CHECK_VALUE(recv_x.is_contiguous() && src_info.is_contiguous() &&
                        recv_count.is_contiguous() && layout_range.is_contiguous(),
                    "low_latency_dispatch_recv: the outputs of low_latency_dispatch_send must be "
                    "passed unchanged");
  TORCH_CHECK_VALUE(!use_fp8 || recv_x_scales.transpose(1, 2).is_contiguous(),
                    "low_latency_dispatch_recv: recv_x_scales must be column-major as allocated "
                    "by low_latency_dispatch_send");
  LowLatencyDispatchRecv args{};
  args.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
  args.recv_x_scales = use_fp8 ? recv_x_scales.data_ptr() : nullptr;
  args.recv_count = recv_count.data_ptr<int>();
  args.src_info = src_info.data_ptr<int>();
  args.layout_range = layout_range.data_ptr<int64_t>();
  args.cumulative_stats = stats ? stats->data_ptr<int>() : nullptr;
  args.num_local_experts = static_cast<int>(recv_x.size(0));
  args.use_fp8 = use_fp8;
  args.use_ue8m0 = recv_x_scales.scalar_type() == at::kInt;
  return args;
}

// The kernels add the received counts to the statistics in place.
void check_stats(const at::Tensor& stats, int64_t num_local) {
  check_tensor(stats, "cumulative_local_expert_recv_stats", 1, {at::kInt});
  TORCH_CHECK_VALUE(stats.size(0) == num_local && stats.is_contiguous(),
                    "cumulative_local_expert_recv_stats must be a contiguous (", num(num_local),
                    ",) tensor, got shape ", shape(stats));
}

DispatchOutputs dispatch_impl(const char* op, bool split, const at::Tensor& x,
                              const at::Tensor& topk_idx, const std::string& buffer,
                              int64_t num_ranks, int64_t num_max, int64_t num_experts,
                              bool use_fp8, bool round_scale, bool use_ue8m0,
                              const c10::optional<at::Tensor>& stats) {
  HostTrace trace(op);
  check_dispatch(x, topk_idx, num_ranks, num_max, num_experts, use_fp8, round_scale, use_ue8m0);
  if (stats) check_stats(*stats, num_experts / num_ranks);
  LowLatencyRuntime* runtime = runtime_for(op, buffer, x, x.size(1), topk_idx.size(1), num_ranks,
                                           num_max, num_experts);
  if (runtime == nullptr) {
    if (LowLatencyRuntime* r = find_runtime(buffer); split && r != nullptr)
      r->pending_dispatch.push_back(false);
    DispatchOutputs out = call_fallback<DispatchOutputs>(
        op, x, topk_idx, buffer, num_ranks, num_max, num_experts, use_fp8, round_scale, use_ue8m0);
    if (stats) stats->add_(std::get<2>(out));
    return out;
  }
  trace.mark("checks");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(runtime->device);
  DispatchOutputs out = new_dispatch_outputs(x, num_ranks, num_max, num_experts / num_ranks,
                                             use_fp8, use_ue8m0);
  trace.mark("output allocations");
  const LowLatency ll = view_for(*runtime, op, kOpLowLatencyDispatch);
  const at::Tensor xc = x.contiguous(), topk = topk_idx.contiguous();
  const LowLatencyDispatchSend send = dispatch_send_args(xc, topk, num_experts, use_fp8, round_scale);
  trace.mark("arguments");
  if (split) {
    C10_CUDA_CHECK(launch_low_latency_dispatch_send(ll, send, stream));
    runtime->pending_dispatch.push_back(true);
  } else {
    const LowLatencyDispatchRecv recv =
        dispatch_recv_args(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
                           std::get<4>(out), stats);
    C10_CUDA_CHECK(launch_low_latency_dispatch(ll, send, recv, stream));
  }
  trace.mark("launch");
  return out;
}

DispatchOutputs low_latency_dispatch_unchecked(const at::Tensor& x, const at::Tensor& topk_idx,
                                     const std::string& buffer, int64_t num_ranks,
                                     int64_t num_max, int64_t num_experts, bool use_fp8,
                                     bool round_scale, bool use_ue8m0) {
  return dispatch_impl("low_latency_dispatch", false, x, topk_idx, buffer, num_ranks, num_max,
                       num_experts, use_fp8, round_scale, use_ue8m0, c10::nullopt);
}

constexpr char kLowLatencyDispatchName[] = "low_latency_dispatch";
constexpr auto low_latency_dispatch =
    &Checked<kLowLatencyDispatchName, &low_latency_dispatch_unchecked>::call;

DispatchOutputs low_latency_dispatch_with_stats(const at::Tensor& x, const at::Tensor& topk_idx,
                                                const std::string& buffer, int64_t num_ranks,
                                                int64_t num_max, int64_t num_experts,
                                                bool use_fp8, bool round_scale, bool use_ue8m0,
                                                const c10::optional<at::Tensor>& stats) {
  try {
    return dispatch_impl("low_latency_dispatch", false, x, topk_idx, buffer, num_ranks, num_max,
                         num_experts, use_fp8, round_scale, use_ue8m0, stats);
  } catch (const c10::Error& error) {  // worded as low_latency_dispatch's check (Checked)
    if (dynamic_cast<const c10::ValueError*>(&error) || dynamic_cast<const c10::TypeError*>(&error))
      raise_python_check("low_latency_dispatch", x, topk_idx, buffer, num_ranks, num_max,
                         num_experts, use_fp8, round_scale, use_ue8m0);
    throw;
  }
}

DispatchOutputs low_latency_dispatch_send_unchecked(const at::Tensor& x, const at::Tensor& topk_idx,
                                          const std::string& buffer, int64_t num_ranks,
                                          int64_t num_max, int64_t num_experts, bool use_fp8,
                                          bool round_scale, bool use_ue8m0) {
  return dispatch_impl("low_latency_dispatch_send", true, x, topk_idx, buffer, num_ranks,
                       num_max, num_experts, use_fp8, round_scale, use_ue8m0, c10::nullopt);
}

constexpr char kLowLatencyDispatchSendName[] = "low_latency_dispatch_send";
constexpr auto low_latency_dispatch_send =
    &Checked<kLowLatencyDispatchSendName, &low_latency_dispatch_send_unchecked>::call;

// Whether the oldest pending send half of `queue` ran on the kernels (false: the reference).
bool take_pending(std::deque<bool>& queue, const char* op, const std::string& buffer) {
  TORCH_CHECK_VALUE(!queue.empty(), "deep_ep::", op, ": buffer ", buffer,
                    " has no send half waiting for this receive (call the matching _send op "
                    "first, once per receive)");
  const bool kernels = queue.front();
  queue.pop_front();
  return kernels;
}

void low_latency_dispatch_recv_unchecked(const at::Tensor& recv_x, const at::Tensor& recv_x_scales,
                               const at::Tensor& recv_count, const at::Tensor& src_info,
                               const at::Tensor& layout_range,
                               const c10::optional<at::Tensor>& stats,
                               const std::string& buffer) {
  const char* op = "low_latency_dispatch_recv";
  if (stats) check_stats(*stats, recv_count.size(0));
  LowLatencyRuntime* runtime = find_runtime(buffer);
  const bool kernels = runtime != nullptr && !runtime->pending_dispatch.empty() &&
                       runtime->pending_dispatch.front();
  // Checked before the pending send is taken: a rejected call leaves it for the right one.
  const LowLatencyDispatchRecv args =
      kernels ? dispatch_recv_args(recv_x, recv_x_scales, recv_count, src_info, layout_range, stats)
              : LowLatencyDispatchRecv{};
  if (runtime == nullptr || !take_pending(runtime->pending_dispatch, op, buffer)) {
    call_fallback<void>(op, recv_x, recv_x_scales, recv_count, src_info, layout_range, stats,
                        buffer);
    return;
  }
  const c10::cuda::CUDAGuard guard(recv_x.device());
  const LowLatency ll = view_for(*runtime, op, kOpLowLatencyDispatch);
  C10_CUDA_CHECK(launch_low_latency_dispatch_recv(ll, args,
                                                  at::cuda::getCurrentCUDAStream(runtime->device)));
}

constexpr char kLowLatencyDispatchRecvName[] = "low_latency_dispatch_recv";
constexpr auto low_latency_dispatch_recv =
    &Checked<kLowLatencyDispatchRecvName, &low_latency_dispatch_recv_unchecked>::call;

// --- combine ----------------------------------------------------------------------------------

void check_combine(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                   const at::Tensor& src_info, const at::Tensor& layout_range, int64_t num_ranks,
                   int64_t num_max, int64_t num_experts) {
  const int64_t num_local = check_low_latency(topk_idx, num_ranks, num_max, num_experts);
  check_handle(src_info, layout_range, num_ranks, num_max, num_local);
  check_tensor(x, "x", 3, kFloats);
  TORCH_CHECK_VALUE(x.size(0) == num_local && x.size(1) == num_ranks * num_max,
                    "x must have shape (num_local_experts, num_ranks * "
                    "num_max_dispatch_tokens_per_rank, hidden) = (", num(num_local), ", ",
                    num(num_ranks * num_max), ", hidden), got ", shape(x));
  check_tensor(topk_weights, "topk_weights", 2, {at::kFloat, at::kDouble});
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_idx.sizes(),
                    "topk_weights must have the shape of topk_idx ", shape(topk_idx), ", got ",
                    shape(topk_weights));
}

// The tensors a combine send reads, kept alive (contiguous copies) for the launch.
struct CombineInputs {
  at::Tensor x, topk, weights, info, range;
  LowLatencyCombineSend args() const {
    LowLatencyCombineSend a{};
    a.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
    a.src_info = info.data_ptr<int>();
    a.layout_range = range.data_ptr<int64_t>();
    a.topk_idx = topk.data_ptr<int64_t>();
    a.topk_weights = weights.data_ptr<float>();
    a.num_tokens = static_cast<int>(topk.size(0));
    a.num_topk = static_cast<int>(topk.size(1));
    a.num_local_experts = static_cast<int>(x.size(0));
    return a;
  }
};

CombineInputs combine_inputs(const at::Tensor& x, const at::Tensor& topk_idx,
                             const at::Tensor& topk_weights, const at::Tensor& src_info,
                             const at::Tensor& layout_range) {
  return {x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous(), src_info.contiguous(),
          layout_range.contiguous()};
}

LowLatencyCombineRecv combine_recv_args(const LowLatencyRuntime& runtime,
                                        const at::Tensor& combined_x, const at::Tensor& topk) {
  LowLatencyCombineRecv args{};
  args.combined_x = reinterpret_cast<uint16_t*>(combined_x.data_ptr());
  args.topk_idx = topk.data_ptr<int64_t>();
  args.num_tokens = static_cast<int>(topk.size(0));
  args.num_topk = static_cast<int>(topk.size(1));
  args.num_local_experts = runtime.num_experts / runtime.num_ranks;
  return args;
}

// The kernels' runtime for a combine call, or nullptr (reference).
LowLatencyRuntime* combine_runtime(const char* op, const std::string& buffer, const at::Tensor& x,
                                   const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                   int64_t num_ranks, int64_t num_max, int64_t num_experts) {
  if (topk_weights.scalar_type() != at::kFloat) return nullptr;
  return runtime_for(op, buffer, x, x.size(2), topk_idx.size(1), num_ranks, num_max, num_experts);
}

// combine into `out` (a contiguous [num_tokens, hidden] bfloat16 tensor) with the kernels.
void combine_kernels(LowLatencyRuntime& runtime, const at::Tensor& x, const at::Tensor& topk_idx,
                     const at::Tensor& topk_weights, const at::Tensor& src_info,
                     const at::Tensor& layout_range, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LowLatency ll = view_for(runtime, "low_latency_combine", kOpLowLatencyCombine);
  const CombineInputs inputs = combine_inputs(x, topk_idx, topk_weights, src_info, layout_range);
  C10_CUDA_CHECK(launch_low_latency_combine(ll, inputs.args(),
                                            combine_recv_args(runtime, out, inputs.topk),
                                            at::cuda::getCurrentCUDAStream(runtime.device)));
}

at::Tensor low_latency_combine_unchecked(const at::Tensor& x, const at::Tensor& topk_idx,
                               const at::Tensor& topk_weights, const at::Tensor& src_info,
                               const at::Tensor& layout_range, const std::string& buffer,
                               int64_t num_ranks, int64_t num_max, int64_t num_experts,
                               bool zero_copy) {
  const char* op = "low_latency_combine";
  HostTrace trace(op);
  check_combine(x, topk_idx, topk_weights, src_info, layout_range, num_ranks, num_max, num_experts);
  LowLatencyRuntime* runtime =
      combine_runtime(op, buffer, x, topk_idx, topk_weights, num_ranks, num_max, num_experts);
  if (runtime == nullptr)
    return call_fallback<at::Tensor>(op, x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                     num_ranks, num_max, num_experts, zero_copy);
  trace.mark("checks");
  at::Tensor out = at::empty({topk_idx.size(0), x.size(2)}, x.options());
  combine_kernels(*runtime, x, topk_idx, topk_weights, src_info, layout_range, out);
  trace.mark("allocation, launch");
  return out;
}

constexpr char kLowLatencyCombineName[] = "low_latency_combine";
constexpr auto low_latency_combine =
    &Checked<kLowLatencyCombineName, &low_latency_combine_unchecked>::call;

void low_latency_combine_out_unchecked(const at::Tensor& x, const at::Tensor& topk_idx,
                             const at::Tensor& topk_weights, const at::Tensor& src_info,
                             const at::Tensor& layout_range, const std::string& buffer,
                             int64_t num_ranks, int64_t num_max, int64_t num_experts,
                             bool zero_copy, const at::Tensor& out) {
  const char* op = "low_latency_combine_out";
  check_combine(x, topk_idx, topk_weights, src_info, layout_range, num_ranks, num_max, num_experts);
  check_tensor(out, "out", 2, {x.scalar_type()});
  TORCH_CHECK_VALUE(out.size(0) == topk_idx.size(0) && out.size(1) == x.size(2),
                    "out must have shape (num_tokens, hidden) = (", num(topk_idx.size(0)), ", ",
                    num(x.size(2)), "), got ", shape(out));
  LowLatencyRuntime* runtime =
      combine_runtime(op, buffer, x, topk_idx, topk_weights, num_ranks, num_max, num_experts);
  if (runtime == nullptr) {
    call_fallback<void>(op, x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks,
                        num_max, num_experts, zero_copy, out);
    return;
  }
  if (out.is_contiguous()) {
    combine_kernels(*runtime, x, topk_idx, topk_weights, src_info, layout_range, out);
  } else {
    at::Tensor combined = at::empty(out.sizes(), out.options());
    combine_kernels(*runtime, x, topk_idx, topk_weights, src_info, layout_range, combined);
    out.copy_(combined);
  }
}

constexpr char kLowLatencyCombineOutName[] = "low_latency_combine_out";
constexpr auto low_latency_combine_out =
    &Checked<kLowLatencyCombineOutName, &low_latency_combine_out_unchecked>::call;

at::Tensor low_latency_combine_send_unchecked(const at::Tensor& x, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_weights, const at::Tensor& src_info,
                                    const at::Tensor& layout_range, const std::string& buffer,
                                    int64_t num_ranks, int64_t num_max, int64_t num_experts,
                                    bool zero_copy) {
  const char* op = "low_latency_combine_send";
  check_combine(x, topk_idx, topk_weights, src_info, layout_range, num_ranks, num_max, num_experts);
  LowLatencyRuntime* runtime =
      combine_runtime(op, buffer, x, topk_idx, topk_weights, num_ranks, num_max, num_experts);
  if (runtime == nullptr) {
    if (LowLatencyRuntime* r = find_runtime(buffer)) r->pending_combine.push_back(false);
    return call_fallback<at::Tensor>(op, x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                     num_ranks, num_max, num_experts, zero_copy);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const LowLatency ll = view_for(*runtime, op, kOpLowLatencyCombine);
  const CombineInputs inputs = combine_inputs(x, topk_idx, topk_weights, src_info, layout_range);
  C10_CUDA_CHECK(launch_low_latency_combine_send(ll, inputs.args(),
                                                 at::cuda::getCurrentCUDAStream(runtime->device)));
  runtime->pending_combine.push_back(true);
  return at::empty({topk_idx.size(0), x.size(2)}, x.options());
}

constexpr char kLowLatencyCombineSendName[] = "low_latency_combine_send";
constexpr auto low_latency_combine_send =
    &Checked<kLowLatencyCombineSendName, &low_latency_combine_send_unchecked>::call;

void low_latency_combine_recv_unchecked(const at::Tensor& combined_x, const at::Tensor& topk_idx,
                              const at::Tensor& topk_weights, const std::string& buffer) {
  const char* op = "low_latency_combine_recv";
  LowLatencyRuntime* runtime = find_runtime(buffer);
  if (runtime != nullptr && !runtime->pending_combine.empty() && runtime->pending_combine.front()) {
    // Checked before the pending send is taken: a rejected call leaves it for the right one.
    check_tensor(topk_idx, "topk_idx", 2, {at::kLong});
    check_tensor(combined_x, "combined_x", 2, {at::kBFloat16});
    TORCH_CHECK_VALUE(combined_x.is_contiguous() && combined_x.size(0) == topk_idx.size(0) &&
                          combined_x.size(1) == runtime->hidden,
                      "low_latency_combine_recv: combined_x must be the tensor "
                      "low_latency_combine_send returned, got shape ", shape(combined_x));
  }
  if (runtime == nullptr || !take_pending(runtime->pending_combine, op, buffer)) {
    call_fallback<void>(op, combined_x, topk_idx, topk_weights, buffer);
    return;
  }
  const c10::cuda::CUDAGuard guard(combined_x.device());
  const LowLatency ll = view_for(*runtime, op, kOpLowLatencyCombine);
  const at::Tensor topk = topk_idx.contiguous();
  C10_CUDA_CHECK(launch_low_latency_combine_recv(ll, combine_recv_args(*runtime, combined_x, topk),
                                                 at::cuda::getCurrentCUDAStream(runtime->device)));
}

constexpr char kLowLatencyCombineRecvName[] = "low_latency_combine_recv";
constexpr auto low_latency_combine_recv =
    &Checked<kLowLatencyCombineRecvName, &low_latency_combine_recv_unchecked>::call;

// Collective reset: every rank's kernel state back to zero, the pinned shape forgotten.
void clean_low_latency_buffer_unchecked(const at::Tensor& workspace, const std::string& buffer,
                              int64_t num_max, int64_t hidden, int64_t num_experts) {
  const char* op = "clean_low_latency_buffer";
  LowLatencyRuntime* runtime = find_runtime(buffer);
  if (runtime == nullptr) {
    call_fallback<void>(op, workspace, buffer, num_max, hidden, num_experts);
    return;
  }
  TORCH_CHECK(!runtime->broken, "deep_ep::", op, ": buffer ", buffer,
              " is unusable after a timeout or a failed call; destroy it and create a new one");
  const c10::cuda::CUDAGuard guard(workspace.device());
  checked_error_word(op, runtime->device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(runtime->device);
  C10_CUDA_CHECK(runtime->clean(stream));
  // The op declares `workspace` mutated (the buffer's memory); another tensor is zeroed too.
  if (workspace.data_ptr() != runtime->memory) workspace.zero_();
  runtime->num_max_tokens = runtime->hidden = runtime->num_experts = 0;
  runtime->pending_dispatch.clear();
  runtime->pending_combine.clear();
}

constexpr char kCleanLowLatencyBufferName[] = "clean_low_latency_buffer";
constexpr auto clean_low_latency_buffer =
    &Checked<kCleanLowLatencyBufferName, &clean_low_latency_buffer_unchecked>::call;

// --- autograd of the eager fast path (csrc/autograd.h; formulas as deep_ep_ops/_autograd.py) --

using OptTensor = c10::optional<at::Tensor>;

// What every low-latency backward keeps besides tensors.
struct LowLatencyArgs {
  std::string buffer;
  int64_t num_ranks, num_max, num_experts;

  NamedArgs named() const {
    return {{"buffer", buffer}, {"num_ranks", num_ranks},
            {"num_max_dispatch_tokens_per_rank", num_max}, {"num_experts", num_experts}};
  }
};

// BF16 low_latency_dispatch and its send half: grad x = the sum over the token's copies (a
// low-latency combine with weight 1 on the first occurrence of each expert). Kept: topk_idx,
// src_info, layout_range; the send half's src_info and layout_range without a version check
// (its receive completes them in place later).
struct LowLatencyDispatchBackward : public EagerBackward {
  LowLatencyArgs args;
  ZerosOf recv_x;
  at::ScalarType weight_dtype = at::kFloat;

  std::string name() const override {
    return "deep_ep_ops::LowLatencyDispatchFunctionBackward";
  }

  variable_list apply(variable_list&& grads) override {
    const std::vector<at::Tensor>& k = kept();
    const at::Tensor ones = first_occurrence(k[0]).to(weight_dtype);
    const auto out = call_op("low_latency_combine", with(
        {{"x", recv_x(grads[0])}, {"topk_idx", k[0]}, {"topk_weights", ones},
         {"src_info", k[1]}, {"layout_range", k[2]}, {"zero_copy", false}},
        args.named()));
    return {out[0].toTensor()};
  }

  static variable_list apply(const at::Tensor& x, const at::Tensor& topk_idx,
                             const OptTensor& stats, const std::string& buffer,
                             int64_t num_ranks, int64_t num_max, int64_t num_experts,
                             bool round_scale, bool use_ue8m0, bool send_only) {
    variable_list out = to_list(
        send_only ? low_latency_dispatch_send(x, topk_idx, buffer, num_ranks, num_max,
                                              num_experts, false, round_scale, use_ue8m0)
                  : low_latency_dispatch_with_stats(x, topk_idx, buffer, num_ranks, num_max,
                                                    num_experts, false, round_scale, use_ue8m0,
                                                    stats));
    auto node = make_node<LowLatencyDispatchBackward>();
    auto* self = static_cast<LowLatencyDispatchBackward*>(node.get());
    self->args = {buffer, num_ranks, num_max, num_experts};
    self->recv_x = ZerosOf(out[0]);
    self->weight_dtype = accumulation_dtype({x.scalar_type()});
    self->keep({topk_idx, out[3], out[4]}, send_only ? 2 : 0);
    record(node, {x}, {&out[0]});
    return out;
  }
};
using LowLatencyDispatchFunction = LowLatencyDispatchBackward;

// low_latency_combine and its send half: grad x = weighted low-latency cached dispatch of grad;
// grad topk_weights = <grad[t], x[e_k][slot(t, k)]> from a low-latency gather. Kept: x,
// topk_idx, topk_weights, src_info, layout_range.
struct LowLatencyCombineBackward : public EagerBackward {
  LowLatencyArgs args;
  ZerosOf combined;

  std::string name() const override { return "deep_ep_ops::LowLatencyCombineFunctionBackward"; }

  variable_list apply(variable_list&& grads) override {
    const std::vector<at::Tensor>& k = kept();
    const at::Tensor &x = k[0], &topk_idx = k[1], &topk_weights = k[2];
    const at::Tensor grad = combined(grads[0]);
    const NamedArgs routes{{"topk_idx", topk_idx}, {"src_info", k[3]}, {"layout_range", k[4]}};
    variable_list result(2);  // x, topk_weights
    if (should_compute_output(0))
      result[0] = call_op("low_latency_cached_dispatch", with(with(
          {{"x", grad}, {"topk_weights", topk_weights}}, routes), args.named()))[0].toTensor();
    if (should_compute_output(1)) {
      const at::Tensor rows =
          call_op("low_latency_gather", with(with({{"x", x}}, routes), args.named()))[0]
              .toTensor();
      const at::ScalarType acc = accumulation_dtype({x.scalar_type(), topk_weights.scalar_type()});
      const at::Tensor g = (rows.to(acc) * grad.to(acc).unsqueeze(1)).sum(-1);
      result[1] = at::where(topk_idx.ge(0), g, at::zeros({}, g.options()))
                      .to(topk_weights.scalar_type());
    }
    return result;
  }

  static at::Tensor apply(const at::Tensor& x, const at::Tensor& topk_idx,
                          const at::Tensor& topk_weights, const at::Tensor& src_info,
                          const at::Tensor& layout_range, const std::string& buffer,
                          int64_t num_ranks, int64_t num_max, int64_t num_experts,
                          bool zero_copy, bool send_only) {
    at::Tensor out =
        send_only ? low_latency_combine_send(x, topk_idx, topk_weights, src_info, layout_range,
                                             buffer, num_ranks, num_max, num_experts, zero_copy)
                  : low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                        num_ranks, num_max, num_experts, zero_copy);
    auto node = make_node<LowLatencyCombineBackward>();
    auto* self = static_cast<LowLatencyCombineBackward*>(node.get());
    self->args = {buffer, num_ranks, num_max, num_experts};
    self->combined = ZerosOf(out);
    self->keep({x, topk_idx, topk_weights, src_info, layout_range});
    record(node, {x, topk_weights}, {&out});
    return out;
  }
};
using LowLatencyCombineFunction = LowLatencyCombineBackward;

}  // namespace
}  // namespace deep_ep_ops

TORCH_LIBRARY_IMPL(deep_ep, CUDA, m) {
  m.impl("low_latency_dispatch", deep_ep_ops::low_latency_dispatch);
  m.impl("low_latency_dispatch_send", deep_ep_ops::low_latency_dispatch_send);
  m.impl("low_latency_dispatch_recv", deep_ep_ops::low_latency_dispatch_recv);
  m.impl("low_latency_combine", deep_ep_ops::low_latency_combine);
  m.impl("low_latency_combine_out", deep_ep_ops::low_latency_combine_out);
  m.impl("low_latency_combine_send", deep_ep_ops::low_latency_combine_send);
  m.impl("low_latency_combine_recv", deep_ep_ops::low_latency_combine_recv);
  m.impl("clean_low_latency_buffer", deep_ep_ops::clean_low_latency_buffer);
}

// --- what the front ends call (csrc/nvshmem/bridge.h) ----------------------------------------

namespace deep_ep_ops {

const char* ll_source_hash() { return kSourceHash; }

std::string nvshmem_unique_id_bytes() {
  const std::string id = nvshmem_unique_id();
  TORCH_CHECK(!id.empty(), "nvshmemx_get_uniqueid failed");
  return id;
}

void nvshmem_join_job(const std::string& id, int rank, int num_ranks, int device) {
  const std::string why = nvshmem_join(id, rank, num_ranks, device);
  TORCH_CHECK(why.empty(), "NVSHMEM initialisation failed: ", why);
}

at::Tensor ll_create(const std::string& name, int device, int64_t bytes, double timeout_s,
                     bool force_put) {
  TORCH_CHECK_VALUE(find_runtime(name) == nullptr, "buffer ", name, " already has a runtime");
  TORCH_CHECK_VALUE(nvshmem_world().second > 0, "NVSHMEM is not initialised");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  auto runtime = std::make_unique<LowLatencyRuntime>(
      name, device, bytes, static_cast<uint64_t>(timeout_s * 1e9), force_put);
  TORCH_CHECK(runtime->memory != nullptr, "buffer ", name, ": nvshmem_malloc of ", num(bytes),
              " bytes failed; raise NVSHMEM_SYMMETRIC_SIZE (set before the first low-latency "
              "Buffer)");
  at::Tensor memory = at::from_blob(
      runtime->memory, {bytes}, [](void*) {},
      at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  runtimes.add(name, std::move(runtime));
  return memory;
}

int ll_mapped_peers(const std::string& name) {
  LowLatencyRuntime* runtime = find_runtime(name);
  TORCH_CHECK_VALUE(runtime != nullptr, "buffer ", name, " has no low-latency runtime");
  return runtime->num_mapped_peers();
}

void ll_destroy(const std::string& name, bool free_memory) { runtimes.drop(name, free_memory); }

int64_t low_latency_buffer_bytes(int64_t num_max, int64_t hidden, int64_t num_ranks,
                                 int64_t num_experts) {
  return low_latency_bytes_needed(num_max, hidden, num_ranks, num_experts);
}

void ll_check_device_errors(int device) { checked_error_word("check_device_errors", device); }

void set_ll_fallback_hook(BoxedHook hook) { hooks().fallback = std::move(hook); }
void set_ll_check_hook(BoxedHook hook) { hooks().check = std::move(hook); }
void set_pin_agreement_hook(PinAgreement hook) { pin_agreement() = std::move(hook); }
std::map<std::string, std::pair<int64_t, double>> ll_host_trace_take() { return host_trace_take(); }
std::map<int, std::string> ll_op_names() { return op_names_by_id(); }

// --- the internode forward stage, on its own (development: tests/test_cuda_internode_forward.py)
//
// Runs the forward of docs/DESIGN.md section 5 on a buffer's symmetric memory (a low-latency
// buffer's, from its start: no low-latency call may use the buffer meanwhile) with
// `ranks_per_node` ranks per node, and returns (send_rdma_head [T, S], num_tokens_per_node [S],
// the layout's offsets by name) for the caller to read the regions from the memory tensor.
InternodeForwardResult internode_forward(const std::string& buffer, const at::Tensor& x,
                                         const std::optional<at::Tensor>& x_scales,
                                         const std::optional<at::Tensor>& topk_idx,
                                         const std::optional<at::Tensor>& topk_weights,
                                         const at::Tensor& is_token_in_rank,
                                         const std::optional<at::Tensor>& num_tokens_per_expert,
                                         int64_t ranks_per_node, int64_t num_blocks) {
  const char* op = "internode_dispatch";
  LowLatencyRuntime* runtime = find_runtime(buffer);
  TORCH_CHECK_VALUE(runtime != nullptr, "buffer ", buffer, " has no NVSHMEM runtime");
  TORCH_CHECK_VALUE(!runtime->broken, "buffer ", buffer, " is unusable after a timeout");
  const int64_t num_ranks = runtime->num_ranks, num_tokens = x.size(0);
  TORCH_CHECK_VALUE(ranks_per_node >= 1 && num_ranks % ranks_per_node == 0,
                    "ranks_per_node must divide the ranks (", num(num_ranks), "), got ",
                    num(ranks_per_node));
  const int64_t num_nodes = num_ranks / ranks_per_node;
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous "
                    "2-D CUDA tensor");
  TORCH_CHECK_VALUE(is_token_in_rank.scalar_type() == at::kBool && is_token_in_rank.dim() == 2 &&
                    is_token_in_rank.size(0) == num_tokens &&
                    is_token_in_rank.size(1) == num_ranks && is_token_in_rank.is_contiguous(),
                    "is_token_in_rank must be contiguous bool [x.size(0), num_ranks]");
  // The records' top-k width: the top-k's, or without it the weights' (cached dispatch).
  const int64_t num_topk = topk_idx ? topk_idx->size(1) : topk_weights ? topk_weights->size(1) : 0;
  if (topk_idx)
    TORCH_CHECK_VALUE(topk_idx->scalar_type() == at::kLong && topk_idx->is_contiguous() &&
                      topk_idx->size(0) == num_tokens, "topk_idx must be contiguous int64 "
                      "[x.size(0), num_topk]");
  if (topk_weights)
    TORCH_CHECK_VALUE(topk_weights->element_size() == 4 && topk_weights->is_contiguous() &&
                      topk_weights->dim() == 2 && topk_weights->size(0) == num_tokens &&
                      topk_weights->size(1) == num_topk,
                      "topk_weights must be contiguous 4-byte [x.size(0), num_topk] (num_topk "
                      "of topk_idx when given)");
  if (x_scales)
    TORCH_CHECK_VALUE(x_scales->element_size() == 4 && x_scales->dim() == 2 &&
                      x_scales->size(0) == num_tokens, "x_scales must be 4-byte [x.size(0), S]");
  const c10::cuda::CUDAGuard guard(x.device());
  int* error = checked_error_word(op, runtime->device);
  const InternodeMeta meta = internode_meta(x_scales ? static_cast<int>(x_scales->size(1)) : 0,
                                            static_cast<int>(num_topk));
  if (num_tokens_per_expert)
    TORCH_CHECK_VALUE(num_tokens_per_expert->scalar_type() == at::kInt &&
                      num_tokens_per_expert->dim() == 1 && num_tokens_per_expert->is_contiguous() &&
                      num_tokens_per_expert->size(0) % num_nodes == 0,
                      "num_tokens_per_expert must be contiguous int32 [a multiple of the nodes]");
  const int experts_per_node =
      num_tokens_per_expert ? static_cast<int>(num_tokens_per_expert->size(0) / num_nodes) : 0;
  const InternodeLayout layout = internode_layout(runtime->bytes, static_cast<int>(num_nodes),
                                                  x.size(1) * x.element_size(), meta,
                                                  experts_per_node);
  TORCH_CHECK_VALUE(layout.slots >= num_tokens, "deep_ep::", op, ": buffer ", buffer, " holds ",
                    num(layout.slots), " tokens per region for rows of ", num(layout.row_bytes),
                    " bytes, the call has ", num(num_tokens));
  at::Tensor head = at::empty({num_tokens, num_nodes}, x.options().dtype(at::kInt));
  at::Tensor per_node = at::empty({num_nodes}, x.options().dtype(at::kInt));
  InternodeRdma rdma{runtime->memory, runtime->bytes, runtime->rank, static_cast<int>(num_ranks),
                     static_cast<int>(ranks_per_node), runtime->timeout_ns, error,
                     kOpInternodeDispatch};
  InternodeForwardArgs args{};
  args.x = static_cast<const uint8_t*>(x.data_ptr());
  args.x_scales = x_scales ? static_cast<const uint32_t*>(x_scales->data_ptr()) : nullptr;
  args.scale_stride_token = x_scales ? x_scales->stride(0) : 0;
  args.scale_stride_group = x_scales ? x_scales->stride(1) : 0;
  args.topk_idx = topk_idx ? topk_idx->data_ptr<int64_t>() : nullptr;
  args.topk_weights = topk_weights ? static_cast<const uint32_t*>(topk_weights->data_ptr()) : nullptr;
  args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
  args.num_tokens_per_expert = num_tokens_per_expert ? num_tokens_per_expert->data_ptr<int>() : nullptr;
  args.num_tokens = static_cast<int>(num_tokens);
  args.send_rdma_head = head.data_ptr<int>();
  args.num_tokens_per_node = per_node.data_ptr<int>();
  C10_CUDA_CHECK(launch_internode_forward(rdma, layout, args, static_cast<int>(num_blocks),
                                          at::cuda::getCurrentCUDAStream(runtime->device)));
  return {head, per_node, {
      {"slots", layout.slots}, {"row_bytes", layout.row_bytes},
      {"row_stride", layout.row_stride}, {"meta_bytes", meta.bytes},
      {"meta_scales", meta.scales}, {"meta_topk", meta.topk}, {"meta_weights", meta.weights},
      {"meta_mask", meta.mask}, {"meta_src", meta.src}, {"meta_src_tokens", meta.src_tokens},
      {"counters", layout.counters}, {"headers", layout.headers},
      {"header_stride", layout.header_stride}, {"experts_per_node", layout.experts_per_node},
      {"shares", layout.shares}, {"share_bytes", layout.share_bytes}}};
}

// The combine's way back on a buffer's symmetric memory (development, as internode_forward):
// the layout's offsets for rows of `row_bytes` and weights of `weight_bytes`, then the launch
// that puts the staged partials to their sources and waits for this rank's.
namespace {

InternodeReturnLayout return_layout_of(const std::string& buffer, int64_t row_bytes,
                                       int64_t weight_bytes, int64_t ranks_per_node,
                                       LowLatencyRuntime*& runtime) {
  runtime = find_runtime(buffer);
  TORCH_CHECK_VALUE(runtime != nullptr, "buffer ", buffer, " has no NVSHMEM runtime");
  TORCH_CHECK_VALUE(ranks_per_node >= 1 && runtime->num_ranks % ranks_per_node == 0,
                    "ranks_per_node must divide the ranks (", num(runtime->num_ranks), ")");
  return internode_return_layout(runtime->bytes,
                                 static_cast<int>(runtime->num_ranks / ranks_per_node),
                                 row_bytes, weight_bytes);
}

}  // namespace

LayoutOffsets internode_return_offsets(const std::string& buffer, int64_t row_bytes,
                                       int64_t weight_bytes, int64_t ranks_per_node) {
  LowLatencyRuntime* runtime = nullptr;
  const InternodeReturnLayout layout =
      return_layout_of(buffer, row_bytes, weight_bytes, ranks_per_node, runtime);
  return {{"shares", layout.shares}, {"share_bytes", layout.share_bytes},
          {"slots", layout.slots}, {"row_stride", layout.row_stride},
          {"weights", layout.weights}};
}

void internode_return(const std::string& buffer, const at::Tensor& region_prefix,
                      int64_t row_bytes, int64_t weight_bytes, int64_t ranks_per_node,
                      int64_t num_blocks) {
  const char* op = "internode_combine";
  LowLatencyRuntime* runtime = nullptr;
  const InternodeReturnLayout layout =
      return_layout_of(buffer, row_bytes, weight_bytes, ranks_per_node, runtime);
  TORCH_CHECK_VALUE(!runtime->broken, "buffer ", buffer, " is unusable after a timeout");
  TORCH_CHECK_VALUE(region_prefix.is_cuda() && region_prefix.scalar_type() == at::kInt &&
                    region_prefix.dim() == 1 && region_prefix.size(0) == layout.num_nodes &&
                    region_prefix.is_contiguous(),
                    "region_prefix must be contiguous int32 [num_nodes] on CUDA");
  const c10::cuda::CUDAGuard guard(region_prefix.device());
  int* error = checked_error_word(op, runtime->device);
  InternodeRdma rdma{runtime->memory, runtime->bytes, runtime->rank,
                     static_cast<int>(runtime->num_ranks), static_cast<int>(ranks_per_node),
                     runtime->timeout_ns, error, kOpInternodeCombine};
  InternodeReturnArgs args{region_prefix.data_ptr<int>()};
  C10_CUDA_CHECK(launch_internode_return(rdma, layout, args, static_cast<int>(num_blocks),
                                         at::cuda::getCurrentCUDAStream(runtime->device)));
}

// --- the eager direct entries (deep_ep_ops.ops._direct) ---------------------------------------
// The op kernels again, without the dispatcher; std::nullopt (false) where the call must take
// the ops instead (eager_direct_mode). The fused dispatch also takes the cumulative statistics,
// which the kernel adds in place (the op leaves that to a separate add_). With inputs that
// require grad, the entries record the backward from C++ (the autograd functions above); FP8
// dispatch takes the ops, which raise.

std::optional<std::vector<at::Tensor>> direct_low_latency_dispatch(
    const at::Tensor& x, const at::Tensor& topk_idx, const std::string& buffer, int64_t num_ranks,
    int64_t num_max, int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
    const std::optional<at::Tensor>& stats) {
  const PooledOutputs pooled;
  switch (eager_direct_mode(x, topk_idx, stats)) {
    case Direct::kPlain:
      return to_list(low_latency_dispatch_with_stats(x, topk_idx, buffer, num_ranks, num_max,
                                                     num_experts, use_fp8, round_scale,
                                                     use_ue8m0, stats));
    case Direct::kAutograd:
      if (use_fp8) break;
      return LowLatencyDispatchFunction::apply(x, topk_idx, stats, buffer, num_ranks, num_max,
                                               num_experts, round_scale, use_ue8m0, false);
    case Direct::kOps: break;
  }
  return std::nullopt;
}

std::optional<std::vector<at::Tensor>> direct_low_latency_dispatch_send(
    const at::Tensor& x, const at::Tensor& topk_idx, const std::string& buffer, int64_t num_ranks,
    int64_t num_max, int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0) {
  const PooledOutputs pooled;
  switch (eager_direct_mode(x, topk_idx)) {
    case Direct::kPlain:
      return to_list(low_latency_dispatch_send(x, topk_idx, buffer, num_ranks, num_max,
                                               num_experts, use_fp8, round_scale, use_ue8m0));
    case Direct::kAutograd:
      if (use_fp8) break;  // the ops raise before anything is sent
      return LowLatencyDispatchFunction::apply(x, topk_idx, std::nullopt, buffer, num_ranks,
                                               num_max, num_experts, round_scale, use_ue8m0,
                                               true);
    case Direct::kOps: break;
  }
  return std::nullopt;
}

// The receive halves with grad: as the ops' Autograd kernel (_autograd._completing_kernel).
bool direct_low_latency_dispatch_recv(const at::Tensor& recv_x, const at::Tensor& recv_x_scales,
                                      const at::Tensor& recv_count, const at::Tensor& src_info,
                                      const at::Tensor& layout_range,
                                      const std::optional<at::Tensor>& stats,
                                      const std::string& buffer) {
  const at::Tensor none;
  const Direct mode =
      eager_direct_mode(recv_x, recv_x_scales, recv_count, src_info, layout_range, stats);
  const std::initializer_list<const at::Tensor*> mutated{
      &recv_x, &recv_x_scales, &recv_count, &src_info, &layout_range, stats ? &*stats : &none};
  if (mode == Direct::kOps || (mode == Direct::kAutograd && !completable(mutated))) return false;
  low_latency_dispatch_recv(recv_x, recv_x_scales, recv_count, src_info, layout_range, stats,
                            buffer);
  if (mode == Direct::kAutograd) bump_versions(mutated);
  return true;
}

namespace {

// The functional combine and its send half: the same code.
std::optional<at::Tensor> combine_entry(bool send_only, const at::Tensor& x,
                                        const at::Tensor& topk_idx,
                                        const at::Tensor& topk_weights,
                                        const at::Tensor& src_info,
                                        const at::Tensor& layout_range, const std::string& buffer,
                                        int64_t num_ranks, int64_t num_max, int64_t num_experts,
                                        bool zero_copy) {
  switch (eager_direct_mode(x, topk_idx, topk_weights, src_info, layout_range)) {
    case Direct::kPlain:
      return (send_only ? low_latency_combine_send : low_latency_combine)(
          x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
          num_experts, zero_copy);
    case Direct::kAutograd:
      return LowLatencyCombineFunction::apply(x, topk_idx, topk_weights, src_info, layout_range,
                                              buffer, num_ranks, num_max, num_experts, zero_copy,
                                              send_only);
    case Direct::kOps: break;
  }
  return std::nullopt;
}

}  // namespace

std::optional<at::Tensor> direct_low_latency_combine(
    const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
    const at::Tensor& src_info, const at::Tensor& layout_range, const std::string& buffer,
    int64_t num_ranks, int64_t num_max, int64_t num_experts, bool zero_copy) {
  return combine_entry(false, x, topk_idx, topk_weights, src_info, layout_range, buffer,
                       num_ranks, num_max, num_experts, zero_copy);
}

bool direct_low_latency_combine_out(const at::Tensor& x, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_weights, const at::Tensor& src_info,
                                    const at::Tensor& layout_range, const std::string& buffer,
                                    int64_t num_ranks, int64_t num_max, int64_t num_experts,
                                    bool zero_copy, const at::Tensor& out) {
  if (!eager_direct_ok(x, topk_idx, topk_weights, src_info, layout_range, out)) return false;
  low_latency_combine_out(x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks,
                          num_max, num_experts, zero_copy, out);
  return true;
}

std::optional<at::Tensor> direct_low_latency_combine_send(
    const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
    const at::Tensor& src_info, const at::Tensor& layout_range, const std::string& buffer,
    int64_t num_ranks, int64_t num_max, int64_t num_experts, bool zero_copy) {
  return combine_entry(true, x, topk_idx, topk_weights, src_info, layout_range, buffer,
                       num_ranks, num_max, num_experts, zero_copy);
}

bool direct_low_latency_combine_recv(const at::Tensor& combined_x, const at::Tensor& topk_idx,
                                     const at::Tensor& topk_weights, const std::string& buffer) {
  const Direct mode = eager_direct_mode(combined_x, topk_idx, topk_weights);
  if (mode == Direct::kOps || (mode == Direct::kAutograd && !completable({&combined_x})))
    return false;
  low_latency_combine_recv(combined_x, topk_idx, topk_weights, buffer);
  if (mode == Direct::kAutograd) bump_versions({&combined_x});
  return true;
}

namespace {
// Loading the library defines the ops that have no schema yet (a libtorch process without the
// Python package gets them here; with the package, whichever of the two runs first wins).
const int ops_defined_at_load = define_ops();
}  // namespace

}  // namespace deep_ep_ops
