"""``deep_ep_ops.nn``: the expert-parallel MoE layer against a dense single-process MoE.

Each job runs one forward and backward of ``ExampleMoE`` on every rank of a gloo pool and
returns what the test process compares with ``DenseMoE`` (all experts, all ranks' tokens, no
communication, built from the same seeds): the outputs, the loss, the input gradients, the
router gradients summed over ranks (the router is replicated) and every expert's parameter
gradients (each computed on its owner rank, from every rank's tokens).

The distributed and dense runs add the same float products in different orders (per-rank
partial sums, then the combine), so they agree to rounding: float64 to ~1e-15 relative.
"""

import pytest
import torch

from distributed import run_on_ranks

from deep_ep_ops.nn import MODES, DenseMoE, MoEDispatcher

HIDDEN, FFN_HIDDEN, LOCAL_EXPERTS, TOP_K, SEED = 16, 24, 3, 2, 3
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Norm-wise relative tolerance (max|a - b| <= TOL * max|b|) for reordered float sums.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _inputs(world_size, tokens, dtype):
    """Every rank's ``(x, target)``; the same on every process."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(tokens[r], HIDDEN, generator=g, dtype=dtype) for r in range(world_size)]
    targets = [torch.randn(tokens[r], HIDDEN, generator=g, dtype=dtype) for r in range(world_size)]
    return xs, targets


def _make_layer(rank, world_size, mode, dtype, max_tokens, use_fp8=False):
    import torch.distributed as dist

    from deep_ep_ops import Buffer
    from deep_ep_ops.nn import ExampleMoE, buffer_size_hints

    num_experts = LOCAL_EXPERTS * world_size
    num_nvl_bytes, num_rdma_bytes = buffer_size_hints(
        HIDDEN, world_size, num_experts, element_size=dtype.itemsize,
        num_max_dispatch_tokens_per_rank=max_tokens,
    )
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True)
    dispatcher = MoEDispatcher(
        buffer, num_experts, mode, use_fp8=use_fp8,
        num_max_dispatch_tokens_per_rank=max_tokens if mode == "low_latency" else None,
    )
    moe = ExampleMoE(dispatcher, HIDDEN, FFN_HIDDEN, TOP_K, rank=rank, seed=SEED, dtype=dtype)
    return buffer, moe


def _forward_backward_job(rank, world_size, mode, dtype_name, tokens):
    dtype = DTYPES[dtype_name]
    buffer, moe = _make_layer(rank, world_size, mode, dtype, max(tokens))
    xs, targets = _inputs(world_size, tokens, dtype)
    x = xs[rank].clone().requires_grad_()
    out = moe(x)
    loss = ((out - targets[rank]) ** 2).sum()
    loss.backward()
    num_local = len(moe.experts)
    result = dict(
        out=out.detach(), loss=loss.detach(), grad_x=x.grad, grad_router=moe.router.weight.grad,
        grad_experts={
            rank * num_local + l: [p.grad for p in expert.parameters()]
            for l, expert in enumerate(moe.experts)
        },
    )
    buffer.destroy()
    return result


def _dense(world_size, tokens, dtype):
    dense = DenseMoE(HIDDEN, FFN_HIDDEN, LOCAL_EXPERTS * world_size, TOP_K, seed=SEED, dtype=dtype)
    xs, targets = _inputs(world_size, tokens, dtype)
    x = torch.cat(xs).requires_grad_()
    out = dense(x)
    loss = ((out - torch.cat(targets)) ** 2).sum()
    loss.backward()
    return dense, x, out, loss


def _assert_close(actual, expected, tolerance, what):
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((actual - expected).abs().max() / scale)
    assert error <= tolerance, f"{what}: max|diff|/max|ref| = {error:.2e} > {tolerance:g}"


def _check_against_dense(world_size, mode, dtype, tokens):
    results = run_on_ranks(
        world_size, _forward_backward_job, mode, str(dtype).split(".")[-1], tokens
    )
    dense, x, out, loss = _dense(world_size, tokens, dtype)
    tolerance = TOLERANCE[dtype]
    _assert_close(torch.cat([r["out"] for r in results]), out.detach(), tolerance, "output")
    _assert_close(sum(r["loss"] for r in results), loss.detach(), tolerance, "loss")
    _assert_close(torch.cat([r["grad_x"] for r in results]), x.grad, tolerance, "grad x")
    _assert_close(
        sum(r["grad_router"] for r in results), dense.router.weight.grad, tolerance,
        "grad router (through topk_weights)",
    )
    experts = {e: grads for r in results for e, grads in r["grad_experts"].items()}
    assert sorted(experts) == list(range(len(dense.experts)))
    for e, grads in experts.items():
        for grad, param in zip(grads, dense.experts[e].parameters()):
            _assert_close(grad, param.grad, tolerance, f"grad of expert {e}")
    # Not vacuous: every expert got tokens and the router got a gradient.
    assert all(g.abs().sum() > 0 for grads in experts.values() for g in grads)
    assert dense.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [1, 2])
def test_moe_layer_matches_dense(world_size, mode):
    _check_against_dense(world_size, mode, torch.float64, [12] * world_size)


@pytest.mark.parametrize("mode", MODES)
def test_moe_layer_matches_dense_float32(mode):
    _check_against_dense(2, mode, torch.float32, [12, 12])


def test_moe_layer_normal_mode_uneven_tokens():
    # Data-dependent mode: ranks may hold different numbers of tokens.
    _check_against_dense(2, "normal", torch.float64, [5, 13])


def test_moe_layer_low_latency_fewer_tokens_than_capacity():
    # Low latency: T <= M; the static [L, R*M, H] slabs are only partly filled.
    _check_against_dense(2, "low_latency", torch.float64, [4, 9])


@pytest.mark.parametrize("mode", ["capacity", "low_latency"])
def test_moe_layer_matches_dense_4_ranks(mode):
    _check_against_dense(4, mode, torch.float64, [6] * 4)


# --- FP8 low-latency dispatch (inference) ---------------------------------------------------


def _quantize_dequantize(x):
    from deep_ep_ops import per_token_cast_to_fp8

    x_fp8, scales = per_token_cast_to_fp8(x)
    groups = x_fp8.float().view(x.size(0), -1, 128) * scales.unsqueeze(-1)
    return groups.view(x.shape)


def _fp8_forward_job(rank, world_size, tokens):
    import torch.distributed as dist

    from deep_ep_ops import Buffer
    from deep_ep_ops.nn import ExampleMoE, buffer_size_hints

    hidden, num_experts = 128, LOCAL_EXPERTS * world_size
    _, num_rdma_bytes = buffer_size_hints(
        hidden, world_size, num_experts, num_max_dispatch_tokens_per_rank=tokens
    )
    buffer = Buffer(dist.group.WORLD, 0, num_rdma_bytes, low_latency_mode=True)
    dispatcher = MoEDispatcher(
        buffer, num_experts, "low_latency", num_max_dispatch_tokens_per_rank=tokens, use_fp8=True
    )
    moe = ExampleMoE(dispatcher, hidden, FFN_HIDDEN, TOP_K, rank=rank, seed=SEED)
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(tokens, hidden, generator=g) for _ in range(world_size)]
    with torch.no_grad():
        out = moe(xs[rank])
    buffer.destroy()
    return out


def test_low_latency_fp8_dispatch_matches_dense_on_quantized_tokens():
    """With ``use_fp8`` the experts see the FP8-rounded tokens (the router the exact ones)."""
    tokens = 5
    results = run_on_ranks(2, _fp8_forward_job, tokens)
    dense = DenseMoE(128, FFN_HIDDEN, LOCAL_EXPERTS * 2, TOP_K, seed=SEED)
    from deep_ep_ops.nn import route

    g = torch.Generator().manual_seed(11)
    xs = torch.cat([torch.randn(tokens, 128, generator=g) for _ in range(2)])
    topk_idx, topk_weights = route(dense.router(xs), TOP_K)
    xq = _quantize_dequantize(xs)
    expected = torch.zeros_like(xs)
    with torch.no_grad():
        for e, expert in enumerate(dense.experts):
            weight = torch.where(topk_idx == e, topk_weights, 0).sum(-1)
            expected += weight.unsqueeze(-1) * expert(xq)
    _assert_close(torch.cat(results), expected, 1e-5, "FP8 low-latency output")


# --- unspecified rows cannot leak ------------------------------------------------------------


def _garbage_rows_job(rank, world_size):
    """Fill every row the backend may leave unspecified with NaN; nothing may turn NaN."""
    from deep_ep_ops.nn import route

    results = {}
    for mode in ("capacity", "low_latency"):
        buffer, moe = _make_layer(rank, world_size, mode, torch.float32, 8)
        xs, _ = _inputs(world_size, [8] * world_size, torch.float32)
        x = xs[rank]
        topk_idx, topk_weights = route(moe.router(x), TOP_K)
        recv = moe.dispatcher(x, topk_idx, topk_weights)
        if mode == "capacity":
            padding = (recv.recv_topk_idx < 0).all(-1, keepdim=True)
            assert padding.any(), "capacity R*T must leave padding rows in this test"
            recv_x = torch.where(padding, float("nan"), recv.recv_x)
            expert_out = moe._weighted_experts(recv._replace(recv_x=recv_x))
        else:
            rows = torch.arange(recv.recv_x.size(1))
            past = (rows >= recv.num_recv_tokens_per_expert.unsqueeze(-1)).unsqueeze(-1)
            assert past.any()
            recv_x = torch.where(past, float("nan"), recv.recv_x)
            expert_out = moe._low_latency_experts(recv._replace(recv_x=recv_x), x.dtype)
        combined = moe.dispatcher.combine(expert_out, recv.state)
        combined.sum().backward()
        results[mode] = dict(
            output_finite=bool(torch.isfinite(combined).all()),
            grads_finite=all(bool(torch.isfinite(p.grad).all()) for p in moe.experts.parameters()),
        )
        buffer.destroy()
    return results


def test_unspecified_rows_do_not_leak_nan():
    for result in run_on_ranks(2, _garbage_rows_job):
        for mode, checks in result.items():
            assert checks == dict(output_finite=True, grads_finite=True), mode


# --- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="fast"), "mode must be one of"),
        (dict(mode="low_latency"), "needs num_max_dispatch_tokens_per_rank"),
        (dict(mode="normal", use_fp8=True), "use_fp8 is only supported"),
        (dict(mode="normal", num_worst_tokens=8), "num_worst_tokens is only used"),
    ],
)
def test_dispatcher_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEDispatcher("no-such-buffer", 8, **kwargs)
