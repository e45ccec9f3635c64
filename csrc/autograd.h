// The eager fast path with autograd: pieces shared by the C++ autograd functions of both
// libraries (csrc/ops.cpp, csrc/nvshmem/ops.cpp). Python-free.
//
// An eager call whose inputs require grad used to take torch.ops and the Python autograd kernel
// of torch.library (about 80 us of host time per call on the H200 machine). The direct entries
// instead record the backward from C++ (a plain Node per call, EagerBackward below), with the
// same formulas as deep_ep_ops/_autograd.py; the backward calls the deep_ep ops through the
// dispatcher, by argument name, so a double backward (create_graph) and the reference fallback
// see them as ops. Call forms this path does not cover return None from their entry and take
// torch.ops, whose Python autograd kernels also raise for the forms without a gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "torch_common.h"

namespace deep_ep_ops {
namespace {

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

template <typename... Ts>
variable_list to_list(std::tuple<Ts...>&& outputs) {
  return std::apply([](auto&&... t) { return variable_list{std::move(t)...}; }, std::move(outputs));
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

// --- backward nodes of the eager calls ---------------------------------------------------------
//
// torch::autograd::Function costs an eager call about 12 µs of host time on the H200 machine
// (issue 11's host trace, 2026-12-03): a context map of IValues, input and output metadata for
// every one of a dispatch's ten outputs, a SavedVariable per saved tensor. The normal-mode
// calls record a plain Node instead: next edges to the differentiable inputs, history on the
// differentiable outputs only (the integer handle tensors stay plain tensors, as
// mark_non_differentiable leaves them), the tensors the backward needs kept as tensors with
// their versions at forward (a later in-place change raises at backward, as SavedVariable
// does), sizes instead of saved outputs where the backward needs only a zero of their shape.
// None of the kept tensors is a differentiable output of its node, so keeping them makes no
// reference cycle.
class EagerBackward : public torch::autograd::Node {
 public:
  // Keeps `tensors` for the backward, with their versions now; the last `unchecked` of them
  // without (tensors a later call completes in place on purpose: a split op's receive).
  void keep(std::vector<at::Tensor> tensors, size_t unchecked = 0) {
    kept_ = std::move(tensors);
    versions_.clear();
    for (size_t i = 0; i < kept_.size(); ++i)
      versions_.push_back(i + unchecked >= kept_.size() || !kept_[i].defined()
                              ? kUnchecked : kept_[i]._version());
  }

  void release_variables() override {
    kept_.clear();
    released_ = true;
  }

 protected:
  // The kept tensors, checked: not released by an earlier backward, not changed in place.
  const std::vector<at::Tensor>& kept() const {
    TORCH_CHECK(!released_, "Trying to backward through the graph a second time (or directly "
                "access saved tensors after they have already been freed) in ", name(),
                ". Specify retain_graph=True if you need to backward through the graph a "
                "second time");
    for (size_t i = 0; i < kept_.size(); ++i)
      TORCH_CHECK(versions_[i] == kUnchecked || kept_[i]._version() == versions_[i],
                  "one of the variables needed for gradient computation has been modified by "
                  "an inplace operation: a tensor ", name(), " saved is at version ",
                  num(kept_[i]._version()), "; expected version ", num(versions_[i]),
                  " instead");
    return kept_;
  }

 private:
  static constexpr int64_t kUnchecked = -1;
  std::vector<at::Tensor> kept_;
  std::vector<int64_t> versions_;
  bool released_ = false;
};

// The node pointer type of this torch: std::shared_ptr<Node> up to torch 2.12, then
// c10::intrusive_ptr<Node> (pytorch#181782); make_node builds either.
using NodePtr = decltype(std::declval<torch::autograd::Edge>().function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::shared_ptr<T>(new T(std::forward<Args>(args)...));
  else
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
}

// Connects `node` to the differentiable inputs (`inputs`, undefined ones included, in the
// order of the grads its apply returns) and makes it the grad_fn of the defined `outputs`, in
// the order of the grads it receives.
inline void record(const NodePtr& node,
                   const variable_list& inputs, std::initializer_list<at::Tensor*> outputs) {
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (at::Tensor* out : outputs)
    if (out != nullptr && out->defined()) torch::autograd::set_history(*out, node);
}

// A zero tensor of a shape and options kept at forward (the grad of an output the backward
// did not receive).
struct ZerosOf {
  std::vector<int64_t> sizes;
  at::TensorOptions options;
  ZerosOf() = default;
  explicit ZerosOf(const at::Tensor& t) : sizes(t.sizes().vec()), options(t.options()) {}
  at::Tensor operator()(const at::Tensor& grad) const {
    return grad.defined() ? grad : at::zeros(sizes, options);
  }
};

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
