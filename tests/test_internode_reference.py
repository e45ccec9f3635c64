"""The internode ops (their reference, deep_ep_ops/reference_internode.py) against the oracle,
on gloo ranks split into emulated nodes (DEEP_EP_OPS_RANKS_PER_NODE): 4 ranks as 2 x 2 (also
in capacity mode), 8 ranks as 2 x 4, and the two degenerate splits 4 x 1 and 1 x 4."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
import internode_helpers
from deep_ep_ops import ops
from deep_ep_ops._library import INTERNODE_HANDLE_FIELDS
from deep_ep_ops.topology import RANKS_PER_NODE_ENV
from distributed import run_on_ranks
from internode_helpers import CONFIG, inputs as _inputs


def test_the_handle_type_has_the_schema_fields():
    assert ops.InternodeHandle._fields == INTERNODE_HANDLE_FIELDS


@pytest.mark.parametrize("num_ranks, per_node, num_worst_tokens", [
    (4, 2, 0), (4, 2, 64), (8, 4, 0), (4, 1, 0), (4, 4, 0),
])
def test_internode_reference_matches_oracle(num_ranks, per_node, num_worst_tokens):
    seed = num_ranks + per_node + num_worst_tokens
    results = run_on_ranks(num_ranks, internode_helpers.job, per_node, seed, num_worst_tokens,
                           timeout=120)
    internode_helpers.check(results, num_ranks, per_node, seed, num_worst_tokens)


@pytest.mark.parametrize("num_worst_tokens", [0, 64], ids=["data_dependent", "capacity"])
def test_internode_edge_cases_match_oracle(num_worst_tokens):
    """2 x 2 with a rank without tokens, a rank sending nothing, or one node receiving all."""
    for edge in internode_helpers.EDGES[1:]:
        results = run_on_ranks(4, internode_helpers.job, 2, 9, num_worst_tokens, "cpu", edge,
                               timeout=120)
        internode_helpers.check(results, 4, 2, 9, num_worst_tokens, edge)


def _grad_job(rank, num_ranks, per_node):
    """Gradients through internode dispatch, cached dispatch and combine on 2 x 2 nodes, and
    through the intranode ops on one node, for the same float64 data (float64 partial sums
    round to themselves: the two may differ only in the order of additions)."""
    results = {}
    for label, nodes in (("internode", per_node), ("intranode", num_ranks)):
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, num_ranks_per_node=nodes)
        inp = _inputs(rank, num_ranks, 7)
        x = inp["x"].double().requires_grad_()
        x2 = inp["x2"].double().requires_grad_()
        weights = inp["weights"].double().requires_grad_()
        bias = inp["bias"].double().requires_grad_()
        layout = ops.get_dispatch_layout(inp["topk"], inp["experts"], num_ranks,
                                         buffer.num_rdma_ranks)
        if label == "internode":
            out = ops.internode_dispatch(buffer.name, x, layout, inp["topk"], weights,
                                         config=CONFIG)
            cached = ops.internode_cached_dispatch(buffer.name, x2, out.handle, config=CONFIG)
            combined = ops.internode_combine(buffer.name, out.recv_x * 3, out.handle,
                                             topk_weights=out.recv_topk_weights, bias=bias,
                                             config=CONFIG)
        else:
            out = ops.dispatch(buffer.name, x, layout, inp["topk"], weights, config=CONFIG)
            cached = ops.cached_dispatch(buffer.name, x2, out.handle, config=CONFIG)
            combined = ops.combine(buffer.name, out.recv_x * 3, out.handle,
                                   topk_weights=out.recv_topk_weights, bias=bias, config=CONFIG)
        g = torch.Generator().manual_seed(rank)
        loss = ((out.recv_x * torch.rand(out.recv_x.shape, generator=g, dtype=torch.float64)).sum()
                + (cached[0] ** 2).sum() + (combined.combined_x ** 2).sum()
                + combined.combined_topk_weights.sum())
        loss.backward()
        results[label] = (x.grad, x2.grad, weights.grad, bias.grad)
        buffer.destroy()
    return results


def test_internode_gradients_match_intranode():
    results = run_on_ranks(4, _grad_job, 2, timeout=120)
    for rank, got in enumerate(results):
        for name, a, b in zip(("x", "x2", "weights", "bias"), got["internode"], got["intranode"]):
            assert a is not None and b is not None and a.abs().sum() > 0, (rank, name)
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (rank, name, (a - b).abs().max())


def _deepep_style_job(rank, num_ranks, per_node):
    """DeepEP's test_internode.py checks, through Buffer on emulated nodes: rows of rank i hold
    the value i and come in source-rank blocks that handle[-4] (recv_gbl_rank_prefix_sum)
    delimits; cached dispatch gives the same; combine of the received rows minus the biases,
    divided by the number of ranks each token reached, gives x back; capacity mode pads."""
    os.environ[RANKS_PER_NODE_ENV] = str(per_node)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26)
    finally:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    inp = _inputs(rank, num_ranks, 3)
    x = torch.ones(inp["x"].shape, dtype=torch.bfloat16) * rank
    per_rank, per_node_counts, per_expert, in_rank, _ = buffer.get_dispatch_layout(
        inp["topk"], inp["experts"])
    problems = []
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node_counts,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, recv_topk_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, topk_idx=inp["topk"], topk_weights=inp["weights"], **args)
    if not isinstance(handle, ops.InternodeHandle):
        problems.append(f"handle is a {type(handle).__name__}")
    prefix = handle[-4]
    start = 0
    for source in range(num_ranks):
        block = recv_x[start:int(prefix[source])]
        if not torch.equal(block, torch.full_like(block, source)):
            problems.append(f"rows from rank {source} are not all {source}")
        start = int(prefix[source])
    if start != recv_x.size(0) or counts != [int((recv_topk_idx == e).sum())
                                             for e in range(len(counts))]:
        problems.append("row count or per-expert counts")
    cached, *_ = buffer.dispatch(x, handle=handle)
    if not torch.equal(cached, recv_x):
        problems.append("cached dispatch differs")
    bias_0 = torch.ones(x.shape, dtype=torch.bfloat16)
    combined, _, _ = buffer.combine(recv_x, handle, bias=(bias_0, bias_0))
    reached = in_rank.sum(1, keepdim=True).clamp(min=1)
    back = (combined.float() - 2) / reached
    if not torch.equal(back[in_rank.any(1)], x.float()[in_rank.any(1)]):
        problems.append("combine does not give x back")
    worst = 4 * 16
    padded_x, padded_idx, _, empty, _, _ = buffer.dispatch(
        x, topk_idx=inp["topk"], topk_weights=inp["weights"], num_worst_tokens=worst, **args)
    if (empty != [] or padded_x.size(0) != worst or not torch.equal(padded_x[:start], recv_x)
            or not bool((padded_idx[start:] == -1).all())):
        problems.append("capacity mode")
    buffer.destroy()
    return problems


def test_buffer_takes_the_internode_ops_on_several_nodes():
    results = run_on_ranks(4, _deepep_style_job, 2, timeout=120)
    assert results == [[]] * 4, results
