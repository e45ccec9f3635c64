"""GPU: the low-latency (decode) NVSHMEM kernels of low_latency_dispatch / low_latency_combine,
against the reference: semantics, shapes per buffer, bad arguments (the long runs, graphs,
opcheck, autograd, timeouts and the put path are in test_cuda_low_latency_runs.py).

Every test runs in a pool of ranks (``tests/gpu_distributed.py``: one GPU each over NCCL, or
several per GPU under CUDA MPS over gloo), at 2, 4 and 8 ranks as far as the machine allows. The
oracle is the reference backend, called directly on the same CUDA tensors and buffer.

The contract checked:

- dispatch: ``recv_count``, ``layout_range`` and the rows ``[0, recv_count[e])`` of ``recv_x``,
  ``recv_x_scales`` and ``src_info`` equal the reference bit for bit, in its row order (source
  rank major, ascending source token); a helper tells apart a different order of the same rows;
  rows past ``recv_count`` are unspecified and never compared. Received rows are the BF16 bytes
  or the FP8 cast (float32, rounded and UE8M0 scales) of the sender's token; scales are
  column-major; ``cumulative_local_expert_recv_stats`` accumulates.
- combine: ``|kernel - ref| <= 2^-8 (S + |ref|) + 1e-6`` elementwise against the float32
  reference, ``S = sum_k |w_k f32(row_k)|`` (the kernel rounds each owner's partial sum to BF16,
  so it is not bit-exact); tokens routed nowhere give exact zeros; ``out=``, zero-copy, the
  send/recv split and the ``Buffer`` hook give the plain combine's bits.
- a buffer serves one (num_max_dispatch_tokens_per_rank, hidden, num_experts) until
  ``clean_low_latency_buffer``; bad metadata raises ValueError/TypeError at the call; an
  out-of-range expert id is reported as an exception.
"""

from __future__ import annotations

import pytest
import torch

import test_semantics as semantics
from deep_ep_ops import Buffer, _build, ops, reference
from deep_ep_ops.config import get_combine_config, get_dispatch_config
from gpu_distributed import max_ranks, run_on_gpus
from gpu_helpers import (  # noqa: F401  (world_size: the module-scoped fixture: 2, 4 and 8
    # ranks as far as there are GPUs, each size's pool closed after this module's tests of it)
    Diffs, _assert_no_diffs, _device, _generator, _new_buffer, _nvl_bytes, _sync, world_size,
)
from ll_helpers import (
    _all_gather_tokens, _check_combine, _check_dispatch, _check_put_path, _check_sender_rows,
    _drain_device_errors, _expect_error, _expert_factors, _expert_outputs, _flags, _ll_buffer,
    _ll_routing, NAN, PAYLOADS, _skew, _token_rows, _unrelated_compute,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
    pytest.mark.skipif(
        not getattr(_build, "HAS_LOW_LATENCY_KERNELS", False),
        reason="the low-latency NVSHMEM kernels are not built (deep_ep_ops._C_nvshmem)",
    ),
]


# --- 1. dispatch and combine against the reference --------------------------------------------


def _case(name, seed, hidden, topk, max_tokens, tokens, routing, payload, *, L=None,
          experts=None, **kwargs):
    return dict(name=name, seed=seed, hidden=hidden, topk=topk, max_tokens=max_tokens,
                tokens=tokens, routing=routing, payload=payload, L=L, experts=experts, **kwargs)


def _from_test_semantics(cases):
    return [dict(case, origin="test_semantics") for case in cases]


# test_semantics' low-latency cases (inputs rebuilt by its _ll_inputs) and cases at GPU scale:
# DeepSeek decode shapes, the kernels' limits (1024 tokens, top-16), hidden 384 and 2056, a
# full hot expert, one token, and nothing moving at all. L is experts per rank (E = L * R).
CASES = {
    "semantics_bf16": _from_test_semantics(semantics.LL_CASES["bf16"]),
    "semantics_fp8": _from_test_semantics(semantics.LL_CASES["fp8"]),
    "semantics_empty_rank": _from_test_semantics(semantics.LL_EDGE_CASES),
    "decode_shapes": [
        _case("deepseek_fp8_k8_e256_h7168_m128", 101, 7168, 8, 128, 128, "random", "fp8",
              experts=256, full=True),
        _case("deepseek_bf16_skewed_k8_e256_h7168_m128", 102, 7168, 8, 128, 128, "skewed",
              "bf16", experts=256),
        _case("fp8_round_holes_k5_h384_m100", 103, 384, 5, 100, 100, "holes", "fp8_round", L=6),
    ],
    "limits": [
        _case("ue8m0_duplicates_k16_h512_m1024", 104, 512, 16, 1024, 1024, "duplicates",
              "fp8_ue8m0", L=32),
        _case("bf16_holes_k3_h2056_empty_last_rank", 105, 2056, 3, 64, 64, "holes", "bf16", L=4,
              empty_rank=True),
        _case("fp8_hot_expert_full_k4_h1024", 106, 1024, 4, 96, 96, "hot_expert", "fp8", L=4,
              full=True),
        _case("bf16_one_token_k1_h128_m1", 107, 128, 1, 1, 1, "random", "bf16", L=1, full=True),
        _case("fp8_ue8m0_rank0_only_k2_h1024", 108, 1024, 2, 48, 48, "rank0_only", "fp8_ue8m0",
              L=8),
    ],
    "nothing_moves": [
        _case("every_token_routed_nowhere_fp8", 109, 512, 4, 16, 16, "nowhere", "fp8", L=4),
        _case("no_tokens_on_any_rank_bf16", 110, 256, 2, 8, 0, "random", "bf16", L=4),
    ],
}


def _num_experts(case, num_ranks: int) -> int:
    return case["experts"] or case["L"] * num_ranks


def _case_tokens(case, rank: int, num_ranks: int) -> int:
    tokens = case["tokens"]
    if not case.get("full"):
        tokens = max(0, tokens - (rank % 3) * (tokens // 4))
    if case.get("empty_rank") and rank == num_ranks - 1:
        tokens = 0
    return tokens


def _case_inputs(case, rank, num_ranks, device):
    """This rank's ``(x, topk_idx, topk_weights)``."""
    if case.get("origin") == "test_semantics":
        inp = semantics._ll_inputs(case, num_ranks)  # every rank's inputs, on the CPU
        return (inp["xs"][rank].to(device), inp["topk"][rank].to(device),
                inp["combine_weights"][rank].to(device))
    g = _generator(device, case["seed"] * 1009 + rank)
    num_tokens = _case_tokens(case, rank, num_ranks)
    x = _token_rows(num_tokens, case["hidden"], g, device)
    topk = _ll_routing(case["routing"], num_tokens, _num_experts(case, num_ranks), case["topk"],
                       num_ranks, g, device)
    return x, topk, torch.rand(num_tokens, case["topk"], generator=g, device=device)


def _check_ll_case(buffer: Buffer, rank: int, num_ranks: int, case, diffs: Diffs, state) -> None:
    device = _device()
    name = buffer.name
    num_max, hidden = case["max_tokens"], case["hidden"]
    num_experts = _num_experts(case, num_ranks)
    num_local = num_experts // num_ranks
    flags = _flags(case["payload"])
    where = f"{case['name']} rank {rank}/{num_ranks}"
    buffer.clean_low_latency_buffer(num_max, hidden, num_experts)  # each case has its shapes
    x, topk, weights = _case_inputs(case, rank, num_ranks, device)
    x_all = _all_gather_tokens(x, num_max)
    scratch = torch.randn(1024, 1024, device=device)
    initial_stats = torch.arange(num_local, dtype=torch.int32, device=device) + 7
    args = (name, x, topk, num_max, num_experts)

    # Fused dispatch against the reference, and against the senders' tokens.
    stats = initial_stats.clone()
    fused = ops.low_latency_dispatch(*args, **flags, cumulative_local_expert_recv_stats=stats)
    want = reference.low_latency_dispatch(x, topk, name, num_ranks, num_max, num_experts,
                                          *PAYLOADS[case["payload"]])
    recv_count = want[2]
    _check_dispatch(diffs, f"{where} low_latency_dispatch", fused, want, flags)
    _check_sender_rows(diffs, f"{where} low_latency_dispatch", fused, x_all, flags)
    diffs.same(f"{where} cumulative_local_expert_recv_stats after low_latency_dispatch", stats,
               initial_stats + recv_count)

    # The send/recv split with unrelated work in between, rank 0 sending late.
    stats = initial_stats.clone()
    _skew(rank)
    pending = ops.low_latency_dispatch_send(*args, **flags)
    _unrelated_compute(scratch)
    split = ops.low_latency_dispatch_recv(name, pending, stats)
    _check_dispatch(diffs, f"{where} low_latency_dispatch_send/recv", split, want, flags)
    diffs.same(f"{where} cumulative_local_expert_recv_stats after the receive half", stats,
               initial_stats + recv_count)

    # DeepEP's hook form through the Buffer.
    stats = initial_stats.clone()
    _skew(rank)
    recv, count, handle, _, hook = buffer.low_latency_dispatch(
        x, topk, num_max, num_experts, cumulative_local_expert_recv_stats=stats, **flags,
        return_recv_hook=True,
    )
    _unrelated_compute(scratch)
    hook()
    recv_x, recv_scales = recv if flags["use_fp8"] else (recv, None)
    hooked = ops.LowLatencyDispatchOutput(recv_x, recv_scales, count, handle)
    _check_dispatch(diffs, f"{where} Buffer.low_latency_dispatch(return_recv_hook=True)", hooked,
                    want, flags)
    diffs.same(f"{where} cumulative_local_expert_recv_stats after the hook", stats,
               initial_stats + recv_count)
    # Outputs are fresh tensors: later calls must not have changed the first one's.
    _check_dispatch(diffs, f"{where} low_latency_dispatch outputs after later calls", fused, want,
                    flags)

    # Combine: the plain op against the reference, then every other form against its bits.
    factors = _expert_factors(num_experts, device)[rank * num_local : (rank + 1) * num_local]
    y = _expert_outputs(x_all, fused, factors)
    handle = fused.handle
    combined = _check_combine(diffs, f"{where} low_latency_combine", buffer, handle, y, topk,
                              weights, state)

    def same(what, got):
        diffs.same(f"{where} {what} (vs the plain combine)", got, combined)

    out = torch.full_like(combined, NAN)
    returned = ops.low_latency_combine(name, y, topk, weights, handle, out=out)
    diffs.check(f"{where} low_latency_combine(out=)", returned is out, "did not return out")
    same("low_latency_combine(out=)", out)
    zero_copy = buffer.get_next_low_latency_combine_buffer(handle)
    zero_copy.copy_(y)
    same("low_latency_combine(zero_copy=True)",
         ops.low_latency_combine(name, zero_copy, topk, weights, handle, zero_copy=True))
    _skew(rank)
    sent = ops.low_latency_combine_send(name, y, topk, weights, handle)
    _unrelated_compute(scratch)
    same("low_latency_combine_send/recv", ops.low_latency_combine_recv(name, sent, topk, weights))
    zero_copy = buffer.get_next_low_latency_combine_buffer(handle)
    zero_copy.copy_(y)
    sent = ops.low_latency_combine_send(name, zero_copy, topk, weights, handle, zero_copy=True)
    _unrelated_compute(scratch)
    same("low_latency_combine_send/recv(zero_copy=True)",
         ops.low_latency_combine_recv(name, sent, topk, weights))
    out = torch.full_like(combined, NAN)
    _skew(rank)
    result, _, hook = buffer.low_latency_combine(y, topk, weights, handle, return_recv_hook=True,
                                                 out=out)
    _unrelated_compute(scratch)
    hook()
    diffs.check(f"{where} Buffer.low_latency_combine(return_recv_hook=True, out=)",
                result is out, "did not return out")
    same("Buffer.low_latency_combine(return_recv_hook=True, out=)", out)


def _semantics_job(rank, num_ranks, cases, force_put=False):
    shapes = [(c["max_tokens"], c["hidden"], _num_experts(c, num_ranks)) for c in cases]
    buffer = _ll_buffer(shapes, num_ranks, force_put=force_put)
    diffs = Diffs()
    if force_put:
        _check_put_path(diffs, rank, buffer)
    state = {}
    for case in cases:
        _check_ll_case(buffer, rank, num_ranks, case, diffs, state)
    _drain_device_errors(diffs, f"rank {rank} after the cases")
    buffer.destroy()
    return diffs.messages


@pytest.mark.parametrize("group", sorted(CASES))
def test_low_latency_matches_reference(world_size, group):
    """Per case: dispatch (fused, send/recv with unrelated work and a late sender, the Buffer
    hook) equal to the reference on the valid rows and to the senders' tokens (BF16 bytes or
    their FP8 cast), stats accumulated; combine within the bound of the float32 reference, exact
    zeros for tokens routed nowhere, and out= / zero-copy / send/recv / hook bit-identical to
    the plain combine. One buffer per group, cleaned before each case (new shapes)."""
    _assert_no_diffs(run_on_gpus(world_size, _semantics_job, CASES[group], timeout=600))


# --- 2. shapes fixed per buffer until clean_low_latency_buffer --------------------------------

SHAPES = ((32, 512), (64, 1024))  # (num_max_dispatch_tokens_per_rank, hidden)


def _shapes_job(rank, num_ranks):
    device = _device()
    num_local, num_topk = 8, 4
    num_experts = num_local * num_ranks
    buffer = _ll_buffer([(m, h, num_experts) for m, h in SHAPES], num_ranks)
    name = buffer.name
    g = _generator(device, 70 + rank)
    diffs = Diffs()
    factors = _expert_factors(num_experts, device)[rank * num_local : (rank + 1) * num_local]
    flags = _flags("fp8")

    def round_trip(num_max, hidden, what):
        where = f"rank {rank}/{num_ranks} {what}"
        num_tokens = num_max - rank % 3
        x = _token_rows(num_tokens, hidden, g, device)
        topk = _ll_routing("duplicates", num_tokens, num_experts, num_topk, num_ranks, g, device)
        weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
        got = ops.low_latency_dispatch(name, x, topk, num_max, num_experts)
        want = reference.low_latency_dispatch(x, topk, name, num_ranks, num_max, num_experts,
                                              *PAYLOADS["fp8"])
        _check_dispatch(diffs, f"{where}: low_latency_dispatch", got, want, flags)
        y = _expert_outputs(_all_gather_tokens(x, num_max), got, factors)
        combined = _check_combine(diffs, f"{where}: low_latency_combine", buffer, got.handle, y,
                                  topk, weights)
        zero_copy = buffer.get_next_low_latency_combine_buffer(got.handle)
        zero_copy.copy_(y)
        diffs.same(f"{where}: zero-copy combine", ops.low_latency_combine(
            name, zero_copy, topk, weights, got.handle, zero_copy=True), combined)
        return got, topk, weights

    def rejected(what, call):
        _expect_error(diffs, f"rank {rank}/{num_ranks} {what}", (ValueError,),
                      r"num_max_dispatch_tokens_per_rank|hidden|clean_low_latency_buffer", call)

    (m_a, h_a), (m_b, h_b) = SHAPES
    x_a, x_b = _token_rows(16, h_a, g, device), _token_rows(16, h_b, g, device)
    topk16 = _ll_routing("random", 16, num_experts, num_topk, num_ranks, g, device)
    got_a, topk_a, weights_a = round_trip(m_a, h_a, f"first call ({m_a} tokens, hidden {h_a})")
    round_trip(m_a, h_a, "second call, same shapes")
    rejected(f"num_max_dispatch_tokens_per_rank {m_b} without clean",
             lambda: ops.low_latency_dispatch(name, x_a, topk16, m_b, num_experts))
    rejected(f"hidden {h_b} without clean",
             lambda: ops.low_latency_dispatch(name, x_b, topk16, m_a, num_experts))
    y_b = torch.zeros(num_local, num_ranks * m_a, h_b, dtype=torch.bfloat16, device=device)
    rejected(f"combine of hidden {h_b} without clean",
             lambda: ops.low_latency_combine(name, y_b, topk_a, weights_a, got_a.handle))
    buffer.clean_low_latency_buffer(m_b, h_b, num_experts)
    round_trip(m_b, h_b, f"after clean_low_latency_buffer({m_b}, {h_b})")
    rejected(f"the first shapes again ({m_a}, {h_a}) without clean",
             lambda: ops.low_latency_dispatch(name, x_a, topk16, m_a, num_experts))
    buffer.clean_low_latency_buffer(m_a, h_a, num_experts)
    round_trip(m_a, h_a, f"after clean_low_latency_buffer({m_a}, {h_a})")
    _drain_device_errors(diffs, f"rank {rank}")
    buffer.destroy()
    return diffs.messages


def test_shapes_are_fixed_until_clean(world_size):
    """The first low-latency call fixes (num_max_dispatch_tokens_per_rank, hidden) of a buffer:
    dispatch and combine with others raise ValueError until clean_low_latency_buffer switches
    them; every accepted call (the same shapes twice, after each clean) matches the reference,
    zero-copy included."""
    _assert_no_diffs(run_on_gpus(world_size, _shapes_job))


# --- 3. bad arguments -------------------------------------------------------------------------


def _errors_job(rank, num_ranks):
    device = _device()
    num_max, hidden, num_topk, num_local = 16, 512, 4, 4
    num_experts = num_local * num_ranks
    rows = num_ranks * num_max
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)
    name = buffer.name
    configs = [get_dispatch_config(num_ranks).to_list(), get_combine_config(num_ranks).to_list()]
    normal = _new_buffer(_nvl_bytes(configs, [hidden * 2], num_ranks))
    hint = Buffer.get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
    small = _ll_buffer(None, num_ranks, num_rdma_bytes=hint - 128)
    g = _generator(device, 40 + rank)
    diffs = Diffs()
    x = _token_rows(num_max, hidden, g, device)
    topk = _ll_routing("holes", num_max, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_max, num_topk, generator=g, device=device)
    x_big = _token_rows(num_max + 1, hidden, g, device)
    topk_big = _ll_routing("random", num_max + 1, num_experts, num_topk, num_ranks, g, device)
    VT = (ValueError, TypeError)

    def expect(what, types, pattern, call):
        _expect_error(diffs, f"rank {rank}/{num_ranks} {what}", types, pattern, call)

    def dispatch(x_, topk_, buffer_=name, num_max_=num_max, num_experts_=num_experts, **flags):
        return ops.low_latency_dispatch(buffer_, x_, topk_, num_max_, num_experts_, **flags)

    # Before any accepted call, so a rejected call must not fix the buffer's shapes either.
    expect("more tokens than num_max_dispatch_tokens_per_rank", (ValueError,),
           r"num_max_dispatch_tokens_per_rank", lambda: dispatch(x_big, topk_big))
    expect("x of int32", VT, r"\bx\b", lambda: dispatch(x.int(), topk))
    expect("x of float8_e4m3fn", VT, r"\bx\b", lambda: dispatch(x.to(torch.float8_e4m3fn), topk))
    expect("topk_idx of int32", VT, r"topk_idx", lambda: dispatch(x, topk.int()))
    expect("topk_idx with fewer tokens than x", (ValueError,), r"topk_idx|\bx\b",
           lambda: dispatch(x, topk[:-1]))
    expect("FP8 with hidden 200", (ValueError,), r"hidden",
           lambda: dispatch(_token_rows(num_max, 200, g, device), topk))
    expect("UE8M0 with hidden 384", (ValueError,), r"hidden",
           lambda: dispatch(_token_rows(num_max, 384, g, device), topk, use_fp8=True,
                            round_scale=True, use_ue8m0=True))
    expect("use_ue8m0 without round_scale", (ValueError,), r"round_scale|ue8m0",
           lambda: dispatch(x, topk, use_ue8m0=True))
    expect("num_experts not a multiple of num_ranks", (ValueError,), r"num_experts",
           lambda: dispatch(x, topk, num_experts_=num_experts + 1))
    expect("a buffer without low_latency_mode", (ValueError,), r"low_latency_mode|num_rdma_bytes",
           lambda: dispatch(x, topk, buffer_=normal.name))
    expect("a buffer smaller than get_low_latency_rdma_size_hint", (ValueError,),
           r"num_rdma_bytes", lambda: dispatch(x, topk, buffer_=small.name))

    # An accepted dispatch, then bad combine arguments against its handle.
    got = dispatch(x, topk)
    want = reference.low_latency_dispatch(x, topk, name, num_ranks, num_max, num_experts,
                                          *PAYLOADS["fp8"])
    _check_dispatch(diffs, f"rank {rank} dispatch after the rejected calls", got, want,
                    _flags("fp8"))
    handle = got.handle
    y = torch.randn(num_local, rows, hidden, generator=g, device=device).bfloat16()

    def combine(y_=y, topk_=topk, weights_=weights, handle_=handle, **kwargs):
        return ops.low_latency_combine(name, y_, topk_, weights_, handle_, **kwargs)

    expect("combine topk_weights of bfloat16", VT, r"topk_weights",
           lambda: combine(weights_=weights.bfloat16()))
    expect("combine topk_weights of another shape", (ValueError,), r"topk_weights",
           lambda: combine(weights_=weights[:, :-1]))
    expect("combine x of int32", VT, r"\bx\b", lambda: combine(y_=y.int()))
    expect("combine x with another number of rows", (ValueError,), r"\bx\b",
           lambda: combine(y_=y[:, :-1]))
    expect("combine with a handle of another num_max_dispatch_tokens_per_rank", (ValueError,),
           r"handle|src_info", lambda: combine(
               handle_=handle._replace(num_max_dispatch_tokens_per_rank=num_max + 1),
               y_=torch.zeros(num_local, num_ranks * (num_max + 1), hidden, dtype=torch.bfloat16,
                              device=device)))
    expect("combine with a handle whose layout_range has another shape", (ValueError,),
           r"handle|layout_range|src_info", lambda: combine(
               handle_=handle._replace(layout_range=handle.layout_range[:, :1].contiguous())))
    expect("combine with a handle of another num_experts", (ValueError,),
           r"handle|src_info|num_experts|\bx\b",
           lambda: combine(handle_=handle._replace(num_experts=2 * num_experts)))
    expect("combine with more tokens than num_max_dispatch_tokens_per_rank", (ValueError,),
           r"num_max_dispatch_tokens_per_rank",
           lambda: combine(topk_=topk_big, weights_=torch.rand(num_max + 1, num_topk,
                                                               device=device)))
    expect("combine out= of another shape", (ValueError,), r"\bout\b",
           lambda: combine(out=torch.empty(num_max + 1, hidden, dtype=torch.bfloat16,
                                           device=device)))
    expect("combine out= of float32", VT, r"\bout\b",
           lambda: combine(out=torch.empty(num_max, hidden, device=device)))

    # A receive half rejected for its arguments leaves the send half waiting for the next one.
    pending = ops.low_latency_dispatch_send(name, x, topk, num_max, num_experts)
    expect("low_latency_dispatch_recv with int64 stats", VT,
           r"cumulative_local_expert_recv_stats", lambda: ops.low_latency_dispatch_recv(
               name, pending, torch.zeros(num_local, dtype=torch.int64, device=device)))
    expect("low_latency_dispatch_recv with stats of another size", (ValueError,),
           r"cumulative_local_expert_recv_stats", lambda: ops.low_latency_dispatch_recv(
               name, pending, torch.zeros(num_local + 1, dtype=torch.int32, device=device)))
    try:
        ops.low_latency_dispatch_recv(name, pending)
        _check_dispatch(diffs, f"rank {rank} send/recv after rejected receives", pending, want,
                        _flags("fp8"))
    except Exception as error:  # noqa: BLE001
        diffs.check(f"rank {rank} send/recv after rejected receives", False,
                    f"the receive raised {type(error).__name__}: {error}")

    # Nothing broke: a last dispatch and combine against the reference, no device error.
    factors = _expert_factors(num_experts, device)[rank * num_local : (rank + 1) * num_local]
    got = dispatch(x, topk)
    _check_dispatch(diffs, f"rank {rank} last dispatch", got, want, _flags("fp8"))
    _check_combine(diffs, f"rank {rank} last combine", buffer, got.handle,
                   _expert_outputs(_all_gather_tokens(x, num_max), got, factors), topk, weights)
    _drain_device_errors(diffs, f"rank {rank} after the rejected calls")
    small.destroy()
    normal.destroy()
    buffer.destroy()
    return diffs.messages


def test_bad_arguments_raise_at_the_call(world_size):
    """Every rank makes the same bad calls, each raising ValueError/TypeError at the call and
    naming the argument: more tokens than num_max_dispatch_tokens_per_rank, wrong dtypes of x /
    topk_idx / topk_weights / out / stats, mismatched shapes and handles, FP8/UE8M0 hidden sizes,
    num_experts, a normal-mode buffer and one smaller than the size hint. Afterwards the buffer
    still works (a pending send survives rejected receives) and no kernel reported an error."""
    _assert_no_diffs(run_on_gpus(world_size, _errors_job))


def _expert_range_job(rank, num_ranks):
    device = _device()
    num_max, hidden, num_topk, num_local = 16, 512, 4, 4
    num_experts = num_local * num_ranks
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)
    name = buffer.name
    g = _generator(device, 45 + rank)
    diffs = Diffs()
    where = f"rank {rank}/{num_ranks}"
    x = _token_rows(num_max, hidden, g, device)
    topk = _ll_routing("random", num_max, num_experts, num_topk, num_ranks, g, device)
    bad = topk.clone()
    bad[num_max // 2, 1] = num_experts
    error = None
    try:  # the kernel checks on the device: the error comes at the latest from the sync
        ops.low_latency_dispatch(name, x, bad, num_max, num_experts)
        _sync(device)
        ops.check_device_errors()
    except Exception as caught:  # noqa: BLE001
        error = caught
    message = "" if error is None else f"{type(error).__name__}: {error}"
    diffs.check(f"{where} topk_idx entry {num_experts} (num_experts)", error is not None,
                "no error from the call, torch.cuda.synchronize() or ops.check_device_errors()")
    diffs.check(f"{where} topk_idx entry {num_experts}", error is None or (
        "topk_idx" in message and "illegal memory access" not in message
        and "timed out" not in message), f"the error does not name topk_idx: {message}")
    # Reported once; the buffer still works.
    _drain_device_errors(diffs, f"{where} after the reported error")
    got = ops.low_latency_dispatch(name, x, topk, num_max, num_experts)
    want = reference.low_latency_dispatch(x, topk, name, num_ranks, num_max, num_experts,
                                          *PAYLOADS["fp8"])
    _check_dispatch(diffs, f"{where} dispatch after the reported error", got, want,
                    _flags("fp8"))
    _drain_device_errors(diffs, where)
    buffer.destroy()
    return diffs.messages


def test_out_of_range_expert_is_reported(world_size):
    """DESIGN §5: an expert id past num_experts is checked on the device, without a host sync,
    and raised as an exception naming topk_idx at the latest after a synchronisation (never an
    illegal memory access); it is reported once and the buffer keeps working."""
    _assert_no_diffs(run_on_gpus(world_size, _expert_range_job))


def _rejected_combine_receive_job(rank, num_ranks):
    device = _device()
    num_max, hidden, num_topk, num_local = 16, 512, 4, 4
    num_experts = num_local * num_ranks
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks, timeout_s=10)
    name = buffer.name
    g = _generator(device, 47 + rank)
    diffs = Diffs()
    where = f"rank {rank}/{num_ranks}"
    x = _token_rows(num_max, hidden, g, device)
    topk = _ll_routing("holes", num_max, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_max, num_topk, generator=g, device=device)
    got = ops.low_latency_dispatch(name, x, topk, num_max, num_experts, use_fp8=False)
    y = got.recv_x
    plain = ops.low_latency_combine(name, y, topk, weights, got.handle)
    sent = ops.low_latency_combine_send(name, y, topk, weights, got.handle)
    _expect_error(diffs, f"{where} low_latency_combine_recv into a tensor of another hidden",
                  (ValueError,), r"combined_x", lambda: ops.low_latency_combine_recv(
                      name, torch.empty(num_max, hidden + 8, dtype=torch.bfloat16,
                                        device=device), topk, weights))
    try:
        diffs.same(f"{where} low_latency_combine_recv after a rejected receive",
                   ops.low_latency_combine_recv(name, sent, topk, weights), plain)
    except Exception as error:  # noqa: BLE001
        diffs.check(f"{where} low_latency_combine_recv after a rejected receive", False,
                    f"raised {type(error).__name__}: {error} (the rejected call consumed the "
                    "pending send half)")
    _drain_device_errors(diffs, where)
    buffer.destroy()
    return diffs.messages


def test_rejected_combine_receive_keeps_the_send_pending(world_size):
    """low_latency_combine_recv with a wrong combined_x raises ValueError at the call, and the
    right receive afterwards still completes the pending send half (bits of the plain combine)."""
    _assert_no_diffs(run_on_gpus(world_size, _rejected_combine_receive_job))
