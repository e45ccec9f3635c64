import torch, deep_ep_ops, oracle
from deep_ep_ops import ops, _registry
import torch.distributed as dist

def _mk(rank, ws):
    return _registry.create(dist.group.WORLD, num_nvl_bytes=1<<30, num_rdma_bytes=1<<30, low_latency_mode=True, device=torch.device("cpu"), workspace=torch.empty(0)).name

def job(rank, ws, E, T, H, K, nwt):
    name = _mk(rank, ws)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(T, H, generator=g).bfloat16() for _ in range(ws)]
    tk = [oracle.random_topk(T, E, K, g, p_neg=0.2, allow_duplicates=True) for _ in range(ws)]
    tw = [torch.rand(T, K, generator=g) for _ in range(ws)]
    lay = ops.get_dispatch_layout(tk[rank], E, ws)
    ol = oracle.layout(tk[rank], E, ws)
    for k in ol: assert torch.equal(ol[k], getattr(lay, k)), k
    out = ops.dispatch(name, xs[rank], lay, tk[rank], tw[rank], num_worst_tokens=nwt)
    ref = oracle.dispatch(xs, tk, tw, E, num_worst_tokens=nwt)[rank]
    for k in ["recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert"]:
        assert torch.equal(ref[k], getattr(out, k)), (k, ref[k], getattr(out, k))
    assert torch.equal(ref["recv_src_idx"], out.handle.recv_src_idx)
    # combine
    y = out.recv_x * 2
    c = ops.combine(name, y, out.handle, topk_weights=out.recv_topk_weights)
    refc = oracle.combine([r["recv_x"] * 2 for r in oracle.dispatch(xs, tk, tw, E, num_worst_tokens=nwt)], oracle.dispatch(xs, tk, tw, E, num_worst_tokens=nwt), [T]*ws, recv_topk_weights=[r["recv_topk_weights"] for r in oracle.dispatch(xs, tk, tw, E, num_worst_tokens=nwt)])[rank]
    assert torch.equal(refc["combined_x"], c.combined_x)
    assert torch.equal(refc["combined_topk_weights"], c.combined_topk_weights)
    # LL
    M = T + 3
    for fp8, rs, ue in [(False, False, False), (True, False, False), (True, True, True)]:
        ll = ops.low_latency_dispatch(name, xs[rank], tk[rank], M, E, use_fp8=fp8, round_scale=rs, use_ue8m0=ue)
        lr = oracle.low_latency_dispatch(xs, tk, E, M, use_fp8=fp8, round_scale=rs, use_ue8m0=ue)
        r = lr[rank]
        assert torch.equal(r["recv_count"], ll.recv_count)
        assert torch.equal(r["src_info"], ll.handle.src_info)
        assert torch.equal(r["layout_range"], ll.handle.layout_range)
        L = E // ws
        for l in range(L):
            n = int(r["recv_count"][l])
            assert torch.equal(r["recv_x"][l, :n].view(torch.uint8), ll.recv_x[l, :n].view(torch.uint8))
            if fp8:
                assert torch.equal(r["recv_x_scales"][l, :n], ll.recv_x_scales[l, :n])
    ll = ops.low_latency_dispatch(name, xs[rank], tk[rank], M, E, use_fp8=False)
    lr = oracle.low_latency_dispatch(xs, tk, E, M, use_fp8=False)
    comb = ops.low_latency_combine(name, ll.recv_x * 3, tk[rank], tw[rank], ll.handle)
    refl = oracle.low_latency_combine([r["recv_x"] * 3 for r in lr], lr, tk, tw)[rank]
    assert torch.equal(refl, comb), (refl - comb).abs().max()
    return "ok"
