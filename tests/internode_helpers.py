"""The internode ops' semantic job and its comparison with the oracle, shared by the CPU test
(tests/test_internode_reference.py, gloo ranks) and the GPU test (tests/test_cuda_internode.py,
CUDA tensors): every rank's inputs are rebuilt from a seed, so the test process can run the
oracle on all of them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
import oracle
from deep_ep_ops import ops
from deep_ep_ops.topology import RANKS_PER_NODE_ENV

CONFIG = deep_ep.Config(num_sms=6).to_list()  # 3 channels
NUM_CHANNELS = 3
HIDDEN, TOPK = 64, 3


# Edge cases of the routing: rank 1 without tokens; rank 0 routing every token nowhere; every
# expert of the first node only (the other nodes receive nothing and forward nothing).
EDGES = (None, "empty rank", "nothing sent", "first node only")


def inputs(rank, num_ranks, seed, device="cpu", edge=None):
    """Rank ``rank``'s tokens (a count of its own), routing, weights and rows to combine."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    num_tokens = 0 if edge == "empty rank" and rank == 1 else 5 + (7 * rank + seed) % 9
    num_experts = 2 * num_ranks
    topk = oracle.random_topk(num_tokens, num_experts, TOPK, g, p_neg=0.2)
    if edge == "nothing sent" and rank == 0:
        topk.fill_(-1)
    if edge == "first node only":  # experts 0..3 live on ranks 0 and 1: the first node
        topk = torch.where(topk >= 0, topk % 4, -1)
    made = {
        "x": torch.randn(num_tokens, HIDDEN, generator=g).bfloat16(),
        "topk": topk, "weights": torch.rand(num_tokens, TOPK, generator=g),
        "x2": torch.randn(num_tokens, HIDDEN, generator=g).bfloat16(),
        "bias": torch.randn(num_tokens, HIDDEN, generator=g).bfloat16(),
    }
    return {**{k: v.to(device) for k, v in made.items()}, "experts": num_experts}


def job(rank, num_ranks, per_node, seed, num_worst_tokens, device="cpu", edge=None,
        num_rdma_bytes=0):
    """One rank: internode dispatch, cached dispatch and combine on a buffer of ``per_node``
    ranks per node; the results on the CPU. ``num_rdma_bytes``: the buffer's (on CUDA, with
    the extension's internode kernels, the staged path's memory)."""
    os.environ[RANKS_PER_NODE_ENV] = str(per_node)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, num_rdma_bytes)
    finally:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    from deep_ep_ops import internode_staged

    calls_before = dict(internode_staged.calls)
    inp = inputs(rank, num_ranks, seed, device, edge)
    layout = ops.get_dispatch_layout(inp["topk"], inp["experts"], num_ranks,
                                     buffer.num_rdma_ranks)
    out = ops.internode_dispatch(buffer.name, inp["x"], layout, inp["topk"], inp["weights"],
                                 num_worst_tokens=num_worst_tokens, config=CONFIG)
    cached = ops.internode_cached_dispatch(buffer.name, inp["x2"], out.handle, config=CONFIG)
    # Rows to combine: a function of the received rows (any data would do; this keeps them
    # different per rank).
    rows = (out.recv_x.float() * (rank + 1) / 3).bfloat16()
    combined = ops.internode_combine(buffer.name, rows, out.handle,
                                     topk_weights=out.recv_topk_weights, bias=inp["bias"],
                                     config=CONFIG)
    buffer.destroy()
    cpu = lambda ts: tuple(t.cpu() for t in ts)  # noqa: E731
    staged = {op: n - calls_before.get(op, 0) for op, n in internode_staged.calls.items()
              if n > calls_before.get(op, 0)}
    return {"dispatch": cpu(out[:5]), "handle": cpu(out.handle), "cached": cached[0].cpu(),
            "rows": rows.cpu(), "combined": cpu(combined), "staged_calls": staged}


def check(results, num_ranks, per_node, seed, num_worst_tokens, edge=None):
    """Every rank's ``job`` results against the oracle: rows bit-exact, every handle field
    equal, cached dispatch and the per-node combine bit-exact."""
    made = [inputs(r, num_ranks, seed, edge=edge) for r in range(num_ranks)]
    xs = [i["x"] for i in made]
    num_experts = made[0]["experts"]
    want = oracle.dispatch(xs, [i["topk"] for i in made], [i["weights"] for i in made],
                           num_experts, num_worst_tokens=num_worst_tokens)
    routes = [oracle.layout(i["topk"], num_experts, num_ranks)["is_token_in_rank"]
              for i in made]
    handles = oracle.internode_handles(routes, per_node, NUM_CHANNELS, num_worst_tokens)
    cached = oracle.dispatch([i["x2"] for i in made], [i["topk"] for i in made], None,
                             num_experts, num_worst_tokens=num_worst_tokens)
    combined = oracle.internode_combine(
        [r["rows"] for r in results], want, [x.size(0) for x in xs], per_node,
        recv_topk_weights=[r["dispatch"][3] for r in results],
        bias_0=[i["bias"] for i in made])
    fields = ops.InternodeHandle._fields
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
