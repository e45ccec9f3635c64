// deep_ep_ops::Buffer, the C++ API (deep_ep_ops/include/deep_ep_ops/buffer.h): DeepEP V1's
// C++ Buffer over the same runtimes and op kernels as the Python package. The NVLink runtime
// and the eager direct entries come from this library (csrc/bridge.h); the NVSHMEM runtime from
// libdeep_ep_ops_nvshmem through the NvshmemApi it lends when loaded; the low-latency calls and
// every call the direct entries leave take the deep_ep ops through the dispatcher.

#include "deep_ep_ops/buffer.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

#include "bridge.h"

namespace deep_ep_ops {
namespace {

// Numbers enter messages through std::to_string (see num() in csrc/torch_common.h).
std::string num(int64_t value) { return std::to_string(value); }

constexpr int kNumMaxNvlPeers = 8;  // ranks of one NVLink domain (DeepEP's NUM_MAX_NVL_PEERS)

int64_t align128(int64_t n) { return (n + 127) / 128 * 128; }

// Seconds a kernel or an exchange waits for a peer: DEEP_EP_OPS_TIMEOUT_S, as in Python.
double timeout_s() {
  const char* value = std::getenv("DEEP_EP_OPS_TIMEOUT_S");
  const double seconds = value != nullptr ? std::atof(value) : 300.0;
  TORCH_CHECK_VALUE(seconds > 0, "DEEP_EP_OPS_TIMEOUT_S must be a positive number of seconds, "
                    "got ", value);
  return seconds;
}

// A deep_ep op by name, typed as its CUDA kernel is registered (the NVLink ops take the
// buffer name as c10::string_view, the NVSHMEM ops as const std::string&).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

void wait_for(const std::optional<EventHandle>& previous_event) {
  if (previous_event) previous_event->current_stream_wait();
}

std::optional<EventHandle> event_if(bool async) {
  return async ? std::optional<EventHandle>(EventHandle()) : std::nullopt;
}

const NvshmemApi& nvshmem() {
  const NvshmemApi* api = nvshmem_api();
  TORCH_CHECK(api != nullptr, "deep_ep_ops: the low-latency mode needs libdeep_ep_ops_nvshmem "
              "(link it, or load it before the Buffer; it is built when NVSHMEM is found)");
  return *api;
}

std::atomic<int> buffers_made{0};

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Calls through the dispatcher differentiate only where the Python package registered the ops'
// autograd; a libtorch process has none of it, so such a call would drop the gradient. The
// direct entries record their backward in C++ and are not checked here.
void reject_grad(const char* call, std::initializer_list<const OptTensor> tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (const OptTensor& t : tensors)
    TORCH_CHECK(!(t && t->defined() && t->requires_grad()), "Buffer::", call, ": this call "
                "form does not differentiate in the C++ API; run it under torch::NoGradGuard or "
                "with inputs that do not require grad");
}

}  // namespace

// --- Config --------------------------------------------------------------------------------

Config::Config(int num_sms, int nvl_send, int nvl_recv, int rdma_send, int rdma_recv)
    : num_sms(num_sms),
      num_max_nvl_chunked_send_tokens(nvl_send),
      num_max_nvl_chunked_recv_tokens(nvl_recv),
      num_max_rdma_chunked_send_tokens(rdma_send),
      num_max_rdma_chunked_recv_tokens(rdma_recv) {
  const std::pair<const char*, int> fields[] = {
      {"num_sms", num_sms}, {"num_max_nvl_chunked_send_tokens", nvl_send},
      {"num_max_nvl_chunked_recv_tokens", nvl_recv},
      {"num_max_rdma_chunked_send_tokens", rdma_send},
      {"num_max_rdma_chunked_recv_tokens", rdma_recv}};
  for (const auto& [field, value] : fields)
    TORCH_CHECK_VALUE(value >= 1, "Config.", field, " must be a positive int, got ", num(value));
  TORCH_CHECK_VALUE(num_sms % 2 == 0, "Config.num_sms must be even (two SMs per channel), got ",
                    num(num_sms));
  TORCH_CHECK_VALUE(nvl_send <= nvl_recv, "Config.num_max_nvl_chunked_send_tokens (",
                    num(nvl_send), ") must not exceed num_max_nvl_chunked_recv_tokens (",
                    num(nvl_recv), ")");
}

std::vector<int64_t> Config::to_list() const {
  return {num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
          num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens};
}

int64_t Config::get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
  return nvl_buffer_size_hint(to_list(), hidden_bytes, num_ranks);
}

int64_t Config::get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
  if (num_ranks <= kNumMaxNvlPeers) return 0;
  const int64_t num_rdma_ranks = (num_ranks + kNumMaxNvlPeers - 1) / kNumMaxNvlPeers;
  // One token slot: payload, FP8 scales, top-k indices and weights, source index.
  const int64_t token = align128(hidden_bytes + 4 * ((hidden_bytes + 127) / 128) + 16 * 12 + 4);
  const int64_t ring = num_max_rdma_chunked_recv_tokens * token;
  return align128(2 * (num_sms / 2) * num_rdma_ranks * (ring + 16));
}

Config get_dispatch_config(int num_ranks, int num_sms) {
  TORCH_CHECK_VALUE(num_ranks >= 1, "num_ranks must be >= 1, got ", num(num_ranks));
  const int send = num_ranks <= 2 ? 24 : 6;
  return Config(num_sms, send, 256, 6, 128);
}

Config get_combine_config(int num_ranks, int num_sms) {
  TORCH_CHECK_VALUE(num_ranks >= 1, "num_ranks must be >= 1, got ", num(num_ranks));
  const int send = num_ranks <= 2 ? 10 : num_ranks == 4 ? 9 : 4;
  return Config(num_sms, send, 256, 6, 128);
}

int64_t get_low_latency_rdma_size_hint(int num_max_dispatch_tokens_per_rank, int hidden,
                                       int num_ranks, int num_experts) {
  const std::pair<const char*, int> args[] = {
      {"num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank}, {"hidden", hidden},
      {"num_ranks", num_ranks}, {"num_experts", num_experts}};
  for (const auto& [name, value] : args)
    TORCH_CHECK_VALUE(value >= 1, name, " must be >= 1, got ", num(value));
  return nvshmem().bytes_needed(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts);
}

// --- EventHandle ---------------------------------------------------------------------------

EventHandle::EventHandle() : event(std::make_shared<CUDAEvent>()) {
  event->record(c10::cuda::getCurrentCUDAStream());
}

void EventHandle::current_stream_wait() const { event->block(c10::cuda::getCurrentCUDAStream()); }

// --- Buffer --------------------------------------------------------------------------------

struct Buffer::State {
  std::string name;
  int rank, num_ranks, device;
  int64_t num_nvl_bytes, num_rdma_bytes;
  bool low_latency_mode, explicitly_destroy;
  std::string ipc_handle, unique_id;
  bool has_nvl = false, has_ll = false, available = false, destroyed = false;
  at::Tensor workspace;  // the symmetric memory (low-latency mode)

  // DeepEP's cached dispatch and combine pass only part of a handle; the op kernels take all
  // of it. The handles of this buffer's dispatches, by their rank_prefix_matrix's address,
  // while the caller holds that tensor.
  struct Handle {
    std::vector<at::Tensor> tensors;  // rank_prefix .. send_head (the ops' handle order)
    int64_t num_worst_tokens;
  };
  std::mutex handles_mutex;
  std::vector<Handle> handles;

  void keep(Handle handle) {
    const std::lock_guard<std::mutex> lock(handles_mutex);
    handles.erase(std::remove_if(handles.begin(), handles.end(),
                                 [](const Handle& h) { return h.tensors[0].use_count() == 1; }),
                  handles.end());
    handles.push_back(std::move(handle));
  }

  Handle find(const at::Tensor& rank_prefix_matrix, const char* call) {
    const std::lock_guard<std::mutex> lock(handles_mutex);
    for (const Handle& h : handles)
      if (h.tensors[0].data_ptr() == rank_prefix_matrix.data_ptr()) return h;
    TORCH_CHECK_VALUE(false, "Buffer::", call, ": rank_prefix_matrix is not from a dispatch of "
                      "buffer ", name, " that is still held (pass the tensors that "
                      "intranode_dispatch returned)");
  }

  void live(const char* call) const {
    TORCH_CHECK(!destroyed, "Buffer ", name, " was destroyed");
    TORCH_CHECK(available, "Buffer::", call, ": buffer ", name, " is not synced (call sync "
                "with the peers' handles first)");
  }
};

Buffer::Buffer(int rank, int num_ranks, int64_t num_nvl_bytes, int64_t num_rdma_bytes,
               bool low_latency_mode, bool explicitly_destroy, bool enable_shrink,
               bool use_fabric)
    : state_(std::make_unique<State>()) {
  TORCH_CHECK_VALUE(num_ranks >= 1, "num_ranks must be >= 1, got ", num(num_ranks));
  TORCH_CHECK_VALUE(rank >= 0 && rank < num_ranks, "rank must be in [0, ", num(num_ranks),
                    "), got ", num(rank));
  TORCH_CHECK_VALUE(num_nvl_bytes >= 0, "num_nvl_bytes must be non-negative, got ",
                    num(num_nvl_bytes));
  TORCH_CHECK_VALUE(num_rdma_bytes >= 0, "num_rdma_bytes must be non-negative, got ",
                    num(num_rdma_bytes));
  TORCH_CHECK_NOT_IMPLEMENTED(!enable_shrink,
                              "enable_shrink (elastic EP masks) is not supported");
  TORCH_CHECK_NOT_IMPLEMENTED(!use_fabric, "use_fabric (fabric memory handles) is not supported");
  State& s = *state_;
  s.name = "cpp-buffer-" + num(buffers_made++);
  s.rank = rank;
  s.num_ranks = num_ranks;
  s.device = c10::cuda::current_device();
  s.num_nvl_bytes = num_nvl_bytes;
  s.num_rdma_bytes = num_rdma_bytes;
  s.low_latency_mode = low_latency_mode;
  s.explicitly_destroy = explicitly_destroy;
  if (num_nvl_bytes > 0 && num_ranks <= kNumMaxNvlPeers) {
    s.ipc_handle = intranode_create(s.name, s.device, rank, num_ranks, num_nvl_bytes, timeout_s());
    s.has_nvl = true;
  }
}

Buffer::~Buffer() {
  // Without destroy() the runtimes are only forgotten: a peer may still write into this
  // memory, and the process exit frees it (as the Python Buffer when garbage collected).
  if (state_ && !state_->destroyed) {
    if (state_->has_nvl) intranode_destroy(state_->name, false);
    if (state_->has_ll) nvshmem().destroy(state_->name, false);
  }
}

bool Buffer::is_available() const { return state_->available && !state_->destroyed; }
bool Buffer::is_internode_available() const { return is_available() && get_num_rdma_ranks() > 1; }
int Buffer::get_num_rdma_ranks() const { return std::max(1, state_->num_ranks / kNumMaxNvlPeers); }
int Buffer::get_rdma_rank() const { return state_->rank / kNumMaxNvlPeers; }
int Buffer::get_root_rdma_rank(bool global) const {
  return global ? state_->rank % kNumMaxNvlPeers : 0;
}
int Buffer::get_local_device_id() const { return state_->device; }
const std::string& Buffer::name() const { return state_->name; }
std::string Buffer::get_local_ipc_handle() const { return state_->ipc_handle; }

std::string Buffer::get_local_nvshmem_unique_id() const {
  TORCH_CHECK_VALUE(state_->rank == 0, "only rank 0 makes NVSHMEM's unique id (this is rank ",
                    num(state_->rank), ")");
  if (state_->unique_id.empty()) state_->unique_id = nvshmem().unique_id();
  return state_->unique_id;
}

at::Tensor Buffer::get_local_buffer_tensor(at::ScalarType dtype, int64_t offset,
                                           bool use_rdma_buffer) const {
  TORCH_CHECK_NOT_IMPLEMENTED(use_rdma_buffer, "get_local_buffer_tensor of the NVLink buffer is "
                              "not supported (its memory belongs to the kernels)");
  state_->live("get_local_buffer_tensor");
  TORCH_CHECK_VALUE(state_->has_ll, "buffer ", state_->name, " has no symmetric memory");
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t bytes = state_->workspace.numel();
  TORCH_CHECK_VALUE(offset >= 0 && offset % element == 0 && offset <= bytes,
                    "offset must be a non-negative multiple of ", num(element), " within ",
                    num(bytes), " bytes, got ", num(offset));
  return state_->workspace.narrow(0, offset, (bytes - offset) / element * element).view(dtype);
}

c10::cuda::CUDAStream Buffer::get_comm_stream() const {
  return c10::cuda::getCurrentCUDAStream(state_->device);
}

void Buffer::sync(const std::vector<int>& device_ids,
                  const std::vector<std::optional<std::string>>& all_gathered_handles,
                  const std::optional<std::string>& root_unique_id_opt) {
  State& s = *state_;
  TORCH_CHECK(!s.destroyed, "Buffer ", s.name, " was destroyed");
  TORCH_CHECK(!s.available, "Buffer ", s.name, " is synced already");
  TORCH_CHECK_VALUE(static_cast<int>(device_ids.size()) == s.num_ranks, "device_ids must have ",
                    num(s.num_ranks), " entries, got ", num(device_ids.size()));
  if (s.has_nvl) {
    TORCH_CHECK_VALUE(static_cast<int>(all_gathered_handles.size()) == s.num_ranks,
                      "all_gathered_handles must have ", num(s.num_ranks), " entries, got ",
                      num(all_gathered_handles.size()));
    std::vector<std::string> handles;
    for (int r = 0; r < s.num_ranks; ++r) {
      TORCH_CHECK_VALUE(all_gathered_handles[r].has_value(), "all_gathered_handles[", num(r),
                        "] is missing (every rank of a buffer with NVLink bytes has a handle)");
      handles.push_back(*all_gathered_handles[r]);
    }
    intranode_open(s.name, handles);
  }
  if (s.num_rdma_bytes > 0) {
    TORCH_CHECK_VALUE(root_unique_id_opt.has_value(), "root_unique_id_opt is required with "
                      "num_rdma_bytes > 0 (rank 0's get_local_nvshmem_unique_id())");
    const NvshmemApi& api = nvshmem();
    if (api.world().first < 0) {
      // The symmetric heap is sized when NVSHMEM starts: room for this buffer twice and more.
      const int64_t heap = std::max<int64_t>(2LL << 30, 2 * s.num_rdma_bytes + (256LL << 20));
      setenv("NVSHMEM_SYMMETRIC_SIZE", num(heap).c_str(), 0);
      api.join(*root_unique_id_opt, s.rank, s.num_ranks, s.device);
    }
    TORCH_CHECK_VALUE(api.world() == std::make_pair(s.rank, s.num_ranks), "NVSHMEM runs as PE ",
                      num(api.world().first), " of ", num(api.world().second), " in this "
                      "process; buffer ", s.name, " is rank ", num(s.rank), " of ",
                      num(s.num_ranks));
    const char* force = std::getenv("DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT");
    s.workspace = api.create(s.name, s.device, s.num_rdma_bytes, timeout_s(),
                             force != nullptr && std::string(force) == "1");
    s.has_ll = true;
  }
  s.available = true;
}

void Buffer::destroy() {
  State& s = *state_;
  if (s.destroyed) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(s.device));
  C10_CUDA_CHECK(cudaDeviceSynchronize());  // no kernel of ours still uses the memory
  if (s.has_nvl) intranode_destroy(s.name, true);
  if (s.has_ll) nvshmem().destroy(s.name, true);
  s.workspace = at::Tensor();
  s.destroyed = true;
}

std::tuple<Tensor, OptTensor, Tensor, Tensor, std::optional<EventHandle>>
Buffer::get_dispatch_layout(const Tensor& topk_idx, int num_experts,
                            std::optional<EventHandle>& previous_event, bool async,
                            bool /*allocate_on_comm_stream*/) {
  wait_for(previous_event);
  const int num_rdma_ranks = get_num_rdma_ranks();
  std::optional<std::vector<Tensor>> out =
      direct_get_dispatch_layout(topk_idx, num_experts, state_->num_ranks, num_rdma_ranks);
  if (!out) {
    auto [per_rank, per_rdma_rank, per_expert, in_rank] =
        op<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, int64_t, int64_t, int64_t)>(
            "deep_ep::get_dispatch_layout")
            .call(topk_idx, num_experts, state_->num_ranks, num_rdma_ranks);
    out = std::vector<Tensor>{per_rank, per_rdma_rank, per_expert, in_rank};
  }
  std::vector<Tensor>& o = *out;
  return {o[0], num_rdma_ranks > 1 ? OptTensor(o[1]) : std::nullopt, o[2], o[3],
          event_if(async)};
}

std::tuple<Tensor, OptTensor, OptTensor, OptTensor, std::vector<int>, Tensor, Tensor, Tensor,
           Tensor, Tensor, std::optional<EventHandle>>
Buffer::intranode_dispatch(const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
                           const OptTensor& topk_weights, const OptTensor& num_tokens_per_rank,
                           const Tensor& is_token_in_rank,
                           const OptTensor& num_tokens_per_expert, int cached_num_recv_tokens,
                           const OptTensor& cached_rank_prefix_matrix,
                           const OptTensor& /*cached_channel_prefix_matrix*/,
                           int expert_alignment, int num_worst_tokens, const Config& config,
                           std::optional<EventHandle>& previous_event, bool async,
                           bool /*allocate_on_comm_stream*/) {
  State& s = *state_;
  s.live("intranode_dispatch");
  wait_for(previous_event);
  const std::vector<int64_t> config_list = config.to_list();
  if (cached_rank_prefix_matrix) {
    TORCH_CHECK_VALUE(!topk_idx, "a cached dispatch (cached_rank_prefix_matrix given) takes no "
                      "topk_idx");
    const State::Handle h = s.find(*cached_rank_prefix_matrix, "intranode_dispatch");
    std::optional<std::vector<Tensor>> out = direct_cached_dispatch(
        x, x_scales, topk_weights, h.tensors, s.name, h.num_worst_tokens, config_list);
    if (!out) {
      reject_grad("intranode_dispatch", {x, x_scales, topk_weights});
      const std::vector<Tensor>& t = h.tensors;
      auto [recv_x, recv_scales, recv_weights] =
          op<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
              int64_t, c10::IntArrayRef)>("deep_ep::cached_dispatch")
              .call(x, x_scales, topk_weights, t[0], t[1], t[2], t[3], t[4], t[5], s.name,
                    h.num_worst_tokens, config_list);
      out = std::vector<Tensor>{recv_x, recv_scales, recv_weights};
    }
    TORCH_CHECK_VALUE(h.num_worst_tokens > 0 || (*out)[0].size(0) == cached_num_recv_tokens,
                      "cached_num_recv_tokens is ", num(cached_num_recv_tokens), " but the "
                      "handle receives ", num((*out)[0].size(0)), " rows");
    const std::vector<Tensor>& t = h.tensors;
    return {(*out)[0], x_scales ? OptTensor((*out)[1]) : std::nullopt, std::nullopt,
            topk_weights ? OptTensor((*out)[2]) : std::nullopt, {}, t[0], t[1], t[2], t[3],
            t[5], event_if(async)};
  }
  TORCH_CHECK_VALUE(num_tokens_per_rank.has_value(), "num_tokens_per_rank is required without "
                    "a cached handle (get_dispatch_layout gives it)");
  const bool capacity = num_worst_tokens > 0;
  std::optional<DirectDispatch> direct = direct_dispatch(
      x, x_scales, topk_idx, topk_weights, *num_tokens_per_rank, is_token_in_rank,
      num_tokens_per_expert, s.name, expert_alignment, capacity, num_worst_tokens, config_list,
      false);
  std::vector<Tensor> out;
  if (direct) {
    out = std::move(direct->out);
  } else {
    reject_grad("intranode_dispatch", {x, x_scales, topk_weights});
    using Result = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor>;
    const Result r = capacity
        ? op<Result(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                    const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t,
                    int64_t, c10::IntArrayRef)>("deep_ep::capacity_dispatch")
              .call(x, x_scales, topk_idx, topk_weights, *num_tokens_per_rank, is_token_in_rank,
                    num_tokens_per_expert, s.name, expert_alignment, num_worst_tokens,
                    config_list)
        : op<Result(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                    const Tensor&, const Tensor&, const OptTensor&, c10::string_view, int64_t,
                    c10::IntArrayRef)>("deep_ep::dispatch")
              .call(x, x_scales, topk_idx, topk_weights, *num_tokens_per_rank, is_token_in_rank,
                    num_tokens_per_expert, s.name, expert_alignment, config_list);
    out = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
           std::get<5>(r), std::get<6>(r), std::get<7>(r), std::get<8>(r), std::get<9>(r)};
  }
  // DeepEP returns the rows per local expert on the host, except in capacity mode.
  std::vector<int> per_expert;
  if (!capacity) {
    if (direct && direct->recv_per_expert) {
      per_expert = *direct->recv_per_expert;
    } else if (topk_idx || num_tokens_per_expert) {
      const Tensor counts = out[4].to(at::kCPU, at::kInt);
      per_expert.assign(counts.data_ptr<int>(), counts.data_ptr<int>() + counts.numel());
    }
  }
  s.keep({{out[5], out[6], out[7], out[8], is_token_in_rank, out[9]},
          capacity ? num_worst_tokens : 0});
  return {out[0], x_scales ? OptTensor(out[1]) : std::nullopt,
          topk_idx ? OptTensor(out[2]) : std::nullopt,
          topk_weights ? OptTensor(out[3]) : std::nullopt, std::move(per_expert), out[5], out[6],
          out[7], out[8], out[9], event_if(async)};
}

std::tuple<Tensor, OptTensor, std::optional<EventHandle>> Buffer::intranode_combine(
    const Tensor& x, const OptTensor& topk_weights, const OptTensor& bias_0,
    const OptTensor& bias_1, const Tensor& /*src_idx*/, const Tensor& rank_prefix_matrix,
    const Tensor& /*channel_prefix_matrix*/, const Tensor& /*send_head*/, const Config& config,
    std::optional<EventHandle>& previous_event, bool async, bool /*allocate_on_comm_stream*/) {
  State& s = *state_;
  s.live("intranode_combine");
  wait_for(previous_event);
  const State::Handle h = s.find(rank_prefix_matrix, "intranode_combine");
  const std::vector<int64_t> config_list = config.to_list();
  std::optional<std::vector<Tensor>> out = direct_combine(
      x, topk_weights, bias_0, bias_1, h.tensors, s.name, h.num_worst_tokens, config_list);
  if (!out) {
    reject_grad("intranode_combine", {x, topk_weights, bias_0, bias_1});
    const std::vector<Tensor>& t = h.tensors;
    auto [combined_x, combined_weights] =
        op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                      const OptTensor&, const Tensor&, const Tensor&,
                                      const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      c10::string_view, int64_t, c10::IntArrayRef)>(
            "deep_ep::combine")
            .call(x, topk_weights, bias_0, bias_1, t[0], t[1], t[2], t[3], t[4], t[5], s.name,
                  h.num_worst_tokens, config_list);
    out = std::vector<Tensor>{combined_x, combined_weights};
  }
  return {(*out)[0], topk_weights ? OptTensor((*out)[1]) : std::nullopt, event_if(async)};
}

std::tuple<Tensor, OptTensor, OptTensor, OptTensor, std::vector<int>, Tensor, Tensor, OptTensor,
           Tensor, OptTensor, Tensor, OptTensor, OptTensor, OptTensor, std::optional<EventHandle>>
Buffer::internode_dispatch(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&,
                           int, int, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, int, int, const Config&,
                           std::optional<EventHandle>&, bool, bool) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "Buffer::internode_dispatch: the internode path is not in "
                              "the C++ API yet (use the Python package's Buffer)");
}

std::tuple<Tensor, OptTensor, std::optional<EventHandle>> Buffer::internode_combine(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Config&, std::optional<EventHandle>&, bool, bool) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "Buffer::internode_combine: the internode path is not in "
                              "the C++ API yet (use the Python package's Buffer)");
}

void Buffer::clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden,
                                      int num_experts) {
  State& s = *state_;
  s.live("clean_low_latency_buffer");
  TORCH_CHECK_VALUE(s.has_ll, "buffer ", s.name, " has no low-latency memory (num_rdma_bytes)");
  op<void(const Tensor&, const std::string&, int64_t, int64_t, int64_t)>(
      "deep_ep::clean_low_latency_buffer")
      .call(s.workspace, s.name, num_max_dispatch_tokens_per_rank, hidden, num_experts);
}

std::tuple<Tensor, OptTensor, Tensor, Tensor, Tensor, std::optional<EventHandle>,
           std::optional<std::function<void()>>>
Buffer::low_latency_dispatch(const Tensor& x, const Tensor& topk_idx,
                             const OptTensor& cumulative_local_expert_recv_stats,
                             const OptTensor& dispatch_wait_recv_cost_stats,
                             int num_max_dispatch_tokens_per_rank, int num_experts, bool use_fp8,
                             bool round_scale, bool use_ue8m0, bool async,
                             bool return_recv_hook) {
  State& s = *state_;
  s.live("low_latency_dispatch");
  TORCH_CHECK_NOT_IMPLEMENTED(!dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats "
                              "is not supported");
  reject_grad("low_latency_dispatch", {x});
  using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
  using Signature = Outputs(const Tensor&, const Tensor&, const std::string&, int64_t, int64_t,
                            int64_t, bool, bool, bool);
  const bool split = return_recv_hook || cumulative_local_expert_recv_stats.has_value();
  const Outputs out =
      op<Signature>(split ? "deep_ep::low_latency_dispatch_send" : "deep_ep::low_latency_dispatch")
          .call(x, topk_idx, s.name, s.num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                use_fp8, round_scale, use_ue8m0);
  std::optional<std::function<void()>> hook;
  if (split) {
    const std::string name = s.name;
    std::function<void()> receive = [out, name, stats = cumulative_local_expert_recv_stats] {
      op<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const OptTensor&, const std::string&)>("deep_ep::low_latency_dispatch_recv")
          .call(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
                std::get<4>(out), stats, name);
    };
    if (return_recv_hook) {
      hook = std::move(receive);
    } else {
      receive();  // the statistics need the receive half of the op
    }
  }
  return {std::get<0>(out), use_fp8 ? OptTensor(std::get<1>(out)) : std::nullopt,
          std::get<2>(out), std::get<3>(out), std::get<4>(out), event_if(async),
          std::move(hook)};
}

std::tuple<Tensor, std::optional<EventHandle>, std::optional<std::function<void()>>>
Buffer::low_latency_combine(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                            const Tensor& src_info, const Tensor& layout_range,
                            const OptTensor& combine_wait_recv_cost_stats,
                            int num_max_dispatch_tokens_per_rank, int num_experts,
                            bool use_logfmt, bool zero_copy, bool async, bool return_recv_hook,
                            const OptTensor& out) {
  State& s = *state_;
  s.live("low_latency_combine");
  TORCH_CHECK_NOT_IMPLEMENTED(!use_logfmt, "use_logfmt (LogFMT-compressed combine) is not "
                              "supported");
  TORCH_CHECK_NOT_IMPLEMENTED(!combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats is "
                              "not supported");
  reject_grad("low_latency_combine", {x, topk_weights, out});
  using Inputs = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const std::string&, int64_t, int64_t, int64_t, bool);
  std::optional<std::function<void()>> hook;
  Tensor combined;
  if (return_recv_hook) {
    const Tensor pending =
        op<Inputs>("deep_ep::low_latency_combine_send")
            .call(x, topk_idx, topk_weights, src_info, layout_range, s.name, s.num_ranks,
                  num_max_dispatch_tokens_per_rank, num_experts, zero_copy);
    hook = [pending, topk_idx, topk_weights, name = s.name, out] {
      op<void(const Tensor&, const Tensor&, const Tensor&, const std::string&)>(
          "deep_ep::low_latency_combine_recv")
          .call(pending, topk_idx, topk_weights, name);
      if (out) out->copy_(pending);
    };
    combined = out ? *out : pending;
  } else if (out) {
    op<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
            const std::string&, int64_t, int64_t, int64_t, bool, const Tensor&)>(
        "deep_ep::low_latency_combine_out")
        .call(x, topk_idx, topk_weights, src_info, layout_range, s.name, s.num_ranks,
              num_max_dispatch_tokens_per_rank, num_experts, zero_copy, *out);
    combined = *out;
  } else {
    combined = op<Inputs>("deep_ep::low_latency_combine")
                   .call(x, topk_idx, topk_weights, src_info, layout_range, s.name, s.num_ranks,
                         num_max_dispatch_tokens_per_rank, num_experts, zero_copy);
  }
  return {combined, event_if(async), std::move(hook)};
}

at::Tensor Buffer::get_next_low_latency_combine_buffer(int num_max_dispatch_tokens_per_rank,
                                                       int hidden, int num_experts) const {
  const State& s = *state_;
  s.live("get_next_low_latency_combine_buffer");
  const int64_t num_local = num_experts / s.num_ranks;
  const int64_t rows = static_cast<int64_t>(s.num_ranks) * num_max_dispatch_tokens_per_rank;
  const int64_t count = num_local * rows * hidden;
  const int64_t bytes = s.has_ll ? s.workspace.numel() : 0;
  TORCH_CHECK_VALUE(bytes >= 2 * count, "the low-latency buffer has ", num(bytes), " bytes but "
                    "the combine buffer needs ", num(2 * count), "; create the Buffer with "
                    "low_latency_mode=true and num_rdma_bytes >= "
                    "get_low_latency_rdma_size_hint(...)");
  return s.workspace.narrow(0, 0, 2 * count).view(at::kBFloat16).view({num_local, rows, hidden});
}

}  // namespace deep_ep_ops
