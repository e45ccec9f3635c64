// Pieces both Python extensions (csrc/python.cpp: deep_ep_ops._C, csrc/nvshmem/python.cpp:
// deep_ep_ops._C_nvshmem) use to bind their library: IValues to and from Python, the hooks that
// lend a library the package's reference backend and argument checks, named tuples without a
// Python frame. Only the extensions include this; the libraries stay Python-free.
#pragma once

#include <torch/extension.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bridge_common.h"

namespace deep_ep_ops {
namespace python {
namespace {

inline py::object to_python(const c10::IValue& v) {
  if (v.isNone()) return py::none();
  if (v.isTensor()) return py::cast(v.toTensor());
  if (v.isBool()) return py::bool_(v.toBool());
  if (v.isInt()) return py::int_(v.toInt());
  if (v.isDouble()) return py::float_(v.toDouble());
  if (v.isString()) return py::str(v.toStringRef());
  if (v.isIntList()) return py::cast(v.toIntVector());
  if (v.isTuple() || v.isList()) {
    const std::vector<c10::IValue> items =
        v.isTuple() ? v.toTupleRef().elements().vec() : v.toListRef().vec();
    py::tuple out(items.size());
    for (size_t i = 0; i < items.size(); ++i) out[i] = to_python(items[i]);
    return std::move(out);
  }
  TORCH_CHECK(false, "deep_ep_ops: no Python value for an IValue of type ", v.tagKind());
}

inline c10::IValue from_python(py::handle obj) {
  if (obj.is_none()) return c10::IValue();
  if (THPVariable_Check(obj.ptr())) return c10::IValue(py::cast<at::Tensor>(obj));
  if (py::isinstance<py::bool_>(obj)) return c10::IValue(obj.cast<bool>());
  if (py::isinstance<py::int_>(obj)) return c10::IValue(obj.cast<int64_t>());
  if (py::isinstance<py::float_>(obj)) return c10::IValue(obj.cast<double>());
  if (py::isinstance<py::str>(obj)) return c10::IValue(obj.cast<std::string>());
  if (py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj)) {
    std::vector<c10::IValue> items;
    for (py::handle item : obj) items.push_back(from_python(item));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  TORCH_CHECK(false, "deep_ep_ops: no IValue for a Python ", std::string(py::str(py::type::handle_of(obj))));
}

// Python functions by op name and the library hook that calls them (with the GIL). Leaked:
// nothing here may be destroyed after the interpreter shut down. `required`: an op without a
// function raises (the fallbacks); else nothing happens (the checks).
class HookTable {
 public:
  explicit HookTable(bool required) : required_(required) {}

  void set(const std::string& op, py::object fn) { (*fns_)[op] = std::move(fn); }

  BoxedHook hook() const {
    auto* fns = fns_;
    const bool required = required_;
    return [fns, required](const std::string& op, std::vector<c10::IValue>&& args) {
      py::gil_scoped_acquire gil;
      auto it = fns->find(op);
      if (it == fns->end()) {
        TORCH_CHECK(!required, "deep_ep::", op, " has no reference fallback registered");
        return c10::IValue();
      }
      py::tuple py_args(args.size());
      for (size_t i = 0; i < args.size(); ++i) py_args[i] = to_python(args[i]);
      return from_python(it->second(*py_args));
    };
  }

 private:
  std::unordered_map<std::string, py::object>* fns_ =
      new std::unordered_map<std::string, py::object>();
  bool required_;
};

inline py::object to_python(std::vector<at::Tensor>&& outputs) {
  py::tuple result(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) result[i] = py::cast(std::move(outputs[i]));
  return std::move(result);
}

// An instance of the tuple subclass `type` (a NamedTuple) holding `items` (new references,
// taken over), as tuple.__new__ makes one, without the Python frame of its __new__.
inline PyObject* new_named_tuple(PyObject* type, std::initializer_list<PyObject*> items) {
  auto* tuple_type = reinterpret_cast<PyTypeObject*>(type);
  PyObject* result = tuple_type->tp_alloc(tuple_type, static_cast<Py_ssize_t>(items.size()));
  if (result == nullptr) {
    for (PyObject* item : items) Py_XDECREF(item);
    throw py::error_already_set();
  }
  Py_ssize_t i = 0;
  for (PyObject* item : items) PyTuple_SET_ITEM(result, i++, item);
  return result;
}

// What both extensions bind the same way from their library.
struct Library {
  const char* source_hash;  // the sources it was built from
  void (*set_fallback_hook)(BoxedHook);
  void (*set_check_hook)(BoxedHook);
  std::map<std::string, std::pair<int64_t, double>> (*host_trace_take)();
  std::map<int, std::string> (*op_names)();
  const char* fallback_doc;  // which calls the library hands to the reference
};

// Sets `module`'s source_hash, lends the library the package's reference backend and checks
// (the tables leaked: the hooks outlive the module), and binds host_trace, op_names, set_check
// and set_fallback.
inline void bind_library(py::module_& module, const Library& library) {
  auto* fallbacks = new HookTable(true);
  auto* checks = new HookTable(false);
  module.attr("source_hash") = library.source_hash;
  library.set_fallback_hook(fallbacks->hook());
  library.set_check_hook(checks->hook());
  module.def("host_trace", library.host_trace_take,
             "Host µs per step of the eager calls since the last call (DEEP_EP_OPS_HOST_TRACE=1)");
  module.def("op_names", library.op_names,
             "The op names device error reports use, by op id (tests hold them to the op table)");
  module.def("set_check", [checks](const std::string& op, py::object fn) { checks->set(op, fn); },
             "Python check of an op (meta.check_<op>): the wording of its argument errors");
  module.def("set_fallback",
             [fallbacks](const std::string& op, py::object fn) { fallbacks->set(op, fn); },
             library.fallback_doc);
}

}  // namespace
}  // namespace python
}  // namespace deep_ep_ops
