"""Code written against DeepEP's C++ names compiles against deep_ep_ops' C++ API.

A C++ engine that held ``deep_ep::Buffer`` (as rtp-llm's DeepEPBuffer wrapper did) should port by
including ``deep_ep_ops/deep_ep_compat.h``. The snippets below are compiled only
(``-fsyntax-only``), never run, so a CPU build of torch and a CUDA toolkit's headers suffice: the
first uses every call such an engine makes and must compile; the second makes known porting
mistakes and must fail at exactly those lines, which proves the header is really compiled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap

import pytest

cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "deep_ep_ops", "include")
COMPAT_HEADER = "deep_ep_ops/deep_ep_compat.h"


def _compiler():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _cuda_include():
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in filter(None, homes):
        include = os.path.join(home, "include")
        if os.path.isfile(os.path.join(include, "cuda_runtime.h")):
            return include
    return None


def _compile(tmp_path, source, extra_include_dirs=()):
    """Runs the compiler on `source` (syntax only); returns (returncode, stderr)."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (c++ / g++)")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found under $CUDA_HOME/include or /usr/local/cuda/include")
    torch_includes = cpp_extension.include_paths()
    include_dirs = [*torch_includes, INCLUDE, cuda_include, *extra_include_dirs]
    # CPU wheels of torch ship c10/cuda headers but not the header CMake generates for a CUDA
    # build (c10/cuda/impl/cuda_cmake_macros.h), which c10/cuda/CUDAMacros.h includes. An
    # empty one stands in for it; a CUDA wheel's own header is used where it exists.
    macros = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not any(os.path.isfile(os.path.join(d, macros)) for d in torch_includes):
        stub = tmp_path / "stub_include" / macros
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n")
        include_dirs.append(str(tmp_path / "stub_include"))
    path = tmp_path / "snippet.cpp"
    path.write_text(source)
    command = [
        compiler,
        "-std=c++17",
        "-fsyntax-only",
        "-w",  # torch's headers warn under C++17; only errors matter here
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[f"-I{d}" for d in include_dirs],
        str(path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr


# An engine's wrapper in the style of rtp-llm's DeepEPBuffer: it owns a deep_ep::Buffer, swaps
# the buffer's byte strings through the engine's own all-gather, and runs the normal and the
# low-latency round trips. Compiled, never called.
ENGINE_SNIPPET = r"""
#include "deep_ep_ops/deep_ep_compat.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace engine {

// The engine's collectives: every rank's value, indexed by rank.
using GatherInts = std::function<std::vector<int>(int)>;
using GatherBytes = std::function<std::vector<std::string>(const std::string&)>;

class ExpertComm {
 public:
  ExpertComm(int rank, int world_size, int64_t nvl_bytes, int64_t rdma_bytes, bool low_latency)
      : rank_(rank), low_latency_(low_latency),
        buffer_(std::make_unique<deep_ep::Buffer>(rank, world_size, nvl_bytes, rdma_bytes,
                                                  low_latency)) {}

  static size_t rdma_bytes_for(int max_tokens, int hidden, int world_size, int num_experts) {
    return deep_ep::get_low_latency_rdma_size_hint(max_tokens, hidden, world_size, num_experts);
  }

  bool connect(const GatherInts& gather_ints, const GatherBytes& gather_bytes) {
    const std::vector<int> device_ids = gather_ints(buffer_->get_local_device_id());
    const std::string local_handle = buffer_->get_local_ipc_handle();
    const std::vector<std::string> gathered = gather_bytes(local_handle);
    std::vector<std::optional<std::string>> handles(gathered.begin(), gathered.end());

    std::optional<std::string> root_id;
    if (low_latency_ || buffer_->get_num_rdma_ranks() > 1) {
      const std::string mine = rank_ == 0 ? buffer_->get_local_nvshmem_unique_id() : "";
      root_id = gather_bytes(mine).at(buffer_->get_root_rdma_rank(true));
    }
    buffer_->sync(device_ids, handles, root_id);
    return buffer_->is_available() && buffer_->get_rdma_rank() == 0;
  }

  deep_ep::EventHandle capture() const { return deep_ep::EventHandle(); }

  std::tuple<at::Tensor, std::optional<at::Tensor>> normal_round_trip(
      const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
      int num_experts) {
    std::optional<deep_ep::EventHandle> before = capture();
    auto [per_rank, per_rdma_rank, per_expert, in_rank, layout_event] =
        buffer_->get_dispatch_layout(topk_idx, num_experts, before, /*async=*/true,
                                     /*allocate_on_comm_stream=*/true);
    if (layout_event.has_value()) layout_event->current_stream_wait();
    (void)per_rdma_rank;

    const deep_ep::Config config(24, 6, 256, 6, 128);
    std::optional<deep_ep::EventHandle> no_event;
    auto [recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert_list,
          rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
          send_head, dispatch_event] =
        buffer_->intranode_dispatch(x, std::nullopt, topk_idx, topk_weights, per_rank, in_rank,
                                    per_expert, /*cached_num_recv_tokens=*/0, std::nullopt,
                                    std::nullopt, /*expert_alignment=*/1,
                                    /*num_worst_tokens=*/0, config, no_event, false, false);
    int64_t received = 0;
    for (int count : per_expert_list) received += count;
    (void)received, (void)recv_x_scales, (void)recv_topk_idx, (void)dispatch_event;

    // A second dispatch along the first one's handle (rtp-llm's cached path).
    auto cached = buffer_->intranode_dispatch(
        x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, in_rank, std::nullopt,
        static_cast<int>(recv_src_idx.size(0)), rank_prefix_matrix, channel_prefix_matrix, 1, 0,
        config, no_event, false, false);
    (void)std::get<0>(cached);

    auto [combined_x, combined_weights, combine_event] = buffer_->intranode_combine(
        recv_x, recv_topk_weights, /*bias_0=*/std::nullopt, /*bias_1=*/std::nullopt,
        recv_src_idx, rank_prefix_matrix, recv_channel_prefix_matrix, send_head, config,
        no_event, false, false);
    if (combine_event) combine_event->current_stream_wait();
    return {combined_x, combined_weights};
  }

  at::Tensor low_latency_round_trip(const at::Tensor& x, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_weights, int max_tokens,
                                    int num_experts) {
    const int hidden = static_cast<int>(x.size(1));
    buffer_->clean_low_latency_buffer(max_tokens, hidden, num_experts);
    auto [recv_x, recv_x_scales, recv_count, src_info, layout_range, dispatch_event,
          dispatch_hook] =
        buffer_->low_latency_dispatch(x, topk_idx, std::nullopt, std::nullopt, max_tokens,
                                      num_experts, /*use_fp8=*/false, /*round_scale=*/false,
                                      /*use_ue8m0=*/false, /*async=*/false,
                                      /*return_recv_hook=*/true);
    // The send half ran; the engine overlaps other work, then receives.
    if (dispatch_hook.has_value()) (*dispatch_hook)();
    (void)recv_x_scales, (void)recv_count, (void)dispatch_event;

    at::Tensor rows = buffer_->get_next_low_latency_combine_buffer(max_tokens, hidden, num_experts);
    rows.copy_(recv_x);
    auto [combined_x, combine_event, combine_hook] = buffer_->low_latency_combine(
        rows, topk_idx, topk_weights, src_info, layout_range, std::nullopt, max_tokens,
        num_experts, /*use_logfmt=*/false, /*zero_copy=*/true, /*async=*/false,
        /*return_recv_hook=*/true);
    std::function<void()> receive = combine_hook.value_or([] {});
    receive();
    (void)combine_event;
    return combined_x;
  }

 private:
  int rank_;
  bool low_latency_;
  std::unique_ptr<deep_ep::Buffer> buffer_;
};

}  // namespace engine
"""


def test_engine_written_for_deep_ep_names_compiles(tmp_path):
    returncode, stderr = _compile(tmp_path, ENGINE_SNIPPET)
    assert returncode == 0, f"the engine snippet does not compile:\n{stderr}"


# Calls as rtp-llm's wrapper wrote them for its DeepEP build, each one line, each an error
# against deep_ep_ops: its string methods and sync_string, sync with plain strings, and waiting
# on the event through c10::Stream::wait (DeepEP's event is a torch::Event, ours a CUDAEvent).
MISTAKES = {
    "string_method": "const std::string handle = b.get_local_ipc_handle_string();",
    "sync_string": "b.sync_string(ids, plain, root);",
    "sync_plain_strings": "b.sync(ids, plain, root);",
    "stream_wait": "at::cuda::getCurrentCUDAStream().unwrap().wait(*e.event);",
}


def test_porting_mistakes_fail_to_compile(tmp_path):
    head = textwrap.dedent(
        f"""\
        #include "{COMPAT_HEADER}"
        #include <string>
        #include <vector>
        void mistakes(deep_ep::Buffer& b, const deep_ep::EventHandle& e,
                      const std::vector<int>& ids, const std::vector<std::string>& plain,
                      const std::string& root) {{
        """
    )
    lines = head.splitlines()
    line_of = {}
    for name, statement in MISTAKES.items():
        lines.append("  " + statement)
        line_of[name] = len(lines)  # 1-based line number of the statement just added
    lines.append("}")
    returncode, stderr = _compile(tmp_path, "\n".join(lines) + "\n")
    assert returncode != 0, "the mistakes compiled: is the header compiled at all?"
    # An error in the snippet, or one in a header template that the snippet's line instantiates
    # (g++: "required from here", clang: "requested here").
    where = r"snippet\.cpp:(\d+):\d+:\s+(?:error|required from|note: in instantiation)"
    error_lines = {int(n) for n in re.findall(where, stderr)}
    missing = [name for name, line in line_of.items() if line not in error_lines]
    assert not missing, f"no error reported for {missing} (lines {line_of}):\n{stderr}"
    # Errors only at the mistakes: the header itself and the rest of the snippet compile.
    stray = sorted(error_lines - set(line_of.values()))
    assert not stray and "fatal error" not in stderr, f"unexpected errors:\n{stderr}"


# The C++ API's own sources: the Buffer (libdeep_ep_ops) and the example engine, compiled here
# as CI compiles the kernels, so a change that breaks them fails without a GPU.
@pytest.mark.parametrize("source", ["csrc/buffer.cpp", "examples/cpp_engine/main.cpp"])
def test_cpp_api_sources_compile(tmp_path, source):
    with open(os.path.join(ROOT, source)) as f:
        code = f.read()
    rc, stderr = _compile(tmp_path, code, [os.path.join(ROOT, "csrc")])
    assert rc == 0, f"{source} does not compile:\n{stderr}"


def test_flags_name_the_headers_and_the_libraries():
    from deep_ep_ops import cpp_api

    assert f"-I{cpp_api.INCLUDE}" in cpp_api.cflags()
    assert os.path.isfile(os.path.join(cpp_api.INCLUDE, "deep_ep_ops", "buffer.h"))
    if not cpp_api.built_libraries():  # a CPU-only install has no C++ libraries: say so
        with pytest.raises(RuntimeError, match="no C\\+\\+ libraries"):
            cpp_api.libs()
        with pytest.raises(RuntimeError, match="no C\\+\\+ libraries"):
            cpp_api.extension_kwargs()
    else:
        for flags in (cpp_api.libs(), cpp_api.extension_kwargs()["extra_link_args"]):
            assert "-ldeep_ep_ops" in flags
            assert flags.index("-Wl,--no-as-needed") < flags.index("-ldeep_ep_ops")
