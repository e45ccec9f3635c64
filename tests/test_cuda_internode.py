"""GPU: the internode ops on CUDA tensors against the oracle (tests/internode_helpers.py), at 2
ranks as 2 nodes of 1 and 4 ranks as 2 nodes of 2. Until the internode kernels exist they run
the reference registered for CUDA (over NCCL with a GPU per rank; on one GPU, ranks sharing it
under CUDA MPS, over the buffer's gloo group with the tensors staged through the host)."""

from __future__ import annotations

import pytest

import gpu_distributed
import internode_helpers
from gpu_distributed import max_ranks
from gpu_helpers import _device, world_size  # noqa: F401  (the module-scoped fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
]


def _job(rank, num_ranks, per_node, seed, num_worst_tokens, num_rdma_bytes=0):
    return internode_helpers.job(rank, num_ranks, per_node, seed, num_worst_tokens, _device(),
                                 num_rdma_bytes=num_rdma_bytes)


@pytest.mark.parametrize("num_worst_tokens", [0, 64], ids=["data_dependent", "capacity"])
def test_internode_ops_on_cuda_match_oracle(world_size, num_worst_tokens):
    per_node = world_size // 2
    seed = 40 + world_size + num_worst_tokens
    results = gpu_distributed.run_on_gpus(world_size, _job, per_node, seed, num_worst_tokens)
    internode_helpers.check(results, world_size, per_node, seed, num_worst_tokens)


@pytest.mark.parametrize("num_worst_tokens", [0, 64], ids=["data_dependent", "capacity"])
def test_staged_internode_path_matches_oracle(world_size, num_worst_tokens):
    """With RDMA bytes the buffer gets the internode runtime: dispatch (both modes) and
    combine take the staged path (deep_ep_ops/internode_staged.py: the forward kernel, the
    intranode kernels per source node, the way-back kernel), cached dispatch the reference on
    its handle, the combine of capacity mode too; all against the oracle."""
    from deep_ep_ops import _build

    if not hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"):
        pytest.skip("the extension has no internode forward kernel")
    per_node = world_size // 2
    seed = 60 + world_size + num_worst_tokens
    results = gpu_distributed.run_on_gpus(world_size, _job, per_node, seed, num_worst_tokens,
                                          256 << 20)
    internode_helpers.check(results, world_size, per_node, seed, num_worst_tokens)


def test_staged_internode_graph_training_step_replays(world_size):
    """The capacity-mode training step of tests/test_cuda_intranode.py (ExampleMoE: layout,
    capacity dispatch, experts, combine, and the backward's cached dispatch and combine) on a
    buffer of two nodes with the internode runtime: captured once in a CUDA graph, replayed
    with fresh inputs, each replay against the same step run eagerly."""
    from deep_ep_ops import _build
    from test_cuda_intranode import CUDA_GRAPH_REPLAYS, FLOAT32_ROUNDING, _cuda_graph_job

    if not hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"):
        pytest.skip("the extension has no internode forward kernel")
    results = gpu_distributed.run_on_gpus(world_size, _cuda_graph_job, CUDA_GRAPH_REPLAYS,
                                          world_size // 2, timeout=600)
    for rank, result in enumerate(results):
        assert result["max_error"] <= FLOAT32_ROUNDING, (rank, result)
        assert result["distinct_losses"] > CUDA_GRAPH_REPLAYS // 2, (rank, result)
