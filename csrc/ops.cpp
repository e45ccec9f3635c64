// The op kernels of the NVLink kernels (libdeep_ep_ops, no Python in it): argument checks,
// output allocation, launch on the current stream, and registration for the CUDA dispatch key
// of the deep_ep ops, whose schemas the library defines when loaded if nothing did (the op
// table deep_ep_ops/_schemas.py; csrc/ops.h). The NVLink runtimes by buffer name live here:
// the Python bindings (csrc/python.cpp, deep_ep_ops._C) and the C++ Buffer (csrc/buffer.cpp)
// reach them through csrc/bridge.h. Calls the kernels do not take (a buffer without a runtime)
// go to the Python package's reference backend when it set the hook, else raise.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "generated/build_id.h"  // written by setup.py
#include "kernels/api.h"
#include "autograd.h"
#include "bridge.h"
#include "ops.h"
#include "runtime.h"
#include "torch_common.h"


namespace deep_ep_ops {
namespace {

// The layout kernel's partial histograms and its ticket counter, per device; allocated once
// and never freed (CUDA graphs may hold the address).
struct LayoutWorkspace {
  int* ints = nullptr;  // one unsigned ticket, then the partial histograms
  int capacity = 0;
};

std::mutex state_mutex;

auto& runtimes = *new RuntimeRegistry<NvlRuntime>();  // NVLink runtimes by buffer name (leaked)



const char* const kNotifyMetaFields[kNotifyMetaInts] = DEEP_EP_NOTIFY_META_FIELDS;
const char* const kCallWordFieldNames[kCallWordFields] = DEEP_EP_CALL_WORD_FIELDS;

// One argument's value in a disagreement message (a dtype and an op by name).
std::string argument_shown(const std::string& field, int value) {
  value &= 0x0fffffff;  // what a disagreement report carries of it
  return field == "x.dtype" ? std::string(c10::toString(static_cast<at::ScalarType>(value)))
       : field == "op" ? std::string(op_name(value)) : num(value);
}

// A kernel's disagreement report (value = (field << 28) | the peer's value of it; `fields`
// names them): "the ranks disagree on <field> (rank <peer>: <value>".
std::string disagreement_of(const DeviceReport& report, const char* const* fields) {
  const char* field = fields[(report.value >> 28) & 7];
  return "the ranks disagree on " + std::string(field) + " (rank " + num(report.peer) + ": " +
         argument_shown(field, report.value);
}

// The data kernels' call word (kernels/api.h): what shapes their staging, which every rank
// must pass alike.
uint64_t call_word_of(const at::Tensor& x, int64_t num_scales, int64_t num_topk, int num_sms,
                      int op) {
  const int64_t values[kCallWordFields] = {
      x.size(1), static_cast<int64_t>(x.scalar_type()), num_scales, num_topk, num_sms, op};
  return pack_call_word(values);
}

// Raise (once) an error a kernel reported since the last call; returns the device word.
// `this_call`, given by a dispatch waiting for its counts: raises a disagreement the notify
// kernel reported (before its -3 reaches the host) as that call's, which breaks nothing.
int* checked_error_word(const char* op, int device,
                        const std::function<void(const DeviceReport&)>& this_call = {}) {
  const DeviceReport report = take_device_report(device);
  const int code = report.code;
  if (code != kErrorNone) {
    const int reporter = report.op, peer = report.peer, value = report.value;
    const std::string where = std::string(op_name(reporter)) + " on cuda:" + num(device);
    TORCH_CHECK_VALUE(code != kErrorExpertOutOfRange, "deep_ep::", op,
                      ": an earlier call on cuda:", num(device),
                      " saw topk_idx entries outside [-1, num_experts); its results are invalid");
    TORCH_CHECK_VALUE(code != kErrorCapacity, where, ": this rank receives ", num(value),
                      " rows, more than num_worst_tokens; rows past it were dropped "
                      "(reported at the next call: capacity mode does not synchronise)");
    TORCH_CHECK_VALUE(code != kErrorCountMismatch, where,
                      ": num_tokens_per_rank disagrees with is_token_in_rank (rank ", num(peer),
                      " gets ", num(value), " tokens)");
    TORCH_CHECK_VALUE(code != kErrorBadHandle, where,
                      ": the handle's send_head and rank_prefix_matrix do not come from one "
                      "dispatch");
    if (code == kErrorDisagree && this_call) this_call(report);
    if (code == kErrorDisagree) {  // capacity mode: found by the notify kernel, raised here
      runtimes.mark_broken(device);
      TORCH_CHECK_VALUE(false, where, ": ", disagreement_of(report, kNotifyMetaFields),
                        "); every rank must pass the same. The call did not run, and the NVLink "
                        "buffers on this device are unusable now");
    }
    if (code == kErrorCallMismatch) {  // cached dispatch, combine: found by a data kernel
      runtimes.mark_broken(device);
      TORCH_CHECK_VALUE(false, where, ": ", disagreement_of(report, kCallWordFieldNames),
                        "); every rank must pass the same. The call's results are invalid, and "
                        "the NVLink buffers on this device are unusable now");
    }
    if (code == kErrorTimeout) {
      runtimes.mark_broken(device);
      TORCH_CHECK(false, where, ": timed out after ", num(value), " s waiting for rank ",
                  num(peer), " (it never reached the matching call); every NVLink buffer on "
                  "this device is unusable now. Set DEEP_EP_OPS_TIMEOUT_S to change the limit.");
    }
    TORCH_CHECK(false, "deep_ep::", op, ": an earlier kernel reported error code ", num(code));
  }
  return error_word(device).device;
}

// The layout kernel's ticket counter (zero between launches) followed by room for at least
// `ints` partial-histogram ints. The ticket sits first so that every call finds it at the same
// place whatever its size. Grows, never shrinks (an old one stays allocated: a captured graph
// may still use it).
int* layout_workspace(int device, int ints) {
  static auto& workspaces = *new std::unordered_map<int, LayoutWorkspace>();
  std::lock_guard<std::mutex> lock(state_mutex);
  LayoutWorkspace& state = workspaces[device];
  if (state.capacity < ints) {
    RelaxedCapture relaxed;
    const size_t bytes = sizeof(int) * (static_cast<size_t>(ints) + 1);
    int* workspace = nullptr;
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&workspace), bytes));
    cudaStream_t side;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    C10_CUDA_CHECK(cudaMemsetAsync(workspace, 0, bytes, side));
    C10_CUDA_CHECK(cudaStreamSynchronize(side));
    C10_CUDA_CHECK(cudaStreamDestroy(side));
    state.ints = workspace;
    state.capacity = ints;
  }
  return state.ints;
}

int num_sms(int device) { return usable_sms(device); }

// A data kernel's blocks must all be resident at once (see intranode_resident_blocks_per_sm):
// a config asking for more than this process can run raises instead of hanging.
void check_resident(const char* op, int num_blocks, int device) {
  const int sms = usable_sms(device), limit = intranode_resident_blocks_per_sm() * sms;
  TORCH_CHECK_VALUE(num_blocks <= limit, "deep_ep::", op, ": config.num_sms=", num(num_blocks),
                    " needs that many blocks resident at once, but this process can run ",
                    num(limit), " (", num(sms), " SMs", mps_thread_percent() < 100
                        ? " under CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=" + num(mps_thread_percent())
                        : std::string(), "); use a smaller num_sms (Buffer.set_num_sms)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> get_dispatch_layout_unchecked(
    const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t num_rdma_ranks) {
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong,
                   "topk_idx must have dtype torch.int64, got ", topk_idx.scalar_type());
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "topk_idx must have 2 dims, got shape ",
                    shape(topk_idx));
  TORCH_CHECK_VALUE(num_ranks >= 1 && num_ranks <= 64, "num_ranks must be in [1, 64], got ",
                    num(num_ranks));
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts % num_ranks == 0, "num_experts (",
                    num(num_experts), ") must be a positive multiple of num_ranks (",
                    num(num_ranks), ")");
  TORCH_CHECK_VALUE(num_rdma_ranks >= 1 && num_ranks % num_rdma_ranks == 0, "num_rdma_ranks (",
                    num(num_rdma_ranks), ") must divide num_ranks (", num(num_ranks), ")");
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  const int device = topk_idx.get_device();
  int* error = checked_error_word("get_dispatch_layout", device);
  const at::Tensor topk = topk_idx.contiguous();
  auto [per_rank, per_rdma_rank, per_expert, in_rank] = empty_small<4>(topk.options(), {{
      {{num_ranks}, at::kInt}, {{num_rdma_ranks}, at::kInt}, {{num_experts}, at::kInt},
      {{topk.size(0), num_ranks}, at::kBool}}});
  const int sms = num_sms(device);
  const int ints = layout_workspace_ints(static_cast<int>(num_experts), static_cast<int>(num_ranks),
                                         static_cast<int>(num_rdma_ranks), sms);
  int* workspace = layout_workspace(device, ints);
  unsigned* ticket = reinterpret_cast<unsigned*>(workspace);
  C10_CUDA_CHECK(launch_get_dispatch_layout(
      topk.data_ptr<int64_t>(), static_cast<int>(topk.size(0)), static_cast<int>(topk.size(1)),
      static_cast<int>(num_experts), static_cast<int>(num_ranks),
      static_cast<int>(num_rdma_ranks), per_rank.data_ptr<int>(), per_rdma_rank.data_ptr<int>(),
      per_expert.data_ptr<int>(), in_rank.data_ptr<bool>(), error, workspace + 1, ticket, sms,
      at::cuda::getCurrentCUDAStream(device)));
  return {per_rank, per_rdma_rank, per_expert, in_rank};
}

constexpr char kGetDispatchLayoutName[] = "get_dispatch_layout";
constexpr auto get_dispatch_layout =
    &Checked<kGetDispatchLayoutName, &get_dispatch_layout_unchecked>::call;


// --- NVLink runtimes by buffer name ----------------------------------------------------------

NvlRuntime* find_runtime(const std::string& name) { return runtimes.find(name); }

}  // namespace

// csrc/bridge.h's, defined here beside the registry they fill.
std::string intranode_create(const std::string& name, int device, int rank, int num_ranks,
                             int64_t num_nvl_bytes, double timeout_s) {
  TORCH_CHECK_VALUE(num_ranks >= 1 && num_ranks <= kMaxNvlRanks, "the NVLink runtime takes 1 to ",
                    num(kMaxNvlRanks), " ranks, got ", num(num_ranks));
  TORCH_CHECK_VALUE(find_runtime(name) == nullptr, "buffer ", name, " already has a runtime");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  auto runtime = std::make_unique<NvlRuntime>(name, device, rank, num_ranks, num_nvl_bytes,
                                              static_cast<uint64_t>(timeout_s * 1e9));
  cudaIpcMemHandle_t handle;
  const cudaError_t status = runtime->allocate(&handle);
  if (status != cudaSuccess) runtime->release();
  TORCH_CHECK(status == cudaSuccess, "buffer ", name, ": allocating ", num(num_nvl_bytes),
              " NVLink bytes failed: ", cudaGetErrorString(status));
  runtimes.add(name, std::move(runtime));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void intranode_open(const std::string& name, const std::vector<std::string>& handles) {
  NvlRuntime* runtime = find_runtime(name);
  TORCH_CHECK_VALUE(runtime != nullptr, "buffer ", name, " has no NVLink runtime");
  TORCH_CHECK_VALUE(static_cast<int>(handles.size()) == runtime->num_ranks, "expected ",
                    num(runtime->num_ranks), " IPC handles, got ", num(handles.size()));
  std::vector<cudaIpcMemHandle_t> ipc(handles.size());
  for (size_t r = 0; r < handles.size(); ++r) {
    TORCH_CHECK_VALUE(handles[r].size() == sizeof(cudaIpcMemHandle_t), "IPC handle of rank ",
                      num(r), " has ", num(handles[r].size()), " bytes");
    std::copy(handles[r].begin(), handles[r].end(), reinterpret_cast<char*>(&ipc[r]));
  }
  const cudaError_t status = runtime->open(ipc);
  TORCH_CHECK(status == cudaSuccess, "buffer ", name, ": mapping the peers' NVLink buffers "
              "failed (are all ranks on one host, with peer access?): ", cudaGetErrorString(status));
}

namespace {


// --- argument checks (the fakes in meta/ make the same ones while tracing) ------------------

void check_rows(const at::Tensor& t, const char* name, int64_t rows, const char* what) {
  TORCH_CHECK_VALUE(t.size(0) == rows, name, ".size(0) must equal ", what, " (", num(rows),
                    "), got shape ", shape(t));
}

int check_config(c10::IntArrayRef config) {
  TORCH_CHECK_VALUE(config.size() == 5, "config must have 5 ints (num_sms, nvl send/recv chunk, "
                    "rdma send/recv chunk), got ", num(config.size()));
  TORCH_CHECK_VALUE(config[0] >= 2 && config[0] % 2 == 0 && config[0] <= kMaxBlocks,
                    "config.num_sms must be an even number in [2, ", num(kMaxBlocks), "], got ",
                    num(config[0]));
  for (size_t i = 1; i < config.size(); ++i)
    TORCH_CHECK_VALUE(config[i] >= 1, "config values must be positive, got ", num(config[i]));
  return static_cast<int>(config[0]);
}

// Config.get_nvl_buffer_size_hint (deep_ep_ops/config.py), the bound DeepEP users size by;
// tests/test_cuda_direct.py holds the two formulas equal.
int64_t nvl_buffer_size_hint_impl(c10::IntArrayRef config, int64_t hidden_bytes, int64_t num_ranks) {
  auto align = [](int64_t n) { return (n + 127) / 128 * 128; };
  const int64_t ranks = std::min<int64_t>(num_ranks, kMaxNvlRanks), channels = config[0] / 2;
  const int64_t token = align(hidden_bytes + 4 * ((hidden_bytes + 127) / 128) + 16 * (8 + 4) + 4);
  const int64_t per_channel = ranks * (config[2] * token + 8);
  return align(channels * per_channel + 4 * ranks * (ranks + 2 * channels));
}

// The runtime named `buffer`, checked for this call; nullptr: use the reference fallback.
NvlRuntime* runtime_for(const char* op, const std::string& buffer, const at::Tensor& x,
                        int64_t num_ranks, c10::IntArrayRef config) {
  NvlRuntime* runtime = find_runtime(buffer);
  if (runtime == nullptr) return nullptr;
  check_runtime(op, buffer, *runtime, x, num_ranks);
  const int64_t needed =
      nvl_buffer_size_hint_impl(config, x.size(1) * std::max<int64_t>(x.element_size(), 2), num_ranks);
  TORCH_CHECK_VALUE(needed <= runtime->data_bytes, "deep_ep::", op, ": buffer '", buffer,
                    "' has num_nvl_bytes=", num(runtime->data_bytes), " but hidden=",
                    num(x.size(1)), " with this config needs ", num(needed),
                    " (Config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks))");
  return runtime;
}

int vector_bytes(int64_t row_bytes, const void* a, const void* b) {
  int v = 16;
  while (v > 1 && (row_bytes % v || reinterpret_cast<uintptr_t>(a) % v ||
                   reinterpret_cast<uintptr_t>(b) % v))
    v /= 2;
  return v;
}

// The ranks' disagreement the notify kernel found (num_recv -3), as a ValueError naming the
// argument, a peer's value and this rank's (`meta`: the call's DispatchLayoutArgs::meta).
[[noreturn]] void raise_disagreement(const NvlRuntime& runtime, const char* op, const int* meta,
                                     const DeviceReport& report) {
  const int field = (report.value >> 28) & 7;
  TORCH_CHECK_VALUE(report.code != kErrorDisagree, "deep_ep::", op, " on buffer ", runtime.name,
                    ": ", disagreement_of(report, kNotifyMetaFields), ", rank ",
                    num(runtime.rank), ": ", argument_shown(kNotifyMetaFields[field], meta[field]),
                    "); every rank must pass the same");
  TORCH_CHECK(false, "deep_ep::", op, ": the ranks disagree on the call's arguments");
}

// One turn of a host spin: the CPU's pause hint (no system call).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

// Rows received, written by the notify kernel into mapped memory: the one host wait of the
// data-dependent dispatch. Bounded, and it raises what the kernel reported.
int64_t wait_num_recv(const NvlRuntime& runtime, const char* op, const int* meta) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::nanoseconds(runtime.timeout_ns) +
                        std::chrono::seconds(10);
  while (true) {
    const int value = *runtime.num_recv_host;
    if (value >= 0) return value;
    // The report comes before the -3: whichever of the two the host sees first raises it.
    if (value == -3) raise_disagreement(runtime, op, meta, take_device_report(runtime.device));
    checked_error_word(op, runtime.device, [&](const DeviceReport& report) {
      raise_disagreement(runtime, op, meta, report);
    });
    TORCH_CHECK(value != -2, "deep_ep::", op, ": buffer ", runtime.name,
                " is unusable after a timeout or a failed call; destroy it and create a new one");
    TORCH_CHECK(clock::now() < deadline, "deep_ep::", op, ": timed out waiting for the row "
                "counts of buffer ", runtime.name, " (is an earlier kernel on this stream stuck?)");
    cpu_relax();  // not a yield: a system call per turn delays seeing the count
  }
}

using DispatchResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_payload(const at::Tensor& x, const c10::optional<at::Tensor>& x_scales,
                   const c10::optional<at::Tensor>& topk_weights) {
  // The dtypes meta.ANY_DTYPES lists (the Python check rewords the message).
  check_tensor(x, "x", 2, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble, at::kFloat8_e4m3fn,
                           at::kByte, at::kChar, at::kInt, at::kLong});
  const bool fp8 = x.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_VALUE(!fp8 || x_scales.has_value(),
                    "x is float8_e4m3fn, so x_scales must be given");
  if (x_scales) {
    TORCH_CHECK_VALUE(fp8, "x_scales is only valid with float8_e4m3fn x, got ",
                      c10::toString(x.scalar_type()));
    check_tensor(*x_scales, "x_scales", 2, {at::kFloat, at::kInt});
    check_rows(*x_scales, "x_scales", x.size(0), "x.size(0)");
  }
  if (topk_weights) {
    check_tensor(*topk_weights, "topk_weights", 2, {at::kFloat, at::kDouble});
    check_rows(*topk_weights, "topk_weights", x.size(0), "x.size(0)");
  }
}

// The payload a dispatch moves (x, its 4-byte scales, top-k weights: contiguous copies kept
// alive for the launch) and the tensors it lands in, `num_rows` rows each (`num_topk` weight
// columns, whether or not weights are sent).
struct Payload {
  at::Tensor x, scales, weights, recv_x, recv_scales, recv_weights;

  // recv_x here; recv_scales and recv_weights come from the caller's empty_small (their specs:
  // small_specs), with its other small outputs.
  Payload(const at::Tensor& x_in, const c10::optional<at::Tensor>& x_scales,
          const c10::optional<at::Tensor>& topk_weights, int64_t num_rows, at::Tensor scales_out,
          at::Tensor weights_out)
      : x(x_in.contiguous()),
        scales(x_scales ? *x_scales : at::Tensor()),
        weights(topk_weights ? topk_weights->contiguous() : at::Tensor()),
        recv_x(at::empty({num_rows, x.size(1)}, x.options())),
        recv_scales(std::move(scales_out)),
        recv_weights(std::move(weights_out)) {}

  static EmptySpec scales_spec(const c10::optional<at::Tensor>& x_scales, int64_t num_rows) {
    return {{num_rows, x_scales ? x_scales->size(1) : 0},
            x_scales ? x_scales->scalar_type() : at::kFloat};
  }
  static EmptySpec weights_spec(const c10::optional<at::Tensor>& topk_weights, int64_t num_rows,
                                int64_t num_topk) {
    return {{num_rows, num_topk}, topk_weights ? topk_weights->scalar_type() : at::kFloat};
  }

  // The payload fields of the data kernel's arguments (top-k indices and handle are the
  // caller's).
  void fill(DispatchDataArgs& data, int64_t num_tokens, bool fill_tail) const {
    data.x = static_cast<const uint8_t*>(x.data_ptr());
    data.row_bytes = x.size(1) * x.element_size();
    data.x_scales = scales.defined() ? static_cast<const uint32_t*>(scales.data_ptr()) : nullptr;
    data.scale_stride_token = scales.defined() ? scales.stride(0) : 0;
    data.scale_stride_group = scales.defined() ? scales.stride(1) : 0;
    data.num_scales = recv_scales.defined() ? static_cast<int>(recv_scales.size(1)) : 0;
    data.topk_weights = weights.defined() ? static_cast<const uint8_t*>(weights.data_ptr()) : nullptr;
    data.weight_bytes = weights.defined() ? static_cast<int>(weights.element_size()) : 4;
    data.num_tokens = static_cast<int>(num_tokens);
    data.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
    data.recv_x_scales =
        recv_scales.defined() ? static_cast<uint32_t*>(recv_scales.data_ptr()) : nullptr;
    data.recv_topk_weights = static_cast<uint8_t*>(recv_weights.data_ptr());
    data.num_recv_rows = recv_x.size(0);
    data.fill_tail = fill_tail;
    data.vector_bytes = vector_bytes(data.row_bytes, data.x, data.recv_x);
  }
};

// Launches the data kernel after checking that a round of its rows fits the buffer.
void launch_data(const char* op, const std::string& buffer, const Intranode& nvl,
                 const DispatchDataArgs& data, int num_sms, int device, cudaStream_t stream,
                 const DispatchLayoutArgs* notify = nullptr) {
  TORCH_CHECK_VALUE(intranode_rows_per_block(nvl, dispatch_slot_bytes(data), num_sms) >= 1,
                    "deep_ep::", op, ": buffer ", buffer, " is too small for rows of ",
                    num(dispatch_slot_bytes(data)), " bytes with num_sms=", num(num_sms));
  check_resident(op, num_sms, device);
  C10_CUDA_CHECK(launch_dispatch_data(nvl, data, num_sms, stream, notify));
}

// Set by the direct dispatch entries for Buffer.dispatch (lean=True): the per-expert counts
// (Buffer.dispatch has them from the host, or returns [] in capacity mode) and a BF16 payload's
// empty scales are not made as tensors (they come back as None). Each tensor made, wrapped for
// Python and freed is host time of every call.
thread_local bool lean_dispatch_outputs = false;

DispatchResult dispatch_impl(int op_id, const at::Tensor& x,
                             const c10::optional<at::Tensor>& x_scales,
                             const c10::optional<at::Tensor>& topk_idx,
                             const c10::optional<at::Tensor>& topk_weights,
                             const at::Tensor& num_tokens_per_rank,
                             const at::Tensor& is_token_in_rank,
                             const c10::optional<at::Tensor>& num_tokens_per_expert,
                             c10::string_view buffer_view, int64_t expert_alignment,
                             int64_t num_worst_tokens, c10::IntArrayRef config) {
  const char* op = op_name(op_id) + 9;  // without "deep_ep::"
  HostTrace trace(op);
  const std::string buffer(buffer_view.data(), buffer_view.size());
  check_payload(x, x_scales, topk_weights);
  check_tensor(is_token_in_rank, "is_token_in_rank", 2, {at::kBool});
  check_rows(is_token_in_rank, "is_token_in_rank", x.size(0), "x.size(0)");
  const int64_t num_tokens = x.size(0), num_ranks = is_token_in_rank.size(1);
  check_tensor(num_tokens_per_rank, "num_tokens_per_rank", 1, {at::kInt});
  check_rows(num_tokens_per_rank, "num_tokens_per_rank", num_ranks, "num_ranks");
  TORCH_CHECK_VALUE(topk_idx.has_value() == topk_weights.has_value(),
                    "topk_idx and topk_weights must be given together");
  if (topk_idx) {
    check_tensor(*topk_idx, "topk_idx", 2, {at::kLong});
    check_rows(*topk_idx, "topk_idx", num_tokens, "x.size(0)");
    TORCH_CHECK_VALUE(topk_weights->size(1) == topk_idx->size(1),
                      "topk_weights.size(1) must equal topk_idx.size(1) (",
                      num(topk_idx->size(1)), "), got shape ", shape(*topk_weights));
    TORCH_CHECK_VALUE(num_tokens_per_expert.has_value(),
                      "num_tokens_per_expert is needed with topk_idx");
  }
  if (num_tokens_per_expert) {
    check_tensor(*num_tokens_per_expert, "num_tokens_per_expert", 1, {at::kInt});
    TORCH_CHECK_VALUE(num_tokens_per_expert->size(0) % num_ranks == 0, "num_experts (",
                      num(num_tokens_per_expert->size(0)), ") must be a multiple of num_ranks (",
                      num(num_ranks), ")");
  }
  TORCH_CHECK_VALUE(expert_alignment >= 1, "expert_alignment must be >= 1, got ",
                    num(expert_alignment));
  const int num_sms = check_config(config);
  NvlRuntime* runtime = runtime_for(op, buffer, x, num_ranks, config);
  if (runtime == nullptr) {
    const std::vector<int64_t> config_list(config.begin(), config.end());
    if (op_id == kOpDispatch)
      return call_fallback<DispatchResult>(op, x, x_scales, topk_idx, topk_weights,
                                           num_tokens_per_rank, is_token_in_rank,
                                           num_tokens_per_expert, buffer, expert_alignment,
                                           config_list);
    return call_fallback<DispatchResult>(op, x, x_scales, topk_idx, topk_weights,
                                         num_tokens_per_rank, is_token_in_rank,
                                         num_tokens_per_expert, buffer, expert_alignment,
                                         num_worst_tokens, config_list);
  }
  trace.mark("checks");
  const c10::cuda::CUDAGuard guard(x.device());
  int* error = checked_error_word(op, runtime->device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(runtime->device);
  trace.mark("error word, stream");
  const int64_t channels = num_sms / 2;
  const int64_t num_experts = num_tokens_per_expert ? num_tokens_per_expert->size(0) : 0;
  const int64_t num_local = num_experts / num_ranks;
  TORCH_CHECK_VALUE(num_ranks + channels + num_local <= kMaxNotifyInts - kNotifyMetaInts,
                    "deep_ep::", op, ": ",
                    num(num_experts / num_ranks), " experts per rank is more than this build "
                    "supports");
  at::Tensor in_rank = is_token_in_rank.contiguous();
  at::Tensor per_rank = num_tokens_per_rank.contiguous();
  at::Tensor per_expert = num_tokens_per_expert ? num_tokens_per_expert->contiguous() : at::Tensor();
  const int64_t num_topk = topk_idx ? topk_idx->size(1) : 0;
  // The kernels' scratch (the counts, then at a 64-byte boundary the send list) is one tensor:
  // each tensor made costs host time.
  const int64_t counts_ints = (3 * num_ranks + 1 + 15) / 16 * 16;
  // Inside a direct call the scratch is memory only; with lean_dispatch_outputs so are the
  // per-expert counts and the BF16 payload's empty scales, which Buffer.dispatch drops.
  const bool lean = lean_dispatch_outputs;
  auto handle_specs = std::array<EmptySpec, 6>{{
      {{counts_ints + num_ranks * num_tokens}, at::kInt, {}, true},
      {{num_tokens, num_ranks}, at::kInt}, {{num_ranks, channels}, at::kInt},
      {{num_ranks, num_ranks}, at::kInt}, {{num_ranks, channels}, at::kInt},
      {{num_local}, at::kInt, {}, lean}}};
  auto output_specs = [&](int64_t rows) {
    auto specs = std::array<EmptySpec, 4>{{Payload::scales_spec(x_scales, rows),
                                           Payload::weights_spec(topk_weights, rows, num_topk),
                                           {{rows, num_topk}, at::kLong}, {{rows}, at::kInt}}};
    specs[0].raw = lean && !x_scales;
    return specs;
  };
  // Capacity mode knows its row count now: one allocation for the handle and the outputs.
  std::array<at::Tensor, 6> handle_out;
  std::array<void*, 6> handle_at{};
  std::array<at::Tensor, 4> small_out;
  if (num_worst_tokens > 0) {
    std::array<void*, 10> all_at{};
    const auto all = empty_small(x.options(), joined(handle_specs, output_specs(num_worst_tokens)),
                                 &all_at);
    std::copy(all.begin(), all.begin() + 6, handle_out.begin());
    std::copy(all.begin() + 6, all.end(), small_out.begin());
    std::copy(all_at.begin(), all_at.begin() + 6, handle_at.begin());
  } else {
    handle_out = empty_small(x.options(), handle_specs, &handle_at);
  }
  auto& [scratch, send_head, channel_prefix, rank_prefix, recv_channel_prefix,
         recv_per_expert] = handle_out;
  int* const counts = static_cast<int*>(handle_at[0]);
  int* const send_list = counts + counts_ints;
  trace.mark("handle allocations");

  Intranode nvl = runtime->view(error, op_id);
  DispatchLayoutArgs layout{};
  layout.is_token_in_rank = in_rank.data_ptr<bool>();
  layout.num_tokens_per_rank = per_rank.data_ptr<int>();
  layout.num_tokens_per_expert = per_expert.defined() ? per_expert.data_ptr<int>() : nullptr;
  layout.num_tokens = static_cast<int>(num_tokens);
  layout.num_experts = static_cast<int>(num_experts);
  layout.num_channels = static_cast<int>(channels);
  layout.expert_alignment = static_cast<int>(expert_alignment);
  layout.num_worst_tokens = num_worst_tokens;
  layout.send_list = send_list;
  layout.send_head = send_head.data_ptr<int>();
  layout.channel_prefix_matrix = channel_prefix.data_ptr<int>();
  layout.rank_prefix_matrix = rank_prefix.data_ptr<int>();
  layout.recv_channel_prefix_matrix = recv_channel_prefix.data_ptr<int>();
  layout.num_recv_tokens_per_expert = static_cast<int*>(handle_at[5]);
  layout.counts = counts;
  layout.num_recv_host = num_worst_tokens > 0 ? nullptr : runtime->num_recv_device;
  const int64_t meta[kNotifyMetaInts] = {
      x.size(1), static_cast<int64_t>(x.scalar_type()), x_scales ? x_scales->size(1) : 0,
      topk_idx ? topk_idx->size(1) : 0, num_experts, num_worst_tokens, num_sms, op_id};
  for (int f = 0; f < kNotifyMetaInts; ++f) layout.meta[f] = static_cast<int>(meta[f]);
  // What does not depend on the row count is made before the wait.
  const at::Tensor topk = topk_idx ? topk_idx->contiguous() : at::Tensor();
  if (num_worst_tokens == 0) *runtime->num_recv_host = -1;
  // Capacity mode does not wait for the counts: its data kernel runs the notify step first (one
  // launch; it needs a block per rank).
  const bool notify_here = num_worst_tokens > 0 && num_sms >= num_ranks;
  if (!notify_here) C10_CUDA_CHECK(launch_dispatch_notify(nvl, layout, stream));
  trace.mark("notify launch");
  const int64_t num_rows =
      num_worst_tokens > 0 ? num_worst_tokens : wait_num_recv(*runtime, op, layout.meta);
  trace.mark("count wait");
  if (num_worst_tokens == 0) {  // for Buffer.dispatch's host list, without a copy
    runtime->recv_per_expert.resize(num_local);
    for (int64_t l = 0; l < num_local; ++l)
      runtime->recv_per_expert[l] = runtime->num_recv_host[1 + l];
  }

  if (num_worst_tokens == 0) small_out = empty_small(x.options(), output_specs(num_rows));
  auto& [recv_scales, recv_weights, recv_topk, recv_src] = small_out;
  const Payload payload(x, x_scales, topk_weights, num_rows, recv_scales, recv_weights);
  trace.mark("output allocations");

  DispatchDataArgs data{};
  payload.fill(data, num_tokens, num_worst_tokens > 0);
  data.topk_idx = topk.defined() ? topk.data_ptr<int64_t>() : nullptr;
  data.has_topk_idx = topk.defined();
  data.num_topk = static_cast<int>(num_topk);
  data.num_local_experts = static_cast<int>(num_local);
  data.send_list = send_list;
  data.counts = counts;
  data.recv_topk_idx = recv_topk.data_ptr<int64_t>();
  data.recv_src_idx = recv_src.data_ptr<int>();
  data.notify_here = notify_here;
  nvl.call = call_word_of(x, x_scales ? x_scales->size(1) : 0, num_topk, num_sms, op_id);
  launch_data(op, buffer, nvl, data, num_sms, runtime->device, stream,
              notify_here ? &layout : nullptr);
  trace.mark("data launch");
  return {payload.recv_x, payload.recv_scales, recv_topk, payload.recv_weights, recv_per_expert,
          rank_prefix, channel_prefix, recv_channel_prefix, recv_src, send_head};
}

DispatchResult dispatch_unchecked(const at::Tensor& x, const c10::optional<at::Tensor>& x_scales,
                        const c10::optional<at::Tensor>& topk_idx,
                        const c10::optional<at::Tensor>& topk_weights,
                        const at::Tensor& num_tokens_per_rank, const at::Tensor& is_token_in_rank,
                        const c10::optional<at::Tensor>& num_tokens_per_expert,
                        c10::string_view buffer, int64_t expert_alignment,
                        c10::IntArrayRef config) {
  return dispatch_impl(kOpDispatch, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                       is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, 0,
                       config);
}

constexpr char kDispatchName[] = "dispatch";
constexpr auto dispatch = &Checked<kDispatchName, &dispatch_unchecked>::call;

DispatchResult capacity_dispatch_unchecked(const at::Tensor& x,
                                           const c10::optional<at::Tensor>& x_scales,
                                 const c10::optional<at::Tensor>& topk_idx,
                                 const c10::optional<at::Tensor>& topk_weights,
                                 const at::Tensor& num_tokens_per_rank,
                                 const at::Tensor& is_token_in_rank,
                                 const c10::optional<at::Tensor>& num_tokens_per_expert,
                                 c10::string_view buffer, int64_t expert_alignment,
                                 int64_t num_worst_tokens, c10::IntArrayRef config) {
  TORCH_CHECK_VALUE(num_worst_tokens >= 1, "num_worst_tokens must be >= 1, got ",
                    num(num_worst_tokens));
  return dispatch_impl(kOpCapacityDispatch, x, x_scales, topk_idx, topk_weights,
                       num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, buffer,
                       expert_alignment, num_worst_tokens, config);
}

constexpr char kCapacityDispatchName[] = "capacity_dispatch";
constexpr auto capacity_dispatch =
    &Checked<kCapacityDispatchName, &capacity_dispatch_unchecked>::call;

void check_handle(const at::Tensor& rank_prefix_matrix, const at::Tensor& channel_prefix_matrix,
                  const at::Tensor& recv_channel_prefix_matrix, const at::Tensor& recv_src_idx,
                  const at::Tensor& is_token_in_rank, const at::Tensor& send_head,
                  int64_t num_worst_tokens, c10::IntArrayRef config) {
  check_tensor(is_token_in_rank, "handle.is_token_in_rank", 2, {at::kBool});
  const int64_t num_tokens = is_token_in_rank.size(0), num_ranks = is_token_in_rank.size(1);
  const int64_t channels = check_config(config) / 2;
  const std::pair<const char*, const at::Tensor*> matrices[] = {
      {"handle.rank_prefix_matrix", &rank_prefix_matrix},
      {"handle.channel_prefix_matrix", &channel_prefix_matrix},
      {"handle.recv_channel_prefix_matrix", &recv_channel_prefix_matrix},
      {"handle.send_head", &send_head}};
  const int64_t expected[][2] = {
      {num_ranks, num_ranks}, {num_ranks, channels}, {num_ranks, channels}, {num_tokens, num_ranks}};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *matrices[i].second;
    check_tensor(t, matrices[i].first, 2, {at::kInt});
    TORCH_CHECK_VALUE(t.size(0) == expected[i][0] && t.size(1) == expected[i][1],
                      matrices[i].first, " must have shape (", num(expected[i][0]), ", ",
                      num(expected[i][1]), ") (num_ranks=", num(num_ranks), ", channels=",
                      num(channels), " from config.num_sms=", num(config[0]), "), got ",
                      shape(t), ": handle and config mismatch");
  }
  check_tensor(recv_src_idx, "handle.recv_src_idx", 1, {at::kInt});
  TORCH_CHECK_VALUE(num_worst_tokens >= 0, "num_worst_tokens must be >= 0, got ",
                    num(num_worst_tokens));
  if (num_worst_tokens > 0)
    check_rows(recv_src_idx, "handle.recv_src_idx", num_worst_tokens, "num_worst_tokens");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cached_dispatch_unchecked(
    const at::Tensor& x, const c10::optional<at::Tensor>& x_scales,
    const c10::optional<at::Tensor>& topk_weights, const at::Tensor& rank_prefix_matrix,
    const at::Tensor& channel_prefix_matrix, const at::Tensor& recv_channel_prefix_matrix,
    const at::Tensor& recv_src_idx, const at::Tensor& is_token_in_rank,
    const at::Tensor& send_head, c10::string_view buffer_view, int64_t num_worst_tokens,
    c10::IntArrayRef config) {
  const char* op = "cached_dispatch";
  HostTrace trace(op);
  const std::string buffer(buffer_view.data(), buffer_view.size());
  check_handle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
               recv_src_idx, is_token_in_rank, send_head, num_worst_tokens, config);
  check_payload(x, x_scales, topk_weights);
  check_rows(x, "x", is_token_in_rank.size(0), "handle.is_token_in_rank.size(0)");
  const int num_sms = static_cast<int>(config[0]);
  const int64_t num_tokens = x.size(0), num_ranks = is_token_in_rank.size(1);
  NvlRuntime* runtime = runtime_for(op, buffer, x, num_ranks, config);
  if (runtime == nullptr)
    return call_fallback<std::tuple<at::Tensor, at::Tensor, at::Tensor>>(
        op, x, x_scales, topk_weights, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
        num_worst_tokens, std::vector<int64_t>(config.begin(), config.end()));
  const c10::cuda::CUDAGuard guard(x.device());
  int* error = checked_error_word(op, runtime->device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(runtime->device);
  Intranode nvl = runtime->view(error, kOpCachedDispatch);
  trace.mark("checks");
  const at::Tensor rank_prefix = rank_prefix_matrix.contiguous();
  const at::Tensor head = send_head.contiguous();
  const int64_t num_rows = recv_src_idx.size(0), num_topk = topk_weights ? topk_weights->size(1) : 0;
  auto [send_list, recv_scales, recv_weights] = empty_small<3>(x.options(), {{
      {{num_ranks * num_tokens}, at::kInt}, Payload::scales_spec(x_scales, num_rows),
      Payload::weights_spec(topk_weights, num_rows, num_topk)}});
  trace.mark("allocations");
  const Payload payload(x, x_scales, topk_weights, num_rows, recv_scales, recv_weights);
  DispatchDataArgs data{};
  payload.fill(data, num_tokens, num_worst_tokens > 0);
  data.num_topk = static_cast<int>(payload.recv_weights.size(1));
  data.send_list = send_list.data_ptr<int>();
  data.handle_rank_prefix = rank_prefix.data_ptr<int>();  // the kernel's counts and send list
  data.handle_send_head = head.data_ptr<int>();
  nvl.call = call_word_of(x, x_scales ? x_scales->size(1) : 0, data.num_topk, num_sms,
                          kOpCachedDispatch);
  trace.mark("payload");
  launch_data(op, buffer, nvl, data, num_sms, runtime->device, stream);
  trace.mark("data launch");
  return {payload.recv_x, payload.recv_scales, payload.recv_weights};
}

constexpr char kCachedDispatchName[] = "cached_dispatch";
constexpr auto cached_dispatch = &Checked<kCachedDispatchName, &cached_dispatch_unchecked>::call;

std::tuple<at::Tensor, at::Tensor> combine_unchecked(
    const at::Tensor& x, const c10::optional<at::Tensor>& topk_weights,
    const c10::optional<at::Tensor>& bias_0, const c10::optional<at::Tensor>& bias_1,
    const at::Tensor& rank_prefix_matrix, const at::Tensor& channel_prefix_matrix,
    const at::Tensor& recv_channel_prefix_matrix, const at::Tensor& recv_src_idx,
    const at::Tensor& is_token_in_rank, const at::Tensor& send_head,
    c10::string_view buffer_view, int64_t num_worst_tokens, c10::IntArrayRef config) {
  const char* op = "combine";
  HostTrace trace(op);
  const std::string buffer(buffer_view.data(), buffer_view.size());
  check_handle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
               recv_src_idx, is_token_in_rank, send_head, num_worst_tokens, config);
  check_tensor(x, "x", 2, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  check_rows(x, "x", recv_src_idx.size(0), "handle.recv_src_idx.size(0)");
  const int64_t num_tokens = is_token_in_rank.size(0), num_ranks = is_token_in_rank.size(1);
  if (topk_weights) {
    check_tensor(*topk_weights, "topk_weights", 2, {at::kFloat, at::kDouble});
    check_rows(*topk_weights, "topk_weights", x.size(0), "x.size(0)");
  }
  const std::pair<const char*, const c10::optional<at::Tensor>*> biases[] = {
      {"bias_0", &bias_0}, {"bias_1", &bias_1}};
  for (const auto& bias : biases) {
    if (!bias.second->has_value()) continue;
    const at::Tensor& b = **bias.second;
    check_tensor(b, bias.first, 2, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
    TORCH_CHECK_VALUE(b.size(0) == num_tokens && b.size(1) == x.size(1), bias.first,
                      " must have shape (num_tokens, hidden) = (", num(num_tokens), ", ",
                      num(x.size(1)), "), got ", shape(b));
  }
  const int num_sms = check_config(config);
  NvlRuntime* runtime = runtime_for(op, buffer, x, num_ranks, config);
  if (runtime == nullptr)
    return call_fallback<std::tuple<at::Tensor, at::Tensor>>(
        op, x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
        num_worst_tokens, std::vector<int64_t>(config.begin(), config.end()));
  const c10::cuda::CUDAGuard guard(x.device());
  int* error = checked_error_word(op, runtime->device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(runtime->device);
  Intranode nvl = runtime->view(error, kOpCombine);
  nvl.call = call_word_of(x, 0, topk_weights ? topk_weights->size(1) : 0, num_sms, kOpCombine);
  trace.mark("checks");
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16) xc = xc.clone();
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto as_acc = [&](const c10::optional<at::Tensor>& b) {
    return b ? b->to(acc).contiguous() : at::Tensor();
  };
  const at::Tensor b0 = as_acc(bias_0), b1 = as_acc(bias_1);
  const at::Tensor weights = topk_weights ? topk_weights->contiguous() : at::Tensor();
  const at::Tensor rank_prefix = rank_prefix_matrix.contiguous();
  const at::Tensor src_idx = recv_src_idx.contiguous();
  const at::Tensor head = send_head.contiguous();
  at::Tensor combined = at::empty({num_tokens, x.size(1)}, x.options());
  at::Tensor combined_weights = at::empty(
      {num_tokens, weights.defined() ? weights.size(1) : 0},
      x.options().dtype(weights.defined() ? weights.scalar_type() : at::kFloat));
  trace.mark("inputs, allocations");

  CombineArgs args{};
  args.x = static_cast<const uint8_t*>(xc.data_ptr());
  args.hidden = static_cast<int>(x.size(1));
  args.kind = x.scalar_type() == at::kBFloat16 ? kBFloat16
            : x.scalar_type() == at::kHalf ? kFloat16
            : x.scalar_type() == at::kFloat ? kFloat32 : kFloat64;
  args.num_rows = x.size(0);
  args.topk_weights = weights.defined() ? static_cast<const uint8_t*>(weights.data_ptr()) : nullptr;
  args.num_topk = weights.defined() ? static_cast<int>(weights.size(1)) : 0;
  args.weight_bytes = weights.defined() ? static_cast<int>(weights.element_size()) : 4;
  args.bias_0 = b0.defined() ? b0.data_ptr() : nullptr;
  args.bias_1 = b1.defined() ? b1.data_ptr() : nullptr;
  args.rank_prefix_matrix = rank_prefix.data_ptr<int>();
  args.recv_src_idx = src_idx.data_ptr<int>();
  args.send_head = head.data_ptr<int>();
  args.num_tokens = static_cast<int>(num_tokens);
  args.combined_x = static_cast<uint8_t*>(combined.data_ptr());
  args.combined_topk_weights = static_cast<uint8_t*>(combined_weights.data_ptr());
  TORCH_CHECK_VALUE(intranode_rows_per_block(nvl, combine_slot_bytes(args), num_sms) >= 1,
                    "deep_ep::combine: buffer ", buffer, " is too small for rows of ",
                    num(combine_slot_bytes(args)), " bytes with num_sms=", num(num_sms));
  check_resident("combine", num_sms, runtime->device);
  C10_CUDA_CHECK(launch_combine(nvl, args, num_sms, stream));
  trace.mark("launch");
  return {combined, combined_weights};
}

constexpr char kCombineName[] = "combine";
constexpr auto combine = &Checked<kCombineName, &combine_unchecked>::call;

// --- autograd of the eager fast path (csrc/autograd.h; formulas as deep_ep_ops/_autograd.py) --

using Ints = std::vector<int64_t>;
using OptTensor = c10::optional<at::Tensor>;

// What every normal-mode backward keeps besides tensors.
struct NormalArgs {
  std::string buffer;
  int64_t num_worst_tokens;
  Ints config;
  bool has_weights;
};

// The handle's six tensors `h` and the kept buffer, num_worst_tokens and config, by name.
NamedArgs handle_args(const NormalArgs& a, const std::vector<at::Tensor>& h) {
  return {{"rank_prefix_matrix", h[0]}, {"channel_prefix_matrix", h[1]},
          {"recv_channel_prefix_matrix", h[2]}, {"recv_src_idx", h[3]},
          {"is_token_in_rank", h[4]}, {"send_head", h[5]},
          {"buffer", a.buffer}, {"num_worst_tokens", a.num_worst_tokens},
          {"config", c10::IValue(a.config)}};
}

// dispatch and capacity_dispatch of a floating-point x (no FP8 payload): grad x = combine of
// grad recv_x along the handle; grad topk_weights = combined grad recv_topk_weights where the
// received expert is local. Kept: recv_topk_idx, then the handle's six tensors.
struct DispatchBackward : public EagerBackward {
  NormalArgs args;
  ZerosOf recv_x, recv_weights;

  std::string name() const override { return "deep_ep_ops::DispatchFunctionBackward"; }

  variable_list apply(variable_list&& grads) override {
    const std::vector<at::Tensor>& k = kept();
    const std::vector<at::Tensor> handle(k.begin() + 1, k.end());
    c10::IValue weights;
    if (args.has_weights) {
      const at::Tensor g = recv_weights(grads[1]);
      weights = at::where(k[0].ge(0), g, at::zeros({}, g.options()));
    }
    const auto out = call_op("combine", with(
        {{"x", recv_x(grads[0])}, {"topk_weights", weights}, {"bias_0", c10::IValue()},
         {"bias_1", c10::IValue()}},
        handle_args(args, handle)));
    return {out[0].toTensor(), args.has_weights ? out[1].toTensor() : at::Tensor()};
  }

  static variable_list apply(const at::Tensor& x, const OptTensor& topk_idx,
                             const OptTensor& topk_weights, const at::Tensor& num_tokens_per_rank,
                             const at::Tensor& is_token_in_rank,
                             const OptTensor& num_tokens_per_expert, const std::string& buffer,
                             int64_t expert_alignment, int64_t num_worst_tokens,
                             const Ints& config) {
    const OptTensor no_scales;
    variable_list out = to_list(
        num_worst_tokens > 0
            ? capacity_dispatch(x, no_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                is_token_in_rank, num_tokens_per_expert, buffer,
                                expert_alignment, num_worst_tokens, config)
            : dispatch(x, no_scales, topk_idx, topk_weights, num_tokens_per_rank,
                       is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                       config));
    const bool has_weights = topk_weights.has_value();
    auto node = make_node<DispatchBackward>();
    auto* self = static_cast<DispatchBackward*>(node.get());
    self->args = {buffer, num_worst_tokens, config, has_weights};
    self->recv_x = ZerosOf(out[0]);
    self->recv_weights = ZerosOf(out[3]);
    self->keep({out[2], out[5], out[6], out[7], out[8], is_token_in_rank, out[9]});
    record(node, {x, has_weights ? *topk_weights : at::Tensor()},
           {&out[0], has_weights ? &out[3] : nullptr});
    return out;
  }
};
using DispatchFunction = DispatchBackward;

// cached_dispatch of a floating-point x: grad x and grad topk_weights = combine along the
// handle (the weights unmasked, as they were copied). Kept: the handle's six tensors.
struct CachedDispatchBackward : public EagerBackward {
  NormalArgs args;
  ZerosOf recv_x, recv_weights;

  std::string name() const override { return "deep_ep_ops::CachedDispatchFunctionBackward"; }

  variable_list apply(variable_list&& grads) override {
    c10::IValue weights;
    if (args.has_weights) weights = recv_weights(grads[1]);
    const auto out = call_op("combine", with(
        {{"x", recv_x(grads[0])}, {"topk_weights", weights}, {"bias_0", c10::IValue()},
         {"bias_1", c10::IValue()}},
        handle_args(args, kept())));
    return {out[0].toTensor(), args.has_weights ? out[1].toTensor() : at::Tensor()};
  }

  static variable_list apply(const at::Tensor& x, const OptTensor& topk_weights,
                             const variable_list& handle, const std::string& buffer,
                             int64_t num_worst_tokens, const Ints& config) {
    variable_list out = to_list(cached_dispatch(
        x, c10::nullopt, topk_weights, handle[0], handle[1], handle[2], handle[3], handle[4],
        handle[5], buffer, num_worst_tokens, config));
    const bool has_weights = topk_weights.has_value();
    auto node = make_node<CachedDispatchBackward>();
    auto* self = static_cast<CachedDispatchBackward*>(node.get());
    self->args = {buffer, num_worst_tokens, config, has_weights};
    self->recv_x = ZerosOf(out[0]);
    self->recv_weights = ZerosOf(out[2]);
    self->keep(handle);
    record(node, {x, has_weights ? *topk_weights : at::Tensor()},
           {&out[0], has_weights ? &out[2] : nullptr});
    return out;
  }
};
using CachedDispatchFunction = CachedDispatchBackward;

// combine: grad x (and grad topk_weights) = cached dispatch of grad combined_x (and of grad
// combined_topk_weights) along the handle; grad of each bias = grad combined_x. Kept: the
// handle's six tensors.
struct CombineBackward : public EagerBackward {
  NormalArgs args;
  ZerosOf combined, combined_weights;
  c10::optional<at::ScalarType> bias_dtype[2];

  std::string name() const override { return "deep_ep_ops::CombineFunctionBackward"; }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor grad = combined(grads[0]);
    c10::IValue weights;
    if (args.has_weights) weights = combined_weights(grads[1]);
    const auto out = call_op("cached_dispatch", with(
        {{"x", grad}, {"x_scales", c10::IValue()}, {"topk_weights", weights}},
        handle_args(args, kept())));
    variable_list result(4);  // x, topk_weights, bias_0, bias_1
    result[0] = out[0].toTensor();
    if (args.has_weights) result[1] = tensor_or_undefined(out[2]);
    for (int b = 0; b < 2; ++b)
      if (bias_dtype[b]) result[2 + b] = grad.to(*bias_dtype[b]);
    return result;
  }

  static variable_list apply(const at::Tensor& x, const OptTensor& topk_weights,
                             const OptTensor& bias_0, const OptTensor& bias_1,
                             const variable_list& handle, const std::string& buffer,
                             int64_t num_worst_tokens, const Ints& config) {
    variable_list out = to_list(combine(x, topk_weights, bias_0, bias_1, handle[0], handle[1],
                                        handle[2], handle[3], handle[4], handle[5], buffer,
                                        num_worst_tokens, config));
    const bool has_weights = topk_weights.has_value();
    auto node = make_node<CombineBackward>();
    auto* self = static_cast<CombineBackward*>(node.get());
    self->args = {buffer, num_worst_tokens, config, has_weights};
    self->combined = ZerosOf(out[0]);
    self->combined_weights = ZerosOf(out[1]);
    if (bias_0) self->bias_dtype[0] = bias_0->scalar_type();
    if (bias_1) self->bias_dtype[1] = bias_1->scalar_type();
    self->keep(handle);
    record(node, {x, has_weights ? *topk_weights : at::Tensor(), bias_0 ? *bias_0 : at::Tensor(),
                  bias_1 ? *bias_1 : at::Tensor()},
           {&out[0], has_weights ? &out[1] : nullptr});
    return out;
  }
};
using CombineFunction = CombineBackward;

}  // namespace
}  // namespace deep_ep_ops

TORCH_LIBRARY_IMPL(deep_ep, CUDA, m) {
  m.impl("get_dispatch_layout", deep_ep_ops::get_dispatch_layout);
  m.impl("dispatch", deep_ep_ops::dispatch);
  m.impl("capacity_dispatch", deep_ep_ops::capacity_dispatch);
  m.impl("cached_dispatch", deep_ep_ops::cached_dispatch);
  m.impl("combine", deep_ep_ops::combine);
}


// --- what the front ends call (csrc/bridge.h) ------------------------------------------------

namespace deep_ep_ops {

const char* nvl_source_hash() { return kSourceHash; }

void intranode_destroy(const std::string& name, bool free_memory) {
  runtimes.drop(name, free_memory);
}

int64_t nvl_buffer_size_hint(const std::vector<int64_t>& config, int64_t hidden_bytes,
                             int64_t num_ranks) {
  return nvl_buffer_size_hint_impl(config, hidden_bytes, num_ranks);
}

void check_device_errors(int device) { checked_error_word("check_device_errors", device); }

void set_nvl_fallback_hook(BoxedHook hook) { hooks().fallback = std::move(hook); }
void set_nvl_check_hook(BoxedHook hook) { hooks().check = std::move(hook); }
std::map<std::string, std::pair<int64_t, double>> nvl_host_trace_take() { return host_trace_take(); }
std::map<int, std::string> nvl_op_names() { return op_names_by_id(); }

std::optional<std::vector<at::Tensor>> direct_get_dispatch_layout(const at::Tensor& topk_idx,
                                                                  int64_t num_experts,
                                                                  int64_t num_ranks,
                                                                  int64_t num_rdma_ranks) {
  const PooledOutputs pooled;
  if (!eager_direct_ok(topk_idx)) return std::nullopt;
  return to_list(get_dispatch_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks));
}

std::optional<DirectDispatch> direct_dispatch(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
    const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
    const at::Tensor& num_tokens_per_rank, const at::Tensor& is_token_in_rank,
    const std::optional<at::Tensor>& num_tokens_per_expert, const std::string& buffer,
    int64_t expert_alignment, bool capacity, int64_t num_worst_tokens,
    const std::vector<int64_t>& config, bool lean) {
  const PooledOutputs pooled;
  HostTrace trace(capacity ? "entry capacity_dispatch" : "entry dispatch");
  const Direct mode = eager_direct_mode(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                        is_token_in_rank, num_tokens_per_expert);
  trace.mark("direct mode");
  DirectDispatch result;
  // Scoped: the flag must not outlive the call (an exception included). The backward keeps
  // neither of the outputs lean leaves out.
  struct Lean {
    explicit Lean(bool on) { lean_dispatch_outputs = on; }
    ~Lean() { lean_dispatch_outputs = false; }
  } const scope(lean && mode != Direct::kOps);
  switch (mode) {
    case Direct::kPlain:
      result.out = to_list(
          capacity ? capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                       is_token_in_rank, num_tokens_per_expert, buffer,
                                       expert_alignment, num_worst_tokens, config)
                   : dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                              is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                              config));
      break;
    case Direct::kAutograd:
      // FP8 takes the ops (only its weights are differentiable); capacity_dispatch with
      // num_worst_tokens < 1 takes them too, and raises there.
      if (x_scales || !at::isFloatingType(x.scalar_type()) || (capacity && num_worst_tokens < 1))
        return std::nullopt;
      result.out = DispatchFunction::apply(x, topk_idx, topk_weights, num_tokens_per_rank,
                                           is_token_in_rank, num_tokens_per_expert, buffer,
                                           expert_alignment, num_worst_tokens, config);
      break;
    case Direct::kOps: return std::nullopt;
  }
  trace.mark("op");
  if (!capacity)
    if (const NvlRuntime* runtime = find_runtime(buffer)) result.recv_per_expert = runtime->recv_per_expert;
  return result;
}

std::optional<std::vector<at::Tensor>> direct_cached_dispatch(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
    const std::optional<at::Tensor>& topk_weights, const std::vector<at::Tensor>& handle,
    const std::string& buffer, int64_t num_worst_tokens, const std::vector<int64_t>& config) {
  TORCH_CHECK_VALUE(handle.size() == 6, "a normal-mode handle has 6 tensors, got ",
                    num(handle.size()));
  const PooledOutputs pooled;
  switch (eager_direct_mode(x, x_scales, topk_weights, handle[0], handle[5])) {
    case Direct::kPlain:
      return to_list(cached_dispatch(x, x_scales, topk_weights, handle[0], handle[1], handle[2],
                                     handle[3], handle[4], handle[5], buffer, num_worst_tokens,
                                     config));
    case Direct::kAutograd:
      if (x_scales || !at::isFloatingType(x.scalar_type())) return std::nullopt;
      return CachedDispatchFunction::apply(x, topk_weights, handle, buffer, num_worst_tokens,
                                           config);
    case Direct::kOps: break;
  }
  return std::nullopt;
}

std::optional<std::vector<at::Tensor>> direct_combine(
    const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
    const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
    const std::vector<at::Tensor>& handle, const std::string& buffer, int64_t num_worst_tokens,
    const std::vector<int64_t>& config) {
  TORCH_CHECK_VALUE(handle.size() == 6, "a normal-mode handle has 6 tensors, got ",
                    num(handle.size()));
  switch (eager_direct_mode(x, topk_weights, bias_0, bias_1, handle[0], handle[5])) {
    case Direct::kPlain:
      return to_list(combine(x, topk_weights, bias_0, bias_1, handle[0], handle[1], handle[2],
                             handle[3], handle[4], handle[5], buffer, num_worst_tokens, config));
    case Direct::kAutograd:
      return CombineFunction::apply(x, topk_weights, bias_0, bias_1, handle, buffer,
                                    num_worst_tokens, config);
    case Direct::kOps: break;
  }
  return std::nullopt;
}

namespace {
// Loading the library defines the ops that have no schema yet (a libtorch process without the
// Python package gets them here; with the package, whichever of the two runs first wins).
const int ops_defined_at_load = define_ops();
}  // namespace

}  // namespace deep_ep_ops

namespace deep_ep_ops {
namespace {
std::mutex nvshmem_api_mutex;
const NvshmemApi* lent_nvshmem_api = nullptr;  // leaked: used until the process exits
}  // namespace

void set_nvshmem_api(NvshmemApi api) {
  const std::lock_guard<std::mutex> lock(nvshmem_api_mutex);
  lent_nvshmem_api = new NvshmemApi(std::move(api));
}

const NvshmemApi* nvshmem_api() {
  const std::lock_guard<std::mutex> lock(nvshmem_api_mutex);
  return lent_nvshmem_api;
}

}  // namespace deep_ep_ops
