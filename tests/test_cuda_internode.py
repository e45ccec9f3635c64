"""GPU: the internode ops on CUDA tensors against the oracle (tests/internode_helpers.py), at 2
ranks as 2 nodes of 1 and 4 ranks as 2 nodes of 2. Until the internode kernels exist they run
the reference registered for CUDA (over NCCL with a GPU per rank; on one GPU, ranks sharing it
under CUDA MPS, over the buffer's gloo group with the tensors staged through the host)."""

from __future__ import annotations

import os
import random
import re
import time

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
import gpu_distributed
import internode_helpers
from deep_ep_ops import ops
from deep_ep_ops.topology import RANKS_PER_NODE_ENV
from gpu_distributed import max_ranks
from gpu_helpers import (  # noqa: F401  (world_size: the module-scoped fixture)
    _bit_flags, _device, _generator, _sync, scaled, world_size,
)

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
    dispatch = "internode_capacity_dispatch" if num_worst_tokens else "internode_dispatch"
    for rank, result in enumerate(results):  # the staged path ran, not the reference
        assert result["staged_calls"] == {dispatch: 1, "internode_cached_dispatch": 1,
                                          "internode_combine": 1}, (rank, result["staged_calls"])


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


def test_staged_internode_compiled_moe_matches_eager(world_size):
    """``torch.compile(fullgraph=True)`` of ExampleMoE in capacity mode on a buffer of two
    nodes (the staged internode ops) equals eager to float32 rounding over several steps
    without recompiling; the ``aot_eager`` graph equals eager bit for bit."""
    from deep_ep_ops import _build
    from test_cuda_intranode import FLOAT32_ROUNDING, _compile_job

    if not hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"):
        pytest.skip("the extension has no internode forward kernel")
    results = gpu_distributed.run_on_gpus(world_size, _compile_job, "capacity", 3,
                                          world_size // 2, timeout=600)
    for rank, result in enumerate(results):
        assert result["max_error"] <= FLOAT32_ROUNDING, (rank, result)
        assert result["aot_eager_exact"], (rank, result)


# --- pressure: the staged path against the reference, thousands of calls ------------------------

INTERNODE_PRESSURE_ITERATIONS = scaled(2000)
INTERNODE_PRESSURE_TOKENS, INTERNODE_PRESSURE_HIDDEN = 256, 1024
STAGED_RDMA_BYTES = 256 << 20


def _staged_buffer(per_node: int):
    os.environ[RANKS_PER_NODE_ENV] = str(per_node)
    try:
        return deep_ep.Buffer(dist.group.WORLD, 1 << 26, STAGED_RDMA_BYTES)
    finally:
        os.environ.pop(RANKS_PER_NODE_ENV, None)


def _pressure_payload(it, num_tokens, hidden, g, device):
    """BF16 rows, or (every 5th iteration) FP8 rows with float32 scales per 128 columns."""
    x = (torch.randn(num_tokens, hidden, generator=g, device=device) * 2).bfloat16()
    if it % 5 != 4:
        return x, None
    scales = torch.rand(num_tokens, hidden // 128, generator=g, device=device) + 0.5
    return x.float().clamp(-400, 400).to(torch.float8_e4m3fn), scales


def _internode_pressure_job(rank, num_ranks, per_node, iterations, max_tokens, hidden, seed):
    from deep_ep_ops import internode_staged, reference_internode
    from test_cuda_intranode import _pressure_routing

    device = _device()
    buffer = _staged_buffer(per_node)
    name, num_nodes = buffer.name, buffer.num_rdma_ranks
    num_experts, num_topk, config = 8 * num_ranks, 8, internode_helpers.CONFIG
    g = _generator(device, seed * 7919 + rank)
    rng = random.Random(seed * 104729 + rank)
    outputs = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights", "per_expert",
               *ops.InternodeHandle._fields[1:], "cached_x", "combined_x", "combined_weights")
    flags = torch.zeros(iterations, len(outputs), dtype=torch.bool, device=device)
    host_failures: list[str] = []
    counts = dict(capacity=0, fp8=0, aligned=0, rows=0)
    kinds: dict[str, int] = {}
    calls_before = dict(internode_staged.calls)
    for it in range(iterations):
        capacity = it % 4 == 3  # the same on every rank (num_worst_tokens must agree)
        alignment = 4 if it % 3 == 1 else 1
        num_worst = num_ranks * max_tokens if capacity else 0
        num_tokens = max_tokens if rng.random() < 0.8 else rng.randint(0, max_tokens)
        if rng.random() < 0.02:
            num_tokens = 0
        topk, kind = _pressure_routing(rng, num_tokens, num_experts, num_topk, num_ranks, g,
                                       device)
        kinds[kind] = kinds.get(kind, 0) + 1
        weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
        x, scales = _pressure_payload(it, num_tokens, hidden, g, device)
        layout = ops.get_dispatch_layout(topk, num_experts, num_ranks, num_nodes)
        args = (x, scales, topk, weights, layout.num_tokens_per_rank,
                layout.num_tokens_per_rdma_rank, layout.is_token_in_rank,
                layout.num_tokens_per_expert, name, alignment)
        if capacity:
            got = torch.ops.deep_ep.internode_capacity_dispatch(*args, num_worst, config)
            want = reference_internode.internode_capacity_dispatch(*args, num_worst, config)
        else:
            got = torch.ops.deep_ep.internode_dispatch(*args, config)
            want = reference_internode.internode_dispatch(*args, config)
        counts["capacity"] += capacity
        counts["fp8"] += scales is not None
        counts["aligned"] += alignment > 1
        counts["rows"] += got[0].size(0)
        got_handle = (layout.is_token_in_rank, *got[5:])
        want_handle = (layout.is_token_in_rank, *want[5:])
        x2 = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
        cached = torch.ops.deep_ep.internode_cached_dispatch(x2, None, None, *got_handle, name,
                                                             num_worst, config)
        ref_cached = reference_internode.internode_cached_dispatch(x2, None, None, *want_handle,
                                                                   name, num_worst, config)
        y = (torch.randn(got[0].size(0), hidden, generator=g, device=device) * 2).bfloat16()
        bias = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
        combined = torch.ops.deep_ep.internode_combine(y, got[3], bias, None, *got_handle, name,
                                                       num_worst, config)
        ref_combined = reference_internode.internode_combine(
            y[:want[0].size(0)], want[3], bias, None, *want_handle, name, num_worst, config)
        pairs = (*zip(got, want), (cached[0], ref_cached[0]), *zip(combined, ref_combined))
        flags[it] = _bit_flags(pairs, outputs, f"iteration {it} ({kind})", host_failures, device)
    _sync(device)
    bad = flags.nonzero().tolist()
    staged = {op: n - calls_before.get(op, 0) for op, n in internode_staged.calls.items()}
    buffer.destroy()
    return dict(mismatches=len(bad), iterations=iterations, kinds=kinds, staged=staged,
                details=host_failures[:10] + [f"iteration {i}: {outputs[k]} differs"
                                              for i, k in bad[:30]], **counts)


def test_staged_internode_pressure(world_size):
    """Thousands of internode dispatch + cached dispatch + combine calls on the staged path
    (every 4th in capacity mode, every 5th FP8 with scales, every 3rd with expert_alignment 4,
    a bias on every combine) with fresh random, skewed, hot-rank, -1 and routed-nowhere
    routing and varying (some zero) token counts; every output of every call bit for bit
    against the reference (deep_ep_ops/reference_internode.py)."""
    from deep_ep_ops import _build

    if not hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"):
        pytest.skip("the extension has no internode forward kernel")
    per_node = world_size // 2
    results = gpu_distributed.run_on_gpus(
        world_size, _internode_pressure_job, per_node, INTERNODE_PRESSURE_ITERATIONS,
        INTERNODE_PRESSURE_TOKENS, INTERNODE_PRESSURE_HIDDEN, 3, timeout=600)
    details = [f"rank {rank}: {d}" for rank, r in enumerate(results) for d in r["details"]]
    assert sum(r["mismatches"] for r in results) == 0, "\n".join(details)
    n = INTERNODE_PRESSURE_ITERATIONS
    for r in results:  # not vacuous: every mode ran, on the staged path
        assert r["iterations"] == n and r["rows"] > 0 and len(r["kinds"]) == 5, r
        assert r["capacity"] == n // 4 and r["fp8"] == (n + 1) // 5 and r["aligned"] > 0, r
        assert r["staged"].get("internode_dispatch", 0) == n - n // 4, r["staged"]
        assert r["staged"].get("internode_capacity_dispatch", 0) == n // 4, r["staged"]
        assert r["staged"].get("internode_combine", 0) == n, r["staged"]


# --- a missing peer ----------------------------------------------------------------------------

INTERNODE_TIMEOUT_S = 3
INTERNODE_TIMEOUT_SCENARIOS = {
    "internode_dispatch": "the call",
    "internode_capacity_dispatch": "the next op call",
}


def _internode_timeout_job(rank, num_ranks, scenario):
    device = _device()
    buffer = _staged_buffer(num_ranks // 2)
    inp = internode_helpers.inputs(rank, num_ranks, 7, device)
    layout = ops.get_dispatch_layout(inp["topk"], inp["experts"], num_ranks,
                                     buffer.num_rdma_ranks)
    dist.barrier()
    if rank != 0:
        return dict(called=False)  # the others never call (and stay alive, idle)
    start = time.monotonic()
    error = None
    worst = 64 if scenario == "internode_capacity_dispatch" else 0
    try:
        ops.internode_dispatch(buffer.name, inp["x"], layout, inp["topk"], inp["weights"],
                               num_worst_tokens=worst, config=internode_helpers.CONFIG)
        if worst:
            _sync(device)
            ops.get_dispatch_layout(inp["topk"], inp["experts"], num_ranks,
                                    buffer.num_rdma_ranks)
            ops.internode_dispatch(buffer.name, inp["x"], layout, inp["topk"], inp["weights"],
                                   num_worst_tokens=worst, config=internode_helpers.CONFIG)
    except Exception as caught:  # noqa: BLE001  (the test process checks type and message)
        error = caught
    return dict(called=True, elapsed=time.monotonic() - start,
                error_type=None if error is None else type(error).__name__,
                is_runtime_error=isinstance(error, RuntimeError),
                message=None if error is None else str(error))


def test_staged_internode_missing_peer_times_out_naming_it(world_size):
    """With DEEP_EP_OPS_TIMEOUT_S=3, rank 0 alone calls an internode dispatch on a buffer of
    two nodes: a RuntimeError saying "timed out", naming a deep_ep op and a missing rank, at the
    call (data-dependent) or at the next op call (capacity mode); every rank exits by itself."""
    from deep_ep_ops import _build
    from deep_ep_ops._registry import TIMEOUT_ENV

    if not hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"):
        pytest.skip("the extension has no internode forward kernel")
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {TIMEOUT_ENV: str(INTERNODE_TIMEOUT_S)}, _internode_timeout_job,
        INTERNODE_TIMEOUT_SCENARIOS, timeout=180)
    problems = []
    for scenario, where in INTERNODE_TIMEOUT_SCENARIOS.items():
        first = results[scenario][0]
        message = first["message"] or ""
        label = f"{scenario} (expected from {where})"
        if first["error_type"] is None or not first["is_runtime_error"]:
            problems.append(f"{label}: {first['error_type']} after {first['elapsed']:.1f} s: "
                            f"{message}")
            continue
        if "timed out" not in message.lower() or not re.search(r"deep_ep::\w*dispatch", message):
            problems.append(f"{label}: message does not say 'timed out' in a dispatch: {message}")
        if not any(re.search(rf"\brank {peer}\b", message) for peer in range(1, world_size)):
            problems.append(f"{label}: message names no missing rank: {message}")
        gpu_distributed.record_fault(world_size, f"internode missing peer: {label}", 0,
                                     f"{first['error_type']}: {message}", first["elapsed"])
        problems += gpu_distributed.timeout_problems(label, results[scenario],
                                                     exit_codes[scenario], INTERNODE_TIMEOUT_S)
    assert not problems, "\n".join(problems)
