// DeepEP's C++ names for deep_ep_ops' C++ API, so that code written against deep_ep::Buffer
// (DeepEP V1's csrc/deep_ep.hpp) compiles against deep_ep_ops::Buffer with its includes and
// type names unchanged. Only names are mapped: where a signature differs (strings instead of
// pybind11::bytearray, the EventHandle's event type, arguments added since the DeepEP version a
// caller was written for) the call site changes; docs/CPP_PORTING.md lists what changes.
//
// Do not include this together with DeepEP's own headers: both define namespace deep_ep.
#pragma once

#include "deep_ep_ops/buffer.h"

namespace deep_ep {

using Buffer = deep_ep_ops::Buffer;
using Config = deep_ep_ops::Config;
using EventHandle = deep_ep_ops::EventHandle;

// DeepEP's free function (csrc/config.hpp); ours returns int64_t where DeepEP's returns size_t.
using deep_ep_ops::get_low_latency_rdma_size_hint;

}  // namespace deep_ep
