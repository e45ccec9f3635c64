"""Settings, the command line and its checks, constants and byte conventions."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Optional

import torch

from ..config import NUM_MAX_NVL_PEERS, get_dispatch_config


NORMAL, LOW_LATENCY, INTERNODE = "normal", "low-latency", "internode"
MODES = (NORMAL, LOW_LATENCY)  # ``--mode all``; internode needs several ranks: only when asked
SM_SWEPT_MODES = (NORMAL, INTERNODE)  # dispatch and combine timed once per ``--num-sms`` value
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
# docs/DESIGN.md §11 internode goals (real clusters, EP16, 400 Gb/s NICs): RDMA bottleneck GB/s.
# A bench run puts every rank on one host, so they are printed as goals and never measured.
INTERNODE_GOALS_GBPS = {"dispatch": 90.0, "combine": 81.0}
# The host table (``measure_host``): host µs per eager call through ``deep_ep_ops.Buffer``.
HOST_TARGET_US = 8.0  # per call, any op (GPU runs only)
HOST_TOKENS = 128  # tokens per rank (at most; no more than the smallest swept)
HOST_CALLS = {"cuda": 100, "cpu": 3}  # back-to-back calls per timed block
HOST_REPEATS = {"cuda": 15, "cpu": 3}  # timed blocks (each with its baseline); medians reported
HOST_WARMUP = {"cuda": 10, "cpu": 1}  # untimed calls per case first
HOST_MAX_SLEEP_US = 2_000_000  # the GPU sleeps at most this long per block
HOST_MIN_CYCLES_PER_US = 2000.0  # torch.cuda._sleep cycles per µs assumed at least (~2 GHz)

# Ranks sharing GPUs (README "Many ranks on one GPU"): timings are not performance figures.
SHARED_GPU_BACKEND = "gloo-cuda"
NOT_PERFORMANCE = "ranks share GPUs under CUDA MPS: correctness run, NOT performance figures"


def reference_label(shared_gpu: bool) -> str:
    """The baseline beside the kernels: the reference over NCCL, or (ranks sharing GPUs, where
    NCCL refuses) over the buffer's gloo group with the CUDA tensors staged through the host."""
    return "reference/gloo (host-staged)" if shared_gpu else "reference/nccl"

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
    # Internode mode: ranks per emulated node (Buffer's num_ranks_per_node); None without it
    ranks_per_node: Optional[int] = None

    @property
    def on_gpu(self) -> bool:
        return self.backend in ("nccl", SHARED_GPU_BACKEND)

    @property
    def shared_gpu(self) -> bool:
        return self.backend == SHARED_GPU_BACKEND

    @property
    def num_nodes(self) -> int:
        """Nodes of the buffer: ``num_ranks / ranks_per_node`` in internode mode, else one."""
        return 1 if self.ranks_per_node is None else self.num_ranks // self.ranks_per_node

    def graphed(self, mode: str) -> bool:
        """Whether ``mode``'s ops are timed as CUDA-graph replays too."""
        return self.graph and self.on_gpu and mode in GRAPH_MODES


# docs/DESIGN.md §11 shapes on GPUs; on CPU, small enough for a laptop (well under a minute).
GPU_DEFAULTS = dict(
    hidden=7168, num_topk=8, num_experts=256, num_iters=100, num_warmup=20,
    tokens={NORMAL: (4096,), LOW_LATENCY: (128,), INTERNODE: (4096,)},
    num_sms=(8, 16, 20, 24, 32),
)
CPU_DEFAULTS = dict(
    num_ranks=2, hidden=1024, num_topk=4, num_experts=32, num_iters=20, num_warmup=2,
    tokens={NORMAL: (64, 128, 256), LOW_LATENCY: (32,), INTERNODE: (64, 128, 256)},
    num_sms=(DEFAULT_NUM_SMS,),
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
    "too. N = 100 calls, 15 repeats on GPUs (3 and 3 on CPU); max over ranks. Each repeat "
    "also times N torch.add calls right after the op's: op layer us = the median over repeats "
    "of (op us - torch.add us). GPU runs compare the op layer with the target of "
    f"<= {HOST_TARGET_US:g} us per call (vs target = target / op layer us, >= 1x meets it). On CPU "
    "(gloo) the same loop times the reference's whole call, computation included: shown, but "
    "not host overhead, and without a target. Internode runs have no host table."
)
INTERNODE_HELP = (
    "Internode mode: dispatch BF16, dispatch FP8 and combine BF16 through the internode ops on "
    "a buffer of num_ranks / L nodes of L ranks (--ranks-per-node L). Every rank runs on this "
    "host, so the nodes are emulated (their traffic takes the internode path but crosses no "
    "NIC), and every internode line and title says so; no target is shown (the goals, "
    f">= {INTERNODE_GOALS_GBPS['dispatch']:g} GB/s dispatch and "
    f">= {INTERNODE_GOALS_GBPS['combine']:g} GB/s combine RDMA bottleneck bandwidth at EP16 "
    "with 400 Gb/s NICs, are for real clusters and not measured here). Two bandwidths, DeepEP's "
    "conventions: GB/s (NVL) = received payload bytes per rank / time, as in normal mode; RDMA "
    "GB/s = the rank's (token, destination node) pairs (a token counts once per node holding "
    "one of its destination ranks, the rank's own node included, as DeepEP counts) x row bytes "
    "/ time; combine counts the same pairs and rows as its dispatch."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deep_ep_ops.bench",
        epilog=f"{HOST_HELP} {INTERNODE_HELP}",
        description=(
            "Time deep_ep dispatch/combine (normal, low-latency and internode modes) on N "
            "spawned ranks. Defaults: DeepSeek-V3 shapes on GPUs (hidden 7168, top-8 of 256 "
            "experts, 4096 tokens/rank normal and internode, 128 low-latency, one rank per GPU, "
            "SM sweep 8 16 20 24 32); small shapes on CPU (2 ranks, hidden 1024, top-4 of 32 "
            "experts, 64/128/256 tokens/rank normal and internode, 32 low-latency, "
            f"{DEFAULT_NUM_SMS} SMs)."
        ),
    )
    parser.add_argument("--num-ranks", type=int, help="ranks to spawn (GPU: one per GPU; "
                        "default: all GPUs, or 2 on CPU)")
    parser.add_argument("--mode", choices=(*MODES, INTERNODE, "all"), default="all",
                        help="which ops to time: normal, low-latency, or internode (dispatch "
                             "BF16/FP8 and combine BF16 on a buffer whose ranks form several "
                             "nodes, emulated on this host, see --ranks-per-node; needs >= 2 "
                             "ranks); all = normal + low-latency, never internode (default: all)")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="T",
                        help="tokens per rank to sweep, for every selected mode "
                             "(low-latency uses num_max_dispatch_tokens_per_rank = T)")
    parser.add_argument("--num-sms", type=int, nargs="+", metavar="N",
                        help="SM counts to sweep for normal-mode and internode dispatch and "
                             "combine (even, "
                             ">= 2; Config(num_sms=N)); default: 8 16 20 24 32 on GPUs, "
                             f"{DEFAULT_NUM_SMS} on CPU")
    parser.add_argument("--ranks-per-node", type=int, metavar="L",
                        help="internode mode: ranks per emulated node (Buffer's "
                             "num_ranks_per_node; a divisor of --num-ranks, at most "
                             f"{NUM_MAX_NVL_PEERS}, leaving >= 2 nodes); default: num_ranks // 2 "
                             "(two nodes for an even rank count). Every rank runs on this host: "
                             "the nodes are emulated")
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
        if backend == "nccl":
            num_ranks = torch.cuda.device_count()
        elif backend == SHARED_GPU_BACKEND:
            num_ranks = 2 * torch.cuda.device_count()
        else:
            num_ranks = defaults["num_ranks"]
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.tokens is None:
        tokens = {mode: defaults["tokens"][mode] for mode in modes}
    else:
        tokens = {mode: tuple(args.tokens) for mode in modes}
    if args.ranks_per_node is not None and INTERNODE not in modes:
        parser.error("--ranks-per-node applies to --mode internode only")
    ranks_per_node = args.ranks_per_node
    if INTERNODE in modes and ranks_per_node is None:
        ranks_per_node = num_ranks // 2
    settings = Settings(
        num_ranks=num_ranks, modes=modes, tokens=tokens,
        num_sms=tuple(sorted(set(pick("num_sms")))), hidden=pick("hidden"),
        num_topk=pick("num_topk"), num_experts=pick("num_experts"), num_iters=pick("num_iters"),
        num_warmup=pick("num_warmup"), backend=backend, seed=args.seed, plot=args.plot,
        out=args.out, graph=args.graph, ranks_per_node=ranks_per_node,
    )
    problem = _check_settings(settings)
    if problem:
        parser.error(problem)
    return settings


def _check_settings(s: Settings) -> Optional[str]:
    """The first problem with ``s`` as an argparse-style message, or ``None``."""
    if s.num_ranks < 1:
        return f"--num-ranks must be >= 1, got {s.num_ranks}"
    if INTERNODE in s.modes:
        problem = _check_nodes(s)
        if problem:
            return problem
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


def _check_nodes(s: Settings) -> Optional[str]:
    """The first problem with the emulated nodes of an internode run, or ``None``."""
    if s.num_ranks < 2:
        return (f"--mode internode needs >= 2 ranks (two emulated nodes), got --num-ranks "
                f"{s.num_ranks}")
    per_node = s.ranks_per_node
    if per_node is None or not 1 <= per_node <= NUM_MAX_NVL_PEERS:
        return (f"--ranks-per-node must be in [1, {NUM_MAX_NVL_PEERS}] (ranks of one NVLink "
                f"domain), got {per_node}")
    if s.num_ranks % per_node:
        return (f"--ranks-per-node ({per_node}) must divide --num-ranks ({s.num_ranks}): every "
                "node holds as many ranks (the default is num_ranks // 2)")
    if s.num_ranks // per_node < 2:
        return (f"--ranks-per-node {per_node} leaves one node of {s.num_ranks} ranks: internode "
                "mode needs >= 2 nodes (at most num_ranks / 2 ranks per node)")
    return None


# --- byte conventions (docs/DESIGN.md §11) ---------------------------------------------------------


def bf16_row_bytes(hidden: int) -> int:
    return 2 * hidden


def fp8_row_bytes(hidden: int) -> int:
    """FP8 payload plus one float32 scale per 128 channels."""
    return hidden + 4 * hidden // FP8_GROUP


def rdma_token_pairs(is_token_in_rank: torch.Tensor, num_nodes: int) -> int:
    """DeepEP's RDMA (bottleneck) count of one rank: its ``(token, destination node)`` pairs,
    a token counting once per node that holds at least one of its destination ranks, the rank's
    own node included (as DeepEP's ``tests/test_internode.py`` counts them). Nodes are blocks of
    consecutive ranks, so ``is_token_in_rank [T, R]`` folds to ``[T, nodes, R / nodes]``. The
    combine sends the same rows back along the same route: the same count serves it."""
    num_tokens, num_ranks = is_token_in_rank.shape
    per_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks // num_nodes)
    return int(per_node.any(-1).sum())
