// deep_ep_ops._C: the Python bindings of libdeep_ep_ops (the NVLink kernels, csrc/ops.cpp). The
// library registers the CUDA kernels of the deep_ep ops and keeps the NVLink runtimes; this
// module lends it the package's reference backend and argument checks (the hooks) and gives
// Python the runtimes and the eager direct entries (deep_ep_ops.ops._direct), building the ops
// module's named tuples here.

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "bridge.h"
#include "python_common.h"

namespace {

using at::Tensor;
using Ints = std::vector<int64_t>;
using OptTensor = c10::optional<at::Tensor>;
namespace dp = deep_ep_ops::python;

// The ops module's named tuples of a dispatch's results (ops.DispatchOutput, DispatchHandle),
// set once when it is imported (references kept for the process).
std::pair<PyObject*, PyObject*>& dispatch_result_types() {
  static std::pair<PyObject*, PyObject*> types{nullptr, nullptr};
  return types;
}

// (DispatchOutput(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
// num_recv_tokens_per_expert, DispatchHandle(rank_prefix_matrix, channel_prefix_matrix,
// recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, num_worst_tokens)),
// host_counts) from a dispatch's ten outputs.
py::object dispatch_output_to_python(std::vector<at::Tensor>&& out,
                                     const at::Tensor& is_token_in_rank, int64_t num_worst_tokens,
                                     py::object host_counts) {
  const auto [output_type, handle_type] = dispatch_result_types();
  TORCH_CHECK(output_type != nullptr, "deep_ep_ops: the dispatch result types are not set "
              "(deep_ep_ops.ops sets them when imported)");
  auto take = [&](size_t i) { return py::cast(std::move(out[i])).release().ptr(); };
  PyObject* handle = dp::new_named_tuple(
      handle_type, {take(5), take(6), take(7), take(8), py::cast(is_token_in_rank).release().ptr(),
                    take(9), PyLong_FromLongLong(num_worst_tokens)});
  PyObject* output = dp::new_named_tuple(output_type,
                                         {take(0), take(1), take(2), take(3), take(4), handle});
  py::tuple result(2);
  result[0] = py::reinterpret_steal<py::object>(output);
  result[1] = std::move(host_counts);
  return std::move(result);
}

py::object tensors_or_none(std::optional<std::vector<at::Tensor>>&& out) {
  return out ? dp::to_python(std::move(*out)) : py::none();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of deep_ep_ops: bindings of libdeep_ep_ops, which registers them "
                 "for the deep_ep ops when loaded";
  dp::bind_library(module, {deep_ep_ops::nvl_source_hash(), &deep_ep_ops::set_nvl_fallback_hook,
                            &deep_ep_ops::set_nvl_check_hook, &deep_ep_ops::nvl_host_trace_take,
                            &deep_ep_ops::nvl_op_names, "Python implementation of an op for buffers without an NVLink runtime"});
  module.def("intranode_create", [](const std::string& name, int device, int rank, int num_ranks,
                                    int64_t num_nvl_bytes, double timeout_s) {
    return py::bytes(deep_ep_ops::intranode_create(name, device, rank, num_ranks, num_nvl_bytes,
                                                   timeout_s));
  }, "Allocate a buffer's NVLink memory; returns its IPC handle");
  module.def("intranode_open", &deep_ep_ops::intranode_open,
             "Map the peers' NVLink memory (IPC handles indexed by rank)");
  module.def("intranode_destroy", &deep_ep_ops::intranode_destroy,
             "Forget a buffer's runtime; free its memory when free_memory is true");
  module.def("nvl_buffer_size_hint", &deep_ep_ops::nvl_buffer_size_hint,
             "The NVLink bytes the kernels require (tests hold it equal to "
             "Config.get_nvl_buffer_size_hint)");
  module.def("check_device_errors", &deep_ep_ops::check_device_errors,
             "Raise an error a kernel on this device reported since the last op call");
  // The op kernels again, called from Python without the dispatcher (see ops._direct in
  // deep_ep_ops/ops.py); each returns None where the call must take the ops instead. Same code,
  // same checks. With inputs that require grad, the library records the backward from C++; an
  // FP8 payload takes the ops (only its weights are differentiable).
  module.def("get_dispatch_layout", [](const Tensor& topk_idx, int64_t num_experts,
                                       int64_t num_ranks, int64_t num_rdma_ranks) {
    return tensors_or_none(deep_ep_ops::direct_get_dispatch_layout(topk_idx, num_experts,
                                                                   num_ranks, num_rdma_ranks));
  });
  // dispatch and capacity_dispatch return (DispatchOutput, host counts): the ops module's named
  // tuples (set_result_types), built here, and the host list of rows per local expert
  // (Buffer.dispatch's num_recv_tokens_per_expert_list), read from mapped memory without a copy;
  // None for capacity mode or when the call ran the reference.
  module.def("set_result_types", [](py::object output, py::object handle) {
    dispatch_result_types() = {output.release().ptr(), handle.release().ptr()};
  }, "The named tuples the direct dispatch entries return (ops.DispatchOutput, DispatchHandle)");
  auto direct_dispatch = [](const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
                            const OptTensor& topk_weights, const Tensor& num_tokens_per_rank,
                            const Tensor& is_token_in_rank, const OptTensor& num_tokens_per_expert,
                            const std::string& buffer, int64_t expert_alignment, bool capacity,
                            int64_t num_worst_tokens, const Ints& config,
                            bool lean) -> py::object {
    std::optional<deep_ep_ops::DirectDispatch> result = deep_ep_ops::direct_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
        num_tokens_per_expert, buffer, expert_alignment, capacity, num_worst_tokens, config, lean);
    if (!result) return py::none();
    py::object counts = result->recv_per_expert ? py::cast(*result->recv_per_expert) : py::none();
    return dispatch_output_to_python(std::move(result->out), is_token_in_rank, num_worst_tokens,
                                     std::move(counts));
  };
  module.def("dispatch", [direct_dispatch](
      const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
      const OptTensor& topk_weights, const Tensor& num_tokens_per_rank,
      const Tensor& is_token_in_rank, const OptTensor& num_tokens_per_expert,
      const std::string& buffer, int64_t expert_alignment, const Ints& config, bool lean) {
    return direct_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                           is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                           false, 0, config, lean);
  }, py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"),
     py::arg("num_tokens_per_rank"), py::arg("is_token_in_rank"),
     py::arg("num_tokens_per_expert"), py::arg("buffer"), py::arg("expert_alignment"),
     py::arg("config"), py::arg("lean") = false);
  module.def("capacity_dispatch", [direct_dispatch](
      const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
      const OptTensor& topk_weights, const Tensor& num_tokens_per_rank,
      const Tensor& is_token_in_rank, const OptTensor& num_tokens_per_expert,
      const std::string& buffer, int64_t expert_alignment, int64_t num_worst_tokens,
      const Ints& config, bool lean) {
    return direct_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                           is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                           true, num_worst_tokens, config, lean);
  }, py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"),
     py::arg("num_tokens_per_rank"), py::arg("is_token_in_rank"),
     py::arg("num_tokens_per_expert"), py::arg("buffer"), py::arg("expert_alignment"),
     py::arg("num_worst_tokens"), py::arg("config"), py::arg("lean") = false);
  module.def("cached_dispatch", [](const Tensor& x, const OptTensor& x_scales,
                                   const OptTensor& topk_weights, const Tensor& rank_prefix,
                                   const Tensor& channel_prefix, const Tensor& recv_channel_prefix,
                                   const Tensor& recv_src_idx, const Tensor& is_token_in_rank,
                                   const Tensor& send_head, const std::string& buffer,
                                   int64_t num_worst_tokens, const Ints& config) {
    return tensors_or_none(deep_ep_ops::direct_cached_dispatch(
        x, x_scales, topk_weights,
        {rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, is_token_in_rank,
         send_head},
        buffer, num_worst_tokens, config));
  });
  module.def("combine", [](const Tensor& x, const OptTensor& topk_weights, const OptTensor& bias_0,
                           const OptTensor& bias_1, const Tensor& rank_prefix,
                           const Tensor& channel_prefix, const Tensor& recv_channel_prefix,
                           const Tensor& recv_src_idx, const Tensor& is_token_in_rank,
                           const Tensor& send_head, const std::string& buffer,
                           int64_t num_worst_tokens, const Ints& config) {
    return tensors_or_none(deep_ep_ops::direct_combine(
        x, topk_weights, bias_0, bias_1,
        {rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, is_token_in_rank,
         send_head},
        buffer, num_worst_tokens, config));
  });
}
