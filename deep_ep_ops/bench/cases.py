"""The benchmark cases: backends (the op library or the reference), cases, timing, one rank."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import _build, internode_staged, ops, reference, reference_internode
from ..buffer import Buffer
from ..config import Config, get_combine_config, get_dispatch_config
from .settings import (
    EAGER, GRAPH, GRAPH_SIDE_WARMUP, INTERNODE, LOW_LATENCY, NORMAL, SM_SWEPT_MODES, Settings,
    bf16_row_bytes, fp8_row_bytes, rdma_token_pairs, reference_label,
)


# --- backends: the same calls through the op library or straight into the reference ---------


class _Backend:
    """The calls a benchmark case makes, bound to one communicator; ``label`` names it.

    ``num_nodes`` is the buffer's node count (``Buffer.num_rdma_ranks``): the layout is computed
    for it, and with more than one, ``dispatch`` and ``combine`` take the internode ops (as
    ``Buffer.dispatch`` does).
    """

    def __init__(self, buffer: str, num_ranks: int, num_experts: int, label: str,
                 num_nodes: int = 1):
        self.buffer, self.num_ranks, self.num_experts, self.label = (
            buffer, num_ranks, num_experts, label
        )
        self.num_nodes = num_nodes


class OpsBackend(_Backend):
    """Calls the ``deep_ep_ops.ops`` wrappers, i.e. whatever kernel the dispatcher picks.

    With ``num_sms``, normal-mode and internode dispatch and combine get
    ``Config(num_sms=num_sms, ...)`` from ``get_dispatch_config`` / ``get_combine_config``;
    without, the wrappers' default config.
    """

    def __init__(self, buffer: str, num_ranks: int, num_experts: int, label: str,
                 num_sms: Optional[int] = None, num_nodes: int = 1):
        super().__init__(buffer, num_ranks, num_experts, label, num_nodes)
        self.num_sms = num_sms
        self.dispatch_config: Optional[Config] = None
        self.combine_config: Optional[Config] = None
        if num_sms is not None:
            self.dispatch_config = get_dispatch_config(num_ranks, num_sms)
            self.combine_config = get_combine_config(num_ranks, num_sms)

    def get_dispatch_layout(self, topk_idx):
        return ops.get_dispatch_layout(topk_idx, self.num_experts, self.num_ranks,
                                       self.num_nodes)

    def dispatch(self, x, layout, topk_idx, topk_weights, x_scales=None):
        dispatch = ops.internode_dispatch if self.num_nodes > 1 else ops.dispatch
        return dispatch(self.buffer, x, layout, topk_idx, topk_weights, x_scales=x_scales,
                        config=self.dispatch_config)

    def combine(self, x, handle):
        # ``handle`` comes from ``dispatch`` of this backend: the same channel count.
        combine = ops.internode_combine if self.num_nodes > 1 else ops.combine
        return combine(self.buffer, x, handle, config=self.combine_config)

    def low_latency_dispatch(self, x, topk_idx, num_max, use_fp8):
        return ops.low_latency_dispatch(
            self.buffer, x, topk_idx, num_max, self.num_experts, use_fp8=use_fp8
        )

    def low_latency_dispatch_send(self, x, topk_idx, num_max, use_fp8):
        return ops.low_latency_dispatch_send(
            self.buffer, x, topk_idx, num_max, self.num_experts, use_fp8=use_fp8
        )

    def low_latency_dispatch_recv(self, pending):
        return ops.low_latency_dispatch_recv(self.buffer, pending)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle):
        return ops.low_latency_combine(self.buffer, x, topk_idx, topk_weights, handle)

    def low_latency_combine_send(self, x, topk_idx, topk_weights, handle):
        return ops.low_latency_combine_send(self.buffer, x, topk_idx, topk_weights, handle)

    def low_latency_combine_recv(self, combined_x, topk_idx, topk_weights):
        return ops.low_latency_combine_recv(self.buffer, combined_x, topk_idx, topk_weights)


class ReferenceBackend(_Backend):
    """Calls ``deep_ep_ops.reference`` directly: the plain torch + collectives baseline.

    Used on CUDA to time the reference over NCCL beside our kernels in the same process (the
    dispatcher would pick the CUDA kernels). Results are wrapped in the same named tuples as
    the op wrappers return, so every benchmark case runs unchanged on either backend.
    """

    def get_dispatch_layout(self, topk_idx):
        return ops.DispatchLayout(*reference.get_dispatch_layout(
            topk_idx, self.num_experts, self.num_ranks, self.num_nodes
        ))

    def dispatch(self, x, layout, topk_idx, topk_weights, x_scales=None):
        if self.num_nodes > 1:
            return self._internode_dispatch(x, layout, topk_idx, topk_weights, x_scales)
        out = reference.dispatch(
            x, x_scales, topk_idx, topk_weights, layout.num_tokens_per_rank,
            layout.is_token_in_rank, layout.num_tokens_per_expert, self.buffer, 1,
            get_dispatch_config(self.num_ranks).to_list(),
        )
        handle = ops.DispatchHandle(
            out[5], out[6], out[7], out[8], layout.is_token_in_rank, out[9], 0
        )
        return ops.DispatchOutput(*out[:5], handle)

    def combine(self, x, handle):
        if self.num_nodes > 1:
            return ops.CombineOutput(*reference_internode.internode_combine(
                x, None, None, None, *handle, self.buffer, handle.num_worst_tokens,
                get_combine_config(self.num_ranks).to_list(),
            ))
        return ops.CombineOutput(*reference.combine(
            x, None, None, None, *handle[:6], self.buffer, handle.num_worst_tokens,
            get_combine_config(self.num_ranks).to_list(),
        ))

    def _internode_dispatch(self, x, layout, topk_idx, topk_weights, x_scales=None):
        out = reference_internode.internode_dispatch(
            x, x_scales, topk_idx, topk_weights, layout.num_tokens_per_rank,
            layout.num_tokens_per_rdma_rank, layout.is_token_in_rank,
            layout.num_tokens_per_expert, self.buffer, 1,
            get_dispatch_config(self.num_ranks).to_list(),
        )
        return ops.InternodeDispatchOutput(
            *out[:5], ops.InternodeHandle(layout.is_token_in_rank, *out[5:])
        )

    def _low_latency_output(self, out, x, num_max, use_fp8):
        recv_x, recv_x_scales, recv_count, src_info, layout_range = out
        handle = ops.LowLatencyHandle(src_info, layout_range, num_max, x.size(1), self.num_experts)
        return ops.LowLatencyDispatchOutput(
            recv_x, recv_x_scales if use_fp8 else None, recv_count, handle
        )

    def low_latency_dispatch(self, x, topk_idx, num_max, use_fp8):
        out = reference.low_latency_dispatch(
            x, topk_idx, self.buffer, self.num_ranks, num_max, self.num_experts, use_fp8,
            False, False,
        )
        return self._low_latency_output(out, x, num_max, use_fp8)

    def low_latency_dispatch_send(self, x, topk_idx, num_max, use_fp8):
        out = reference.low_latency_dispatch_send(
            x, topk_idx, self.buffer, self.num_ranks, num_max, self.num_experts, use_fp8,
            False, False,
        )
        return self._low_latency_output(out, x, num_max, use_fp8)

    def low_latency_dispatch_recv(self, pending):
        scales = pending.recv_x_scales
        if scales is None:
            scales = pending.recv_x.new_empty((*pending.recv_x.shape[:2], 0), dtype=torch.float32)
        reference.low_latency_dispatch_recv(
            pending.recv_x, scales, pending.recv_count, pending.handle.src_info,
            pending.handle.layout_range, None, self.buffer,
        )
        return pending

    def _combine_args(self, x, topk_idx, topk_weights, handle):
        return (
            x, topk_idx, topk_weights, handle.src_info, handle.layout_range, self.buffer,
            self.num_ranks, handle.num_max_dispatch_tokens_per_rank, handle.num_experts, False,
        )

    def low_latency_combine(self, x, topk_idx, topk_weights, handle):
        return reference.low_latency_combine(*self._combine_args(x, topk_idx, topk_weights, handle))

    def low_latency_combine_send(self, x, topk_idx, topk_weights, handle):
        return reference.low_latency_combine_send(
            *self._combine_args(x, topk_idx, topk_weights, handle)
        )

    def low_latency_combine_recv(self, combined_x, topk_idx, topk_weights):
        reference.low_latency_combine_recv(combined_x, topk_idx, topk_weights, self.buffer)
        return combined_x


# The ops a mode's cases call, where they differ from the normal-mode ones: a mode whose ops
# have no CUDA kernels yet (``_build.CUDA_REFERENCE_OPS``) is labelled with what runs.
_MODE_OPS = {INTERNODE: ("internode_dispatch", "internode_combine")}


def backend_label(on_gpu: bool, mode: Optional[str] = None) -> str:
    """What ``deep_ep_ops.ops`` runs on this device (for ``mode``'s ops, when given)."""
    if not on_gpu:
        return "reference/gloo"
    on_reference = any(op in _build.CUDA_REFERENCE_OPS for op in _MODE_OPS.get(mode, ()))
    return "cuda" if _build.HAS_CUDA_KERNELS and not on_reference else "reference/nccl"


# --- benchmark cases --------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """One rank's routed tokens for one tokens-per-rank value."""

    x: torch.Tensor  # [T, H] bfloat16
    x_fp8: torch.Tensor  # [T, H] float8_e4m3fn
    x_scales: torch.Tensor  # [T, H/128] float32
    topk_idx: torch.Tensor  # [T, K] int64
    topk_weights: torch.Tensor  # [T, K] float32

    @property
    def num_tokens(self) -> int:
        return self.x.size(0)


# A phase takes the previous phase's result (``None`` for the first); a split op has two.
Phase = tuple[str, Callable[[Any], Any]]


@dataclasses.dataclass
class Prepared:
    """A case ready to time on one backend: its phases and what this rank receives."""

    phases: list[Phase]
    num_rows: Optional[int]  # received rows on this rank (None: no payload, e.g. the layout)
    rdma_pairs: Optional[int] = None  # internode: its (token, node) pairs (rdma_token_pairs)


@dataclasses.dataclass(frozen=True)
class Case:
    """An op of the table: how to set it up, and the payload bytes of a received row."""

    mode: str
    op: str
    row_bytes: Optional[Callable[[int], int]]  # payload bytes per received row, given hidden
    prepare: Callable[[_Backend, Inputs], Prepared]
    sm_sweep: bool = False  # timed once per ``--num-sms`` value (dispatch and combine)


def _prepare_layout(backend, inputs):
    return Prepared([("layout", lambda _: backend.get_dispatch_layout(inputs.topk_idx))], None)


def _rdma_pairs(backend, layout) -> Optional[int]:
    """The RDMA count of an internode case (``rdma_token_pairs``; setup only, not timed)."""
    if backend.num_nodes == 1:
        return None
    return rdma_token_pairs(layout.is_token_in_rank, backend.num_nodes)


def _prepare_dispatch(use_fp8: bool):
    def prepare(backend, inputs):
        layout = backend.get_dispatch_layout(inputs.topk_idx)
        x, x_scales = (inputs.x_fp8, inputs.x_scales) if use_fp8 else (inputs.x, None)

        def run(_):
            return backend.dispatch(x, layout, inputs.topk_idx, inputs.topk_weights, x_scales)

        return Prepared([("dispatch", run)], run(None).recv_x.size(0),
                        _rdma_pairs(backend, layout))

    return prepare


def _prepare_combine(backend, inputs):
    layout = backend.get_dispatch_layout(inputs.topk_idx)
    dispatched = backend.dispatch(inputs.x, layout, inputs.topk_idx, inputs.topk_weights)
    recv_x, handle = dispatched.recv_x, dispatched.handle
    return Prepared([("combine", lambda _: backend.combine(recv_x, handle))], recv_x.size(0),
                    _rdma_pairs(backend, layout))


def _low_latency_rows(dispatched) -> int:
    return int(dispatched.recv_count.sum())  # setup only, not on the timed path


def _prepare_low_latency_dispatch(split: bool):
    def prepare(backend, inputs):
        x, topk_idx, num_max = inputs.x, inputs.topk_idx, inputs.num_tokens
        if split:
            phases = [
                ("send", lambda _: backend.low_latency_dispatch_send(x, topk_idx, num_max, True)),
                ("recv", backend.low_latency_dispatch_recv),
            ]
        else:
            phases = [
                ("dispatch", lambda _: backend.low_latency_dispatch(x, topk_idx, num_max, True))
            ]
        rows = _low_latency_rows(backend.low_latency_dispatch(x, topk_idx, num_max, True))
        return Prepared(phases, rows)

    return prepare


def _prepare_low_latency_combine(split: bool):
    def prepare(backend, inputs):
        topk_idx, topk_weights = inputs.topk_idx, inputs.topk_weights
        # The expert outputs: a BF16 dispatch of the same tokens gives valid rows and handle.
        dispatched = backend.low_latency_dispatch(inputs.x, topk_idx, inputs.num_tokens, False)
        x, handle = dispatched.recv_x, dispatched.handle
        if split:
            phases = [
                ("send", lambda _: backend.low_latency_combine_send(
                    x, topk_idx, topk_weights, handle)),
                ("recv", lambda combined: backend.low_latency_combine_recv(
                    combined, topk_idx, topk_weights)),
            ]
        else:
            phases = [("combine", lambda _: backend.low_latency_combine(
                x, topk_idx, topk_weights, handle))]
        return Prepared(phases, _low_latency_rows(dispatched))

    return prepare


CASES = (
    Case(NORMAL, "layout", None, _prepare_layout),
    Case(NORMAL, "dispatch bf16", bf16_row_bytes, _prepare_dispatch(use_fp8=False), True),
    Case(NORMAL, "dispatch fp8", fp8_row_bytes, _prepare_dispatch(use_fp8=True), True),
    Case(NORMAL, "combine bf16", bf16_row_bytes, _prepare_combine, True),
    Case(LOW_LATENCY, "dispatch fp8", fp8_row_bytes, _prepare_low_latency_dispatch(split=False)),
    Case(LOW_LATENCY, "combine bf16", bf16_row_bytes, _prepare_low_latency_combine(split=False)),
    Case(LOW_LATENCY, "dispatch fp8 send+recv", fp8_row_bytes,
         _prepare_low_latency_dispatch(split=True)),
    Case(LOW_LATENCY, "combine bf16 send+recv", bf16_row_bytes,
         _prepare_low_latency_combine(split=True)),
    # The same cases on a buffer of several nodes: the backends take the internode ops there.
    Case(INTERNODE, "dispatch bf16", bf16_row_bytes, _prepare_dispatch(use_fp8=False), True),
    Case(INTERNODE, "dispatch fp8", fp8_row_bytes, _prepare_dispatch(use_fp8=True), True),
    Case(INTERNODE, "combine bf16", bf16_row_bytes, _prepare_combine, True),
)


def make_inputs(num_tokens: int, s: Settings, rank: int, device: torch.device) -> Inputs:
    """Random tokens routed to the top-k of random scores; the same on CPU and GPU."""
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + rank * 7919 + num_tokens)
    x = torch.randn((num_tokens, s.hidden), generator=gen).to(device, torch.bfloat16)
    scores = torch.randn((num_tokens, s.num_experts), generator=gen)
    topk_idx = scores.topk(s.num_topk, dim=-1).indices.to(device)
    topk_weights = torch.rand((num_tokens, s.num_topk), generator=gen).to(device)
    x_fp8, x_scales = ops.per_token_cast_to_fp8(x)
    return Inputs(x, x_fp8, x_scales, topk_idx, topk_weights)


# --- timing -----------------------------------------------------------------------------------


def _run_phases(phases: list[Phase]) -> None:
    value = None
    for _, fn in phases:
        value = fn(value)


def time_phases(
    phases: list[Phase], num_warmup: int, num_iters: int, device: torch.device, group
) -> list[list[float]]:
    """Seconds each phase took on this rank, per timed iteration (``[iters][phases]``)."""
    for _ in range(num_warmup):
        _run_phases(phases)
    if device.type == "cuda":
        return _time_cuda(phases, num_iters, group)
    return _time_host(phases, num_iters, group)


def _time_host(phases, num_iters, group):
    # The ops finish before they return on CPU; a barrier before every iteration starts all
    # ranks together, so no rank's time includes a peer still busy with the last iteration.
    samples = []
    for _ in range(num_iters):
        dist.barrier(group=group)
        stamps = [time.perf_counter()]
        value = None
        for _, fn in phases:
            value = fn(value)
            stamps.append(time.perf_counter())
        samples.append([b - a for a, b in zip(stamps, stamps[1:])])
    return samples


def _time_cuda(phases, num_iters, group):
    # CUDA events around every iteration, back to back as DeepEP's bench does: after the first
    # collective the ranks run in lockstep, and a per-iteration host barrier would only time
    # launch latency. One barrier lines the ranks up before the loop.
    torch.cuda.synchronize()
    dist.barrier(group=group)
    torch.cuda.synchronize()
    events = [
        [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
        for _ in range(num_iters)
    ]
    for marks in events:
        marks[0].record()
        value = None
        for mark, (_, fn) in zip(marks[1:], phases):
            value = fn(value)
            mark.record()
    torch.cuda.synchronize()
    return [[a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])] for marks in events]


class NotCapturable(Exception):
    """A case's calls could not be captured in a CUDA graph on some rank (every rank raises)."""


def capture_phases(phases: list[Phase], stream) -> list[Phase]:
    """``phases`` captured on ``stream`` into one CUDA graph each, as phases replaying them.

    A graph per phase keeps eager mode's per-phase timing (the send and the receive half of a
    split op apart). Each graph is captured with the previous one's captured result as input and
    replays into the same memory, so replaying them in order repeats the captured sequence;
    the replay phases hold the graphs and their results alive. Capture runs the ops' host code
    but no kernel, so nothing is exchanged between ranks here.
    """
    replays: list[Phase] = []
    value = None
    with warnings.catch_warnings():
        # A receive half with nothing left to do on the device (the reference's) captures an
        # empty graph: torch warns, and replaying it is a valid no-op.
        warnings.filterwarnings("ignore", message=".*CUDA Graph is empty.*")
        for name, fn in phases:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the NCCL watchdog thread keeps querying events during our capture.
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                value = fn(value)
            replays.append((name, _replayer(graph, value)))
    return replays


def _replayer(graph, output) -> Callable[[Any], Any]:
    def replay(_):
        graph.replay()
        return output

    return replay


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters, for a table note."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _capture_cause(error: BaseException) -> BaseException:
    """The call's own error where ending the capture raised again on top of it."""
    # Leaving ``torch.cuda.graph`` ends the capture; after a call broke it, that raises its own
    # "... during capture" error with the call's error as context, which says more.
    context = error.__context__
    if context is not None and "captur" in str(error).lower():
        return context
    return error


def first_capture_failure(errors: Sequence[Optional[str]]) -> Optional[str]:
    """What every rank reports given each rank's capture error (``None``: it captured).

    One failing rank fails the case everywhere: the others' graphs would wait for it forever.
    """
    failed = [rank for rank, error in enumerate(errors) if error is not None]
    if not failed:
        return None
    who = "every rank" if len(failed) == len(errors) else (
        f"rank{'s' * (len(failed) > 1)} {', '.join(map(str, failed))}"
    )
    return f"{errors[failed[0]]} ({who})"


def time_graph(
    phases: list[Phase], num_warmup: int, num_iters: int, device: torch.device, group
) -> list[list[float]]:
    """Seconds each phase's CUDA-graph replay took on this rank, per timed iteration.

    Captures ``phases`` (after warm-up calls on the capture stream, as torch recommends), then
    times replays exactly as ``time_phases`` times eager calls: ``num_warmup`` untimed replays,
    then CUDA events around every phase of ``num_iters`` back-to-back iterations. Raises
    ``NotCapturable`` on every rank when capturing failed on any.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # eager calls, with their collectives: on every rank
        for _ in range(GRAPH_SIDE_WARMUP):
            _run_phases(phases)
    torch.cuda.current_stream(device).wait_stream(stream)
    # Every rank captures the same calls at the same point: a capture that registers buffers
    # with its peers finds them capturing too.
    torch.cuda.synchronize(device)
    dist.barrier(group=group)
    torch.cuda.synchronize(device)
    replays, error = None, None
    try:
        replays = capture_phases(phases, stream)
    except Exception as caught:  # noqa: BLE001 (any failure becomes a table note)
        error = describe_error(_capture_cause(caught))
    errors: list[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    failure = first_capture_failure(errors)
    if failure is not None:
        raise NotCapturable(failure)
    return time_phases(replays, num_warmup, num_iters, device, group)


@dataclasses.dataclass
class RankSample:
    """What one rank measured for one case."""

    samples: list[list[float]]  # seconds, [iters][phases]
    num_rows: Optional[int]
    rdma_pairs: Optional[int] = None  # internode cases: ``Prepared.rdma_pairs``


def _row(
    case: Case, tokens: int, s: Settings, label: str, num_sms: Optional[int], timing: str
) -> dict:
    """A result row with its identity filled in and every measurement ``None``."""
    return {
        "op": case.op, "mode": case.mode, "timing": timing, "tokens_per_rank": tokens,
        "num_sms": num_sms, "hidden": s.hidden, "num_topk": s.num_topk,
        "num_experts": s.num_experts, "num_ranks": s.num_ranks, "backend": label,
        "median_us": None, "min_us": None, "max_us": None, "median_us_per_rank": None,
        "gbps": None, "bytes_per_rank": None, "rows_per_rank": None, "phases_median_us": None,
        "capture_error": None, **_internode_fields(case, s),
    }


def _internode_fields(case: Case, s: Settings) -> dict:
    """The extra fields of an internode row (none for the other modes, whose rows keep their
    shape): its emulated nodes and the RDMA convention's numbers, filled in by ``summarize``.
    The bench spawns every rank on one host, so an internode row is always ``emulated``."""
    if case.mode != INTERNODE:
        return {}
    return {
        "num_nodes": s.num_nodes, "ranks_per_node": s.ranks_per_node, "emulated": True,
        "rdma_gbps": None, "rdma_bytes_per_rank": None, "rdma_pairs_per_rank": None,
    }


def not_capturable_row(
    case: Case, tokens: int, s: Settings, label: str, reason: str,
    num_sms: Optional[int] = None,
) -> dict:
    """The graph row of a case whose calls did not capture: no times, and why."""
    return dict(_row(case, tokens, s, label, num_sms, GRAPH), capture_error=reason)


def summarize(
    case: Case, phase_names: list[str], per_rank: list[RankSample], tokens: int, s: Settings,
    label: str, num_sms: Optional[int] = None, timing: str = EAGER,
) -> dict:
    """One result row from every rank's samples.

    The reported time is the max over ranks of each rank's median (a collective is as slow as
    its slowest rank); min is the min over ranks of their min, max the max of their max.
    Bandwidth is the mean over ranks of the received payload bytes divided by that time;
    internode rows also get DeepEP's RDMA bandwidth, the mean over ranks of their
    ``(token, node)`` pairs times the row bytes, divided by the same time.
    """
    totals = [[sum(it) for it in r.samples] for r in per_rank]
    medians = [statistics.median(t) for t in totals]
    median = max(medians)
    row = _row(case, tokens, s, label, num_sms, timing)
    row.update(
        median_us=median * 1e6,
        min_us=min(min(t) for t in totals) * 1e6, max_us=max(max(t) for t in totals) * 1e6,
        median_us_per_rank=[m * 1e6 for m in medians],
    )
    if case.row_bytes is not None:
        rows = [r.num_rows for r in per_rank]
        num_bytes = [n * case.row_bytes(s.hidden) for n in rows]
        row.update(
            rows_per_rank=rows, bytes_per_rank=num_bytes,
            gbps=statistics.fmean(num_bytes) / median / 1e9,
        )
        pairs = [r.rdma_pairs for r in per_rank]
        if pairs[0] is not None:
            rdma_bytes = [n * case.row_bytes(s.hidden) for n in pairs]
            row.update(
                rdma_pairs_per_rank=pairs, rdma_bytes_per_rank=rdma_bytes,
                rdma_gbps=statistics.fmean(rdma_bytes) / median / 1e9,
            )
    if len(phase_names) > 1:
        row["phases_median_us"] = {
            name: max(statistics.median(it[p] for it in r.samples) for r in per_rank) * 1e6
            for p, name in enumerate(phase_names)
        }
    return row


# --- one rank ---------------------------------------------------------------------------------


def _progress(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def buffer_sizes(s: Settings) -> tuple[int, int]:
    """``(num_nvl_bytes, num_rdma_bytes)`` for the largest call of this run: the max of the
    size hints over every config swept (and the reference's default config)."""
    num_ranks = s.num_ranks
    hidden_bytes = bf16_row_bytes(s.hidden)  # BF16 is the widest payload
    configs = [get_dispatch_config(num_ranks), get_combine_config(num_ranks)]  # the reference's
    for n in s.num_sms if any(mode in SM_SWEPT_MODES for mode in s.modes) else ():
        configs += [get_dispatch_config(num_ranks, n), get_combine_config(num_ranks, n)]
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    num_rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    if INTERNODE in s.modes:  # the staged kernels hold a call's tokens per node
        num_rdma_bytes = max(num_rdma_bytes, internode_staged.rdma_size_hint(
            max(s.tokens[INTERNODE]), hidden_bytes, s.num_nodes, s.num_topk, s.num_experts))
    if LOW_LATENCY in s.modes:
        num_rdma_bytes = max(num_rdma_bytes, Buffer.get_low_latency_rdma_size_hint(
            max(s.tokens[LOW_LATENCY]), s.hidden, num_ranks, s.num_experts
        ))
    return num_nvl_bytes, num_rdma_bytes


def _create_buffer(group, s: Settings):
    """A ``deep_ep_ops.Buffer`` sized for the largest call of this run (every SM count).

    An internode run (the command line runs that mode alone) gets a buffer of ``s.num_nodes``
    nodes of ``s.ranks_per_node`` ranks, emulated on this host, and makes no low-latency call.
    """
    num_nvl_bytes, num_rdma_bytes = buffer_sizes(s)
    options = {"device": "cuda"} if s.shared_gpu else {}  # a gloo group driving the kernels
    internode = INTERNODE in s.modes
    if internode:
        options["num_ranks_per_node"] = s.ranks_per_node
    return Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                  low_latency_mode=not internode, **options)


def run_cases(rank: int, s: Settings, group, device: torch.device, buffer) -> list[dict]:
    """Time every selected case on this rank; every rank returns the same result rows."""
    reference_backend = None
    if s.on_gpu:
        # The side-by-side baseline (docs/DESIGN.md §11): the reference in this process.
        # It does not depend on the SM count: timed once per op, shown beside every SM row.
        reference_backend = ReferenceBackend(
            buffer.name, s.num_ranks, s.num_experts,
            reference_label(s.shared_gpu), s.num_nodes,
        )

    def sm_counts(case: Case) -> tuple[Optional[int], ...]:
        return s.num_sms if case.sm_sweep else (None,)

    work = [(mode, t) for mode in s.modes for t in s.tokens[mode]]
    # Graph rows ride along with the eager timing of the same case: no extra steps.
    total = sum(
        len(sm_counts(c)) + (reference_backend is not None)
        for mode, _ in work for c in CASES if c.mode == mode
    )
    step, results = 0, []
    for mode, tokens in work:
        inputs = make_inputs(tokens, s, rank, device)
        if mode == LOW_LATENCY:
            # DeepEP needs this when one buffer serves normal and low-latency calls.
            ops.clean_low_latency_buffer(buffer.name, tokens, s.hidden, s.num_experts)
        graph = s.graphed(mode)
        also = ", eager + CUDA graph" if graph else ""
        label = backend_label(s.on_gpu, mode)
        for case in (c for c in CASES if c.mode == mode):
            ref = ref_graph = None
            if reference_backend is not None:
                step += 1
                _progress(rank, f"[{step}/{total}] {mode} {case.op} tokens={tokens} "
                                f"({reference_backend.label}{also}) ...")
                ref, ref_graph = time_case(
                    case, reference_backend, inputs, s, device, group, graph=graph
                )
            for n in sm_counts(case):
                step += 1
                sms = "" if n is None else f" sms={n}"
                _progress(rank, f"[{step}/{total}] {mode} {case.op} tokens={tokens}{sms} "
                                f"({label}{also}) ...")
                backend = OpsBackend(buffer.name, s.num_ranks, s.num_experts, label, n,
                                     s.num_nodes)
                eager, graphed = time_case(case, backend, inputs, s, device, group, n, graph)
                results.append(_with_reference(eager, ref))
                if graphed is not None:  # beside its eager row
                    results.append(_with_reference(graphed, ref_graph))
    return results


def time_case(
    case: Case, backend: _Backend, inputs: Inputs, s: Settings, device, group,
    num_sms: Optional[int] = None, graph: bool = False,
) -> tuple[dict, Optional[dict]]:
    """Set up and time ``case`` on every rank: ``(eager row, graph row or None)``, the same
    rows on every rank. With ``graph`` (CUDA only) the same calls are then captured and their
    replays timed; a capture failure gives a ``not_capturable_row`` instead of raising."""
    prepared = case.prepare(backend, inputs)
    names = [name for name, _ in prepared.phases]

    def row(samples, timing):
        gathered = [None] * s.num_ranks
        sample = RankSample(samples, prepared.num_rows, prepared.rdma_pairs)
        dist.all_gather_object(gathered, sample, group=group)
        return summarize(case, names, gathered, inputs.num_tokens, s, backend.label, num_sms,
                         timing)

    eager = row(time_phases(prepared.phases, s.num_warmup, s.num_iters, device, group), EAGER)
    if not graph:
        return eager, None
    try:
        samples = time_graph(prepared.phases, s.num_warmup, s.num_iters, device, group)
    except NotCapturable as failure:
        return eager, not_capturable_row(
            case, inputs.num_tokens, s, backend.label, str(failure), num_sms
        )
    return eager, row(samples, GRAPH)


def _with_reference(ours: dict, ref: Optional[dict] = None) -> dict:
    """Attach the reference timing, ``ratio_vs_reference`` and ``gbps_ratio_vs_reference``.

    ``ratio_vs_reference`` is the speedup, reference time / our time; it also covers ops without
    a bandwidth, like the layout. ``gbps_ratio_vs_reference`` is our GB/s / reference GB/s (the
    same number where both received the same rows, as they do here). ``ref`` is the row timed
    the same way (eager or graph); ``reference_capture_error`` says why it has no time. Ratios
    stay ``None`` when either side has no time. Internode rows also get
    ``reference_rdma_gbps``.
    """
    internode = "rdma_gbps" in ours
    ours = dict(ours, reference_median_us=None, reference_gbps=None, ratio_vs_reference=None,
                gbps_ratio_vs_reference=None, reference_capture_error=None)
    if internode:
        ours["reference_rdma_gbps"] = None
    if ref is not None:
        ours.update(
            reference_median_us=ref["median_us"], reference_gbps=ref["gbps"],
            reference_capture_error=ref.get("capture_error"),
        )
        if internode:
            ours["reference_rdma_gbps"] = ref.get("rdma_gbps")
        if ours["median_us"] and ref["median_us"]:
            ours["ratio_vs_reference"] = ref["median_us"] / ours["median_us"]
        if ours["gbps"] is not None and ref["gbps"]:
            ours["gbps_ratio_vs_reference"] = ours["gbps"] / ref["gbps"]
    return ours
