"""Every call form of the ``deep_ep`` ops and of ``Buffer`` with inputs that require grad.

The rule (``deep_ep_ops/_autograd.py``): a form reachable with an input requiring grad either
has a correct backward or raises at the call. Each differentiable form here runs a small MoE
layer (dispatch -> per-expert matmul -> combine, in float64 unless it needs BF16) at 1 and 2
gloo ranks and compares the forward and the gradients of every leaf (tokens, top-k weights,
expert weights, biases, ...) with a dense single-process model of all ranks, computed on every
rank from every rank's inputs. Forms that must raise are called and the error checked, then the
buffer is used again (an error must leave the communication in step).
"""

from __future__ import annotations

import pytest
import torch

import deep_ep_ops
import oracle
from deep_ep_ops import ops
from distributed import new_test_buffer, run_on_ranks

F64 = torch.float64
CONFIG = deep_ep_ops.Config().to_list()
T, H, K, E, M = 5, 8, 3, 8, 6  # tokens per rank, hidden, top-k, experts, max LL tokens
_ops = torch.ops.deep_ep


# --- problem and comparison ---------------------------------------------------------------


class Problem:
    """Every rank's inputs, rebuilt from a seed on every rank: routing with -1 entries and
    repeated experts, tokens, top-k weights, expert weights and output gradients."""

    def __init__(self, num_ranks: int, seed: int, hidden: int = H) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_ranks, self.hidden = num_ranks, hidden
        self.topk = [
            oracle.random_topk(T, E, K, g, allow_duplicates=True, p_neg=0.2)
            for _ in range(num_ranks)
        ]
        self.xs = [torch.randn(T, hidden, generator=g, dtype=F64) for _ in range(num_ranks)]
        self.ws = [torch.rand(T, K, generator=g, dtype=F64) for _ in range(num_ranks)]
        self.expert_w = torch.randn(E, hidden, hidden, generator=g, dtype=F64) / hidden**0.5
        self.grads = [torch.randn(T, hidden, generator=g, dtype=F64) for _ in range(num_ranks)]
        self.more = [torch.randn(T, hidden, generator=g, dtype=F64) for _ in range(4 * num_ranks)]

    def leaves(self, rank: int, dtype=F64):
        """This rank's tokens, weights and local expert weights as fresh leaves."""
        num_local = E // self.num_ranks
        local = self.expert_w[rank * num_local : (rank + 1) * num_local]
        return [t.to(dtype).clone().requires_grad_() for t in (self.xs[rank], self.ws[rank], local)]


def _dense_moe(xs, topk, ws, expert_w):
    """``out[t] = Σ_k [e_k >= 0] w[t, k] · x[t] @ W[e_k]`` for every rank's tokens."""
    outs = []
    for x, idx, w in zip(xs, topk, ws):
        per_k = torch.einsum("th,tkhg->tkg", x, expert_w[idx.clamp(min=0)])
        outs.append((per_k * (w * (idx >= 0)).unsqueeze(-1)).sum(1))
    return outs


def _dense_grads(model, inputs, rank: int):
    """``model(*inputs) -> (outs per rank, loss)``; returns this rank's outputs and the
    gradient of the loss with respect to every input (each a list over ranks, or a tensor)."""
    leaves = [
        [t.clone().requires_grad_() for t in v] if isinstance(v, list)
        else v.clone().requires_grad_()
        for v in inputs
    ]
    outs, loss = model(*leaves)
    loss.backward()
    grads = [[t.grad for t in v] if isinstance(v, list) else v.grad for v in leaves]
    return outs[rank].detach(), grads


class Diffs:
    def __init__(self, where: str) -> None:
        self.where, self.messages = where, []

    def close(self, name, actual, expected, rtol=1e-9, atol=1e-11, rel=0.0) -> None:
        """Within ``atol + rtol·|expected|``, plus ``rel·max|expected|`` (for BF16 forms)."""
        if actual is None:
            self.messages.append(f"{self.where} {name}: no gradient (None)")
            return
        actual, expected = actual.detach().to(F64), expected.detach().to(F64)
        atol = atol + rel * expected.abs().max().item()
        if actual.shape != expected.shape:
            self.messages.append(f"{self.where} {name}: shape {tuple(actual.shape)} != "
                                 f"{tuple(expected.shape)}")
        elif not torch.allclose(actual, expected, rtol=rtol, atol=atol):
            err = (actual - expected).abs().max().item()
            scale = expected.abs().max().item()
            self.messages.append(f"{self.where} {name}: max abs error {err:.3e} (max |expected| "
                                 f"{scale:.3e})")

    def check(self, name, ok: bool, detail: str = "") -> None:
        if not ok:
            self.messages.append(f"{self.where} {name}: {detail}")

    def raises(self, name, fn, *needles) -> None:
        """``fn()`` must raise a RuntimeError/ValueError whose message has every needle."""
        try:
            fn()
        except (RuntimeError, ValueError) as error:
            missing = [n for n in needles if n not in str(error)]
            self.check(name, not missing, f"message {str(error)[:300]!r} lacks {missing}")
            return
        self.messages.append(f"{self.where} {name}: did not raise")


def _moe_loss_model(p: Problem):
    """Dense model of the MoE forms: the loss ``Σ_r <out_r, grads_r>``."""

    def model(xs, ws, expert_w):
        outs = _dense_moe(xs, p.topk, ws, expert_w)
        return outs, sum((o * g).sum() for o, g in zip(outs, p.grads))

    return model


def _check_moe(d: Diffs, p: Problem, rank, out, x, w, local_w, **tolerance):
    """Forward and gradients of x, topk_weights and the local expert weights vs the dense model."""
    want, (gx, gw, gW) = _dense_grads(_moe_loss_model(p), (p.xs, p.ws, p.expert_w), rank)
    num_local = E // p.num_ranks
    d.close("out", out, want, **tolerance)
    d.close("grad x", x.grad, gx[rank], **tolerance)
    d.close("grad topk_weights", w.grad, gw[rank], **tolerance)
    d.close("grad expert weights", local_w.grad,
            gW[rank * num_local : (rank + 1) * num_local], **tolerance)


def _experts_per_row(recv_x, recv_idx, recv_w, local_w):
    """Normal-mode experts: row j, entry k through local expert recv_idx[j, k], weighted."""
    per_k = torch.einsum("nh,nkhg->nkg", recv_x, local_w[recv_idx.clamp(min=0)])
    return (per_k * (recv_w * (recv_idx >= 0)).unsqueeze(-1)).sum(1)


def _layout(buf, topk):
    per_rank, per_node, per_expert, is_in, _ = buf.get_dispatch_layout(topk, E)
    return dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=is_in, num_tokens_per_expert=per_expert)


def _assert_ranks(per_rank):
    failures = [m for messages in per_rank for m in messages]
    assert not failures, "\n".join(failures)


# --- normal mode ---------------------------------------------------------------------------


def _normal_job(rank, num_ranks, form):
    # "internode ...": a node per rank, so that Buffer takes the internode ops (at 2 ranks).
    internode = form.startswith("internode")
    buf = new_test_buffer(num_ranks_per_node=1 if internode else None)
    form = form.removeprefix("internode ")
    p = Problem(num_ranks, seed=11)
    d = Diffs(f"rank {rank}/{num_ranks} {'internode ' * internode}{form}")
    x, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    layout = _layout(buf, topk)
    worst = num_ranks * T if form in ("capacity", "cached capacity") else 0
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
        x, topk_idx=topk, topk_weights=w, num_worst_tokens=worst, config=CONFIG, **layout
    )
    if form.startswith("cached"):
        # Dispatch a second tensor along the handle (x2 plays the tokens, x only routes).
        x2 = p.more[rank].clone().requires_grad_()
        recv_x, *_ = buf.dispatch(x2, handle=handle, config=CONFIG)
    y = _experts_per_row(recv_x, recv_idx, recv_w, local_w)
    combined, _, _ = buf.combine(y, handle, config=CONFIG)
    (combined * p.grads[rank]).sum().backward()
    if form.startswith("cached"):
        # The dense model with x2 as the tokens; x gets no gradient (it only routed).
        p_cached = Problem(num_ranks, seed=11)
        p_cached.xs = p.more[:num_ranks]
        _check_moe(d, p_cached, rank, combined, x2, w, local_w)
        d.check("grad x of the routing-only dispatch", x.grad is None or bool((x.grad == 0).all()),
                "x only routed but got a gradient")
    else:
        _check_moe(d, p, rank, combined, x, w, local_w)
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("form", ["data dependent", "capacity", "cached", "cached capacity",
                                  "internode data dependent", "internode capacity",
                                  "internode cached capacity"])
@pytest.mark.parametrize("num_ranks", [1, 2])
def test_normal_dispatch_with_topk_weights(num_ranks, form):
    """Buffer.dispatch (top-k weights; data-dependent or capacity; cached along the handle)
    -> weighted per-row experts -> Buffer.combine: x/x2, topk_weights and expert weights; the
    "internode" forms on a buffer of one rank per node (the internode ops at 2 ranks)."""
    _assert_ranks(run_on_ranks(num_ranks, _normal_job, form))


def _no_topk_job(rank, num_ranks):
    """Dispatch by layout only (no top-k): rank r applies its matrix A_r to the rows it got."""
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=12)
    d = Diffs(f"rank {rank}/{num_ranks} no top-k")
    x = p.xs[rank].clone().requires_grad_()
    g = torch.Generator().manual_seed(120)
    mats = [torch.randn(H, H, generator=g, dtype=F64) for _ in range(num_ranks)]
    a = mats[rank].clone().requires_grad_()
    layout = _layout(buf, p.topk[rank])
    layout.pop("num_tokens_per_expert")
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(x, config=CONFIG, **layout)
    d.check("no top-k outputs", recv_idx is None and recv_w is None, "top-k outputs returned")
    combined, _, _ = buf.combine(recv_x @ a, handle, config=CONFIG)
    (combined * p.grads[rank]).sum().backward()
    is_in = [oracle.layout(t, E, num_ranks)["is_token_in_rank"] for t in p.topk]

    def model(xs, mats):  # out[t] = Σ_{r: token t in rank r} x[t] @ A_r
        outs = [sum((x_ @ a_) * is_in_[:, r : r + 1] for r, a_ in enumerate(mats))
                for x_, is_in_ in zip(xs, is_in)]
        return outs, sum((o * g_).sum() for o, g_ in zip(outs, p.grads))

    want, (gx, ga) = _dense_grads(model, (p.xs, mats), rank)
    d.close("out", combined, want)
    d.close("grad x", x.grad, gx[rank])
    d.close("grad A", a.grad, ga[rank])
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_normal_dispatch_without_topk(num_ranks):
    """Buffer.dispatch without top-k (layout only) -> per-rank matmul -> Buffer.combine."""
    _assert_ranks(run_on_ranks(num_ranks, _no_topk_job))


def _combine_job(rank, num_ranks, form):
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=13)
    d = Diffs(f"rank {rank}/{num_ranks} combine {form}")
    x, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
        x, topk_idx=topk, topk_weights=w, config=CONFIG, **_layout(buf, topk)
    )
    y = _experts_per_row(recv_x, recv_idx, recv_w, local_w)
    biases = [b.clone().requires_grad_() for b in (p.more[rank], p.more[num_ranks + rank])]
    g_w = p.more[2 * num_ranks + rank][:, :K]  # gradient of combined_topk_weights
    if form == "weights":
        combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, config=CONFIG)
        loss = (combined * p.grads[rank]).sum() + (combined_w * g_w).sum()
    else:
        bias = biases[0] if form == "bias" else tuple(biases)
        combined, combined_w, _ = buf.combine(y, handle, bias=bias, config=CONFIG)
        d.check("no combined weights without topk_weights", combined_w is None, "returned")
        loss = (combined * p.grads[rank]).sum()
    loss.backward()
    num_bias = {"weights": 0, "bias": 1, "bias pair": 2}[form]
    g_ws = [t[:, :K] for t in p.more[2 * num_ranks : 3 * num_ranks]]

    def model(xs, ws, expert_w, b0s, b1s):
        outs = _dense_moe(xs, p.topk, ws, expert_w)
        outs = [o + sum([b0, b1][:num_bias]) for o, b0, b1 in zip(outs, b0s, b1s)]
        loss = sum((o * g).sum() for o, g in zip(outs, p.grads))
        if form == "weights":  # combined weights: Σ over ranks of the received (masked) ones
            loss = loss + sum(((w_ * (t >= 0)) * g).sum() for w_, t, g in zip(ws, p.topk, g_ws))
        return outs, loss

    b0s, b1s = p.more[:num_ranks], p.more[num_ranks : 2 * num_ranks]
    want, (gx, gw, gW, gb0, gb1) = _dense_grads(model, (p.xs, p.ws, p.expert_w, b0s, b1s), rank)
    num_local = E // num_ranks
    d.close("out", combined, want)
    d.close("grad x", x.grad, gx[rank])
    d.close("grad topk_weights", w.grad, gw[rank])
    d.close("grad expert weights", local_w.grad, gW[rank * num_local : (rank + 1) * num_local])
    if form == "weights":
        d.close("combined_topk_weights", combined_w, p.ws[rank] * (topk >= 0))
    for i in range(num_bias):
        d.close(f"grad bias {i}", biases[i].grad, (gb0, gb1)[i][rank])
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("form", ["weights", "bias", "bias pair"])
@pytest.mark.parametrize("num_ranks", [1, 2])
def test_normal_combine(num_ranks, form):
    """Buffer.combine with topk_weights (combined weights in the loss), a bias tensor, a bias
    pair: x, topk_weights, expert weights and bias gradients."""
    _assert_ranks(run_on_ranks(num_ranks, _combine_job, form))


def _fp8_normal_job(rank, num_ranks):
    """FP8 payload: only topk_weights is differentiable; x_scales requiring grad raises."""
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=14, hidden=128)
    d = Diffs(f"rank {rank}/{num_ranks} fp8 dispatch")
    _, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    layout = _layout(buf, topk)
    x_fp8, scales = ops.per_token_cast_to_fp8(p.xs[rank].float())
    d.raises("x_scales requiring grad", lambda: buf.dispatch(
        (x_fp8, scales.clone().requires_grad_()), topk_idx=topk, topk_weights=w, config=CONFIG,
        **layout), "x_scales", "not differentiable")
    d.check("no gradient left by the raise", w.grad is None, "topk_weights got one")
    (recv_fp8, recv_scales), recv_idx, recv_w, _, handle, _ = buf.dispatch(
        (x_fp8, scales), topk_idx=topk, topk_weights=w, config=CONFIG, **layout
    )
    recv_x = ops.per_token_cast_back(recv_fp8, recv_scales).to(F64)
    y = _experts_per_row(recv_x, recv_idx, recv_w, local_w)
    combined, _, _ = buf.combine(y, handle, config=CONFIG)
    (combined * p.grads[rank]).sum().backward()
    quantized = [ops.per_token_cast_back(*ops.per_token_cast_to_fp8(x.float())).to(F64)
                 for x in p.xs]
    p.xs = quantized  # the experts see the FP8-rounded tokens
    want, (_, gw, gW) = _dense_grads(_moe_loss_model(p), (p.xs, p.ws, p.expert_w), rank)
    num_local = E // num_ranks
    d.close("out", combined, want)
    d.close("grad topk_weights", w.grad, gw[rank])
    d.close("grad expert weights", local_w.grad, gW[rank * num_local : (rank + 1) * num_local])
    buf.destroy()
    return d.messages


def test_normal_fp8_dispatch():
    """FP8 (values, scales) dispatch: topk_weights and expert weights get gradients (dense
    model on the quantised tokens); x_scales requiring grad raises at the call."""
    _assert_ranks(run_on_ranks(2, _fp8_normal_job))


# --- low-latency mode ----------------------------------------------------------------------

LL_FORMS = {  # name -> (dispatch hook, combine hook, out=, zero_copy)
    "fused": (False, False, False, False),
    "dispatch hook": (True, False, False, False),
    "combine hook": (False, True, False, False),
    "out=": (False, False, True, False),
    "combine hook + out=": (False, True, True, False),
    "both hooks + out=": (True, True, True, False),
    "zero_copy": (False, False, False, True),
    "zero_copy + hooks": (True, True, False, True),
}


def _ll_job(rank, num_ranks, form):
    dispatch_hook, combine_hook, use_out, zero_copy = LL_FORMS[form]
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=21)
    d = Diffs(f"rank {rank}/{num_ranks} low-latency {form}")
    # The zero-copy buffer is BF16: the whole layer runs in BF16 (leaves in float64).
    dtype = torch.bfloat16 if zero_copy else F64
    x, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    stats = torch.zeros(E // num_ranks, dtype=torch.int32)
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(
        x.to(dtype), topk, M, E, cumulative_local_expert_recv_stats=stats, use_fp8=False,
        return_recv_hook=dispatch_hook,
    )
    d.check("hook", (hook is not None) == dispatch_hook, "hook presence")
    if hook is not None:
        hook()
        d.check("recv_x produced by the send", "LowLatencyDispatchSend" in type(
            recv_x.grad_fn).__name__, f"grad_fn is {type(recv_x.grad_fn).__name__}")
    d.check("cumulative stats", torch.equal(stats, recv_count), f"{stats} != {recv_count}")
    y = torch.einsum("lnh,lhg->lng", recv_x, local_w.to(dtype))  # rows past recv_count: ignored
    if zero_copy:
        target = buf.get_next_low_latency_combine_buffer(handle)
        target.copy_(y)
        y = target
    out = torch.full((T, H), float("nan"), dtype=dtype) if use_out else None
    combined, _, hook = buf.low_latency_combine(
        y, topk, w.to(torch.float32 if zero_copy else F64), handle, zero_copy=zero_copy,
        return_recv_hook=combine_hook, out=out,
    )
    d.check("combine hook", (hook is not None) == combine_hook, "hook presence")
    if hook is not None:
        hook()
    if use_out:
        d.check("out returned", combined is out, "the result is not out")
    (combined.to(F64) * p.grads[rank]).sum().backward()
    if zero_copy:  # BF16 rounding of tokens, weights, matmul and sums
        _check_moe(d, p, rank, combined, x, w, local_w, rtol=0, rel=1e-2)
    else:
        _check_moe(d, p, rank, combined, x, w, local_w)
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("form", list(LL_FORMS))
@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_forms(num_ranks, form):
    """Buffer.low_latency_dispatch (BF16; fused or return_recv_hook) -> per-expert matmul ->
    Buffer.low_latency_combine (fused, hook, out=, hook + out=, zero_copy): x, topk_weights
    and expert weights against the dense MoE."""
    _assert_ranks(run_on_ranks(num_ranks, _ll_job, form))


def _ll_raw_split_job(rank, num_ranks):
    """The raw split ops, as a graph would call them: grad_fn stays the send's."""
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=22)
    d = Diffs(f"rank {rank}/{num_ranks} raw split ops")
    x, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    ll = (buf.name, num_ranks, M, E)
    sent = _ops.low_latency_dispatch_send(x, topk, *ll, False, False, False)
    versions = [t._version for t in sent]
    _ops.low_latency_dispatch_recv(*sent, None, buf.name)
    d.check("dispatch recv bumps versions", all(
        t._version > v for t, v in zip(sent, versions)), "versions unchanged")
    recv_x, _, _, src_info, layout_range = sent
    d.check("recv_x grad_fn", "LowLatencyDispatchSend" in type(recv_x.grad_fn).__name__,
            type(recv_x.grad_fn).__name__)
    y = torch.einsum("lnh,lhg->lng", recv_x, local_w)
    pending = _ops.low_latency_combine_send(y, topk, w, src_info, layout_range, *ll, False)
    _ops.low_latency_combine_recv(pending, topk, w, buf.name)
    d.check("combined grad_fn", "low_latency_combine_send" in type(pending.grad_fn).__name__,
            type(pending.grad_fn).__name__)
    (pending * p.grads[rank]).sum().backward()
    _check_moe(d, p, rank, pending, x, w, local_w)
    # A receive into a leaf that requires grad raises (as any in-place op on one).
    leaf = torch.zeros(T, H, dtype=F64, requires_grad=True)
    d.raises("combine recv into a leaf", lambda: _ops.low_latency_combine_recv(
        leaf, topk, w, buf.name), "low_latency_combine_recv", "leaf")
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_raw_split_ops(num_ranks):
    """torch.ops.deep_ep.low_latency_{dispatch,combine}_{send,recv} directly."""
    _assert_ranks(run_on_ranks(num_ranks, _ll_raw_split_job))


def _ll_double_backward_job(rank, num_ranks):
    """Second derivatives through the low-latency layer: the backward formulas call
    low_latency_combine / cached_dispatch / gather, which must differentiate in turn."""
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=23)
    d = Diffs(f"rank {rank}/{num_ranks} low-latency double backward")
    x, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    out = ops.low_latency_dispatch(buf.name, x, topk, M, E, use_fp8=False)
    y = torch.einsum("lnh,lhg->lng", out.recv_x, local_w)
    combined = ops.low_latency_combine(buf.name, y, topk, w, out.handle)
    first = torch.autograd.grad((combined * p.grads[rank]).sum(), (x, w, local_w),
                                create_graph=True)
    vs = [p.more[rank], p.more[num_ranks + rank][:, :K], p.expert_w[: E // num_ranks] * 0.5]
    sum((g * v).sum() for g, v in zip(first, vs)).backward()
    num_local = E // num_ranks
    vs_all = [p.more[:num_ranks], [m[:, :K] for m in p.more[num_ranks : 2 * num_ranks]],
              torch.cat([p.expert_w[:num_local] * 0.5] * num_ranks)]

    def model(xs, ws, expert_w):
        outs = _dense_moe(xs, p.topk, ws, expert_w)
        loss = sum((o * g).sum() for o, g in zip(outs, p.grads))
        *gxw, gW = torch.autograd.grad(loss, (*xs, *ws, expert_w), create_graph=True)
        gx, gw = gxw[:num_ranks], gxw[num_ranks:]
        second = sum((a * b).sum() for a, b in zip(gx, vs_all[0]))
        second = second + sum((a * b).sum() for a, b in zip(gw, vs_all[1]))
        return outs, second + (gW * vs_all[2]).sum()

    want, (gx, gw, gW) = _dense_grads(model, (p.xs, p.ws, p.expert_w), rank)
    d.close("out", combined, want)
    d.close("grad² x", x.grad, gx[rank])
    d.close("grad² topk_weights", w.grad, gw[rank])
    d.close("grad² expert weights", local_w.grad, gW[rank * num_local : (rank + 1) * num_local])
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_double_backward(num_ranks):
    """grad of <grads, v> through dispatch -> experts -> combine (create_graph=True)."""
    _assert_ranks(run_on_ranks(num_ranks, _ll_double_backward_job))


def _ll_helpers_job(rank, num_ranks):
    """The backward helpers called directly: low_latency_cached_dispatch (x, topk_weights)
    then experts then combine; low_latency_gather of the expert outputs."""
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=24)
    d = Diffs(f"rank {rank}/{num_ranks} low-latency helpers")
    x, w, local_w = p.leaves(rank)
    topk = p.topk[rank]
    ll = (buf.name, num_ranks, M, E)
    handle = ops.low_latency_dispatch(buf.name, p.xs[rank], topk, M, E, use_fp8=False).handle
    h = (handle.src_info, handle.layout_range)
    w2 = p.more[rank][:, :K].abs().clone().requires_grad_()
    # cached dispatch: row (e, slot t) = Σ_{k: e_k = e} w[t, k] x[t]; combine with w2.
    rows = _ops.low_latency_cached_dispatch(x, topk, w, *h, *ll)
    y = torch.einsum("lnh,lhg->lng", rows, local_w)
    combined = _ops.low_latency_combine(y, topk, w2, *h, *ll, False)
    # gather of the same expert outputs: [T, K, H], row of each (t, k).
    gathered = _ops.low_latency_gather(y, topk, *h, *ll)
    g_k = p.more[num_ranks + rank].unsqueeze(1) * torch.arange(1, K + 1, dtype=F64).view(1, K, 1)
    ((combined * p.grads[rank]).sum() + (gathered * g_k).sum()).backward()
    w2s = [m[:, :K].abs() for m in p.more[:num_ranks]]
    g_ks = [m.unsqueeze(1) * torch.arange(1, K + 1, dtype=F64).view(1, K, 1)
            for m in p.more[num_ranks : 2 * num_ranks]]

    def model(xs, ws, expert_w, w2s):
        outs, loss = [], 0
        for x_, idx, w_, w2_, g, gk in zip(xs, p.topk, ws, w2s, p.grads, g_ks):
            valid = idx >= 0
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)) & valid.unsqueeze(1)  # [T, K, K']
            summed = (same * w_.unsqueeze(1)).sum(2)  # Σ_{k': e_k' = e_k} w[t, k']
            per_k = torch.einsum("th,tkhg->tkg", x_, expert_w[idx.clamp(min=0)])
            rows_k = per_k * (summed * valid).unsqueeze(-1)  # the expert output of (t, k)
            outs.append((rows_k * (w2_ * valid).unsqueeze(-1)).sum(1))
            loss = loss + (outs[-1] * g).sum() + (rows_k * gk).sum()
        return outs, loss

    want, (gx, gw, gW, gw2) = _dense_grads(model, (p.xs, p.ws, p.expert_w, w2s), rank)
    num_local = E // num_ranks
    d.close("out", combined, want)
    d.close("grad x (cached dispatch)", x.grad, gx[rank])
    d.close("grad topk_weights (cached dispatch)", w.grad, gw[rank])
    d.close("grad expert weights (gather, combine)", local_w.grad,
            gW[rank * num_local : (rank + 1) * num_local])
    d.close("grad combine weights", w2.grad, gw2[rank])
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_backward_helpers(num_ranks):
    """low_latency_cached_dispatch and low_latency_gather called with inputs requiring grad."""
    _assert_ranks(run_on_ranks(num_ranks, _ll_helpers_job))


# --- forms that raise at the call ----------------------------------------------------------


def _ll_raising_job(rank, num_ranks):
    buf = new_test_buffer()
    p = Problem(num_ranks, seed=25, hidden=128)  # FP8 needs whole 128-channel groups
    d = Diffs(f"rank {rank}/{num_ranks} raising forms")
    x, w, local_w = p.leaves(rank, torch.bfloat16)
    topk = p.topk[rank]
    ll = (buf.name, num_ranks, M, E)
    fp8 = ("use_fp8",)
    d.raises("Buffer FP8 dispatch", lambda: buf.low_latency_dispatch(x, topk, M, E, use_fp8=True),
             "low_latency_dispatch", *fp8)
    d.raises("Buffer FP8 dispatch hook", lambda: buf.low_latency_dispatch(
        x, topk, M, E, use_fp8=True, return_recv_hook=True), "low_latency_dispatch_send", *fp8)
    d.raises("op FP8 dispatch", lambda: _ops.low_latency_dispatch(x, topk, *ll, True, True, False),
             "low_latency_dispatch", *fp8)
    d.raises("op FP8 dispatch send", lambda: _ops.low_latency_dispatch_send(
        x, topk, *ll, True, False, False), "low_latency_dispatch_send", *fp8)
    # FP8 without gradients is fine: under no_grad, and with a detached x.
    with torch.no_grad():
        (q, _), count, *_ = buf.low_latency_dispatch(x, topk, M, E, use_fp8=True)
    (q2, _), _, _, _, hook = buf.low_latency_dispatch(
        x.detach(), topk, M, E, use_fp8=True, return_recv_hook=True)
    hook()
    d.check("FP8 without grad", q.dtype == q2.dtype == torch.float8_e4m3fn
            and torch.equal(q.view(torch.uint8), q2.view(torch.uint8)), "outputs differ")

    # The out= op itself: raises before writing out, without or with top-k weights needing grad.
    out = ops.low_latency_dispatch(buf.name, x, topk, M, E, use_fp8=False)
    y = torch.einsum("lnh,lhg->lng", out.recv_x, local_w)
    h = (out.handle.src_info, out.handle.layout_range)
    target = torch.full((T, 128), 7.0, dtype=torch.bfloat16)
    w32 = w.float()
    for label, args in (("x and weights", (y, w32)), ("weights only", (y.detach(), w32)),
                        ("x only", (y, w32.detach()))):
        d.raises(f"low_latency_combine_out ({label})", lambda: _ops.low_latency_combine_out(
            args[0], topk, args[1], *h, *ll, False, target), "low_latency_combine_out",
            "grad, but", "deep_ep::low_latency_combine (", "Buffer.low_latency_combine")
    d.check("out untouched by the raise", bool((target == 7).all()), "out was written")
    with torch.no_grad():
        _ops.low_latency_combine_out(y, topk, w32, *h, *ll, False, target)
    functional = ops.low_latency_combine(buf.name, y, topk, w32, out.handle)
    d.check("out= without grad", torch.equal(target, functional.detach()), "differs")
    # The typed wrapper's out= raises (the op's message) or differentiates correctly.
    target2 = torch.zeros(T, 128, dtype=torch.bfloat16)
    try:
        returned = ops.low_latency_combine(buf.name, y, topk, w32, out.handle, out=target2)
    except RuntimeError as error:
        d.check("ops.low_latency_combine(out=) message", "low_latency_combine_out" in str(error),
                str(error)[:200])
    else:
        (g_a,) = torch.autograd.grad((returned.float() * 3).sum(), local_w, retain_graph=True)
        (g_b,) = torch.autograd.grad((functional.float() * 3).sum(), local_w)
        d.check("ops.low_latency_combine(out=) gradient", torch.equal(g_a, g_b), "differs")

    # clean_low_latency_buffer on a tensor requiring grad: raises before its barrier.
    d.raises("clean_low_latency_buffer", lambda: _ops.clean_low_latency_buffer(
        torch.zeros(8, requires_grad=True), buf.name, M, 128, E), "clean_low_latency_buffer",
        "workspace requires grad")
    # After all of that the buffer still works, hooks in step.
    recv, _, handle, _, hook = buf.low_latency_dispatch(
        x, topk, M, E, use_fp8=False, return_recv_hook=True)
    hook()
    combined, _, hook = buf.low_latency_combine(
        torch.einsum("lnh,lhg->lng", recv, local_w), topk, w32, handle, return_recv_hook=True)
    hook()
    d.check("buffer usable after the errors", torch.equal(combined, functional), "differs")
    buf.destroy()
    return d.messages


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_low_latency_forms_that_raise(num_ranks):
    """FP8 low-latency dispatch with x requiring grad (Buffer fused and hook, op, send op),
    the raw low_latency_combine_out op, clean_low_latency_buffer: raise at the call with the
    op and the way out named, write nothing, and leave the buffer usable."""
    _assert_ranks(run_on_ranks(num_ranks, _ll_raising_job))


def test_pure_ops():
    """per_token_cast_to_fp8 raises with x requiring grad; per_token_cast_back differentiates
    in x_scales (raises for x_fp8 requiring grad); get_dispatch_layout outputs need no grad."""
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(4, 256, generator=g) * 3).requires_grad_()
    d = Diffs("pure ops")
    d.raises("per_token_cast_to_fp8", lambda: ops.per_token_cast_to_fp8(x),
             "per_token_cast_to_fp8", "x requires grad", "detach")
    with torch.no_grad():
        q, scales = ops.per_token_cast_to_fp8(x)
    d.raises("per_token_cast_back of x_fp8 requiring grad", lambda: ops.per_token_cast_back(
        q.clone().requires_grad_(), scales), "per_token_cast_back", "x_fp8")
    s = scales.clone().requires_grad_()
    grad = torch.randn(4, 256, generator=g).bfloat16().float()  # exact as bf16 output grad
    back = ops.per_token_cast_back(q, s)
    (back.float() * grad).sum().backward()
    s_dense = scales.clone().requires_grad_()
    dense = (q.float().view(4, 2, 128) * s_dense.unsqueeze(-1)).view(4, 256)
    (dense * grad).sum().backward()
    d.close("grad x_scales", s.grad, s_dense.grad, rtol=1e-5, atol=1e-6)
    d.close("per_token_cast_back forward", back.float(), dense.detach().bfloat16().float())
    topk = oracle.random_topk(6, E, K, g, p_neg=0.2)
    layout = ops.get_dispatch_layout(topk, E, 2)
    d.check("get_dispatch_layout", not any(t.requires_grad for t in layout), "requires grad")
    assert not d.messages, "\n".join(d.messages)


def test_no_op_uses_the_autograd_fallback():
    """Every op has an Autograd kernel: none is left to PyTorch's fallback, which records the
    reference kernel's local arithmetic and silently drops what crosses ranks."""
    from deep_ep_ops._library import SCHEMAS

    missing = [name for name in SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"deep_ep::{name}", "Autograd")]
    assert not missing, f"no Autograd kernel: {missing}"
