"""The oracle's internode model (`oracle.internode_handles`, `oracle.internode_combine`) on the
CPU, single process: a hand-computed case, then properties on seeded random routings."""

import pytest
import torch

import oracle

I32 = torch.int32


def _t(rows):
    return torch.tensor(rows, dtype=I32)


# 4 ranks as 2 nodes of 2 (node 0: ranks 0, 1; node 1: ranks 2, 3), 3 channels.
# Rank 0 has 5 tokens (channels 0 0 1 1 2), rank 1 has 2 (0 1), rank 2 none, rank 3 has 3 (0 1 2).
HAND_DESTS = [
    [{0, 2}, {3}, {1}, {2, 3}, {0, 1, 3}],
    [{2}, {0, 3}],
    [],
    [{0}, set(), {1, 2}],
]


def _routes(dests, num_ranks):
    out = []
    for per_token in dests:
        route = torch.zeros(len(per_token), num_ranks, dtype=torch.bool)
        for t, ds in enumerate(per_token):
            for d in ds:
                route[t, d] = True
        out.append(route)
    return out


def test_hand_case():
    routes = _routes(HAND_DESTS, 4)
    h = oracle.internode_handles(routes, ranks_per_node=2, num_channels=3)
    # Rank 0 as sender.
    assert h[0]["is_token_in_rank"] is routes[0]
    assert torch.equal(h[0]["rdma_channel_prefix_matrix"], _t([[1, 2, 3], [2, 3, 4]]))
    assert torch.equal(h[0]["gbl_channel_prefix_matrix"],
                       _t([[1, 1, 2], [0, 1, 2], [1, 2, 2], [1, 2, 3]]))
    assert torch.equal(h[0]["send_rdma_head"], _t([[0, 0], [-1, 1], [1, -1], [-1, 2], [2, 3]]))
    assert torch.equal(h[1]["send_rdma_head"], _t([[-1, 0], [0, 1]]))
    assert torch.equal(h[3]["send_rdma_head"], _t([[0, -1], [-1, -1], [1, 0]]))
    assert h[2]["send_rdma_head"].shape == (0, 2)
    # Rank 2 = (node 1, local 0): receives (0,0) (0,3) (1,0) (3,2); forwards rank 0's tokens
    # 0 1 3 4 (rank 2 itself has none).
    r2 = h[2]
    assert torch.equal(r2["recv_rdma_channel_prefix_matrix"], _t([[2, 3, 4], [0, 0, 0]]))
    assert torch.equal(r2["recv_rdma_rank_prefix_sum"], _t([4, 4]))
    assert torch.equal(r2["recv_gbl_channel_prefix_matrix"],
                       _t([[0, 1, 2], [2, 3, 3], [3, 3, 3], [3, 3, 3]]))
    assert torch.equal(r2["recv_gbl_rank_prefix_sum"], _t([2, 3, 3, 4]))
    # Column 1: the row's index in its source's stream to node 1 (send_rdma_head[t, 1]).
    assert torch.equal(r2["recv_src_meta"], _t([[0, 0], [3, 2], [0, 0], [2, 0]]))
    assert torch.equal(r2["send_nvl_head"], _t([[0, -1], [-1, 0], [1, 1], [-1, 2]]))
    # Rank 3 = (node 1, local 1): forwards rank 1's tokens 0 1, then rank 3's token 2.
    assert torch.equal(h[3]["recv_rdma_rank_prefix_sum"], _t([2, 3]))
    assert torch.equal(h[3]["send_nvl_head"], _t([[2, -1], [-1, 3], [3, -1]]))
    # Capacity mode: every rank receives and forwards at most 4 rows.
    hw = oracle.internode_handles(routes, 2, 3, num_worst_tokens=4)
    assert torch.equal(hw[3]["send_nvl_head"], _t([[2, -1], [-1, 3], [3, -1], [-1, -1]]))
    assert torch.equal(hw[1]["recv_src_meta"], _t([[2, 1], [4, 2], [2, 1], [-1, -1]]))
    for r in range(4):
        for key in h[r]:
            if key not in ("recv_src_meta", "send_nvl_head"):
                assert torch.equal(hw[r][key], h[r][key]), (r, key)
    with pytest.raises(ValueError, match="rank 0 receives 4 tokens > num_worst_tokens=3"):
        oracle.internode_handles(routes, 2, 3, num_worst_tokens=3)


def test_forwarder_bound_raises():
    # Rank 0 sends 2 tokens to rank 1, rank 2 sends 2 to rank 0: ranks 0 and 1 receive 2 rows
    # each, but rank 0 forwards all 4 (both sources have local index 0).
    routes = _routes([[{1}, {1}], [], [{0}, {0}], []], 4)
    assert oracle.internode_handles(routes, 2, 2)[0]["send_nvl_head"].shape == (4, 2)
    with pytest.raises(ValueError, match="rank 0 forwards 4 tokens > num_worst_tokens=2"):
        oracle.internode_handles(routes, 2, 2, num_worst_tokens=2)


def _random_case(num_ranks, ranks_per_node, seed, hidden=16, dtype=torch.bfloat16):
    """Random top-k routing (some -1 entries, some ranks without tokens), its dispatch, and
    random per-row data to combine."""
    g = torch.Generator().manual_seed(seed)
    E, K = 2 * num_ranks, min(3, 2 * num_ranks)
    Ts = [int(torch.randint(0, 12, (1,), generator=g)) for _ in range(num_ranks)]
    Ts[0] = 9
    idxs = [oracle.random_topk(T, E, K, g, p_neg=0.3) for T in Ts]
    ws = [torch.rand(T, K, generator=g) for T in Ts]
    lays = [oracle.layout(i, E, num_ranks, num_rdma_ranks=num_ranks // ranks_per_node)
            for i in idxs]
    xs = [torch.randn(T, hidden, generator=g).to(dtype) for T in Ts]
    disp = oracle.dispatch(xs, idxs, ws, E)
    recv_xs = [torch.randn(d["num_recv_tokens"], hidden, generator=g).to(dtype) for d in disp]
    return Ts, lays, disp, recv_xs, g


TOPOLOGIES = [(4, 2, 3), (8, 4, 5), (8, 2, 2), (6, 3, 4), (4, 1, 3), (4, 4, 2), (6, 2, 20)]


@pytest.mark.parametrize("num_ranks, ranks_per_node, num_channels", TOPOLOGIES)
def test_handle_properties(num_ranks, ranks_per_node, num_channels):
    R, P, C = num_ranks, ranks_per_node, num_channels
    S = R // P
    for seed in range(3):
        Ts, lays, disp, _, _ = _random_case(R, P, seed)
        routes = [la["is_token_in_rank"] for la in lays]
        h = oracle.internode_handles(routes, P, C)
        for r in range(R):
            N = disp[r]["num_recv_tokens"]
            assert int(h[r]["recv_gbl_rank_prefix_sum"][-1]) == N
            assert h[r]["recv_src_meta"].shape == (N, 2)
            assert torch.equal(h[r]["recv_src_meta"][:, 0], disp[r]["recv_src_idx"])
            assert torch.equal(h[r]["gbl_channel_prefix_matrix"][:, -1],
                               lays[r]["num_tokens_per_rank"])
            assert torch.equal(h[r]["rdma_channel_prefix_matrix"][:, -1],
                               lays[r]["num_tokens_per_rdma_rank"])
            assert h[r]["send_nvl_head"].shape == (int(h[r]["recv_rdma_rank_prefix_sum"][-1]), P)
            # Rows from source s of channel c lie in [value[s, c], value[s, c + 1]).
            # (The last channel ends where the source's rows end.)
            first = h[r]["recv_gbl_channel_prefix_matrix"]
            ends = torch.cat([first[:, 1:], h[r]["recv_gbl_rank_prefix_sum"][:, None]], 1)
            chans = [oracle._token_channels(T, C) for T in Ts]
            for i in range(N):
                s, t = int(disp[r]["recv_src_rank"][i]), int(disp[r]["recv_src_idx"][i])
                c = chans[s][t]
                assert int(first[s, c]) <= i < int(ends[s, c])
        # send_nvl_head and recv_src_meta are inverse: a forwarder's rows are its regions of
        # the source nodes in order (region n starts after recv_rdma_rank_prefix_sum[n - 1]
        # rows), and recv_src_meta[:, 1] is the row's index within its region.
        def region_start(fwd, n):
            return int(h[fwd]["recv_rdma_rank_prefix_sum"][n - 1]) if n else 0

        for d in range(R):
            m, q = d // P, d % P
            for rho in range(disp[d]["num_recv_tokens"]):
                src = int(disp[d]["recv_src_rank"][rho])
                fwd = m * P + src % P
                i = region_start(fwd, src // P) + int(h[d]["recv_src_meta"][rho, 1])
                assert int(h[fwd]["send_nvl_head"][i, q]) == rho
        hits = 0
        for fwd in range(R):
            m, l = fwd // P, fwd % P
            head = h[fwd]["send_nvl_head"]
            for i in range(head.shape[0]):
                assert (head[i] >= 0).any()  # a forwarded token reaches a rank of the node
                for q in range(P):
                    rho = int(head[i, q])
                    if rho >= 0:
                        hits += 1
                        d = m * P + q
                        src = int(disp[d]["recv_src_rank"][rho])
                        assert src % P == l
                        assert (int(h[d]["recv_src_meta"][rho, 1])
                                == i - region_start(fwd, src // P))
        assert hits == sum(d["num_recv_tokens"] for d in disp)
        # Capacity mode pads the row-indexed fields with -1.
        worst = max(max(d["num_recv_tokens"] for d in disp),
                    max(int(x["recv_rdma_rank_prefix_sum"][-1]) for x in h), 1)
        hw = oracle.internode_handles(routes, P, C, num_worst_tokens=worst)
        for r in range(R):
            for key, n in (("recv_src_meta", disp[r]["num_recv_tokens"]),
                           ("send_nvl_head", int(h[r]["recv_rdma_rank_prefix_sum"][-1]))):
                assert hw[r][key].shape[0] == worst
                assert torch.equal(hw[r][key][:n], h[r][key]) and (hw[r][key][n:] == -1).all()
        assert all(h[r]["send_rdma_head"].shape == (Ts[r], S) for r in range(R))


def _biases(Ts, hidden, g, dtype):
    return [torch.randn(T, hidden, generator=g).to(dtype) for T in Ts]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_node_combine_is_combine(dtype):
    R = 4
    Ts, _, disp, recv_xs, g = _random_case(R, R, seed=5, dtype=dtype)
    ws = [d["recv_topk_weights"] for d in disp]
    b0, b1 = _biases(Ts, 16, g, dtype), _biases(Ts, 16, g, dtype)
    for kw in ({}, {"recv_topk_weights": ws, "bias_0": b0, "bias_1": b1}):
        want = oracle.combine(recv_xs, disp, Ts, **kw)
        got = oracle.internode_combine(recv_xs, disp, Ts, R, **kw)
        for s in range(R):
            assert torch.equal(got[s]["combined_x"], want[s]["combined_x"])
            if "recv_topk_weights" in kw:
                assert torch.equal(got[s]["combined_topk_weights"],
                                   want[s]["combined_topk_weights"])


def test_two_node_combine():
    R, P, H = 8, 4, 16
    Ts, _, disp, recv_xs, g = _random_case(R, P, seed=7, hidden=H)
    ws = [d["recv_topk_weights"] for d in disp]
    flat = oracle.combine(recv_xs, disp, Ts, recv_topk_weights=ws)
    got = oracle.internode_combine(recv_xs, disp, Ts, P, recv_topk_weights=ws)
    # Rows per (source rank, source token): (receiving rank, row), ascending receiving rank.
    rows = {}
    for d in range(R):
        for j in range(disp[d]["num_recv_tokens"]):
            key = (int(disp[d]["recv_src_rank"][j]), int(disp[d]["recv_src_idx"][j]))
            rows.setdefault(key, []).append((d, j))
    differs = 0
    for s in range(R):
        for t in range(Ts[s]):
            a, b = got[s]["combined_x"][t].float(), flat[s]["combined_x"][t].float()
            mag = sum((recv_xs[d][j].float().abs() for d, j in rows.get((s, t), [])),
                      torch.zeros(H))
            # Each rounding (the partials, the results) errs by at most 2**-8 of its value.
            assert ((a - b).abs() <= 2.0 ** -8 * (mag + a.abs() + b.abs()) * 1.001).all()
            differs += int((a != b).sum())
            wa, wb = got[s]["combined_topk_weights"][t], flat[s]["combined_topk_weights"][t]
            assert torch.allclose(wa, wb, rtol=1e-6, atol=1e-7)
    assert differs > 0  # the node grouping shows somewhere
    # One token recomputed directly: a token of rank 1 received on both nodes.
    s, t = next((s, t) for (s, t), rs in sorted(rows.items())
                if s == 1 and len({d // P for d, _ in rs}) == 2)
    parts = [torch.zeros(H) for _ in range(R // P)]
    for d, j in rows[(s, t)]:
        parts[d // P] = parts[d // P] + recv_xs[d][j].float()
    want = (parts[0].to(torch.bfloat16).float() + parts[1].to(torch.bfloat16).float())
    assert torch.equal(got[s]["combined_x"][t], want.to(torch.bfloat16))
    # Bias only for a token received nowhere; biases after the node partials.
    b0, b1 = _biases(Ts, H, g, torch.bfloat16), _biases(Ts, H, g, torch.bfloat16)
    got_b = oracle.internode_combine(recv_xs, disp, Ts, P, bias_0=b0, bias_1=b1)
    want_b = (want + b0[s][t].float() + b1[s][t].float()).to(torch.bfloat16)
    assert torch.equal(got_b[s]["combined_x"][t], want_b)
    for s2 in range(R):
        for t2 in range(Ts[s2]):
            if (s2, t2) not in rows:
                bias = (torch.zeros(H) + b0[s2][t2].float() + b1[s2][t2].float())
                assert torch.equal(got_b[s2]["combined_x"][t2], bias.to(torch.bfloat16))
