"""Internode dispatch staged on the intranode op (docs/DESIGN.md section 5, "Internode"), first
version: the forward stage (the NVSHMEM kernel on CUDA; ``forward_by_exchange`` elsewhere), then
per source node one ``deep_ep::dispatch`` over the node's ranks on the node's buffer, whose
sources are the forwarders with their region as ``x``, and the results put one after the other;
the ten-field handle from what those steps have (the formulas ``tests/staged_internode.py``
checks against the oracle). The region's records travel through the intranode op as one wide
row each: the payload's bytes, then its scales, its source token and its source's token count
(copied bit for bit), split again at the destination.

A buffer gets this path when ``attach`` is called for it (``Buffer`` does on CUDA when the
extension has the forward kernel); the internode ops take it for such a buffer in the
data-dependent mode and keep the reference otherwise (capacity mode, cached dispatch and
combine come with the next stages).
"""

from __future__ import annotations

import dataclasses
import math
import collections
from collections.abc import Callable
from typing import Optional

import torch

_ops = torch.ops.deep_ep


@dataclasses.dataclass
class Region:
    """What forwarder (m, l) holds from source node n: one record per token of the stream from
    (n, l) to node m, in source token order."""

    rows: torch.Tensor  # [N, row_bytes] uint8: the payload
    scales: torch.Tensor  # [N, 4 * S] uint8: its scales' bytes
    topk: Optional[torch.Tensor]  # [N, K] int64 global experts
    weights: Optional[torch.Tensor]  # [N, K] float32
    mask: torch.Tensor  # [N] int64: bit r = rank r receives the token
    src: torch.Tensor  # [N] int32: its index at the source
    src_tokens: torch.Tensor  # [N] int32: the source's token count
    per_expert: Optional[torch.Tensor] = None  # [E / S] int32: the source's
    # num_tokens_per_expert for this node's experts (None without)
    length: Optional[torch.Tensor] = None  # capacity mode: the rows in use (a device scalar;
    # the rows past it are stale), else None (every row)


# forward(buffer, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
#         config) ->
#   (send_rdma_head [T, S] int32, regions[n] for n in nodes)
Forward = Callable[..., tuple[torch.Tensor, list[Region]]]


@dataclasses.dataclass(frozen=True)
class State:
    node_buffer: str  # the node's NVLink buffer (its ranks: this node's)
    rank: int
    per_node: int
    num_nodes: int
    forward: Forward
    # give_back(buffer, rows per region, weights per region or Nones, the handle's
    #   recv_rdma_rank_prefix_sum, my tokens sent to each node, config) -> per node m
    #   (partials of my tokens sent there, by stream index; their weights or None)
    give_back: Optional[Callable] = None


_STATES: dict[str, State] = {}

# Calls the staged path ran, by op (the tests check that it, not the reference, ran).
calls: collections.Counter = collections.Counter()


def attach(buffer: str, state: State) -> None:
    _STATES[buffer] = state


def detach(buffer: str) -> None:
    _STATES.pop(buffer, None)


def state_of(buffer: str) -> Optional[State]:
    return _STATES.get(buffer)


def rdma_size_hint(num_max_tokens_per_rank: int, hidden_bytes: int, num_nodes: int,
                   num_topk: int = 8, num_experts: int = 256) -> int:
    """RDMA bytes the staged path needs for calls of up to ``num_max_tokens_per_rank`` tokens
    of at most ``hidden_bytes`` per row (BF16: ``2 * hidden``; an FP8 row and its scales take
    less) on ``num_nodes`` nodes: an upper bound of the forward's layout (one staging share and
    a region per source node, ``num_max_tokens_per_rank`` slots each, a slot being the row
    16-byte aligned and its record: scales, top-k, weights, routing bits, source index) and of
    the way back's (two shares per node, slots of a BF16 row and its weights), whichever is
    larger, with their counters and headers (csrc/nvshmem/internode.cu, internode_layout)."""
    def up(n: int, to: int) -> int:
        return -(-n // to) * to

    row = up(hidden_bytes, 16)
    num_scales = up(hidden_bytes, 256) // 256  # an FP8 row of hidden_bytes / 2: 128 per scale
    record = up(up(4 * num_scales, 8) + 12 * num_topk + 16, 16)
    forward = (num_nodes + 1) * (num_max_tokens_per_rank * (row + record) + 128)
    back = 2 * num_nodes * (num_max_tokens_per_rank * (row + up(4 * num_topk, 16)) + 128)
    headers = 4 * num_nodes * up(8 + 4 * num_experts, 128)
    return up(max(forward, back) + headers + (1 << 16), 1 << 20)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``[N, bytes of a row]`` uint8 (no rows included)."""
    width = math.prod(t.shape[1:]) * t.element_size()
    return t.contiguous().view(torch.uint8).reshape(t.size(0), width)


def _channels(src: torch.Tensor, num_tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """DeepEP's channel of token ``src`` of a source with ``num_tokens`` tokens."""
    per_channel = torch.clamp((num_tokens.to(torch.int64) + channels - 1) // channels, min=1)
    return src.to(torch.int64) // per_channel


def _prefix(counts: torch.Tensor) -> torch.Tensor:
    """``[targets, C]`` int32 inclusive prefix over channels."""
    return counts.cumsum(1).to(torch.int32)


def _per_channel(target: torch.Tensor, channel: torch.Tensor, num_targets: int,
                 channels: int) -> torch.Tensor:
    """``[num_targets, C]`` counts of the rows with (target, channel)."""
    counts = torch.zeros(num_targets * channels, dtype=torch.int64, device=target.device)
    counts.index_add_(0, target.to(torch.int64) * channels + channel,
                      torch.ones_like(channel))
    return counts.view(num_targets, channels)


def _placed(parts, targets, rows, fill):
    """``[rows, ...]``: the rows of every part at its targets (``rows``: a dump row, dropped);
    the other rows ``fill``."""
    first = parts[0]
    out = first.new_full((rows + 1, *first.shape[1:]), fill)
    out.index_copy_(0, torch.cat(targets), torch.cat(parts))
    return out[:rows]


def dispatch(state: State, x, x_scales, topk_idx, topk_weights, is_token_in_rank,
             num_tokens_per_expert, buffer, expert_alignment, config, num_worst_tokens=0):
    """The internode dispatch, data-dependent or (``num_worst_tokens`` > 0) capacity mode: its
    op's outputs, the rows, then the handle but ``is_token_in_rank``. In capacity mode every
    shape is static and nothing waits for the host: the regions are views of W =
    num_worst_tokens rows with their lengths on the device (a forwarder forwards at most W
    rows, as the reference requires), each sub-dispatch is a capacity dispatch of W rows, and
    the rows are placed by index (row-indexed outputs W rows, padding 0 / -1)."""
    L, S, me = state.per_node, state.num_nodes, state.rank
    node, local = divmod(me, L)
    R, T, device = L * S, x.size(0), x.device
    W = num_worst_tokens
    channels = config[0] // 2
    in_rank = is_token_in_rank.contiguous()
    head, regions = state.forward(buffer, x, x_scales, topk_idx, topk_weights, in_rank,
                                  num_tokens_per_expert, config, W)
    num_scales = 0 if x_scales is None else x_scales.size(1)
    row_bytes = x.size(1) * x.element_size()
    has_topk = topk_idx is not None
    has_experts = num_tokens_per_expert is not None
    E_node = num_tokens_per_expert.size(0) // S if has_experts else 0
    ranks_here = torch.arange(L, device=device) + node * L
    i64 = torch.int64

    subs, valid_in = [], []
    for region in regions:
        # The region's records as wide rows (even bytes: viewed as bfloat16, which the
        # intranode kernels copy bit for bit).
        wide = torch.cat([region.rows, region.scales, _bytes(region.src[:, None]),
                          _bytes(region.src_tokens[:, None])], 1)
        if wide.size(1) % 2:
            wide = torch.cat([wide, wide.new_zeros(wide.size(0), 1)], 1)
        # Routing within the node: the carried destination bits; the experts shifted to the
        # node's (others -1); the per-expert counts the source gave for the node's experts,
        # which the sub-dispatches sum over the forwarders as the flat dispatch sums them over
        # the sources. Rows past a static region's length route nowhere.
        valid = (torch.arange(region.mask.size(0), device=device) < region.length
                 if region.length is not None else torch.ones_like(region.mask, dtype=torch.bool))
        valid_in.append(valid)
        routes = ((region.mask[:, None] >> ranks_here) & 1).bool() & valid[:, None]
        per_rank = routes.sum(0, dtype=torch.int32)
        experts = None
        if has_topk:
            experts = torch.where((region.topk // E_node == node) & valid[:, None],
                                  region.topk - node * E_node, -1)
        args = (wide.view(torch.bfloat16), None, experts, region.weights, per_rank, routes,
                region.per_expert, state.node_buffer, 1)
        subs.append(_ops.capacity_dispatch(*args, W, config) if W else
                    _ops.dispatch(*args, config))

    # Rows here from each forwarder l of region n (its rank prefix matrix, column `local`), and
    # where the segments start: the segments of the source nodes in order.
    got = torch.stack([s[5][:, local].to(i64) for s in subs])  # [S, L] inclusive over l
    from_source = torch.diff(got, dim=1, prepend=got.new_zeros(S, 1)).reshape(R)
    seg_rows = got[:, -1]
    seg_start = seg_rows.cumsum(0) - seg_rows
    N = W if W else int(seg_rows.sum())  # data-dependent: the sub-dispatches' shapes
    targets, sources = [], []
    for n, s in enumerate(subs):
        j = torch.arange(s[0].size(0), device=device)
        targets.append(torch.where(j < seg_rows[n], seg_start[n] + j, N))
        sources.append(n * L + torch.searchsorted(got[n], j, right=True).clamp(max=L - 1))
    wide = _placed([s[0].view(torch.uint8) for s in subs], targets, N, 0)
    recv_x = wide[:, :row_bytes].contiguous().view(x.dtype).view(N, x.size(1))
    at = row_bytes + 4 * num_scales
    recv_x_scales = (wide[:, row_bytes:at].contiguous().view(x_scales.dtype).view(N, num_scales)
                     if num_scales else torch.zeros(N, 0, device=device))
    real = torch.arange(N, device=device) < seg_rows.sum()
    src = torch.where(real, wide[:, at:at + 4].contiguous().view(torch.int32).view(N), -1)
    src_tokens = wide[:, at + 4:at + 8].contiguous().view(torch.int32).view(N)
    recv_topk_idx = _placed([s[2] for s in subs], targets, N, -1)
    recv_topk_weights = _placed([s[3] for s in subs], targets, N, 0)
    per_expert = sum(s[4].to(i64) for s in subs)
    per_expert = (per_expert + expert_alignment - 1) // expert_alignment * expert_alignment
    per_expert = per_expert.to(torch.int32)

    # Per source and channel the first row here (rows by source, then channel).
    source_of_row = _placed(sources, targets, N, R)  # R: padding
    row_channel = torch.where(real, _channels(src.clamp(min=0), src_tokens.clamp(min=1),
                                              channels), 0)
    row_counts = _per_channel(source_of_row.clamp(max=R), row_channel, R + 1, channels)[:R]
    first_row = from_source.cumsum(0) - from_source
    recv_gbl_channel_prefix = (first_row[:, None] + row_counts.cumsum(1) - row_counts).to(
        torch.int32)
    forwarder_row = _placed([s[8].to(i64) for s in subs], targets, N, -1)
    recv_src_meta = torch.stack([src.to(i64), forwarder_row], 1).to(torch.int32)

    # As forwarder: my regions' lengths and channels, and where each of my rows went (at the
    # rows of region n: after the regions before it).
    lengths = torch.stack([v.sum() for v in valid_in])
    region_start = lengths.cumsum(0) - lengths
    N_f = W if W else int(lengths.sum())
    rdma_counts = torch.stack([  # the stale rows of a static region counted apart, dropped
        _per_channel((~v).to(i64), torch.where(v, _channels(r.src, r.src_tokens.clamp(min=1),
                                                            channels), 0), 2, channels)[0]
        for r, v in zip(regions, valid_in)])
    nvl_heads, nvl_targets, base = [], [], torch.zeros(L, dtype=i64, device=device)
    for n, (s, v) in enumerate(zip(subs, valid_in)):
        send_head = s[9].to(i64)
        nvl_heads.append(torch.where(send_head >= 0, send_head + base, -1))
        i = torch.arange(v.size(0), device=device)
        nvl_targets.append(torch.where(v, region_start[n] + i, N_f))
        base = base + s[5][L - 1].to(i64)  # rows each local rank got from this region
    send_nvl_head = _placed(nvl_heads, nvl_targets, N_f, -1).to(torch.int32)

    # As source: my own routing.
    # (No tensor from a host number: a CUDA graph may be capturing.)
    token_channel = torch.arange(T, device=device) // max(-(-T // channels), 1)
    node_rows = in_rank.view(T, S, L).any(2)
    rdma_prefix = _prefix(_counts_by(node_rows, token_channel, channels))
    gbl_prefix = _prefix(_counts_by(in_rank, token_channel, channels))
    return (
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert,
        rdma_prefix, gbl_prefix, _prefix(rdma_counts),
        lengths.cumsum(0).to(torch.int32), recv_gbl_channel_prefix,
        from_source.cumsum(0).to(torch.int32), recv_src_meta,
        head.to(torch.int32), send_nvl_head,
    )


def _counts_by(routes: torch.Tensor, channel: torch.Tensor, channels: int) -> torch.Tensor:
    """``[targets, C]``: tokens routed to each target (a bool column each) per channel."""
    counts = routes.new_zeros((channels, routes.size(1)), dtype=torch.int64)
    counts.index_add_(0, channel, routes.to(torch.int64))
    return counts.t()


def forward_by_exchange(comm_all_gather: Callable, per_node: int, num_nodes: int, rank: int):
    """A forward stage made of all-gathers (``comm_all_gather(tensor) -> list per rank``): the
    same regions as the kernel's, for running the staged path without it (CPU tests)."""

    def forward(buffer, x, x_scales, topk_idx, topk_weights, in_rank, num_tokens_per_expert,
                config, static_rows=0):
        L, S = per_node, num_nodes
        node, local = divmod(rank, L)
        T = x.size(0)
        node_rows = in_rank.view(T, S, L).any(2)
        head = torch.where(node_rows, node_rows.to(torch.int64).cumsum(0) - 1, -1).to(torch.int32)
        ranks = torch.arange(in_rank.size(1), device=x.device)
        fields = {
            "rows": _bytes(x), "scales": _bytes(x_scales) if x_scales is not None
            else torch.zeros(T, 0, dtype=torch.uint8, device=x.device),
            "topk": topk_idx, "weights": topk_weights,
            "mask": (in_rank.to(torch.int64) << ranks).sum(1),
            "src": torch.arange(T, dtype=torch.int32, device=x.device),
            "src_tokens": torch.full((T,), T, dtype=torch.int32, device=x.device),
            "node_rows": node_rows,
        }
        gathered = {k: (comm_all_gather(v) if v is not None else None) for k, v in fields.items()}
        experts = None if num_tokens_per_expert is None else comm_all_gather(num_tokens_per_expert)
        regions = []
        for n in range(S):
            s = n * L + local
            take = gathered["node_rows"][s][:, node]
            region = Region(*(
                None if gathered[k] is None else gathered[k][s][take]
                for k in ("rows", "scales", "topk", "weights", "mask", "src", "src_tokens")))
            if experts is not None:
                e_node = experts[s].numel() // S
                region.per_expert = experts[s][node * e_node:(node + 1) * e_node].contiguous()
            if static_rows:
                region = _stale_padded(region, static_rows, n, rank)
            regions.append(region)
        return head, regions

    return forward


def _stale_padded(region: Region, rows: int, node: int, rank: int) -> Region:
    """``region`` as the kernel's static view of ``rows`` rows: its records, then stale ones
    (random here, so that a row past the length that leaks shows)."""
    count = region.src.numel()
    if count > rows:
        raise ValueError(f"deep_ep::internode_capacity_dispatch: rank {rank} forwards {count} "
                         f"tokens of node {node}, more than num_worst_tokens={rows}")
    g = torch.Generator().manual_seed(1000 * rank + node)

    def padded(t):
        if t is None:
            return None
        stale = torch.randint(0, 64, (rows - count, *t.shape[1:]), generator=g).to(t.dtype)
        return torch.cat([t, stale.to(t.device)])

    return Region(padded(region.rows), padded(region.scales), padded(region.topk),
                  padded(region.weights), padded(region.mask), padded(region.src),
                  padded(region.src_tokens), region.per_expert,
                  torch.tensor(count, device=region.src.device))


def forward_by_kernel(memory: torch.Tensor, per_node: int, num_nodes: int):
    """The forward stage of the NVSHMEM kernel (``_C_nvshmem.internode_forward``) on the
    buffer's symmetric ``memory``: the regions as views of it (read before this rank's next
    forward, which frees them for the sources only then). Reads the regions' lengths on the
    host (the data-dependent dispatch waits for its counts anyway)."""
    from . import _build

    def forward(buffer, x, x_scales, topk_idx, topk_weights, in_rank, num_tokens_per_expert,
                config, static_rows=0):
        head, _, off = _build._C_nvshmem.internode_forward(
            buffer, x.contiguous(), x_scales, topk_idx, topk_weights, in_rank,
            num_tokens_per_expert, per_node, config[0])
        stride, slots, meta_bytes = off["row_stride"], off["slots"], off["meta_bytes"]
        num_scales = 0 if x_scales is None else x_scales.size(1)
        num_topk = (topk_idx.size(1) if topk_idx is not None else
                    topk_weights.size(1) if topk_weights is not None else 0)
        headers = memory[off["headers"]:off["headers"] + off["header_stride"] * num_nodes]
        headers = headers.view(num_nodes, off["header_stride"])
        if static_rows:  # capacity mode: static views, the lengths stay on the device
            if static_rows > slots:
                raise ValueError(f"deep_ep::internode_capacity_dispatch: buffer {buffer!r} "
                                 f"holds {slots} tokens per region for these rows, "
                                 f"num_worst_tokens is {static_rows}")
        else:
            headers = headers.cpu()  # waits for the kernel: the data-dependent sizes
            # A peer that never came: the kernel's timeout, raised here (not garbage sizes).
            _build._C_nvshmem.check_device_errors(x.device.index)
        regions = []
        for n in range(num_nodes):
            length = headers[n, :8].view(torch.int64)[0] & 0xFFFFFFFF
            rows = static_rows or int(length)
            base = off["shares"] + (1 + n) * off["share_bytes"]
            metas_at = base + slots * stride
            metas = memory[metas_at:metas_at + rows * meta_bytes].view(rows, meta_bytes)

            def field(offset, width, count, dtype):
                return metas[:, offset:offset + width * count].contiguous().view(dtype)

            e_node = off["experts_per_node"]
            regions.append(Region(
                rows=memory[base:base + rows * stride].view(rows, stride)[:, :off["row_bytes"]],
                scales=metas[:, off["meta_scales"]:off["meta_scales"] + 4 * num_scales],
                topk=(field(off["meta_topk"], 8, num_topk, torch.int64)
                      if topk_idx is not None else None),
                weights=(field(off["meta_weights"], 4, num_topk, torch.float32)
                         if topk_weights is not None else None),
                mask=field(off["meta_mask"], 8, 1, torch.int64).view(rows),
                src=field(off["meta_src"], 4, 1, torch.int32).view(rows),
                src_tokens=field(off["meta_src_tokens"], 4, 1, torch.int32).view(rows),
                per_expert=(headers[n, 8:8 + 4 * e_node].view(torch.int32).to(x.device)
                            if num_tokens_per_expert is not None else None),
                length=length if static_rows else None,
            ))
        return head, regions

    return forward


def _takes(state, x, x_scales, topk_idx, topk_weights) -> bool:
    """Calls this version runs (else the reference): CUDA tensors, 4-byte scales, float32
    weights beside top-k (the forward records carry 4-byte words)."""
    return (
        state is not None and x.is_cuda and x.dim() == 2
        and (x_scales is None or x_scales.element_size() == 4)
        and (topk_idx is None) == (topk_weights is None)
        and (topk_weights is None or topk_weights.dtype == torch.float32)
    )


def internode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                       num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, buffer,
                       expert_alignment, config):
    """``deep_ep::internode_dispatch`` on CUDA: the staged path on a buffer attached here,
    the reference otherwise."""
    from . import reference, reference_internode

    state = state_of(buffer)
    if not _takes(state, x, x_scales, topk_idx, topk_weights):
        return reference_internode.internode_dispatch(
            x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
            is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, config)
    reference.meta.check_internode_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
        is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, config)
    calls["internode_dispatch"] += 1
    return dispatch(state, x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                    num_tokens_per_expert, buffer, expert_alignment, config)


def internode_capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                                buffer, expert_alignment, num_worst_tokens, config):
    """``deep_ep::internode_capacity_dispatch`` on CUDA: the staged path (no host sync) on a
    buffer attached here, the reference otherwise."""
    from . import reference, reference_internode

    state = state_of(buffer)
    if not _takes(state, x, x_scales, topk_idx, topk_weights):
        return reference_internode.internode_capacity_dispatch(
            x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
            is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens,
            config)
    reference.meta.check_internode_capacity_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
        is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens,
        config)
    calls["internode_capacity_dispatch"] += 1
    return dispatch(state, x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                    num_tokens_per_expert, buffer, expert_alignment, config, num_worst_tokens)


def internode_cached_dispatch(x, x_scales, topk_weights, *handle_and_rest):
    """``deep_ep::internode_cached_dispatch`` on CUDA: the staged path on a buffer attached
    here (float32 weights), the reference otherwise."""
    from . import reference, reference_internode
    from .ops import InternodeHandle

    *fields, buffer, num_worst_tokens, config = handle_and_rest
    state = state_of(buffer)
    if (not _takes(state, x, x_scales, None, None)
            or (topk_weights is not None and topk_weights.dtype != torch.float32)):
        return reference_internode.internode_cached_dispatch(x, x_scales, topk_weights,
                                                             *handle_and_rest)
    reference.meta.check_internode_cached_dispatch(x, x_scales, topk_weights, *fields, buffer,
                                                   num_worst_tokens, config)
    calls["internode_cached_dispatch"] += 1
    return cached_dispatch(state, x, x_scales, InternodeHandle(*fields), buffer,
                           num_worst_tokens, config, topk_weights)


def internode_combine(x, topk_weights, bias_0, bias_1, *handle_and_rest):
    """``deep_ep::internode_combine`` on CUDA: the staged path on a buffer attached here (for a
    handle of the data-dependent mode), the reference otherwise."""
    from . import reference, reference_internode
    from .ops import InternodeHandle

    *fields, buffer, num_worst_tokens, config = handle_and_rest
    state = state_of(buffer)
    if (state is None or state.give_back is None or not x.is_cuda
            or (topk_weights is not None and topk_weights.dtype != torch.float32)):
        return reference_internode.internode_combine(x, topk_weights, bias_0, bias_1,
                                                     *handle_and_rest)
    reference.meta.check_internode_combine(x, topk_weights, bias_0, bias_1, *fields, buffer,
                                           num_worst_tokens, config)
    calls["internode_combine"] += 1
    return combine(state, x, topk_weights, bias_0, bias_1, InternodeHandle(*fields), buffer,
                   config, num_worst_tokens)


def register(lib: torch.library.Library) -> list[str]:
    """Register the staged ops for CUDA (before the reference fills the rest)."""
    from . import reference

    ops = {"internode_dispatch": internode_dispatch,
           "internode_capacity_dispatch": internode_capacity_dispatch,
           "internode_cached_dispatch": internode_cached_dispatch,
           "internode_combine": internode_combine}
    for name, fn in ops.items():
        lib.impl(name, reference._noting_failures(name, fn), "CUDA")
    return list(ops)


# --- combine -----------------------------------------------------------------------------------
#
# Backwards along the stages: per source node n, one intranode ``deep_ep::combine`` over the
# node's ranks of the rows of segment n here to the forwarders (each region row's sum over the
# node's ranks in ascending order, rounded once to x's dtype: the node's partial), with the
# intranode handle of that sub-dispatch rebuilt from the ten fields; then the partials go back
# to their source ranks (``State.give_back``) and each source sums, per token, the partials of
# the nodes it went to in ascending node order (fp32, fp64 for fp64 x), adds the biases and
# rounds once.

def _sub_handle(handle, n, L, local, channels, static_rows=0):
    """The intranode handle of sub-dispatch ``n`` (segment n here, region n at my forwarder
    role) from the ten internode fields, as ``deep_ep::combine`` and ``cached_dispatch`` read
    it: the rank prefix matrix's column here (rows from each forwarder) and my row (rows I
    sent each local rank, my first one at slot 0); send_head my rows' places here (in the
    segment) and, for the other local ranks, each row's slot among mine to that rank; the
    channel matrices (read by neither) 0. Returns it with the indices of the segment's rows
    here (and which of them are real). ``static_rows`` (capacity mode): the segment and the
    region as ``static_rows`` rows each, the bounds on the device (no host read)."""
    received = handle.recv_gbl_rank_prefix_sum.to(torch.int64)
    device = received.device
    before = received[n * L - 1] if n else received.new_zeros(())
    seg = received[n * L:(n + 1) * L] - before  # inclusive prefix over the forwarders
    regions = handle.recv_rdma_rank_prefix_sum.to(torch.int64)
    r0 = regions[n - 1] if n else regions.new_zeros(())
    if static_rows:
        i = torch.arange(static_rows, device=device)
        rows, real = (before + i).clamp(max=static_rows - 1), i < seg[-1]
        region_rows, region_real = (r0 + i).clamp(max=static_rows - 1), i < regions[n] - r0
    else:
        first_row, last_row = int(before), int(seg[-1] + before)
        rows = torch.arange(first_row, last_row, device=device)
        real = torch.ones_like(rows, dtype=torch.bool)
        region_rows = torch.arange(int(r0), int(regions[n]), device=device)
        region_real = torch.ones_like(region_rows, dtype=torch.bool)
    head = torch.where(region_real[:, None], handle.send_nvl_head[region_rows].to(torch.int64), -1)
    sent = head >= 0
    first = torch.where(sent, head, torch.iinfo(torch.int64).max).amin(0) if head.numel() else \
        torch.zeros(L, dtype=torch.int64, device=device)
    relative = torch.where(sent, head - first, -1)
    relative[:, local] = torch.where(sent[:, local], head[:, local] - before, -1)
    prefix = torch.zeros(L, L, dtype=torch.int64, device=device)
    prefix[local] = sent.sum(0)
    prefix[:, local] = seg
    zeros = torch.zeros(L, channels, dtype=torch.int32, device=device)
    src = torch.where(real, handle.recv_src_meta[rows, 1], -1)
    sub = (prefix.to(torch.int32), zeros, zeros.clone(), src, sent, relative.to(torch.int32))
    return sub, rows, real


def cached_dispatch(state: State, x, x_scales, handle, buffer, num_worst_tokens, config,
                    topk_weights=None):
    """The internode cached dispatch of ``x`` (with ``x_scales``, ``topk_weights``) along
    ``handle``: the forward of the new rows along the handle's routes, then per source node
    one intranode cached dispatch with the sub-handle; ``(recv_x, recv_x_scales,
    recv_topk_weights)``, rows as the handle's. Capacity mode (``num_worst_tokens``): static
    shapes throughout, no host read."""
    L, W = state.per_node, num_worst_tokens
    local = state.rank % L
    channels = config[0] // 2
    _, regions = state.forward(buffer, x, x_scales, None, topk_weights,
                               handle.is_token_in_rank.contiguous(), None, config, W)
    num_scales = 0 if x_scales is None else x_scales.size(1)
    row_bytes = x.size(1) * x.element_size()
    parts, weight_parts, targets = [], [], []
    received = handle.recv_gbl_rank_prefix_sum.to(torch.int64)
    N = W or int(received[-1])
    for n, region in enumerate(regions):
        wide = torch.cat([region.rows, region.scales], 1)
        if wide.size(1) % 2:
            wide = torch.cat([wide, wide.new_zeros(wide.size(0), 1)], 1)
        sub, rows, real = _sub_handle(handle, n, L, local, channels, W)
        out = _ops.cached_dispatch(wide.view(torch.bfloat16), None, region.weights, *sub,
                                   state.node_buffer, W, config)
        parts.append(out[0].view(torch.uint8))
        weight_parts.append(out[2])
        targets.append(torch.where(real, rows, N))
    wide = _placed(parts, targets, N, 0)
    recv_topk_weights = _placed(weight_parts, targets, N, 0)
    recv_x = wide[:, :row_bytes].contiguous().view(x.dtype).view(N, x.size(1))
    recv_x_scales = (wide[:, row_bytes:row_bytes + 4 * num_scales].contiguous()
                     .view(x_scales.dtype).view(N, num_scales)
                     if num_scales else torch.zeros(N, 0, device=x.device))
    return recv_x, recv_x_scales, recv_topk_weights


def combine(state: State, x, topk_weights, bias_0, bias_1, handle, buffer, config,
            num_worst_tokens=0):
    """The internode combine: ``(combined_x, combined_topk_weights)``. Capacity mode
    (``num_worst_tokens``: the handle's): static shapes throughout, no host read."""
    L, S, W = state.per_node, state.num_nodes, num_worst_tokens
    local = state.rank % L
    channels = config[0] // 2
    partials = []
    for n in range(S):
        sub, rows, real = _sub_handle(handle, n, L, local, channels, W)
        weights = None if topk_weights is None else topk_weights[rows]
        partials.append(_ops.combine(x[rows], weights, None, None, *sub, state.node_buffer, W,
                                     config))
    # At the source: per node m, the partials of my tokens sent there, by stream index (at
    # most my token count of them: the static bound).
    T = handle.is_token_in_rank.size(0)
    head = handle.send_rdma_head.to(torch.int64)
    sent = [T] * S if W else (head >= 0).sum(0).tolist()
    returned = state.give_back(buffer, [p[0] for p in partials],
                               [p[1] if topk_weights is not None else None for p in partials],
                               handle.recv_rdma_rank_prefix_sum.contiguous(), sent, config)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = torch.zeros(T, x.size(1), dtype=acc, device=x.device)
    K = 0 if topk_weights is None else topk_weights.size(1)
    wtotal = torch.zeros(T, K, dtype=torch.float32 if topk_weights is None or
                         topk_weights.dtype != torch.float64 else torch.float64, device=x.device)
    for m, (rows, weights) in enumerate(returned):
        to_m = head[:, m] >= 0
        at = head[:, m].clamp(min=0)
        if rows.size(0):
            total += torch.where(to_m[:, None], rows[at].to(acc), 0)
            if weights is not None:
                wtotal += torch.where(to_m[:, None], weights[at].to(wtotal.dtype), 0)
    for bias in (bias_0, bias_1):
        if bias is not None:
            total = total + bias.to(acc)
    return total.to(x.dtype), wtotal


def give_back_by_exchange(comm_all_gather: Callable, per_node: int, num_nodes: int, rank: int):
    """The partials' way back made of all-gathers: forwarder (m, l)'s partials of region n go
    to source (n, l), which gets them per node m in its stream order (CPU tests)."""

    def give_back(buffer, rows, weights, region_prefix, sent_per_node, config):
        L, S = per_node, num_nodes
        node, local = divmod(rank, L)
        gathered = comm_all_gather(torch.cat([r.flatten() for r in rows]) if rows else None)
        sizes = comm_all_gather(torch.tensor([r.numel() for r in rows]))
        wgathered = None if weights[0] is None else comm_all_gather(
            torch.cat([w.flatten() for w in weights]))
        wsizes = None if weights[0] is None else comm_all_gather(
            torch.tensor([w.numel() for w in weights]))
        out = []
        for m in range(S):
            f = m * L + local  # my forwarder in node m
            at = int(sizes[f][:node].sum())
            part = gathered[f][at:at + int(sizes[f][node])].view(-1, rows[0].size(1))
            w = None
            if wgathered is not None:
                wat = int(wsizes[f][:node].sum())
                w = wgathered[f][wat:wat + int(wsizes[f][node])].view(part.size(0),
                                                                      weights[0].size(1))
            out.append((part, w))
        return out

    return give_back


def give_back_by_kernel(memory: torch.Tensor, per_node: int, num_nodes: int, rank: int):
    """The partials' way back through the NVSHMEM kernel (``_C_nvshmem.internode_return``):
    each region's partials copied into its staging share of the symmetric ``memory``, the
    kernel's puts, then my receive shares read (per node m, as many rows as I sent there)."""
    from . import _build

    def give_back(buffer, rows, weights, region_prefix, sent_per_node, config):
        nvshmem = _build._C_nvshmem
        width = rows[0].size(1) * rows[0].element_size()
        K = 0 if weights[0] is None else weights[0].size(1)
        off = nvshmem.internode_return_layout(buffer, width, 4 * K, per_node)
        stride, share = off["row_stride"], off["share_bytes"]
        wstride = (4 * K + 15) // 16 * 16

        def rows_view(base, count):
            return memory[base:base + count * stride].view(count, stride)[:, :width]

        def weights_view(base, count):
            at = base + off["weights"]
            return memory[at:at + count * wstride].view(count, wstride)[:, :4 * K]

        for n, part in enumerate(rows):
            if part.size(0) > off["slots"]:
                raise ValueError(f"deep_ep::internode_combine: buffer {buffer!r} holds "
                                 f"{off['slots']} rows per share for rows of {width} bytes, "
                                 f"region {n} has {part.size(0)}")
            base = off["shares"] + n * share
            rows_view(base, part.size(0)).copy_(_bytes(part))
            if K:
                weights_view(base, part.size(0)).copy_(_bytes(weights[n]))
        if max(sent_per_node, default=0) > off["slots"]:
            raise ValueError(f"deep_ep::internode_combine: buffer {buffer!r} holds "
                             f"{off['slots']} rows per share for rows of {width} bytes, a "
                             f"source gets up to {max(sent_per_node)}")
        nvshmem.internode_return(buffer, region_prefix, width, 4 * K, per_node, config[0])
        out = []
        for m in range(num_nodes):
            count = int(sent_per_node[m])
            base = off["shares"] + (num_nodes + m) * share
            part = rows_view(base, count).contiguous().view(rows[0].dtype).view(count,
                                                                              rows[0].size(1))
            w = (weights_view(base, count).contiguous().view(torch.float32).view(count, K)
                 if K else None)
            out.append((part, w))
        return out

    return give_back
