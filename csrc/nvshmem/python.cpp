// deep_ep_ops._C_nvshmem: the Python bindings of libdeep_ep_ops_nvshmem (the low-latency NVSHMEM
// kernels, csrc/nvshmem/ops.cpp). The library registers the CUDA kernels of the low-latency ops
// and keeps the NVSHMEM runtimes; this module lends it the package's reference backend, argument
// checks and pin agreement (the hooks) and gives Python the runtimes, the internode development
// entries and the eager direct entries (deep_ep_ops.ops._direct), building the ops module's
// named tuples here.

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "nvshmem/bridge.h"
#include "python_common.h"

namespace {

using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;
namespace dp = deep_ep_ops::python;

// The ranks' agreement on the shapes a buffer's first call pins (reference.
// agree_on_pinned_shapes, set at import). Leaked like the hook tables.
py::object& pin_agreement() {
  static auto& fn = *new py::object();
  return fn;
}

// The library's pin agreement hook: the ranks' disagreement (a ValueError) crosses as a
// c10::ValueError, which leaves the buffer usable; any other error breaks it.
void agree_on_pinned_shapes(const std::string& op, const std::string& buffer, int64_t num_max,
                            int64_t hidden, int64_t num_experts) {
  if (!pin_agreement() || !Py_IsInitialized()) return;
  py::gil_scoped_acquire gil;
  try {
    pin_agreement()(op, buffer, num_max, hidden, num_experts);
  } catch (py::error_already_set& error) {
    TORCH_CHECK_VALUE(!error.matches(PyExc_ValueError), std::string(py::str(error.value())));
    throw;
  }
}

// The ops module's named tuples of a low-latency dispatch's results (ops.LowLatencyDispatchOutput,
// LowLatencyHandle), set once when it is imported (references kept for the process).
std::pair<PyObject*, PyObject*>& dispatch_result_types() {
  static std::pair<PyObject*, PyObject*> types{nullptr, nullptr};
  return types;
}

// LowLatencyDispatchOutput(recv_x, recv_x_scales (None for BF16), recv_count,
// LowLatencyHandle(src_info, layout_range, num_max, hidden, num_experts)) from the five outputs,
// without a Python frame per tuple; None where the call must take the ops.
py::object dispatch_output_to_python(std::optional<std::vector<Tensor>>&& out, bool use_fp8,
                                     int64_t num_max, int64_t hidden, int64_t num_experts) {
  if (!out) return py::none();
  const auto [output_type, handle_type] = dispatch_result_types();
  TORCH_CHECK(output_type != nullptr, "deep_ep_ops: the low-latency result types are not set "
              "(deep_ep_ops.ops sets them when imported)");
  auto take = [&](size_t i) { return py::cast(std::move((*out)[i])).release().ptr(); };
  PyObject* scales = use_fp8 ? take(1) : (Py_INCREF(Py_None), Py_None);
  PyObject* handle = dp::new_named_tuple(
      handle_type, {take(3), take(4), PyLong_FromLongLong(num_max), PyLong_FromLongLong(hidden),
                    PyLong_FromLongLong(num_experts)});
  return py::reinterpret_steal<py::object>(
      dp::new_named_tuple(output_type, {take(0), scales, take(2), handle}));
}

py::dict offsets_to_python(const deep_ep_ops::LayoutOffsets& offsets) {
  py::dict out;
  for (const auto& [name, value] : offsets) out[py::str(name)] = value;
  return out;
}

py::object tensor_or_none(std::optional<Tensor>&& out) {
  return out ? py::cast(std::move(*out)) : py::none();
}

py::object true_or_none(bool ran) { return ran ? py::object(py::bool_(true)) : py::none(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Low-latency NVSHMEM kernels of deep_ep_ops (registered for the deep_ep ops on "
                 "import)";
  dp::bind_library(module, {deep_ep_ops::ll_source_hash(), &deep_ep_ops::set_ll_fallback_hook,
                            &deep_ep_ops::set_ll_check_hook, &deep_ep_ops::ll_host_trace_take,
                            &deep_ep_ops::ll_op_names, "Python implementation of an op for calls the kernels do not take"});
  deep_ep_ops::set_pin_agreement_hook(agree_on_pinned_shapes);
  module.def("unique_id", [] { return py::bytes(deep_ep_ops::nvshmem_unique_id_bytes()); },
             "NVSHMEM unique id bytes (rank 0 makes it)");
  module.def("join", &deep_ep_ops::nvshmem_join_job,
             "Join the NVSHMEM job: (unique_id, rank, num_ranks, device)");
  module.def("create", &deep_ep_ops::ll_create,
             "Collective: a buffer's symmetric memory, as a uint8 CUDA tensor");
  module.def("mapped_peers", &deep_ep_ops::ll_mapped_peers,
             "Peers of a buffer reached with loads/stores (the others through NVSHMEM puts)");
  module.def("destroy", &deep_ep_ops::ll_destroy,
             "Forget a buffer's runtime; free its memory (collective) when free_memory is true");
  module.def("low_latency_buffer_bytes", &deep_ep_ops::low_latency_buffer_bytes,
             "The symmetric bytes the kernels require (tests hold it equal to "
             "get_low_latency_rdma_size_hint)");
  module.def("set_pin_agreement", [](py::object fn) { pin_agreement() = std::move(fn); },
             "Python agreement of the ranks on the shapes a buffer's first call pins");
  module.def("check_device_errors", &deep_ep_ops::ll_check_device_errors,
             "Raise an error a low-latency kernel on this device reported since the last call");
  module.def("internode_forward", [](const std::string& buffer, const Tensor& x,
                                     const OptTensor& x_scales, const OptTensor& topk_idx,
                                     const OptTensor& topk_weights, const Tensor& is_token_in_rank,
                                     const OptTensor& num_tokens_per_expert,
                                     int64_t ranks_per_node, int64_t num_blocks) {
    deep_ep_ops::InternodeForwardResult result = deep_ep_ops::internode_forward(
        buffer, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
        ranks_per_node, num_blocks);
    return py::make_tuple(std::move(result.send_rdma_head), std::move(result.num_tokens_per_node),
                          offsets_to_python(result.offsets));
  }, "Development: the internode forward stage alone on a buffer's symmetric memory");
  module.def("internode_return_layout", [](const std::string& buffer, int64_t row_bytes,
                                           int64_t weight_bytes, int64_t ranks_per_node) {
    return offsets_to_python(deep_ep_ops::internode_return_offsets(buffer, row_bytes,
                                                                   weight_bytes, ranks_per_node));
  }, "The offsets of the internode combine's way back for rows and weights of a width");
  module.def("internode_return", &deep_ep_ops::internode_return,
             "The internode combine's way back: staged partials to their sources");
  // The op kernels again, called from Python without the dispatcher (see ops._direct in
  // deep_ep_ops/ops.py); each returns None where the call must take the ops instead. The
  // dispatch entries return the ops module's named tuples (set_result_types), built here.
  module.def("set_result_types", [](py::object output, py::object handle) {
    dispatch_result_types() = {output.release().ptr(), handle.release().ptr()};
  }, "The named tuples the direct dispatch entries return (ops.LowLatencyDispatchOutput, "
     "LowLatencyHandle)");
  module.def("low_latency_dispatch", [](const Tensor& x, const Tensor& topk_idx,
                                        const std::string& buffer, int64_t num_ranks,
                                        int64_t num_max, int64_t num_experts, bool use_fp8,
                                        bool round_scale, bool use_ue8m0,
                                        const OptTensor& stats) {
    return dispatch_output_to_python(
        deep_ep_ops::direct_low_latency_dispatch(x, topk_idx, buffer, num_ranks, num_max,
                                                 num_experts, use_fp8, round_scale, use_ue8m0,
                                                 stats),
        use_fp8, num_max, x.size(1), num_experts);
  });
  module.def("low_latency_dispatch_send", [](const Tensor& x, const Tensor& topk_idx,
                                             const std::string& buffer, int64_t num_ranks,
                                             int64_t num_max, int64_t num_experts, bool use_fp8,
                                             bool round_scale, bool use_ue8m0) {
    return dispatch_output_to_python(
        deep_ep_ops::direct_low_latency_dispatch_send(x, topk_idx, buffer, num_ranks, num_max,
                                                      num_experts, use_fp8, round_scale,
                                                      use_ue8m0),
        use_fp8, num_max, x.size(1), num_experts);
  });
  module.def("low_latency_dispatch_recv", [](const Tensor& recv_x, const Tensor& recv_x_scales,
                                             const Tensor& recv_count, const Tensor& src_info,
                                             const Tensor& layout_range, const OptTensor& stats,
                                             const std::string& buffer) {
    return true_or_none(deep_ep_ops::direct_low_latency_dispatch_recv(
        recv_x, recv_x_scales, recv_count, src_info, layout_range, stats, buffer));
  });
  module.def("low_latency_combine", [](const Tensor& x, const Tensor& topk_idx,
                                       const Tensor& topk_weights, const Tensor& src_info,
                                       const Tensor& layout_range, const std::string& buffer,
                                       int64_t num_ranks, int64_t num_max, int64_t num_experts,
                                       bool zero_copy) {
    return tensor_or_none(deep_ep_ops::direct_low_latency_combine(
        x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
        num_experts, zero_copy));
  });
  module.def("low_latency_combine_out", [](const Tensor& x, const Tensor& topk_idx,
                                           const Tensor& topk_weights, const Tensor& src_info,
                                           const Tensor& layout_range, const std::string& buffer,
                                           int64_t num_ranks, int64_t num_max,
                                           int64_t num_experts, bool zero_copy,
                                           const Tensor& out) {
    return true_or_none(deep_ep_ops::direct_low_latency_combine_out(
        x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
        num_experts, zero_copy, out));
  });
  module.def("low_latency_combine_send", [](const Tensor& x, const Tensor& topk_idx,
                                            const Tensor& topk_weights, const Tensor& src_info,
                                            const Tensor& layout_range, const std::string& buffer,
                                            int64_t num_ranks, int64_t num_max,
                                            int64_t num_experts, bool zero_copy) {
    return tensor_or_none(deep_ep_ops::direct_low_latency_combine_send(
        x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
        num_experts, zero_copy));
  });
  module.def("low_latency_combine_recv", [](const Tensor& combined_x, const Tensor& topk_idx,
                                            const Tensor& topk_weights,
                                            const std::string& buffer) {
    return true_or_none(deep_ep_ops::direct_low_latency_combine_recv(combined_x, topk_idx,
                                                                     topk_weights, buffer));
  });
}
