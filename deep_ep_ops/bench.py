"""Benchmark of the ``deep_ep`` ops: ``python -m deep_ep_ops.bench``.

Follows docs/DESIGN.md §11 (DeepEP's methodology). The command spawns one process per rank (gloo on
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

Every rank also times the host time per eager call of every op (the ``host`` table, see
``HOST_HELP``): ``get_dispatch_layout``, dispatch, capacity dispatch, cached dispatch, combine,
``low_latency_dispatch`` (FP8 and BF16), ``low_latency_combine`` and the send/receive-hook halves
of both, through ``deep_ep_ops.Buffer``, each with inputs that do not and that do require grad.

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
apart (the best SM count within docs/DESIGN.md §11's 24-SM budget, its time and GB/s against the
target, and the speedup over the reference), then the host table. A CPU (gloo) run times the
reference backend only: its summary and host table show no GPU targets and no ratios to them.
``--out DIR`` also writes it as ``DIR/table.txt`` with ``DIR/results.json``, and
``--plot FILE.png`` draws bandwidth against tokens per rank.
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
SM_BUDGET = 24  # docs/DESIGN.md §11: the normal-mode targets hold with at most this many SMs

# docs/DESIGN.md §11 targets (4xH200, DeepSeek-V3 shapes): (unit, bound). "GB/s" is a lower bound on
# bandwidth, "us" an upper bound on the median time.
TARGETS = {
    (NORMAL, "layout"): ("us", 20.0),
    (NORMAL, "dispatch bf16"): ("GB/s", 365.0),
    (NORMAL, "dispatch fp8"): ("GB/s", 360.0),
    (NORMAL, "combine bf16"): ("GB/s", 445.0),
    (LOW_LATENCY, "dispatch fp8"): ("us", 18.0),
    (LOW_LATENCY, "combine bf16"): ("us", 30.0),
}
# The host table (``measure_host``): host µs per eager call through ``deep_ep_ops.Buffer``.
HOST_TARGET_US = 8.0  # per call, any op (GPU runs only)
HOST_TOKENS = 128  # tokens per rank (at most; no more than the smallest swept)
HOST_CALLS = {"cuda": 100, "cpu": 3}  # back-to-back calls per timed block
HOST_REPEATS = {"cuda": 7, "cpu": 3}  # timed blocks; the median is reported
HOST_WARMUP = {"cuda": 10, "cpu": 1}  # untimed calls per case first
HOST_MAX_SLEEP_US = 2_000_000  # the GPU sleeps at most this long per block
HOST_MIN_CYCLES_PER_US = 2000.0  # torch.cuda._sleep cycles per µs assumed at least (~2 GHz)

# Ranks sharing GPUs (README "Many ranks on one GPU"): timings are not performance figures.
SHARED_GPU_BACKEND = "gloo-cuda"
NOT_PERFORMANCE = "ranks share GPUs under CUDA MPS: correctness run, NOT performance figures"

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
    # "gloo" (CPU tensors), "nccl" (one GPU per rank) or "gloo-cuda" (ranks sharing GPUs under
    # CUDA MPS, a gloo group driving the kernels: correctness only, no performance figures)
    backend: str
    seed: int
    plot: Optional[str]
    out: Optional[str]
    graph: bool = True  # also time CUDA-graph replays (low-latency mode, CUDA only)

    @property
    def on_gpu(self) -> bool:
        return self.backend in ("nccl", SHARED_GPU_BACKEND)

    @property
    def shared_gpu(self) -> bool:
        return self.backend == SHARED_GPU_BACKEND

    def graphed(self, mode: str) -> bool:
        """Whether ``mode``'s ops are timed as CUDA-graph replays too."""
        return self.graph and self.on_gpu and mode in GRAPH_MODES


# docs/DESIGN.md §11 shapes on GPUs; on CPU, small enough for a laptop (well under a minute).
GPU_DEFAULTS = dict(
    hidden=7168, num_topk=8, num_experts=256, num_iters=100, num_warmup=20,
    tokens={NORMAL: (4096,), LOW_LATENCY: (128,)}, num_sms=(8, 16, 20, 24, 32),
)
CPU_DEFAULTS = dict(
    num_ranks=2, hidden=1024, num_topk=4, num_experts=32, num_iters=20, num_warmup=2,
    tokens={NORMAL: (64, 128, 256), LOW_LATENCY: (32,)}, num_sms=(DEFAULT_NUM_SMS,),
)


HOST_HELP = (
    "host table: host us per eager call of every op (get_dispatch_layout, dispatch, capacity "
    "dispatch, cached dispatch, combine, low_latency_dispatch and low_latency_combine and the "
    "send / receive-hook halves of both) through deep_ep_ops.Buffer, each with inputs that do "
    "not and that do ('(grad)') require grad, on min(128, smallest --tokens) tokens per rank. "
    "host us = median over repeats of (wall time of N back-to-back eager calls / N), measured "
    "while a long torch.cuda._sleep queued first keeps the GPU busy, so that no call waits for "
    "the GPU; normal-mode dispatch must sync (it learns its row count on the host): its host "
    "us is its eager wall time per call (back to back, from an idle GPU) minus its GPU busy "
    "time per call (the union of its kernels' and copies' intervals from torch.profiler, "
    "without graphs: CUDA events around a call would also span the GPU's waits for the host), "
    "marked 'wall - GPU busy time'; an op found waiting for the sleeping GPU is timed that way "
    "too. N = 100 calls, 7 repeats on GPUs (3 and 3 on CPU); max over ranks. GPU runs "
    "compare it with the target of "
    f"<= {HOST_TARGET_US:g} us per call (vs target = target / host us, >= 1x meets it). On CPU "
    "(gloo) the same loop times the reference's whole call, computation included: shown, but "
    "not host overhead, and without a target."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deep_ep_ops.bench",
        epilog=HOST_HELP,
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
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl", SHARED_GPU_BACKEND),
                        default="auto",
                        help="gloo: CPU tensors; nccl: CUDA tensors, one GPU per rank; "
                             f"{SHARED_GPU_BACKEND}: CUDA tensors, several ranks per GPU under "
                             "a running CUDA MPS daemon (correctness only, no performance "
                             "figures); auto: nccl when CUDA is available")
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
    if backend != "gloo" and not torch.cuda.is_available():
        parser.error(f"--backend {backend} needs CUDA GPUs, but torch.cuda.is_available() is False")
    defaults = CPU_DEFAULTS if backend == "gloo" else GPU_DEFAULTS

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    num_ranks = args.num_ranks
    if num_ranks is None:
        num_ranks = {"nccl": torch.cuda.device_count(), SHARED_GPU_BACKEND:
                     2 * torch.cuda.device_count()}.get(backend, defaults["num_ranks"])
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
    if s.backend == "nccl" and s.num_ranks > torch.cuda.device_count():
        return (f"--num-ranks {s.num_ranks} needs one GPU per rank, but only "
                f"{torch.cuda.device_count()} are visible (--backend {SHARED_GPU_BACKEND} puts "
                "several ranks on a GPU)")
    if s.shared_gpu and not os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        return (f"--backend {SHARED_GPU_BACKEND} needs a running CUDA MPS control daemon and its "
                "CUDA_MPS_PIPE_DIRECTORY in the environment (README: Many ranks on one GPU)")
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


# --- byte conventions (docs/DESIGN.md §11) ---------------------------------------------------------


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
    device = {"device": "cuda"} if s.shared_gpu else {}  # a gloo group driving the kernels
    return Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                  low_latency_mode=True, **device)


def run_cases(rank: int, s: Settings, group, device: torch.device, buffer) -> list[dict]:
    """Time every selected case on this rank; every rank returns the same result rows."""
    label = backend_label(s.on_gpu)
    reference_backend = None
    if s.on_gpu:
        # The side-by-side baseline (docs/DESIGN.md §11): the reference over NCCL in this process.
        # It does not depend on the SM count: timed once per op, shown beside every SM row.
        reference_backend = ReferenceBackend(
            buffer.name, s.num_ranks, s.num_experts,
            "reference/gloo (host-staged)" if s.shared_gpu else "reference/nccl",
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


def _time_host_blocks(phases: list[Phase], num_calls: int, repeats: int, device, group,
                      sleep: Optional[_GpuSleep], estimate_us: float):
    """Per repeat, the wall µs per call of each phase over ``num_calls`` back-to-back calls.

    With ``sleep`` (GPUs) the GPU sleeps through each block: returns ``(samples, went_idle)``,
    where ``went_idle`` says the sleep ended before the last call returned (a call waited for
    the GPU, or the estimate was short)."""
    samples, went_idle = [], False
    for _ in range(repeats):
        _line_up(device, group)
        done = None
        if sleep is not None:  # long enough for every call, whatever the GPU does per call
            done = sleep(min(2 * num_calls * estimate_us + 10_000, HOST_MAX_SLEEP_US))
        spent = [0.0] * len(phases)
        for _ in range(num_calls):
            value = None
            for p, (_, fn) in enumerate(phases):
                start = time.perf_counter()
                value = fn(value)
                spent[p] += time.perf_counter() - start
            value = None
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


def _time_host_synced(phases: list[Phase], num_calls: int, repeats: int, device, group):
    """For calls that wait for the GPU: per repeat, the wall µs per call of ``num_calls``
    back-to-back calls on a GPU that is idle at the start (final synchronize included), and
    per phase the wall µs until each phase returned."""
    samples = []
    for _ in range(repeats):
        _line_up(device, group)
        spent = [0.0] * len(phases)
        start = time.perf_counter()
        for _ in range(num_calls):
            value = None
            for p, (_, fn) in enumerate(phases):
                begin = time.perf_counter()
                value = fn(value)
                spent[p] += time.perf_counter() - begin
            value = None
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / num_calls * 1e6
        samples.append((wall, [t / num_calls * 1e6 for t in spent]))
    return samples


def _any_rank(flag: bool, device, group) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


SLEEPING_GPU = "GPU kept busy"
WALL_MINUS_GPU = "wall - GPU busy time"
WAITS_FOR_GPU = "waits for the GPU: wall time, GPU time included"


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
    if not syncs:
        samples, went_idle = _time_host_blocks(
            phases, num_calls, repeats, device, group, sleep, estimate_us
        )
        syncs = on_gpu and _any_rank(went_idle, device, group)
        if not syncs:
            for p, row in enumerate(rows):
                row["host_us"] = statistics.median(sample[p] for sample in samples)
                row["method"] = SLEEPING_GPU if on_gpu else "wall (CPU: the whole call)"
    if syncs:
        synced = _time_host_synced(phases, num_calls, repeats, device, group)
        busy = _gpu_busy_us(phases, num_calls, device, group)
        for p, row in enumerate(rows):
            row["wall_us"] = statistics.median(x[1][p] for x in synced)
            row["method"] = WAITS_FOR_GPU
            row["host_us"] = row["wall_us"]
        if len(phases) == 1 and busy is not None:
            rows[0].update(
                host_us=max(0.0, statistics.median(wall for wall, _ in synced) - busy),
                wall_us=statistics.median(wall for wall, _ in synced), gpu_busy_us=busy,
                method=WALL_MINUS_GPU,
            )
    return [dict(row, autograd_graph=graph, syncs=syncs) for row in rows]


def measure_host(rank: int, s: Settings, group, device: torch.device, buffer) -> dict:
    """The host table (every rank takes part: the ops are collectives); the same on every rank.

    One row per op phase and per grad variant (inputs that do / do not require grad); the
    reported ``host_us`` is the max over ranks of each rank's median. Also a ``torch.add`` on
    the same ``topk_idx``, timed the same way, as the baseline of a plain torch op.
    """
    on_gpu = device.type == "cuda"
    sleep = _GpuSleep() if on_gpu else None
    rows: list[dict] = []
    for mode in s.modes:
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
    topk_idx = make_inputs(HOST_TOKENS, s, rank, device).topk_idx
    baseline = [("torch.add", lambda _: torch.add(topk_idx, 1))]
    samples, _ = _time_host_blocks(baseline, HOST_CALLS[device.type], HOST_REPEATS[device.type],
                                   device, group, sleep, estimate_us=10.0)
    baseline_us = statistics.median(sample[0] for sample in samples)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, ([r.get("host_us") for r in rows], baseline_us), group=group)
    baseline_max = max(g[1] for g in gathered)
    for i, row in enumerate(rows):
        per_rank = [g[0][i] for g in gathered]
        row["host_us_per_rank"] = per_rank
        row["host_us"] = None if per_rank[0] is None else max(per_rank)
        # The op layer's share: what the call costs the host above one plain torch op's launch
        # (the baseline below, same run), which no op can avoid and which follows the host.
        row["op_layer_us"] = None if row["host_us"] is None else row["host_us"] - baseline_max
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
        "baseline": {"op": "torch.add", "tokens": HOST_TOKENS, "host_us": baseline_max},
    }


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rank_main(rank: int, s: Settings, port: int, result_path: str) -> None:
    """Entry point of a spawned rank: set up, time, and (rank 0) write the results."""
    if s.shared_gpu:
        per_gpu = -(-s.num_ranks // torch.cuda.device_count())
        # Read when CUDA starts in this process: each rank's equal SM share.
        os.environ.setdefault("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", str(100 // per_gpu))
        device = torch.device("cuda", rank // per_gpu)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=s.num_ranks)
    elif s.on_gpu:
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
        _progress(rank, "host time per eager call (every op, with and without grad) ...")
        host = measure_host(rank, s, group, device, buffer)
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
# CPU (gloo) runs time the reference only: no GPU targets, no ratios to them.
CPU_SUMMARY_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c not in ("target", "vs target"))
HOST_COLUMNS = (
    "op", "inputs", "tokens/rank", "host us", "op layer us", "vs target", "host us (grad)",
    "op layer us (grad)", "vs target (grad)", "note",
)
CPU_HOST_COLUMNS = tuple(
    c for c in HOST_COLUMNS if not c.startswith(("vs target", "op layer"))
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
        "warm-up" + (f" -- {NOT_PERFORMANCE}" if is_shared_gpu_run(report) else "")
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


def is_cpu_run(report: dict) -> bool:
    """A gloo run on CPU tensors: it times the reference backend only."""
    return report.get("device") == "cpu"


def is_shared_gpu_run(report: dict) -> bool:
    """Ranks sharing GPUs: the kernels ran, but the timings are not performance figures."""
    return report.get("settings", {}).get("backend") == SHARED_GPU_BACKEND


def best_rows(report: dict, sm_budget: int = SM_BUDGET) -> list[dict]:
    """One row per op with a docs/DESIGN.md §11 target and per timing (eager, graph), at its best
    SM count.

    Per mode, the tokens per rank of the targets (GPU defaults: 4096 normal, 128 low-latency)
    where swept, else the largest swept. The best SM count is the fastest within
    ``sm_budget`` (``over_budget`` is set when every swept count exceeds it: then the fastest
    of all). ``vs_target`` is >= 1 when the target is met: GB/s / target for bandwidth
    targets, target / median us for time targets; ``None`` for a graph that did not capture.
    On a CPU run (the reference over gloo) ``target`` and ``vs_target`` are ``None``: the
    targets are for the CUDA kernels on 4xH200.
    """
    cpu = is_cpu_run(report)
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
            "target": None if cpu else {"unit": unit, "bound": bound},
            "vs_target": None if cpu else vs_target,
            "reference_median_us": best["reference_median_us"],
            "speedup_vs_reference": best["ratio_vs_reference"],
            "capture_error": best.get("capture_error"),
            "reference_capture_error": best.get("reference_capture_error"),
        })
    return summary


def _host_cells(row: Optional[dict], gpu: bool) -> list[str]:
    """``host us`` (and on GPUs ``vs target``) of one grad variant."""
    if row is None or row["host_us"] is None:
        return ["n/a"] * 3 if gpu else ["n/a"]
    host = f"{row['host_us']:.1f}"
    if not gpu:
        return [host]
    layer = row.get("op_layer_us")
    return [host, "-" if layer is None else f"{layer:+.1f}", _ratio(row["vs_target"], ".2f")]


def format_host(host: dict) -> str:
    """The host table: one line per op (phase) and inputs, without and with grad inputs."""
    gpu = host.get("device") != "cpu"
    grouped: dict[tuple[str, str, int], dict[bool, dict]] = {}
    for r in host["rows"]:
        grouped.setdefault((r["op"], r["inputs"], r["tokens_per_rank"]), {})[r["grad"]] = r
    rows = []
    for (op, inputs, tokens), by_grad in grouped.items():
        notes = []
        for r in by_grad.values():
            for note in (r.get("note"), r.get("method") if gpu and r.get("syncs") else None):
                if note and note not in notes:
                    notes.append(note)
        rows.append((op, inputs, str(tokens), *_host_cells(by_grad.get(False), gpu),
                     *_host_cells(by_grad.get(True), gpu), "; ".join(notes) or "-"))
    calls = f"{host['calls']} back-to-back eager calls, median of {host['repeats']} repeats"
    if gpu:
        title = (
            f"host: host us per eager call through deep_ep_ops.Buffer ({host['backend']}): wall "
            f"time of {calls}, while a torch.cuda._sleep keeps the GPU busy (ops that sync: "
            "their wall time per call minus their GPU busy time per call); max over ranks; "
            "(grad): inputs require grad; "
            "op layer us = host us minus the torch.add baseline below (the launch every op "
            + (f"pays); target: the op layer adds <= {host['target_us']:g} us per call, vs "
               "target = target / op layer us (>= 1x meets it)"
               if host.get("target_us") is not None else f"pays); {NOT_PERFORMANCE}, no target")
        )
        columns, right = HOST_COLUMNS, {2, 3, 4, 5, 6, 7, 8}
    else:
        title = (
            f"host (CPU, gloo: the reference backend): wall time per eager call through "
            f"deep_ep_ops.Buffer, {calls}, max over ranks; (grad): inputs require grad. On CPU "
            "this is the reference's whole call (its computation and exchange), not the op "
            "layer's host overhead"
        )
        columns, right = CPU_HOST_COLUMNS, {2, 3, 4}
    baseline = host["baseline"]
    lines = [title, *_align_rows(columns, rows, right)]
    lines.append(f"baseline: {baseline['op']} on a [{baseline['tokens']}, top-k] tensor, timed "
                 f"the same way: {baseline['host_us']:.1f} us per call")
    return "\n".join(lines)


def format_summary(report: dict) -> str:
    """The short table: one line per op with a target (eager and graph apart), then the host
    table. On CPU runs without targets and ratios to them (the reference is timed, not the
    kernels the targets are for)."""
    summary = report.get("summary")
    if summary is None:
        summary = best_rows(report)
    cpu = is_cpu_run(report)
    shared = is_shared_gpu_run(report)
    rows = []
    for r in summary:
        sms = "-" if r["num_sms"] is None else str(r["num_sms"])
        if r["over_budget"]:
            sms += f" (>{r['sm_budget']})"
        cells = [op_label(r), r["mode"], str(r["tokens_per_rank"]), sms, _median(r),
                 _number(r["gbps"], ".4g")]
        if not (cpu or shared):
            unit, bound = r["target"]["unit"], r["target"]["bound"]
            target = f">= {bound:g} GB/s" if unit == "GB/s" else f"<= {bound:g} us"
            vs_target = "n/a" if r.get("capture_error") else _ratio(r["vs_target"], ".3g")
            cells += [target, vs_target]
        cells += [_reference_median(r), _speedup(r, "speedup_vs_reference")]
        rows.append(tuple(cells))
    if cpu:
        lines = [
            f"summary (CPU, gloo): the reference backend only, not the CUDA kernels; fastest SM "
            f"count within {SM_BUDGET} SMs; no GPU targets on a CPU run (docs/DESIGN.md §11's are for "
            "4xH200)",
        ]
        columns, right = CPU_SUMMARY_COLUMNS, {2, 4, 5, 6, 7}
    elif shared:
        lines = [f"summary ({NOT_PERFORMANCE}; no targets): fastest SM count within {SM_BUDGET} "
                 "SMs"]
        columns, right = CPU_SUMMARY_COLUMNS, {2, 4, 5, 6, 7}
    else:
        lines = [
            f"summary: fastest SM count within {SM_BUDGET} SMs; targets of docs/DESIGN.md §11 (4xH200, "
            "4096 / 128 tokens per rank), vs target >= 1x meets it; speedup: ref us / ours "
            "(eager against eager, [graph] against the reference's graph replays)",
        ]
        columns, right = SUMMARY_COLUMNS, {2, 4, 5, 7, 8, 9}
    if rows:
        lines += _align_rows(columns, rows, right)
    if report.get("host"):
        lines += ["", format_host(report["host"])]
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
