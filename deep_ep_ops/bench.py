"""Benchmark of the ``deep_ep`` ops: ``python -m deep_ep_ops.bench``.

Follows DESIGN.md §11 (DeepEP's methodology). The command spawns one process per rank (gloo on
CPU, NCCL with one GPU per rank on CUDA), builds a ``deep_ep_ops.Buffer``, routes random tokens
(top-k of random scores) and times, per tokens-per-rank value:

- normal mode: ``get_dispatch_layout``, dispatch BF16, dispatch FP8 (``x`` and scales from
  ``per_token_cast_to_fp8``), combine BF16; dispatch and combine once per SM count of
  ``--num-sms`` (``Config(num_sms=n)`` from ``get_dispatch_config`` / ``get_combine_config``;
  default 8 16 20 24 32 on GPUs, the default config on CPU);
- low-latency mode: dispatch FP8, combine BF16, and the send/recv split (send, then receive)
  of both; each as eager calls and, on CUDA (unless ``--no-graph``), as replays of CUDA graphs
  (rows ``<op> [graph]``): every phase (the op, or the send and the receive half) is captured
  into a graph of its own after warm-up, and the replays are timed like the eager calls.

Rank 0 also times the op layer's host cost: eager ``get_dispatch_layout`` calls on 128 tokens
(through the wrapper and through ``torch.ops`` directly) against ``torch.add`` on the same
tensor, CPU timers over back-to-back calls.

Times are medians over ``--num-iters`` iterations after ``--num-warmup`` warm-up calls.
Bandwidth counts the payload a rank receives, its own share included: ``2·hidden`` bytes per
BF16 row and ``hidden + 4·hidden/128`` per FP8 row; normal dispatch and combine count the rank's
received rows, low-latency ops the received ``(token, expert)`` rows (``sum(recv_count)``).

On CUDA every op is also timed on the reference backend (``deep_ep_ops.reference`` called
directly on the same CUDA tensors over NCCL) for a side-by-side ratio; the reference does not
depend on the SM count, so it is timed once per op and shown beside every SM row. A graph row
sits beside the reference's graph replays; a backend whose calls do not capture (on any rank)
gets ``n/a (not capturable)`` and the reason under the table, and the run goes on. On CPU both
are the same code, the ratio columns show ``-`` and there are no graph rows.

The last thing written to stdout is the report: the full table (one row per op, tokens, SM
count and eager/graph), then a summary with one line per op with a target, eager and graph
apart (the best SM count within DESIGN.md §11's 24-SM budget, its time and GB/s against the
target, and the speedup over the reference) and the host line. ``--out DIR`` also writes it as
``DIR/table.txt`` with ``DIR/results.json``, and ``--plot FILE.png`` draws bandwidth against
tokens per rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import _build, ops, reference
from .buffer import Buffer
from .config import Config, get_combine_config, get_dispatch_config

NORMAL, LOW_LATENCY = "normal", "low-latency"
MODES = (NORMAL, LOW_LATENCY)
EAGER, GRAPH = "eager", "graph"  # how a row's calls were issued: one by one, or graph replays
GRAPH_MODES = (LOW_LATENCY,)  # static shapes, no host sync: the modes timed as graphs on CUDA
GRAPH_SIDE_WARMUP = 2  # calls on the capture stream before capturing (per-stream lazy state)
NOT_CAPTURABLE = "n/a (not capturable)"
FP8_GROUP = 128  # channels per FP8 scale
DEFAULT_NUM_SMS = get_dispatch_config(1).num_sms  # what a call without a config uses
SM_BUDGET = 24  # DESIGN.md §11: the normal-mode targets hold with at most this many SMs

# DESIGN.md §11 targets (4xH200, DeepSeek-V3 shapes): (unit, bound). "GB/s" is a lower bound on
# bandwidth, "us" an upper bound on the median time.
TARGETS = {
    (NORMAL, "layout"): ("us", 20.0),
    (NORMAL, "dispatch bf16"): ("GB/s", 365.0),
    (NORMAL, "dispatch fp8"): ("GB/s", 360.0),
    (NORMAL, "combine bf16"): ("GB/s", 445.0),
    (LOW_LATENCY, "dispatch fp8"): ("us", 18.0),
    (LOW_LATENCY, "combine bf16"): ("us", 30.0),
}
HOST_TARGET_US = 5.0  # op-layer host time per eager call, on top of a plain torch op
HOST_TOKENS, HOST_REPEATS = 128, 5
HOST_CALLS = {"cuda": 200, "cpu": 50}  # per timed block; on CPU the op computes as it goes

# Transport settings for the GPU machines: NVLink multicast (NVLS) stays off. Set with
# ``setdefault`` before the ranks spawn, so a value the user exported wins.
GPU_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


# --- settings -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs, resolved and validated (no ``None`` left)."""

    num_ranks: int
    modes: tuple[str, ...]
    tokens: dict[str, tuple[int, ...]]  # tokens per rank to sweep, by mode
    num_sms: tuple[int, ...]  # SM counts to sweep for normal-mode dispatch/combine, ascending
    hidden: int
    num_topk: int
    num_experts: int
    num_iters: int
    num_warmup: int
    backend: str  # "gloo" (CPU tensors) or "nccl" (one GPU per rank)
    seed: int
    plot: Optional[str]
    out: Optional[str]
    graph: bool = True  # also time CUDA-graph replays (low-latency mode, CUDA only)

    @property
    def on_gpu(self) -> bool:
        return self.backend == "nccl"

    def graphed(self, mode: str) -> bool:
        """Whether ``mode``'s ops are timed as CUDA-graph replays too."""
        return self.graph and self.on_gpu and mode in GRAPH_MODES


# DESIGN.md §11 shapes on GPUs; on CPU, small enough for a laptop (well under a minute).
GPU_DEFAULTS = dict(
    hidden=7168, num_topk=8, num_experts=256, num_iters=100, num_warmup=20,
    tokens={NORMAL: (4096,), LOW_LATENCY: (128,)}, num_sms=(8, 16, 20, 24, 32),
)
CPU_DEFAULTS = dict(
    num_ranks=2, hidden=1024, num_topk=4, num_experts=32, num_iters=20, num_warmup=2,
    tokens={NORMAL: (64, 128, 256), LOW_LATENCY: (32,)}, num_sms=(DEFAULT_NUM_SMS,),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deep_ep_ops.bench",
        description=(
            "Time deep_ep dispatch/combine (normal and low-latency modes) on N spawned ranks. "
            "Defaults: DeepSeek-V3 shapes on GPUs (hidden 7168, top-8 of 256 experts, 4096 "
            "tokens/rank normal, 128 low-latency, one rank per GPU, SM sweep 8 16 20 24 32); "
            "small shapes on CPU (2 ranks, hidden 1024, top-4 of 32 experts, 64/128/256 "
            f"tokens/rank normal, 32 low-latency, {DEFAULT_NUM_SMS} SMs)."
        ),
    )
    parser.add_argument("--num-ranks", type=int, help="ranks to spawn (GPU: one per GPU; "
                        "default: all GPUs, or 2 on CPU)")
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all",
                        help="which ops to time (default: all)")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="T",
                        help="tokens per rank to sweep, for every selected mode "
                             "(low-latency uses num_max_dispatch_tokens_per_rank = T)")
    parser.add_argument("--num-sms", type=int, nargs="+", metavar="N",
                        help="SM counts to sweep for normal-mode dispatch and combine (even, "
                             ">= 2; Config(num_sms=N)); default: 8 16 20 24 32 on GPUs, "
                             f"{DEFAULT_NUM_SMS} on CPU")
    parser.add_argument("--hidden", type=int, help="hidden size (a multiple of 128: FP8 ops)")
    parser.add_argument("--num-topk", type=int, help="experts per token")
    parser.add_argument("--num-experts", type=int, help="experts in all (divisible by ranks)")
    parser.add_argument("--num-iters", type=int, help="timed iterations per op")
    parser.add_argument("--num-warmup", type=int, help="untimed warm-up calls per op")
    parser.add_argument("--seed", type=int, default=0, help="routing/data seed (plus the rank)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="gloo: CPU tensors; nccl: CUDA tensors, one GPU per rank; "
                             "auto: nccl when CUDA is available")
    parser.add_argument("--plot", metavar="FILE.png", help="plot GB/s against tokens per rank")
    parser.add_argument("--out", metavar="DIR", help="write results.json and table.txt here")
    parser.add_argument("--no-graph", dest="graph", action="store_false",
                        help="skip the CUDA-graph replays (rows '<op> [graph]') of the "
                             "low-latency ops; CPU runs have none anyway")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    """Parse the command line, fill in device-dependent defaults and validate (argparse errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs CUDA GPUs, but torch.cuda.is_available() is False")
    defaults = GPU_DEFAULTS if backend == "nccl" else CPU_DEFAULTS

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    num_ranks = args.num_ranks
    if num_ranks is None:
        num_ranks = torch.cuda.device_count() if backend == "nccl" else defaults["num_ranks"]
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.tokens is None:
        tokens = {mode: defaults["tokens"][mode] for mode in modes}
    else:
        tokens = {mode: tuple(args.tokens) for mode in modes}
    settings = Settings(
        num_ranks=num_ranks, modes=modes, tokens=tokens,
        num_sms=tuple(sorted(set(pick("num_sms")))), hidden=pick("hidden"),
        num_topk=pick("num_topk"), num_experts=pick("num_experts"), num_iters=pick("num_iters"),
        num_warmup=pick("num_warmup"), backend=backend, seed=args.seed, plot=args.plot,
        out=args.out, graph=args.graph,
    )
    problem = _check_settings(settings)
    if problem:
        parser.error(problem)
    return settings


def _check_settings(s: Settings) -> Optional[str]:
    """The first problem with ``s`` as an argparse-style message, or ``None``."""
    if s.num_ranks < 1:
        return f"--num-ranks must be >= 1, got {s.num_ranks}"
    if s.on_gpu and s.num_ranks > torch.cuda.device_count():
        return (f"--num-ranks {s.num_ranks} needs one GPU per rank, but only "
                f"{torch.cuda.device_count()} are visible")
    if s.hidden < 1 or s.hidden % FP8_GROUP:
        return (f"--hidden must be a positive multiple of {FP8_GROUP} (the FP8 ops scale every "
                f"{FP8_GROUP} channels), got {s.hidden}")
    if s.num_experts < 1 or s.num_experts % s.num_ranks:
        return (f"--num-experts ({s.num_experts}) must be a positive multiple of --num-ranks "
                f"({s.num_ranks}): every rank holds num_experts / num_ranks experts")
    if not 1 <= s.num_topk <= s.num_experts:
        return f"--num-topk must be in [1, num_experts={s.num_experts}], got {s.num_topk}"
    bad_sms = [n for n in s.num_sms if n < 2 or n % 2]
    if bad_sms:
        return (f"--num-sms values must be even ints >= 2 (two SMs per channel), "
                f"got {bad_sms[0]}")
    if s.on_gpu:
        available = torch.cuda.get_device_properties(0).multi_processor_count
        if max(s.num_sms) > available:
            return f"--num-sms {max(s.num_sms)} exceeds the GPU's {available} SMs"
    bad_tokens = [t for ts in s.tokens.values() for t in ts if t < 1]
    if bad_tokens:
        return f"--tokens must be positive, got {bad_tokens[0]}"
    if s.num_iters < 1:
        return f"--num-iters must be >= 1, got {s.num_iters}"
    if s.num_warmup < 0:
        return f"--num-warmup must be >= 0, got {s.num_warmup}"
    if s.out is not None and os.path.exists(s.out) and not os.path.isdir(s.out):
        return f"--out {s.out!r} exists and is not a directory"
    if s.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib, which is not installed (pip install matplotlib)"
    return None


# --- byte conventions (DESIGN.md §11) ---------------------------------------------------------


def bf16_row_bytes(hidden: int) -> int:
    return 2 * hidden


def fp8_row_bytes(hidden: int) -> int:
    """FP8 payload plus one float32 scale per 128 channels."""
    return hidden + 4 * hidden // FP8_GROUP


# --- backends: the same calls through the op library or straight into the reference ---------


class _Backend:
    """The calls a benchmark case makes, bound to one communicator; ``label`` names it."""

    def __init__(self, buffer: str, num_ranks: int, num_experts: int, label: str):
        self.buffer, self.num_ranks, self.num_experts, self.label = (
            buffer, num_ranks, num_experts, label
        )


class OpsBackend(_Backend):
    """Calls the ``deep_ep_ops.ops`` wrappers, i.e. whatever kernel the dispatcher picks.

    With ``num_sms``, normal-mode dispatch and combine get ``Config(num_sms=num_sms, ...)`` from
    ``get_dispatch_config`` / ``get_combine_config``; without, the wrappers' default config.
    """

    def __init__(self, buffer: str, num_ranks: int, num_experts: int, label: str,
                 num_sms: Optional[int] = None):
        super().__init__(buffer, num_ranks, num_experts, label)
        self.num_sms = num_sms
        self.dispatch_config: Optional[Config] = None
        self.combine_config: Optional[Config] = None
        if num_sms is not None:
            self.dispatch_config = get_dispatch_config(num_ranks, num_sms)
            self.combine_config = get_combine_config(num_ranks, num_sms)

    def get_dispatch_layout(self, topk_idx):
        return ops.get_dispatch_layout(topk_idx, self.num_experts, self.num_ranks)

    def dispatch(self, x, layout, topk_idx, topk_weights, x_scales=None):
        return ops.dispatch(self.buffer, x, layout, topk_idx, topk_weights, x_scales=x_scales,
                            config=self.dispatch_config)

    def combine(self, x, handle):
        # ``handle`` comes from ``dispatch`` of this backend: the same channel count.
        return ops.combine(self.buffer, x, handle, config=self.combine_config)

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
        return ops.DispatchLayout(
            *reference.get_dispatch_layout(topk_idx, self.num_experts, self.num_ranks, 1)
        )

    def dispatch(self, x, layout, topk_idx, topk_weights, x_scales=None):
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
        return ops.CombineOutput(*reference.combine(
            x, None, None, None, *handle[:6], self.buffer, handle.num_worst_tokens,
            get_combine_config(self.num_ranks).to_list(),
        ))

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


def backend_label(on_gpu: bool) -> str:
    """What ``deep_ep_ops.ops`` runs on this device."""
    if not on_gpu:
        return "reference/gloo"
    return "cuda" if _build.HAS_CUDA_KERNELS else "reference/nccl"


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


@dataclasses.dataclass(frozen=True)
class Case:
    """An op of the table: how to set it up, and the payload bytes of a received row."""

    mode: str
    op: str
    row_bytes: Optional[Callable[[int], int]]  # payload bytes per received row, given hidden
    prepare: Callable[[_Backend, Inputs], Prepared]
    sm_sweep: bool = False  # timed once per ``--num-sms`` value (normal dispatch and combine)


def _prepare_layout(backend, inputs):
    return Prepared([("layout", lambda _: backend.get_dispatch_layout(inputs.topk_idx))], None)


def _prepare_dispatch(use_fp8: bool):
    def prepare(backend, inputs):
        layout = backend.get_dispatch_layout(inputs.topk_idx)
        x, x_scales = (inputs.x_fp8, inputs.x_scales) if use_fp8 else (inputs.x, None)

        def run(_):
            return backend.dispatch(x, layout, inputs.topk_idx, inputs.topk_weights, x_scales)

        return Prepared([("dispatch", run)], run(None).recv_x.size(0))

    return prepare


def _prepare_combine(backend, inputs):
    layout = backend.get_dispatch_layout(inputs.topk_idx)
    dispatched = backend.dispatch(inputs.x, layout, inputs.topk_idx, inputs.topk_weights)
    recv_x, handle = dispatched.recv_x, dispatched.handle
    return Prepared([("combine", lambda _: backend.combine(recv_x, handle))], recv_x.size(0))


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
        "capture_error": None,
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
    Bandwidth is the mean over ranks of the received payload bytes divided by that time.
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
    for n in s.num_sms if NORMAL in s.modes else ():
        configs += [get_dispatch_config(num_ranks, n), get_combine_config(num_ranks, n)]
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    num_rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    if LOW_LATENCY in s.modes:
        num_rdma_bytes = max(num_rdma_bytes, Buffer.get_low_latency_rdma_size_hint(
            max(s.tokens[LOW_LATENCY]), s.hidden, num_ranks, s.num_experts
        ))
    return num_nvl_bytes, num_rdma_bytes


def _create_buffer(group, s: Settings):
    """A ``deep_ep_ops.Buffer`` sized for the largest call of this run (every SM count)."""
    num_nvl_bytes, num_rdma_bytes = buffer_sizes(s)
    return Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                  low_latency_mode=True)


def run_cases(rank: int, s: Settings, group, device: torch.device, buffer) -> list[dict]:
    """Time every selected case on this rank; every rank returns the same result rows."""
    label = backend_label(s.on_gpu)
    reference_backend = None
    if s.on_gpu:
        # The side-by-side baseline (DESIGN.md §11): the reference over NCCL in this process.
        # It does not depend on the SM count: timed once per op, shown beside every SM row.
        reference_backend = ReferenceBackend(
            buffer.name, s.num_ranks, s.num_experts, "reference/nccl"
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
                backend = OpsBackend(buffer.name, s.num_ranks, s.num_experts, label, n)
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
        dist.all_gather_object(gathered, RankSample(samples, prepared.num_rows), group=group)
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
    stay ``None`` when either side has no time.
    """
    ours = dict(ours, reference_median_us=None, reference_gbps=None, ratio_vs_reference=None,
                gbps_ratio_vs_reference=None, reference_capture_error=None)
    if ref is not None:
        ours.update(
            reference_median_us=ref["median_us"], reference_gbps=ref["gbps"],
            reference_capture_error=ref.get("capture_error"),
        )
        if ours["median_us"] and ref["median_us"]:
            ours["ratio_vs_reference"] = ref["median_us"] / ours["median_us"]
        if ours["gbps"] is not None and ref["gbps"]:
            ours["gbps_ratio_vs_reference"] = ours["gbps"] / ref["gbps"]
    return ours


def measure_host_overhead(s: Settings, device: torch.device) -> dict:
    """Host time per eager call of a small op: the op layer against a plain ``torch.add``.

    ``get_dispatch_layout`` on ``HOST_TOKENS`` tokens through the typed wrapper and through
    ``torch.ops.deep_ep`` directly, and ``torch.add`` on the same ``topk_idx`` as the baseline
    of a plain torch op. Each is called ``HOST_CALLS`` times back to back between CPU timer
    reads, starting from an idle GPU (a synchronize before each block): the small kernels
    finish faster than the host launches them, so the time is host time. The minimum over
    ``HOST_REPEATS`` interleaved blocks is reported (least disturbed by other processes);
    ``wall_us`` adds the final synchronize and shows whether the GPU kept up.
    """
    gen = torch.Generator().manual_seed(s.seed + 17)
    scores = torch.randn((HOST_TOKENS, s.num_experts), generator=gen)
    topk_idx = scores.topk(min(s.num_topk, s.num_experts), dim=-1).indices.to(device)
    num_experts, num_ranks = s.num_experts, s.num_ranks
    calls = {
        "wrapper": lambda: ops.get_dispatch_layout(topk_idx, num_experts, num_ranks),
        "torch.ops": lambda: torch.ops.deep_ep.get_dispatch_layout(
            topk_idx, num_experts, num_ranks, 1),
        "torch.add": lambda: torch.add(topk_idx, 1),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    num_calls = HOST_CALLS.get(device.type, HOST_CALLS["cpu"])
    host = {name: [] for name in calls}
    wall = {name: [] for name in calls}
    for fn in calls.values():  # warm-up: first-call dispatch caches, allocator
        for _ in range(10):
            fn()
    for _ in range(HOST_REPEATS):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            for _ in range(num_calls):
                fn()
            launched = time.perf_counter()
            sync()
            done = time.perf_counter()
            host[name].append((launched - start) / num_calls * 1e6)
            wall[name].append((done - start) / num_calls * 1e6)
    result = {
        "device": device.type, "tokens": HOST_TOKENS, "calls": num_calls,
        "repeats": HOST_REPEATS,
        "host_us": {name: min(v) for name, v in host.items()},
        "wall_us": {name: min(v) for name, v in wall.items()},
        "target_us": HOST_TARGET_US,
    }
    baseline = result["host_us"]["torch.add"]
    result["overhead_us"] = {
        name: result["host_us"][name] - baseline for name in ("wrapper", "torch.ops")
    }
    return result


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rank_main(rank: int, s: Settings, port: int, result_path: str) -> None:
    """Entry point of a spawned rank: set up, time, and (rank 0) write the results."""
    if s.on_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=s.num_ranks, device_id=device)
    else:
        device = torch.device("cpu")
        # The ranks share the host's cores: intra-op threads beyond a fair share only contend.
        torch.set_num_threads(max(1, _available_cpus() // s.num_ranks))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=s.num_ranks)
    group = dist.group.WORLD
    buffer = _create_buffer(group, s)
    try:
        results = run_cases(rank, s, group, device, buffer)
        host = None
        if rank == 0:  # the others wait in the next collective
            _progress(rank, "host time per eager call ...")
            host = measure_host_overhead(s, device)
    finally:
        buffer.destroy()
    if rank == 0:
        report = {
            "settings": dataclasses.asdict(s),
            "device": torch.cuda.get_device_name(device) if s.on_gpu else "cpu",
            "torch": torch.__version__,
            "build_info": _build.build_info(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "results": results,
            "host": host,
        }
        with open(result_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(s: Settings) -> dict:
    """Spawn ``s.num_ranks`` rank processes, wait for them, and return rank 0's report."""
    if s.on_gpu:
        for key, value in GPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="deep_ep_ops_bench_") as tmp:
        result_path = os.path.join(tmp, "results.json")
        mp.spawn(_rank_main, args=(s, _free_port(), result_path), nprocs=s.num_ranks, join=True)
        with open(result_path) as f:
            return json.load(f)


# --- output -----------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "op", "mode", "tokens/rank", "SMs", "median us", "send/recv us", "GB/s", "backend",
    "ref us", "ref GB/s", "vs ref",
)
SUMMARY_COLUMNS = (
    "op", "mode", "tokens/rank", "best SMs", "median us", "GB/s", "target", "vs target",
    "ref us", "speedup",
)


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}x"


def op_label(row: dict) -> str:
    """The op as the tables name it: ``dispatch fp8``, or ``dispatch fp8 [graph]`` for replays."""
    return row["op"] + (" [graph]" if row.get("timing", EAGER) == GRAPH else "")


def _median(row: dict) -> str:
    return NOT_CAPTURABLE if row.get("capture_error") else _number(row["median_us"], ".1f")


def _reference_median(row: dict) -> str:
    if row.get("reference_capture_error"):
        return NOT_CAPTURABLE
    return _number(row["reference_median_us"], ".1f")


def _speedup(row: dict, key: str) -> str:
    if row[key] is None and (row.get("capture_error") or row.get("reference_capture_error")):
        return "n/a"
    return _ratio(row[key])


def _phases(row: dict) -> str:
    """``send/recv`` medians of a split op, in phase order (``-`` for single-phase ops)."""
    phases = row.get("phases_median_us")
    return "-" if not phases else "/".join(f"{us:.1f}" for us in phases.values())


def _align_rows(columns: Sequence[str], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Header, rule and rows: columns separated by at least two spaces, numbers right-aligned."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    header = line(columns)
    return [header, "-" * len(header), *(line(r) for r in rows)]


def capture_notes(rows: list[dict]) -> list[str]:
    """One line per backend and op that did not capture in a CUDA graph, with the reason."""
    notes = []
    for r in rows:
        failures = [(r["backend"], r.get("capture_error"))]
        if r.get("reference_capture_error"):
            failures.append(("reference/nccl", r["reference_capture_error"]))
        for backend, error in failures:
            note = (f"  {op_label(r)} ({r['mode']}, {r['tokens_per_rank']} tokens/rank) on "
                    f"{backend}: {error}")
            if error and note not in notes:  # the reference repeats beside every SM count
                notes.append(note)
    return ["not capturable in a CUDA graph (the rows show n/a):", *notes] if notes else []


def format_table(report: dict) -> str:
    """The full result table: one row per op, tokens per rank, SM count and eager/graph;
    ``-`` when n/a; capture failures listed under it."""
    s = report["settings"]
    rows = [
        (
            op_label(r), r["mode"], str(r["tokens_per_rank"]), _number(r.get("num_sms"), "d"),
            _median(r), _phases(r), _number(r["gbps"], ".4g"), r["backend"],
            _reference_median(r), _number(r["reference_gbps"], ".4g"),
            _speedup(r, "ratio_vs_reference"),
        )
        for r in report["results"]
    ]
    title = (
        f"deep_ep_ops bench: {s['num_ranks']} rank{'s' * (s['num_ranks'] != 1)} "
        f"({report['device']}), hidden {s['hidden']}, top-{s['num_topk']} "
        f"of {s['num_experts']} experts, {s['num_iters']} iterations after {s['num_warmup']} "
        "warm-up"
    )
    legend = (
        "median us: max over ranks of each rank's median; GB/s: received payload per rank, own "
        "share included\nSMs: Config.num_sms; ref: the reference on NCCL (one run per op, shown "
        "beside every SM count); vs ref: ref us / ours (= our GB/s / ref GB/s)\n"
        "send/recv us: the two halves of a split op; [graph]: replays of the same calls "
        "captured in CUDA graphs (one per half), beside the reference's replays"
    )
    lines = [title, legend, *_align_rows(TABLE_COLUMNS, rows, {2, 3, 4, 5, 6, 8, 9, 10})]
    return "\n".join(lines + capture_notes(report["results"]))


def best_rows(report: dict, sm_budget: int = SM_BUDGET) -> list[dict]:
    """One row per op with a DESIGN.md §11 target and per timing (eager, graph), at its best
    SM count.

    Per mode, the tokens per rank of the targets (GPU defaults: 4096 normal, 128 low-latency)
    where swept, else the largest swept. The best SM count is the fastest within
    ``sm_budget`` (``over_budget`` is set when every swept count exceeds it: then the fastest
    of all). ``vs_target`` is >= 1 when the target is met: GB/s / target for bandwidth
    targets, target / median us for time targets; ``None`` for a graph that did not capture.
    """
    swept: dict[str, set[int]] = {}
    for r in report["results"]:
        swept.setdefault(r["mode"], set()).add(r["tokens_per_rank"])
    target_tokens = GPU_DEFAULTS["tokens"]
    chosen = {
        mode: target_tokens[mode][0] if target_tokens[mode][0] in ts else max(ts)
        for mode, ts in swept.items()
    }
    groups: dict[tuple[str, str, int, str], list[dict]] = {}
    for r in report["results"]:
        if (r["mode"], r["op"]) in TARGETS and r["tokens_per_rank"] == chosen[r["mode"]]:
            key = (r["mode"], r["op"], r["tokens_per_rank"], r.get("timing", EAGER))
            groups.setdefault(key, []).append(r)
    summary = []
    for (mode, op, tokens, timing), rows in groups.items():
        timed = [r for r in rows if r["median_us"] is not None] or rows
        within = [r for r in timed if r.get("num_sms") is None or r["num_sms"] <= sm_budget]
        best = min(within or timed, key=lambda r: r["median_us"] or 0.0)
        unit, bound = TARGETS[(mode, op)]
        if unit == "GB/s":
            vs_target = None if best["gbps"] is None else best["gbps"] / bound
        else:
            vs_target = None if best["median_us"] is None else bound / best["median_us"]
        summary.append({
            "op": op, "mode": mode, "timing": timing, "tokens_per_rank": tokens,
            "num_sms": best.get("num_sms"), "over_budget": not within, "sm_budget": sm_budget,
            "median_us": best["median_us"], "gbps": best["gbps"],
            "target": {"unit": unit, "bound": bound}, "vs_target": vs_target,
            "reference_median_us": best["reference_median_us"],
            "speedup_vs_reference": best["ratio_vs_reference"],
            "capture_error": best.get("capture_error"),
            "reference_capture_error": best.get("reference_capture_error"),
        })
    return summary


def _format_host(host: dict) -> str:
    us, over = host["host_us"], host["overhead_us"]
    return (
        f"host: op-layer host us/call (eager get_dispatch_layout, {host['tokens']} tokens): "
        f"wrapper {us['wrapper']:.1f}, torch.ops {us['torch.ops']:.1f}; torch.add "
        f"{us['torch.add']:.1f} -> op layer adds {over['wrapper']:.1f} (wrapper) / "
        f"{over['torch.ops']:.1f} (torch.ops), target <= {host['target_us']:g}"
        + (" (CPU: includes the reference's compute)" if host.get("device") == "cpu" else "")
    )


def format_summary(report: dict) -> str:
    """The short table: one line per op with a target (eager and graph apart), then the host
    line."""
    summary = report.get("summary")
    if summary is None:
        summary = best_rows(report)
    rows = []
    for r in summary:
        sms = "-" if r["num_sms"] is None else str(r["num_sms"])
        if r["over_budget"]:
            sms += f" (>{r['sm_budget']})"
        unit, bound = r["target"]["unit"], r["target"]["bound"]
        target = f">= {bound:g} GB/s" if unit == "GB/s" else f"<= {bound:g} us"
        vs_target = "n/a" if r.get("capture_error") else _ratio(r["vs_target"], ".3g")
        rows.append((
            op_label(r), r["mode"], str(r["tokens_per_rank"]), sms, _median(r),
            _number(r["gbps"], ".4g"), target, vs_target, _reference_median(r),
            _speedup(r, "speedup_vs_reference"),
        ))
    lines = [
        f"summary: fastest SM count within {SM_BUDGET} SMs; targets of DESIGN.md §11 (4xH200, "
        "4096 / 128 tokens per rank), vs target >= 1x meets it; speedup: ref us / ours "
        "(eager against eager, [graph] against the reference's graph replays)",
    ]
    if rows:
        lines += _align_rows(SUMMARY_COLUMNS, rows, {2, 4, 5, 7, 8, 9})
    if report.get("host"):
        lines.append(_format_host(report["host"]))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """What the command prints last and writes to ``table.txt``: full table, then summary."""
    return format_table(report) + "\n\n" + format_summary(report)


def write_outputs(report: dict, table: str, out_dir: str) -> list[str]:
    """``results.json`` and ``table.txt`` in ``out_dir`` (created if needed)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    table_path = os.path.join(out_dir, "table.txt")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(table_path, "w") as f:
        f.write(table + "\n")
    return [json_path, table_path]


def plot_bandwidth(report: dict, path: str) -> None:
    """GB/s against tokens per rank, one line per op, SM count and eager/graph (the reference
    dashed, once per op and timing, where timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, Optional[int]], list[dict]] = {}
    for row in report["results"]:
        if row["gbps"] is not None:
            key = (row["mode"], op_label(row), row.get("num_sms"))
            series.setdefault(key, []).append(row)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn_reference = set()
    for (mode, op, num_sms), rows in series.items():
        rows = sorted(rows, key=lambda r: r["tokens_per_rank"])
        tokens = [r["tokens_per_rank"] for r in rows]
        sms = "" if num_sms is None else f", {num_sms} SMs"
        (line,) = ax.plot(tokens, [r["gbps"] for r in rows], marker="o" if mode == NORMAL else "s",
                          label=f"{mode} {op} ({rows[0]['backend']}{sms})")
        with_reference = [r for r in rows if r["reference_gbps"] is not None]
        if with_reference and (mode, op) not in drawn_reference:
            drawn_reference.add((mode, op))
            ax.plot([r["tokens_per_rank"] for r in with_reference],
                    [r["reference_gbps"] for r in with_reference], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{mode} {op} (reference baseline)")
    s = report["settings"]
    ax.set_xscale("log", base=2)
    all_tokens = sorted({r["tokens_per_rank"] for rows in series.values() for r in rows})
    ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
    ax.minorticks_off()
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s (received payload per rank)")
    ax.set_title(
        f"deep_ep_ops: {s['num_ranks']} ranks, {report['device']}, hidden {s['hidden']}, "
        f"top-{s['num_topk']} of {s['num_experts']} experts", fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    try:
        report = launch(settings)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        print(f"deep_ep_ops.bench: a rank failed:\n{error}", file=sys.stderr)
        return 1
    report["summary"] = best_rows(report)
    table = format_report(report)
    if settings.out:
        for path in write_outputs(report, table, settings.out):
            print(f"wrote {path}", file=sys.stderr)
    if settings.plot:
        plot_bandwidth(report, settings.plot)
        print(f"wrote {settings.plot}", file=sys.stderr)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(table, flush=True)  # the tables are the last thing on stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
