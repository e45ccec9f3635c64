"""Autograd of the ``deep_ep`` ops (docs/DESIGN.md §7): ``gradcheck`` in float64 and dense models.

A communication op couples the ranks: rank r's outputs depend on every rank's inputs. Calling
``gradcheck`` on each rank's own inputs and outputs would mix rank r's perturbations with the
other ranks' (every rank perturbs at the same time). So each gradcheck is run on the *global*
function: every rank holds all ranks' inputs as one replicated flat vector and takes its own
slice (``Replicated.own``, whose backward all-reduces the gradient), and every rank returns all
ranks' outputs (``Replicated.share``, whose backward keeps this rank's slice). Every rank then
runs the same gradcheck on the same replicated values, so the number of evaluations, and the
collectives inside them, are the same everywhere.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops
import oracle
from deep_ep_ops import ops
from distributed import new_test_buffer, run_on_ranks

CONFIG = deep_ep_ops.Config().to_list()
F64 = torch.float64


# --- the global function seen from one rank ---------------------------------------------------


def _all_reduce(t: torch.Tensor) -> None:
    # With a timeout, so that a rank that failed elsewhere does not leave the others waiting
    # for the process group's much longer one.
    dist.all_reduce(t, async_op=True).wait(timeout=datetime.timedelta(seconds=20))


class _Own(torch.autograd.Function):
    """This rank's slice of a flat vector that every rank holds; backward all-reduces it."""

    @staticmethod
    def forward(ctx, flat, start, length):
        ctx.total, ctx.start, ctx.length = flat.numel(), start, length
        return flat[start : start + length].clone()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.total)
        full[ctx.start : ctx.start + ctx.length] = grad
        _all_reduce(full)  # disjoint slices: the sum is the concatenation, exactly
        return full, None, None


class _Share(torch.autograd.Function):
    """This rank's flat output placed in a vector of all ranks' outputs that every rank holds."""

    @staticmethod
    def forward(ctx, mine, start, total):
        ctx.start, ctx.length = start, mine.numel()
        full = mine.new_zeros(total)
        full[start : start + mine.numel()] = mine
        _all_reduce(full)
        return full

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.length].clone(), None, None


class Replicated:
    """Per-rank tensors of known numel laid end to end in one flat vector on every rank."""

    def __init__(self, numels: list[int], rank: int) -> None:
        self.numels, self.rank = numels, rank
        self.start = sum(numels[:rank])
        self.total = sum(numels)

    def own(self, flat: torch.Tensor, shape) -> torch.Tensor:
        return _Own.apply(flat, self.start, self.numels[self.rank]).view(shape)

    def share(self, *mine: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in mine])
        assert flat.numel() == self.numels[self.rank], (flat.numel(), self.numels, self.rank)
        return _Share.apply(flat, self.start, self.total)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).requires_grad_()


def _problem(seed, num_ranks, num_tokens, hidden, num_topk, num_experts):
    """All ranks' float64 inputs and routing (with -1 entries and duplicate experts)."""
    g = torch.Generator().manual_seed(seed)
    topk = [
        oracle.random_topk(num_tokens, num_experts, num_topk, g, allow_duplicates=True, p_neg=0.2)
        for _ in range(num_ranks)
    ]
    xs = [torch.randn(num_tokens, hidden, generator=g, dtype=F64) for _ in range(num_ranks)]
    ws = [torch.rand(num_tokens, num_topk, generator=g, dtype=F64) for _ in range(num_ranks)]
    is_in = [oracle.layout(t, num_experts, num_ranks)["is_token_in_rank"] for t in topk]
    num_recv = [sum(int(m[:, r].sum()) for m in is_in) for r in range(num_ranks)]
    return topk, xs, ws, num_recv


def _gradcheck(fn, inputs) -> bool:
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# --- normal mode ------------------------------------------------------------------------------

T, H, K, E = 4, 6, 3, 8


def _dispatch_job(rank, num_ranks, worst, shape, seed):
    buf = new_test_buffer()
    num_tokens, hidden, num_topk = shape
    topk, xs, ws, num_recv = _problem(seed, num_ranks, num_tokens, hidden, num_topk, E)
    layout = ops.get_dispatch_layout(topk[rank], E, num_ranks)
    rows = [worst or n for n in num_recv]
    x_in = Replicated([num_tokens * hidden] * num_ranks, rank)
    w_in = Replicated([num_tokens * num_topk] * num_ranks, rank)
    out_sh = Replicated([n * (hidden + num_topk) for n in rows], rank)

    def fn(x_all, w_all):
        out = ops.dispatch(
            buf.name, x_in.own(x_all, (num_tokens, hidden)), layout, topk[rank],
            w_in.own(w_all, (num_tokens, num_topk)), num_worst_tokens=worst, config=CONFIG,
        )
        return out_sh.share(out.recv_x, out.recv_topk_weights)

    ok = _gradcheck(fn, (_flat(xs), _flat(ws)))
    buf.destroy()
    return ok


@pytest.mark.parametrize("num_ranks,capacity", [
    (1, False), (1, True), (2, False), (2, True),
    (4, False),  # 4 ranks with a smaller problem: each gradcheck evaluation is 4 collectives
])
def test_dispatch_gradcheck(num_ranks, capacity):
    """dispatch w.r.t. x and topk_weights (recv_x and recv_topk_weights as outputs)."""
    shape = (T, H, K) if num_ranks < 4 else (3, 4, 2)
    worst = num_ranks * shape[0] if capacity else 0
    assert all(run_on_ranks(num_ranks, _dispatch_job, worst, shape, 2))


def _dispatched(buf, rank, num_ranks, worst):
    """A float64 dispatch whose handle the combine and cached-dispatch checks reuse."""
    topk, xs, ws, num_recv = _problem(2, num_ranks, T, H, K, E)
    layout = ops.get_dispatch_layout(topk[rank], E, num_ranks)
    out = ops.dispatch(
        buf.name, xs[rank], layout, topk[rank], ws[rank], num_worst_tokens=worst, config=CONFIG
    )
    return out, [worst or n for n in num_recv]


def _cached_dispatch_job(rank, num_ranks, worst):
    buf = new_test_buffer()
    out, rows = _dispatched(buf, rank, num_ranks, worst)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(T, H, generator=g, dtype=F64) for _ in range(num_ranks)]
    ws = [torch.rand(T, K, generator=g, dtype=F64) for _ in range(num_ranks)]
    x_in, w_in = Replicated([T * H] * num_ranks, rank), Replicated([T * K] * num_ranks, rank)
    out_sh = Replicated([n * (H + K) for n in rows], rank)

    def fn(x_all, w_all):
        recv_x, _, recv_w = ops.cached_dispatch(
            buf.name, x_in.own(x_all, (T, H)), out.handle, topk_weights=w_in.own(w_all, (T, K)),
            config=CONFIG,
        )
        return out_sh.share(recv_x, recv_w)

    ok = _gradcheck(fn, (_flat(xs), _flat(ws)))
    buf.destroy()
    return ok


@pytest.mark.parametrize("capacity", [False, True], ids=["data_dependent", "capacity"])
@pytest.mark.parametrize("num_ranks", [1, 2])
def test_cached_dispatch_gradcheck(num_ranks, capacity):
    """cached dispatch w.r.t. x and topk_weights along an earlier dispatch's handle."""
    worst = num_ranks * T if capacity else 0
    assert all(run_on_ranks(num_ranks, _cached_dispatch_job, worst))


def _combine_job(rank, num_ranks, worst, num_biases):
    buf = new_test_buffer()
    out, rows = _dispatched(buf, rank, num_ranks, worst)
    g = torch.Generator().manual_seed(4)
    ys = [torch.randn(n, H, generator=g, dtype=F64) for n in rows]
    ws = [torch.rand(n, K, generator=g, dtype=F64) for n in rows]
    biases = [[torch.randn(T, H, generator=g, dtype=F64) for _ in range(num_ranks)]
              for _ in range(num_biases)]
    y_in = Replicated([n * H for n in rows], rank)
    w_in = Replicated([n * K for n in rows], rank)
    bias_in = Replicated([T * H] * num_ranks, rank)
    out_sh = Replicated([T * (H + K)] * num_ranks, rank)

    def fn(y_all, w_all, *bias_all):
        bias = [bias_in.own(b, (T, H)) for b in bias_all]
        combined = ops.combine(
            buf.name, y_in.own(y_all, (rows[rank], H)), out.handle,
            topk_weights=w_in.own(w_all, (rows[rank], K)),
            bias=bias[0] if len(bias) == 1 else (tuple(bias) if bias else None), config=CONFIG,
        )
        return out_sh.share(combined.combined_x, combined.combined_topk_weights)

    ok = _gradcheck(fn, (_flat(ys), _flat(ws), *[_flat(b) for b in biases]))
    buf.destroy()
    return ok


@pytest.mark.parametrize("num_biases", [0, 1, 2], ids=["no_bias", "bias", "bias_pair"])
@pytest.mark.parametrize("capacity", [False, True], ids=["data_dependent", "capacity"])
@pytest.mark.parametrize("num_ranks", [1, 2])
def test_combine_gradcheck(num_ranks, capacity, num_biases):
    """combine w.r.t. x, topk_weights and the bias (one tensor or a pair)."""
    worst = num_ranks * T if capacity else 0
    assert all(run_on_ranks(num_ranks, _combine_job, worst, num_biases))


def _internode_job(rank, num_ranks, worst, op):
    """gradcheck of one internode op on a buffer of one rank per node (2 nodes at 2 ranks)."""
    buf = new_test_buffer(num_ranks_per_node=1)
    topk, xs, ws, num_recv = _problem(2, num_ranks, T, H, K, E)
    layout = ops.get_dispatch_layout(topk[rank], E, num_ranks, num_ranks)
    rows = [worst or n for n in num_recv]
    t_in = Replicated([T * H] * num_ranks, rank)
    tw_in = Replicated([T * K] * num_ranks, rank)
    if op == "dispatch":
        out_sh = Replicated([n * (H + K) for n in rows], rank)

        def fn(x_all, w_all):
            out = ops.internode_dispatch(
                buf.name, t_in.own(x_all, (T, H)), layout, topk[rank], tw_in.own(w_all, (T, K)),
                num_worst_tokens=worst, config=CONFIG)
            return out_sh.share(out.recv_x, out.recv_topk_weights)

        inputs = (_flat(xs), _flat(ws))
    else:
        handle = ops.internode_dispatch(buf.name, xs[rank], layout, topk[rank], ws[rank],
                                        num_worst_tokens=worst, config=CONFIG).handle
        g = torch.Generator().manual_seed(5)
        if op == "cached_dispatch":
            out_sh = Replicated([n * (H + K) for n in rows], rank)

            def fn(x_all, w_all):
                recv_x, _, recv_w = ops.internode_cached_dispatch(
                    buf.name, t_in.own(x_all, (T, H)), handle,
                    topk_weights=tw_in.own(w_all, (T, K)), config=CONFIG)
                return out_sh.share(recv_x, recv_w)

            inputs = (_flat([torch.randn(T, H, generator=g, dtype=F64) for _ in xs]),
                      _flat([torch.rand(T, K, generator=g, dtype=F64) for _ in xs]))
        else:
            y_in = Replicated([n * H for n in rows], rank)
            w_in = Replicated([n * K for n in rows], rank)
            out_sh = Replicated([T * (H + K)] * num_ranks, rank)

            def fn(y_all, w_all, bias_all):
                combined = ops.internode_combine(
                    buf.name, y_in.own(y_all, (rows[rank], H)), handle,
                    topk_weights=w_in.own(w_all, (rows[rank], K)),
                    bias=t_in.own(bias_all, (T, H)), config=CONFIG)
                return out_sh.share(combined.combined_x, combined.combined_topk_weights)

            inputs = (_flat([torch.randn(n, H, generator=g, dtype=F64) for n in rows]),
                      _flat([torch.rand(n, K, generator=g, dtype=F64) for n in rows]),
                      _flat([torch.randn(T, H, generator=g, dtype=F64) for _ in xs]))
    ok = _gradcheck(fn, inputs)
    buf.destroy()
    return ok


@pytest.mark.parametrize("capacity", [False, True], ids=["data_dependent", "capacity"])
@pytest.mark.parametrize("op", ["dispatch", "cached_dispatch", "combine"])
def test_internode_gradcheck(op, capacity):
    """The internode ops (2 nodes of 1 rank) w.r.t. their float inputs."""
    worst = 2 * T if capacity else 0
    assert all(run_on_ranks(2, _internode_job, worst, op))


# --- low-latency mode -------------------------------------------------------------------------

LL_T, LL_H, LL_K, LL_E, LL_M = 3, 4, 2, 4, 3


def _ll_dispatch_job(rank, num_ranks):
    buf = new_test_buffer()
    topk, xs, _, _ = _problem(5, num_ranks, LL_T, LL_H, LL_K, LL_E)
    rows = num_ranks * LL_M
    num_local = LL_E // num_ranks
    x_in = Replicated([LL_T * LL_H] * num_ranks, rank)
    out_sh = Replicated([num_local * rows * LL_H] * num_ranks, rank)

    def fn(x_all):
        out = ops.low_latency_dispatch(
            buf.name, x_in.own(x_all, (LL_T, LL_H)), topk[rank], LL_M, LL_E, use_fp8=False
        )
        # Rows past recv_count are unspecified: they are not part of the function.
        real = torch.arange(rows) < out.recv_count.unsqueeze(1)
        return out_sh.share(out.recv_x * real.unsqueeze(-1))

    ok = _gradcheck(fn, (_flat(xs),))
    buf.destroy()
    return ok


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_dispatch_gradcheck(num_ranks):
    """low_latency_dispatch (BF16 path, float64 here) w.r.t. x."""
    assert all(run_on_ranks(num_ranks, _ll_dispatch_job))


def _ll_combine_job(rank, num_ranks):
    buf = new_test_buffer()
    topk, xs, ws, _ = _problem(6, num_ranks, LL_T, LL_H, LL_K, LL_E)
    handle = ops.low_latency_dispatch(
        buf.name, xs[rank], topk[rank], LL_M, LL_E, use_fp8=False
    ).handle
    num_local = LL_E // num_ranks
    g = torch.Generator().manual_seed(7)
    expert_x = [torch.randn(num_local, num_ranks * LL_M, LL_H, generator=g, dtype=F64)
                for _ in range(num_ranks)]
    x_in = Replicated([expert_x[0].numel()] * num_ranks, rank)
    w_in = Replicated([LL_T * LL_K] * num_ranks, rank)
    out_sh = Replicated([LL_T * LL_H] * num_ranks, rank)

    def fn(x_all, w_all):
        combined = ops.low_latency_combine(
            buf.name, x_in.own(x_all, expert_x[0].shape), topk[rank],
            w_in.own(w_all, (LL_T, LL_K)), handle,
        )
        return out_sh.share(combined)

    ok = _gradcheck(fn, (_flat(expert_x), _flat(ws)))
    buf.destroy()
    return ok


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_combine_gradcheck(num_ranks):
    """low_latency_combine w.r.t. the expert outputs x and topk_weights."""
    assert all(run_on_ranks(num_ranks, _ll_combine_job))


# --- whole MoE layers against a dense single-process model ------------------------------------


def _dense_moe(xs, topk, ws, expert_w):
    """``out[t] = Σ_k [e_k >= 0] w[t, k] · x[t] @ W[e_k]`` for every rank's tokens."""
    outs = []
    for x, idx, w in zip(xs, topk, ws):
        per_k = torch.einsum("th,tkhg->tkg", x, expert_w[idx.clamp(min=0)])
        outs.append((per_k * (w * (idx >= 0)).unsqueeze(-1)).sum(1))
    return outs


def _dense_reference(xs, topk, ws, expert_w, grads_out):
    """Outputs and gradients of ``Σ_r <out_r, grads_out[r]>`` computed in one process."""
    xs = [x.clone().requires_grad_() for x in xs]
    ws = [w.clone().requires_grad_() for w in ws]
    expert_w = expert_w.clone().requires_grad_()
    outs = _dense_moe(xs, topk, ws, expert_w)
    sum((o * g).sum() for o, g in zip(outs, grads_out)).backward()
    return outs, [x.grad for x in xs], [w.grad for w in ws], expert_w.grad


def _moe_problem(num_ranks, num_tokens, hidden, num_topk, num_experts, seed):
    topk, xs, ws, _ = _problem(seed, num_ranks, num_tokens, hidden, num_topk, num_experts)
    g = torch.Generator().manual_seed(seed + 100)
    expert_w = torch.randn(num_experts, hidden, hidden, generator=g, dtype=F64)
    grads_out = [torch.randn(num_tokens, hidden, generator=g, dtype=F64) for _ in range(num_ranks)]
    return topk, xs, ws, expert_w, grads_out


def _close(name, actual, expected) -> list[str]:
    if torch.allclose(actual, expected, rtol=1e-10, atol=1e-12):
        return []
    return [f"{name}: max abs error {(actual - expected).abs().max().item():.3e}"]


def _compare_to_dense(rank, combined, x, w, local_w, xs, topk, ws, expert_w, grads_out):
    """Failures of this rank's MoE forward and gradients against the dense reference."""
    outs, x_grads, w_grads, expert_grad = _dense_reference(xs, topk, ws, expert_w, grads_out)
    num_local = local_w.size(0)
    return (
        _close("combined_x", combined.detach(), outs[rank])
        + _close("grad x", x.grad, x_grads[rank])
        + _close("grad topk_weights", w.grad, w_grads[rank])
        + _close("grad expert weights", local_w.grad,
                 expert_grad[rank * num_local : (rank + 1) * num_local])
    )


def _rank_leaves(rank, num_ranks, num_experts, xs, ws, expert_w):
    """This rank's tokens, top-k weights and local expert weights, as leaves needing grads."""
    num_local = num_experts // num_ranks
    x = xs[rank].clone().requires_grad_()
    w = ws[rank].clone().requires_grad_()
    local_w = expert_w[rank * num_local : (rank + 1) * num_local].clone().requires_grad_()
    return x, w, local_w


def _normal_moe_job(rank, num_ranks, capacity):
    buf = new_test_buffer()
    num_tokens, hidden, num_topk, num_experts = 6, 8, 3, 8
    topk, xs, ws, expert_w, grads_out = _moe_problem(
        num_ranks, num_tokens, hidden, num_topk, num_experts, seed=8
    )
    x, w, local_w = _rank_leaves(rank, num_ranks, num_experts, xs, ws, expert_w)

    layout = ops.get_dispatch_layout(topk[rank], num_experts, num_ranks)
    worst = num_ranks * num_tokens if capacity else 0
    out = ops.dispatch(
        buf.name, x, layout, topk[rank], w, num_worst_tokens=worst, config=CONFIG
    )
    # Expert computation: row j, entry k goes through local expert recv_topk_idx[j, k] with
    # weight recv_topk_weights[j, k] (-1 entries and capacity padding contribute nothing).
    idx = out.recv_topk_idx
    per_k = torch.einsum("nh,nkhg->nkg", out.recv_x, local_w[idx.clamp(min=0)])
    y = (per_k * (out.recv_topk_weights * (idx >= 0)).unsqueeze(-1)).sum(1)
    combined = ops.combine(buf.name, y, out.handle, config=CONFIG).combined_x
    (combined * grads_out[rank]).sum().backward()

    buf.destroy()
    return _compare_to_dense(rank, combined, x, w, local_w, xs, topk, ws, expert_w, grads_out)


@pytest.mark.parametrize("capacity", [False, True], ids=["data_dependent", "capacity"])
@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_dispatch_expert_combine_matches_dense_moe(num_ranks, capacity):
    """dispatch -> per-row expert matmul scaled by the received weight -> combine: forward and
    gradients (x, topk_weights, expert weights) equal a dense single-process MoE."""
    per_rank = run_on_ranks(num_ranks, _normal_moe_job, capacity)
    failures = [f"rank {r}: {f}" for r, fs in enumerate(per_rank) for f in fs]
    assert not failures, "\n".join(failures)


def _low_latency_moe_job(rank, num_ranks):
    buf = new_test_buffer()
    num_tokens, hidden, num_topk, num_experts, num_max = 5, 8, 3, 8, 6
    topk, xs, ws, expert_w, grads_out = _moe_problem(
        num_ranks, num_tokens, hidden, num_topk, num_experts, seed=9
    )
    x, w, local_w = _rank_leaves(rank, num_ranks, num_experts, xs, ws, expert_w)

    out = ops.low_latency_dispatch(
        buf.name, x, topk[rank], num_max, num_experts, use_fp8=False
    )
    y = torch.einsum("lnh,lhg->lng", out.recv_x, local_w)  # rows past recv_count are ignored
    combined = ops.low_latency_combine(buf.name, y, topk[rank], w, out.handle)
    (combined * grads_out[rank]).sum().backward()

    buf.destroy()
    return _compare_to_dense(rank, combined, x, w, local_w, xs, topk, ws, expert_w, grads_out)


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_low_latency_dispatch_expert_combine_matches_dense_moe(num_ranks):
    """low_latency_dispatch -> per-expert matmul -> weighted low_latency_combine: forward and
    gradients (x, topk_weights, expert weights) equal a dense single-process MoE."""
    per_rank = run_on_ranks(num_ranks, _low_latency_moe_job)
    failures = [f"rank {r}: {f}" for r, fs in enumerate(per_rank) for f in fs]
    assert not failures, "\n".join(failures)
