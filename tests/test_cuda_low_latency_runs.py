"""GPU: the low-latency kernels over long runs and in every way they are called: CUDA graphs
with odd and even numbers of steps on two buffers, replayed and interleaved with eager
low-latency and normal-mode calls; pressure iterations; opcheck of every low-latency op;
autograd against the same computations done with the reference; a peer that never arrives (a
RuntimeError naming the op and a rank, then every process exits cleanly); the NVSHMEM put path
(``DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT=1``).

Where a reference call per step would be too slow (pressure, CUDA graphs) the oracle is the
vectorised layout of every rank in ``tests/oracle.py`` (``low_latency_dispatch_batched``, held
equal to the per-rank oracle on CPU by tests/test_semantics.py), which each rank evaluates on
its GPU from inputs that all ranks generate from one shared seed. Pools and helpers as in
test_cuda_low_latency.py.
"""

from __future__ import annotations

import random
import re
import time

import pytest
import torch
import torch.distributed as dist

import gpu_distributed
import oracle
from deep_ep_ops import Buffer, _build, _registry, meta, ops, reference
from deep_ep_ops._registry import TIMEOUT_ENV
from deep_ep_ops.config import get_combine_config, get_dispatch_config
from gpu_distributed import max_ranks, run_on_gpus
from gpu_helpers import (  # noqa: F401  (world_size: the module-scoped fixture: 2, 4 and 8
    # ranks as far as there are GPUs, each size's pool closed after this module's tests of it)
    OPCHECK_UTILS, Diffs, _assert_no_diffs, _bits, _device, _generator, _grad, _new_buffer,
    _nvl_bytes, _opcheck_utils, _routing, _sync, scaled, world_size,
)
from ll_helpers import (
    _check_bound, _check_put_path, _combine_violations, _drain_device_errors, _expert_factors,
    _flags, _ll_buffer, _ll_routing, NAN, PAYLOADS, _token_rows, _unrelated_compute,
)
from test_cuda_low_latency import CASES, _semantics_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
    pytest.mark.skipif(
        not getattr(_build, "HAS_LOW_LATENCY_KERNELS", False),
        reason="the low-latency NVSHMEM kernels are not built (deep_ep_ops._C_nvshmem)",
    ),
]


# --- checks against the vectorised model of every rank (oracle.low_latency_dispatch_batched) ---

CHECKS = (
    "recv_count", "layout_range", "src_info rows", "recv_x rows", "recv_x_scales rows",
    "combine outside the bound", "combine of tokens routed nowhere not zero",
)


def _new_problem(g, rng: random.Random, tokens, num_max, hidden, num_experts, num_topk, device):
    """Every rank's inputs, the same on every rank (shared generators): ``x [R, M, hidden]``,
    ``topk [R, M, K]`` (-1 past each rank's tokens), ``weights [R, M, K]``, and the routing kind.
    Host choices come from ``rng``, so ranks draw the same device numbers in the same order."""
    num_ranks = len(tokens)
    flat = num_ranks * num_max
    x = _token_rows(flat, hidden, g, device).view(num_ranks, num_max, hidden)
    scores = torch.rand(flat, num_experts, generator=g, device=device)
    kind = rng.choice(("uniform", "skewed", "hot_rank", "hot_expert"))
    if kind == "skewed":  # low expert ids favoured
        scores = scores * torch.linspace(2.0, 0.25, num_experts, device=device)
    elif kind == "hot_rank":  # rank 0's experts win almost always
        scores[:, : num_experts // num_ranks] += 0.9
    topk = scores.topk(num_topk, dim=1).indices
    if kind == "hot_expert":
        topk[:, 0] = rng.randrange(num_experts)
    p_duplicate, p_hole, p_nowhere = (rng.choice(p) for p in ((0.0, 0.3), (0.0, 0.1, 0.5),
                                                              (0.0, 0.05, 0.5)))
    if p_duplicate and num_topk >= 2:  # the last entry repeats the first
        repeat = torch.rand(flat, generator=g, device=device) < p_duplicate
        topk[:, -1] = torch.where(repeat, topk[:, 0], topk[:, -1])
    if p_hole:
        topk = topk.masked_fill(torch.rand(flat, num_topk, generator=g, device=device) < p_hole,
                                -1)
    if p_nowhere:
        nowhere = torch.rand(flat, generator=g, device=device) < p_nowhere
        topk = topk.masked_fill(nowhere.unsqueeze(1), -1)
    topk = topk.view(num_ranks, num_max, num_topk)
    for rank, count in enumerate(tokens):
        topk[rank, count:] = -1
    weights = torch.rand(num_ranks, num_max, num_topk, generator=g, device=device)
    return dict(x=x, topk=topk, weights=weights, kind=kind)


def _dispatch_mismatches(out: ops.LowLatencyDispatchOutput, expected: dict, x_all, flags):
    """int64 ``[5]`` on the device: mismatching recv_count / layout_range entries and rows of
    src_info / recv_x / recv_x_scales (valid rows only)."""
    valid, source = expected["valid"], expected["source"].clamp(min=0)
    num_max = x_all.size(1)
    x_flat = x_all.reshape(-1, x_all.size(-1))
    zero = torch.zeros((), dtype=torch.int64, device=valid.device)

    def bad_rows(got, want):
        if got.shape != want.shape:
            return zero + valid.numel()
        return ((got != want).flatten(2).any(-1) & valid).sum()

    if flags["use_fp8"]:
        x_fp8, scales = ops.per_token_cast_to_fp8(x_flat, flags["round_scale"], flags["use_ue8m0"])
        bad_x = bad_rows(out.recv_x.view(torch.uint8), x_fp8.view(torch.uint8)[source])
        bad_scales = bad_rows(_bits(out.recv_x_scales), _bits(scales)[source])
    else:
        bad_x = bad_rows(out.recv_x.view(torch.int16), x_flat.view(torch.int16)[source])
        bad_scales = zero
    return torch.stack([
        (out.recv_count != expected["count"]).sum(),
        (out.handle.layout_range != expected["layout_range"]).sum(),
        ((out.handle.src_info.long() != source % num_max) & valid).sum(),
        bad_x, bad_scales,
    ])


def _expected_expert_outputs(x_all, expected: dict, local_factors) -> torch.Tensor:
    """Combine input in the expected layout: the stand-in experts on the BF16 tokens, NaN past
    the counts."""
    rows = x_all.reshape(-1, x_all.size(-1))[expected["source"].clamp(min=0)].float()
    y = rows.mul_(local_factors.view(-1, 1, 1)).bfloat16()
    return y.masked_fill_(~expected["valid"].unsqueeze(-1), NAN)


def _combine_mismatches(combined, x_seen, topk, weights, factors) -> torch.Tensor:
    """int64 ``[2]`` on the device: elements outside the bound of the float32 sum over this
    rank's own tokens (``x_seen``: the tokens as the experts saw them), and nonzero elements of
    tokens routed nowhere."""
    routed = topk >= 0
    rows = (x_seen.float().unsqueeze(1) * factors[topk.clamp(min=0)].unsqueeze(-1)).bfloat16()
    terms = torch.where(routed.unsqueeze(-1), weights.unsqueeze(-1) * rows.float(), 0)
    violations = _combine_violations(combined, terms.sum(1), terms.abs().sum(1)).sum()
    nowhere = ~routed.any(1)
    return torch.stack([violations, ((combined != 0) & nowhere.unsqueeze(1)).sum()])


# --- 4. CUDA graphs -----------------------------------------------------------------------------

GRAPH_REPLAYS, GRAPH_SEED = 50, 2024
GRAPH_MAX_TOKENS, GRAPH_HIDDEN, GRAPH_LOCAL_EXPERTS, GRAPH_TOPK = 32, 1024, 8, 6


class _Step:
    """One micro-batch step's static inputs on this rank, and the all-rank problem they hold."""

    def __init__(self, buffer: Buffer, payload: str, tokens: list[int], rank: int, device):
        self.buffer, self.flags, self.tokens = buffer, _flags(payload), tokens
        self.label = payload
        n = tokens[rank]
        self.x = torch.zeros(n, GRAPH_HIDDEN, dtype=torch.bfloat16, device=device)
        self.topk = torch.full((n, GRAPH_TOPK), -1, dtype=torch.int64, device=device)
        self.weights = torch.zeros(n, GRAPH_TOPK, device=device)
        self.problem = None

    def load(self, problem: dict, rank: int) -> None:
        n = self.tokens[rank]
        self.x.copy_(problem["x"][rank, :n])
        self.topk.copy_(problem["topk"][rank, :n])
        self.weights.copy_(problem["weights"][rank, :n])
        self.problem = problem


def _stand_in_expert(out: ops.LowLatencyDispatchOutput, flags: dict, local_factors):
    """Rows (cast back from FP8) times the expert's factor; rows past recv_count are whatever the
    kernel left there (combine ignores them)."""
    rows = out.recv_x
    if flags["use_fp8"]:
        num_local, num_rows, hidden = rows.shape
        rows = ops.per_token_cast_back(
            rows.reshape(-1, hidden), out.recv_x_scales.reshape(num_local * num_rows, -1)
        ).view(num_local, num_rows, hidden)
    return (rows.float() * local_factors.view(-1, 1, 1)).bfloat16()


def _run_steps(steps, split: bool, num_experts: int, local_factors, scratch):
    """Dispatch -> stand-in expert -> combine for each step; with ``split`` the micro-batches
    overlap through the send/recv halves (DeepEP's two-micro-batch decode)."""
    num_max = GRAPH_MAX_TOKENS
    if not split:
        results = []
        for s in steps:
            out = ops.low_latency_dispatch(s.buffer.name, s.x, s.topk, num_max, num_experts,
                                           **s.flags)
            y = _stand_in_expert(out, s.flags, local_factors)
            results.append((out, ops.low_latency_combine(s.buffer.name, y, s.topk, s.weights,
                                                         out.handle)))
        return results
    pending = [ops.low_latency_dispatch_send(s.buffer.name, s.x, s.topk, num_max, num_experts,
                                             **s.flags) for s in steps]
    _unrelated_compute(scratch)
    outs = [ops.low_latency_dispatch_recv(s.buffer.name, p) for s, p in zip(steps, pending)]
    sent = [
        ops.low_latency_combine_send(s.buffer.name, _stand_in_expert(o, s.flags, local_factors),
                                     s.topk, s.weights, o.handle)
        for s, o in zip(steps, outs)
    ]
    _unrelated_compute(scratch)
    return [(o, ops.low_latency_combine_recv(s.buffer.name, c, s.topk, s.weights))
            for s, o, c in zip(steps, outs, sent)]


def _step_mismatches(step: _Step, out, combined, rank, num_local, factors) -> torch.Tensor:
    problem = step.problem
    expected = oracle.low_latency_dispatch_batched(problem["topk"], rank, num_local)
    dispatch = _dispatch_mismatches(out, expected, problem["x"], step.flags)
    seen = step.x
    if step.flags["use_fp8"]:
        seen = ops.per_token_cast_back(*ops.per_token_cast_to_fp8(
            step.x, step.flags["round_scale"], step.flags["use_ue8m0"]))
    return torch.cat([dispatch, _combine_mismatches(combined, seen, step.topk, step.weights,
                                                    factors)])


def _normal_mode_mismatches(buffer: Buffer, g, num_ranks, num_experts, device) -> torch.Tensor:
    """A normal-mode dispatch + combine on another buffer: combine of the received rows is
    ``bf16(n_t * x_t)``, n_t the number of ranks token t went to (exact in float32)."""
    x = torch.randn(64, GRAPH_HIDDEN, generator=g, device=device).bfloat16()
    topk = _routing("holes", 64, num_experts, GRAPH_TOPK, num_ranks, g, device)
    weights = torch.rand(64, GRAPH_TOPK, generator=g, device=device)
    layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
    out = ops.dispatch(buffer.name, x, layout, topk, weights)
    combined = ops.combine(buffer.name, out.recv_x, out.handle).combined_x
    copies = layout.is_token_in_rank.sum(1, keepdim=True).float()
    return (combined.float() != (x.float() * copies).bfloat16().float()).sum()


def _graph_job(rank, num_ranks, replays):
    device = _device()
    num_max, hidden, num_local = GRAPH_MAX_TOKENS, GRAPH_HIDDEN, GRAPH_LOCAL_EXPERTS
    num_experts = num_local * num_ranks
    buffer_a = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)
    buffer_b = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)
    configs = [get_dispatch_config(num_ranks).to_list(), get_combine_config(num_ranks).to_list()]
    normal = _new_buffer(_nvl_bytes(configs, [hidden * 2], num_ranks))
    factors = _expert_factors(num_experts, device)
    local_factors = factors[rank * num_local : (rank + 1) * num_local]
    g = torch.Generator(device=device).manual_seed(GRAPH_SEED)  # the same on every rank
    rng = random.Random(GRAPH_SEED)
    scratch = torch.randn(512, 512, device=device)

    def step(buffer, payload, i):
        tokens = [num_max - ((r + i) % 3) * (num_max // 4) for r in range(num_ranks)]
        if i % 4 == 1:
            tokens[-1] = 0  # a rank without tokens
        return _Step(buffer, payload, tokens, rank, device)

    graphs = {  # label -> (steps, overlapped through send/recv)
        "graph of 3 steps on buffer A": (
            [step(buffer_a, "fp8", 0), step(buffer_a, "bf16", 1), step(buffer_a, "fp8_ue8m0", 2)],
            False),
        "graph of 2 steps on buffer B": (
            [step(buffer_b, "fp8_round", 3), step(buffer_b, "fp8", 4)], False),
        "graph of micro-batches A, B overlapped": (
            [step(buffer_a, "fp8", 5), step(buffer_b, "bf16", 6)], True),
    }
    eager = {
        "eager step on buffer A": ([step(buffer_a, "fp8_round", 7)], False),
        "eager micro-batches B, A overlapped": (
            [step(buffer_b, "fp8_ue8m0", 8), step(buffer_a, "fp8", 9)], True),
    }
    counters = {label: torch.zeros(len(CHECKS), dtype=torch.int64, device=device)
                for label in (*graphs, *eager)}
    checked = dict.fromkeys(counters, 0)
    normal_mismatches = torch.zeros((), dtype=torch.int64, device=device)

    def fresh(steps):
        for s in steps:
            s.load(_new_problem(g, rng, s.tokens, num_max, hidden, num_experts, GRAPH_TOPK,
                                device), rank)

    def check(label, steps, results):
        for s, (out, combined) in zip(steps, results):
            counters[label] += _step_mismatches(s, out, combined, rank, num_local, factors)
            checked[label] += 1

    def run_eager(label):
        steps, split = eager[label]
        fresh(steps)
        check(label, steps, _run_steps(steps, split, num_experts, local_factors, scratch))

    # Warm up on a side stream (one-time initialisation), as torch.cuda.graph's docs ask.
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for label, (steps, split) in graphs.items():
            fresh(steps)
            check(label, steps, _run_steps(steps, split, num_experts, local_factors, scratch))
        for label in eager:
            run_eager(label)
    main.wait_stream(side)
    torch.cuda.synchronize(device)
    dist.barrier()

    captured = {}
    for label, (steps, split) in graphs.items():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            results = _run_steps(steps, split, num_experts, local_factors, scratch)
        captured[label] = (graph, results)

    def replay(label):
        steps, _ = graphs[label]
        graph, results = captured[label]
        fresh(steps)  # new inputs into the static tensors, then the graph
        graph.replay()
        check(label, steps, results)

    labels = list(graphs)
    for _ in range(replays):
        replay(labels[0])
        run_eager("eager step on buffer A")
        replay(labels[1])
        normal_mismatches += _normal_mode_mismatches(normal, g, num_ranks, num_experts, device)
        replay(labels[2])
        run_eager("eager micro-batches B, A overlapped")
    torch.cuda.synchronize(device)
    diffs = Diffs()
    _drain_device_errors(diffs, f"rank {rank}")
    for label, counts in counters.items():
        for what, n in zip(CHECKS, counts.tolist()):
            diffs.check(f"rank {rank} {label}", n == 0,
                        f"{what}: {n} mismatches over {checked[label]} checked steps")
    diffs.check(f"rank {rank} normal-mode calls on a second buffer", int(normal_mismatches) == 0,
                f"{int(normal_mismatches)} elements of combine(dispatch(x)) differ")
    captured.clear()  # graphs go before the buffers
    del results
    torch.cuda.synchronize(device)
    normal.destroy()
    buffer_b.destroy()
    buffer_a.destroy()
    return dict(messages=diffs.messages, checked=checked)


def test_cuda_graphs_replay_with_eager_and_normal_calls(world_size):
    """Three CUDA graphs captured on two low-latency buffers (3 steps on A, 2 steps on B, and
    micro-batches A and B overlapped through the send/recv halves; FP8 float32/rounded/UE8M0
    and BF16), each replayed 50 times with fresh inputs, interleaved with eager low-latency steps
    on the same buffers and normal-mode dispatch/combine on a third buffer; every step of every
    replay checked against the model of all ranks."""
    results = run_on_gpus(world_size, _graph_job, GRAPH_REPLAYS, timeout=600)
    _assert_no_diffs([r["messages"] for r in results])
    steps_per_label = {
        "graph of 3 steps on buffer A": 3, "graph of 2 steps on buffer B": 2,
        "graph of micro-batches A, B overlapped": 2, "eager step on buffer A": 1,
        "eager micro-batches B, A overlapped": 2,
    }
    for rank, r in enumerate(results):  # not vacuous: every replay was checked
        for label, n in steps_per_label.items():
            assert r["checked"][label] == n * (GRAPH_REPLAYS + 1), (rank, label, r["checked"])


# --- 5. pressure --------------------------------------------------------------------------------

PRESSURE_ITERATIONS, PRESSURE_SEED, PRESSURE_SYNC_EVERY = scaled(10_000), 7, 500
PRESSURE_MAX_TOKENS, PRESSURE_HIDDEN, PRESSURE_LOCAL_EXPERTS, PRESSURE_TOPK = 32, 512, 16, 8
PRESSURE_PAYLOADS = ("fp8", "bf16", "fp8_round", "fp8_ue8m0")
PRESSURE_COMBINES = ("plain", "send/recv", "zero-copy")


def _pressure_tokens(rng: random.Random, num_max: int) -> int:
    draw = rng.random()
    return num_max if draw < 0.6 else (0 if draw < 0.65 else rng.randint(1, num_max))


def _pressure_job(rank, num_ranks, iterations, seed, force_put=False):
    device = _device()
    num_max, hidden, num_local, num_topk = (
        PRESSURE_MAX_TOKENS, PRESSURE_HIDDEN, PRESSURE_LOCAL_EXPERTS, PRESSURE_TOPK
    )
    num_experts = num_local * num_ranks
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks, force_put=force_put)
    put_path = Diffs()
    if force_put:
        _check_put_path(put_path, rank, buffer)
    name = buffer.name
    g = torch.Generator(device=device).manual_seed(seed)  # the same on every rank
    rng = random.Random(seed)
    factors = _expert_factors(num_experts, device)
    local_factors = factors[rank * num_local : (rank + 1) * num_local]
    flags_per_it = torch.zeros(iterations, len(CHECKS), dtype=torch.int64, device=device)
    stats = torch.zeros(num_local, dtype=torch.int32, device=device)
    expected_stats = torch.zeros(num_local, dtype=torch.int64, device=device)
    rows = torch.zeros((), dtype=torch.int64, device=device)
    holes = torch.zeros((), dtype=torch.int64, device=device)
    repeats = torch.zeros((), dtype=torch.int64, device=device)
    labels: list[str] = []
    done = 0
    start = time.monotonic()
    for it in range(iterations):
        tokens = [_pressure_tokens(rng, num_max) for _ in range(num_ranks)]
        problem = _new_problem(g, rng, tokens, num_max, hidden, num_experts, num_topk, device)
        payload = PRESSURE_PAYLOADS[it % len(PRESSURE_PAYLOADS)]
        flags = _flags(payload)
        split = (it // len(PRESSURE_PAYLOADS)) % 3 == 2
        combine_mode = PRESSURE_COMBINES[it % len(PRESSURE_COMBINES)]
        labels.append(f"{payload}{' send/recv' if split else ''} dispatch, {combine_mode} "
                      f"combine, {problem['kind']} routing, tokens {tokens}")
        n = tokens[rank]
        x, topk = problem["x"][rank, :n], problem["topk"][rank, :n]
        weights = problem["weights"][rank, :n]
        if split:
            pending = ops.low_latency_dispatch_send(name, x, topk, num_max, num_experts, **flags)
            out = ops.low_latency_dispatch_recv(name, pending, stats)
        else:
            out = ops.low_latency_dispatch(name, x, topk, num_max, num_experts, **flags,
                                           cumulative_local_expert_recv_stats=stats)
        expected = oracle.low_latency_dispatch_batched(problem["topk"], rank, num_local)
        expected_stats += expected["count"]
        dispatch = _dispatch_mismatches(out, expected, problem["x"], flags)
        y = _expected_expert_outputs(problem["x"], expected, local_factors)
        if combine_mode == "zero-copy":
            zero_copy = buffer.get_next_low_latency_combine_buffer(out.handle)
            zero_copy.copy_(y)
            combined = ops.low_latency_combine(name, zero_copy, topk, weights, out.handle,
                                               zero_copy=True)
        elif combine_mode == "send/recv":
            sent = ops.low_latency_combine_send(name, y, topk, weights, out.handle)
            combined = ops.low_latency_combine_recv(name, sent, topk, weights)
        else:
            combined = ops.low_latency_combine(name, y, topk, weights, out.handle)
        flags_per_it[it] = torch.cat([
            dispatch, _combine_mismatches(combined, x, topk, weights, factors)
        ])
        rows += expected["count"].sum()
        holes += (topk < 0).sum()
        repeats += ((topk.unsqueeze(2) == topk.unsqueeze(1)) & (topk >= 0).unsqueeze(2)).sum() \
            - (topk >= 0).sum()
        if (it + 1) % PRESSURE_SYNC_EVERY == 0 or it + 1 == iterations:
            window = flags_per_it[done : it + 1].sum()
            gpu_distributed.all_reduce(window)  # every rank stops at the same iteration
            done = it + 1
            total = int(window)
            ops.check_device_errors()
            if total:
                break
    _sync(device)
    ops.check_device_errors()
    elapsed = time.monotonic() - start
    bad = flags_per_it[:done].nonzero().tolist()
    details = put_path.messages + [
        f"iteration {i} ({labels[i]}): {CHECKS[k]}: {int(flags_per_it[i, k])}" for i, k in bad[:30]
    ]
    stats_ok = bool((stats.long() == expected_stats).all())
    buffer.destroy()
    return dict(
        iterations=done, mismatches=len(bad) + len(put_path.messages), details=details,
        stats_ok=stats_ok,
        rows=int(rows), holes=int(holes), repeats=int(repeats), elapsed=elapsed,
    )


def _assert_pressure(results, iterations: int) -> None:
    problems = []
    for rank, r in enumerate(results):
        problems += [f"rank {rank}: {d}" for d in r["details"]]
        if r["mismatches"]:
            problems.append(f"rank {rank}: stopped at iteration {r['iterations']} of "
                            f"{iterations} after mismatches")
        elif r["iterations"] != iterations:
            problems.append(f"rank {rank}: ran {r['iterations']} of {iterations} iterations")
        if not r["stats_ok"]:
            problems.append(f"rank {rank}: cumulative_local_expert_recv_stats differ from the "
                            "sum of the expected recv_count")
        # Not vacuous: rows moved, -1 entries and repeated experts were exercised.
        if not (r["rows"] > 0 and r["holes"] > 0 and r["repeats"] > 0):
            problems.append(f"rank {rank}: vacuous run {r}")
    assert not problems, "\n".join(problems)


def test_pressure_dispatch_combine(world_size):
    """10000 iterations of dispatch + combine on one buffer, fresh routing each time (uniform,
    skewed, a hot rank, a hot expert; -1 entries, tokens routed nowhere, a repeated expert in a
    row; full, partial and empty ranks), cycling FP8 (float32 / rounded / UE8M0 scales) and
    BF16, fused and send/recv dispatch, plain / send/recv / zero-copy combine. Each rank checks
    its outputs of every iteration against the model of all ranks on its GPU (dispatch exact on
    the valid rows, combine within the bound, zeros for tokens routed nowhere), accumulating
    mismatch counts on the device and synchronising every 500 iterations."""
    results = run_on_gpus(world_size, _pressure_job, PRESSURE_ITERATIONS, PRESSURE_SEED,
                          timeout=600)
    _assert_pressure(results, PRESSURE_ITERATIONS)


# --- 6. opcheck on CUDA -------------------------------------------------------------------------

LL_OPCHECK_OPS = (
    "low_latency_dispatch", "low_latency_dispatch_send", "low_latency_dispatch_recv",
    "low_latency_combine", "low_latency_combine_out", "low_latency_combine_send",
    "low_latency_combine_recv", "low_latency_cached_dispatch", "low_latency_gather",
    "clean_low_latency_buffer",
)
# The split halves must stay paired (a receive without its send raises): these utils call the op
# exactly once each, and the test pairs every call. AOT's check calls an op twice and compares
# outputs that the send halves leave unspecified; tracing them is device independent and
# covered on the CPU by tests/test_opcheck.py.
SPLIT_OPCHECK_UTILS = ("test_schema", "test_faketensor")
OPCHECK_MAX_TOKENS, OPCHECK_HIDDEN = 4, 512


def _ll_opcheck_job(rank, num_ranks, op_name):
    device = _device()
    num_max, hidden = OPCHECK_MAX_TOKENS, OPCHECK_HIDDEN
    # Every token goes to every expert (each in its own order): every received row is specified,
    # so opcheck can compare outputs of different calls.
    num_experts = num_topk = 2 * num_ranks
    num_local = num_experts // num_ranks
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)
    name = buffer.name
    ll = (name, num_ranks, num_max, num_experts)
    g = _generator(device, 900 + rank)
    x = torch.randn(num_max, hidden, generator=g, device=device).bfloat16()
    every = torch.rand(num_max, num_experts, generator=g, device=device).argsort(dim=1)
    weights = torch.rand(num_max, num_topk, generator=g, device=device)
    op = getattr(torch.ops.deep_ep, op_name).default
    _ops = torch.ops.deep_ep
    failures = []

    def opcheck(label, args, utils, rg=False):
        results = torch.library.opcheck(op, args, test_utils=utils, raise_exception=False)
        failures.extend(
            f"rank {rank} requires_grad={rg} {op_name}[{label}] {util}: "
            f"{type(error).__name__}: {str(error)[:500]}"
            for util, error in results.items() if error != "SUCCESS"
        )

    def other_half(what, call):
        """The receive half of the one send a util made (reported if it cannot run)."""
        try:
            call()
        except Exception as error:  # noqa: BLE001
            failures.append(f"rank {rank} {op_name}[{what}]: the matching receive raised "
                            f"{type(error).__name__}: {str(error)[:300]}")

    def dispatched():
        out = ops.low_latency_dispatch(name, x, every, num_max, num_experts, use_fp8=False)
        y = torch.randn(out.recv_x.shape, generator=g, device=device).bfloat16()
        return out.handle, y

    if op_name == "low_latency_dispatch":
        for rg in (False, True):
            for payload in PAYLOADS if not rg else ("bf16",):  # FP8 output: no gradient
                args = (_grad(x, rg), every, *ll, *PAYLOADS[payload])
                opcheck(payload, args, _opcheck_utils(args), rg)
    elif op_name == "low_latency_dispatch_send":
        for payload in ("bf16", "fp8_ue8m0"):
            for util in SPLIT_OPCHECK_UTILS:
                opcheck(payload, (x, every, *ll, *PAYLOADS[payload]), (util,))
                outputs = meta.new_low_latency_dispatch_outputs(
                    x, num_ranks, num_max, num_experts, PAYLOADS[payload][0],
                    PAYLOADS[payload][2])
                other_half(f"{payload} {util}",
                           lambda: _ops.low_latency_dispatch_recv(*outputs, None, name))
    elif op_name == "low_latency_dispatch_recv":
        for payload in ("fp8", "bf16"):
            for with_stats in (True, False):
                stats = (torch.arange(num_local, dtype=torch.int32, device=device)
                         if with_stats else None)
                like = (*meta.new_low_latency_dispatch_outputs(
                    x, num_ranks, num_max, num_experts, PAYLOADS[payload][0],
                    PAYLOADS[payload][2]), stats, name)
                for util in (u for u in SPLIT_OPCHECK_UTILS if u in _opcheck_utils(like)):
                    pending = _ops.low_latency_dispatch_send(x, every, *ll, *PAYLOADS[payload])
                    opcheck(f"{payload} stats={with_stats}", (*pending, stats, name), (util,))
    elif op_name == "low_latency_combine":
        handle, y = dispatched()
        for rg in (False, True):
            for zero_copy in (False, True):
                args = (_grad(y, rg), every, _grad(weights, rg), handle.src_info,
                        handle.layout_range, *ll, zero_copy)
                opcheck(f"zero_copy={zero_copy}", args, OPCHECK_UTILS, rg)
        # -1 entries and a repeated expert (forward only: gradients of rows past recv_count
        # are unspecified, so AOT could not compare them across calls).
        holes = _routing("duplicates", num_max, num_experts, 3, num_ranks, g, device)
        out = ops.low_latency_dispatch(name, x, holes, num_max, num_experts, use_fp8=False)
        y_holes = torch.randn(out.recv_x.shape, generator=g, device=device).bfloat16()
        args = (y_holes, holes, torch.rand(num_max, 3, generator=g, device=device),
                out.handle.src_info, out.handle.layout_range, *ll, False)
        opcheck("-1 entries and a repeated expert", args, OPCHECK_UTILS)
    elif op_name == "low_latency_combine_out":
        handle, y = dispatched()
        out = torch.empty(num_max, hidden, dtype=torch.bfloat16, device=device)
        opcheck("bf16", (y, every, weights, handle.src_info, handle.layout_range, *ll, False, out),
                OPCHECK_UTILS)
    elif op_name == "low_latency_combine_send":
        handle, y = dispatched()
        for util in SPLIT_OPCHECK_UTILS:
            opcheck("bf16", (y, every, weights, handle.src_info, handle.layout_range, *ll, False),
                    (util,))
            other_half(f"bf16 {util}", lambda: _ops.low_latency_combine_recv(
                torch.empty(num_max, hidden, dtype=torch.bfloat16, device=device), every,
                weights, name))
    elif op_name == "low_latency_combine_recv":
        handle, y = dispatched()
        for util in SPLIT_OPCHECK_UTILS:
            sent = _ops.low_latency_combine_send(y, every, weights, handle.src_info,
                                                 handle.layout_range, *ll, False)
            opcheck("bf16", (sent, every, weights, name), (util,))
    elif op_name == "low_latency_cached_dispatch":
        handle, _ = dispatched()
        grad = torch.randn(num_max, hidden, generator=g, device=device).bfloat16()
        opcheck("bf16", (grad, every, weights, handle.src_info, handle.layout_range, *ll),
                OPCHECK_UTILS)
    elif op_name == "low_latency_gather":
        handle, y = dispatched()
        opcheck("bf16", (y, every, handle.src_info, handle.layout_range, *ll), OPCHECK_UTILS)
    elif op_name == "clean_low_latency_buffer":
        # The workspace ops.clean_low_latency_buffer passes (opcheck hands the op copies).
        workspace = _registry.get(name).workspace
        opcheck("the buffer's workspace", (workspace, name, num_max, hidden, num_experts),
                OPCHECK_UTILS)
    else:
        raise ValueError(op_name)
    diffs = Diffs()
    _drain_device_errors(diffs, f"rank {rank} after opcheck of {op_name}")
    buffer.destroy()
    return failures + diffs.messages


@pytest.mark.parametrize("op_name", LL_OPCHECK_OPS)
def test_opcheck_on_cuda(world_size, op_name):
    """opcheck of one low-latency op on CUDA inside every rank (schema, autograd registration,
    fake tensor, AOT dispatch with dynamic shapes; the send/recv halves with the utils that call
    them once, each call paired with its other half), with and without requires_grad where the
    op is differentiable."""
    failures = [f for per_rank in run_on_gpus(world_size, _ll_opcheck_job, op_name)
                for f in per_rank]
    assert not failures, "\n".join(failures)


# --- 7. autograd --------------------------------------------------------------------------------


def _first_of_each_expert(topk: torch.Tensor) -> torch.Tensor:
    """``[T, K]`` bool: routed, and no earlier entry of the row names the same expert (a token
    is dispatched once per distinct expert)."""
    num_topk = topk.size(1)
    earlier = torch.ones(num_topk, num_topk, dtype=torch.bool, device=topk.device).tril(-1)
    return (topk >= 0) & ~((topk.unsqueeze(2) == topk.unsqueeze(1)) & earlier).any(2)


def _autograd_job(rank, num_ranks):
    device = _device()
    num_max, hidden, num_topk, num_local = 16, 512, 4, 4
    num_experts = num_local * num_ranks
    num_rows = num_ranks * num_max
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)
    name = buffer.name
    g = _generator(device, 61 + rank)
    diffs = Diffs()
    where = f"rank {rank}/{num_ranks}"
    num_tokens = num_max - rank % 3
    x = _token_rows(num_tokens, hidden, g, device).requires_grad_()
    topk = _ll_routing("duplicates", num_tokens, num_experts, num_topk, num_ranks, g, device)
    topk[:1] = -1  # a token routed nowhere
    nowhere = ~(topk >= 0).any(1)

    # low_latency_dispatch (BF16): grad x = sum over the token's copies (one per distinct expert).
    out = ops.low_latency_dispatch(name, x, topk, num_max, num_experts, use_fp8=False)
    handle = out.handle
    args = (handle.src_info, handle.layout_range, name, num_ranks, num_max, num_experts)
    valid = torch.arange(num_rows, device=device) < out.recv_count.unsqueeze(1)
    # NaN in the rows past recv_count: their gradient must not reach x.
    grad_recv = torch.randn(out.recv_x.shape, generator=g, device=device).bfloat16()
    grad_recv.masked_fill_(~valid.unsqueeze(-1), NAN)
    (grad_x,) = torch.autograd.grad(out.recv_x, x, grad_recv)
    copies = _first_of_each_expert(topk)
    want = reference.low_latency_combine(grad_recv.float(), topk, copies.float(), *args, False)
    rows = reference.low_latency_gather(grad_recv, topk, *args)
    scale = torch.where(copies.unsqueeze(-1), rows.float().abs(), 0).sum(1)
    _check_bound(diffs, f"{where} grad x of low_latency_dispatch", grad_x, want, scale)
    diffs.check(f"{where} grad x of a token routed nowhere", bool((grad_x[nowhere] == 0).all()),
                "not zero")

    # low_latency_combine: grad x[e][slot(t, k)] = w[t, k] grad[t]; grad w[t, k] = <grad[t], row>.
    y = torch.randn(out.recv_x.shape, generator=g, device=device).bfloat16()
    y = y.masked_fill(~valid.unsqueeze(-1), NAN).requires_grad_()
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device).requires_grad_()
    combined = ops.low_latency_combine(name, y, topk, weights, handle)
    grad_out = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
    grad_y, grad_w = torch.autograd.grad(combined, (y, weights), grad_out)
    w = weights.detach()
    want_y = reference.low_latency_cached_dispatch(grad_out.float(), topk, w, *args)
    scale_y = reference.low_latency_cached_dispatch(grad_out.float().abs(), topk, w.abs(), *args)
    _check_bound(diffs, f"{where} grad x of low_latency_combine (rows below recv_count)", grad_y,
                 want_y, scale_y, valid.unsqueeze(-1))
    padding = (grad_y != 0) & ~valid.unsqueeze(-1)
    diffs.check(f"{where} grad x of low_latency_combine past recv_count", not bool(padding.any()),
                f"{int(padding.any(-1).sum())} rows are not zero: combine does not read them, "
                "so their gradient is 0 (else grads of expert weights would be wrong)")
    products = reference.low_latency_gather(y.detach(), topk, *args).float() \
        * grad_out.float().unsqueeze(1)
    want_w = torch.where(topk >= 0, products.sum(-1), 0)
    _check_bound(diffs, f"{where} grad topk_weights of low_latency_combine", grad_w, want_w,
                 products.abs().sum(-1))
    diffs.check(f"{where} grad topk_weights of -1 entries", bool((grad_w[topk < 0] == 0).all()),
                "not zero")
    _drain_device_errors(diffs, where)
    buffer.destroy()
    return diffs.messages


def test_autograd_matches_reference(world_size):
    """Gradients on CUDA against the same computations done with the reference functions:
    BF16 low_latency_dispatch (grad x: a unit-weight combine over each token's distinct
    experts; NaN gradients past recv_count ignored) and low_latency_combine (grad of the expert
    rows, zero past recv_count, and grad of topk_weights), within BF16 rounding; -1 entries and
    a repeated expert in a row."""
    _assert_no_diffs(run_on_gpus(world_size, _autograd_job))


# --- 8. a peer that never arrives -----------------------------------------------------------------

LL_TIMEOUT_S = 3
LL_TIMEOUT_SCENARIOS = {  # op rank 0 calls alone -> regex of the op the error must name
    "low_latency_dispatch": r"low_latency_dispatch",
    "low_latency_combine": r"low_latency_combine",
    "low_latency_dispatch_send/recv": r"low_latency_dispatch",
}


def _ll_timeout_job(rank, num_ranks, scenario):
    device = _device()
    num_max, hidden, num_topk, num_local = 16, 512, 4, 4
    num_experts = num_local * num_ranks
    buffer = _ll_buffer([(num_max, hidden, num_experts)], num_ranks)  # DEEP_EP_OPS_TIMEOUT_S=3
    name = buffer.name
    g = _generator(device, 99 + rank)
    x = _token_rows(num_max, hidden, g, device)
    topk = _ll_routing("random", num_max, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_max, num_topk, generator=g, device=device)
    # Everyone together first (one-time setup, the buffer's shapes), then rank 0 alone. The
    # barriers line the ranks up at each warm-up call: with four processes on one GPU, a rank's
    # first launch of a kernel can come seconds after its peers', past the 3 s timeout.
    _sync(device)
    dist.barrier()
    out = ops.low_latency_dispatch(name, x, topk, num_max, num_experts, use_fp8=False)
    _sync(device)
    dist.barrier()
    ops.low_latency_combine(name, out.recv_x, topk, weights, out.handle)
    _sync(device)
    dist.barrier()  # over NCCL: nobody is inside a low-latency kernel any more
    if rank != 0:
        return dict(called=False)  # the other ranks never call (and stay alive, idle)
    start = time.monotonic()
    error, surfaced = None, "the call"
    try:
        if scenario == "low_latency_dispatch":
            ops.low_latency_dispatch(name, x, topk, num_max, num_experts)
        elif scenario == "low_latency_combine":
            ops.low_latency_combine(name, out.recv_x, topk, weights, out.handle)
        else:
            pending = ops.low_latency_dispatch_send(name, x, topk, num_max, num_experts)
            ops.low_latency_dispatch_recv(name, pending)
        surfaced = "torch.cuda.synchronize()"
        torch.cuda.synchronize()
        surfaced = "ops.check_device_errors()"
        ops.check_device_errors()
    except Exception as caught:  # noqa: BLE001  (the test process checks type and message)
        error = caught
    # The buffer is unusable now: no destroy; the pool leaves with os._exit.
    return dict(
        called=True, elapsed=time.monotonic() - start, surfaced=surfaced,
        error_type=None if error is None else type(error).__name__,
        is_runtime_error=isinstance(error, RuntimeError),
        message=None if error is None else str(error),
    )


def test_missing_peer_times_out_naming_op_and_rank(world_size):
    """With DEEP_EP_OPS_TIMEOUT_S=3, rank 0 calls a low-latency op that no other rank calls
    (dispatch; combine after a common dispatch; the send and receive halves): it gets a
    RuntimeError naming the op and a rank, from the call, the synchronisation or
    ops.check_device_errors(), within seconds; then every rank exits by itself. Each scenario in
    fresh processes (a timed-out buffer must not poison other tests), one after the other: run
    at once on one GPU (three scenarios of four ranks, each process a quarter of the SMs under
    MPS), the spinning low-latency kernels of one scenario held another's rank back past the
    3 s timeout in its warm-up call (2026-12-03, twice)."""
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {TIMEOUT_ENV: str(LL_TIMEOUT_S)}, _ll_timeout_job, LL_TIMEOUT_SCENARIOS,
        timeout=240, at_once=False,
    )

    problems = []
    for scenario, op_pattern in LL_TIMEOUT_SCENARIOS.items():
        first = results[scenario][0]
        message = first["message"] or ""
        label = f"{scenario} (rank 0 alone)"
        if first["error_type"] is None:
            problems.append(f"{label}: no error after {first['elapsed']:.1f} s")
            continue
        label += f", raised at {first['surfaced']}"
        if not first["is_runtime_error"]:
            problems.append(f"{label}: {first['error_type']} is not a RuntimeError: {message}")
        if not re.search(op_pattern, message):
            problems.append(f"{label}: the message does not name {op_pattern}: {message}")
        if not re.search(r"\brank\b", message):
            problems.append(f"{label}: the message names no rank: {message}")
        gpu_distributed.record_fault(world_size, f"missing peer: {label}", 0,
                                     f"{first['error_type']}: {message}", first["elapsed"])
        problems += gpu_distributed.timeout_problems(
            label, results[scenario], exit_codes[scenario], LL_TIMEOUT_S
        )
    assert not problems, "\n".join(problems)


# --- 9. the NVSHMEM put path ----------------------------------------------------------------------

PUT_PATH_CASES = [
    *CASES["semantics_bf16"], *CASES["semantics_fp8"], CASES["decode_shapes"][0],
    *CASES["limits"][:2], *CASES["nothing_moves"],
]
PUT_PATH_PRESSURE_ITERATIONS = scaled(1000)


def test_nvshmem_put_path_matches_reference(world_size):
    """Buffers created with DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT=1 reach every peer through NVSHMEM
    puts and signals instead of NVLink stores (checked: no peer mapped): the semantic cases of
    test_low_latency_matches_reference (BF16, FP8, DeepSeek shapes, 1024 tokens with top-16,
    nothing moving) and a short pressure run, at 2 ranks."""
    if world_size != 2:
        pytest.skip("the put path is checked at 2 ranks")
    _assert_no_diffs(run_on_gpus(world_size, _semantics_job, PUT_PATH_CASES, True, timeout=600))
    _assert_pressure(
        run_on_gpus(world_size, _pressure_job, PUT_PATH_PRESSURE_ITERATIONS, PRESSURE_SEED + 1,
                    True, timeout=600),
        PUT_PATH_PRESSURE_ITERATIONS,
    )
