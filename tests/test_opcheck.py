"""``torch.library.opcheck`` on every ``deep_ep`` op (docs/DESIGN.md §5: "opcheck passes on every op").

Communication ops run inside each rank of a 2-rank job: opcheck calls the op several times and
every rank makes the same sequence of calls, so the collectives line up. Pure ops run in the
test process. Each op is checked on several inputs, with and without ``requires_grad`` on its
differentiable float inputs, with all of opcheck's default test utils (schema, autograd
registration, fake tensor, AOT dispatch with dynamic shapes).
"""

from __future__ import annotations


import pytest
import torch

import deep_ep_ops
import oracle
from deep_ep_ops import ops
from deep_ep_ops._library import SCHEMAS
from distributed import new_test_buffer, run_on_ranks

NUM_RANKS = 2
E, T, H, K, M = 8, 5, 128, 3, 6
CONFIG = deep_ep_ops.Config().to_list()
_ops = torch.ops.deep_ep


def _grad(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _inputs(rank: int, num_ranks: int, hidden: int = H):
    """Same shapes on every rank (opcheck's call count must not depend on the rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, hidden, generator=g).bfloat16()
    topk = oracle.random_topk(T, E, K, g, allow_duplicates=True, p_neg=0.2)
    weights = torch.rand(T, K, generator=g)
    layout = ops.get_dispatch_layout(topk, E, num_ranks)
    return x, topk, weights, layout


# --- sample arguments per op, built inside a rank --------------------------------------------
# Each builder returns [(label, args)] or [(label, args, test_utils)]; ``rg`` puts
# requires_grad on the differentiable inputs.

DEFAULT_UTILS = (
    "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"
)


def _dispatch_args(buffer, rank, num_ranks, rg, op):
    x, topk, weights, layout = _inputs(rank, num_ranks)
    x_fp8, scales = ops.per_token_cast_to_fp8(x)
    per_rank, is_in, per_expert = (
        layout.num_tokens_per_rank, layout.is_token_in_rank, layout.num_tokens_per_expert
    )
    extra = (T * num_ranks,) if op == "capacity_dispatch" else ()
    samples = [
        ("bf16 top-k", (_grad(x, rg), None, topk, _grad(weights, rg), per_rank, is_in,
                        per_expert, buffer, 1, *extra, CONFIG)),
        ("bf16 no top-k, aligned", (_grad(x, rg), None, None, None, per_rank, is_in, None,
                                    buffer, 4, *extra, CONFIG)),
    ]
    if op == "dispatch":  # FP8 capacity dispatch is covered by test_semantics
        # With gradients, the AOT check sums every output to backpropagate, and CPU torch has
        # no sum for the float8 recv_x: it checks the weights' gradient on the BF16 samples.
        utils = [u for u in DEFAULT_UTILS if u != "test_aot_dispatch_dynamic"] if rg else None
        samples.append(("fp8 top-k", (x_fp8, scales, topk, _grad(weights, rg), per_rank, is_in,
                                      per_expert, buffer, 1, CONFIG), utils))
    return samples


def _dispatch_samples(buffer, rank, num_ranks, rg):
    return _dispatch_args(buffer, rank, num_ranks, rg, "dispatch")


def _capacity_dispatch_samples(buffer, rank, num_ranks, rg):
    return _dispatch_args(buffer, rank, num_ranks, rg, "capacity_dispatch")


def _handles(buffer, rank, num_ranks):
    """Handles of a data-dependent and of a capacity dispatch, with their received row counts."""
    x, topk, weights, layout = _inputs(rank, num_ranks)
    plain = ops.dispatch(buffer, x, layout, topk, weights, config=CONFIG)
    capacity = ops.dispatch(
        buffer, x, layout, topk, weights, num_worst_tokens=T * num_ranks, config=CONFIG
    )
    return [("", plain), (" capacity", capacity)]


def _cached_dispatch_samples(buffer, rank, num_ranks, rg):
    x, _, weights, _ = _inputs(rank, num_ranks)
    x_fp8, scales = ops.per_token_cast_to_fp8(x)
    samples = []
    for label, out in _handles(buffer, rank, num_ranks):
        h = out.handle
        samples += [
            (f"bf16 weights{label}", (_grad(x, rg), None, _grad(weights, rg), *h[:6], buffer,
                                      h.num_worst_tokens, CONFIG)),
            (f"fp8 no weights{label}", (x_fp8, scales, None, *h[:6], buffer,
                                        h.num_worst_tokens, CONFIG)),
        ]
    return samples


def _combine_samples(buffer, rank, num_ranks, rg):
    g = torch.Generator().manual_seed(200 + rank)
    bias = [torch.randn(T, H, generator=g).bfloat16() for _ in range(2)]
    samples = []
    for label, out in _handles(buffer, rank, num_ranks):
        h = out.handle
        y = torch.randn(out.recv_x.shape, generator=g).bfloat16()
        w = torch.rand(out.recv_topk_weights.shape, generator=g)
        samples += [
            (f"weights{label}", (_grad(y, rg), _grad(w, rg), None, None, *h[:6], buffer,
                                 h.num_worst_tokens, CONFIG)),
            (f"bias pair{label}", (_grad(y, rg), None, _grad(bias[0], rg), _grad(bias[1], rg),
                                   *h[:6], buffer, h.num_worst_tokens, CONFIG)),
        ]
    return samples


# Internode ops: on a buffer of one rank per node (2 nodes at 2 ranks; _opcheck_job).


def _internode_dispatch_args(buffer, rank, num_ranks, rg, op):
    x, topk, weights, _ = _inputs(rank, num_ranks)
    layout = ops.get_dispatch_layout(topk, E, num_ranks, num_ranks)
    per_rank, per_node, is_in, per_expert = (
        layout.num_tokens_per_rank, layout.num_tokens_per_rdma_rank, layout.is_token_in_rank,
        layout.num_tokens_per_expert,
    )
    extra = (T * num_ranks,) if op == "internode_capacity_dispatch" else ()
    return [
        ("bf16 top-k", (_grad(x, rg), None, topk, _grad(weights, rg), per_rank, per_node, is_in,
                        per_expert, buffer, 1, *extra, CONFIG)),
        ("bf16 no top-k, aligned", (_grad(x, rg), None, None, None, per_rank, per_node, is_in,
                                    None, buffer, 4, *extra, CONFIG)),
    ]


def _internode_dispatch_samples(buffer, rank, num_ranks, rg):
    return _internode_dispatch_args(buffer, rank, num_ranks, rg, "internode_dispatch")


def _internode_capacity_dispatch_samples(buffer, rank, num_ranks, rg):
    return _internode_dispatch_args(buffer, rank, num_ranks, rg, "internode_capacity_dispatch")


def _internode_handles(buffer, rank, num_ranks):
    x, topk, weights, _ = _inputs(rank, num_ranks)
    layout = ops.get_dispatch_layout(topk, E, num_ranks, num_ranks)
    return [(label, ops.internode_dispatch(buffer, x, layout, topk, weights,
                                           num_worst_tokens=worst, config=CONFIG))
            for label, worst in (("", 0), (" capacity", T * num_ranks))]


def _internode_cached_dispatch_samples(buffer, rank, num_ranks, rg):
    x, _, weights, _ = _inputs(rank, num_ranks)
    return [(f"bf16 weights{label}", (_grad(x, rg), None, _grad(weights, rg), *tuple(out.handle),
                                      buffer, out.handle.num_worst_tokens, CONFIG))
            for label, out in _internode_handles(buffer, rank, num_ranks)]


def _internode_combine_samples(buffer, rank, num_ranks, rg):
    g = torch.Generator().manual_seed(300 + rank)
    bias = torch.randn(T, H, generator=g).bfloat16()
    samples = []
    for label, out in _internode_handles(buffer, rank, num_ranks):
        y = torch.randn(out.recv_x.shape, generator=g).bfloat16()
        w = torch.rand(out.recv_topk_weights.shape, generator=g)
        samples.append((f"weights, bias{label}", (_grad(y, rg), _grad(w, rg), _grad(bias, rg),
                                                  None, *tuple(out.handle), buffer,
                                                  out.handle.num_worst_tokens, CONFIG)))
    return samples


LL_MODES = {  # label -> (use_fp8, round_scale, use_ue8m0); hidden 512 allows UE8M0
    "bf16": (False, False, False), "fp8": (True, False, False),
    "fp8 ue8m0": (True, True, True),
}


def _ll_args(buffer, num_ranks):
    return (buffer, num_ranks, M, E)


def _low_latency_dispatch_args(buffer, rank, num_ranks, rg, differentiable):
    x, topk, _, _ = _inputs(rank, num_ranks, hidden=512)
    samples = []
    for label, (use_fp8, round_scale, use_ue8m0) in LL_MODES.items():
        # The FP8 output is not differentiable (docs/DESIGN.md §7): grad only on the BF16 path.
        x_in = _grad(x, rg and differentiable and not use_fp8)
        samples.append(
            (label, (x_in, topk, *_ll_args(buffer, num_ranks), use_fp8, round_scale, use_ue8m0))
        )
    return samples


def _low_latency_dispatch_samples(buffer, rank, num_ranks, rg):
    return _low_latency_dispatch_args(buffer, rank, num_ranks, rg, differentiable=True)


def _low_latency_dispatch_send_samples(buffer, rank, num_ranks, rg):
    return _low_latency_dispatch_args(buffer, rank, num_ranks, rg, differentiable=False)


def _low_latency_dispatch_recv_samples(buffer, rank, num_ranks, rg):
    x, topk, _, _ = _inputs(rank, num_ranks, hidden=512)
    samples = []
    for label, flags in (("fp8", (True, False, False)), ("bf16", (False, False, False))):
        sent = _ops.low_latency_dispatch_send(x, topk, *_ll_args(buffer, num_ranks), *flags)
        stats = torch.arange(E // num_ranks, dtype=torch.int32)
        samples += [
            (f"{label} with stats", (*sent, stats, buffer)),
            (f"{label} without stats", (*sent, None, buffer)),
        ]
    return samples


def _ll_handle(buffer, rank, num_ranks):
    x, topk, weights, _ = _inputs(rank, num_ranks)
    out = ops.low_latency_dispatch(buffer, x, topk, M, E, use_fp8=False)
    g = torch.Generator().manual_seed(300 + rank)
    expert_x = torch.randn(out.recv_x.shape, generator=g).bfloat16()
    return x, topk, weights, out.handle, expert_x


def _low_latency_combine_samples(buffer, rank, num_ranks, rg):
    _, topk, weights, h, expert_x = _ll_handle(buffer, rank, num_ranks)
    return [
        (f"zero_copy={zero_copy}", (_grad(expert_x, rg), topk, _grad(weights, rg), h.src_info,
                                    h.layout_range, *_ll_args(buffer, num_ranks), zero_copy))
        for zero_copy in (False, True)
    ]


def _low_latency_combine_send_samples(buffer, rank, num_ranks, rg):
    _, topk, weights, h, expert_x = _ll_handle(buffer, rank, num_ranks)
    return [("bf16", (expert_x, topk, weights, h.src_info, h.layout_range,
                      *_ll_args(buffer, num_ranks), False))]


def _low_latency_combine_out_samples(buffer, rank, num_ranks, rg):
    _, topk, weights, h, expert_x = _ll_handle(buffer, rank, num_ranks)
    out = torch.empty(T, H, dtype=torch.bfloat16)
    return [("bf16", (expert_x, topk, weights, h.src_info, h.layout_range,
                      *_ll_args(buffer, num_ranks), False, out))]


def _low_latency_combine_recv_samples(buffer, rank, num_ranks, rg):
    _, topk, weights, h, expert_x = _ll_handle(buffer, rank, num_ranks)
    sent = _ops.low_latency_combine_send(
        expert_x, topk, weights, h.src_info, h.layout_range, *_ll_args(buffer, num_ranks), False
    )
    return [("bf16", (sent, topk, weights, buffer))]


def _low_latency_cached_dispatch_samples(buffer, rank, num_ranks, rg):
    x, topk, weights, h, _ = _ll_handle(buffer, rank, num_ranks)
    return [
        ("bf16", (x, topk, weights, h.src_info, h.layout_range, *_ll_args(buffer, num_ranks))),
        ("float64", (x.double(), topk, weights.double(), h.src_info, h.layout_range,
                     *_ll_args(buffer, num_ranks))),
    ]


def _low_latency_gather_samples(buffer, rank, num_ranks, rg):
    _, topk, _, h, expert_x = _ll_handle(buffer, rank, num_ranks)
    return [("bf16", (expert_x, topk, h.src_info, h.layout_range, *_ll_args(buffer, num_ranks)))]


def _clean_low_latency_buffer_samples(buffer, rank, num_ranks, rg):
    workspace = torch.ones(256, dtype=torch.uint8)
    return [("workspace", (workspace, buffer, M, H, E))]


# op -> (sample builder, whether it is differentiable: checked with and without requires_grad).
# The send/recv halves, the out= variant, the backward helpers and the cleanup have no autograd
# formula (docs/DESIGN.md §7 differentiates dispatch, combine and their low-latency forms).
DISTRIBUTED_SAMPLES = {
    "dispatch": (_dispatch_samples, True),
    "capacity_dispatch": (_capacity_dispatch_samples, True),
    "cached_dispatch": (_cached_dispatch_samples, True),
    "combine": (_combine_samples, True),
    "internode_dispatch": (_internode_dispatch_samples, True),
    "internode_capacity_dispatch": (_internode_capacity_dispatch_samples, True),
    "internode_cached_dispatch": (_internode_cached_dispatch_samples, True),
    "internode_combine": (_internode_combine_samples, True),
    "low_latency_dispatch": (_low_latency_dispatch_samples, True),
    "low_latency_dispatch_send": (_low_latency_dispatch_send_samples, False),
    "low_latency_dispatch_recv": (_low_latency_dispatch_recv_samples, False),
    "low_latency_combine": (_low_latency_combine_samples, True),
    "low_latency_combine_out": (_low_latency_combine_out_samples, False),
    "low_latency_combine_send": (_low_latency_combine_send_samples, False),
    "low_latency_combine_recv": (_low_latency_combine_recv_samples, False),
    "low_latency_cached_dispatch": (_low_latency_cached_dispatch_samples, False),
    "low_latency_gather": (_low_latency_gather_samples, False),
    "clean_low_latency_buffer": (_clean_low_latency_buffer_samples, False),
}


def _utils_for(args, utils) -> tuple[str, ...]:
    utils = tuple(utils or DEFAULT_UTILS)
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        # test_schema's mutation check compares every input before and after the call with
        # torch.allclose, which has no CPU kernel for float8. The schema (aliasing, mutation)
        # is the same for every dtype and is checked on this op's BF16 samples.
        utils = tuple(u for u in utils if u != "test_schema")
    return utils


def _opcheck_all(op_name: str, samples) -> list[str]:
    """Run opcheck on every sample; return ``op[label] util: error`` for each failure."""
    op = getattr(_ops, op_name).default
    failures = []
    for label, args, *utils in samples:
        # raise_exception=False runs every util even after a failure, so all ranks keep
        # making the same calls.
        results = torch.library.opcheck(
            op, args, test_utils=_utils_for(args, utils[0] if utils else None),
            raise_exception=False,
        )
        failures += [
            f"{op_name}[{label}] {util}: {type(error).__name__}: {str(error)[:400]}"
            for util, error in results.items() if error != "SUCCESS"
        ]
    return failures


def _opcheck_job(rank, world_size, op_name):
    buf = new_test_buffer(num_ranks_per_node=1 if op_name.startswith("internode") else None)
    build, differentiable = DISTRIBUTED_SAMPLES[op_name]
    failures = []
    for rg in (False, True) if differentiable else (False,):
        samples = build(buf.name, rank, world_size, rg)
        failures += [f"requires_grad={rg} {f}" for f in _opcheck_all(op_name, samples)]
    buf.destroy()
    return failures


@pytest.mark.parametrize("op_name", sorted(DISTRIBUTED_SAMPLES))
def test_opcheck_communication_op(op_name):
    """opcheck (all default utils) of one communication op inside each of 2 ranks."""
    per_rank = run_on_ranks(NUM_RANKS, _opcheck_job, op_name)
    failures = [f"rank {rank}: {f}" for rank, fs in enumerate(per_rank) for f in fs]
    assert not failures, "\n".join(failures)


# --- pure ops: in the test process -----------------------------------------------------------


def _get_dispatch_layout_samples():
    g = torch.Generator().manual_seed(1)
    samples = []
    for num_ranks, num_rdma in ((1, 1), (2, 1), (4, 2)):
        topk = oracle.random_topk(7, 16, 4, g, allow_duplicates=True, p_neg=0.2)
        samples.append((f"R={num_ranks}", (topk, 16, num_ranks, num_rdma)))
    return samples


def _per_token_cast_to_fp8_samples():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 512, generator=g) * 300
    return [
        (f"{dtype} round={r} ue8m0={u}", (x.to(dtype), r, u))
        for dtype in (torch.bfloat16, torch.float32)
        for r, u in ((False, False), (True, False), (True, True))
    ]


def _per_token_cast_back_samples():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 512, generator=g).bfloat16()
    return [
        (f"round={r} ue8m0={u}", ops.per_token_cast_to_fp8(x, r, u))
        for r, u in ((False, False), (True, True))
    ]


# The FP8 casts have no autograd formula (the cast is not differentiable on its own); the layout
# has no float input.
PURE_SAMPLES = {
    "get_dispatch_layout": _get_dispatch_layout_samples,
    "per_token_cast_to_fp8": _per_token_cast_to_fp8_samples,
    "per_token_cast_back": _per_token_cast_back_samples,
}


@pytest.mark.parametrize("op_name", sorted(PURE_SAMPLES))
def test_opcheck_pure_op(op_name):
    """opcheck (all default utils) of an op without communication, in this process."""
    failures = _opcheck_all(op_name, PURE_SAMPLES[op_name]())
    assert not failures, "\n".join(failures)


def test_every_op_is_opchecked():
    """A new schema without opcheck samples fails here."""
    checked = set(DISTRIBUTED_SAMPLES) | set(PURE_SAMPLES)
    assert checked == set(SCHEMAS), (
        f"not opchecked: {sorted(set(SCHEMAS) - checked)}; "
        f"not an op: {sorted(checked - set(SCHEMAS))}"
    )
