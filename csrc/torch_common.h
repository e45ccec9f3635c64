// Torch-side helpers shared by the op kernels of both libraries (csrc/ops.cpp for the NVLink
// kernels, csrc/nvshmem/ops.cpp for the NVSHMEM ones). No Python: the libraries load into a
// libtorch process without it. Everything sits in an unnamed namespace: each library keeps its
// own copy of the state (error words, hooks), and only its op kernels' file includes this.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "bridge_common.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
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

// The CUDA_MPS_ACTIVE_THREAD_PERCENTAGE this process runs under (100 without one), for messages;
// the one-GPU multi-rank test mode sets it per rank process.
int mps_thread_percent() {
  static const int percent = [] {
    const char* value = std::getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
    const int p = value != nullptr ? std::atoi(value) : 100;
    return p <= 0 || p > 100 ? 100 : p;
  }();
  return percent;
}

// SMs this process may use on `device`. Under CUDA MPS with an active-thread percentage the
// device's SM count already reports the process's share (measured on an H200, 132 SMs: 66 at
// 50 %, 33 at 25 %), so it is taken as it is. Grids are sized from this.
int usable_sms(int device) {
  return std::max(1, at::cuda::getDeviceProperties(device)->multiProcessorCount);
}

// Small outputs of one eager call from one allocation. Each at::empty on CUDA costs about 1.5 to
// 2 µs of host time on the H200 machine (dispatcher, caching allocator, tensor); a dispatch
// returns a dozen small tensors. Inside an eager direct call (a PooledOutputs scope on this
// thread: the extensions' direct entries, section 7 of docs/DESIGN.md) empty_small cuts them
// from one byte allocation: each result is a tensor of its own (sizes, dtype, version counter)
// on the shared storage at a 64-byte aligned offset, freed when the last of them dies. Only
// small tensors go there (handles, counts, scales, weights), so a kept handle never keeps a
// payload alive. Through the dispatcher (torch.compile, the fakes' contracts) every tensor is
// an at::empty of its own: compiled code may reinterpret an output as starting its storage.
thread_local int pooled_outputs_depth = 0;

class PooledOutputs {
 public:
  PooledOutputs() { ++pooled_outputs_depth; }
  ~PooledOutputs() { --pooled_outputs_depth; }
  PooledOutputs(const PooledOutputs&) = delete;
  PooledOutputs& operator=(const PooledOutputs&) = delete;
};

struct EmptySpec {
  c10::SmallVector<int64_t, 4> sizes;
  at::ScalarType dtype;
  c10::SmallVector<int64_t, 4> strides = {};  // empty: contiguous; else a permutation's strides
  // Memory only, inside a direct call: no tensor is made (the result is undefined, the memory
  // lives on in the pool while any other result of the call does); the address comes back
  // through empty_small's `addresses`. Through the dispatcher it is a tensor like the others.
  bool raw = false;
};

// `a` then `b`: the specs of one empty_small call from two lists.
template <size_t N, size_t M>
std::array<EmptySpec, N + M> joined(const std::array<EmptySpec, N>& a,
                                    const std::array<EmptySpec, M>& b) {
  std::array<EmptySpec, N + M> out;
  std::copy(a.begin(), a.end(), out.begin());
  std::copy(b.begin(), b.end(), out.begin() + N);
  return out;
}

// `addresses` (optional) receives each result's address, raw ones included. A raw result's
// memory must not be used after the other results of the call are gone.
template <size_t N>
std::array<at::Tensor, N> empty_small(const at::TensorOptions& options,
                                      const std::array<EmptySpec, N>& specs,
                                      std::array<void*, N>* addresses = nullptr) {
  std::array<at::Tensor, N> out;
  if (pooled_outputs_depth == 0) {
    for (size_t i = 0; i < N; ++i) {
      out[i] = specs[i].strides.empty()
                   ? at::empty(specs[i].sizes, options.dtype(specs[i].dtype))
                   : at::empty_strided(specs[i].sizes, specs[i].strides,
                                       options.dtype(specs[i].dtype));
      if (addresses != nullptr) (*addresses)[i] = out[i].data_ptr();
    }
    return out;
  }
  constexpr int64_t kAlign = 64;
  std::array<int64_t, N> offsets{};
  int64_t total = 0;
  for (size_t i = 0; i < N; ++i) {
    offsets[i] = total;
    const int64_t bytes = c10::multiply_integers(specs[i].sizes) *
                          static_cast<int64_t>(c10::elementSize(specs[i].dtype));
    total += (bytes + kAlign - 1) / kAlign * kAlign;
  }
  const at::Tensor pool = at::empty({std::max<int64_t>(total, 1)}, options.dtype(at::kByte));
  for (size_t i = 0; i < N; ++i) {
    if (addresses != nullptr)
      (*addresses)[i] = static_cast<uint8_t*>(pool.data_ptr()) + offsets[i];
    if (specs[i].raw) continue;
    out[i] = at::detail::make_tensor<c10::TensorImpl>(
        c10::Storage(pool.storage()), pool.key_set(), c10::scalarTypeToTypeMeta(specs[i].dtype));
    c10::TensorImpl* impl = out[i].unsafeGetTensorImpl();
    impl->set_storage_offset(offsets[i] / static_cast<int64_t>(c10::elementSize(specs[i].dtype)));
    if (specs[i].strides.empty())
      impl->set_sizes_contiguous(specs[i].sizes);
    else
      impl->set_sizes_and_strides(specs[i].sizes, specs[i].strides);
  }
  return out;
}

// Allocation may happen during a CUDA graph capture (the first call of a process can be
// captured); it is not part of the graph, so allow it for this thread.
class RelaxedCapture {
 public:
  RelaxedCapture() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// The device error word of one device, in mapped pinned host memory: kernels store a
// DeviceError code, the next op call reads it without synchronising and raises. Allocated once,
// never freed (CUDA graphs may hold its address).
struct ErrorWord {
  int* host = nullptr;
  int* device = nullptr;
};

std::mutex error_word_mutex;

ErrorWord& error_word(int device) {
  static auto& words = *new std::unordered_map<int, ErrorWord>();
  std::lock_guard<std::mutex> lock(error_word_mutex);
  ErrorWord& word = words[device];
  if (word.host == nullptr) {
    RelaxedCapture relaxed;
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&word.host),
                                 sizeof(int) * kErrorWordInts, cudaHostAllocMapped));
    for (int i = 0; i < kErrorWordInts; ++i) word.host[i] = kErrorNone;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&word.device), word.host, 0));
  }
  return word;
}

// An error a kernel reported since the last call, cleared as it is taken.
struct DeviceReport {
  int code, op, peer, value;
};

DeviceReport take_device_report(int device) {
  volatile int* word = error_word(device).host;
  DeviceReport report{word[0], word[1], word[2], word[3]};
  if (report.code != kErrorNone) word[0] = kErrorNone;
  return report;
}

// Host time of an eager call's steps, for finding where it goes (DEEP_EP_OPS_HOST_TRACE=1,
// read once; off, a mark costs one branch): a HostTrace made at the start of a call adds the
// time since its previous mark to "<op>/<step>" at every mark. Each extension keeps its own
// totals; host_trace_take() returns them in µs and clears them (scripts/host_profile.py).
bool host_trace_on() {
  static const bool on = [] {
    const char* value = std::getenv("DEEP_EP_OPS_HOST_TRACE");
    return value != nullptr && std::string(value) == "1";
  }();
  return on;
}

struct HostTraceTotal {
  int64_t calls = 0;
  int64_t ns = 0;
};

std::mutex host_trace_mutex;
auto& host_trace_totals = *new std::map<std::string, HostTraceTotal>();

class HostTrace {
 public:
  explicit HostTrace(const char* op) : op_(op), on_(host_trace_on()) {
    if (on_) last_ = std::chrono::steady_clock::now();
  }

  void mark(const char* step) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    {
      std::lock_guard<std::mutex> lock(host_trace_mutex);
      HostTraceTotal& total = host_trace_totals[std::string(op_) + "/" + step];
      total.calls += 1;
      total.ns += ns;
    }
    last_ = std::chrono::steady_clock::now();  // the bookkeeping is not the next step's
  }

 private:
  const char* op_;
  bool on_;
  std::chrono::steady_clock::time_point last_;
};

// "<op>/<step>" -> (marks, mean µs per mark), then cleared.
std::map<std::string, std::pair<int64_t, double>> host_trace_take() {
  std::lock_guard<std::mutex> lock(host_trace_mutex);
  std::map<std::string, std::pair<int64_t, double>> out;
  for (const auto& [step, total] : host_trace_totals)
    out[step] = {total.calls, total.calls ? 1e-3 * total.ns / total.calls : 0.0};
  host_trace_totals.clear();
  return out;
}

// Hooks into the Python package, set by its bindings (deep_ep_ops._C and _C_nvshmem, see
// csrc/python.cpp): the reference backend for calls the kernels do not take, and the ops'
// Python checks (the one source of the wording of argument errors). Arguments and results
// cross as IValues, so this library needs no Python; a process without the package has no
// hooks (no reference backend, the C++ messages stand). Leaked on purpose: nothing here may
// be destroyed after the interpreter shut down.
struct Hooks {
  BoxedHook fallback, check;
};

Hooks& hooks() {
  static Hooks& h = *new Hooks();
  return h;
}

template <typename T>
c10::IValue to_ivalue(const T& value) { return c10::IValue(value); }
inline c10::IValue to_ivalue(c10::string_view s) { return c10::IValue(std::string(s)); }
inline c10::IValue to_ivalue(c10::IntArrayRef v) { return c10::IValue(v.vec()); }

template <typename Result, typename... Args>
Result call_fallback(const char* op, const Args&... args) {
  TORCH_CHECK(static_cast<bool>(hooks().fallback), "deep_ep::", op, ": this call needs the "
              "reference backend (a buffer without a runtime for the kernels), which only the "
              "Python package deep_ep_ops provides");
  c10::IValue result = hooks().fallback(op, {to_ivalue(args)...});
  if constexpr (!std::is_void_v<Result>) return std::move(result).to<Result>();
}

// The op names device error reports use, by op id (the generated op table; both extensions
// expose it as op_names, which tests hold to the op table, deep_ep_ops/_schemas.py).
std::map<int, std::string> op_names_by_id() {
  std::map<int, std::string> names;
  for (int op = 0; op < kNumOps; ++op) names[op] = op_name(op);
  return names;
}

// --- one wording for argument errors (meta.check_<op>) ---------------------------------------

// Raises the Python check's error for these arguments, if the package set the hook and its
// check rejects them.
template <typename... Args>
void raise_python_check(const char* op, const Args&... args) {
  if (hooks().check) hooks().check(op, {to_ivalue(args)...});
}

// An op's kernel function with its argument errors worded as on CPU and under tracing: a
// ValueError / TypeError from a C++ check is replaced by the error of the op's Python check on
// the same arguments when that check rejects them too (same type, same message); otherwise
// (a check only the kernels make: a CUDA tensor, the buffer's runtime) the C++ error stands.
// Nothing runs on the success path.
template <const char* Name, auto Fn>
struct Checked;
template <const char* Name, typename R, typename... A, R (*Fn)(A...)>
struct Checked<Name, Fn> {
  static R call(A... args) {
    try {
      return Fn(args...);
    } catch (const c10::ValueError&) {
      raise_python_check(Name, args...);
      throw;
    } catch (const c10::TypeError&) {
      raise_python_check(Name, args...);
      throw;
    }
  }
};

// Checks every kernel call makes of the runtime of `buffer`: not broken by a timeout, on the
// device of `x`, made for `num_ranks` ranks. Runtime needs `broken`, `device` and `num_ranks`.
template <typename Runtime>
void check_runtime(const char* op, const std::string& buffer, const Runtime& runtime,
                   const at::Tensor& x, int64_t num_ranks) {
  TORCH_CHECK(!runtime.broken, "deep_ep::", op, ": buffer ", buffer,
              " is unusable after a timeout or a failed call; destroy it and create a new one");
  TORCH_CHECK_VALUE(x.get_device() == runtime.device, "deep_ep::", op, ": tensors are on cuda:",
                    num(x.get_device()), " but buffer ", buffer, " lives on cuda:",
                    num(runtime.device));
  TORCH_CHECK_VALUE(num_ranks == runtime.num_ranks, "deep_ep::", op, ": the inputs imply ",
                    num(num_ranks), " ranks but buffer ", buffer, " has ",
                    num(runtime.num_ranks));
}

// The runtimes of an extension's buffers, by buffer name. Leaked on purpose (callers hold one
// `new` instance): nothing here may be destroyed after the interpreter or CUDA shut down.
// Runtime needs `device`, `broken` and `release()`.
template <typename Runtime>
class RuntimeRegistry {
 public:
  Runtime* find(const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = runtimes_.find(name);
    return it == runtimes_.end() ? nullptr : it->second.get();
  }

  void add(const std::string& name, std::unique_ptr<Runtime> runtime) {
    std::lock_guard<std::mutex> lock(mutex_);
    runtimes_.emplace(name, std::move(runtime));
  }

  // Collective teardown (the caller synchronised the device and the peers) frees the memory;
  // without free_memory (garbage collection, interpreter exit) the runtime is only forgotten: a
  // peer may still write into its memory, and the process exit frees it anyway.
  void drop(const std::string& name, bool free_memory) {
    std::unique_ptr<Runtime> runtime;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = runtimes_.find(name);
      if (it == runtimes_.end()) return;
      runtime = std::move(it->second);
      runtimes_.erase(it);
    }
    if (free_memory) {
      runtime->release();
    } else {
      runtime.release();  // leaked, see above
    }
  }

  // After a timeout on `device`: every runtime there refuses further calls.
  void mark_broken(int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : runtimes_)
      if (entry.second->device == device) entry.second->broken = true;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, std::unique_ptr<Runtime>> runtimes_;
};

// --- the eager fast path (deep_ep_ops.ops._direct) ------------------------------------------

// Whether an eager call with these tensors may run the kernel function directly instead of
// through the dispatcher: no autograd needed, plain CUDA tensors (no Python subclass such as a
// fake or functional tensor, no functorch wrapper), no dispatch mode. Checked here rather than
// in Python: tensor attribute reads from Python go through any active torch-function mode
// (torch.set_default_device installs one), a microsecond or more each.
inline bool direct_ok_tensor(const at::Tensor& t, bool grad) {
  const c10::DispatchKeySet wrapped({
      c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
      c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
      c10::DispatchKey::Functionalize, c10::DispatchKey::BatchedNestedTensor});
  return t.is_cuda() && !(grad && t.requires_grad()) && !t.key_set().has_any(wrapped);
}
inline bool direct_ok_tensor(const c10::optional<at::Tensor>& t, bool grad) {
  return !t.has_value() || direct_ok_tensor(*t, grad);
}

template <typename... Tensors>
bool eager_direct_ok(const Tensors&... tensors) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return false;
  const bool grad = at::GradMode::is_enabled();
  return (direct_ok_tensor(tensors, grad) && ...);
}


// --- argument checks (the fakes in meta/ make the same ones while tracing) ------------------

void check_tensor(const at::Tensor& t, const char* name, int64_t ndim,
                  std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have ", num(ndim), " dims, got shape ",
                    shape(t));
  const bool ok = std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end();
  TORCH_CHECK_TYPE(ok, name, " has unsupported dtype ", c10::toString(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor");
}

}  // namespace
}  // namespace deep_ep_ops
