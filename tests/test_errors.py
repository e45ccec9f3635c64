"""Bad input raises a clear exception naming the argument; a missing peer times out, no hang."""

import time

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
import fault_table
from deep_ep_ops import ops
from distributed import RankPool, run_on_ranks

E, T, H, K, M = 8, 6, 256, 2, 8


def _expect(fn, error, *fragments, observed=None, label=None):
    """Run ``fn``; return '' if it raised ``error`` whose message has every fragment. What it
    raised goes to ``observed[label]`` as ``(type name, message)`` when given."""
    try:
        fn()
    except Exception as raised:  # noqa: BLE001
        if observed is not None:
            observed[label] = (type(raised).__name__, str(raised))
        if not isinstance(raised, error):  # the wrong kind of error is a failure too
            return f"expected {error.__name__}, got {type(raised).__name__}: {raised}"
        missing = [f for f in fragments if f not in str(raised)]
        return f"message {str(raised)!r} lacks {missing}" if missing else ""
    return f"expected {error.__name__} with {fragments}, nothing raised"


# Cases whose error depends on the data: the CUDA kernels report them at the next call (no
# host sync), the reference at the call.
DATA_DEPENDENT = ("topk_idx out of range", "dispatch topk out of range", "ll topk out of range",
                  "capacity overflow")


def _bad_inputs(rank, world_size, device="cpu", skip=()):
    """The table of bad calls on ``device`` (but ``skip``): ``(failures, number of cases,
    observed)`` where ``observed[label]`` is the raised ``(type name, message)``."""
    torch.manual_seed(rank)
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 1 << 26, low_latency_mode=True)
    small = deep_ep.Buffer(dist.group.WORLD, 1024, 1024, low_latency_mode=True)
    normal_only = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 1 << 26)
    name = buffer.name
    x = torch.randn(T, H, dtype=torch.bfloat16, device=device)
    topk = torch.randint(0, E, (T, K), device=device)
    weights = torch.rand(T, K, device=device)
    layout = ops.get_dispatch_layout(topk, E, world_size)
    out = ops.dispatch(name, x, layout, topk, weights)
    ll = ops.low_latency_dispatch(name, x, topk, M, E, use_fp8=False)
    bad_topk = topk.clone()
    bad_topk[0, 0] = E
    cases = {
        "x dtype": (lambda: ops.dispatch(name, x.bool(), layout, topk, weights), TypeError, "x must have dtype"),
        "combine x dtype": (lambda: ops.combine(name, out.recv_x.int(), out.handle), TypeError, "x must have dtype", "torch.int32"),
        "x dims": (lambda: ops.dispatch(name, x[0], layout, topk, weights), ValueError, "x must have 2 dims"),
        "topk_idx dtype": (lambda: ops.get_dispatch_layout(topk.int(), E, world_size), TypeError, "topk_idx"),
        "topk_idx rows": (lambda: ops.dispatch(name, x, layout, topk[:2], weights), ValueError, "topk_idx.size(0)"),
        "weights without idx": (lambda: ops.dispatch(name, x, layout, None, weights), ValueError, "topk_idx and topk_weights"),
        "topk_idx out of range": (lambda: ops.get_dispatch_layout(bad_topk, E, world_size), ValueError, "topk_idx", f"[0, {E})"),
        "dispatch topk out of range": (lambda: ops.dispatch(name, x, layout, bad_topk, weights), ValueError, "topk_idx"),
        "E % R": (lambda: ops.get_dispatch_layout(topk, E + 1, 2), ValueError, "num_experts", "multiple of num_ranks"),
        "fp8 without scales": (lambda: ops.dispatch(name, x.to(torch.float8_e4m3fn), layout, topk, weights), ValueError, "x_scales"),
        "fp8 hidden": (lambda: ops.per_token_cast_to_fp8(x[:, :200]), ValueError, "hidden (200)", "multiple of 128"),
        "ue8m0 without round": (lambda: ops.per_token_cast_to_fp8(x, False, True), ValueError, "use_ue8m0", "round_scale"),
        "expert_alignment": (lambda: ops.dispatch(name, x, layout, topk, weights, expert_alignment=0), ValueError, "expert_alignment"),
        "capacity overflow": (lambda: ops.dispatch(name, x, layout, topk, weights, num_worst_tokens=1), ValueError, "num_worst_tokens=1"),
        "nvl buffer too small": (lambda: ops.dispatch(small.name, x, layout, topk, weights), ValueError, "num_nvl_bytes=1024", "needs"),
        "handle/config mismatch": (lambda: ops.combine(name, out.recv_x, out.handle, config=deep_ep.Config(8)), ValueError, "handle and config mismatch"),
        "combine rows": (lambda: ops.combine(name, out.recv_x[:0], out.handle), ValueError, "x.size(0)"),
        "combine handle type": (lambda: ops.combine(name, out.recv_x, tuple(out.handle)), TypeError, "DispatchHandle"),
        "internode node counts": (lambda: ops.internode_dispatch(name, x, layout._replace(num_tokens_per_rdma_rank=layout.num_tokens_per_rdma_rank[:0]), topk, weights), ValueError, "num_tokens_per_rdma_rank.size(0) (0 nodes) must divide num_ranks"),
        "internode handle type": (lambda: ops.internode_combine(name, out.recv_x, out.handle), TypeError, "InternodeHandle"),
        "T > M": (lambda: ops.low_latency_dispatch(name, x, topk, T - 1, E), ValueError, f"{T} tokens", "num_max_dispatch_tokens_per_rank"),
        "ll E % R": (lambda: ops.low_latency_dispatch(name, x, topk, M, 0), ValueError, "num_experts (0)"),
        "ll fp8 hidden": (lambda: ops.low_latency_dispatch(name, x[:, :200], topk, M, E), ValueError, "multiple of 128"),
        "ll topk out of range": (lambda: ops.low_latency_dispatch(name, x, bad_topk, M, E), ValueError, "topk_idx"),
        "ll rdma too small": (lambda: ops.low_latency_dispatch(small.name, x, topk, M, E), ValueError, "num_rdma_bytes=1024", "need"),
        "ll not low-latency": (lambda: ops.low_latency_dispatch(normal_only.name, x, topk, M, E), ValueError, "low_latency_mode=True"),
        "ll mismatched handle": (lambda: ops.low_latency_combine(name, ll.recv_x, topk, weights, ll.handle._replace(num_max_dispatch_tokens_per_rank=M + 1)), ValueError, "handle.src_info"),
        "ll weights shape": (lambda: ops.low_latency_combine(name, ll.recv_x, topk, weights[:, :1], ll.handle), ValueError, "topk_weights"),
        "ll out shape": (lambda: ops.low_latency_combine(name, ll.recv_x, topk, weights, ll.handle, out=torch.empty(1, H, dtype=torch.bfloat16, device=device)), ValueError, "out must have shape"),
        "unknown buffer": (lambda: ops.dispatch("nope", x, layout, topk, weights), ValueError, "'nope'", "not a live"),
        "bad Config": (lambda: deep_ep.Config(3), ValueError, "num_sms"),
        "set_num_sms": (lambda: deep_ep.Buffer.set_num_sms(5), ValueError, "new_num_sms"),
    }
    failures, observed = {}, {}
    for label, (fn, error, *fragments) in cases.items():
        if label in skip:
            continue
        problem = _expect(fn, error, *fragments, observed=observed, label=label)
        if problem:
            failures[label] = problem
    small.destroy()
    normal_only.destroy()
    buffer.destroy()
    failures["destroyed"] = _expect(lambda: buffer.dispatch(x, num_tokens_per_rank=layout.num_tokens_per_rank, is_token_in_rank=layout.is_token_in_rank), RuntimeError, "destroyed")
    buffer.destroy()  # a second destroy is a no-op
    return {k: v for k, v in failures.items() if v}, len(cases), observed


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_bad_inputs_raise_clear_errors(num_ranks):
    for failures, num_cases, _ in run_on_ranks(num_ranks, _bad_inputs):
        assert num_cases >= 25
        assert failures == {}


_KEPT = []  # buffers a rank keeps alive without calling them


def _missing_peer(rank, world_size):
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 0)
    if rank == 1:
        _KEPT.append(buffer)  # alive, but this rank never calls dispatch
        return "skipped"
    x = torch.randn(T, H, dtype=torch.bfloat16)
    topk = torch.randint(0, E, (T, K))
    layout = ops.get_dispatch_layout(topk, E, world_size)
    try:
        ops.dispatch(buffer.name, x, layout, topk, torch.rand(T, K))
    except TimeoutError as error:
        message = str(error)
    else:
        return "no timeout"
    # Afterwards the buffer refuses calls (its group may hold the half-done exchange).
    refused = _expect(lambda: ops.dispatch(buffer.name, x, layout, topk, torch.rand(T, K)),
                      RuntimeError, "unusable after a timeout", buffer.name)
    return message + ("" if not refused else f" | after the timeout: {refused}")


def test_missing_peer_times_out_naming_op_and_peer():
    pool = RankPool(2, {"DEEP_EP_OPS_TIMEOUT_S": "2"})
    try:
        message, skipped = pool.run(_missing_peer, timeout=60)
    finally:
        pool.close(kill=True)
    assert skipped == "skipped"
    assert "deep_ep::dispatch" in message and "rank 1" in message and "2 s" in message, message
    assert "after the timeout" not in message, message  # the buffer refused the next call


def _fp8_with_an_empty_rank(rank, world_size):
    """FP8 dispatch (normal and low-latency) at hidden 128 with a rank that has no tokens."""
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 1 << 26, low_latency_mode=True)
    num_tokens = T if rank == 0 else 0
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(num_tokens, 128, generator=g).bfloat16()
    topk = torch.randint(0, E, (num_tokens, K), generator=g)
    weights = torch.rand(num_tokens, K, generator=g)
    layout = ops.get_dispatch_layout(topk, E, world_size)
    x_fp8, scales = ops.per_token_cast_to_fp8(x)
    normal = ops.dispatch(buffer.name, x_fp8, layout, topk, weights, x_scales=scales)
    low_latency = ops.low_latency_dispatch(buffer.name, x, topk, M, E, use_fp8=True)
    buffer.destroy()
    return normal.recv_x.size(0), int(low_latency.recv_count.sum())


def test_fp8_dispatch_with_a_rank_without_tokens():
    results = run_on_ranks(2, _fp8_with_an_empty_rank)
    # Rank 0's T tokens reach the ranks of their experts; rank 1 sends nothing.
    assert sum(rows for rows, _ in results) >= T
    assert sum(rows for _, rows in results) >= T


def _mixed_devices(rank, world_size):
    """Tensor arguments on two devices raise, naming the argument, before any exchange."""
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 1 << 26, low_latency_mode=True)
    x = torch.randn(T, H, dtype=torch.bfloat16)
    topk = torch.randint(0, E, (T, K))
    weights = torch.rand(T, K)
    layout = ops.get_dispatch_layout(topk, E, world_size)
    out = ops.dispatch(buffer.name, x, layout, topk, weights)
    meta_handle = out.handle._replace(send_head=out.handle.send_head.to("meta"))
    cases = {
        "dispatch": lambda: ops.dispatch(buffer.name, x, layout, topk.to("meta"), weights),
        "combine": lambda: ops.combine(buffer.name, out.recv_x, meta_handle),
        "low_latency_dispatch": lambda: ops.low_latency_dispatch(
            buffer.name, x, topk.to("meta"), M, E, use_fp8=False),
    }
    problems = {label: _expect(fn, ValueError, f"deep_ep::{label}: ", " is on meta but ")
                for label, fn in cases.items()}
    buffer.destroy()
    return {k: v for k, v in problems.items() if v}


def test_mixed_devices_raise_naming_the_argument():
    for problems in run_on_ranks(2, _mixed_devices):
        assert problems == {}


# --- ranks that disagree --------------------------------------------------------------------

DISAGREEMENTS = {  # label -> (the argument the error names, fragments of its message)
    "low-latency M": "num_max_dispatch_tokens_per_rank",
    "low-latency num_experts": "num_experts",
    "low-latency use_fp8": "use_fp8",
    "normal hidden": "hidden",
    "normal num_experts": "num_experts",
    "capacity num_worst_tokens": "num_worst_tokens",
    "normal fp8 flags": "x_dtype",
    "different ops": "different ops",
}


def _disagree(rank, world_size, label, device_collectives=False):
    """Rank 0 passes one value, the others another; every rank must raise the same ValueError
    naming the argument and each rank's value, then the buffer still works (no process aborts,
    no rank left out of step). ``device_collectives``: the reference's exchanges take the path
    they take on an NCCL group (the group's own collectives, no host staging or bounded
    waits), which agrees the same way."""
    from deep_ep_ops import _registry

    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 1 << 26, low_latency_mode=True)
    if device_collectives:
        _registry.get(buffer.name).host_collectives = False
    name, odd, num_e = buffer.name, rank == 0, 24  # 24 experts: a multiple of 2 and 3 ranks
    g = torch.Generator().manual_seed(rank)
    hidden = 2 * H if odd and label == "normal hidden" else H
    x = torch.randn(T, hidden, generator=g).bfloat16()
    experts = 2 * num_e if odd and label in ("normal num_experts", "low-latency num_experts") else num_e
    topk = torch.randint(0, num_e, (T, K), generator=g)
    weights = torch.rand(T, K, generator=g)
    layout = ops.get_dispatch_layout(topk, experts, world_size)
    calls = {
        "low-latency M": lambda: ops.low_latency_dispatch(name, x, topk, M + odd, num_e),
        "low-latency num_experts": lambda: ops.low_latency_dispatch(name, x, topk, M, experts),
        "low-latency use_fp8": lambda: ops.low_latency_dispatch(name, x, topk, M, num_e, use_fp8=odd),
        "normal hidden": lambda: ops.dispatch(name, x, layout, topk, weights),
        "normal num_experts": lambda: ops.dispatch(name, x, layout, topk, weights),
        "capacity num_worst_tokens": lambda: ops.dispatch(
            name, x, layout, topk, weights, num_worst_tokens=world_size * T + odd),
        "normal fp8 flags": lambda: ops.dispatch(
            name, *((ops.per_token_cast_to_fp8(x)[0],) if odd else (x,)), layout, topk, weights,
            x_scales=ops.per_token_cast_to_fp8(x)[1] if odd else None),
        "different ops": lambda: (ops.low_latency_dispatch(name, x, topk, M, num_e) if odd else
                                  ops.dispatch(name, x, layout, topk, weights)),
    }
    start, observed = time.monotonic(), {}
    problem = _expect(calls[label], ValueError, DISAGREEMENTS[label], "rank 0", "rank 1",
                      observed=observed, label=label)
    elapsed = time.monotonic() - start
    kind, message = observed.get(label, ("nothing raised", ""))
    fault_table.record("nccl-style (gloo)" if device_collectives else "gloo", world_size,
                       f"disagreement: {label}", rank, f"{kind}: {message}", elapsed)
    # In step afterwards: the same call with agreeing arguments works on every rank.
    layout = ops.get_dispatch_layout(topk, num_e, world_size)
    after = ops.dispatch(name, x[:, :H], layout, topk, weights).recv_x.size(0)
    buffer.destroy()
    return problem, elapsed, after


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_ranks_that_disagree_all_raise(num_ranks):
    pool = RankPool(num_ranks, {"DEEP_EP_OPS_TIMEOUT_S": "10"})
    try:
        for label in DISAGREEMENTS:
            for rank, (problem, elapsed, after) in enumerate(pool.run(_disagree, label,
                                                                       timeout=60)):
                assert problem == "", (label, rank, problem)
                assert elapsed < 5, (label, rank, elapsed)
                assert after > 0, (label, rank)
    finally:
        pool.close(kill=True)


def test_ranks_that_disagree_all_raise_on_device_collectives():
    """The agreement does not depend on the group's backend: with the exchanges of an NCCL
    group (modelled on gloo: NCCL needs a GPU per rank), the same errors, in step after."""
    pool = RankPool(2, {"DEEP_EP_OPS_TIMEOUT_S": "10"})
    try:
        for label in ("low-latency M", "normal hidden", "capacity num_worst_tokens"):
            for rank, (problem, _, after) in enumerate(pool.run(_disagree, label, True,
                                                                 timeout=60)):
                assert problem == "", (label, rank, problem)
                assert after > 0, (label, rank)
    finally:
        pool.close(kill=True)


def _names_after_uneven_history(rank, world_size):
    """Rank 0 made two more buffers than the others (on a group of its own): the next buffer
    on the whole group still gets one name on every rank."""
    alone = dist.new_group([0])
    if rank == 0:
        for _ in range(2):
            deep_ep.Buffer(alone, 1 << 20).destroy()
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 20)
    name = buffer.name
    buffer.destroy()
    return name


def test_buffer_names_agree_whatever_each_rank_did_before():
    names = run_on_ranks(2, _names_after_uneven_history)
    assert names[0] == names[1], names
