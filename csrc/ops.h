// The deep_ep ops defined from C++: the schemas of the one op table (deep_ep_ops/_schemas.py,
// written into csrc/generated/schemas.h by deep_ep_ops/_sources.py), for processes that use the
// library without its Python package. A Python process defines the ops in deep_ep_ops/_library.py
// from the same table; both definitions are fragments that define only the ops not defined yet,
// so whichever runs first wins and the other adds nothing (the schemas are the same strings).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "generated/schemas.h"

namespace deep_ep_ops {

// Defines every deep_ep op that has no schema yet; returns how many it defined. Safe to call
// from several threads and more than once (later calls define nothing).
inline int define_ops() {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<torch::Library>> libraries;  // registrations live on
  const std::lock_guard<std::mutex> lock(mutex);
  auto library = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "deep_ep",
                                                  std::nullopt, __FILE__, __LINE__);
  int defined = 0;
  for (const OpSchema& op : kSchemaTable) {
    if (c10::Dispatcher::singleton().findSchema({std::string("deep_ep::") + op.name, ""}))
      continue;
    library->def(op.schema);
    ++defined;
  }
  if (defined > 0) libraries.push_back(std::move(library));
  return defined;
}

}  // namespace deep_ep_ops
