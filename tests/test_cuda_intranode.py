"""GPU: the intranode CUDA kernels of dispatch / capacity_dispatch / cached_dispatch / combine.

Every test runs inside a pool of NCCL ranks, one GPU each (``tests/gpu_distributed.py``), at 2,
4 and 8 ranks as far as the machine has GPUs. The oracle is the reference backend: its functions
(``deep_ep_ops.reference.dispatch`` and friends) are called directly, on the same CUDA tensors
and the same buffer, where they run over NCCL. Kernel results must equal them bit for bit:
every output of every op, handle tensors included (float8 compared as bytes), strides too.

- semantics: every normal-mode case of the CPU suite (routings random / skewed / -1 entries /
  tokens routed nowhere / a rank receiving nothing / a rank without tokens / duplicate experts;
  top-k 1..8 and none; expert alignment; FP8 with float32, rounded and UE8M0 scales, row- and
  column-major; capacity mode tight and loose; cached dispatch; combine with weights and one or
  two biases, BF16 and float32) at hidden 200, 2048, 4096 and 7168, with token counts that wrap
  the NVLink ring buffers, and over SM counts and chunk sizes;
- pressure: thousands of dispatch + combine iterations with fresh routing, every one compared;
- ``torch.library.opcheck`` of the four ops on CUDA inside each rank;
- the example MoE layer under ``torch.compile(fullgraph=True)`` (capacity mode, and normal mode
  with unbacked sizes) against eager;
- a capacity-mode training step captured in a CUDA graph and replayed with fresh inputs;
- the DeepEP ``Buffer`` options (events, async finish, streams, SM count, two live buffers);
- a peer that never arrives: a timeout error naming the op and the peer, and a clean exit.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import time

import pytest
import torch
import torch.distributed as dist

import gpu_distributed
from deep_ep_ops import Buffer, EventOverlap, _build, ops, reference
from deep_ep_ops._registry import TIMEOUT_ENV
from deep_ep_ops.config import get_combine_config, get_dispatch_config
from gpu_distributed import max_ranks, run_on_gpus
from gpu_helpers import (  # noqa: F401  (world_size: the module-scoped fixture)
    Diffs, _assert_no_diffs, _bit_flags, _device, _generator, _grad, _new_buffer, _nvl_bytes,
    _opcheck_utils, _routing, _sync, scaled, world_size,
)
from test_compile import _train_step


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
    pytest.mark.skipif(not _build.HAS_CUDA_KERNELS, reason="the CUDA extension is not built"),
]


# --- rank side: helpers -----------------------------------------------------------------------

DISPATCH_OUTPUTS = (
    "recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
    "num_recv_tokens_per_expert", "rank_prefix_matrix", "channel_prefix_matrix",
    "recv_channel_prefix_matrix", "recv_src_idx", "send_head",
)
CACHED_OUTPUTS = ("recv_x", "recv_x_scales", "recv_topk_weights")
COMBINE_OUTPUTS = ("combined_x", "combined_topk_weights")
FP8_MODES = {"fp8": (False, False), "fp8_round": (True, False), "fp8_ue8m0": (True, True)}
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
def _handle(dispatch_out, is_token_in_rank) -> tuple:
    """The six handle tensors (schema order) of a dispatch's outputs."""
    out = dispatch_out
    return (out[5], out[6], out[7], out[8], is_token_in_rank, out[9])


def _resized(t, rows: int):
    """``t`` with ``rows`` rows (cut, or padded with zeros): lets the reference run with its own
    row count when the kernel's differs (already a reported failure), keeping ranks in step."""
    if t is None or t.size(0) == rows:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    n = min(rows, t.size(0))
    out[:n] = t[:n]
    return out


# --- rank side: inputs ------------------------------------------------------------------------


def _payload(kind, num_tokens, hidden, g, device, column_major=False):
    """``(x, x_scales or None)``: BF16 / float32, or FP8 from the cast op (row- or column-major
    scales, the latter as DeepEP's callers often pass them)."""
    x = torch.randn(num_tokens, hidden, generator=g, device=device) * 3
    if kind == "float32":
        return x, None
    x = x.bfloat16()
    if kind == "bf16":
        return x, None
    x_fp8, scales = ops.per_token_cast_to_fp8(x, *FP8_MODES[kind])
    if column_major:
        scales = scales.t().contiguous().t()
    return x_fp8, scales


def _token_counts(case, num_ranks) -> list[int]:
    tokens = case["tokens"]
    counts = [max(0, tokens - (r % 3) * (tokens // 8)) for r in range(num_ranks)]
    if case.get("empty_rank"):
        counts[-1] = 0
    return counts


def _case_inputs(case, rank, num_ranks, device):
    g = _generator(device, case["seed"] * 1009 + rank)
    num_experts, hidden, num_topk = case["L"] * num_ranks, case["hidden"], case["topk"]
    num_tokens = _token_counts(case, num_ranks)[rank]
    inp = {"num_tokens": num_tokens}
    if num_topk:
        inp["topk"] = _routing(
            case["routing"], num_tokens, num_experts, num_topk, num_ranks, g, device
        )
        inp["weights"] = torch.rand(num_tokens, num_topk, generator=g, device=device)
        layout = ops.get_dispatch_layout(inp["topk"], num_experts, num_ranks)
        inp["per_rank"], inp["is_in"] = layout.num_tokens_per_rank, layout.is_token_in_rank
        inp["per_expert"] = layout.num_tokens_per_expert
    else:  # routing from is_token_in_rank alone; the first token goes nowhere
        is_in = torch.rand(num_tokens, num_ranks, generator=g, device=device) < 0.5
        is_in[:1] = False
        inp.update(topk=None, weights=None, per_expert=None, is_in=is_in,
                   per_rank=is_in.sum(0, dtype=torch.int32))
    column_major = case.get("column_major", False)
    inp["x"], inp["scales"] = _payload(
        case["payload"], num_tokens, hidden, g, device, column_major
    )
    # Cached dispatch moves another payload, and raw weights, along the same routes.
    inp["x2"], inp["scales2"] = _payload(
        case["payload"], num_tokens, hidden, g, device, column_major
    )
    inp["weights2"] = torch.rand(num_tokens, num_topk or 3, generator=g, device=device)
    worst = case.get("worst", "none")
    if worst == "tight":  # the most rows any rank receives (at least 1): needs every rank
        received = inp["is_in"].sum(0).to(torch.int64)
        gpu_distributed.all_reduce(received)
        inp["worst"] = max(int(received.max()), 1)
    else:
        inp["worst"] = {"none": 0, "loose": num_ranks * case["tokens"] + 5}[worst]
    combine_dtype = DTYPES[case.get("combine_dtype", "bf16")]
    inp["biases"] = [
        (torch.randn(num_tokens, hidden, generator=g, device=device) * 2).to(combine_dtype)
        for _ in range(case.get("bias", 0))
    ] + [None] * (2 - case.get("bias", 0))
    inp["combine_dtype"] = combine_dtype
    inp["g"] = g
    return inp


def _configs(case, num_ranks):
    if "config" in case:
        return list(case["config"]), list(case["config"])
    return get_dispatch_config(num_ranks).to_list(), get_combine_config(num_ranks).to_list()


def _payload_bytes(case) -> list[int]:
    element = {"float32": 4}.get(case["payload"], 2)  # FP8 is sized as 2 bytes (DeepEP's hint)
    combine = DTYPES[case.get("combine_dtype", "bf16")].itemsize
    return [case["hidden"] * element, case["hidden"] * max(combine, 2)]


# --- 1. semantics: kernels against the reference ---------------------------------------------


def _check_case(buffer: str, rank: int, num_ranks: int, case, diffs: Diffs) -> None:
    device = _device()
    inp = _case_inputs(case, rank, num_ranks, device)
    where = f"{case['name']} rank {rank}/{num_ranks}"
    dispatch_config, combine_config = _configs(case, num_ranks)
    worst = inp["worst"]
    args = (inp["x"], inp["scales"], inp["topk"], inp["weights"], inp["per_rank"], inp["is_in"],
            inp["per_expert"], buffer, case.get("align", 1))
    if worst:
        op, extra = "capacity_dispatch", (worst,)
    else:
        op, extra = "dispatch", ()
    try:
        got = getattr(torch.ops.deep_ep, op)(*args, *extra, dispatch_config)
    except ValueError as error:
        # Ranks sharing one GPU: a config with more blocks than this process's SMs (the MPS
        # share) must refuse clearly, as the data kernels need all their blocks resident.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if "resident at once" not in str(error) or dispatch_config[0] <= sms:
            raise
        return  # refused as it must be; nothing to compare
    want = getattr(reference, op)(*args, *extra, dispatch_config)
    for field, a, b in zip(DISPATCH_OUTPUTS, got, want):
        diffs.same(f"{where} {op}.{field}", a, b)
    handle, ref_handle = _handle(got, inp["is_in"]), _handle(want, inp["is_in"])

    cached_args = (inp["x2"], inp["scales2"], inp["weights2"])
    got = torch.ops.deep_ep.cached_dispatch(
        *cached_args, *handle, buffer, worst, dispatch_config
    )
    want_cached = reference.cached_dispatch(
        *cached_args, *ref_handle, buffer, worst, dispatch_config
    )
    for field, a, b in zip(CACHED_OUTPUTS, got, want_cached):
        diffs.same(f"{where} cached_dispatch.{field}", a, b)

    # Combine random rows (capacity padding included: it must be ignored), weights and biases.
    g, rows, ref_rows = inp["g"], handle[3].size(0), ref_handle[3].size(0)
    y = (torch.randn(rows, case["hidden"], generator=g, device=device) * 2).to(
        inp["combine_dtype"]
    )
    y_weights = (torch.rand(rows, case["topk"], generator=g, device=device)
                 if case["topk"] else None)
    bias_0, bias_1 = inp["biases"]
    got = torch.ops.deep_ep.combine(
        y, y_weights, bias_0, bias_1, *handle, buffer, worst, combine_config
    )
    if case.get("nothing_comes_back"):
        want = _combine_of_nothing(inp, y_weights)
    else:
        want = reference.combine(
            _resized(y, ref_rows), _resized(y_weights, ref_rows), bias_0, bias_1, *ref_handle,
            buffer, worst, combine_config,
        )
    for field, a, b in zip(COMBINE_OUTPUTS, got, want):
        diffs.same(f"{where} combine.{field}", a, b)


def _combine_of_nothing(inp, y_weights):
    """Combine's result when no token of any rank went anywhere: the biases, summed in float32
    and rounded once; zero weights. Computed here because the reference's data-dependent combine
    fails on a rank whose tokens all went nowhere (``_reduce_returned`` index_selects from an
    empty tensor)."""
    num_tokens, hidden = inp["is_in"].size(0), inp["x"].size(1)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=inp["is_in"].device)
    for bias in inp["biases"]:
        if bias is not None:
            acc = acc + bias.float()
    num_topk = 0 if y_weights is None else y_weights.size(1)
    return acc.to(inp["combine_dtype"]), acc.new_zeros((num_tokens, num_topk))


def _semantics_job(rank, num_ranks, cases):
    device = _device()
    configs = [config for case in cases for config in _configs(case, num_ranks)]
    widths = [width for case in cases for width in _payload_bytes(case)]
    buffer = _new_buffer(_nvl_bytes(configs, widths, num_ranks))
    diffs = Diffs()
    for case in cases:
        _check_case(buffer.name, rank, num_ranks, case, diffs)
    _sync(device)
    buffer.destroy()
    return diffs.messages


def _case(name, seed, L, hidden, topk, payload, tokens, routing="random", **kwargs):
    return dict(name=name, seed=seed, L=L, hidden=hidden, topk=topk, payload=payload,
                tokens=tokens, routing=routing, **kwargs)


# Token counts above num_sms/2 * num_max_nvl_chunked_recv_tokens (10 * 256) per rank make every
# channel's ring buffer wrap around. L is experts per rank (E = L * R, so any R works).
CASES = {
    "bf16": [
        _case("random_k8_h7168", 1, 32, 7168, 8, "bf16", 4096),
        _case("skewed_k6_h4096_bias_align4", 2, 16, 4096, 6, "bf16", 3000, "skewed",
              bias=1, align=4),
        _case("holes_k1_h2048_bias_pair", 3, 4, 2048, 1, "bf16", 2500, "holes", bias=2),
        _case("duplicates_k3_h200_bias_align3", 4, 8, 200, 3, "bf16", 1500, "duplicates",
              bias=1, align=3),
        _case("rank0_only_k2_h2048_bias", 5, 4, 2048, 2, "bf16", 700, "rank0_only", bias=1),
        _case("random_k4_h200_few_tokens", 6, 2, 200, 4, "bf16", 7),
        _case("random_k5_h4096_align2", 7, 8, 4096, 5, "bf16", 1000, align=2),
        _case("holes_k7_h2048_bias_pair", 8, 4, 2048, 7, "bf16", 2048, "holes", bias=2),
    ],
    "fp8": [
        _case("fp8_random_k8_h7168", 11, 32, 7168, 8, "fp8", 4096),
        _case("fp8_column_major_skewed_k4_h2048_bias", 12, 8, 2048, 4, "fp8", 2000, "skewed",
              column_major=True, bias=1),
        _case("fp8_round_holes_k3_h4096_align2", 13, 8, 4096, 3, "fp8_round", 1500, "holes",
              align=2),
        _case("fp8_ue8m0_duplicates_k2_h7168", 14, 4, 7168, 2, "fp8_ue8m0", 1200,
              "duplicates"),
        _case("fp8_ue8m0_column_major_k6_h2048_align4_bias_pair", 15, 16, 2048, 6,
              "fp8_ue8m0", 900, column_major=True, align=4, bias=2),
        _case("fp8_round_column_major_rank0_only_k1_h4096", 16, 4, 4096, 1, "fp8_round", 300,
              "rank0_only", column_major=True),
    ],
    "capacity": [
        _case("tight_random_k8_h7168_bias_pair", 21, 32, 7168, 8, "bf16", 2048,
              worst="tight", bias=2),
        _case("loose_skewed_k4_h2048_align4", 22, 8, 2048, 4, "bf16", 1500, "skewed",
              worst="loose", align=4),
        _case("tight_holes_k1_h200_bias", 23, 4, 200, 1, "bf16", 1000, "holes", worst="tight",
              bias=1),
        _case("loose_no_topk_h2048_bias", 24, 4, 2048, 0, "bf16", 800, worst="loose", bias=1),
        _case("tight_fp8_column_major_duplicates_k3_h4096", 25, 8, 4096, 3, "fp8", 1000,
              "duplicates", worst="tight", column_major=True),
        _case("loose_fp8_ue8m0_k2_h2048_bias", 26, 4, 2048, 2, "fp8_ue8m0", 600,
              worst="loose", bias=1),
        _case("tight_rank0_only_k2_h2048", 27, 4, 2048, 2, "bf16", 900, "rank0_only",
              worst="tight"),
    ],
    "no_topk": [
        _case("no_topk_h2048_bias", 31, 4, 2048, 0, "bf16", 3000, bias=1),
        _case("no_topk_fp8_round_h4096", 32, 4, 4096, 0, "fp8_round", 1000),
        _case("no_topk_empty_last_rank_bias_pair_h200", 33, 4, 200, 0, "bf16", 600,
              empty_rank=True, bias=2),
        _case("no_topk_fp8_column_major_h7168", 34, 4, 7168, 0, "fp8", 500,
              column_major=True),
    ],
    "float32": [
        _case("f32_dispatch_f32_combine_k4_h2048_bias_pair", 41, 8, 2048, 4, "float32", 2000,
              "holes", combine_dtype="float32", bias=2),
        _case("bf16_dispatch_f32_combine_k8_h7168_bias", 42, 32, 7168, 8, "bf16", 1024,
              "skewed", combine_dtype="float32", bias=1),
        _case("f32_combine_capacity_loose_k3_h200_bias", 43, 4, 200, 3, "bf16", 700,
              "duplicates", combine_dtype="float32", worst="loose", bias=1),
    ],
    # One routing, many SM counts (blocks = num_sms, channels = num_sms / 2) and chunk sizes.
    "sm_counts_and_chunks": [
        _case(f"sms{config[0]}_send{config[1]}_recv{config[2]}{'_tight' if worst else ''}", 61,
              8, 2048, 8, "bf16", 2048, "holes", bias=1, config=config,
              **({"worst": "tight"} if worst else {}))
        for config, worst in (
            ((2, 6, 256, 6, 128), False),
            ((8, 8, 256, 6, 128), False),
            ((24, 24, 256, 6, 128), False),
            ((32, 4, 256, 6, 128), False),
            ((64, 16, 256, 6, 128), False),
            ((20, 8, 64, 6, 128), False),
            ((16, 12, 128, 6, 128), True),
            ((4, 6, 256, 6, 128), True),
        )
    ],
}
# Boundary cases, one rank job each so that each reports on its own.
EDGE_CASES = [
    _case("empty_last_rank", 51, 4, 2048, 3, "bf16", 500, empty_rank=True, bias=2, align=3),
    _case("empty_last_rank_capacity_tight", 52, 4, 2048, 2, "bf16", 400, "holes",
          empty_rank=True, worst="tight", bias=1),
    _case("every_token_routed_nowhere", 53, 4, 2048, 4, "bf16", 300, "nowhere", bias=1,
          nothing_comes_back=True),
    _case("every_token_routed_nowhere_capacity", 54, 4, 4096, 2, "bf16", 300, "nowhere",
          worst="tight", bias=2),
    _case("no_tokens_on_any_rank_fp8", 55, 4, 4096, 2, "fp8", 0, bias=1),
    _case("one_token_per_rank_h7168", 56, 2, 7168, 2, "bf16", 1, bias=2),
    _case("rank0_only_fp8_capacity_loose", 57, 4, 2048, 3, "fp8", 500, "rank0_only",
          worst="loose", bias=1),
]


@pytest.mark.parametrize("group", sorted(CASES))
def test_normal_mode_matches_reference(world_size, group):
    """dispatch / capacity_dispatch / cached_dispatch / combine kernels against the reference
    on the same inputs: every output bit-identical (handle tensors, capacity padding included)."""
    _assert_no_diffs(run_on_gpus(world_size, _semantics_job, CASES[group]))


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c["name"])
def test_normal_mode_edge_case_matches_reference(world_size, case):
    """The checks of test_normal_mode_matches_reference when ranks send or receive nothing."""
    _assert_no_diffs(run_on_gpus(world_size, _semantics_job, [case]))


# --- 2. pressure ------------------------------------------------------------------------------

PRESSURE_ITERATIONS, PRESSURE_TOKENS, PRESSURE_HIDDEN = scaled(2000), 2048, 2048


def _pressure_routing(rng, num_tokens, num_experts, num_topk, num_ranks, g, device):
    kind = rng.choice(("random", "skewed", "hot_rank", "holes", "duplicates"))
    if kind == "hot_rank":  # rank 0's experts win almost always: the others receive little
        scores = torch.rand(num_tokens, num_experts, generator=g, device=device)
        scores[:, : num_experts // num_ranks] += 0.9
        idx = scores.topk(num_topk, dim=1).indices
    elif kind == "holes":
        idx = _routing("random", num_tokens, num_experts, num_topk, num_ranks, g, device)
        p = rng.choice((0.1, 0.5, 0.95))
        idx[torch.rand(idx.shape, generator=g, device=device) < p] = -1
    else:
        idx = _routing(kind, num_tokens, num_experts, num_topk, num_ranks, g, device)
    # Some tokens routed nowhere at all; the first always goes somewhere (the reference's
    # data-dependent combine fails on a rank whose tokens all went nowhere).
    nowhere = torch.rand(num_tokens, generator=g, device=device) < rng.choice((0.0, 0.05, 0.5))
    idx = idx.masked_fill(nowhere.unsqueeze(1), -1)
    if num_tokens:
        idx[0, 0] = torch.randint(0, num_experts, (), generator=g, device=device)
    return idx, kind


def _pressure_job(rank, num_ranks, iterations, max_tokens, hidden, seed):
    device = _device()
    num_experts, num_topk = 8 * num_ranks, 8
    dispatch_config = get_dispatch_config(num_ranks).to_list()
    combine_config = get_combine_config(num_ranks).to_list()
    buffer = _new_buffer(_nvl_bytes([dispatch_config, combine_config], [hidden * 2], num_ranks))
    name = buffer.name
    g = _generator(device, seed * 7919 + rank)
    rng = random.Random(seed * 104729 + rank)  # per-rank choices: token counts, routing kinds
    names = [f"dispatch.{f}" for f in DISPATCH_OUTPUTS] + [f"combine.{f}" for f in COMBINE_OUTPUTS]
    # One flag per (iteration, output), written on the device: no host sync per comparison.
    flags = torch.zeros(iterations, len(names), dtype=torch.bool, device=device)
    host_failures: list[str] = []
    negatives = torch.zeros((), dtype=torch.int64, device=device)
    rows = capacity_iterations = empty_iterations = 0
    kinds: dict[str, int] = {}
    for it in range(iterations):
        capacity = it % 4 == 3  # the same on every rank: num_worst_tokens must agree
        num_worst = num_ranks * max_tokens if capacity else 0
        num_tokens = max_tokens if rng.random() < 0.8 else rng.randint(0, max_tokens)
        if rng.random() < 0.02:
            num_tokens = 0
        topk, kind = _pressure_routing(
            rng, num_tokens, num_experts, num_topk, num_ranks, g, device
        )
        kinds[kind] = kinds.get(kind, 0) + 1
        weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
        x = (torch.randn(num_tokens, hidden, generator=g, device=device) * 2).bfloat16()
        layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
        args = (x, None, topk, weights, layout.num_tokens_per_rank, layout.is_token_in_rank,
                layout.num_tokens_per_expert, name, 1)
        if capacity:
            got = torch.ops.deep_ep.capacity_dispatch(*args, num_worst, dispatch_config)
            want = reference.capacity_dispatch(*args, num_worst, dispatch_config)
            capacity_iterations += 1
        else:
            got = torch.ops.deep_ep.dispatch(*args, dispatch_config)
            want = reference.dispatch(*args, dispatch_config)
            rows += got[0].size(0)
            empty_iterations += got[0].size(0) == 0
        handle = _handle(got, layout.is_token_in_rank)
        ref_handle = _handle(want, layout.is_token_in_rank)
        y = (torch.randn(got[0].size(0), hidden, generator=g, device=device) * 2).bfloat16()
        combined = torch.ops.deep_ep.combine(
            y, got[3], None, None, *handle, name, num_worst, combine_config
        )
        ref_combined = reference.combine(
            _resized(y, want[0].size(0)), want[3], None, None, *ref_handle, name, num_worst,
            combine_config,
        )
        flags[it] = _bit_flags(zip((*got, *combined), (*want, *ref_combined)), names,
                               f"iteration {it} ({kind})", host_failures, device)
        negatives += (topk < 0).sum()
    _sync(device)
    bad = flags.nonzero().tolist()
    details = host_failures[:10] + [f"iteration {i}: {names[k]} differs" for i, k in bad[:30]]
    buffer.destroy()
    return dict(
        mismatches=len(bad), details=details, iterations=iterations, rows=rows,
        negatives=int(negatives), capacity_iterations=capacity_iterations,
        empty_iterations=empty_iterations, kinds=kinds,
    )


def test_pressure_dispatch_combine(world_size):
    """Thousands of dispatch + combine iterations (every 4th in capacity mode) with fresh random
    routing each time (uniform, skewed, one hot rank, -1 entries, tokens routed nowhere,
    duplicate experts, varying and zero token counts), every output of every iteration compared
    bit for bit with the reference; zero mismatches over the whole run."""
    results = run_on_gpus(
        world_size, _pressure_job, PRESSURE_ITERATIONS, PRESSURE_TOKENS, PRESSURE_HIDDEN, 1,
        timeout=600,
    )
    mismatches = sum(r["mismatches"] for r in results)
    details = [f"rank {rank}: {d}" for rank, r in enumerate(results) for d in r["details"]]
    assert mismatches == 0, f"{mismatches} mismatching outputs:\n" + "\n".join(details)
    for r in results:  # not vacuous
        assert r["iterations"] == PRESSURE_ITERATIONS and r["rows"] > 0 and r["negatives"] > 0
        assert r["capacity_iterations"] == PRESSURE_ITERATIONS // 4
        assert len(r["kinds"]) == 5, r["kinds"]


# --- 3. opcheck on CUDA -----------------------------------------------------------------------

OPCHECK_OPS = ("dispatch", "capacity_dispatch", "cached_dispatch", "combine")


def _opcheck_inputs(rank, num_ranks, device):
    """Same shapes on every rank (opcheck's number of calls must not depend on the rank)."""
    num_tokens, hidden, num_topk, num_experts = 48, 256, 3, 4 * num_ranks
    g = _generator(device, 500 + rank)
    x = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
    topk = _routing("duplicates", num_tokens, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
    layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
    return x, topk, weights, layout, g


def _opcheck_samples(op, buffer, rank, num_ranks, rg, device):
    """``[(label, args)]`` for ``op``; ``rg`` puts requires_grad on the differentiable inputs."""
    x, topk, weights, layout, g = _opcheck_inputs(rank, num_ranks, device)
    dispatch_config = get_dispatch_config(num_ranks).to_list()
    combine_config = get_combine_config(num_ranks).to_list()
    x_fp8, scales = ops.per_token_cast_to_fp8(x)
    column_major = scales.t().contiguous().t()
    per_rank, is_in, per_expert = (
        layout.num_tokens_per_rank, layout.is_token_in_rank, layout.num_tokens_per_expert
    )
    num_worst = x.size(0) * num_ranks
    if op in ("dispatch", "capacity_dispatch"):
        extra = (num_worst,) if op == "capacity_dispatch" else ()
        return [
            ("bf16 top-k", (_grad(x, rg), None, topk, _grad(weights, rg), per_rank, is_in,
                            per_expert, buffer, 1, *extra, dispatch_config)),
            ("bf16 no top-k, aligned", (_grad(x, rg), None, None, None, per_rank, is_in, None,
                                        buffer, 4, *extra, dispatch_config)),
            ("fp8 top-k", (x_fp8, scales, topk, _grad(weights, rg), per_rank, is_in,
                           per_expert, buffer, 1, *extra, dispatch_config)),
            ("fp8 column-major scales", (x_fp8, column_major, topk, _grad(weights, rg),
                                         per_rank, is_in, per_expert, buffer, 2, *extra,
                                         dispatch_config)),
        ]
    handles = [
        ("", ops.dispatch(buffer, x, layout, topk, weights, config=dispatch_config).handle),
        (" capacity", ops.dispatch(buffer, x, layout, topk, weights, num_worst_tokens=num_worst,
                                   config=dispatch_config).handle),
    ]
    samples = []
    for label, h in handles:
        tail = (*h[:6], buffer, h.num_worst_tokens)
        if op == "cached_dispatch":
            samples += [
                (f"bf16 weights{label}", (_grad(x, rg), None, _grad(weights, rg), *tail,
                                          dispatch_config)),
                (f"fp8 no weights{label}", (x_fp8, scales, None, *tail, dispatch_config)),
                (f"fp8 column-major{label}", (x_fp8, column_major, None, *tail,
                                              dispatch_config)),
            ]
            continue
        rows = h.recv_src_idx.size(0)
        y = torch.randn(rows, x.size(1), generator=g, device=device)
        w = torch.rand(rows, topk.size(1), generator=g, device=device)
        bias = [torch.randn(x.shape, generator=g, device=device) for _ in range(2)]
        samples += [
            (f"bf16 weights{label}", (_grad(y.bfloat16(), rg), _grad(w, rg), None, None, *tail,
                                      combine_config)),
            (f"bf16 bias pair{label}", (_grad(y.bfloat16(), rg), None,
                                        _grad(bias[0].bfloat16(), rg),
                                        _grad(bias[1].bfloat16(), rg), *tail, combine_config)),
            (f"float32 weights bias{label}", (_grad(y, rg), _grad(w, rg), _grad(bias[0], rg),
                                              None, *tail, combine_config)),
        ]
    return samples


def _opcheck_job(rank, num_ranks, op):
    device = _device()
    configs = [get_dispatch_config(num_ranks).to_list(), get_combine_config(num_ranks).to_list()]
    buffer = _new_buffer(_nvl_bytes(configs, [256 * 4], num_ranks))
    failures = []
    for rg in (False, True):
        for label, args in _opcheck_samples(op, buffer.name, rank, num_ranks, rg, device):
            # raise_exception=False runs every util after a failure too, so every rank makes
            # the same calls (the collectives stay in step).
            results = torch.library.opcheck(
                getattr(torch.ops.deep_ep, op).default, args, test_utils=_opcheck_utils(args),
                raise_exception=False,
            )
            failures += [
                f"rank {rank} requires_grad={rg} {op}[{label}] {util}: "
                f"{type(error).__name__}: {str(error)[:500]}"
                for util, error in results.items() if error != "SUCCESS"
            ]
    _sync(device)
    buffer.destroy()
    return failures


@pytest.mark.parametrize("op", OPCHECK_OPS)
def test_opcheck_on_cuda(world_size, op):
    """opcheck (schema, autograd registration, fake tensor, AOT dispatch with dynamic shapes) of
    one op on CUDA tensors inside every rank, with and without requires_grad."""
    failures = [f for per_rank in run_on_gpus(world_size, _opcheck_job, op) for f in per_rank]
    assert not failures, "\n".join(failures)


# --- 4, 5. the example MoE layer: torch.compile and CUDA graphs -------------------------------

MOE_HIDDEN, MOE_FFN_HIDDEN, MOE_LOCAL_EXPERTS, MOE_TOP_K, MOE_SEED = 256, 256, 4, 3, 5
FLOAT32_ROUNDING = 1e-5  # norm-wise relative: max|a - b| <= 1e-5 * max|b|


def _moe_layer(rank, num_ranks, mode, device, timeout_s=None, ranks_per_node=None):
    """ExampleMoE on a buffer of its own; ``ranks_per_node``: a buffer of several nodes (with
    RDMA bytes: the internode kernels where the extension has them)."""
    from deep_ep_ops.nn import ExampleMoE, MoEDispatcher, buffer_size_hints

    num_experts = MOE_LOCAL_EXPERTS * num_ranks
    num_nvl_bytes, _ = buffer_size_hints(MOE_HIDDEN, num_ranks, num_experts, element_size=4)
    if ranks_per_node is None:
        buffer = _new_buffer(num_nvl_bytes, timeout_s)
    else:
        previous = os.environ.get(TIMEOUT_ENV)
        if timeout_s is not None:
            os.environ[TIMEOUT_ENV] = str(timeout_s)
        try:
            buffer = Buffer(dist.group.WORLD, num_nvl_bytes, 256 << 20,
                            num_ranks_per_node=ranks_per_node)
        finally:
            if previous is None:
                os.environ.pop(TIMEOUT_ENV, None)
            else:
                os.environ[TIMEOUT_ENV] = previous
    dispatcher = MoEDispatcher(buffer, num_experts, mode)
    moe = ExampleMoE(dispatcher, MOE_HIDDEN, MOE_FFN_HIDDEN, MOE_TOP_K, rank=rank,
                     seed=MOE_SEED, device=device)
    return buffer, moe


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``max|actual - expected| / max|expected|`` as a device scalar (NaN stays NaN)."""
    scale = expected.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return (actual.float() - expected.float()).abs().max() / scale


def _finite_max(values) -> float:
    values = [float(v) for v in values]
    return math.inf if any(math.isnan(v) for v in values) else max(values)


def _moe_tokens(rank, step, num_tokens, device):
    g = _generator(device, 1000 * step + rank)
    return torch.randn(num_tokens, MOE_HIDDEN, generator=g, device=device)


def _compile_job(rank, num_ranks, mode, steps=3, ranks_per_node=None):
    device = _device()
    torch._dynamo.reset()
    # Normal mode: ranks hold different numbers of tokens and every step routes differently, so
    # the received row count is an unbacked size and one graph must serve every step. Capacity
    # mode (num_worst_tokens = R * T) needs the same T everywhere.
    num_tokens = 96 + 40 * rank if mode == "normal" else 128
    # The backward compiles when it first runs, so one rank may enter a kernel while a slower
    # one is still compiling: a generous kernel timeout.
    buffer, moe = _moe_layer(rank, num_ranks, mode, device, timeout_s=300,
                             ranks_per_node=ranks_per_node)
    dynamic = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    errors = []
    # One compile thread per rank: the ranks share the host's cores.
    with dynamic if mode == "normal" else contextlib.nullcontext(), \
            torch._inductor.config.patch(compile_threads=1):
        compiled = torch.compile(moe, fullgraph=True)
        for step in range(steps):
            x = _moe_tokens(rank, step, num_tokens, device)
            with torch.compiler.set_stance("default" if step == 0 else "fail_on_recompile"):
                got = _train_step(moe, compiled, x)
            expected = _train_step(moe, moe, x)
            errors.append(_finite_max(_relative_error(a, b) for a, b in zip(got, expected)))
        # Without Inductor's code generation the traced graph computes exactly what eager does.
        torch._dynamo.reset()
        aot_eager = torch.compile(moe, fullgraph=True, backend="aot_eager")
        x = _moe_tokens(rank, 0, num_tokens, device)
        got, expected = _train_step(moe, aot_eager, x), _train_step(moe, moe, x)
        exact = all(torch.equal(a, b) for a, b in zip(got, expected))
    torch._dynamo.reset()
    _sync(device)
    buffer.destroy()
    return dict(max_error=_finite_max(errors), aot_eager_exact=exact)


@pytest.mark.parametrize("mode", ["capacity", "normal"])
def test_compiled_moe_matches_eager(world_size, mode):
    """``torch.compile(fullgraph=True)`` of ExampleMoE's forward and backward on CUDA (Inductor)
    equals eager to float32 rounding over several steps without recompiling (normal mode:
    unbacked received-row counts); the ``aot_eager`` graph equals eager bit for bit."""
    for rank, result in enumerate(run_on_gpus(world_size, _compile_job, mode, timeout=600)):
        assert result["max_error"] <= FLOAT32_ROUNDING, (rank, result)
        assert result["aot_eager_exact"], (rank, result)


def _cuda_graph_job(rank, num_ranks, replays, ranks_per_node=None):
    device = _device()
    num_tokens = 128
    buffer, moe = _moe_layer(rank, num_ranks, "capacity", device, ranks_per_node=ranks_per_node)
    params = list(moe.parameters())
    g = _generator(device, 4242 + rank)

    def batch():
        return (torch.randn(num_tokens, MOE_HIDDEN, generator=g, device=device),
                torch.randn(num_tokens, MOE_HIDDEN, generator=g, device=device))

    static_x = torch.zeros(num_tokens, MOE_HIDDEN, device=device, requires_grad=True)
    static_target = torch.zeros(num_tokens, MOE_HIDDEN, device=device)

    def step():
        out = moe(static_x)
        loss = ((out - static_target) ** 2).sum()
        loss.backward()
        return out, loss

    def clear_grads():
        moe.zero_grad(set_to_none=True)
        static_x.grad = None

    x, target = batch()
    with torch.no_grad():
        static_x.copy_(x)
        static_target.copy_(target)
    # Warm up on a side stream (lazy initialisation, cuBLAS handles, the kernels' one-time
    # state) before capturing, as torch.cuda.graph's documentation asks.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            clear_grads()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    dist.barrier()

    clear_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_loss = step()
    static_grads = [static_x.grad] + [p.grad for p in params]

    worst = torch.zeros((), device=device)
    identical = torch.zeros((), dtype=torch.int64, device=device)
    losses = torch.empty(replays, device=device)
    for i in range(replays):
        x, target = batch()
        with torch.no_grad():
            static_x.copy_(x)
            static_target.copy_(target)
        # Every rank replays (the graph holds collectives), then runs the same step eagerly.
        graph.replay()
        x_eager = x.clone().requires_grad_()
        out = moe(x_eager)
        loss = ((out - target) ** 2).sum()
        grads = torch.autograd.grad(loss, [x_eager, *params])
        same = torch.ones((), dtype=torch.bool, device=device)
        for a, b in zip((static_out, static_loss, *static_grads), (out, loss, *grads)):
            worst = torch.maximum(worst, _relative_error(a, b.detach()))
            same &= (a == b.detach()).all()
        identical += same
        losses[i] = static_loss
    torch.cuda.synchronize(device)
    result = dict(
        max_error=float(worst), bit_identical_replays=int(identical), replays=replays,
        distinct_losses=int(losses.unique().numel()),
    )
    # Graphs go before the buffer and the process group.
    del graph, static_out, static_loss, static_grads
    clear_grads()
    torch.cuda.synchronize(device)
    buffer.destroy()
    return result


CUDA_GRAPH_REPLAYS = scaled(1000)


def test_cuda_graph_training_step_replays(world_size):
    """A capacity-mode training step of ExampleMoE (router, layout, capacity dispatch, experts,
    combine, and the backward: cached dispatch and combine) captured once in a CUDA graph and
    replayed with fresh inputs copied into its static tensors; after every replay the same step
    runs eagerly and the output, loss and all gradients must agree."""
    results = run_on_gpus(world_size, _cuda_graph_job, CUDA_GRAPH_REPLAYS, timeout=600)
    for rank, result in enumerate(results):
        assert result["max_error"] <= FLOAT32_ROUNDING, (rank, result)
        assert result["distinct_losses"] > CUDA_GRAPH_REPLAYS // 2, (rank, result)  # fresh inputs


# --- 6. the DeepEP Buffer options -------------------------------------------------------------


def _buffer_options_job(rank, num_ranks):
    device = _device()
    cuda = device.type == "cuda"
    num_tokens, hidden, num_topk, num_experts = 1500, 2048, 6, 8 * num_ranks
    previous_num_sms = Buffer.num_sms
    configs = [get_dispatch_config(num_ranks, n).to_list() for n in (previous_num_sms, 24)]
    configs += [get_combine_config(num_ranks, n).to_list() for n in (previous_num_sms, 24)]
    num_nvl_bytes = _nvl_bytes(configs, [hidden * 2], num_ranks)
    buffer, other = _new_buffer(num_nvl_bytes), _new_buffer(num_nvl_bytes)
    name = buffer.name
    g = _generator(device, 77 + rank)
    topk = _routing("holes", num_tokens, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
    x = (torch.randn(num_tokens, hidden, generator=g, device=device) * 2).bfloat16()
    x2 = (torch.randn(num_tokens, hidden, generator=g, device=device) * 2).bfloat16()
    biases = [torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
              for _ in range(2)]
    diffs = Diffs()
    dispatch_config = Buffer.get_dispatch_config(num_ranks).to_list()
    combine_config = Buffer.get_combine_config(num_ranks).to_list()

    def dispatch_kwargs(layout, **kwargs):
        per_rank, per_rdma, per_expert, is_in = layout[:4]
        return dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                    is_token_in_rank=is_in, num_tokens_per_expert=per_expert, topk_idx=topk,
                    topk_weights=weights, **kwargs)

    def same_all(where, got, want):
        for i, (a, b) in enumerate(zip(got, want)):
            diffs.same(f"rank {rank} {where}[{i}]", a, b)

    # Synchronous calls, against the reference.
    layout = buffer.get_dispatch_layout(topk, num_experts)
    diffs.check("sync layout event", layout[4].event is None, "event without async_finish")
    recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
        x, **dispatch_kwargs(layout)
    )
    diffs.check("sync dispatch event", event.event is None, "event without async_finish")
    want = reference.dispatch(x, None, topk, weights, layout[0], layout[3], layout[2], name, 1,
                              dispatch_config)
    same_all("Buffer.dispatch vs reference", (recv_x, recv_idx, recv_w),
             (want[0], want[2], want[3]))
    same_all("Buffer.dispatch handle vs reference", handle[:6], _handle(want, layout[3]))
    diffs.check("num_recv_tokens_per_expert_list", counts == want[4].tolist(),
                f"{counts} != {want[4].tolist()}")
    y = (torch.randn(recv_x.shape, generator=g, device=device) * 2).bfloat16()
    combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, bias=tuple(biases))
    want_combined = reference.combine(y, recv_w, *biases, *handle[:6], name, 0, combine_config)
    same_all("Buffer.combine vs reference", (combined, combined_w), want_combined)
    cached, *_ = buffer.dispatch(x2, handle=handle)
    want_cached = reference.cached_dispatch(x2, None, None, *handle[:6], name, 0,
                                            dispatch_config)
    diffs.same(f"rank {rank} cached Buffer.dispatch vs reference", cached, want_cached[0])

    if cuda:
        main = torch.cuda.current_stream(device)
        side, consumer = torch.cuda.Stream(device), torch.cuda.Stream(device)
        # previous_event: the inputs are written on a side stream after a long sleep; without
        # the wait the layout and dispatch kernels would read them before they exist.
        side.wait_stream(main)
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            late_topk, late_x = topk.clone(), x.clone()
            ready = Buffer.capture()
        for t in (late_topk, late_x):
            t.record_stream(main)
        async_layout = buffer.get_dispatch_layout(
            late_topk, num_experts, previous_event=ready, async_finish=True,
            allocate_on_comm_stream=True,
        )
        event = async_layout[4]
        diffs.check("async layout", isinstance(event, EventOverlap) and event.event is not None,
                    f"async_finish returned {event!r}")
        same_all("async layout", [async_layout[i] for i in (0, 2, 3)],
                 [layout[i] for i in (0, 2, 3)])
        torch.cuda._sleep(20_000_000)  # the event must be recorded after the op, not before
        recv = buffer.dispatch(
            late_x, **dispatch_kwargs(async_layout, previous_event=event, async_finish=True,
                                      allocate_on_comm_stream=True)
        )
        event = recv[5]
        diffs.check("async dispatch", isinstance(event, EventOverlap) and event.event is not None,
                    f"async_finish returned {event!r}")
        with torch.cuda.stream(consumer):  # another stream sees the results after the event
            event.current_stream_wait()
            copies = [t.clone() for t in (recv[0], recv[1], recv[2], *recv[4][:6])]
        main.wait_stream(consumer)
        same_all("async dispatch (read on another stream)", copies,
                 (recv_x, recv_idx, recv_w, *handle[:6]))
        diffs.check("async counts", recv[3] == counts, f"{recv[3]} != {counts}")

        # Combine with async_finish; EventOverlap as a context manager on another stream.
        torch.cuda._sleep(20_000_000)
        combined_async, weights_async, event = buffer.combine(
            y, recv[4], topk_weights=recv[2], bias=tuple(biases), previous_event=event,
            async_finish=True, allocate_on_comm_stream=True,
        )
        diffs.check("async combine", event.event is not None, "no event")
        with torch.cuda.stream(consumer):
            with event:  # DeepEP's form: overlap work inside, the wait happens at the exit
                torch.cuda._sleep(1_000)
            copies = [combined_async.clone(), weights_async.clone()]
        main.wait_stream(consumer)
        same_all("async combine (read on another stream)", copies, (combined, combined_w))

        # Cached dispatch and capacity mode with async_finish.
        cached_async, *_, event = buffer.dispatch(x2, handle=recv[4], async_finish=True)
        event.current_stream_wait()
        diffs.same(f"rank {rank} async cached dispatch", cached_async, cached)
        comm_stream = buffer.get_comm_stream()
        diffs.check("get_comm_stream", comm_stream is not None, "None on CUDA")

    # Capacity mode through the Buffer: empty per-expert list, same rows as the ops.
    num_worst = num_tokens * num_ranks
    cap = buffer.dispatch(x, **dispatch_kwargs(layout, num_worst_tokens=num_worst,
                                               async_finish=cuda))
    cap[5].current_stream_wait()
    want = reference.capacity_dispatch(x, None, topk, weights, layout[0], layout[3], layout[2],
                                       name, 1, num_worst, dispatch_config)
    same_all("capacity Buffer.dispatch vs reference", (cap[0], cap[1], cap[2]),
             (want[0], want[2], want[3]))
    diffs.check("capacity list", cap[3] == [], f"{cap[3]!r}")
    y_cap = (torch.randn(num_worst, hidden, generator=g, device=device)).bfloat16()
    combined_cap, _, event = buffer.combine(y_cap, cap[4], async_finish=cuda)
    event.current_stream_wait()
    want_combined = reference.combine(y_cap, None, None, None, *_handle(want, layout[3]), name,
                                      num_worst, combine_config)
    diffs.same(f"rank {rank} capacity Buffer.combine vs reference", combined_cap,
               want_combined[0])

    # FP8 as a (values, scales) pair, with column-major scales.
    x_fp8, scales = ops.per_token_cast_to_fp8(x)
    scales = scales.t().contiguous().t()
    (recv_fp8, recv_scales), *_ = buffer.dispatch((x_fp8, scales), **dispatch_kwargs(layout))
    want = reference.dispatch(x_fp8, scales, topk, weights, layout[0], layout[3], layout[2],
                              name, 1, dispatch_config)
    same_all("fp8 pair Buffer.dispatch vs reference", (recv_fp8, recv_scales), want[:2])

    # Two live buffers, their calls interleaved.
    d1 = buffer.dispatch(x, **dispatch_kwargs(layout))
    d2 = other.dispatch(x2, **dispatch_kwargs(layout))
    c1 = buffer.combine(y, d1[4])[0]
    c2 = other.combine(y, d2[4])[0]
    diffs.same(f"rank {rank} buffer 1 of 2 dispatch", d1[0], recv_x)
    diffs.same(f"rank {rank} buffer 2 of 2 dispatch", d2[0], cached)
    want_c = reference.combine(y, None, None, None, *handle[:6], name, 0, combine_config)
    diffs.same(f"rank {rank} buffer 1 of 2 combine", c1, want_c[0])
    diffs.same(f"rank {rank} buffer 2 of 2 combine", c2, want_c[0])

    # Buffer.set_num_sms: the default configs follow it (24 SMs: 12 channels).
    try:
        Buffer.set_num_sms(24)
        sms_config = Buffer.get_dispatch_config(num_ranks).to_list()
        diffs.check("set_num_sms", sms_config[0] == 24, f"config {sms_config}")
        got = buffer.dispatch(x, **dispatch_kwargs(layout))
        want = reference.dispatch(x, None, topk, weights, layout[0], layout[3], layout[2], name,
                                  1, sms_config)
        same_all("24 SMs dispatch handle vs reference", got[4][:6], _handle(want, layout[3]))
        diffs.same(f"rank {rank} 24 SMs dispatch recv_x", got[0], want[0])
        combined_24 = buffer.combine(y, got[4], topk_weights=got[2])
        want_c = reference.combine(y, want[3], None, None, *_handle(want, layout[3]), name, 0,
                                   Buffer.get_combine_config(num_ranks).to_list())
        same_all("24 SMs combine vs reference", combined_24[:2], want_c)
    finally:
        Buffer.set_num_sms(previous_num_sms)
    _sync(device)
    other.destroy()
    buffer.destroy()
    return diffs.messages


def test_buffer_options(world_size):
    """DeepEP's Buffer on CUDA: previous_event (inputs produced on a delayed side stream),
    async_finish (an EventOverlap with an event, recorded after the op: read from another
    stream), allocate_on_comm_stream, EventOverlap as a context manager, cached and capacity
    dispatch, an FP8 pair with column-major scales, two live buffers interleaved and
    set_num_sms; results equal the synchronous calls and the reference."""
    _assert_no_diffs(run_on_gpus(world_size, _buffer_options_job))


# --- 7. a peer that never arrives -------------------------------------------------------------

TIMEOUT_S = 3
TIMEOUT_SCENARIOS = {
    # op rank 0 calls alone -> where the error must surface
    "dispatch": "the call itself (it waits for the counts on the host)",
    "capacity_dispatch": "the next deep_ep op call on the device",
    "combine": "ops.check_device_errors() after torch.cuda.synchronize()",
}


def _timeout_job(rank, num_ranks, scenario):
    device = _device()
    num_tokens, hidden, num_topk, num_experts = 64, 256, 2, 4 * num_ranks
    dispatch_config = get_dispatch_config(num_ranks).to_list()
    combine_config = get_combine_config(num_ranks).to_list()
    buffer = _new_buffer(_nvl_bytes([dispatch_config, combine_config], [hidden * 2], num_ranks))
    g = _generator(device, 99 + rank)
    topk = _routing("random", num_tokens, num_experts, num_topk, num_ranks, g, device)
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
    x = torch.randn(num_tokens, hidden, generator=g, device=device).bfloat16()
    layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
    if scenario == "combine":  # everyone dispatches (works); only rank 0 combines
        out = ops.dispatch(buffer.name, x, layout, topk, weights, config=dispatch_config)
        _sync(device)
    dist.barrier()  # over NCCL, not the buffer: nobody is inside a deep_ep op any more
    if rank != 0:
        return dict(called=False)  # the other ranks never call (and stay alive, idle)

    start = time.monotonic()
    error = None
    try:
        if scenario == "dispatch":
            ops.dispatch(buffer.name, x, layout, topk, weights, config=dispatch_config)
        elif scenario == "capacity_dispatch":
            ops.dispatch(buffer.name, x, layout, topk, weights,
                         num_worst_tokens=num_tokens * num_ranks, config=dispatch_config)
            _sync(device)
            ops.get_dispatch_layout(topk, num_experts, num_ranks)  # the next op call raises
        else:
            ops.combine(buffer.name, out.recv_x, out.handle, topk_weights=out.recv_topk_weights,
                        config=combine_config)
            _sync(device)
            ops.check_device_errors()
    except Exception as caught:  # noqa: BLE001  (the test process checks type and message)
        error = caught
    # The buffer is unusable now: no destroy; the pool leaves with os._exit.
    return dict(
        called=True, elapsed=time.monotonic() - start,
        error_type=None if error is None else type(error).__name__,
        is_runtime_error=isinstance(error, RuntimeError),
        message=None if error is None else str(error),
    )


def test_timeout_names_op_and_missing_peer(world_size):
    """With DEEP_EP_OPS_TIMEOUT_S=3, rank 0 calls an op that no other rank calls: it gets a
    RuntimeError saying "timed out", naming the op and a missing peer, where the contract says
    (at the call for dispatch, at the next op call for capacity dispatch, from
    check_device_errors for combine); then every rank exits by itself without hanging. Each
    scenario runs in fresh processes (a broken buffer must not poison other tests), the
    scenarios concurrently."""
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {TIMEOUT_ENV: str(TIMEOUT_S)}, _timeout_job, TIMEOUT_SCENARIOS, timeout=180
    )

    problems = []
    missing_peers = range(1, world_size)
    for scenario, where in TIMEOUT_SCENARIOS.items():
        first = results[scenario][0]
        message = first["message"] or ""
        label = f"{scenario} (expected from {where})"
        if first["error_type"] is None:
            problems.append(f"{label}: no error after {first['elapsed']:.1f} s")
            continue
        if not first["is_runtime_error"]:
            problems.append(f"{label}: {first['error_type']} is not a RuntimeError: {message}")
        if "timed out" not in message.lower():
            problems.append(f"{label}: message does not say 'timed out': {message}")
        if not re.search(rf"deep_ep::{scenario}\b", message):
            problems.append(f"{label}: message does not name deep_ep::{scenario}: {message}")
        if not any(re.search(rf"\brank {peer}\b", message) for peer in missing_peers):
            problems.append(f"{label}: message names no missing peer "
                            f"(rank 1..{world_size - 1}): {message}")
        gpu_distributed.record_fault(world_size, f"missing peer: {label}", 0,
                                     f"{first['error_type']}: {message}", first["elapsed"])
        problems += gpu_distributed.timeout_problems(
            label, results[scenario], exit_codes[scenario], TIMEOUT_S
        )
    assert not problems, "\n".join(problems)
