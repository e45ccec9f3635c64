"""GPU: the CUDA get_dispatch_layout kernel against the reference backend on the same inputs."""

import pytest
import torch

import deep_ep_ops
import oracle
from deep_ep_ops import _build, ops, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _build.HAS_CUDA_KERNELS, reason="the CUDA extension is not built"),
]


def _routings(num_tokens, num_experts, num_topk, seed):
    generator = torch.Generator().manual_seed(seed)
    yield "random", oracle.random_topk(num_tokens, num_experts, num_topk, generator)
    yield "skewed", oracle.random_topk(num_tokens, num_experts, num_topk, generator, skew=True)
    yield "negatives+duplicates", oracle.random_topk(
        num_tokens, num_experts, num_topk, generator, p_neg=0.3, allow_duplicates=True
    )
    nowhere = oracle.random_topk(num_tokens, num_experts, num_topk, generator)
    nowhere[::3] = -1
    yield "routed nowhere", nowhere


@pytest.mark.parametrize("num_tokens", [0, 1, 100, 4096, 20000])  # 20000: the multi-block path
@pytest.mark.parametrize("num_ranks,num_rdma_ranks", [(1, 1), (2, 1), (4, 1), (8, 1), (16, 2)])
def test_layout_matches_reference(num_tokens, num_ranks, num_rdma_ranks):
    for num_experts, num_topk in ((256, 8), (num_ranks * 3, 2)):
        for name, topk in _routings(num_tokens, num_experts, num_topk, seed=num_tokens + num_ranks):
            topk = topk.cuda()
            got = ops.get_dispatch_layout(topk, num_experts, num_ranks, num_rdma_ranks)
            want = reference.get_dispatch_layout(topk, num_experts, num_ranks, num_rdma_ranks)
            for field, expected in zip(got._fields, want):
                assert torch.equal(getattr(got, field), expected), (name, field, num_experts)


def test_layout_out_of_range_expert_raises_at_next_call():
    topk = torch.randint(0, 16, (64, 4), device="cuda")
    topk[5, 2] = 16
    ops.get_dispatch_layout(topk, 16, 2)  # no host sync: reported by the next call
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="outside \\[-1, num_experts\\)"):
        ops.get_dispatch_layout(topk[:1].clamp(0, 15), 16, 2)
    ops.get_dispatch_layout(topk.clamp(0, 15), 16, 2)  # reported once, then clean


def test_layout_bad_metadata_raises_at_call():
    topk = torch.zeros(4, 2, dtype=torch.int64, device="cuda")
    with pytest.raises(TypeError, match="topk_idx"):
        ops.get_dispatch_layout(topk.int(), 8, 2)
    with pytest.raises(ValueError, match="num_experts"):
        ops.get_dispatch_layout(topk, 9, 2)


def test_layout_opcheck_on_cuda():
    topk = oracle.random_topk(50, 64, 4, torch.Generator().manual_seed(0), p_neg=0.1).cuda()
    torch.library.opcheck(torch.ops.deep_ep.get_dispatch_layout.default, (topk, 64, 4, 1))
    torch.library.opcheck(torch.ops.deep_ep.get_dispatch_layout.default, (topk[:0], 64, 4, 2))


def test_layout_captures_in_cuda_graph():
    topk = torch.randint(0, 64, (512, 8), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.get_dispatch_layout(topk, 64, 4)
    for seed in range(3):
        topk.copy_(torch.randint(0, 64, (512, 8), generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        want = reference.get_dispatch_layout(topk, 64, 4, 1)
        assert all(torch.equal(g, w) for g, w in zip(out, want))


def test_build_reports_kernels():
    assert "CUDA kernels: built" in deep_ep_ops.build_info()


def test_first_call_of_a_process_can_be_captured():
    """One-time device state is allocated even when the first call is inside a graph capture."""
    import subprocess
    import sys

    script = (
        "import torch, deep_ep_ops\n"
        "from deep_ep_ops import ops, reference\n"
        "topk = torch.randint(0, 64, (2048, 8), device='cuda')\n"
        "graph = torch.cuda.CUDAGraph()\n"
        "with torch.cuda.graph(graph):\n"
        "    out = ops.get_dispatch_layout(topk, 64, 4)\n"
        "graph.replay(); graph.replay()\n"
        "want = reference.get_dispatch_layout(topk, 64, 4, 1)\n"
        "assert all(torch.equal(g, w) for g, w in zip(out, want))\n"
        "print('captured ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "captured ok" in result.stdout, result.stderr[-2000:]


def test_layout_after_a_larger_call():
    """A call with fewer bins after one with more reuses the workspace correctly."""
    big = torch.randint(-1, 256, (20000, 8), device="cuda")
    ops.get_dispatch_layout(big, 256, 16, 2)
    for num_tokens in (300, 1000, 5000):
        small = torch.randint(-1, 8, (num_tokens, 2), device="cuda")
        got = ops.get_dispatch_layout(small, 8, 2)
        want = reference.get_dispatch_layout(small, 8, 2, 1)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), num_tokens
