"""Reference backend: every ``deep_ep`` op over ``torch.distributed`` collectives and plain torch.

It is the oracle of the GPU tests, the CPU backend (gloo), and the CUDA fallback and benchmark
baseline (NCCL). The code is device-agnostic. Row order and rounding follow docs/DESIGN.md §5
exactly: rows by source rank then source token; sums in fp32 (fp64 for fp64 inputs) in
ascending rank order, or top-k order for low-latency combine, with one final rounding.

Host synchronisation: on CPU tensors reading a count is free. On CUDA, only the data-dependent
normal mode (``dispatch``, and ``cached_dispatch``/``combine`` with a handle from it) reads split
sizes on the host; capacity mode and every low-latency op exchange fixed-size padded blocks and
never synchronise, so they capture in CUDA graphs.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from . import _build, _library, _registry
from . import meta
from .config import Config, get_low_latency_rdma_size_hint

# --- collectives with timeouts that name the op and the peer -------------------------------


def _wait(comm: _registry.Communicator, op: str, work) -> None:
    if comm.host_collectives:
        comm.wait(op, work)
    else:
        work.wait()  # NCCL: orders the current stream; the watchdog enforces the timeout


def _wire(t: torch.Tensor) -> torch.Tensor:
    """Collectives move bytes for dtypes that gloo/NCCL may not know (float8, bool)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def _staged(comm, t: torch.Tensor) -> torch.Tensor:
    """What a collective of ``comm`` takes: ``t``, or its host copy when the group's collectives
    run on the host (a gloo group driving CUDA tensors: staging through the host)."""
    return t.cpu() if comm.host_collectives and t.device.type != "cpu" else t


def _host_all_gather(comm, op: str, t: torch.Tensor) -> torch.Tensor:
    """A host tensor's all_gather over the buffer's own gloo group, bounded by its timeout."""
    out = t.new_empty((comm.num_ranks * t.numel(),))
    comm.wait(op, comm.pg._allgather_base(out, t.contiguous().view(-1)))
    return out.view(comm.num_ranks, *t.shape)


def _all_gather(comm, op: str, t: torch.Tensor) -> torch.Tensor:
    """``[*shape]`` on each rank -> ``[num_ranks, *shape]`` on every rank."""
    device = t.device
    t = _staged(comm, _wire(t.contiguous()))
    if comm.host_collectives:  # the buffer's own gloo group
        return _host_all_gather(comm, op, t).to(device)
    out = t.new_empty((comm.num_ranks * t.numel(),))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _wait(comm, op, gather(out, t.view(-1), group=comm.group, async_op=True))
    return out.view(comm.num_ranks, *t.shape).to(device)


def _all_to_all(comm, op: str, send: torch.Tensor, send_splits=None, recv_splits=None):
    """Rows of ``send`` to each rank; equal blocks unless splits (host lists) are given."""
    rows = send.size(0) if recv_splits is None else sum(recv_splits)
    device = send.device
    send = _staged(comm, send)
    out = send.new_empty((rows, *send.shape[1:]))
    if comm.host_collectives:
        work = comm.pg.alltoall_base(_wire(out), _wire(send.contiguous()), recv_splits or [],
                                     send_splits or [])
    else:
        work = dist.all_to_all_single(
            _wire(out), _wire(send.contiguous()), recv_splits, send_splits, group=comm.group,
            async_op=True,
        )
    _wait(comm, op, work)
    return out.to(device)


def _barrier(comm, op: str) -> None:
    _all_gather(comm, op, torch.zeros(1, dtype=torch.int32, device=comm.device))


def _comm(buffer: str, op: str, device: torch.device) -> _registry.Communicator:
    comm = _registry.get(buffer)
    if comm.broken:
        raise RuntimeError(f"deep_ep::{op}: buffer {buffer} is unusable after a timeout or a "
                           "failed exchange; destroy it and create a new one")
    if comm.device.type != device.type:
        raise ValueError(
            f"deep_ep::{op}: tensors are on {device} but buffer {buffer!r} was created for "
            f"{comm.device}"
        )
    comm.enter(op)
    return comm


_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn,
           torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool)
_AGREED_VALUES = 15  # values per agreement vector (after the op), fixed: any two ops line up


def _dtype_code(t: Optional[torch.Tensor]) -> int:
    return -1 if t is None else _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -2


def _agree(comm, op: str, **values: int) -> None:
    """Every rank checks that all ranks called ``op`` with the same ``values`` (what sizes the
    exchange: shapes, M, hidden, E, num_worst_tokens, the FP8 flags) and raises on every rank a
    ``ValueError`` naming the first argument they disagree on and each rank's value.

    One fixed-size all_gather over the buffer's own gloo group, before the op's own exchanges,
    on every group: on gloo, mismatched sizes would abort the process (gloo's size checks are
    fatal) or pair the wrong calls; on NCCL they would hang or corrupt. Bounded by the
    buffer's timeout, and a rank that never comes is named (the NCCL exchanges after it are
    bounded by NCCL's own watchdog only). Host-side: no GPU sync, nothing captured in a graph
    (a captured call agrees once, at capture). The kernels agree inside their own exchanges
    (docs/DESIGN.md §8); the low-latency pinning call comes here too."""
    names = list(values)
    if len(names) > _AGREED_VALUES:
        raise AssertionError(f"deep_ep::{op}: {len(names)} values to agree on, at most "
                             f"{_AGREED_VALUES}")
    vector = [_library.OPS_INDEX[op], *(int(values[n]) for n in names)]
    vector += [0] * (_AGREED_VALUES + 1 - len(vector))
    everyone = _host_all_gather(comm, op, torch.tensor(vector, dtype=torch.int64)).tolist()
    ops_called = [row[0] for row in everyone]
    if len(set(ops_called)) > 1:
        called = ", ".join(f"rank {r}: {_library.OP_NAMES[c]}" for r, c in enumerate(ops_called))
        raise ValueError(f"deep_ep::{op} on buffer {comm.name!r}: the ranks called different "
                         f"ops at the same point ({called})")
    for i, name in enumerate(names, start=1):
        column = [row[i] for row in everyone]
        if len(set(column)) > 1:
            shown = [_DTYPES[v] if name.endswith("dtype") and 0 <= v < len(_DTYPES) else v
                     for v in column]
            each = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            raise ValueError(f"deep_ep::{op} on buffer {comm.name!r}: the ranks disagree on "
                             f"{name} ({each}); every rank must pass the same")


def _check_nvl_bytes(comm, op: str, hidden: int, element_size: int, config) -> None:
    """Normal-mode calls must fit the NVLink buffer the user asked for, as in DeepEP."""
    needed = Config(*config).get_nvl_buffer_size_hint(hidden * max(element_size, 2), comm.num_ranks)
    if needed > comm.num_nvl_bytes:
        raise ValueError(
            f"deep_ep::{op}: buffer {comm.name!r} has num_nvl_bytes={comm.num_nvl_bytes} but "
            f"hidden={hidden} with this config needs {needed} "
            "(Config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks))"
        )


def _check_num_ranks(comm, op: str, num_ranks: int, what: str) -> None:
    if num_ranks != comm.num_ranks:
        raise ValueError(
            f"deep_ep::{op}: {what} implies {num_ranks} ranks but buffer {comm.name!r} has "
            f"{comm.num_ranks}"
        )


def _data_check(ok: torch.Tensor, msg: str) -> None:
    """A check that needs the data: raise now on CPU, on the device (no host sync) on GPUs."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(msg)
    else:
        torch._assert_async(ok, msg)


def _check_topk_range(op: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    _data_check(
        ((topk_idx >= -1) & (topk_idx < num_experts)).all(),
        f"deep_ep::{op}: topk_idx entries must be -1 or in [0, {num_experts})",
    )


# --- packing several per-row tensors into one byte matrix ----------------------------------


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` -> its ``[rows, n * element_size]`` bytes. An empty tensor may carry any
    strides (a contiguous ``[0, 1]`` float tensor can have stride 0 in its last dim, which
    ``view(torch.uint8)`` refuses): it is replaced by a fresh one (the FP8 cast of a rank with
    no tokens)."""
    if t.numel() == 0:
        t = t.new_empty(t.shape)
    return t.view(torch.uint8)


def _pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """``[rows, ...]`` tensors of any dtypes -> ``[rows, bytes]`` uint8, plus how to undo it."""
    rows = tensors[0].size(0)
    parts = [_row_bytes(t.contiguous().view(rows, math.prod(t.shape[1:]))) for t in tensors]
    specs = [(t.dtype, tuple(t.shape[1:]), p.size(1)) for t, p in zip(tensors, parts)]
    return torch.cat(parts, dim=1), specs


def _unpack(packed: torch.Tensor, specs: list) -> list[torch.Tensor]:
    out, start = [], 0
    for dtype, shape, width in specs:
        # clone() always allocates: a strided slice of one row would keep its byte offset,
        # which cannot be viewed as a wider dtype.
        part = packed[:, start : start + width].clone(memory_format=torch.contiguous_format)
        out.append(part.view(dtype).view(packed.size(0), *shape))
        start += width
    return out


# --- normal mode: the routing shared by dispatch, cached dispatch and combine --------------


def _counts_from_prefix(rank_prefix_matrix: torch.Tensor) -> torch.Tensor:
    """``counts[i, j]``: tokens sent from rank i to rank j."""
    counts = rank_prefix_matrix.to(torch.int64)
    return torch.cat([counts[:1], counts[1:] - counts[:-1]])


def _exclusive_cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.cumsum(dim) - t


def _send_rows(comm, op, payload, is_token_in_rank, counts, num_worst_tokens,
               receives="receives more rows"):
    """Send row ``t`` of ``payload`` to every rank ``r`` with ``is_token_in_rank[t, r]``.

    Returns the received ``[num_rows, ...]`` rows, ordered by source rank then source token,
    with ``num_rows = num_worst_tokens`` (zero rows past the count) in capacity mode
    (``receives``: what the capacity error says this rank does).
    """
    me, num_ranks = comm.rank, comm.num_ranks
    if num_worst_tokens == 0:
        dest_token = is_token_in_rank.t().nonzero()  # sorted by destination, then token
        send = payload.index_select(0, dest_token[:, 1])
        host_counts = counts.tolist()  # host sync on CUDA: the data-dependent path
        return _all_to_all(
            comm, op, send, host_counts[me], [host_counts[i][me] for i in range(num_ranks)]
        )
    # Capacity mode: fixed blocks of num_worst_tokens rows per peer, no host sync. Rows move
    # as bytes: index_copy_ has no float8 kernels.
    dtype, payload = payload.dtype, _wire(payload)
    block = num_worst_tokens
    _data_check(
        counts[:, me].sum() <= block,
        f"deep_ep::{op}: rank {me} {receives} than num_worst_tokens={block}",
    )
    slot = is_token_in_rank.to(torch.int64).cumsum(0) - 1  # [T, R]
    base = torch.arange(num_ranks, device=payload.device) * block
    trash = num_ranks * block
    dest = torch.where(is_token_in_rank & (slot < block), base + slot, trash)
    send = payload.new_zeros((trash + 1, *payload.shape[1:]))
    src = payload.unsqueeze(1).expand(-1, num_ranks, *payload.shape[1:])
    send.index_copy_(0, dest.reshape(-1), src.reshape(-1, *payload.shape[1:]))
    recv = _all_to_all(comm, op, send[:trash])
    # Compact the per-source blocks: source i's rows start after those of ranks < i.
    from_rank = counts[:, me]
    row = torch.arange(block, device=payload.device)
    dest = torch.where(
        row < from_rank[:, None], _exclusive_cumsum(from_rank, 0)[:, None] + row, block
    )
    out = payload.new_zeros((block + 1, *payload.shape[1:]))
    out.index_copy_(0, dest.reshape(-1), recv)
    return out[:block].view(dtype)


def _return_rows(comm, op, x, is_token_in_rank, counts, num_worst_tokens):
    """The reverse of ``_send_rows``: rows of ``x`` back to their source ranks.

    Returns ``blocks [R, rows, ...]`` and ``slot [T, R]``: the row that came back from rank r
    for token t is ``blocks[r, slot[t, r]]`` (valid where ``is_token_in_rank``).
    """
    me, num_ranks = comm.rank, comm.num_ranks
    start = _exclusive_cumsum(counts[:, me], 0)  # my rows from source i start here
    slot = is_token_in_rank.to(torch.int64).cumsum(0) - 1
    if num_worst_tokens == 0:
        host_counts = counts.tolist()
        back = _all_to_all(
            comm, op, x, [host_counts[i][me] for i in range(num_ranks)], host_counts[me]
        )
        offset = _exclusive_cumsum(counts[me], 0)  # block of rank r in ``back``
        return back, slot + offset
    block = num_worst_tokens
    row = torch.arange(block, device=x.device)
    valid = row < counts[:, me][:, None]  # [R, block]
    index = torch.where(valid, start[:, None] + row, 0).reshape(-1)
    send = x.index_select(0, index) * valid.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    back = _all_to_all(comm, op, send)
    return back, slot + torch.arange(num_ranks, device=x.device) * block


def _reduce_returned(back, slot, is_token_in_rank, acc_dtype, per_node=None):
    """``Σ_r back[slot[t, r]]`` over ranks r holding token t, ascending r, in ``acc_dtype``.

    With ``per_node`` ranks per node (fewer than all: the internode combine), each node's sum
    is rounded to ``back.dtype`` before the sum over the nodes, ascending (docs/DESIGN.md)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    if per_node is not None and per_node < num_ranks:
        acc = back.new_zeros((num_tokens, *back.shape[1:]), dtype=acc_dtype)
        for first in range(0, num_ranks, per_node):
            node = slice(first, first + per_node)
            partial = _reduce_returned(back, slot[:, node], is_token_in_rank[:, node], acc_dtype)
            acc = acc + partial.to(back.dtype).to(acc_dtype)
        return acc
    acc = back.new_zeros((num_tokens, *back.shape[1:]), dtype=acc_dtype)
    if back.size(0) == 0:  # nothing came back: no token was sent anywhere
        return acc
    mask_shape = (num_tokens,) + (1,) * (back.dim() - 1)
    for r in range(num_ranks):
        present = is_token_in_rank[:, r]
        rows = back.index_select(0, torch.where(present, slot[:, r], 0)).to(acc_dtype)
        acc = acc + torch.where(present.view(mask_shape), rows, 0)
    return acc


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --- ops ----------------------------------------------------------------------------------


def get_dispatch_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks):
    meta.check_get_dispatch_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks)
    _check_topk_range("get_dispatch_layout", topk_idx, num_experts)
    num_tokens = topk_idx.size(0)
    experts = torch.arange(num_experts, device=topk_idx.device)
    # A token counts once per expert and once per rank, however often it lists them.
    in_expert = (topk_idx.unsqueeze(-1) == experts).any(1)  # [T, E]
    is_token_in_rank = in_expert.view(num_tokens, num_ranks, num_experts // num_ranks).any(-1)
    in_rdma_rank = is_token_in_rank.view(
        num_tokens, num_rdma_ranks, num_ranks // num_rdma_ranks
    ).any(-1)
    return (
        is_token_in_rank.sum(0, dtype=torch.int32),
        in_rdma_rank.sum(0, dtype=torch.int32),
        in_expert.sum(0, dtype=torch.int32),
        is_token_in_rank,
    )


def _channel_prefix(is_token_in_rank, channels):
    """``[R, C]`` inclusive prefix over channels of tokens sent to each rank (DeepEP's split)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    per_channel = -(-num_tokens // channels)
    channel = torch.arange(num_tokens, device=is_token_in_rank.device) // max(per_channel, 1)
    counts = is_token_in_rank.new_zeros((channels, num_ranks), dtype=torch.int64)
    counts.index_add_(0, channel, is_token_in_rank.to(torch.int64))
    return counts.cumsum(0).t().contiguous()


def _dispatch(
    op, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
    num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens, config,
):
    """Both dispatches, after their op's check (``meta.check_dispatch`` / ``_capacity_``)."""
    comm = _comm(buffer, op, x.device)
    _agree(comm, op, hidden=x.size(1), x_dtype=_dtype_code(x),
           x_scales=-1 if x_scales is None else x_scales.size(1),
           num_topk=-1 if topk_idx is None else topk_idx.size(1),
           topk_weights_dtype=_dtype_code(topk_weights),
           num_experts=0 if num_tokens_per_expert is None else num_tokens_per_expert.size(0),
           num_ranks=is_token_in_rank.size(1), expert_alignment=expert_alignment,
           num_worst_tokens=num_worst_tokens, num_sms=config[0])
    num_tokens, num_ranks = is_token_in_rank.shape
    _check_num_ranks(comm, op, num_ranks, "is_token_in_rank.size(1)")
    _check_nvl_bytes(comm, op, x.size(1), x.element_size(), config)
    me, channels = comm.rank, meta.num_channels(config)
    num_experts = 0 if num_tokens_per_expert is None else num_tokens_per_expert.size(0)
    num_local = num_experts // num_ranks
    if topk_idx is not None:
        _check_topk_range(op, topk_idx, num_experts)
    _data_check(
        (is_token_in_rank.sum(0, dtype=torch.int32) == num_tokens_per_rank).all(),
        f"deep_ep::{op}: num_tokens_per_rank disagrees with is_token_in_rank",
    )

    # One exchange of all counts: per-rank, per-channel and per-expert.
    channel_prefix = _channel_prefix(is_token_in_rank, channels)  # [R, C]
    per_expert = (
        num_tokens_per_expert.to(torch.int64) if num_tokens_per_expert is not None
        else x.new_zeros((0,), dtype=torch.int64)
    )
    mine = torch.cat([
        is_token_in_rank.sum(0).to(torch.int64), channel_prefix.reshape(-1), per_expert,
    ])
    gathered = _all_gather(comm, op, mine)
    counts = gathered[:, :num_ranks]  # [src, dst]
    src_channel_prefix = gathered[:, num_ranks : num_ranks * (1 + channels)].view(
        num_ranks, num_ranks, channels
    )[:, me]  # [src, C]: channel prefix of each source towards me
    src_per_expert = gathered[:, num_ranks * (1 + channels) :]
    num_recv_per_expert = src_per_expert[:, me * num_local : (me + 1) * num_local].sum(0)
    num_recv_per_expert = -(-num_recv_per_expert // expert_alignment) * expert_alignment

    # Per-row payload besides x: source index, global top-k, weights, scales.
    extras = [torch.arange(num_tokens, dtype=torch.int32, device=x.device)]
    if topk_idx is not None:
        extras += [topk_idx, topk_weights]
    if x_scales is not None:
        extras.append(x_scales)
    packed, specs = _pack(extras)
    recv_x = _send_rows(comm, op, x, is_token_in_rank, counts, num_worst_tokens)
    received = _unpack(_send_rows(comm, op, packed, is_token_in_rank, counts, num_worst_tokens), specs)
    recv_src_idx = received.pop(0)
    num_rows = recv_x.size(0)
    if num_worst_tokens:
        real = torch.arange(num_rows, device=x.device) < counts[:, me].sum()
        recv_src_idx = torch.where(real, recv_src_idx, -1)
    if topk_idx is not None:
        global_idx, recv_topk_weights = received.pop(0), received.pop(0)
        local_idx = global_idx - me * num_local
        here = (global_idx >= 0) & (local_idx >= 0) & (local_idx < num_local)
        if num_worst_tokens:
            here &= real[:, None]
        recv_topk_idx = torch.where(here, local_idx, -1)
        recv_topk_weights = torch.where(here, recv_topk_weights, 0)
    else:
        recv_topk_idx = x.new_empty((num_rows, 0), dtype=torch.int64)
        recv_topk_weights = x.new_empty((num_rows, 0), dtype=torch.float32)
    recv_x_scales = (
        received.pop(0) if x_scales is not None
        else x.new_empty((num_rows, 0), dtype=torch.float32)
    )

    rank_prefix_matrix = counts.cumsum(0)
    recv_channel_prefix = _exclusive_cumsum(counts[:, me], 0)[:, None] + torch.cat(
        [src_channel_prefix.new_zeros((num_ranks, 1)), src_channel_prefix[:, :-1]], dim=1
    )
    my_start = (rank_prefix_matrix - counts)[me]  # where my block starts on each rank
    slot = is_token_in_rank.to(torch.int64).cumsum(0) - 1
    send_head = torch.where(is_token_in_rank, my_start + slot, -1)
    i32 = torch.int32
    return (
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_per_expert.to(i32),
        rank_prefix_matrix.to(i32), channel_prefix.to(i32), recv_channel_prefix.to(i32),
        recv_src_idx.view(-1), send_head.to(i32),
    )


def dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
             num_tokens_per_expert, buffer, expert_alignment, config):
    meta.check_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                        is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, config)
    return _dispatch(
        "dispatch", x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
        num_tokens_per_expert, buffer, expert_alignment, 0, config,
    )


def capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                      is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                      num_worst_tokens, config):
    meta.check_capacity_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
        num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens, config,
    )
    return _dispatch(
        "capacity_dispatch", x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
        is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens,
        config,
    )


def cached_dispatch(x, x_scales, topk_weights, rank_prefix_matrix, channel_prefix_matrix,
                    recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head,
                    buffer, num_worst_tokens, config):
    op = "cached_dispatch"
    meta.check_cached_dispatch(
        x, x_scales, topk_weights, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
        num_worst_tokens, config,
    )
    comm = _comm(buffer, op, x.device)
    _agree(comm, op, hidden=x.size(1), x_dtype=_dtype_code(x),
           x_scales=-1 if x_scales is None else x_scales.size(1),
           topk_weights=-1 if topk_weights is None else topk_weights.size(1),
           num_ranks=is_token_in_rank.size(1), num_worst_tokens=num_worst_tokens,
           num_sms=config[0])
    _check_num_ranks(comm, op, is_token_in_rank.size(1), "handle.is_token_in_rank.size(1)")
    _check_nvl_bytes(comm, op, x.size(1), x.element_size(), config)
    counts = _counts_from_prefix(rank_prefix_matrix)
    return _send_payload(comm, op, x, x_scales, topk_weights, is_token_in_rank, counts,
                         num_worst_tokens)


def _send_payload(comm, op, x, x_scales, topk_weights, is_token_in_rank, counts,
                  num_worst_tokens):
    """The cached dispatches' rows: ``(recv_x, recv_x_scales, recv_topk_weights)`` along a
    handle's routes (``counts``: ``_send_rows``'s), ``[N, 0]`` float32 for what is not sent."""
    recv_x = _send_rows(comm, op, x, is_token_in_rank, counts, num_worst_tokens)
    extras = [t for t in (x_scales, topk_weights) if t is not None]
    received = []
    if extras:
        packed, specs = _pack(extras)
        received = _unpack(
            _send_rows(comm, op, packed, is_token_in_rank, counts, num_worst_tokens), specs
        )
    num_rows = recv_x.size(0)
    empty = x.new_empty((num_rows, 0), dtype=torch.float32)
    recv_x_scales = received.pop(0) if x_scales is not None else empty
    recv_topk_weights = received.pop(0) if topk_weights is not None else empty.clone()
    return recv_x, recv_x_scales, recv_topk_weights


def combine(x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
            recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
            num_worst_tokens, config):
    op = "combine"
    meta.check_combine(
        x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
        num_worst_tokens, config,
    )
    comm = _comm(buffer, op, x.device)
    _agree(comm, op, hidden=x.size(1), x_dtype=_dtype_code(x),
           topk_weights=-1 if topk_weights is None else topk_weights.size(1),
           num_ranks=is_token_in_rank.size(1), num_worst_tokens=num_worst_tokens,
           num_sms=config[0])
    _check_num_ranks(comm, op, is_token_in_rank.size(1), "handle.is_token_in_rank.size(1)")
    _check_nvl_bytes(comm, op, x.size(1), x.element_size(), config)
    counts = _counts_from_prefix(rank_prefix_matrix)
    return _combine_rows(comm, op, x, topk_weights, (bias_0, bias_1), is_token_in_rank, counts,
                         num_worst_tokens)


def _combine_rows(comm, op, x, topk_weights, biases, is_token_in_rank, counts,
                  num_worst_tokens, per_node=None):
    """The combines' sums: ``(combined_x, combined_topk_weights)`` of the rows of ``x`` (and
    weights) returned to their sources (``counts``: ``_return_rows``'s), plus the biases;
    ``per_node``: grouped by node as ``_reduce_returned`` says."""
    acc_dtype = _accumulation_dtype(x.dtype)
    back, slot = _return_rows(comm, op, x, is_token_in_rank, counts, num_worst_tokens)
    acc = _reduce_returned(back, slot, is_token_in_rank, acc_dtype, per_node)
    for bias in biases:
        if bias is not None:
            acc = acc + bias.to(acc_dtype)
    num_tokens = is_token_in_rank.size(0)
    if topk_weights is None:
        combined_weights = x.new_zeros((num_tokens, 0), dtype=torch.float32)
    else:
        back_w, slot_w = _return_rows(
            comm, op, topk_weights, is_token_in_rank, counts, num_worst_tokens
        )
        combined_weights = _reduce_returned(
            back_w, slot_w, is_token_in_rank, topk_weights.dtype, per_node
        )
    return acc.to(x.dtype), combined_weights


# --- FP8 ----------------------------------------------------------------------------------

# A Python float multiplies a float32 tensor as float32(1/448), as DeepEP's kernel does.
_ONE_OVER_448 = 1.0 / 448.0
_FP8_MAX = 448.0


def _float_from_exponent(biased: torch.Tensor) -> torch.Tensor:
    """The float32 ``2**(biased - 127)`` built from its bits."""
    return (biased.to(torch.int32) << 23).view(torch.float32)


def per_token_cast_to_fp8(x, round_scale, use_ue8m0):
    meta.check_per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    num_tokens, hidden = x.shape
    groups = x.float().view(num_tokens, hidden // meta.FP8_GROUP, meta.FP8_GROUP)
    amax = groups.abs().amax(-1).clamp(min=1e-4)
    if round_scale:
        bits = (amax * _ONE_OVER_448).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)  # biased
        scale, scale_inv = _float_from_exponent(254 - exponent), _float_from_exponent(exponent)
    else:
        scale = torch.full_like(amax, _FP8_MAX) / amax  # a true division, not a reciprocal
        scale_inv = amax * _ONE_OVER_448
    values = (groups * scale.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX)
    x_fp8 = values.view(num_tokens, hidden).to(meta.FP8_DTYPE)
    if not use_ue8m0:
        return x_fp8, scale_inv
    exponent_bytes = ((scale_inv.view(torch.int32) >> 23) & 0xFF).view(
        num_tokens, hidden // (meta.FP8_GROUP * meta.UE8M0_PACK), meta.UE8M0_PACK
    )
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=x.device)
    packed = (exponent_bytes.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    return x_fp8, packed.to(torch.int32)  # low 32 bits: the little-endian packing


def unpack_scales(x_scales: torch.Tensor) -> torch.Tensor:
    """float32 ``scale_inv`` per 128-channel group, from float32 or UE8M0-packed int32."""
    if x_scales.dtype != torch.int32:
        return x_scales
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=x_scales.device)
    exponent_bytes = (x_scales.unsqueeze(-1) >> shifts) & 0xFF
    return _float_from_exponent(exponent_bytes).flatten(-2)


def per_token_cast_back(x_fp8, x_scales):
    """``[..., H]`` FP8 times its scales ``[..., S]`` (any strides) -> contiguous bf16
    ``[..., H]``."""
    meta.check_per_token_cast_back(x_fp8, x_scales)
    *lead, hidden = x_fp8.shape
    # A fresh contiguous float32 copy: the product below is written into it, so the result has
    # the fake's (contiguous) strides whatever the strides of the inputs.
    values = x_fp8.to(torch.float32, memory_format=torch.contiguous_format)
    groups = values.view(*lead, hidden // meta.FP8_GROUP, meta.FP8_GROUP)
    groups.mul_(unpack_scales(x_scales).unsqueeze(-1))
    return values.to(torch.bfloat16)


# --- low-latency mode ---------------------------------------------------------------------
#
# Dispatch sends each token once to every rank (an all-gather of fixed [M, ...] blocks) and the
# owner expands it to its experts. Combine sends back, for every (source token, owner rank),
# the rows of the token's distinct experts on that owner in ascending expert order: a fixed
# [M, min(K, L), H] block per peer. Both sides derive the position of a row in that block from
# data they hold, so any row order inside an expert (consistent with src_info/layout_range) works.


def _ll_comm(op, buffer, device, num_ranks, num_max, hidden, num_experts, **agreed):
    """The communicator of a low-latency call, after the ranks agreed on its shapes (and on
    ``agreed``: the op's own flags and sizes)."""
    comm = _comm(buffer, op, device)
    _agree(comm, op, num_ranks=num_ranks, num_max_dispatch_tokens_per_rank=num_max,
           hidden=hidden, num_experts=num_experts, **agreed)
    _check_num_ranks(comm, op, num_ranks, "num_ranks")
    if not comm.low_latency_mode:
        raise ValueError(
            f"deep_ep::{op}: buffer {comm.name!r} was not created with low_latency_mode=True"
        )
    needed = get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
    if needed > comm.num_rdma_bytes:
        raise ValueError(
            f"deep_ep::{op}: buffer {comm.name!r} has num_rdma_bytes={comm.num_rdma_bytes} but "
            f"num_max_dispatch_tokens_per_rank={num_max}, hidden={hidden}, "
            f"num_experts={num_experts} need {needed} (get_low_latency_rdma_size_hint)"
        )
    return comm


def _ll_rows(src_info, layout_range, num_max):
    """For every received row ``(l, j)``: ``valid``, source rank and source token."""
    num_local, num_rows = src_info.shape
    begin, count = layout_range >> 32, layout_range & 0xFFFFFFFF  # [L, R]
    row = torch.arange(num_rows, device=src_info.device).view(1, -1, 1)
    inside = (row >= begin.unsqueeze(1)) & (row < (begin + count).unsqueeze(1))  # [L, rows, R]
    valid = inside.any(-1)
    src_rank = inside.to(torch.int64).argmax(-1)
    src_token = src_info.to(torch.int64)
    valid &= (src_token >= 0) & (src_token < num_max)
    return valid, torch.where(valid, src_rank, 0), torch.where(valid, src_token, 0)


def _ll_positions_at_owner(valid, src_rank, src_token, num_ranks, num_max, width):
    """Slot of each row in the block sent back: rank of its expert among the token's experts here."""
    num_local = valid.size(0)
    present = valid.new_zeros((num_ranks * num_max + 1, num_local))
    local = torch.arange(num_local, device=valid.device).view(-1, 1).expand_as(valid)
    token = torch.where(valid, src_rank * num_max + src_token, num_ranks * num_max)
    # A device-side True: assigning a Python scalar would copy from the host (not capturable).
    present.index_put_((token.reshape(-1), local.reshape(-1)), valid.new_ones(()))
    position = present.to(torch.int64).cumsum(1) - 1  # [R*M + 1, L]
    slot = position[token, local]  # [L, rows]
    return torch.where(valid & (slot < width), token * width + slot, num_ranks * num_max * width)


def _ll_positions_at_source(topk_idx, num_local, num_max, width):
    """For each ``(t, k)``: flat index ``(owner * M + t) * width + slot`` and validity."""
    num_tokens, num_topk = topk_idx.shape
    valid = topk_idx >= 0
    owner = torch.where(valid, topk_idx // num_local, 0)
    earlier = torch.ones(num_topk, num_topk, dtype=torch.bool, device=topk_idx.device).tril(-1)
    same = topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)  # [T, K, K']
    first = valid & ~(same & earlier).any(2)  # first occurrence of each expert in the row
    below = (
        first.unsqueeze(1)
        & (owner.unsqueeze(2) == owner.unsqueeze(1))
        & (topk_idx.unsqueeze(1) < topk_idx.unsqueeze(2))
    )  # [T, K, K']: k' is a distinct expert of the same owner, lower than expert k
    slot = below.sum(2)
    token = torch.arange(num_tokens, device=topk_idx.device).unsqueeze(1)
    return (owner * num_max + token) * width + slot, valid, first


def _ll_width(num_topk, num_local):
    return max(1, min(num_topk, num_local))


def _low_latency_dispatch(op, x, topk_idx, buffer, num_ranks, num_max, num_experts, use_fp8,
                          round_scale, use_ue8m0):
    getattr(meta, f"check_{op}")(
        x, topk_idx, buffer, num_ranks, num_max, num_experts, use_fp8, round_scale, use_ue8m0
    )
    comm = _ll_comm(op, buffer, x.device, num_ranks, num_max, x.size(1), num_experts,
                    num_topk=topk_idx.size(1), x_dtype=_dtype_code(x), use_fp8=use_fp8,
                    round_scale=round_scale, use_ue8m0=use_ue8m0)
    _check_topk_range(op, topk_idx, num_experts)
    me, num_local, num_tokens = comm.rank, num_experts // num_ranks, x.size(0)
    payload = [*per_token_cast_to_fp8(x, round_scale, use_ue8m0)] if use_fp8 else [x]
    packed, specs = _pack(payload)
    block = packed.new_zeros((num_max, packed.size(1)))
    block[:num_tokens] = packed
    routing = topk_idx.new_full((num_max, topk_idx.size(1)), -1)
    routing[:num_tokens] = topk_idx
    all_rows = _all_gather(comm, op, block).view(num_ranks * num_max, -1)
    all_topk = _all_gather(comm, op, routing).view(num_ranks * num_max, -1)

    experts = me * num_local + torch.arange(num_local, device=x.device)
    member = (all_topk.unsqueeze(-1) == experts).any(1).t()  # [L, R*M], once per token
    rows = num_ranks * num_max
    seen = member.to(torch.int64).cumsum(1)
    wanted = torch.arange(1, rows + 1, device=x.device).expand(num_local, rows).contiguous()
    source = torch.searchsorted(seen.contiguous(), wanted)  # j-th member's (rank, token) row
    recv_count = member.sum(1)
    valid = torch.arange(rows, device=x.device) < recv_count.unsqueeze(1)
    source = torch.where(valid, source, 0)
    gathered = all_rows.index_select(0, source.reshape(-1)) * valid.reshape(-1, 1).to(torch.uint8)
    unpacked = _unpack(gathered, specs)

    recv_x, recv_x_scales, _, src_info, layout_range = meta.new_low_latency_dispatch_outputs(
        x, num_ranks, num_max, num_experts, use_fp8, use_ue8m0
    )
    recv_x.copy_(unpacked[0].view(recv_x.shape))
    if use_fp8:
        recv_x_scales.copy_(unpacked[1].view(recv_x_scales.shape))
    src_info.copy_(torch.where(valid, source % num_max, -1))
    per_source = member.view(num_local, num_ranks, num_max).sum(-1)
    begin = _exclusive_cumsum(per_source, 1)
    layout_range.copy_((begin << 32) | per_source)
    return recv_x, recv_x_scales, recv_count.to(torch.int32), src_info, layout_range


def low_latency_dispatch(x, topk_idx, buffer, num_ranks, num_max_dispatch_tokens_per_rank,
                         num_experts, use_fp8, round_scale, use_ue8m0):
    return _low_latency_dispatch(
        "low_latency_dispatch", x, topk_idx, buffer, num_ranks,
        num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
    )


def low_latency_dispatch_send(x, topk_idx, buffer, num_ranks, num_max_dispatch_tokens_per_rank,
                              num_experts, use_fp8, round_scale, use_ue8m0):
    # The reference finishes the whole exchange here; the receive half has nothing left to do.
    return _low_latency_dispatch(
        "low_latency_dispatch_send", x, topk_idx, buffer, num_ranks,
        num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
    )


def low_latency_dispatch_recv(recv_x, recv_x_scales, recv_count, src_info, layout_range,
                              cumulative_local_expert_recv_stats, buffer):
    meta.check_low_latency_dispatch_recv(recv_x, recv_x_scales, recv_count, src_info,
                                         layout_range, cumulative_local_expert_recv_stats, buffer)
    _registry.get(buffer)
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats.add_(recv_count)


def _ll_back_to_sources(op, comm, x, src_info, layout_range, num_max, num_topk):
    """Rows of ``x [L, R*M, H]`` back to their sources: ``[R(owner), M, width, H]`` blocks."""
    num_ranks, num_local = comm.num_ranks, x.size(0)
    width = _ll_width(num_topk, num_local)
    valid, src_rank, src_token = _ll_rows(src_info, layout_range, num_max)
    dest = _ll_positions_at_owner(valid, src_rank, src_token, num_ranks, num_max, width)
    send = x.new_zeros((num_ranks * num_max * width + 1, x.size(2)))
    send.index_copy_(0, dest.reshape(-1), x.reshape(-1, x.size(2)))
    return _all_to_all(comm, op, send[:-1]), width


def _ll_gather(op, x, topk_idx, src_info, layout_range, buffer, num_ranks, num_max,
               num_experts):
    """``[T, K, H]``: for each ``(t, k)`` the row of expert ``topk_idx[t, k]`` (0 where -1)."""
    comm = _ll_comm(op, buffer, x.device, num_ranks, num_max, x.size(2), num_experts,
                    num_topk=topk_idx.size(1), x_dtype=_dtype_code(x))
    _check_topk_range(op, topk_idx, num_experts)
    back, width = _ll_back_to_sources(
        op, comm, x, src_info, layout_range, num_max, topk_idx.size(1)
    )
    index, valid, _ = _ll_positions_at_source(topk_idx, num_experts // num_ranks, num_max, width)
    rows = back.index_select(0, torch.where(valid, index, 0).reshape(-1))
    rows = rows.view(*topk_idx.shape, x.size(2))
    return torch.where(valid.unsqueeze(-1), rows, 0)


def low_latency_gather(x, topk_idx, src_info, layout_range, buffer, num_ranks,
                       num_max_dispatch_tokens_per_rank, num_experts):
    op = "low_latency_gather"
    meta.check_low_latency_gather(x, topk_idx, src_info, layout_range, buffer, num_ranks,
                                  num_max_dispatch_tokens_per_rank, num_experts)
    return _ll_gather(
        op, x, topk_idx, src_info, layout_range, buffer, num_ranks,
        num_max_dispatch_tokens_per_rank, num_experts,
    )


def _low_latency_combine(op, x, topk_idx, topk_weights, src_info, layout_range, buffer,
                         num_ranks, num_max, num_experts):
    """Both combines and ``_out``, after their op's check."""
    rows = _ll_gather(
        op, x, topk_idx, src_info, layout_range, buffer, num_ranks, num_max, num_experts
    )
    acc_dtype = _accumulation_dtype(x.dtype, topk_weights.dtype)
    weights = torch.where(topk_idx >= 0, topk_weights, 0).to(acc_dtype)
    acc = x.new_zeros((topk_idx.size(0), x.size(2)), dtype=acc_dtype)
    for k in range(topk_idx.size(1)):  # top-k order, one rounding per multiply and add
        acc = acc + weights[:, k : k + 1] * rows[:, k].to(acc_dtype)
    return acc.to(x.dtype)


def low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks,
                        num_max_dispatch_tokens_per_rank, num_experts, zero_copy):
    meta.check_low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                   num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                                   zero_copy)
    return _low_latency_combine(
        "low_latency_combine", x, topk_idx, topk_weights, src_info, layout_range, buffer,
        num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
    )


def low_latency_combine_send(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                             num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                             zero_copy):
    meta.check_low_latency_combine_send(x, topk_idx, topk_weights, src_info, layout_range,
                                        buffer, num_ranks, num_max_dispatch_tokens_per_rank,
                                        num_experts, zero_copy)
    return _low_latency_combine(
        "low_latency_combine_send", x, topk_idx, topk_weights, src_info, layout_range, buffer,
        num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
    )


def low_latency_combine_recv(combined_x, topk_idx, topk_weights, buffer):
    meta.check_low_latency_combine_recv(combined_x, topk_idx, topk_weights, buffer)
    _registry.get(buffer)  # the reference send half already produced combined_x


def low_latency_combine_out(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                            num_ranks, num_max_dispatch_tokens_per_rank, num_experts, zero_copy,
                            out):
    meta.check_low_latency_combine_out(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                       num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                                       zero_copy, out)
    out.copy_(_low_latency_combine(
        "low_latency_combine_out", x, topk_idx, topk_weights, src_info, layout_range, buffer,
        num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
    ))


def low_latency_cached_dispatch(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                num_ranks, num_max_dispatch_tokens_per_rank, num_experts):
    """Row ``(e, slot of t)`` on the owner gets ``Σ_{k: topk_idx[t,k]=e} topk_weights[t,k]·x[t]``."""
    op = "low_latency_cached_dispatch"
    meta.check_low_latency_cached_dispatch(x, topk_idx, topk_weights, src_info, layout_range,
                                           buffer, num_ranks, num_max_dispatch_tokens_per_rank,
                                           num_experts)
    num_max, num_local = num_max_dispatch_tokens_per_rank, num_experts // num_ranks
    comm = _ll_comm(op, buffer, x.device, num_ranks, num_max, x.size(1), num_experts,
                    num_topk=topk_idx.size(1), x_dtype=_dtype_code(x))
    _check_topk_range(op, topk_idx, num_experts)
    width = _ll_width(topk_idx.size(1), num_local)
    index, valid, _ = _ll_positions_at_source(topk_idx, num_local, num_max, width)
    acc_dtype = _accumulation_dtype(x.dtype, topk_weights.dtype)
    weighted = torch.where(valid, topk_weights, 0).to(acc_dtype).unsqueeze(-1) * x.to(
        acc_dtype
    ).unsqueeze(1)  # [T, K, H]
    trash = num_ranks * num_max * width
    send = x.new_zeros((trash + 1, x.size(1)), dtype=acc_dtype)
    send.index_add_(0, torch.where(valid, index, trash).reshape(-1), weighted.reshape(-1, x.size(1)))
    back = _all_to_all(comm, op, send[:-1].to(x.dtype))
    valid_rows, src_rank, src_token = _ll_rows(src_info, layout_range, num_max)
    dest = _ll_positions_at_owner(valid_rows, src_rank, src_token, num_ranks, num_max, width)
    rows = back.index_select(0, torch.where(valid_rows, dest, 0).reshape(-1))
    return torch.where(valid_rows.reshape(-1, 1), rows, 0).view(
        num_local, num_ranks * num_max, x.size(1)
    )


def clean_low_latency_buffer(workspace, buffer, num_max_dispatch_tokens_per_rank, hidden,
                             num_experts):
    meta.check_clean_low_latency_buffer(workspace, buffer, num_max_dispatch_tokens_per_rank,
                                        hidden, num_experts)
    comm = _comm(buffer, "clean_low_latency_buffer", workspace.device)
    _agree(comm, "clean_low_latency_buffer",
           num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, hidden=hidden,
           num_experts=num_experts)
    workspace.zero_()
    _barrier(comm, "clean_low_latency_buffer")


# Every op has its reference here, under its own name (``register`` fails at import otherwise).
OPS = tuple(_library.OPS)


# --- the CUDA fallback of a missing extension ----------------------------------------------

# Ops with a CUDA kernel in a complete build: in deep_ep_ops._C, and in deep_ep_ops._C_nvshmem
# (from the op table).
CUDA_KERNEL_OPS = _library.kernel_ops(_library._NVLINK)
LOW_LATENCY_KERNEL_OPS = _library.kernel_ops(_library._NVSHMEM)


class CudaFallbackWarning(UserWarning):
    """A CUDA op runs this reference backend because its CUDA extension is missing or broken."""


_fallback_warned = False  # once per process


def cuda_fallback_reason(name: str):
    """Why CUDA op ``name`` is on the reference although a complete build has a kernel for it
    (the extension is not built, failed to load, or lacks NVSHMEM), or ``None`` when that is
    not so (a CPU-only torch, an op without a kernel in any build, the kernels loaded)."""
    if not torch.version.cuda:
        return None
    if name in CUDA_KERNEL_OPS or name in LOW_LATENCY_KERNEL_OPS:
        if not _build.HAS_CUDA_KERNELS:
            return f"the CUDA extension {_build.EXTENSION} is {_build.EXTENSION_ERROR}"
    if name in LOW_LATENCY_KERNEL_OPS and not _build.HAS_LOW_LATENCY_KERNELS:
        return (
            f"the NVSHMEM extension {_build.LOW_LATENCY_EXTENSION} is "
            f"{_build.LOW_LATENCY_EXTENSION_ERROR}"
        )
    return None


def warn_cuda_fallback(name: str) -> bool:
    """Warn (once per process) that CUDA op ``name`` fell back to the reference, if it did for
    a missing/broken extension; True when this call warned."""
    global _fallback_warned
    if _fallback_warned:
        return False
    reason = cuda_fallback_reason(name)
    if reason is None:
        return False
    _fallback_warned = True
    warnings.warn(
        f"deep_ep::{name} on CUDA tensors runs the NCCL reference backend, not the CUDA "
        f"kernels: {reason} (torch {torch.__version__}, CUDA {torch.version.cuda}). See "
        "deep_ep_ops.build_info(); rebuild against this torch with `pip install -e . "
        "--no-build-isolation` (a CUDA torch, nvcc and CUDA_HOME; NVSHMEM for the low-latency "
        "kernels). Warned once per process.",
        CudaFallbackWarning, stacklevel=2,
    )
    return True


def _warning_fallback(name: str, fn):
    """``fn`` registered for CUDA: warns when a CUDA tensor first takes this path."""

    @functools.wraps(fn)
    def cuda_reference(*args, **kwargs):
        if not _fallback_warned:
            warn_cuda_fallback(name)
        return fn(*args, **kwargs)

    return cuda_reference


def _noting_failures(name: str, fn):
    """``fn`` that, when it raises, records it on the buffer it names, so that peers waiting
    for this rank's exchange can say which rank raised what (``Communicator.failed``)."""
    index = [a.name for a in getattr(torch.ops.deep_ep, name).default._schema.arguments].index(
        "buffer")

    @functools.wraps(fn)
    def noting(*args, **kwargs):
        comm = _registry.lookup(args[index] if index < len(args) else kwargs.get("buffer"))
        calls = comm.num_calls if comm is not None else 0
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if comm is not None and not comm.broken:
                comm.failed(name, error, entered=comm.num_calls > calls)
            raise

    return noting


def agree_on_pinned_shapes(op: str, buffer: str, num_max_dispatch_tokens_per_rank: int,
                           hidden: int, num_experts: int) -> None:
    """The low-latency kernels' pinning call (the first on a buffer since its creation or
    ``clean_low_latency_buffer``; csrc/nvshmem/ops.cpp calls this): the ranks check, once
    per pin and over the buffer's own group, that they pin the same shapes, and all raise a
    ``ValueError`` naming the argument and each rank's value when they do not (the buffer stays
    unpinned and in step). Later calls must match the pin (a local check): no exchange on the
    kernels' fast path."""
    comm = _registry.get(buffer)
    comm.enter(op)
    _agree(comm, op,
           num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, hidden=hidden,
           num_experts=num_experts)


def register(lib: torch.library.Library, dispatch_key: str) -> list[str]:
    """Register this module's ops for ``dispatch_key`` where no kernel is registered yet.

    Returns the names registered (on CUDA: the ops the extension does not implement). On CUDA
    the ops a complete build has kernels for are wrapped to warn once (``warn_cuda_fallback``)
    when they run here; the reference functions the kernels' bindings call themselves
    (``set_fallback``: gloo groups, calls the kernels do not take) are the unwrapped ones.
    """
    missing = [
        name for name in OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"deep_ep::{name}", dispatch_key)
    ]
    for name in missing:
        fn = globals().get(name)
        if fn is None:
            raise AssertionError(f"deep_ep::{name} has no reference (deep_ep_ops.reference.{name})")
        if _library.takes_buffer(name):
            fn = _noting_failures(name, fn)
        if dispatch_key == "CUDA" and (name in CUDA_KERNEL_OPS or name in LOW_LATENCY_KERNEL_OPS):
            fn = _warning_fallback(name, fn)
        lib.impl(name, fn, dispatch_key)
    return missing


# The internode ops' reference (it builds on this module's helpers, hence imported last).
from .reference_internode import (  # noqa: E402
    internode_cached_dispatch, internode_capacity_dispatch, internode_combine,
    internode_dispatch,
)
