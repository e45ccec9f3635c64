"""The staged internode design (docs/DESIGN.md section 5) reproduces the internode semantics:
its model (tests/staged_internode.py: the forward stage, then per node and source node one
intranode dispatch, combine back the same way) gives exactly the flat dispatch's rows, the ten
handle fields of ``oracle.internode_handles`` and ``oracle.internode_combine``'s sums, bit for
bit, over topologies of 2 to 4 nodes, with top-k or with routes only, scales, weights and bias.
The CUDA kernels follow the model; these tests pin down what each of their stages computes."""

from __future__ import annotations

import pytest
import torch

import oracle
import staged_internode as staged

TOPOLOGIES = [(4, 2), (8, 4), (8, 2), (6, 3), (4, 1), (6, 2), (2, 1)]
HANDLE_FIELDS = (
    "is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
    "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
    "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
    "send_rdma_head", "send_nvl_head",
)
FLAT_FIELDS = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
               "num_recv_tokens_per_expert", "recv_src_idx", "recv_src_rank")


def _case(R, seed, with_topk, hidden=24):
    g = torch.Generator().manual_seed(seed)
    E, K = 2 * R, min(3, 2 * R)
    Ts = [int(torch.randint(0, 11, (1,), generator=g)) for _ in range(R)]
    Ts[0], Ts[-1] = 9, 0 if seed % 2 else Ts[-1]  # one rank with no tokens in odd seeds
    idxs = [oracle.random_topk(T, E, K, g, p_neg=0.3) for T in Ts]
    routes = [oracle.layout(i, E, R)["is_token_in_rank"] for i in idxs]
    if not with_topk:  # routes only (DeepEP allows dispatch without top-k), some tokens nowhere
        routes = [torch.rand(T, R, generator=g) < 0.4 for T in Ts]
    xs = [torch.randn(T, hidden, generator=g).to(torch.bfloat16) for T in Ts]
    scales = [torch.rand(T, 2, generator=g) for T in Ts]
    ws = [torch.rand(T, K, generator=g) for T in Ts]
    return Ts, E, xs, scales, (idxs if with_topk else None), (ws if with_topk else None), routes


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(oracle._raw(a), oracle._raw(b)))


@pytest.mark.parametrize("num_ranks, ranks_per_node", TOPOLOGIES)
@pytest.mark.parametrize("with_topk", [True, False])
def test_staged_dispatch_and_handle_equal_the_internode_semantics(num_ranks, ranks_per_node,
                                                                  with_topk):
    R, P = num_ranks, ranks_per_node
    for seed in range(3):
        Ts, E, xs, scales, idxs, ws, routes = _case(R, seed, with_topk)
        flat = oracle.dispatch(xs, idxs, ws, E, expert_alignment=4, x_scales=scales,
                               is_token_in_ranks=routes)
        regions, heads = staged.forward(xs, scales, idxs, ws, routes, P)
        got = staged.fan_out(regions, E, P, expert_alignment=4)
        for r in range(R):
            assert got[r]["num_recv_tokens"] == flat[r]["num_recv_tokens"], (seed, r)
            for key in FLAT_FIELDS:
                assert _equal(got[r][key], flat[r][key]), (seed, r, key)
        for C in (1, 3, 7):
            want = oracle.internode_handles(routes, P, C)
            have = staged.handles(regions, heads, routes, got, P, C)
            for r in range(R):
                for key in HANDLE_FIELDS:
                    assert _equal(have[r][key], want[r][key]), (seed, C, r, key)


@pytest.mark.parametrize("num_ranks, ranks_per_node", [t for t in TOPOLOGIES if t[0] > t[1]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_staged_combine_equals_the_internode_combine(num_ranks, ranks_per_node, dtype):
    R, P = num_ranks, ranks_per_node
    for seed in range(3):
        Ts, E, xs, scales, idxs, ws, routes = _case(R, seed, True)
        flat = oracle.dispatch(xs, idxs, ws, E)
        regions, _ = staged.forward(xs, scales, idxs, ws, routes, P)
        got = staged.fan_out(regions, E, P)
        g = torch.Generator().manual_seed(100 + seed)
        recv_xs = [torch.randn(d["num_recv_tokens"], 24, generator=g).to(dtype) for d in flat]
        recv_ws = [torch.rand(d["num_recv_tokens"], idxs[0].shape[1], generator=g) for d in flat]
        bias = [torch.randn(T, 24, generator=g) for T in Ts]
        want = oracle.internode_combine(recv_xs, flat, Ts, P, recv_ws, bias)
        have = staged.combine(recv_xs, got, regions, Ts, P, recv_ws, bias)
        for s in range(R):
            assert _equal(have[s]["combined_x"], want[s]["combined_x"]), (seed, s)
            assert _equal(have[s]["combined_topk_weights"], want[s]["combined_topk_weights"])
