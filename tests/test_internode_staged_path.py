"""The staged internode path itself (deep_ep_ops/internode_staged.py), on CPU: its forward made
of all-gathers (``forward_by_exchange``, the same regions as the CUDA kernel's), then one
intranode ``deep_ep::dispatch`` per source node on a buffer of the node's ranks (here the
reference over a gloo group of the node), and the handle from those steps. Its outputs equal
the internode reference's, every field, at 4 ranks as 2 x 2 and 2 x 1 ... 8 as 2 x 4, with and
without top-k, BF16 and FP8 with scales; and its combine back along the handle (BF16, with the
weights, a bias) equals the reference's combine, and its cached dispatch the reference's. On
CUDA the same code runs with the forward kernel and
the intranode kernels (tests/test_cuda_internode.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
from deep_ep_ops import _registry, internode_staged, ops
from deep_ep_ops.topology import RANKS_PER_NODE_ENV
from distributed import run_on_ranks
from internode_helpers import CONFIG, inputs


def _node_buffer(per_node: int) -> str:
    """A communicator over this rank's node (every rank makes every node's gloo group)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(n, n + per_node))) for n in range(0, world, per_node)]
    group = groups[rank // per_node]
    comm = _registry.create(group, num_nvl_bytes=1 << 26, num_rdma_bytes=0,
                            low_latency_mode=False, device=torch.device("cpu"),
                            workspace=torch.empty(0, dtype=torch.uint8))
    return comm.name


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, t)
    return out


def _job(rank, num_ranks, per_node, seed, fp8, with_topk, edge=None, num_worst_tokens=0):
    os.environ[RANKS_PER_NODE_ENV] = str(per_node)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26)
    finally:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    num_nodes = num_ranks // per_node
    state = internode_staged.State(
        _node_buffer(per_node), rank, per_node, num_nodes,
        internode_staged.forward_by_exchange(_all_gather, per_node, num_nodes, rank),
        internode_staged.give_back_by_exchange(_all_gather, per_node, num_nodes, rank))
    inp = inputs(rank, num_ranks, seed, edge=edge)
    x, scales = inp["x"], None
    if fp8:  # FP8 rows with two scales each (the dispatch copies them as they are)
        x = x.to(torch.float8_e4m3fn)
        scales = torch.rand(x.size(0), 2, generator=torch.Generator().manual_seed(rank))
    topk = inp["topk"] if with_topk else None
    weights = inp["weights"] if with_topk else None
    layout = ops.get_dispatch_layout(inp["topk"], inp["experts"], num_ranks, num_nodes)
    want = ops.internode_dispatch(buffer.name, x, layout, topk, weights, x_scales=scales,
                                  expert_alignment=2, num_worst_tokens=num_worst_tokens,
                                  config=CONFIG)
    got = internode_staged.dispatch(
        state, x, scales, topk, weights, layout.is_token_in_rank,
        layout.num_tokens_per_expert, buffer.name, 2, CONFIG, num_worst_tokens)
    flat_want = (*want[:5], *want.handle[1:])
    pairs = [(a, b) for a, b in zip(got, flat_want)]
    # Cached dispatch of other rows along the staged handle, beside the reference's.
    staged_handle = ops.InternodeHandle(layout.is_token_in_rank, *got[5:])
    x2 = inp["x2"] if not fp8 else inp["x2"].to(torch.float8_e4m3fn)
    cached = internode_staged.cached_dispatch(state, x2, scales, staged_handle, buffer.name,
                                              num_worst_tokens, CONFIG, weights)
    cached_want = ops.internode_cached_dispatch(buffer.name, x2, want.handle, x_scales=scales,
                                                topk_weights=weights, config=CONFIG)
    pairs += list(zip(cached, cached_want))
    if not fp8:  # combine rows made from the received ones, back along the staged handle
        rows = (want.recv_x.float() * (rank + 1) / 3).bfloat16()
        weights = want.recv_topk_weights if with_topk else None
        handle = ops.InternodeHandle(layout.is_token_in_rank, *got[5:])
        combined = internode_staged.combine(state, rows, weights, inp["bias"], None, handle,
                                            buffer.name, CONFIG, num_worst_tokens)
        reference = ops.internode_combine(buffer.name, rows, want.handle, topk_weights=weights,
                                          bias=inp["bias"], config=CONFIG)
        pairs += list(zip(combined, reference))
    buffer.destroy()
    return [(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
             b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b) for a, b in pairs]


FIELDS = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
          "num_recv_tokens_per_expert", *ops.InternodeHandle._fields[1:])


@pytest.mark.parametrize("num_ranks, per_node", [(4, 2), (4, 1), (8, 4)])
@pytest.mark.parametrize("fp8, with_topk", [(False, True), (True, True), (False, False)],
                         ids=["bf16", "fp8", "routes_only"])
def test_staged_path_equals_the_reference(num_ranks, per_node, fp8, with_topk):
    _check(run_on_ranks(num_ranks, _job, per_node, 5 + num_ranks, fp8, with_topk, timeout=240),
           fp8)


@pytest.mark.parametrize("edge", ["empty rank", "nothing sent", "first node only"])
def test_staged_path_edge_cases_equal_the_reference(edge):
    _check(run_on_ranks(4, _job, 2, 3, False, True, edge, timeout=240), False)


@pytest.mark.parametrize("num_ranks, per_node", [(4, 2), (8, 4), (4, 1)])
@pytest.mark.parametrize("fp8, with_topk", [(False, True), (True, True), (False, False)],
                         ids=["bf16", "fp8", "routes_only"])
def test_staged_capacity_mode_equals_the_reference(num_ranks, per_node, fp8, with_topk):
    """Capacity mode: static regions of num_worst_tokens rows (stale rows past their length),
    capacity sub-dispatches, rows placed by index; the reference's padded outputs."""
    _check(run_on_ranks(num_ranks, _job, per_node, 11 + num_ranks, fp8, with_topk, None, 64,
                        timeout=240), fp8)


def _check(results, fp8):
    names = (*FIELDS, "cached recv_x", "cached recv_x_scales", "cached recv_topk_weights")
    names = names if fp8 else (*names, "combined_x", "combined_topk_weights")
    for rank, pairs in enumerate(results):
        assert len(pairs) == len(names)
        for name, (got, want) in zip(names, pairs):
            assert got.dtype == want.dtype and got.shape == want.shape, (rank, name, got, want)
            assert torch.equal(got, want), (rank, name, got, want)
