"""GPU: faults around CUDA buffers are bounded and name ranks, as on the reference
(tests/test_faults.py): a rank that never creates its buffer, or never comes to destroy it.

Each scenario runs in a fresh pool of ranks (NCCL with a GPU each, or gloo ranks sharing one
GPU under CUDA MPS), with the kernels' runtimes (NVLink IPC and NVSHMEM) in the buffer; the
error must come within DEEP_EP_OPS_TIMEOUT_S + 1 s and the ranks must exit cleanly.
"""

from __future__ import annotations

import functools
import re
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


def _attempt(report: dict, label: str, fn) -> None:
    """``report[label]``: what ``fn``, a synchronize and a device-error check raised (type name
    and message), or ``(None, "")``; ``report["seconds"][label]``: how long that took."""
    import torch

    from deep_ep_ops import ops

    start = time.monotonic()
    try:
        fn()
        torch.cuda.synchronize()
        ops.check_device_errors()
    except Exception as error:  # noqa: BLE001  (the test process checks type and message)
        report[label] = (type(error).__name__, str(error))
    else:
        report[label] = (None, "")
    report.setdefault("seconds", {})[label] = time.monotonic() - start


def _record(world_size: int, case: str, reports: list, labels) -> None:
    """The fault table's rows of ``labels`` from every rank's report (scripts/gpu_run.sh)."""
    for rank, report in enumerate(reports):
        for label in labels:
            kind, message = report[label]
            gpu_distributed.record_fault(world_size, f"{case}: {label}", rank,
                                         f"{kind}: {message}" if kind else "no error",
                                         report["seconds"][label])


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
        gpu_distributed.record_fault(world_size, f"absent at {stage}", 0,
                                     f"{first['error_type']}: {first['message']}",
                                     first["elapsed"])
    assert not problems, "\n".join(problems)


# --- ranks that disagree, on the low-latency kernels ---------------------------------------------


def _ll_disagreement(rank, num_ranks):
    """Rank 0 pins another num_max_dispatch_tokens_per_rank, then calls with another use_fp8:
    every rank raises a ValueError naming the argument and the ranks' values, and the buffer
    stays in step (the agreeing call after each works)."""
    import torch

    from deep_ep_ops import ops
    from gpu_helpers import _device, _generator, _routing

    device = _device()
    num_max, hidden, num_topk, num_experts = 16, 512, 4, 4 * num_ranks
    hint = max(Buffer.get_low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
               for m in (num_max, num_max + 1))
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True)
    g = _generator(device, 5 + rank)
    x = torch.randn(num_max, hidden, generator=g, device=device).bfloat16()
    topk = _routing("random", num_max, num_experts, num_topk, num_ranks, g, device)
    report = {}
    attempt = functools.partial(_attempt, report)

    odd = rank == 0
    attempt("M", lambda: ops.low_latency_dispatch(buffer.name, x, topk, num_max + odd,
                                                   num_experts, use_fp8=False))
    attempt("M agreed", lambda: ops.low_latency_dispatch(buffer.name, x, topk, num_max,
                                                          num_experts, use_fp8=False))
    attempt("use_fp8", lambda: ops.low_latency_dispatch(buffer.name, x, topk, num_max,
                                                         num_experts, use_fp8=odd))
    attempt("use_fp8 agreed", lambda: ops.low_latency_dispatch(buffer.name, x, topk, num_max,
                                                                num_experts, use_fp8=True))
    buffer.destroy()
    return report


def test_low_latency_ranks_that_disagree_all_raise(world_size):
    if not _build.HAS_LOW_LATENCY_KERNELS:
        pytest.skip("the NVSHMEM extension is not built")
    problems = []
    reports = gpu_distributed.run_on_gpus(world_size, _ll_disagreement)
    _record(world_size, "low-latency disagreement", reports, ("M", "use_fp8"))
    for rank, report in enumerate(reports):
        for label, fragments in (("M", ("num_max_dispatch_tokens_per_rank", "rank 0: 17",
                                        "rank 1: 16")),
                                 ("use_fp8", ("the ranks disagree on use_fp8",))):
            kind, message = report[label]
            if kind != "ValueError" or not all(f in message for f in fragments):
                problems.append(f"rank {rank} {label}: {kind}: {message!r}")
        for label in ("M agreed", "use_fp8 agreed"):
            if report[label][0] is not None:
                problems.append(f"rank {rank} {label}: {report[label]}")
    assert not problems, "\n".join(problems)


# --- ranks that disagree, on the normal-mode kernels -------------------------------------------


def _normal_disagreement(rank, num_ranks, scenario="once"):
    """Rank 0 dispatches another hidden (the host waits for the counts: every rank raises at
    the call, and the agreeing call after works), then another num_worst_tokens in capacity
    mode (no host wait: the error is raised after it, and the buffer refuses calls after)."""
    import torch

    from deep_ep_ops import ops
    from deep_ep_ops.config import get_dispatch_config
    from gpu_helpers import _device, _generator, _nvl_bytes, _routing

    device = _device()
    num_tokens, hidden, num_topk, num_experts = 64, 256, 2, 4 * num_ranks
    config = get_dispatch_config(num_ranks).to_list()
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=_nvl_bytes([config], [4 * hidden], num_ranks))
    g = _generator(device, 7 + rank)
    topk = _routing("random", num_tokens, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
    layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
    odd = rank == 0
    x = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
    wide = torch.randn(num_tokens, 2 * hidden, generator=g, device=device).bfloat16()
    report = {}
    attempt = functools.partial(_attempt, report)

    attempt("hidden", lambda: ops.dispatch(buffer.name, wide if odd else x, layout, topk, weights,
                                           config=config))
    attempt("hidden agreed", lambda: ops.dispatch(buffer.name, x, layout, topk, weights,
                                                  config=config))
    worst = num_tokens * num_ranks
    attempt("num_worst_tokens", lambda: ops.dispatch(
        buffer.name, x, layout, topk, weights, num_worst_tokens=worst + odd, config=config))
    attempt("after", lambda: ops.dispatch(buffer.name, x, layout, topk, weights, config=config))
    return report  # the buffer is unusable now: no destroy


def test_normal_mode_ranks_that_disagree_all_raise(world_size):
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {"DEEP_EP_OPS_TIMEOUT_S": str(TIMEOUT_S)},
        _normal_disagreement, ["once"], timeout=120)
    problems = []
    _record(world_size, "normal-mode disagreement", results["once"],
            ("hidden", "num_worst_tokens", "after"))
    for rank, report in enumerate(results["once"]):
        want = {"hidden": ("ValueError", "the ranks disagree on hidden", "rank 0: 512"),
                "num_worst_tokens": ("ValueError", "the ranks disagree on num_worst_tokens"),
                "after": ("RuntimeError", "unusable")}
        if rank != 0:
            want["hidden"] += (f"rank {rank}: 256",)
        for label, (want_kind, *fragments) in want.items():
            kind, message = report[label]
            if kind != want_kind or not all(f in message for f in fragments):
                problems.append(f"rank {rank} {label}: {kind}: {message!r}")
        if report["hidden agreed"][0] is not None:
            problems.append(f"rank {rank} hidden agreed: {report['hidden agreed']}")
    if exit_codes["once"] != [0] * world_size:
        problems.append(f"exit codes {exit_codes['once']} (None: killed)")
    assert not problems, "\n".join(problems)


# --- ranks that disagree in cached dispatch and combine (the data kernels' call word) ------------


def _data_kernel_disagreement(rank, num_ranks, scenario):
    """An agreeing dispatch, then rank 0 passes rows twice as wide to ``scenario`` (combine or
    cached dispatch, which exchange nothing before their data): every receiver compares its
    senders' call words with its own, so every rank raises a ValueError naming hidden, and
    the buffer refuses the next call."""
    import torch

    from deep_ep_ops import ops
    from deep_ep_ops.config import get_combine_config, get_dispatch_config
    from gpu_helpers import _device, _generator, _nvl_bytes, _routing

    device = _device()
    num_tokens, hidden, num_topk, num_experts = 64, 256, 2, 4 * num_ranks
    configs = [get_dispatch_config(num_ranks).to_list(), get_combine_config(num_ranks).to_list()]
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=_nvl_bytes(configs, [8 * hidden], num_ranks))
    g = _generator(device, 11 + rank)
    topk = _routing("random", num_tokens, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
    layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
    x = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
    out = ops.dispatch(buffer.name, x, layout, topk, weights, config=configs[0])
    width = 2 * hidden if rank == 0 else hidden
    report = {}
    attempt = functools.partial(_attempt, report)
    if scenario == "combine":
        rows = torch.randn(out.recv_x.size(0), width, generator=g, device=device).bfloat16()
        attempt("call", lambda: ops.combine(buffer.name, rows, out.handle, config=configs[1]))
    else:
        wide = torch.randn(num_tokens, width, generator=g, device=device).bfloat16()
        attempt("call", lambda: ops.cached_dispatch(buffer.name, wide, out.handle,
                                                    config=configs[0]))
    attempt("after", lambda: ops.dispatch(buffer.name, x, layout, topk, weights,
                                          config=configs[0]))
    return report  # the buffer is unusable now: no destroy


@pytest.mark.parametrize("scenario", ["combine", "cached_dispatch"])
def test_data_kernel_ranks_that_disagree_all_raise(world_size, scenario):
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {"DEEP_EP_OPS_TIMEOUT_S": str(TIMEOUT_S)},
        _data_kernel_disagreement, [scenario], timeout=120)
    problems = []
    _record(world_size, f"{scenario} disagreement", results[scenario], ("call", "after"))
    for rank, report in enumerate(results[scenario]):
        # Rank 0 hears a peer's 256; every other rank hears rank 0's 512.
        peer_value = r"rank [1-9]\d*: 256" if rank == 0 else r"rank 0: 512"
        kind, message = report["call"]
        if kind != "ValueError" or not re.search(
                rf"{scenario} on cuda:\d+: the ranks disagree on hidden \({peer_value}\); every "
                r"rank must pass the same\. The call's results are invalid", message):
            problems.append(f"rank {rank} {scenario}: {kind}: {message!r}")
        kind, message = report["after"]
        if kind != "RuntimeError" or "unusable" not in message:
            problems.append(f"rank {rank} after: {kind}: {message!r}")
    if exit_codes[scenario] != [0] * world_size:
        problems.append(f"exit codes {exit_codes[scenario]} (None: killed)")
    assert not problems, "\n".join(problems)
