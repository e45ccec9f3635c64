"""The eager fast path (``ops._direct``) gives what the ``torch.ops.deep_ep`` ops give, bit for bit.

One process, one GPU, one NCCL rank: the kernels run (NVLink runtime for one rank, NVSHMEM with
one PE), so this runs wherever one GPU is lent. Each call form runs once through the wrappers
with no grad (the direct path) and once through the ops (grad mode on and an input requiring
grad forces them), on the same inputs.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
from deep_ep_ops import _build, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _build.HAS_LOW_LATENCY_KERNELS, reason="the NVSHMEM kernels are not built"),
]


@pytest.fixture(scope="module")
def buffer():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, device_id=torch.device("cuda", 0))
    num_max, hidden, num_experts = 128, 7168, 32
    group = dist.new_group([0])
    buf = deep_ep.Buffer(
        group, num_nvl_bytes=int(1e9),
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, hidden, 1, num_experts),
        low_latency_mode=True,
    )
    yield buf, num_max, hidden, num_experts
    buf.destroy()


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b)
    return all(_equal(x, y) for x, y in zip(a, b, strict=True))


def _inputs(num_tokens, hidden, num_experts, num_topk=8):
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.rand(num_tokens, num_experts, device="cuda").topk(num_topk, dim=1).indices
    topk_idx[0, 2] = -1
    weights = torch.rand(num_tokens, num_topk, device="cuda")
    return x, topk_idx, weights


_ops = torch.ops.deep_ep


def test_low_latency_direct_matches_ops(buffer):
    buf, num_max, hidden, num_experts = buffer
    torch.manual_seed(0)
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    ll = (buf.name, 1, num_max, num_experts)
    # The direct entries decide in C++: an input requiring grad in grad mode takes the ops.
    kernels = ops._direct(_build._C_nvshmem, x)
    assert kernels is _build._C_nvshmem
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        assert kernels.low_latency_dispatch(leaf, topk_idx, *ll, False, False, False, None) is None
    with torch.no_grad():
        assert len(kernels.low_latency_dispatch(leaf, topk_idx, *ll, False, False, False, None)) == 5
    assert ops._direct(_build._C_nvshmem, torch.nn.Parameter(x.float())) is None
    for use_fp8 in (False, True):
        stats = torch.zeros(num_experts, dtype=torch.int32, device="cuda")
        fast = ops.low_latency_dispatch(buf.name, x, topk_idx, num_max, num_experts,
                                        use_fp8=use_fp8, cumulative_local_expert_recv_stats=stats)
        slow = _ops.low_latency_dispatch(x, topk_idx, *ll, use_fp8, False, False)
        count = fast.recv_count
        assert torch.equal(count, slow[2]) and torch.equal(stats, slow[2])
        assert torch.equal(fast.handle.layout_range, slow[4])
        for e in range(num_experts):
            n = int(count[e])
            assert _equal(fast.recv_x[e, :n], slow[0][e, :n])
            assert torch.equal(fast.handle.src_info[e, :n], slow[3][e, :n])
            if use_fp8:
                assert torch.equal(fast.recv_x_scales[e, :n], slow[1][e, :n])
    recv = ops.low_latency_dispatch(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    handle = recv.handle
    rows = torch.randn_like(recv.recv_x)
    fast = ops.low_latency_combine(buf.name, rows, topk_idx, weights, handle)
    slow = _ops.low_latency_combine(rows, topk_idx, weights, handle.src_info, handle.layout_range,
                                    *ll, False)
    assert torch.equal(fast, slow)
    out = torch.empty_like(fast)
    ops.low_latency_combine(buf.name, rows, topk_idx, weights, handle, out=out)
    assert torch.equal(out, fast)
    pending = ops.low_latency_combine_send(buf.name, rows, topk_idx, weights, handle)
    ops.low_latency_combine_recv(buf.name, pending, topk_idx, weights)
    assert torch.equal(pending, fast)
    sent = ops.low_latency_dispatch_send(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    ops.low_latency_dispatch_recv(buf.name, sent)
    assert torch.equal(sent.recv_count, recv.recv_count)
    for e in range(num_experts):
        n = int(recv.recv_count[e])
        assert torch.equal(sent.recv_x[e, :n], recv.recv_x[e, :n])


def test_normal_direct_matches_ops(buffer):
    buf, _, hidden, num_experts = buffer
    torch.manual_seed(1)
    x, topk_idx, weights = _inputs(512, hidden, num_experts)
    layout = ops.get_dispatch_layout(topk_idx, num_experts, 1)
    assert _equal(tuple(layout), tuple(_ops.get_dispatch_layout(topk_idx, num_experts, 1, 1)))
    config = deep_ep.Buffer.get_dispatch_config(1).to_list()
    combine_config = deep_ep.Buffer.get_combine_config(1).to_list()
    args = (x, None, topk_idx, weights, layout.num_tokens_per_rank, layout.is_token_in_rank,
            layout.num_tokens_per_expert, buf.name, 1)
    for num_worst_tokens in (0, 1024):
        fast = ops.dispatch(buf.name, x, layout, topk_idx, weights, num_worst_tokens=num_worst_tokens)
        if num_worst_tokens:
            slow = _ops.capacity_dispatch(*args, num_worst_tokens, config)
        else:
            slow = _ops.dispatch(*args, config)
        assert _equal(tuple(fast[:5]), tuple(slow[:5]))
        handle = fast.handle
        assert _equal(tuple(handle[:4]) + (handle.send_head,), tuple(slow[5:10]))
        fast_c = ops.combine(buf.name, fast.recv_x, handle, topk_weights=fast.recv_topk_weights)
        slow_c = _ops.combine(fast.recv_x, fast.recv_topk_weights, None, None, *handle[:6],
                              buf.name, num_worst_tokens, combine_config)
        assert _equal(tuple(fast_c), tuple(slow_c))
        fast_d = ops.cached_dispatch(buf.name, x, handle)
        slow_d = _ops.cached_dispatch(x, None, None, *handle[:6], buf.name, num_worst_tokens, config)
        assert _equal(tuple(fast_d), tuple(slow_d))
