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

// One error word per device, in mapped pinned host memory: kernels store a DeviceError code,
// the next op call reads it without synchronising and raises.
struct ErrorWord {
  int* host = nullptr;
  int* device = nullptr;
};

ErrorWord& error_word(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, ErrorWord> words;
  std::lock_guard<std::mutex> lock(mutex);
  ErrorWord& word = words[device];
  if (word.host == nullptr) {
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&word.host), sizeof(int),
                                 cudaHostAllocMapped));
    *word.host = kErrorNone;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&word.device), word.host, 0));
  }
  return word;
}

// Raise (once) an error a kernel reported since the last call.
int* checked_error_word(const char* op, int device) {
  ErrorWord& word = error_word(device);
  const int code = *reinterpret_cast<volatile int*>(word.host);
  if (code != kErrorNone) {
    *word.host = kErrorNone;
    TORCH_CHECK_VALUE(code != kErrorExpertOutOfRange, "deep_ep::", op,
                      ": an earlier call on cuda:", num(device),
                      " saw topk_idx entries outside [-1, num_experts); its results are invalid");
    TORCH_CHECK(false, "deep_ep::", op, ": an earlier kernel reported error code ", num(code));
  }
  return word.device;
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
  C10_CUDA_CHECK(launch_get_dispatch_layout(
      topk.data_ptr<int64_t>(), static_cast<int>(topk.size(0)), static_cast<int>(topk.size(1)),
      static_cast<int>(num_experts), static_cast<int>(num_ranks),
      static_cast<int>(num_rdma_ranks), per_rank.data_ptr<int>(), per_rdma_rank.data_ptr<int>(),
      per_expert.data_ptr<int>(), in_rank.data_ptr<bool>(), error, num_sms(device),
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
