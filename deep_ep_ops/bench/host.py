"""The host table: host time per eager call of every op, with and without grad."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist

from .cases import Inputs, Phase, backend_label, make_inputs
from .settings import (
    HOST_CALLS, HOST_MAX_SLEEP_US, HOST_MIN_CYCLES_PER_US, HOST_REPEATS, HOST_TARGET_US,
    HOST_TOKENS, HOST_WARMUP, LOW_LATENCY, NORMAL, Settings,
)


# --- host time per eager call (the ``host`` table) ---------------------------------------------
#
# host us = median over HOST_REPEATS blocks of (wall time of N back-to-back eager calls through
# ``deep_ep_ops.Buffer`` / N). On GPUs each block starts with a long ``torch.cuda._sleep`` queued
# on the stream, so no call waits for the GPU and the wall time is the host's: the Python layers,
# the dispatcher (and autograd with grad inputs), output allocation and the launches. An op that
# must synchronise (normal-mode dispatch learns its row count on the host) cannot run ahead of a
# sleeping GPU: it is timed back to back on an idle GPU instead, and its host time is the wall
# time per call minus its GPU busy time per call (torch.profiler's device intervals: CUDA events
# around a call would also span the GPU's waits for the host). On CPU (gloo) the same loop times
# the reference's whole call, its computation and exchange included.


@dataclasses.dataclass(frozen=True)
class HostCase:
    """One op (or split op) of the host table, called through ``deep_ep_ops.Buffer``.

    ``build(buffer, setup, requires_grad)`` returns the phases of one call (a split op has a
    send and a receive phase; each phase gets a row). ``no_grad_reason`` says why there is no
    variant with inputs that require grad.
    """

    mode: str
    ops: tuple[str, ...]  # the row names, one per phase
    inputs: str
    build: Callable[[Any, "HostSetup", bool], list[Phase]]
    no_grad_reason: Optional[str] = None
    syncs: bool = False  # learns a size on the host: timed as wall - GPU time on GPUs
    note: str = ""


@dataclasses.dataclass
class HostSetup:
    """One rank's inputs for the host cases, with what the later ops need from a dispatch."""

    inputs: Inputs
    num_experts: int
    layout: tuple  # Buffer.get_dispatch_layout's first four results
    num_worst_tokens: int
    recv_x: Optional[torch.Tensor] = None  # normal dispatch of x, and its handle
    handle: Any = None
    ll_recv_x: Optional[torch.Tensor] = None  # BF16 low-latency dispatch of x, and its handle
    ll_handle: Any = None


def _grad_input(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A fresh leaf copy of ``t``; with ``requires_grad`` the op builds an autograd graph."""
    return t.detach().clone().requires_grad_(requires_grad)


def _host_layout(buffer, h, rg):
    topk_idx, num_experts = h.inputs.topk_idx, h.num_experts
    return [("layout", lambda _: buffer.get_dispatch_layout(topk_idx, num_experts))]


def _host_dispatch(capacity: bool):
    def build(buffer, h, rg):
        x, w = _grad_input(h.inputs.x, rg), _grad_input(h.inputs.topk_weights, rg)
        per_rank, _, per_expert, in_rank = h.layout
        topk_idx, worst = h.inputs.topk_idx, h.num_worst_tokens if capacity else 0
        return [("dispatch", lambda _: buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=w,
            num_worst_tokens=worst,
        ))]

    return build


def _host_cached_dispatch(buffer, h, rg):
    x, handle = _grad_input(h.inputs.x, rg), h.handle
    return [("cached dispatch", lambda _: buffer.dispatch(x, handle=handle))]


def _host_combine(buffer, h, rg):
    x, handle = _grad_input(h.recv_x, rg), h.handle
    return [("combine", lambda _: buffer.combine(x, handle))]


def _host_low_latency_dispatch(use_fp8: bool, split: bool):
    def build(buffer, h, rg):
        x, topk_idx = _grad_input(h.inputs.x, rg), h.inputs.topk_idx
        args = (x, topk_idx, h.inputs.num_tokens, h.num_experts)
        if not split:
            return [("dispatch", lambda _: buffer.low_latency_dispatch(*args, use_fp8=use_fp8))]
        return [
            ("send", lambda _: buffer.low_latency_dispatch(
                *args, use_fp8=use_fp8, return_recv_hook=True)),
            ("recv", lambda sent: sent[4]()),  # the hook
        ]

    return build


def _host_low_latency_combine(split: bool):
    def build(buffer, h, rg):
        x, w = _grad_input(h.ll_recv_x, rg), _grad_input(h.inputs.topk_weights, rg)
        topk_idx, handle = h.inputs.topk_idx, h.ll_handle
        if not split:
            return [("combine", lambda _: buffer.low_latency_combine(x, topk_idx, w, handle))]
        return [
            ("send", lambda _: buffer.low_latency_combine(
                x, topk_idx, w, handle, return_recv_hook=True)),
            ("recv", lambda sent: sent[2]()),  # the hook
        ]

    return build


_FP8_NOT_DIFFERENTIABLE = "FP8 output is not differentiable (BF16 rows: with grad)"
HOST_CASES = (
    HostCase(NORMAL, ("get_dispatch_layout",), "topk_idx", _host_layout,
             no_grad_reason="no differentiable input (topk_idx is int64)"),
    HostCase(NORMAL, ("dispatch",), "bf16 + weights", _host_dispatch(capacity=False),
             syncs=True, note="syncs (learns N on the host)"),
    HostCase(NORMAL, ("capacity dispatch",), "bf16 + weights", _host_dispatch(capacity=True)),
    HostCase(NORMAL, ("cached dispatch",), "bf16", _host_cached_dispatch),
    HostCase(NORMAL, ("combine",), "bf16", _host_combine),
    HostCase(LOW_LATENCY, ("low_latency_dispatch",), "fp8",
             _host_low_latency_dispatch(use_fp8=True, split=False),
             no_grad_reason=_FP8_NOT_DIFFERENTIABLE),
    HostCase(LOW_LATENCY, ("low_latency_dispatch",), "bf16",
             _host_low_latency_dispatch(use_fp8=False, split=False)),
    HostCase(LOW_LATENCY, ("low_latency_dispatch send", "low_latency_dispatch recv hook"), "fp8",
             _host_low_latency_dispatch(use_fp8=True, split=True),
             no_grad_reason=_FP8_NOT_DIFFERENTIABLE),
    HostCase(LOW_LATENCY, ("low_latency_dispatch send", "low_latency_dispatch recv hook"), "bf16",
             _host_low_latency_dispatch(use_fp8=False, split=True)),
    HostCase(LOW_LATENCY, ("low_latency_combine",), "bf16 + weights",
             _host_low_latency_combine(split=False)),
    HostCase(LOW_LATENCY, ("low_latency_combine send", "low_latency_combine recv hook"),
             "bf16 + weights", _host_low_latency_combine(split=True)),
)


# The modes the host table covers: HOST_CASES has no internode case, so an internode run (which
# the command line runs alone) has no host table, and its report says so.
HOST_MODES = (NORMAL, LOW_LATENCY)


def host_modes(s: Settings) -> tuple[str, ...]:
    """The selected modes that have host rows (none: no host table for this run)."""
    return tuple(mode for mode in s.modes if mode in HOST_MODES)


def host_tokens(s: Settings, mode: str) -> int:
    """Tokens per rank of the host cases: at most ``HOST_TOKENS``, at most the smallest swept
    (low-latency: also its ``num_max_dispatch_tokens_per_rank``, within the buffer's size)."""
    return min(HOST_TOKENS, min(s.tokens[mode]))


def _host_setup(buffer, s: Settings, rank: int, device, mode: str) -> HostSetup:
    """Inputs, layout and the dispatch results the later host cases need (not timed)."""
    tokens = host_tokens(s, mode)
    inputs = make_inputs(tokens, s, rank, device)
    layout = tuple(buffer.get_dispatch_layout(inputs.topk_idx, s.num_experts)[:4])
    h = HostSetup(inputs, s.num_experts, layout, num_worst_tokens=s.num_ranks * tokens)
    if mode == NORMAL:
        per_rank, _, per_expert, in_rank = layout
        recv_x, _, _, _, h.handle, _ = buffer.dispatch(
            inputs.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx,
            topk_weights=inputs.topk_weights,
        )
        h.recv_x = recv_x
    else:
        # The buffer served other shapes before: reset it for these (collective).
        buffer.clean_low_latency_buffer(tokens, s.hidden, s.num_experts)
        h.ll_recv_x, _, h.ll_handle, _, _ = buffer.low_latency_dispatch(
            inputs.x, inputs.topk_idx, tokens, s.num_experts, use_fp8=False
        )
    return h


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _run_host_phases(phases: list[Phase]) -> list[Any]:
    values, value = [], None
    for _, fn in phases:
        value = fn(value)
        values.append(value)
    return values


def builds_autograd_graph(phases: list[Phase]) -> bool:
    """Whether one call's results have an autograd graph (an untimed call)."""
    return any(t.grad_fn is not None for v in _run_host_phases(phases) for t in _tensors(v))


class _GpuSleep:
    """``torch.cuda._sleep`` by duration.

    ``_sleep`` spins for a number of SM clock cycles; the clock rises under load, so a rate
    measured on an idle GPU can be several times too low. The rate used is the measured one but
    at least ``HOST_MIN_CYCLES_PER_US`` (about the top boost clock of an H200): a sleep can come
    out longer than asked, which only costs time, rarely shorter.
    """

    def __init__(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        cycles = 20_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        self.measured_cycles_per_us = cycles / max(start.elapsed_time(end) * 1e3, 1.0)
        self.cycles_per_us = max(self.measured_cycles_per_us, HOST_MIN_CYCLES_PER_US)

    def __call__(self, us: float) -> torch.cuda.Event:
        """Queue a sleep of about ``us`` µs (or more); returns an event recorded right after it."""
        torch.cuda._sleep(int(us * self.cycles_per_us))
        done = torch.cuda.Event()
        done.record()
        return done


def _line_up(device, group) -> None:
    """An idle GPU and every rank at the same point."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_phases(phases: list[Phase], num_calls: int) -> list[float]:
    """``num_calls`` back-to-back calls of ``phases``; the seconds spent in each phase."""
    spent = [0.0] * len(phases)
    for _ in range(num_calls):
        value = None
        for p, (_, fn) in enumerate(phases):
            start = time.perf_counter()
            value = fn(value)
            spent[p] += time.perf_counter() - start
    return spent


def _time_host_blocks(phases: list[Phase], num_calls: int, repeats: int, device, group,
                      sleep: Optional[_GpuSleep], estimate_us: float,
                      baseline: Optional[list[Phase]] = None):
    """Per repeat, the wall µs per call of each phase over ``num_calls`` back-to-back calls,
    and with ``baseline`` then the µs per call of the same number of baseline calls (the
    sample's last entry): each repeat pairs the op with the baseline of its moment.

    With ``sleep`` (GPUs) the GPU sleeps through each repeat: returns ``(samples, went_idle)``,
    where ``went_idle`` says the sleep ended before the last call returned (a call waited for
    the GPU, or the estimate was short)."""
    samples, went_idle = [], False
    for _ in range(repeats):
        _line_up(device, group)
        done = None
        if sleep is not None:  # long enough for every call, whatever the GPU does per call
            done = sleep(min(2 * num_calls * (estimate_us + 20.0) + 10_000, HOST_MAX_SLEEP_US))
        spent = _call_phases(phases, num_calls)
        if baseline is not None:
            spent += _call_phases(baseline, num_calls)
        if done is not None and done.query():
            went_idle = True
        samples.append([t / num_calls * 1e6 for t in spent])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples, went_idle


def _gpu_busy_us(phases: list[Phase], num_calls: int, device, group) -> Optional[float]:
    """GPU busy µs per call over ``num_calls`` back-to-back calls: the union of the intervals of
    the device activities (kernels, copies, memsets) torch.profiler records, i.e. the GPU time
    without the gaps in which the GPU waited for the host. ``None`` if the profiler fails (the
    calls are made all the same, so the ranks stay in step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _line_up(device, group)
    prof = profile(activities=[ProfilerActivity.CUDA])
    try:
        prof.__enter__()
    except Exception:  # noqa: BLE001 (no CUPTI: no busy time)
        prof = None
    try:
        for _ in range(num_calls):
            _run_host_phases(phases)
        torch.cuda.synchronize(device)
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
    if prof is None:
        return None
    spans = sorted(
        (e.start_ns(), e.start_ns() + e.duration_ns())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CUDA and e.duration_ns() > 0
    )
    if not spans:
        return None
    busy, end = 0, None
    for first, last in spans:
        if end is None or first > end:
            busy, end = busy + last - first, last
        elif last > end:
            busy, end = busy + last - end, last
    return busy / 1e3 / num_calls


def _time_host_synced(phases: list[Phase], num_calls: int, repeats: int, device, group,
                      baseline: list[Phase]):
    """For calls that wait for the GPU: per repeat, the wall µs per call of ``num_calls``
    back-to-back calls on a GPU that is idle at the start (final synchronize included), per
    phase the wall µs until each phase returned, and then the µs per call of as many baseline
    calls (on the idle GPU)."""
    samples = []
    for _ in range(repeats):
        _line_up(device, group)
        start = time.perf_counter()
        spent = _call_phases(phases, num_calls)
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / num_calls * 1e6
        base = _call_phases(baseline, num_calls)[0] / num_calls * 1e6
        samples.append((wall, [t / num_calls * 1e6 for t in spent], base))
    return samples


def _any_rank(flag: bool, device, group) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _baseline_summary(rows: list[dict], op: str) -> dict:
    """The baselines of the timed rows: median and range (the report's last lines)."""
    per_row = [r["baseline_us"] for r in rows]
    return {"op": op, "tokens": rows[0]["tokens_per_rank"] if rows else HOST_TOKENS,
            "host_us": statistics.median(per_row) if per_row else None,
            "min_us": min(per_row, default=None), "max_us": max(per_row, default=None)}


SLEEPING_GPU = "GPU kept busy"
WALL_MINUS_GPU = "wall - GPU busy time"
WAITS_FOR_GPU = "waits for the GPU: wall time, GPU time included"


def _baseline_phases(h: HostSetup, requires_grad: bool) -> list[Phase]:
    """The baseline: one plain torch op called the way the case's op is (its launch and output;
    with grad inputs its autograd node too): ``torch.add`` on the case's ``topk_idx``, or with
    ``requires_grad`` on a leaf copy of its ``topk_weights`` that requires grad."""
    if requires_grad:
        weights = _grad_input(h.inputs.topk_weights, True)
        return [("torch.add (grad)", lambda _: torch.add(weights, 1))]
    topk_idx = h.inputs.topk_idx
    return [("torch.add", lambda _: torch.add(topk_idx, 1))]


def measure_host_case(case: HostCase, buffer, h: HostSetup, requires_grad: bool, device, group,
                      sleep: Optional[_GpuSleep]) -> list[dict]:
    """This rank's host µs per call of each phase of ``case`` (one dict per phase).

    GPUs: wall time of back-to-back calls while the GPU sleeps (``SLEEPING_GPU``). An op that
    syncs (``case.syncs``, or any call that turned out to wait for the sleeping GPU on some
    rank) is timed back to back on an idle GPU instead: its wall time per call minus its GPU
    busy time per call (``WALL_MINUS_GPU``); a split op that waits gets the wall time per phase
    (``WAITS_FOR_GPU``). CPU: the wall time per call.
    """
    on_gpu = device.type == "cuda"
    num_calls = HOST_CALLS[device.type]
    repeats, warmup = HOST_REPEATS[device.type], HOST_WARMUP[device.type]
    phases = case.build(buffer, h, requires_grad)
    graph = builds_autograd_graph(phases)
    if graph != requires_grad:
        raise RuntimeError(
            f"host case {case.ops[0]} ({case.inputs}, requires_grad={requires_grad}): the call "
            f"{'built no' if requires_grad else 'built an'} autograd graph"
        )
    if on_gpu:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        _run_host_phases(phases)
    if on_gpu:
        torch.cuda.synchronize(device)
    estimate_us = (time.perf_counter() - start) / max(warmup, 1) * 1e6
    rows: list[dict] = [{"host_us": None, "method": None} for _ in phases]
    syncs = case.syncs and on_gpu
    base_phases = _baseline_phases(h, requires_grad)
    # The baseline is timed in every repeat right after the op's calls: the host's speed drifts
    # over a run (torch.add took 7.8 to 17.8 µs within one device call, 2026-12-03), and each
    # repeat's op layer is its op time minus its own baseline (the row: the median of those).
    if not syncs:
        samples, went_idle = _time_host_blocks(
            phases, num_calls, repeats, device, group, sleep, estimate_us, baseline=base_phases
        )
        syncs = on_gpu and _any_rank(went_idle, device, group)
        if not syncs:
            for p, row in enumerate(rows):
                row["host_us"] = statistics.median(sample[p] for sample in samples)
                row["op_layer_us"] = statistics.median(sample[p] - sample[-1]
                                                       for sample in samples)
                row["method"] = SLEEPING_GPU if on_gpu else "wall (CPU: the whole call)"
            baseline_us = statistics.median(sample[-1] for sample in samples)
    if syncs:
        synced = _time_host_synced(phases, num_calls, repeats, device, group, base_phases)
        busy = _gpu_busy_us(phases, num_calls, device, group)
        for p, row in enumerate(rows):
            row["wall_us"] = statistics.median(x[1][p] for x in synced)
            row["method"] = WAITS_FOR_GPU
            row["host_us"] = row["wall_us"]
            row["op_layer_us"] = statistics.median(x[1][p] - x[2] for x in synced)
        if len(phases) == 1 and busy is not None:
            rows[0].update(
                host_us=max(0.0, statistics.median(wall for wall, _, _ in synced) - busy),
                op_layer_us=statistics.median(wall - busy - base for wall, _, base in synced),
                wall_us=statistics.median(wall for wall, _, _ in synced), gpu_busy_us=busy,
                method=WALL_MINUS_GPU,
            )
        baseline_us = statistics.median(base for _, _, base in synced)
    return [dict(row, autograd_graph=graph, syncs=syncs, baseline_us=baseline_us)
            for row in rows]


def measure_host(rank: int, s: Settings, group, device: torch.device, buffer) -> dict:
    """The host table (every rank takes part: the ops are collectives); the same on every rank.

    One row per op phase and per grad variant (inputs that do / do not require grad); the
    reported ``host_us`` is the max over ranks of each rank's median. Also a ``torch.add`` on
    the same ``topk_idx``, timed the same way, as the baseline of a plain torch op. Covers
    ``host_modes(s)`` only.
    """
    on_gpu = device.type == "cuda"
    sleep = _GpuSleep() if on_gpu else None
    rows: list[dict] = []
    for mode in host_modes(s):
        setup = _host_setup(buffer, s, rank, device, mode)
        for case in (c for c in HOST_CASES if c.mode == mode):
            for requires_grad in (False, True):
                base = {"mode": mode, "inputs": case.inputs, "tokens_per_rank":
                        setup.inputs.num_tokens, "grad": requires_grad,
                        "syncs": case.syncs, "note": case.note}
                if requires_grad and case.no_grad_reason:
                    rows += [dict(base, op=op, host_us=None, note=case.no_grad_reason)
                             for op in case.ops]
                    continue
                measured = measure_host_case(case, buffer, setup, requires_grad, device, group,
                                             sleep)
                rows += [dict(base, op=op, **m) for op, m in zip(case.ops, measured)]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        gathered, [(r.get("host_us"), r.get("baseline_us"), r.get("op_layer_us")) for r in rows],
        group=group,
    )
    for i, row in enumerate(rows):
        per_rank = [g[i][0] for g in gathered]
        row["host_us_per_rank"] = per_rank
        row["host_us"] = None if per_rank[0] is None else max(per_rank)
        # The op layer's share: what the call costs the host above one plain torch op's launch
        # (the baseline timed beside it in each repeat), which no op can avoid and which
        # follows the host; max over ranks.
        row["baseline_us"] = None if per_rank[0] is None else max(g[i][1] for g in gathered)
        row["op_layer_us"] = None if per_rank[0] is None else max(g[i][2] for g in gathered)
        target = HOST_TARGET_US if on_gpu and not s.shared_gpu else None
        row["vs_target"] = (
            target / max(row["op_layer_us"], 0.1) if target and row["host_us"] else None
        )
    return {
        "device": device.type, "backend": backend_label(on_gpu), "calls": HOST_CALLS[device.type],
        "repeats": HOST_REPEATS[device.type],
        "target_us": HOST_TARGET_US if on_gpu and not s.shared_gpu else None,
        "shared_gpu": s.shared_gpu,
        "rows": rows,
        "sleep_cycles_per_us": None if sleep is None else {
            "measured": sleep.measured_cycles_per_us, "used": sleep.cycles_per_us},
        "baseline": _baseline_summary(
            [r for r in rows if r["host_us"] is not None and not r["grad"]], "torch.add"),
        "baseline_grad": _baseline_summary(
            [r for r in rows if r["host_us"] is not None and r["grad"]],
            "torch.add of a leaf that requires grad"),
    }
