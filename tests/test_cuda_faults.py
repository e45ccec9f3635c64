"""GPU: faults around CUDA buffers are bounded and name ranks, as on the reference
(tests/test_faults.py): a rank that never creates its buffer, or never comes to destroy it.

Each scenario runs in a fresh pool of ranks (NCCL with a GPU each, or gloo ranks sharing one
GPU under CUDA MPS), with the kernels' runtimes (NVLink IPC and NVSHMEM) in the buffer; the
error must come within DEEP_EP_OPS_TIMEOUT_S + 1 s and the ranks must exit cleanly.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

import gpu_distributed
from deep_ep_ops import Buffer, _build
from gpu_distributed import max_ranks
from gpu_helpers import world_size  # noqa: F401  (the module-scoped fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
    pytest.mark.skipif(not _build.HAS_CUDA_KERNELS, reason="the CUDA extension is not built"),
]

TIMEOUT_S = 3


def _absent_peer(rank, num_ranks, stage):
    """The ranks but 0 never create the buffer (``stage="create"``), or create it and never
    come to destroy it; rank 0 reports what its call did."""
    make = lambda: Buffer(dist.group.WORLD, num_nvl_bytes=1 << 24, num_rdma_bytes=1 << 24,  # noqa: E731
                          low_latency_mode=True)
    if stage == "create" and rank != 0:
        return dict(called=False)
    buffer = make() if stage == "destroy" else None
    if rank != 0:
        _KEPT.append(buffer)  # alive and idle: it never comes to destroy()
        return dict(called=False)
    start, error = time.monotonic(), None
    try:
        make() if stage == "create" else buffer.destroy()
    except Exception as caught:  # noqa: BLE001  (the test process checks type and message)
        error = caught
    return dict(called=True, elapsed=time.monotonic() - start,
                error_type=None if error is None else type(error).__name__,
                message="" if error is None else str(error))


_KEPT = []


def test_creation_and_destroy_are_bounded_and_name_the_ranks(world_size):
    stages = ("create", "destroy")
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {"DEEP_EP_OPS_TIMEOUT_S": str(TIMEOUT_S)}, _absent_peer, stages, timeout=120)
    problems = []
    others = ", ".join(str(r) for r in range(1, world_size))
    for stage in stages:
        first = results[stage][0]
        says = (f"rank(s) {others} did not create their Buffer" if stage == "create" else
                "rank 1 (never reached this call")
        if first["error_type"] != "TimeoutError" or says not in first["message"]:
            problems.append(f"{stage}: {first['error_type']}: {first['message']!r} lacks {says!r}")
        if first["elapsed"] > TIMEOUT_S + 1:
            problems.append(f"{stage}: took {first['elapsed']:.1f} s")
        if exit_codes[stage] != [0] * world_size:
            problems.append(f"{stage}: exit codes {exit_codes[stage]} (None: killed)")
    assert not problems, "\n".join(problems)
