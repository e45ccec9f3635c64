"""Typed wrappers over ``torch.ops.deep_ep.*``: one function per op, results with names.

``buffer`` is the name of a live communicator (``Buffer.name``). Wrappers normalise arguments
and name results; the semantics live in the ops (docs/DESIGN.md §5).

The path of one call, ``low_latency_dispatch`` (every op with a kernel goes the same way)::

    ops.low_latency_dispatch(buffer, x, topk_idx, ...)        this module: arguments, names
      | eager, plain tensors, not compiling (_direct)
      +-> _C_nvshmem.low_latency_dispatch (C++ direct entry, csrc/nvshmem/ops.cpp)
      |     no grad needed: the kernel binding below, called directly
      |     an input requires grad: the same, recorded by a C++ autograd Function whose
      |       backward calls deep_ep ops (csrc/autograd.h)
      |     anything else (a dispatch mode, a tensor subclass): None, so on to torch.ops
      +-> torch.ops.deep_ep.low_latency_dispatch (the dispatcher; schema in _library.OPS)
            Autograd  _autograd.py: setup_context / backward by argument name
            Meta, fake (torch.compile)  meta/: check_low_latency_dispatch, then shapes
            CPU       reference.low_latency_dispatch: the check, then gloo exchanges
            CUDA      the kernel binding: C++ checks (their wording: the meta check),
                      the buffer's runtime, the launch on the current stream;
                      no runtime or a shape the kernels do not take:
                        call_fallback -> reference.low_latency_dispatch (NCCL, or gloo
                        staging through the host)
                      the extension missing or stale: the reference registered for CUDA,
                        with a CudaFallbackWarning once
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch

from . import _build, _registry
from .config import Config, default_config_list

_ops = torch.ops.deep_ep
_Tensor = torch.Tensor
ConfigLike = Union[Config, Sequence[int], None]


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: torch.Tensor  # [num_ranks] int32
    num_tokens_per_rdma_rank: torch.Tensor  # [num_rdma_ranks] int32
    num_tokens_per_expert: torch.Tensor  # [num_experts] int32
    is_token_in_rank: torch.Tensor  # [num_tokens, num_ranks] bool


class DispatchHandle(NamedTuple):
    """What combine and cached dispatch need from a normal-mode dispatch.

    Indexes like DeepEP's intranode handle tuple (first six fields). ``num_worst_tokens`` is 0
    for the data-dependent mode and the static row count in capacity mode.
    """

    rank_prefix_matrix: torch.Tensor  # [R, R] int32: [i, j] = tokens from ranks <= i to rank j
    channel_prefix_matrix: torch.Tensor  # [R, C] int32: tokens to rank r from channels <= c
    recv_channel_prefix_matrix: torch.Tensor  # [R, C] int32: first row of (source r, channel c)
    recv_src_idx: torch.Tensor  # [N] int32: source token of each received row (-1: padding)
    is_token_in_rank: torch.Tensor  # [T, R] bool
    send_head: torch.Tensor  # [T, R] int32: row of token t on rank r, or -1
    num_worst_tokens: int = 0


class DispatchOutput(NamedTuple):
    recv_x: torch.Tensor  # [N, hidden]
    recv_x_scales: torch.Tensor  # [N, S] float32 ([N, 0] without scales)
    recv_topk_idx: torch.Tensor  # [N, K] int64 local expert or -1 ([N, 0] without top-k)
    recv_topk_weights: torch.Tensor  # [N, K] float32, 0 where recv_topk_idx is -1
    num_recv_tokens_per_expert: torch.Tensor  # [L] int32, padded to expert_alignment
    handle: DispatchHandle


class CombineOutput(NamedTuple):
    combined_x: torch.Tensor  # [T, hidden]
    combined_topk_weights: torch.Tensor  # [T, K] ([T, 0] without weights)


class LowLatencyHandle(NamedTuple):
    """Indexes like DeepEP's low-latency handle tuple."""

    src_info: torch.Tensor  # [L, R*M] int32: source token of each received row
    layout_range: torch.Tensor  # [L, R] int64: begin << 32 | count per source rank
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


class LowLatencyDispatchOutput(NamedTuple):
    recv_x: torch.Tensor  # [L, R*M, hidden] float8_e4m3fn or bfloat16
    recv_x_scales: Optional[torch.Tensor]  # [L, R*M, hidden/128] float32 column-major, or None
    recv_count: torch.Tensor  # [L] int32
    handle: LowLatencyHandle


def _direct(kernels, *tensors):
    """The extension module whose kernel functions an eager call may try directly, or ``None``.

    An eager call that is not being traced gains nothing from the dispatcher: the extension's
    direct entries run the same C++ function the op's CUDA registration runs, minus the
    dispatcher's argument parsing and the Python autograd kernel (about 20 µs of host time per
    low-latency call); with an input requiring grad they record the backward from C++. Here:
    no ``torch.compile`` tracing, and plain ``torch.Tensor`` objects (``type()`` is free;
    attribute reads are not, under a torch-function mode such as ``torch.set_default_device``).
    The entries check the rest in C++ (CUDA tensors, no fake/functional/functorch wrapper, no
    dispatch mode) and return ``None`` where the call must take ``torch.ops``.
    """
    if kernels is None or torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return None
    return kernels


def _config_list(config: ConfigLike, num_ranks: int, kind: str) -> list[int]:
    """The op layer's form of ``config``; ``None``: the default ``get_<kind>_config``."""
    if config is None:
        return default_config_list(kind, num_ranks)
    if isinstance(config, Config):
        return config.to_list()
    return config if type(config) is list else list(config)


def _handle_tensors(handle: DispatchHandle) -> tuple:
    return tuple(handle[:6])


def _check_handle(handle) -> DispatchHandle:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be a DispatchHandle from dispatch(), got {type(handle).__name__}")
    return handle


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_rdma_ranks: int = 1
) -> DispatchLayout:
    """Routing counts from ``topk_idx [num_tokens, num_topk]`` int64 (-1: no expert). Pure.

    Returns ``num_tokens_per_rank [num_ranks]``, ``num_tokens_per_rdma_rank [num_rdma_ranks]``,
    ``num_tokens_per_expert [num_experts]`` (all int32; a token counts once per rank and once per
    expert) and ``is_token_in_rank [num_tokens, num_ranks]`` bool.
    """
    args = (topk_idx, num_experts, num_ranks, num_rdma_ranks)
    kernels = _direct(_build._C, topk_idx)
    out = kernels.get_dispatch_layout(*args) if kernels else None
    return DispatchLayout(*(_ops.get_dispatch_layout(*args) if out is None else out))


def dispatch(
    buffer: str,
    x: torch.Tensor,
    layout: DispatchLayout,
    topk_idx: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    x_scales: Optional[torch.Tensor] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    config: ConfigLike = None,
) -> DispatchOutput:
    """Send each token of ``x [num_tokens, hidden]`` once to every rank holding one of its experts.

    ``x_scales [num_tokens, S]`` float32 goes with float8_e4m3fn ``x``. ``topk_idx``/``topk_weights``
    ``[num_tokens, num_topk]`` (int64/float32) are optional. With ``num_worst_tokens > 0`` every
    row-indexed output has exactly that many rows (capacity mode; rows past the real count
    have ``recv_topk_idx = -1``); otherwise the row count ``N`` is data dependent.
    """
    return _dispatch(buffer, x, layout.num_tokens_per_rank, layout.is_token_in_rank,
                     layout.num_tokens_per_expert, topk_idx, topk_weights, x_scales,
                     expert_alignment, num_worst_tokens, config)[0]


def _dispatch(buffer, x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
              topk_weights, x_scales, expert_alignment, num_worst_tokens,
              config, lean: bool = False) -> tuple[DispatchOutput, Optional[list[int]]]:
    """``dispatch`` and, when the kernels learned it on the host (data-dependent mode), the
    host list of rows per local expert (``num_recv_tokens_per_expert``), else ``None``.

    ``lean`` (``Buffer.dispatch``): where the kernel entry runs the call, the output's
    ``num_recv_tokens_per_expert``, and its ``recv_x_scales`` without ``x_scales``, may be
    ``None`` (not made: host time).

    The eager path of every ``Buffer.dispatch``: kept lean (the layout's tensors as they are,
    a config list taken as it is, the results' named tuples made by the kernel entry), since
    its Python time is host time of every call."""
    cfg = config if type(config) is list else _config_list(config, is_token_in_rank.size(1),
                                                            "dispatch")
    # The per-expert counts go with or without top-k (as in DeepEP): receivers learn how many
    # rows each local expert gets either way.
    args = (
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
        num_tokens_per_expert, buffer, expert_alignment,
    )
    # _direct's test, written out (this call's Python is a measurable part of its host time);
    # num_tokens_per_rank and is_token_in_rank are tensors (the C++ entry converts them).
    kernels = _DISPATCH_ENTRIES
    if (kernels is not None and not torch.compiler.is_compiling() and type(x) is _Tensor
            and type(num_tokens_per_rank) is _Tensor and type(is_token_in_rank) is _Tensor
            and (x_scales is None or type(x_scales) is _Tensor)
            and (topk_idx is None or type(topk_idx) is _Tensor)
            and (topk_weights is None or type(topk_weights) is _Tensor)
            and (num_tokens_per_expert is None or type(num_tokens_per_expert) is _Tensor)):
        out = (kernels.capacity_dispatch(*args, num_worst_tokens, cfg, lean) if num_worst_tokens
               else kernels.dispatch(*args, cfg, lean))
        if out is not None:
            return out
    if num_worst_tokens:
        out = _ops.capacity_dispatch(*args, num_worst_tokens, cfg)
    else:
        out = _ops.dispatch(*args, cfg)
    handle = DispatchHandle(out[5], out[6], out[7], out[8], is_token_in_rank, out[9],
                            num_worst_tokens)
    return DispatchOutput(*out[:5], handle), None


# The extension's direct dispatch entries return ``(DispatchOutput, host counts)``, built in
# C++ from these types (an extension built from older sources has no such entries: the ops).
_DISPATCH_ENTRIES = _build._C if hasattr(_build._C, "set_result_types") else None
if _DISPATCH_ENTRIES is not None:
    _DISPATCH_ENTRIES.set_result_types(DispatchOutput, DispatchHandle)


def cached_dispatch(
    buffer: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    x_scales: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    config: ConfigLike = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch ``x [num_tokens, hidden]`` along the routes of an earlier dispatch's ``handle``.

    Returns ``(recv_x [N, hidden], recv_x_scales [N, S], recv_topk_weights [N, K])`` in the
    handle's row order; ``topk_weights`` are copied as they are (no masking).
    """
    handle = _check_handle(handle)
    cfg = _config_list(config, handle.is_token_in_rank.size(1), "dispatch")
    args = (x, x_scales, topk_weights, *_handle_tensors(handle), buffer, handle.num_worst_tokens, cfg)
    kernels = _direct(_build._C, x, x_scales, topk_weights)
    out = kernels.cached_dispatch(*args) if kernels else None
    return _ops.cached_dispatch(*args) if out is None else out


def _unpack_bias(bias) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if bias is None or isinstance(bias, torch.Tensor):
        return bias, None
    if isinstance(bias, (tuple, list)) and len(bias) == 2:
        return bias[0], bias[1]
    raise TypeError("bias must be a tensor, a pair of tensors or None")


def combine(
    buffer: str,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    topk_weights: Optional[torch.Tensor] = None,
    bias=None,
    config: ConfigLike = None,
) -> CombineOutput:
    """Sum the rows of ``x [N, hidden]`` back on the ranks their tokens came from.

    ``combined_x[t] = Σ over ranks r that received t (ascending) of x_r[row_r(t)] (+ bias)``,
    accumulated in float32 with one rounding to ``x.dtype``. ``topk_weights [N, K]`` are summed
    the same way. ``bias`` is ``[num_tokens, hidden]`` or a pair of such tensors.
    """
    handle = _check_handle(handle)
    bias_0, bias_1 = _unpack_bias(bias)
    cfg = _config_list(config, handle.is_token_in_rank.size(1), "combine")
    args = (x, topk_weights, bias_0, bias_1, *_handle_tensors(handle), buffer,
            handle.num_worst_tokens, cfg)
    kernels = _direct(_build._C, x, topk_weights, bias_0, bias_1)
    out = kernels.combine(*args) if kernels else None
    return CombineOutput(*(_ops.combine(*args) if out is None else out))


# --- internode normal mode (ranks on several nodes; docs/DESIGN.md section 5) ----------------


class InternodeHandle(NamedTuple):
    """What internode combine and cached dispatch need from an internode dispatch: DeepEP's ten
    internode handle fields in DeepEP's order, and nothing else, so that DeepEP's positional
    access works (``handle[-4]`` is ``recv_gbl_rank_prefix_sum``). A capacity-mode dispatch
    returns an ``InternodeCapacityHandle`` (the same fields). ``S`` nodes, ``C`` channels,
    ``N`` rows received, ``N_f`` rows received as the forwarder of the same-local-index ranks
    of every node."""

    is_token_in_rank: torch.Tensor  # [T, R] bool
    rdma_channel_prefix_matrix: torch.Tensor  # [S, C]: tokens to node n from channels <= c
    gbl_channel_prefix_matrix: torch.Tensor  # [R, C]: tokens to rank r from channels <= c
    recv_rdma_channel_prefix_matrix: torch.Tensor  # [S, C]: as forwarder, from node n
    recv_rdma_rank_prefix_sum: torch.Tensor  # [S]: as forwarder, inclusive over source nodes
    recv_gbl_channel_prefix_matrix: torch.Tensor  # [R, C]: first row of (source r, channel c)
    recv_gbl_rank_prefix_sum: torch.Tensor  # [R]: rows received, inclusive over sources
    recv_src_meta: torch.Tensor  # [N, 2]: source token, index in its source's stream here
    send_rdma_head: torch.Tensor  # [T, S]: index in the stream to node n, or -1
    send_nvl_head: torch.Tensor  # [N_f, P]: row of each forwarded token at local rank q, or -1

    @property
    def num_worst_tokens(self) -> int:
        """0: the data-dependent mode."""
        return 0


class InternodeCapacityHandle(InternodeHandle):
    """The handle of a capacity-mode internode dispatch: ``num_worst_tokens`` is its row
    count (``recv_src_meta`` has that many rows, padding included)."""

    __slots__ = ()

    @property
    def num_worst_tokens(self) -> int:
        return self.recv_src_meta.size(0)


class InternodeDispatchOutput(NamedTuple):
    recv_x: torch.Tensor  # as DispatchOutput
    recv_x_scales: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    handle: InternodeHandle


def _check_internode_handle(handle) -> InternodeHandle:
    if not isinstance(handle, InternodeHandle):
        raise TypeError("handle must be an InternodeHandle from internode_dispatch(), got "
                        f"{type(handle).__name__}")
    return handle


def internode_dispatch(
    buffer: str,
    x: torch.Tensor,
    layout: DispatchLayout,
    topk_idx: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    x_scales: Optional[torch.Tensor] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    config: ConfigLike = None,
) -> InternodeDispatchOutput:
    """``dispatch`` on a buffer whose ranks form several nodes: the same rows, an
    ``InternodeHandle``. ``layout`` must come from ``get_dispatch_layout`` with the buffer's
    node count (``Buffer.num_rdma_ranks``)."""
    cfg = _config_list(config, layout.is_token_in_rank.size(1), "dispatch")
    args = (x, x_scales, topk_idx, topk_weights, layout.num_tokens_per_rank,
            layout.num_tokens_per_rdma_rank, layout.is_token_in_rank,
            layout.num_tokens_per_expert, buffer, expert_alignment)
    if num_worst_tokens:
        out = _ops.internode_capacity_dispatch(*args, num_worst_tokens, cfg)
    else:
        out = _ops.internode_dispatch(*args, cfg)
    kind = InternodeCapacityHandle if num_worst_tokens else InternodeHandle
    return InternodeDispatchOutput(*out[:5], kind(layout.is_token_in_rank, *out[5:]))


def internode_cached_dispatch(
    buffer: str,
    x: torch.Tensor,
    handle: InternodeHandle,
    *,
    x_scales: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    config: ConfigLike = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cached_dispatch`` along an ``InternodeHandle``."""
    handle = _check_internode_handle(handle)
    cfg = _config_list(config, handle.is_token_in_rank.size(1), "dispatch")
    return _ops.internode_cached_dispatch(x, x_scales, topk_weights, *handle, buffer,
                                          handle.num_worst_tokens, cfg)


def internode_combine(
    buffer: str,
    x: torch.Tensor,
    handle: InternodeHandle,
    *,
    topk_weights: Optional[torch.Tensor] = None,
    bias=None,
    config: ConfigLike = None,
) -> CombineOutput:
    """``combine`` along an ``InternodeHandle``: per token, each node's rows summed in fp32
    and rounded to ``x.dtype``, then the nodes' partial sums (and ``bias``) in fp32, rounded
    once more (docs/DESIGN.md: within one rounding of ``combine``'s flat sum)."""
    handle = _check_internode_handle(handle)
    bias_0, bias_1 = _unpack_bias(bias)
    cfg = _config_list(config, handle.is_token_in_rank.size(1), "combine")
    return CombineOutput(*_ops.internode_combine(x, topk_weights, bias_0, bias_1, *handle,
                                                 buffer, handle.num_worst_tokens, cfg))


def check_device_errors(device: Optional[torch.device] = None) -> None:
    """Raise an error a CUDA kernel reported since the last op call on ``device``.

    Kernels report data errors (an expert id out of range, a capacity overflow) and timeouts
    (a peer that never arrived) without a host sync; every op call raises them at its start,
    and this raises them without an op. Call ``torch.cuda.synchronize()`` first to be sure the
    kernels finished. A no-op without CUDA kernels.
    """
    if _build.HAS_CUDA_KERNELS and torch.cuda.is_available():
        index = torch.device(device).index if device is not None else None
        index = torch.cuda.current_device() if index is None else index
        _build._C.check_device_errors(index)
        if _build.HAS_LOW_LATENCY_KERNELS:
            _build._C_nvshmem.check_device_errors(index)


def _num_ranks(buffer: str) -> int:
    return _registry.get(buffer).num_ranks


def _low_latency_output(out, num_max, hidden, num_experts, use_fp8) -> LowLatencyDispatchOutput:
    recv_x, recv_x_scales, recv_count, src_info, layout_range = out
    handle = LowLatencyHandle(src_info, layout_range, num_max, hidden, num_experts)
    return LowLatencyDispatchOutput(recv_x, recv_x_scales if use_fp8 else None, recv_count, handle)


def low_latency_dispatch(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    *,
    use_fp8: bool = True,
    round_scale: bool = False,
    use_ue8m0: bool = False,
    cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
) -> LowLatencyDispatchOutput:
    """Decode-path dispatch of ``x [num_tokens, hidden]`` bfloat16 with static shapes.

    ``recv_x [L, R*M, hidden]`` holds, for each local expert, ``recv_count[e]`` rows (fp8 with
    column-major ``recv_x_scales [L, R*M, hidden/128]`` float32, or ``[L, R*M, hidden/512]``
    int32 with ``use_ue8m0``); later rows are unspecified. ``cumulative_local_expert_recv_stats
    [L]`` int32 is increased in place by ``recv_count``.
    """
    args = (
        x, topk_idx, buffer, _num_ranks(buffer), num_max_dispatch_tokens_per_rank, num_experts,
        use_fp8, round_scale, use_ue8m0,
    )
    kernels = _direct(_LOW_LATENCY_ENTRIES, x, topk_idx, cumulative_local_expert_recv_stats)
    # The direct entry adds to the statistics in the kernel and returns the named tuples.
    if kernels is not None:
        out = kernels.low_latency_dispatch(*args, cumulative_local_expert_recv_stats)
        if out is not None:
            return out
    out = _ops.low_latency_dispatch(*args)
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats.add_(out[2])
    return _low_latency_output(out, num_max_dispatch_tokens_per_rank, x.size(1), num_experts, use_fp8)


def low_latency_dispatch_send(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    *,
    use_fp8: bool = True,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> LowLatencyDispatchOutput:
    """Send half of ``low_latency_dispatch``: its outputs are complete only after the receive."""
    args = (
        x, topk_idx, buffer, _num_ranks(buffer), num_max_dispatch_tokens_per_rank, num_experts,
        use_fp8, round_scale, use_ue8m0,
    )
    kernels = _direct(_LOW_LATENCY_ENTRIES, x, topk_idx)
    if kernels is not None:
        out = kernels.low_latency_dispatch_send(*args)
        if out is not None:
            return out
    out = _ops.low_latency_dispatch_send(*args)
    return _low_latency_output(out, num_max_dispatch_tokens_per_rank, x.size(1), num_experts, use_fp8)


# The extension's direct low-latency dispatch entries return ``LowLatencyDispatchOutput``, built
# in C++ from these types (an extension built from older sources has no such entries: the ops).
_LOW_LATENCY_ENTRIES = (
    _build._C_nvshmem if hasattr(_build._C_nvshmem, "set_result_types") else None
)
if _LOW_LATENCY_ENTRIES is not None:
    _LOW_LATENCY_ENTRIES.set_result_types(LowLatencyDispatchOutput, LowLatencyHandle)


# Zero-size scales of BF16 receives, one per (device, L, R*M): no allocation per eager receive
# (about 2 µs of host time each). Made afresh while torch.compile traces (a traced cache read
# would guard on its contents).
_EMPTY_SCALES: dict[tuple, torch.Tensor] = {}


def _empty_scales(recv_x: torch.Tensor) -> torch.Tensor:
    shape = (*recv_x.shape[:2], 0)
    if torch.compiler.is_compiling():
        return recv_x.new_empty(shape, dtype=torch.float32)
    key = (recv_x.device, *shape)
    empty = _EMPTY_SCALES.get(key)
    if empty is None:
        empty = _EMPTY_SCALES[key] = recv_x.new_empty(shape, dtype=torch.float32)
    return empty


def low_latency_dispatch_recv(
    buffer: str,
    pending: LowLatencyDispatchOutput,
    cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
) -> LowLatencyDispatchOutput:
    """Receive half: completes ``pending`` (from ``low_latency_dispatch_send``) in place."""
    scales = pending.recv_x_scales
    if scales is None:  # BF16: the op still takes its empty scales tensor
        scales = _empty_scales(pending.recv_x)
    args = (
        pending.recv_x, scales, pending.recv_count, pending.handle.src_info,
        pending.handle.layout_range, cumulative_local_expert_recv_stats, buffer,
    )
    kernels = _direct(_build._C_nvshmem, *args[:6])
    if not kernels or kernels.low_latency_dispatch_recv(*args) is None:
        _ops.low_latency_dispatch_recv(*args)
    return pending


def _low_latency_combine_args(buffer, x, topk_idx, topk_weights, handle):
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(
            f"handle must be a LowLatencyHandle from low_latency_dispatch(), got {type(handle).__name__}"
        )
    return (
        x, topk_idx, topk_weights, handle.src_info, handle.layout_range, buffer,
        _num_ranks(buffer), handle.num_max_dispatch_tokens_per_rank, handle.num_experts,
    )


def low_latency_combine(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    *,
    zero_copy: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted decode-path combine: ``[num_tokens, hidden]`` from ``x [L, R*M, hidden]``.

    ``combined[t] = Σ_k topk_weights[t, k] · x[e_k][slot(t, k)]`` over ``topk_idx[t, k] >= 0``,
    in top-k order with float32 accumulation. With ``out`` the result is written there.
    """
    args = _low_latency_combine_args(buffer, x, topk_idx, topk_weights, handle)
    kernels = _direct(_build._C_nvshmem, *args[:5], out)
    if out is None:
        combined = kernels.low_latency_combine(*args, zero_copy) if kernels else None
        return _ops.low_latency_combine(*args, zero_copy) if combined is None else combined
    if not kernels or kernels.low_latency_combine_out(*args, zero_copy, out) is None:
        _ops.low_latency_combine_out(*args, zero_copy, out)
    return out


def low_latency_combine_send(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    *,
    zero_copy: bool = False,
) -> torch.Tensor:
    """Send half of ``low_latency_combine``; the result is complete after the receive."""
    args = _low_latency_combine_args(buffer, x, topk_idx, topk_weights, handle)
    kernels = _direct(_build._C_nvshmem, *args[:5])
    pending = kernels.low_latency_combine_send(*args, zero_copy) if kernels else None
    return _ops.low_latency_combine_send(*args, zero_copy) if pending is None else pending


def low_latency_combine_recv(
    buffer: str, combined_x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Receive half: completes ``combined_x`` in place and returns it."""
    args = (combined_x, topk_idx, topk_weights, buffer)
    kernels = _direct(_build._C_nvshmem, *args[:3])
    if not kernels or kernels.low_latency_combine_recv(*args) is None:
        _ops.low_latency_combine_recv(*args)
    return combined_x


def clean_low_latency_buffer(
    buffer: str, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
) -> None:
    """Collectively reset the low-latency state of ``buffer``."""
    _ops.clean_low_latency_buffer(
        _registry.get(buffer).workspace, buffer, num_max_dispatch_tokens_per_rank, hidden,
        num_experts,
    )


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [num_tokens, hidden]`` -> ``(float8_e4m3fn [num_tokens, hidden], scales)``.

    Scales are float32 ``[num_tokens, hidden/128]`` (``scale_inv`` per 128 channels), or with
    ``use_ue8m0`` int32 ``[num_tokens, hidden/512]`` of packed exponent bytes. Bit-compatible
    with DeepEP's kernel.
    """
    return _ops.per_token_cast_to_fp8(x, round_scale, use_ue8m0)


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn [num_tokens, hidden]`` times its per-128-channel scales -> bfloat16."""
    return _ops.per_token_cast_back(x_fp8, x_scales)
