"""The reference of the internode ops (docs/DESIGN.md section 5, "Internode"): a buffer whose
ranks form several nodes. Rows, top-k, weights and scales are those of the intranode ops; the
handle is DeepEP's ten fields, in our definitions, and combine sums per node first (each
node's partial rounded to ``x.dtype``), then over the nodes.

Registered as the reference of the ``internode_*`` ops (also on CUDA until the internode
kernels exist); ``tests/test_internode_reference.py`` holds them against ``tests/oracle.py``.
"""

from __future__ import annotations

import torch

from . import reference
from .ops import InternodeHandle
from .reference import (
    _all_gather, _channel_prefix, _combine_rows, _comm, _counts_from_prefix,
    _send_payload, _send_rows,
)


def _my_counts(num_ranks: int, me: int, sent: torch.Tensor, received: torch.Tensor):
    """The ``[R, R]`` count matrix ``_send_rows`` / ``_return_rows`` read: only this rank's row
    (``sent``: rows to each rank) and column (``received``: rows from each rank) are used."""
    counts = sent.new_zeros((num_ranks, num_ranks), dtype=torch.int64)
    counts[me] = sent.to(torch.int64)
    counts[:, me] = received.to(torch.int64)
    return counts


def _handle(comm, op, is_token_in_rank, counts, recv_channel_prefix, recv_src_idx, send_head,
            num_worst_tokens, channels) -> InternodeHandle:
    """The internode handle of a dispatch whose intranode reference gave ``counts [R, R]``
    (rows from each rank to each rank), ``recv_channel_prefix``, ``recv_src_idx`` and
    ``send_head``."""
    me, num_ranks, per_node = comm.rank, comm.num_ranks, comm.num_nvl_ranks
    num_nodes, node, local = num_ranks // per_node, comm.rank // per_node, comm.rank % per_node
    num_tokens = is_token_in_rank.size(0)
    i32 = torch.int32
    in_node = is_token_in_rank.view(num_tokens, num_nodes, per_node).any(-1)  # [T, S]
    rdma_prefix = _channel_prefix(in_node, channels)  # [S, C]
    gbl_prefix = _channel_prefix(is_token_in_rank, channels)  # [R, C]
    everyone = _all_gather(comm, op, rdma_prefix)  # [R, S, C]
    # As forwarder: the ranks of my local index in every node send me their tokens for my node.
    recv_rdma_prefix = everyone[local::per_node, node]  # [S, C]
    to_node = (everyone[:, node, -1] if channels else everyone.new_zeros((num_ranks,)))
    to_node = to_node.view(num_nodes, per_node)  # [n, l]: tokens of rank (n, l) for my node
    recv_rdma_rank_prefix = to_node[:, local].cumsum(0)
    send_rdma_head = torch.where(in_node, in_node.to(torch.int64).cumsum(0) - 1, -1)

    # Per received row: its source token, and its index in the stream from its source to my
    # node (the source's send_rdma_head entry): its row among the rows its forwarder (my node,
    # the source's local index) holds from that source node, which the per-region combine of
    # the kernels indexes by (docs/DESIGN.md, "Internode").
    head_rows = _send_rows(comm, op, send_rdma_head.to(i32), is_token_in_rank, counts,
                           num_worst_tokens)  # [N, S]
    received = counts[:, me]
    row = torch.arange(head_rows.size(0), device=is_token_in_rank.device)
    meta_index = head_rows[:, node].to(torch.int64)
    is_real = row < received.sum()
    recv_src_meta = torch.where(is_real[:, None],
                                torch.stack([recv_src_idx.to(torch.int64), meta_index], 1), -1)

    # As forwarder: the row index at every rank of my node of each token I forward.
    ranks = torch.arange(num_ranks, device=row.device)
    to_forwarder = in_node[:, ranks // per_node] & (ranks % per_node == local)  # [T, R]
    forwarded = _all_gather(comm, op, to_forwarder.sum(0, dtype=torch.int64))  # [src, dst]
    forward_counts = _my_counts(num_ranks, me, forwarded[me], forwarded[:, me])
    nvl_rows = _send_rows(comm, op, send_head.to(i32), to_forwarder, forward_counts,
                          num_worst_tokens, "forwards more tokens (as the node's forwarder "
                          "of its local index)")  # [N_f, R]
    num_forwarded = forwarded[:, me].sum()
    nvl_real = torch.arange(nvl_rows.size(0), device=row.device) < num_forwarded
    send_nvl_head = torch.where(nvl_real[:, None],
                                nvl_rows[:, node * per_node:(node + 1) * per_node], -1)
    return InternodeHandle(
        is_token_in_rank, rdma_prefix.to(i32), gbl_prefix.to(i32), recv_rdma_prefix.to(i32),
        recv_rdma_rank_prefix.to(i32), recv_channel_prefix.to(i32),
        received.cumsum(0).to(i32), recv_src_meta.to(i32), send_rdma_head.to(i32),
        send_nvl_head.to(i32),
    )


def _check_nodes(comm, op: str, num_nodes: int, what: str) -> None:
    if num_nodes != comm.num_rdma_ranks:
        raise ValueError(f"deep_ep::{op}: {what} implies {num_nodes} nodes but buffer "
                         f"{comm.name!r} has {comm.num_rdma_ranks} ({comm.num_nvl_ranks} ranks "
                         "per node)")


def _internode_dispatch(op, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                        num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                        buffer, expert_alignment, num_worst_tokens, config):
    """Both internode dispatches, after their op's check: the intranode reference's rows and
    the internode handle, but ``is_token_in_rank`` (an input)."""
    comm = _comm(buffer, op, x.device)
    _check_nodes(comm, op, num_tokens_per_rdma_rank.size(0), "num_tokens_per_rdma_rank.size(0)")
    out = reference._dispatch(op, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                              is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                              num_worst_tokens, config)
    counts = _counts_from_prefix(out[5])
    handle = _handle(comm, op, is_token_in_rank, counts, out[7], out[8], out[9],
                     num_worst_tokens, reference.meta.num_channels(config))
    return (*out[:5], *handle[1:])


def internode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                       num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, buffer,
                       expert_alignment, config):
    reference.meta.check_internode_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
        is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, config)
    return _internode_dispatch(
        "internode_dispatch", x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
        num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, buffer,
        expert_alignment, 0, config)


def internode_capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                                buffer, expert_alignment, num_worst_tokens, config):
    reference.meta.check_internode_capacity_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
        is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens,
        config)
    return _internode_dispatch(
        "internode_capacity_dispatch", x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
        num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, buffer,
        expert_alignment, num_worst_tokens, config)


def _counts_of(comm, handle: InternodeHandle) -> torch.Tensor:
    received = handle.recv_gbl_rank_prefix_sum.to(torch.int64)
    received = torch.cat([received[:1], received[1:] - received[:-1]])
    sent = handle.is_token_in_rank.sum(0)
    return _my_counts(comm.num_ranks, comm.rank, sent, received)


def _handle_comm(op, x, handle: InternodeHandle, buffer, num_worst_tokens, config, **agreed):
    """The communicator of a call along ``handle``, after the ranks agreed on the call."""
    comm = _comm(buffer, op, x.device)
    reference._agree(comm, op, hidden=x.size(1), x_dtype=reference._dtype_code(x),
                     num_ranks=handle.is_token_in_rank.size(1),
                     num_worst_tokens=num_worst_tokens, num_sms=config[0], **agreed)
    reference._check_num_ranks(comm, op, handle.is_token_in_rank.size(1),
                               "handle.is_token_in_rank.size(1)")
    _check_nodes(comm, op, handle.rdma_channel_prefix_matrix.size(0),
                 "handle.rdma_channel_prefix_matrix.size(0)")
    return comm


def internode_cached_dispatch(x, x_scales, topk_weights, *handle_and_rest):
    """Dispatch ``x`` again along the handle's routes: ``(recv_x, recv_x_scales,
    recv_topk_weights)``."""
    op = "internode_cached_dispatch"
    *fields, buffer, num_worst_tokens, config = handle_and_rest
    reference.meta.check_internode_cached_dispatch(x, x_scales, topk_weights, *fields, buffer,
                                                   num_worst_tokens, config)
    handle = InternodeHandle(*fields)
    comm = _handle_comm(op, x, handle, buffer, num_worst_tokens, config,
                        x_scales=-1 if x_scales is None else x_scales.size(1),
                        topk_weights=-1 if topk_weights is None else topk_weights.size(1))
    return _send_payload(comm, op, x, x_scales, topk_weights, handle.is_token_in_rank,
                         _counts_of(comm, handle), num_worst_tokens)


def internode_combine(x, topk_weights, bias_0, bias_1, *handle_and_rest):
    """Sum the rows of ``x`` back on their source ranks, per node first (docs/DESIGN.md):
    ``(combined_x, combined_topk_weights)``."""
    op = "internode_combine"
    *fields, buffer, num_worst_tokens, config = handle_and_rest
    reference.meta.check_internode_combine(x, topk_weights, bias_0, bias_1, *fields, buffer,
                                           num_worst_tokens, config)
    handle = InternodeHandle(*fields)
    comm = _handle_comm(op, x, handle, buffer, num_worst_tokens, config,
                        topk_weights=-1 if topk_weights is None else topk_weights.size(1))
    return _combine_rows(comm, op, x, topk_weights, (bias_0, bias_1), handle.is_token_in_rank,
                         _counts_of(comm, handle), num_worst_tokens, comm.num_nvl_ranks)
