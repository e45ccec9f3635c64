// Torch bindings of the CUDA kernels: argument checks, output allocation, launch on the
// current stream, and registration for the CUDA dispatch key of the deep_ep ops (whose schemas
// are defined in Python, deep_ep_ops/_library.py). Ops without a CUDA kernel here fall back to
// the reference backend over NCCL (registered from Python).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels/api.h"

namespace deep_ep_ops {
namespace {

// Numbers enter messages through std::to_string: streaming an integer into an ostream from this
// extension crashed (seen on the H200 image: torch 2.11, gcc 13 headers), as the extension's
// instantiation of the ostream inserter does not match the process's libstdc++.
std::string num(int64_t value) { return std::to_string(value); }

std::string shape(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + num(t.size(d));
  return out + ")";
}

// Per-device state, allocated once and never freed (CUDA graphs may hold its addresses):
// - the error word, in mapped pinned host memory: kernels store a DeviceError code, the next
//   op call reads it without synchronising and raises;
// - the layout kernel's partial histograms and its ticket counter.
struct DeviceState {
  int* error_host = nullptr;
  int* error_device = nullptr;
  int* layout_workspace = nullptr;  // one unsigned ticket, then the partial histograms
  int layout_workspace_ints = 0;
};

// Allocation may happen during a CUDA graph capture (the first call of a process can be
// captured); it is not part of the graph, so allow it for this thread.
class RelaxedCapture {
 public:
  RelaxedCapture() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

std::mutex state_mutex;

DeviceState& device_state(int device) {
  static std::unordered_map<int, DeviceState> states;
  std::lock_guard<std::mutex> lock(state_mutex);
  DeviceState& state = states[device];
  if (state.error_host == nullptr) {
    RelaxedCapture relaxed;
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&state.error_host), sizeof(int),
                                 cudaHostAllocMapped));
    *state.error_host = kErrorNone;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&state.error_device),
                                            state.error_host, 0));
  }
  return state;
}

// Raise (once) an error a kernel reported since the last call; returns the device word.
int* checked_error_word(const char* op, int device) {
  DeviceState& state = device_state(device);
  const int code = *reinterpret_cast<volatile int*>(state.error_host);
  if (code != kErrorNone) {
    *state.error_host = kErrorNone;
    TORCH_CHECK_VALUE(code != kErrorExpertOutOfRange, "deep_ep::", op,
                      ": an earlier call on cuda:", num(device),
                      " saw topk_idx entries outside [-1, num_experts); its results are invalid");
    TORCH_CHECK(false, "deep_ep::", op, ": an earlier kernel reported error code ", num(code));
  }
  return state.error_device;
}

// The layout kernel's ticket counter (zero between launches) followed by room for at least
// `ints` partial-histogram ints. The ticket sits first so that every call finds it at the same
// place whatever its size. Grows, never shrinks (an old one stays allocated: a captured graph
// may still use it).
int* layout_workspace(int device, int ints) {
  DeviceState& state = device_state(device);
  std::lock_guard<std::mutex> lock(state_mutex);
  if (state.layout_workspace_ints < ints) {
    RelaxedCapture relaxed;
    const size_t bytes = sizeof(int) * (static_cast<size_t>(ints) + 1);
    int* workspace = nullptr;
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&workspace), bytes));
    cudaStream_t side;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    C10_CUDA_CHECK(cudaMemsetAsync(workspace, 0, bytes, side));
    C10_CUDA_CHECK(cudaStreamSynchronize(side));
    C10_CUDA_CHECK(cudaStreamDestroy(side));
    state.layout_workspace = workspace;
    state.layout_workspace_ints = ints;
  }
  return state.layout_workspace;
}

int num_sms(int device) {
  return at::cuda::getDeviceProperties(device)->multiProcessorCount;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> get_dispatch_layout(
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
  const auto i32 = topk.options().dtype(at::kInt);
  at::Tensor per_rank = at::empty({num_ranks}, i32);
  at::Tensor per_rdma_rank = at::empty({num_rdma_ranks}, i32);
  at::Tensor per_expert = at::empty({num_experts}, i32);
  at::Tensor in_rank = at::empty({topk.size(0), num_ranks}, topk.options().dtype(at::kBool));
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

}  // namespace
}  // namespace deep_ep_ops

TORCH_LIBRARY_IMPL(deep_ep, CUDA, m) {
  m.impl("get_dispatch_layout", &deep_ep_ops::get_dispatch_layout);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of deep_ep_ops (registered for the deep_ep ops on import)";
}
