"""The internode reference (deep_ep_ops/reference_internode.py: not registered as ops yet)
against the oracle, on gloo ranks split into emulated nodes (DEEP_EP_OPS_RANKS_PER_NODE): 4
ranks as 2 x 2 and 8 ranks as 2 x 4, data-dependent and capacity mode."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
import oracle
from deep_ep_ops import ops, reference_internode
from deep_ep_ops.topology import RANKS_PER_NODE_ENV
from distributed import RankPool

CONFIG = deep_ep.Config(num_sms=6).to_list()  # 3 channels
NUM_CHANNELS = 3
HIDDEN, TOPK = 64, 3


def _inputs(rank, num_ranks, seed):
    """Rank ``rank``'s tokens (a count of its own), routing, weights and rows to combine."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    num_tokens = 5 + (7 * rank + seed) % 9
    num_experts = 2 * num_ranks
    topk = oracle.random_topk(num_tokens, num_experts, TOPK, g, p_neg=0.2)
    return {
        "x": torch.randn(num_tokens, HIDDEN, generator=g).bfloat16(),
        "topk": topk, "weights": torch.rand(num_tokens, TOPK, generator=g),
        "x2": torch.randn(num_tokens, HIDDEN, generator=g).bfloat16(),
        "experts": num_experts, "bias": torch.randn(num_tokens, HIDDEN, generator=g).bfloat16(),
    }


def _job(rank, num_ranks, per_node, seed, num_worst_tokens):
    os.environ[RANKS_PER_NODE_ENV] = str(per_node)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26)
    finally:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    inp = _inputs(rank, num_ranks, seed)
    layout = ops.get_dispatch_layout(inp["topk"], inp["experts"], num_ranks,
                                     buffer.num_rdma_ranks)
    out = reference_internode.internode_dispatch(
        inp["x"], None, inp["topk"], inp["weights"], layout.num_tokens_per_rank,
        layout.is_token_in_rank, layout.num_tokens_per_expert, buffer.name, 1, num_worst_tokens,
        CONFIG)
    handle = out[5]
    cached = reference_internode.internode_cached_dispatch(inp["x2"], None, None, handle,
                                                           buffer.name, num_worst_tokens)
    # Rows to combine: a function of the received rows (any data would do; this keeps them
    # different per rank).
    rows = (out[0].float() * (rank + 1) / 3).bfloat16()
    combined = reference_internode.internode_combine(rows, out[3], inp["bias"], None, handle,
                                                     buffer.name, num_worst_tokens)
    buffer.destroy()
    return {"dispatch": out[:5], "handle": tuple(handle), "cached": cached[0], "rows": rows,
            "combined": combined}


@pytest.mark.parametrize("num_ranks, per_node, num_worst_tokens", [
    (4, 2, 0), (4, 2, 64), (8, 4, 0), (4, 1, 0), (4, 4, 0),
])
def test_internode_reference_matches_oracle(num_ranks, per_node, num_worst_tokens):
    seed = num_ranks + per_node + num_worst_tokens
    pool = RankPool(num_ranks)
    try:
        results = pool.run(_job, per_node, seed, num_worst_tokens, timeout=120)
    finally:
        pool.close()
    inputs = [_inputs(r, num_ranks, seed) for r in range(num_ranks)]
    xs = [i["x"] for i in inputs]
    num_experts = inputs[0]["experts"]
    want = oracle.dispatch(xs, [i["topk"] for i in inputs], [i["weights"] for i in inputs],
                           num_experts, num_worst_tokens=num_worst_tokens)
    routes = [oracle.layout(i["topk"], num_experts, num_ranks)["is_token_in_rank"]
              for i in inputs]
    handles = oracle.internode_handles(routes, per_node, NUM_CHANNELS, num_worst_tokens)
    cached = oracle.dispatch([i["x2"] for i in inputs], [i["topk"] for i in inputs], None,
                             num_experts, num_worst_tokens=num_worst_tokens)
    combined = oracle.internode_combine(
        [r["rows"] for r in results], want, [x.size(0) for x in xs], per_node,
        recv_topk_weights=[r["dispatch"][3] for r in results],
        bias_0=[i["bias"] for i in inputs])
    fields = reference_internode.InternodeHandle._fields
    for rank, got in enumerate(results):
        recv_x, _, recv_topk_idx, recv_topk_weights, per_expert = got["dispatch"]
        assert torch.equal(recv_x.view(torch.int16), want[rank]["recv_x"].view(torch.int16))
        assert torch.equal(recv_topk_idx, want[rank]["recv_topk_idx"])
        assert torch.equal(recv_topk_weights, want[rank]["recv_topk_weights"])
        assert torch.equal(per_expert, want[rank]["num_recv_tokens_per_expert"])
        for name, value in zip(fields, got["handle"]):
            expected = handles[rank][name]
            assert value.dtype == expected.dtype and torch.equal(value, expected), (rank, name,
                                                                                  value, expected)
        assert torch.equal(got["cached"].view(torch.int16),
                           cached[rank]["recv_x"].view(torch.int16)), rank
        cx, cw = got["combined"]
        assert torch.equal(cx.view(torch.int16),
                           combined[rank]["combined_x"].view(torch.int16)), rank
        assert torch.equal(cw, combined[rank]["combined_topk_weights"]), rank
