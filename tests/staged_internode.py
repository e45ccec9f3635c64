"""A model of the staged internode kernels (docs/DESIGN.md section 5, "Internode"), built from
the forward stage and the intranode semantics (``oracle.dispatch`` / ``oracle.combine`` per
node and region), for ``tests/test_internode_staged.py`` to hold against the flat intranode
oracle and ``oracle.internode_handles`` / ``oracle.internode_combine``. What the CUDA path
computes, step by step, and every handle field from what its stages have at hand:

1. Forward: rank (n, l) sends each token once to each node m it goes to, into region n of the
   forwarder (m, l), in source token order, with its scales, top-k, weights, destination mask,
   source index and its source's token count (the channel of a token needs it).
2. Fan out: per node m and source node n, one intranode dispatch over m's ranks whose sources
   are the forwarders (m, l) with their region n as x, experts shifted to the node's, and the
   source index and token count as two extra 4-byte scale columns. Destination (m, q) puts the
   result of region n after those of regions < n.
3. Combine backwards: per node m and region n, one intranode combine of the segment's rows to
   the forwarders (each row sum rounded to x's dtype: the node's partial), then at the source
   the partials of its nodes summed in ascending node order, the bias added, one rounding.

Everything is per rank list, indexed by global rank; ``P`` ranks per node, ``S`` nodes.
"""

from __future__ import annotations

import torch

import oracle


def channels_of(src: torch.Tensor, num_tokens: torch.Tensor, num_channels: int) -> torch.Tensor:
    """The channel of each token ``src`` of a source with ``num_tokens`` tokens (per row)."""
    per_channel = torch.clamp((num_tokens + num_channels - 1) // num_channels, min=1)
    return (src // per_channel).to(torch.int64)


def forward(xs, x_scales, topk_idxs, topk_weights, routes, P):
    """Stage 1. Returns ``regions[f][n]`` (a dict of the records forwarder ``f`` holds from
    source node ``n``) and every rank's ``send_rdma_head [T, S]``."""
    R = len(xs)
    S = R // P
    regions = [[None] * S for _ in range(R)]
    heads = []
    for s in range(R):
        n, l = divmod(s, P)
        T = xs[s].shape[0]
        in_node = routes[s].view(T, S, P).any(2)
        heads.append(torch.where(in_node, in_node.to(torch.int64).cumsum(0) - 1, -1).int())
        for m in range(S):
            toks = in_node[:, m].nonzero().squeeze(1)
            regions[m * P + l][n] = {
                "x": xs[s][toks],
                "scales": None if x_scales is None else x_scales[s][toks],
                "topk": None if topk_idxs is None else topk_idxs[s][toks],
                "weights": None if topk_weights is None else topk_weights[s][toks],
                "mask": routes[s][toks],
                "src": toks.to(torch.int32),
                "src_tokens": torch.full((toks.numel(),), T, dtype=torch.int32),
            }
    return regions, heads


def _as_words(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def fan_out(regions, num_experts, P, expert_alignment=1):
    """Stage 2. Per destination rank: the rows and the per-row fields of the flat dispatch,
    with the staged path's own view of them (segment bounds, the forwarder's rows)."""
    R = len(regions)
    S = R // P
    E_node = num_experts // S
    first = regions[0][0]
    has_topk, has_w = first["topk"] is not None, first["weights"] is not None
    num_scales = 0 if first["scales"] is None else first["scales"].shape[1]
    dests = [{"segments": []} for _ in range(R)]
    for m in range(S):
        for n in range(S):
            sources = [regions[m * P + l][n] for l in range(P)]
            xs = [r["x"] for r in sources]
            topk = None
            if has_topk:
                topk = [torch.where(r["topk"] // E_node == m, r["topk"] - m * E_node, -1)
                        for r in sources]
            weights = [r["weights"] for r in sources] if has_w else None
            carried = [torch.cat([_as_words(r["scales"]) if num_scales else
                                  torch.zeros(r["src"].numel(), 0, dtype=torch.int32),
                                  r["src"][:, None], r["src_tokens"][:, None]], 1)
                       for r in sources]
            in_node = [r["mask"][:, m * P:(m + 1) * P] for r in sources]
            out = oracle.dispatch(xs, topk, weights, E_node, 1, x_scales=carried,
                                  is_token_in_ranks=None if has_topk else in_node)
            for q in range(P):
                dests[m * P + q]["segments"].append((n, out[q]))
    results = []
    for d in range(R):
        segs = [seg for _, seg in dests[d]["segments"]]
        words = torch.cat([seg["recv_x_scales"] for seg in segs])
        per_expert = sum(seg["num_recv_tokens_per_expert"].to(torch.int64) for seg in segs)
        if has_topk:
            per_expert = (per_expert + expert_alignment - 1) // expert_alignment * expert_alignment
        src_rank = torch.cat([n * P + seg["recv_src_rank"] for n, seg in dests[d]["segments"]])
        sizes = [seg["num_recv_tokens"] for seg in segs]
        scales = (words[:, :num_scales].contiguous().view(first["scales"].dtype) if num_scales
                  else torch.zeros(words.shape[0], 0))
        results.append({
            "recv_x": torch.cat([seg["recv_x"] for seg in segs]),
            "recv_x_scales": scales,
            "recv_topk_idx": torch.cat([seg["recv_topk_idx"] for seg in segs]),
            "recv_topk_weights": torch.cat([seg["recv_topk_weights"] for seg in segs]),
            "num_recv_tokens_per_expert": per_expert.to(torch.int32) if has_topk
            else torch.zeros(0, dtype=torch.int32),
            "recv_src_idx": words[:, num_scales].clone(),
            "recv_src_rank": src_rank,
            "src_tokens": words[:, num_scales + 1].clone(),
            "forwarder_row": torch.cat([seg["recv_src_idx"] for seg in segs]),
            "num_recv_tokens": sum(sizes),
            "segment_starts": torch.tensor([0] + sizes).cumsum(0)[:-1].tolist(),
            "segments": segs,
        })
    return results


def handles(regions, heads, routes, received, P, num_channels):
    """Every rank's ten-field handle from what the stages have: the forward's records, heads
    and each source's own routing, and the destinations' rows (``fan_out``)."""
    R = len(regions)
    S = R // P
    C = num_channels
    out = []
    for me in range(R):
        m, l = divmod(me, P)
        T = routes[me].shape[0]
        chans = channels_of(torch.arange(T), torch.tensor(T), C)
        in_node = routes[me].view(T, S, P).any(2)

        def prefix(sent, width):  # inclusive prefix over channels of rows sent per target
            counts = torch.zeros(width, C, dtype=torch.int64)
            for c in range(C):
                counts[:, c] = sent[chans <= c].sum(0)
            return counts.to(torch.int32)

        mine = received[me]
        rows = mine["num_recv_tokens"]
        # Rows from each source (global order), and per source and channel its first row.
        per_source = torch.bincount(mine["recv_src_rank"], minlength=R)
        start = per_source.cumsum(0) - per_source
        row_channel = channels_of(mine["recv_src_idx"].to(torch.int64),
                                  mine["src_tokens"].to(torch.int64), C)
        recv_gbl = torch.zeros(R, C, dtype=torch.int64)
        for s in range(R):
            from_s = row_channel[mine["recv_src_rank"] == s]
            for c in range(C):
                recv_gbl[s, c] = start[s] + (from_s < c).sum()
        # As forwarder (m, l): region n's length and channel prefix (from its records).
        lengths = torch.tensor([regions[me][n]["src"].numel() for n in range(S)])
        recv_rdma = torch.zeros(S, C, dtype=torch.int64)
        for n in range(S):
            rec = regions[me][n]
            ch = channels_of(rec["src"].to(torch.int64), rec["src_tokens"].to(torch.int64), C)
            for c in range(C):
                recv_rdma[n, c] = (ch <= c).sum()
        # send_nvl_head: for each of my rows (regions in node order) and local rank q, its row
        # at (m, q): the segment's start there plus its place in the segment.
        nvl_head = torch.full((int(lengths.sum()), P), -1, dtype=torch.int32)
        row0 = 0
        for n in range(S):
            for q in range(P):
                dest = received[m * P + q]
                seg = dest["segments"][n]
                base = dest["segment_starts"][n]
                for j in range(seg["num_recv_tokens"]):
                    if int(seg["recv_src_rank"][j]) == l:
                        nvl_head[row0 + int(seg["recv_src_idx"][j]), q] = base + j
            row0 += int(lengths[n])
        out.append({
            "is_token_in_rank": routes[me],
            "rdma_channel_prefix_matrix": prefix(in_node.to(torch.int64), S),
            "gbl_channel_prefix_matrix": prefix(routes[me].to(torch.int64), R),
            "recv_rdma_channel_prefix_matrix": recv_rdma.to(torch.int32),
            "recv_rdma_rank_prefix_sum": lengths.cumsum(0).to(torch.int32),
            "recv_gbl_channel_prefix_matrix": recv_gbl.to(torch.int32),
            "recv_gbl_rank_prefix_sum": per_source.cumsum(0).to(torch.int32),
            "recv_src_meta": torch.stack([mine["recv_src_idx"], mine["forwarder_row"]], 1)
            if rows else torch.zeros(0, 2, dtype=torch.int32),
            "send_rdma_head": heads[me],
            "send_nvl_head": nvl_head,
        })
    return out


def combine(recv_xs, received, regions, num_tokens, P, recv_topk_weights=None, bias=None):
    """Stage 3: per node and region the intranode combine of the segment's rows to the
    forwarders (their partials, rounded to x's dtype), then per source the partials of its
    nodes in ascending node order in fp32 (weights: fp32 partials), the bias, one rounding."""
    R = len(recv_xs)
    S = R // P
    dtype = recv_xs[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    hidden = recv_xs[0].shape[1]
    has_w = recv_topk_weights is not None
    K = recv_topk_weights[0].shape[1] if has_w else 0
    sums = [torch.zeros(num_tokens[s], hidden, dtype=acc) for s in range(R)]
    wsums = [torch.zeros(num_tokens[s], K, dtype=torch.float32) for s in range(R)]
    for m in range(S):
        for n in range(S):
            segs, xs, ws = [], [], []
            for q in range(P):
                d = m * P + q
                seg = received[d]["segments"][n]
                base = received[d]["segment_starts"][n]
                rows = slice(base, base + seg["num_recv_tokens"])
                segs.append(seg)
                xs.append(recv_xs[d][rows])
                ws.append(recv_topk_weights[d][rows] if has_w else None)
            lengths = [regions[m * P + l][n]["src"].numel() for l in range(P)]
            partials = oracle.combine(xs, segs, lengths, ws if has_w else None)
            for l in range(P):
                s = n * P + l
                src = regions[m * P + l][n]["src"].to(torch.int64)
                sums[s][src] += partials[l]["combined_x"].to(acc)  # rounded partial
                if has_w:
                    wsums[s][src] += partials[l]["combined_topk_weights"]
    out = []
    for s in range(R):
        total = sums[s]
        if bias is not None and bias[s] is not None:
            total = total + bias[s].to(acc)
        out.append({"combined_x": total.to(dtype),
                    "combined_topk_weights": wsums[s] if has_w else None})
    return out
