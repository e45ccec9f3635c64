// What a library's op kernels and its Python bindings share: the type of the hooks through which
// the Python package lends the libraries its reference backend and its argument checks
// (csrc/torch_common.h keeps them, csrc/python_common.h makes them). Python-free.
#pragma once

#include <ATen/core/ivalue.h>

#include <functional>
#include <string>
#include <vector>

namespace deep_ep_ops {

// (op name, arguments in schema order) -> result (None for none).
using BoxedHook =
    std::function<c10::IValue(const std::string& op, std::vector<c10::IValue>&& args)>;

}  // namespace deep_ep_ops
