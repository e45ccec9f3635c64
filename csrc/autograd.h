// The eager fast path with autograd: pieces shared by the C++ autograd functions of both
// extensions (csrc/bindings.cpp, csrc/nvshmem/bindings.cpp).
//
// An eager call whose inputs require grad used to take torch.ops and the Python autograd kernel
// of torch.library (about 80 us of host time per call on the H200 machine). The direct entries
// instead record the same backward node from C++ (torch::autograd::Function), with the same
// formulas as deep_ep_ops/_autograd.py; the backward calls the deep_ep ops through the
// dispatcher, by argument name, so a double backward (create_graph) and the reference fallback
// see them as ops. Call forms this path does not cover return None from their entry and take
// torch.ops, whose Python autograd kernels also raise for the forms without a gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "torch_common.h"

namespace deep_ep_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// How an eager call may run: through torch.ops, or directly (with or without autograd).
enum class Direct { kOps, kPlain, kAutograd };

inline bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
inline bool requires_grad(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->requires_grad();
}

// As eager_direct_ok, but a tensor requiring grad (in grad mode) selects kAutograd instead of
// the ops.
template <typename... Tensors>
Direct eager_direct_mode(const Tensors&... tensors) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return Direct::kOps;
  if (!(direct_ok_tensor(tensors, false) && ...)) return Direct::kOps;
  const bool grad = at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
  return grad ? Direct::kAutograd : Direct::kPlain;
}

inline c10::IValue ivalue(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? c10::IValue(*t) : c10::IValue();
}

// deep_ep::<op> through the dispatcher with its arguments by schema name; returns its outputs.
// Without grad mode (a backward without create_graph) it runs below autograd, skipping the ops'
// Python autograd kernels, which would only do the same.
using NamedArgs = std::vector<std::pair<const char*, c10::IValue>>;
inline std::vector<c10::IValue> call_op(const char* op, NamedArgs args) {
  const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow((std::string("deep_ep::") + op).c_str(), "");
  torch::jit::Stack stack;
  for (const c10::Argument& argument : handle.schema().arguments()) {
    auto it = std::find_if(args.begin(), args.end(),
                           [&](const auto& named) { return argument.name() == named.first; });
    TORCH_INTERNAL_ASSERT(it != args.end(), "deep_ep::", op, ": the backward passes no ",
                          argument.name());
    stack.push_back(std::move(it->second));
  }
  if (at::GradMode::is_enabled()) {
    handle.callBoxed(&stack);
  } else {
    const at::AutoDispatchBelowADInplaceOrView below;
    handle.callBoxed(&stack);
  }
  return stack;
}

// `args` followed by `more`.
inline NamedArgs with(NamedArgs args, const NamedArgs& more) {
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

inline at::Tensor tensor_or_undefined(const c10::IValue& v) {
  return v.isTensor() ? v.toTensor() : at::Tensor();
}

inline py::object to_python(variable_list outputs) {
  py::tuple result(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) result[i] = py::cast(std::move(outputs[i]));
  return std::move(result);
}

template <typename... Ts>
variable_list to_list(std::tuple<Ts...>&& outputs) {
  return std::apply([](auto&&... t) { return variable_list{std::move(t)...}; }, std::move(outputs));
}

// Marks the outputs without a gradient: every integer or boolean one, and `also` (one call:
// mark_non_differentiable replaces the set it was given before).
inline void mark_non_differentiable(AutogradContext* ctx, const variable_list& outputs,
                                    variable_list also = {}) {
  for (const at::Tensor& t : outputs)
    if (t.defined() && !at::isFloatingType(t.scalar_type())) also.push_back(t);
  ctx->mark_non_differentiable(also);
}

// float64 if any of the dtypes is, else float32 (_autograd._weight_dtype).
inline at::ScalarType accumulation_dtype(std::initializer_list<at::ScalarType> dtypes) {
  for (at::ScalarType d : dtypes)
    if (d == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// [T, K] bool: topk_idx[t, k] >= 0 and no earlier k names the same expert
// (_autograd._first_occurrence).
inline at::Tensor first_occurrence(const at::Tensor& topk_idx) {
  const int64_t k = topk_idx.size(1);
  const at::Tensor earlier =
      at::ones({k, k}, topk_idx.options().dtype(at::kBool)).tril(-1);
  const at::Tensor repeated =
      (topk_idx.unsqueeze(2).eq(topk_idx.unsqueeze(1)).logical_and(earlier)).any(2);
  return topk_idx.ge(0).logical_and(repeated.logical_not());
}

// The receive halves complete their arguments in place below autograd: the send stays their
// producer for autograd, and their version counters move on (a tensor saved before the
// receive then raises at backward). Refuses (false: take the ops, which raise) a leaf that
// requires grad in grad mode.
inline bool completable(std::initializer_list<const at::Tensor*> mutated) {
  if (!at::GradMode::is_enabled()) return true;
  for (const at::Tensor* t : mutated)
    if (t->defined() && t->requires_grad() && t->is_leaf()) return false;
  return true;
}
inline void bump_versions(std::initializer_list<const at::Tensor*> mutated) {
  for (const at::Tensor* t : mutated)
    if (t->defined()) t->unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace deep_ep_ops
