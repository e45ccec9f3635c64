// An inference engine's use of deep_ep_ops from C++, with no Python in the process: R processes
// (one per rank) exchange their buffer strings through files in a shared directory, then run
// layout -> dispatch -> combine and low-latency dispatch -> combine, check the results on the
// device against what every rank's inputs imply, and print one line per rank.
//
//   examples/cpp_engine/build.sh                     # builds examples/cpp_engine/cpp_engine
//   examples/cpp_engine/run.sh 2                     # 2 ranks (several may share one GPU)
//   cpp_engine RANK NUM_RANKS EXCHANGE_DIR           # one rank by hand
//
// The inputs are a formula of (rank, token), so each rank knows what every peer sends and the
// results are exact: rows hold small integers that bfloat16 represents exactly.

#include <deep_ep_ops/buffer.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kTokens = 128, kHidden = 2048, kTopk = 4, kExperts = 16;
constexpr int kLowLatencyTokens = 32;  // num_max_dispatch_tokens_per_rank

// --- the exchange: one file per (key, rank), written whole then renamed into place ----------

class Exchange {
 public:
  Exchange(std::string dir, int rank, int num_ranks)
      : dir_(std::move(dir)), rank_(rank), num_ranks_(num_ranks) {}

  std::vector<std::string> all_gather(const std::string& key, const std::string& value) const {
    const std::string path = dir_ + "/" + key + "." + std::to_string(rank_);
    {
      std::ofstream out(path + ".tmp", std::ios::binary);
      out.write(value.data(), static_cast<std::streamsize>(value.size()));
    }
    if (std::rename((path + ".tmp").c_str(), path.c_str()) != 0)
      throw std::runtime_error("cannot write " + path);
    std::vector<std::string> values(num_ranks_);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    for (int r = 0; r < num_ranks_; ++r) {
      const std::string peer = dir_ + "/" + key + "." + std::to_string(r);
      while (access(peer.c_str(), F_OK) != 0) {
        if (std::chrono::steady_clock::now() > deadline)
          throw std::runtime_error("rank " + std::to_string(r) + " did not publish " + key);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      std::ifstream in(peer, std::ios::binary);
      values[r].assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    return values;
  }

  void barrier(const std::string& key) const { all_gather(key, ""); }

 private:
  std::string dir_;
  int rank_, num_ranks_;
};

// --- inputs: a formula of (rank, token) ------------------------------------------------------

// Expert j of token t on rank r; distinct for j = 0..3 (they differ by 4, 8, 12 modulo 16).
int64_t expert_of(int r, int t, int j) { return (3 * r + t + 4 * j) % kExperts; }

// Row t of rank r: column 0 the rank, column 1 the token modulo 64, then (7t + h) mod 16 / 8.
at::Tensor inputs(int r, int tokens) {
  auto t = at::arange(tokens, at::kFloat).unsqueeze(1);
  auto h = at::arange(kHidden, at::kFloat).unsqueeze(0);
  at::Tensor x = at::remainder(7 * t + h, 16) / 8;
  x.select(1, 0).fill_(r);
  x.select(1, 1).copy_(at::remainder(t.squeeze(1), 64));
  return x.to(at::kBFloat16);
}

at::Tensor routing(int r, int tokens) {
  std::vector<int64_t> idx;
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < kTopk; ++j) idx.push_back(expert_of(r, t, j));
  return at::tensor(idx, at::kLong).view({tokens, kTopk});
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("check failed: " + what);
}

bool python_in_process() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find("libpython") != std::string::npos) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s RANK NUM_RANKS EXCHANGE_DIR\n", argv[0]);
    return 2;
  }
  const int rank = std::atoi(argv[1]), num_ranks = std::atoi(argv[2]);
  const Exchange exchange(argv[3], rank, num_ranks);
  try {
    int num_devices = 0;
    C10_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
    const int device = rank % num_devices;  // ranks share a GPU when there are fewer GPUs
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const auto cuda = at::TensorOptions().device(at::kCUDA, device);

    // The buffer: NVLink bytes for normal mode, symmetric bytes for low-latency mode.
    const deep_ep_ops::Config dispatch_config = deep_ep_ops::get_dispatch_config(num_ranks);
    const deep_ep_ops::Config combine_config = deep_ep_ops::get_combine_config(num_ranks);
    const int64_t nvl_bytes = std::max(dispatch_config.get_nvl_buffer_size_hint(2 * kHidden, num_ranks),
                                       combine_config.get_nvl_buffer_size_hint(2 * kHidden, num_ranks));
    const int64_t rdma_bytes = deep_ep_ops::get_low_latency_rdma_size_hint(
        kLowLatencyTokens, kHidden, num_ranks, kExperts);
    deep_ep_ops::Buffer buffer(rank, num_ranks, nvl_bytes, rdma_bytes, /*low_latency_mode=*/true);
    const std::vector<std::string> devices =
        exchange.all_gather("device", std::to_string(buffer.get_local_device_id()));
    std::vector<int> device_ids;
    for (const std::string& d : devices) device_ids.push_back(std::stoi(d));
    const std::vector<std::string> handles =
        exchange.all_gather("ipc", buffer.get_local_ipc_handle());
    const std::string root_id = exchange.all_gather(
        "nvshmem", rank == 0 ? buffer.get_local_nvshmem_unique_id() : std::string())[0];
    buffer.sync(device_ids, {handles.begin(), handles.end()}, root_id);
    exchange.barrier("synced");

    // --- layout -> dispatch -> combine ---------------------------------------------------------
    const at::Tensor x = inputs(rank, kTokens).to(cuda);
    const at::Tensor topk_idx = routing(rank, kTokens).to(cuda);
    std::optional<deep_ep_ops::EventHandle> none;
    auto [per_rank, per_rdma_rank, per_expert, in_rank, layout_event] =
        buffer.get_dispatch_layout(topk_idx, kExperts, none, false, false);
    const at::Tensor weights = at::ones({kTokens, kTopk}, cuda.dtype(at::kFloat));
    auto [recv_x, recv_scales, recv_topk_idx, recv_weights, per_expert_list, rank_prefix,
          channel_prefix, recv_channel_prefix, recv_src_idx, send_head, dispatch_event] =
        buffer.intranode_dispatch(x, std::nullopt, topk_idx, weights, per_rank, in_rank,
                                  per_expert, 0, std::nullopt, std::nullopt, 1, 0,
                                  dispatch_config, none, false, false);
    // What this rank must receive: every (source rank, token) with an expert here, in that
    // order, and per local expert the rows that chose it.
    const int num_local = kExperts / num_ranks;
    std::vector<at::Tensor> expected_rows;
    std::vector<int> expected_per_expert(num_local, 0);
    for (int src = 0; src < num_ranks; ++src) {
      const at::Tensor src_x = inputs(src, kTokens);
      for (int t = 0; t < kTokens; ++t) {
        bool here = false;
        for (int j = 0; j < kTopk; ++j) {
          const int64_t e = expert_of(src, t, j);
          if (e / num_local == rank) {
            here = true;
            ++expected_per_expert[e % num_local];
          }
        }
        if (here) expected_rows.push_back(src_x[t]);
      }
    }
    const at::Tensor expected = at::stack(expected_rows);
    expect(recv_x.sizes() == expected.sizes(), "dispatch receives " +
           std::to_string(expected.size(0)) + " rows, got " + std::to_string(recv_x.size(0)));
    expect(at::equal(recv_x.cpu(), expected), "dispatch rows (source rank, then token order)");
    expect(per_expert_list == expected_per_expert, "num_recv_tokens_per_expert_list");
    // Combine sums each token's copies over the ranks it went to: x times that count.
    auto [combined, combined_weights, combine_event] = buffer.intranode_combine(
        recv_x, recv_weights, std::nullopt, std::nullopt, recv_src_idx, rank_prefix,
        recv_channel_prefix, send_head, combine_config, none, false, false);
    const at::Tensor copies = in_rank.sum(1, /*keepdim=*/true, at::kFloat);
    expect(at::equal(combined.cpu(), (x.to(at::kFloat) * copies).to(at::kBFloat16).cpu()),
           "combine = x * ranks reached");
    const int64_t rows = recv_x.size(0);

    // --- low-latency dispatch (receive hook) -> combine ---------------------------------------
    buffer.clean_low_latency_buffer(kLowLatencyTokens, kHidden, kExperts);
    const at::Tensor ll_x = inputs(rank, kLowLatencyTokens).to(cuda);
    const at::Tensor ll_topk = routing(rank, kLowLatencyTokens).to(cuda);
    auto [ll_recv, ll_scales, ll_count, src_info, layout_range, ll_event, hook] =
        buffer.low_latency_dispatch(ll_x, ll_topk, std::nullopt, std::nullopt, kLowLatencyTokens,
                                    kExperts, /*use_fp8=*/false, false, false, false,
                                    /*return_recv_hook=*/true);
    expect(hook.has_value(), "a receive hook");
    (*hook)();
    std::vector<int> ll_expected(num_local, 0);
    for (int src = 0; src < num_ranks; ++src)
      for (int t = 0; t < kLowLatencyTokens; ++t)
        for (int j = 0; j < kTopk; ++j)
          if (expert_of(src, t, j) / num_local == rank) ++ll_expected[expert_of(src, t, j) % num_local];
    const at::Tensor count = ll_count.cpu();
    for (int l = 0; l < num_local; ++l)
      expect(count[l].item<int>() == ll_expected[l], "low-latency rows of local expert " +
             std::to_string(l));
    const at::Tensor ll_weights = at::ones({kLowLatencyTokens, kTopk}, cuda.dtype(at::kFloat));
    auto [ll_combined, ll_combine_event, ll_hook] = buffer.low_latency_combine(
        ll_recv, ll_topk, ll_weights, src_info, layout_range, std::nullopt, kLowLatencyTokens,
        kExperts, false, false, false, false);
    // Each token comes back from its four experts, unchanged: 4 x.
    expect(at::equal(ll_combined.cpu(), (ll_x.to(at::kFloat) * kTopk).to(at::kBFloat16).cpu()),
           "low-latency combine = 4 x");
    // A call form the C++ API cannot differentiate raises before it communicates.
    bool refused = false;
    try {
      buffer.low_latency_combine(ll_recv, ll_topk, ll_weights.clone().requires_grad_(), src_info,
                                 layout_range, std::nullopt, kLowLatencyTokens, kExperts, false,
                                 false, false, false);
    } catch (const c10::Error& error) {
      refused = std::string(error.what()).find("does not differentiate") != std::string::npos;
    }
    expect(refused, "a low-latency combine with weights that require grad raises");
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    exchange.barrier("done");
    buffer.destroy();
    std::printf("rank %d/%d: cuda:%d, %s: dispatch %lld rows ok, combine ok, low-latency "
                "dispatch %lld rows ok, combine ok, grad refused; libpython in process: "
                "%s\n",
                rank, num_ranks, device, buffer.name().c_str(), static_cast<long long>(rows),
                static_cast<long long>(count.sum().item<int64_t>()),
                python_in_process() ? "yes" : "no");
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "rank %d/%d: FAILED: %s\n", rank, num_ranks, error.what());
    return 1;
  }
}
