"""Every ``deep_ep`` op against ``tests/oracle.py`` (an independent model of all ranks).

Multi-rank ops run at 1, 2, 4 and 8 gloo ranks: each rank rebuilds every rank's inputs from a
seed, runs its share of the ops and sends its outputs back; the test process rebuilds the same
inputs, runs the oracle once and compares (bit-exact wherever docs/DESIGN.md §5 is exact). Cases are
batched into one rank job per world size and group, so the file stays cheap on small machines.
Pure ops (``get_dispatch_layout`` and the FP8 casts) run in the test process.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops
import oracle
from deep_ep_ops import ops
from deep_ep_ops._registry import TIMEOUT_ENV
from distributed import run_on_ranks

WORLD_SIZES = (1, 2, 4, 8)  # 8: the largest NVLink domain; nothing may assume fewer ranks
CONFIG = deep_ep_ops.Config().to_list()  # num_sms=20: 10 channels
NUM_CHANNELS = deep_ep_ops.Config().num_channels
# Far above what these shapes need (Config / get_low_latency_rdma_size_hint). num_rdma_bytes is
# not 1 GiB: Buffer zero-fills that much per rank, which costs seconds per job at 4 ranks.
NUM_NVL_BYTES = 1 << 28
NUM_RDMA_BYTES = 1 << 24
FP8_MODES = {  # payload name -> (round_scale, use_ue8m0)
    "fp8": (False, False), "fp8_round": (True, False), "fp8_ue8m0": (True, True),
}
# Every op here takes milliseconds: a peer that failed is reported after this, not after the
# pool's 60 s (the limit is read when a buffer is created).
OP_TIMEOUT_S = "20"


def _new_buffer():
    previous = os.environ.get(TIMEOUT_ENV)
    os.environ[TIMEOUT_ENV] = OP_TIMEOUT_S
    try:
        return deep_ep_ops.Buffer(
            dist.group.WORLD, num_nvl_bytes=NUM_NVL_BYTES, num_rdma_bytes=NUM_RDMA_BYTES,
            low_latency_mode=True,
        )
    finally:
        if previous is None:
            del os.environ[TIMEOUT_ENV]
        else:
            os.environ[TIMEOUT_ENV] = previous


# --- comparison helpers -------------------------------------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


class Failures:
    """Collects mismatches of many cases so that one test reports all of them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def fail(self, where: str, what: str) -> None:
        self.messages.append(f"{where}: {what}")

    def same(self, where: str, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        """Bit-exact equality, dtype and shape included."""
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            self.fail(where, f"got {actual.dtype}{list(actual.shape)}, "
                             f"expected {expected.dtype}{list(expected.shape)}")
            return False
        if not torch.equal(_bits(actual), _bits(expected)):
            bad = (_bits(actual) != _bits(expected)).nonzero()
            first = tuple(bad[0].tolist())
            self.fail(where, f"{bad.size(0)} elements differ, first at {first}: "
                             f"got {actual[first]!r}, expected {expected[first]!r}")
            return False
        return True

    def check(self, where: str, ok: bool, what: str) -> None:
        if not ok:
            self.fail(where, what)

    def assert_none(self) -> None:
        assert not self.messages, f"{len(self.messages)} mismatches:\n" + "\n".join(
            self.messages[:40]
        )


# --- inputs, rebuilt identically on every rank and in the test process ----------------------


def _routing(kind: str, num_tokens, num_experts, num_topk, num_ranks, g) -> torch.Tensor:
    """``topk_idx [num_tokens, num_topk]`` of one rank for a routing kind."""
    if kind == "random":
        return oracle.random_topk(num_tokens, num_experts, num_topk, g)
    if kind == "skewed":
        return oracle.random_topk(num_tokens, num_experts, num_topk, g, skew=True)
    if kind == "holes":  # -1 entries, and the first token routed nowhere
        idx = oracle.random_topk(num_tokens, num_experts, num_topk, g, p_neg=0.3)
        idx[:1] = -1
        return idx
    if kind == "duplicates":  # a repeated expert within one token's top-k
        return oracle.random_topk(
            num_tokens, num_experts, num_topk, g, allow_duplicates=True, p_neg=0.1
        )
    if kind == "nowhere":  # every token routed nowhere: ranks hold tokens but send none
        return torch.full((num_tokens, num_topk), -1, dtype=torch.int64)
    if kind == "rank0_only":  # only rank 0's experts are chosen: the other ranks receive nothing
        num_local = num_experts // num_ranks
        return torch.randint(0, num_local, (num_tokens, num_topk), generator=g)
    raise ValueError(kind)


def _token_counts(case, num_ranks) -> list[int]:
    counts = [case["tokens"] - r % 3 for r in range(num_ranks)]
    if case.get("empty_rank"):
        counts[-1] = 0
    return counts


def _payload(kind: str, tokens, hidden, g):
    """Per-rank ``x`` (bf16, or fp8 from the oracle's cast) and its scales (or ``None``)."""
    xs = [(torch.randn(t, hidden, generator=g) * 3).bfloat16() for t in tokens]
    if kind == "bf16":
        return xs, None
    casts = [oracle.per_token_cast_to_fp8(x, *FP8_MODES[kind]) for x in xs]
    return [c[0] for c in casts], [c[1] for c in casts]


def _normal_inputs(case, num_ranks):
    g = torch.Generator().manual_seed(case["seed"])
    num_experts, hidden, num_topk = case["experts"], case["hidden"], case["topk"]
    tokens = _token_counts(case, num_ranks)
    inp = {"tokens": tokens}
    if num_topk:
        inp["topk"] = [
            _routing(case["routing"], t, num_experts, num_topk, num_ranks, g) for t in tokens
        ]
        inp["weights"] = [torch.rand(t, num_topk, generator=g) for t in tokens]
        inp["is_in"] = [
            oracle.layout(idx, num_experts, num_ranks)["is_token_in_rank"] for idx in inp["topk"]
        ]
    else:  # routing from is_token_in_rank alone; the first token goes nowhere
        inp["topk"] = inp["weights"] = None
        inp["is_in"] = [torch.rand(t, num_ranks, generator=g) < 0.5 for t in tokens]
        for is_in in inp["is_in"]:
            is_in[:1] = False
    inp["xs"], inp["scales"] = _payload(case["payload"], tokens, hidden, g)
    # Cached dispatch moves another payload (and raw weights) along the same routes.
    inp["xs2"], inp["scales2"] = _payload(case["payload"], tokens, hidden, g)
    inp["weights2"] = [torch.rand(t, num_topk or 3, generator=g) for t in tokens]
    num_recv = [sum(int(m[:, r].sum()) for m in inp["is_in"]) for r in range(num_ranks)]
    inp["worst"] = {
        "none": 0, "tight": max(max(num_recv), 1), "loose": sum(tokens) + 5,
    }[case.get("worst", "none")]
    rows = [inp["worst"] or n for n in num_recv]
    # Combine input: random rows, padding rows of capacity mode included (they must be ignored).
    inp["ys"] = [torch.randn(n, hidden, generator=g).bfloat16() for n in rows]
    inp["combine_weights"] = (
        [torch.rand(n, num_topk, generator=g) for n in rows] if num_topk else None
    )
    inp["biases"] = [
        [torch.randn(t, hidden, generator=g).bfloat16() for t in tokens]
        for _ in range(case.get("bias", 0))
    ]
    return inp


# --- normal mode: dispatch, capacity dispatch, cached dispatch, combine ---------------------

NORMAL_CASES = {
    "bf16": [
        dict(name="random_k2_h128", seed=1, experts=8, hidden=128, topk=2, routing="random",
             payload="bf16", tokens=12),
        dict(name="skewed_k8_h200_bias", seed=2, experts=8, hidden=200, topk=8,
             routing="skewed", payload="bf16", tokens=10, bias=1),
        dict(name="holes_k1_h136_bias_pair", seed=3, experts=16, hidden=136, topk=1,
             routing="holes", payload="bf16", tokens=9, bias=2),
        dict(name="duplicates_k3_h512_align4", seed=4, experts=8, hidden=512, topk=3,
             routing="duplicates", payload="bf16", tokens=11, align=4, bias=1),
    ],
    "fp8": [
        dict(name="fp8_random_k8_h384_align2", seed=11, experts=16, hidden=384, topk=8,
             routing="random", payload="fp8", tokens=10, align=2),
        dict(name="fp8_round_skewed_k4_h128", seed=12, experts=8, hidden=128, topk=4,
             routing="skewed", payload="fp8_round", tokens=9, bias=1),
        dict(name="fp8_ue8m0_holes_k3_h512", seed=13, experts=8, hidden=512, topk=3,
             routing="holes", payload="fp8_ue8m0", tokens=8),
        dict(name="fp8_duplicates_k2_h256", seed=14, experts=8, hidden=256, topk=2,
             routing="duplicates", payload="fp8", tokens=6, align=3),
    ],
    "capacity": [
        dict(name="tight_random_k2_h128_bias_pair", seed=21, experts=8, hidden=128, topk=2,
             routing="random", payload="bf16", tokens=10, worst="tight", bias=2),
        dict(name="loose_duplicates_k8_h200_align4", seed=22, experts=8, hidden=200, topk=8,
             routing="duplicates", payload="bf16", tokens=9, worst="loose", align=4),
        dict(name="tight_holes_k1_h512_bias", seed=23, experts=16, hidden=512, topk=1,
             routing="holes", payload="bf16", tokens=7, worst="tight", bias=1),
        dict(name="loose_no_topk_h136", seed=25, experts=8, hidden=136, topk=0,
             payload="bf16", tokens=9, worst="loose", bias=1),
    ],
    "no_topk": [
        dict(name="no_topk_h200_bias", seed=31, experts=8, hidden=200, topk=0, payload="bf16",
             tokens=11, bias=1),
        dict(name="no_topk_fp8_round_h256", seed=32, experts=8, hidden=256, topk=0,
             payload="fp8_round", tokens=8),
        dict(name="no_topk_empty_last_rank_bias_pair", seed=33, experts=8, hidden=128, topk=0,
             payload="bf16", tokens=6, empty_rank=True, bias=2),
    ],
}
# Boundary cases, one rank job each so that each one reports on its own (regressions once seen:
# a rank receiving 0 or 1 rows, an empty topk_idx, capacity mode with FP8 payloads).
NORMAL_EDGE_CASES = [
    # Only rank 0 owns experts that are used: the other ranks receive no rows at all.
    dict(name="rank0_only_receives", seed=5, experts=8, hidden=128, topk=2,
         routing="rank0_only", payload="bf16", tokens=7, bias=1),
    dict(name="rank0_only_receives_capacity", seed=6, experts=8, hidden=128, topk=1,
         routing="rank0_only", payload="bf16", tokens=7, worst="tight"),
    # Tokens everywhere, sent nowhere: combine returns the bias alone.
    dict(name="all_routed_nowhere", seed=10, experts=8, hidden=128, topk=2,
         routing="nowhere", payload="bf16", tokens=4, bias=2),
    # The last rank has no tokens (its layout comes from an empty topk_idx).
    dict(name="empty_last_rank", seed=7, experts=8, hidden=200, topk=3, routing="random",
         payload="bf16", tokens=5, empty_rank=True, bias=2, align=3),
    # Capacity mode with an FP8 payload and its scales.
    dict(name="capacity_fp8", seed=8, experts=16, hidden=384, topk=2, routing="holes",
         payload="fp8", tokens=8, worst="loose", bias=1),
    dict(name="capacity_fp8_ue8m0_tight", seed=9, experts=8, hidden=512, topk=3,
         routing="random", payload="fp8_ue8m0", tokens=6, worst="tight"),
]


def _normal_mode_job(rank, num_ranks, cases):
    buf = _new_buffer()
    results = []
    for case in cases:
        inp = _normal_inputs(case, num_ranks)
        num_experts = case["experts"]
        topk = None if inp["topk"] is None else inp["topk"][rank]
        weights = None if inp["weights"] is None else inp["weights"][rank]
        if topk is not None:
            layout = ops.get_dispatch_layout(topk, num_experts, num_ranks)
        else:
            is_in = inp["is_in"][rank]
            layout = ops.DispatchLayout(
                is_in.sum(0, dtype=torch.int32), is_in.any(1).sum(0, dtype=torch.int32).view(1),
                torch.zeros(0, dtype=torch.int32), is_in,
            )
        scales = None if inp["scales"] is None else inp["scales"][rank]
        out = ops.dispatch(
            buf.name, inp["xs"][rank], layout, topk, weights, x_scales=scales,
            expert_alignment=case.get("align", 1), num_worst_tokens=inp["worst"], config=CONFIG,
        )
        cached = ops.cached_dispatch(
            buf.name, inp["xs2"][rank], out.handle,
            x_scales=None if inp["scales2"] is None else inp["scales2"][rank],
            topk_weights=inp["weights2"][rank], config=CONFIG,
        )
        biases = [b[rank] for b in inp["biases"]]
        combined = ops.combine(
            buf.name, inp["ys"][rank], out.handle,
            topk_weights=None if inp["combine_weights"] is None else inp["combine_weights"][rank],
            bias=biases[0] if len(biases) == 1 else (tuple(biases) if biases else None),
            config=CONFIG,
        )
        results.append({
            "layout": tuple(layout), "dispatch": tuple(out[:5]), "handle": tuple(out.handle[:6]),
            "num_worst_tokens": out.handle.num_worst_tokens, "cached": tuple(cached),
            "combined": tuple(combined),
        })
    buf.destroy()
    return results


def _expected_handle(inp, ref, rank, num_ranks):
    """The DeepEP-style handle tensors of ``rank``, from the oracle's routing."""
    is_in = inp["is_in"]
    counts = torch.tensor(
        [[int(is_in[s][:, r].sum()) for r in range(num_ranks)] for s in range(num_ranks)]
    )  # [source, destination]
    num_tokens = inp["tokens"][rank]
    send_head = torch.full((num_tokens, num_ranks), -1, dtype=torch.int32)
    for r in range(num_ranks):
        for j in range(ref[r]["num_recv_tokens"]):
            if int(ref[r]["recv_src_rank"][j]) == rank:
                send_head[int(ref[r]["recv_src_idx"][j]), r] = j

    def channel_prefix(source):  # [R, C]: tokens of ``source`` to rank r from channels <= c
        tokens = inp["tokens"][source]
        per_channel = -(-tokens // NUM_CHANNELS)
        return torch.tensor([
            [int(is_in[source][: min((c + 1) * per_channel, tokens), r].sum())
             for c in range(NUM_CHANNELS)]
            for r in range(num_ranks)
        ], dtype=torch.int32)

    recv_channel_prefix = torch.zeros(num_ranks, NUM_CHANNELS, dtype=torch.int32)
    for s in range(num_ranks):
        towards_me = channel_prefix(s)[rank]
        start = int(counts[:s, rank].sum())
        recv_channel_prefix[s, 0] = start
        recv_channel_prefix[s, 1:] = start + towards_me[:-1]
    return {
        "rank_prefix_matrix": counts.cumsum(0).to(torch.int32),
        "channel_prefix_matrix": channel_prefix(rank),
        "recv_channel_prefix_matrix": recv_channel_prefix,
        "send_head": send_head,
    }


def _check_normal_case(fails: Failures, case, num_ranks, results):
    inp = _normal_inputs(case, num_ranks)
    num_experts, has_topk = case["experts"], bool(case["topk"])
    worst = inp["worst"]
    ref = oracle.dispatch(
        inp["xs"], inp["topk"], inp["weights"], num_experts,
        expert_alignment=case.get("align", 1), num_worst_tokens=worst, x_scales=inp["scales"],
        is_token_in_ranks=None if has_topk else inp["is_in"],
    )
    ref2 = oracle.dispatch(
        inp["xs2"], inp["topk"], None, num_experts, x_scales=inp["scales2"],
        is_token_in_ranks=None if has_topk else inp["is_in"],
    )
    biases = inp["biases"] + [None] * (2 - len(inp["biases"]))
    ref_combined = oracle.combine(
        inp["ys"], ref, inp["tokens"], inp["combine_weights"], biases[0], biases[1]
    )
    for rank, res in enumerate(results):
        where = f"{case['name']} rank {rank}/{num_ranks}"
        if has_topk:
            expected_layout = oracle.layout(inp["topk"][rank], num_experts, num_ranks)
            for field, actual in zip(ops.DispatchLayout._fields, res["layout"]):
                fails.same(f"{where} layout.{field}", actual, expected_layout[field])
        d, r = dict(zip(ops.DispatchOutput._fields, res["dispatch"])), ref[rank]
        n = r["num_recv_tokens"]
        rows = worst or n
        # Rows past the real count (capacity mode) are padding: only their markers are specified.
        fails.same(f"{where} recv_x", d["recv_x"][:n], r["recv_x"][:n])
        fails.check(f"{where} recv_x", d["recv_x"].shape == (rows, case["hidden"]),
                    f"shape {tuple(d['recv_x'].shape)}, expected {(rows, case['hidden'])}")
        fails.same(f"{where} recv_x_scales", d["recv_x_scales"][:n], r["recv_x_scales"][:n])
        fails.check(f"{where} recv_x_scales", d["recv_x_scales"].size(0) == rows,
                    f"{d['recv_x_scales'].size(0)} rows, expected {rows}")
        fails.same(f"{where} recv_topk_idx", d["recv_topk_idx"], r["recv_topk_idx"])
        fails.same(f"{where} recv_topk_weights", d["recv_topk_weights"], r["recv_topk_weights"])
        fails.same(f"{where} num_recv_tokens_per_expert", d["num_recv_tokens_per_expert"],
                   r["num_recv_tokens_per_expert"])
        handle = dict(zip(ops.DispatchHandle._fields, res["handle"]))
        fails.same(f"{where} handle.recv_src_idx", handle["recv_src_idx"], r["recv_src_idx"])
        fails.same(f"{where} handle.is_token_in_rank", handle["is_token_in_rank"],
                   inp["is_in"][rank])
        fails.check(f"{where} handle.num_worst_tokens", res["num_worst_tokens"] == worst,
                    f"{res['num_worst_tokens']} != {worst}")
        for field, expected in _expected_handle(inp, ref, rank, num_ranks).items():
            fails.same(f"{where} handle.{field}", handle[field], expected)

        recv_x, recv_x_scales, recv_weights = res["cached"]
        r2 = ref2[rank]
        fails.same(f"{where} cached recv_x", recv_x[:n], r2["recv_x"][:n])
        fails.check(f"{where} cached recv_x", recv_x.size(0) == rows,
                    f"{recv_x.size(0)} rows, expected {rows}")
        fails.same(f"{where} cached recv_x_scales", recv_x_scales[:n], r2["recv_x_scales"][:n])
        raw_weights = torch.stack([
            inp["weights2"][int(r["recv_src_rank"][j])][int(r["recv_src_idx"][j])]
            for j in range(n)
        ]) if n else torch.zeros(0, inp["weights2"][0].size(1))
        fails.same(f"{where} cached recv_topk_weights (passed through)", recv_weights[:n],
                   raw_weights)

        combined_x, combined_weights = res["combined"]
        c = ref_combined[rank]
        fails.same(f"{where} combined_x", combined_x, c["combined_x"])
        if has_topk:
            fails.same(f"{where} combined_topk_weights", combined_weights,
                       c["combined_topk_weights"])
        else:
            fails.check(f"{where} combined_topk_weights",
                        combined_weights.shape == (inp["tokens"][rank], 0),
                        f"shape {tuple(combined_weights.shape)} without weights")


@pytest.mark.parametrize("group", sorted(NORMAL_CASES))
@pytest.mark.parametrize("num_ranks", WORLD_SIZES)
def test_normal_mode_matches_oracle(num_ranks, group):
    """dispatch / capacity dispatch / cached dispatch / combine against the oracle.

    Checks layout, received rows (bit-exact), scales, local top-k, weights, padded per-expert
    counts, every handle tensor, cached dispatch of another payload with scales and raw
    weights passed through, and combine with weights and a bias (none, one, a pair).
    """
    cases = NORMAL_CASES[group]
    results = run_on_ranks(num_ranks, _normal_mode_job, cases)
    fails = Failures()
    for i, case in enumerate(cases):
        _check_normal_case(fails, case, num_ranks, [res[i] for res in results])
    fails.assert_none()


@pytest.mark.parametrize("case", NORMAL_EDGE_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("num_ranks", WORLD_SIZES)
def test_normal_mode_edge_case_matches_oracle(num_ranks, case):
    """The checks of test_normal_mode_matches_oracle on empty and FP8-capacity boundaries."""
    results = run_on_ranks(num_ranks, _normal_mode_job, [case])
    fails = Failures()
    _check_normal_case(fails, case, num_ranks, [res[0] for res in results])
    fails.assert_none()


# --- low-latency mode -----------------------------------------------------------------------

LL_CASES = {
    "bf16": [
        dict(name="random_k2_h200", seed=41, experts=8, hidden=200, topk=2, max_tokens=8,
             routing="random", payload="bf16"),
        dict(name="duplicates_k8_h136", seed=42, experts=8, hidden=136, topk=8, max_tokens=6,
             routing="duplicates", payload="bf16"),
        dict(name="rank0_only_k1_h512", seed=43, experts=16, hidden=512, topk=1,
             max_tokens=8, routing="rank0_only", payload="bf16"),
        dict(name="holes_k3_h128", seed=44, experts=16, hidden=128, topk=3, max_tokens=7,
             routing="holes", payload="bf16"),
    ],
    "fp8": [
        dict(name="fp8_random_k2_h384", seed=51, experts=8, hidden=384, topk=2, max_tokens=8,
             routing="random", payload="fp8"),
        dict(name="fp8_round_skewed_k8_h128", seed=52, experts=16, hidden=128, topk=8,
             max_tokens=6, routing="skewed", payload="fp8_round"),
        dict(name="fp8_ue8m0_holes_k3_h512", seed=53, experts=8, hidden=512, topk=3,
             max_tokens=8, routing="holes", payload="fp8_ue8m0"),
        dict(name="fp8_ue8m0_duplicates_k2_h1024_rank0_only", seed=54, experts=8, hidden=1024,
             topk=2, max_tokens=5, routing="rank0_only", payload="fp8_ue8m0"),
        dict(name="fp8_round_duplicates_k3_h256", seed=55, experts=8, hidden=256, topk=3,
             max_tokens=6, routing="duplicates", payload="fp8_round"),
    ],
}


# A rank with no tokens, in every payload mode (the FP8 casts must handle zero tokens).
LL_EDGE_CASES = [
    dict(name=f"empty_last_rank_{payload}", seed=60 + i, experts=8, hidden=512, topk=2,
         max_tokens=4, routing="random", payload=payload, empty_rank=True)
    for i, payload in enumerate(["bf16", "fp8", "fp8_round", "fp8_ue8m0"])
]


def _ll_inputs(case, num_ranks):
    g = torch.Generator().manual_seed(case["seed"])
    num_experts, hidden, num_topk, num_max = (
        case["experts"], case["hidden"], case["topk"], case["max_tokens"]
    )
    num_local = num_experts // num_ranks
    tokens = [num_max - r % 3 for r in range(num_ranks)]
    if case.get("empty_rank"):
        tokens[-1] = 0
    inp = {"tokens": tokens}
    inp["topk"] = [
        _routing(case["routing"], t, num_experts, num_topk, num_ranks, g) for t in tokens
    ]
    # Wide magnitudes so FP8 scales differ per token and group; a few values past 448.
    magnitudes = [
        10.0 ** torch.randint(-3, 4, (t, hidden // 8), generator=g).float() for t in tokens
    ]
    inp["xs"] = [
        (torch.randn(t, hidden, generator=g) * m.repeat_interleave(8, 1)).bfloat16()
        for t, m in zip(tokens, magnitudes)
    ]
    # Expert output of (local expert l, source rank s, source token t) on each receiving rank,
    # and noise for the rows past recv_count (unspecified, so combine must ignore them).
    inp["expert_out"] = [
        torch.randn(num_local, num_ranks, num_max, hidden, generator=g).bfloat16()
        for _ in range(num_ranks)
    ]
    inp["noise"] = [
        torch.randn(num_local, num_ranks * num_max, hidden, generator=g).bfloat16()
        for _ in range(num_ranks)
    ]
    inp["combine_weights"] = [torch.rand(t, num_topk, generator=g) for t in tokens]
    inp["stats"] = torch.arange(num_local, dtype=torch.int32) + 7
    return inp


def _decode_rows(layout_range: torch.Tensor, src_info: torch.Tensor, count: int):
    """``[(source rank, source token)]`` of the first ``count`` rows of one expert, or an error."""
    begin, size = (layout_range >> 32).tolist(), (layout_range & 0xFFFFFFFF).tolist()
    owner = [None] * count
    error = f"layout_range blocks {list(zip(begin, size))} do not tile [0, {count})"
    for s, (b, c) in enumerate(zip(begin, size)):
        for j in range(b, b + c):
            if not 0 <= j < count or owner[j] is not None:
                return None, error
            owner[j] = s
    if None in owner:
        return None, error
    return [(owner[j], int(src_info[j])) for j in range(count)], ""


def _expert_outputs(src_info, layout_range, recv_count, expert_out, noise):
    """Combine input ``[L, R*M, H]``: row j of expert l is expert_out[l, s, t] for its source."""
    x = noise.clone()
    for l in range(x.size(0)):
        rows, _ = _decode_rows(layout_range[l], src_info[l], int(recv_count[l]))
        for j, (s, t) in enumerate(rows or []):
            x[l, j] = expert_out[l, s, t]
    return x


def _ll_flags(case):
    if case["payload"] == "bf16":
        return dict(use_fp8=False, round_scale=False, use_ue8m0=False)
    round_scale, use_ue8m0 = FP8_MODES[case["payload"]]
    return dict(use_fp8=True, round_scale=round_scale, use_ue8m0=use_ue8m0)


def _ll_dispatch_result(out: ops.LowLatencyDispatchOutput):
    scales = out.recv_x_scales
    return {
        "recv_x": out.recv_x, "recv_x_scales": scales, "recv_count": out.recv_count,
        "src_info": out.handle.src_info, "layout_range": out.handle.layout_range,
        "scales_stride": None if scales is None else tuple(scales.stride()),
    }


def _low_latency_job(rank, num_ranks, cases):
    buf = _new_buffer()
    results = []
    for case in cases:
        inp = _ll_inputs(case, num_ranks)
        num_experts, num_max = case["experts"], case["max_tokens"]
        x, topk = inp["xs"][rank], inp["topk"][rank]
        flags = _ll_flags(case)
        stats = inp["stats"].clone()
        fused = ops.low_latency_dispatch(
            buf.name, x, topk, num_max, num_experts, **flags,
            cumulative_local_expert_recv_stats=stats,
        )
        stats_after_fused = stats.clone()
        pending = ops.low_latency_dispatch_send(buf.name, x, topk, num_max, num_experts, **flags)
        split = ops.low_latency_dispatch_recv(buf.name, pending, stats)

        handle = fused.handle
        expert_x = _expert_outputs(
            handle.src_info, handle.layout_range, fused.recv_count, inp["expert_out"][rank],
            inp["noise"][rank],
        )
        weights = inp["combine_weights"][rank]
        combined = ops.low_latency_combine(buf.name, expert_x, topk, weights, handle)
        out = torch.full_like(combined, float("nan"))
        returned = ops.low_latency_combine(buf.name, expert_x, topk, weights, handle, out=out)
        zero_copy = ops.low_latency_combine(
            buf.name, expert_x, topk, weights, handle, zero_copy=True
        )
        sent = ops.low_latency_combine_send(buf.name, expert_x, topk, weights, handle)
        received = ops.low_latency_combine_recv(buf.name, sent, topk, weights)
        results.append({
            "fused": _ll_dispatch_result(fused), "split": _ll_dispatch_result(split),
            "stats_after_fused": stats_after_fused, "stats_after_split": stats,
            "combined": combined, "out": out, "out_returned": returned is out,
            "zero_copy": zero_copy, "split_combined": received,
            "split_combined_in_place": received is sent,
        })
    buf.destroy()
    return results


def _check_ll_dispatch(fails, where, res, ref, case, num_ranks):
    """Order-insensitive within an expert (docs/DESIGN.md §5), exact everywhere else."""
    num_local = case["experts"] // num_ranks
    rows = num_ranks * case["max_tokens"]
    flags = _ll_flags(case)
    recv_x, scales = res["recv_x"], res["recv_x_scales"]
    fails.same(f"{where} recv_count", res["recv_count"], ref["recv_count"])
    x_dtype = torch.float8_e4m3fn if flags["use_fp8"] else torch.bfloat16
    fails.check(f"{where} recv_x", recv_x.dtype == x_dtype
                and recv_x.shape == (num_local, rows, case["hidden"]),
                f"got {recv_x.dtype}{list(recv_x.shape)}")
    fails.check(f"{where} src_info", res["src_info"].dtype == torch.int32
                and res["src_info"].shape == (num_local, rows), f"got {res['src_info'].shape}")
    fails.check(f"{where} layout_range", res["layout_range"].dtype == torch.int64
                and res["layout_range"].shape == (num_local, num_ranks),
                f"got {res['layout_range'].shape}")
    if not flags["use_fp8"]:
        fails.check(f"{where} recv_x_scales", scales is None, "BF16 dispatch returned scales")
    else:
        num_scales = case["hidden"] // (512 if flags["use_ue8m0"] else 128)
        dtype = torch.int32 if flags["use_ue8m0"] else torch.float32
        fails.check(f"{where} recv_x_scales", scales.dtype == dtype
                    and scales.shape == (num_local, rows, num_scales),
                    f"got {scales.dtype}{list(scales.shape)}")
        fails.check(f"{where} recv_x_scales column-major",
                    res["scales_stride"][1] == 1 and res["scales_stride"][2] == rows,
                    f"strides {res['scales_stride']}, expected (*, 1, {rows})")
    for l in range(num_local):
        count = int(ref["recv_count"][l])
        if int(res["recv_count"][l]) != count:
            continue  # already reported
        expected_sizes = [sum(1 for s, _ in ref["rows"][l] if s == src) for src in range(num_ranks)]
        sizes = (res["layout_range"][l] & 0xFFFFFFFF).tolist()
        fails.check(f"{where} expert {l} layout_range counts", sizes == expected_sizes,
                    f"{sizes} != {expected_sizes}")
        got, error = _decode_rows(res["layout_range"][l], res["src_info"][l], count)
        if got is None:
            fails.fail(f"{where} expert {l}", error)
            continue
        position = {st: j for j, st in enumerate(ref["rows"][l])}
        if sorted(got) != ref["rows"][l] or len(set(got)) != count:
            fails.fail(f"{where} expert {l} (source rank, src_info)",
                       f"{got} != {ref['rows'][l]} (in any order)")
            continue
        perm = torch.tensor([position[st] for st in got], dtype=torch.int64)
        fails.same(f"{where} expert {l} recv_x rows", recv_x[l, :count],
                   ref["recv_x"][l].index_select(0, perm))
        if flags["use_fp8"]:
            fails.same(f"{where} expert {l} recv_x_scales rows", scales[l, :count],
                       ref["recv_x_scales"][l].index_select(0, perm))


def _check_ll_case(fails: Failures, case, num_ranks, results):
    inp = _ll_inputs(case, num_ranks)
    ref = oracle.low_latency_dispatch(
        inp["xs"], inp["topk"], case["experts"], case["max_tokens"], **_ll_flags(case)
    )
    # The oracle's combine input: the same expert outputs laid out in the oracle's row order.
    expert_x = []
    for r in range(num_ranks):
        x = torch.zeros_like(inp["noise"][r])
        for l, rows in enumerate(ref[r]["rows"]):
            for j, (s, t) in enumerate(rows):
                x[l, j] = inp["expert_out"][r][l, s, t]
        expert_x.append(x)
    ref_combined = oracle.low_latency_combine(expert_x, ref, inp["topk"], inp["combine_weights"])
    for rank, res in enumerate(results):
        where = f"{case['name']} rank {rank}/{num_ranks}"
        _check_ll_dispatch(fails, f"{where} dispatch", res["fused"], ref[rank], case, num_ranks)
        _check_ll_dispatch(fails, f"{where} dispatch_send/recv", res["split"], ref[rank], case,
                           num_ranks)
        count = ref[rank]["recv_count"]
        fails.same(f"{where} cumulative stats after dispatch", res["stats_after_fused"],
                   inp["stats"] + count)
        fails.same(f"{where} cumulative stats after dispatch_send/recv",
                   res["stats_after_split"], inp["stats"] + 2 * count)
        expected = ref_combined[rank]
        fails.same(f"{where} low_latency_combine", res["combined"], expected)
        fails.same(f"{where} low_latency_combine out=", res["out"], expected)
        fails.check(f"{where} low_latency_combine out=", res["out_returned"],
                    "did not return `out`")
        fails.same(f"{where} low_latency_combine zero_copy", res["zero_copy"], expected)
        fails.same(f"{where} low_latency_combine_send/recv", res["split_combined"], expected)
        fails.check(f"{where} low_latency_combine_recv", res["split_combined_in_place"],
                    "did not return the tensor it completed")


@pytest.mark.parametrize("group", sorted(LL_CASES))
@pytest.mark.parametrize("num_ranks", WORLD_SIZES)
def test_low_latency_matches_oracle(num_ranks, group):
    """low_latency_dispatch (fused and send/recv) and low_latency_combine against the oracle.

    Dispatch: per expert the received rows (bit-exact payload and scales, in any order that
    agrees with src_info/layout_range), recv_count, layout_range counts, column-major scales,
    cumulative stats accumulated by both the fused call and the receive half. Combine:
    bit-exact for the plain call, ``out=``, ``zero_copy`` and the send/recv split, with noise in
    the unspecified rows past recv_count.
    """
    cases = LL_CASES[group]
    results = run_on_ranks(num_ranks, _low_latency_job, cases)
    fails = Failures()
    for i, case in enumerate(cases):
        _check_ll_case(fails, case, num_ranks, [res[i] for res in results])
    fails.assert_none()


@pytest.mark.parametrize("case", LL_EDGE_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("num_ranks", WORLD_SIZES)
def test_low_latency_edge_case_matches_oracle(num_ranks, case):
    """The checks of test_low_latency_matches_oracle when a rank has no tokens."""
    results = run_on_ranks(num_ranks, _low_latency_job, [case])
    fails = Failures()
    _check_ll_case(fails, case, num_ranks, [res[0] for res in results])
    fails.assert_none()


# --- pure ops -----------------------------------------------------------------------------


def _check_layouts(fails: Failures, num_ranks: int, num_tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for num_experts in (8, 16):
        for num_topk in (1, 2, 8):
            for kind in ("random", "skewed", "holes", "duplicates", "rank0_only"):
                topk = _routing(kind, num_tokens, num_experts, num_topk, num_ranks, g)
                for num_rdma in sorted({1, 2, num_ranks}):
                    if num_ranks % num_rdma:
                        continue
                    where = f"E={num_experts} K={num_topk} {kind} T={num_tokens} rdma={num_rdma}"
                    actual = ops.get_dispatch_layout(topk, num_experts, num_ranks, num_rdma)
                    expected = oracle.layout(topk, num_experts, num_ranks, num_rdma)
                    for field, value in zip(ops.DispatchLayout._fields, actual):
                        fails.same(f"{where} {field}", value, expected[field])


@pytest.mark.parametrize("num_ranks", WORLD_SIZES)
def test_get_dispatch_layout_matches_oracle(num_ranks):
    """Layout of every routing kind and top-k, with one or several RDMA ranks."""
    fails = Failures()
    _check_layouts(fails, num_ranks, num_tokens=13, seed=num_ranks)
    fails.assert_none()


@pytest.mark.parametrize("num_ranks", WORLD_SIZES)
def test_get_dispatch_layout_of_zero_tokens(num_ranks):
    """A rank without tokens gets zero counts and an empty ``[0, num_ranks]`` is_token_in_rank."""
    fails = Failures()
    _check_layouts(fails, num_ranks, num_tokens=0, seed=num_ranks)
    fails.assert_none()


def _fp8_cast_input(dtype: torch.dtype) -> torch.Tensor:
    """``[16, 1024]`` with per-group magnitudes from 0 and < 1e-4 (clamped amax) to past 448."""
    g = torch.Generator().manual_seed(7)
    num_tokens, hidden = 16, 1024
    magnitudes = torch.tensor([0.0, 1e-7, 3e-5, 9.9e-5, 1e-4, 1.0, 3.0, 447.0, 448.0, 449.0,
                               1e3, 6e4, 2.5e-3, 0.7, 1e5, 12.0])
    pick = torch.randint(0, magnitudes.numel(), (num_tokens, hidden // 128), generator=g)
    scale = magnitudes[pick].repeat_interleave(128, dim=1)
    x = torch.randn(num_tokens, hidden, generator=g) * scale
    x[0, 5] = 448.0  # exact maxima, both signs
    x[1, 130] = -1000.0
    x[2, :128] = 0.0  # an all-zero group: amax clamps to 1e-4
    x[3, :128] = 1e-6
    return x.to(dtype)


FP8_CAST_MODES = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("round_scale,use_ue8m0", FP8_CAST_MODES)
def test_per_token_cast_to_fp8_bit_exact(round_scale, use_ue8m0, dtype):
    """FP8 bytes and scales (float32 scale_inv or packed UE8M0) equal the oracle's bit for bit."""
    x = _fp8_cast_input(dtype)
    x_fp8, scales = ops.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    ref_fp8, ref_scales = oracle.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    fails = Failures()
    fails.same("x_fp8", x_fp8, ref_fp8)
    fails.same("scales", scales, ref_scales)
    fails.assert_none()
    # Sanity of the inputs themselves: values past 448 and clamped (tiny) amax are exercised.
    groups = x.float().view(x.size(0), -1, 128).abs().amax(-1)
    assert (groups > 448).any() and (groups < 1e-4).any()


@pytest.mark.parametrize("round_scale,use_ue8m0", FP8_CAST_MODES)
def test_per_token_cast_back_bit_exact(round_scale, use_ue8m0):
    """Cast back of the cast's output and of arbitrary finite FP8 bytes with arbitrary scales."""
    fails = Failures()
    x = _fp8_cast_input(torch.bfloat16)
    x_fp8, scales = ops.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    fails.same("cast back of the cast", ops.per_token_cast_back(x_fp8, scales),
               oracle.per_token_cast_back(x_fp8, scales))

    g = torch.Generator().manual_seed(8)
    num_tokens, hidden = 8, 1024
    raw = torch.randint(0, 256, (num_tokens, hidden), generator=g, dtype=torch.int32)
    raw[(raw & 0x7F) == 0x7F] = 0x42  # no NaN encodings
    any_fp8 = raw.to(torch.uint8).view(torch.float8_e4m3fn)
    if use_ue8m0:
        exponent_bytes = torch.randint(100, 150, (num_tokens, hidden // 128), generator=g)
        packed = (exponent_bytes.view(num_tokens, -1, 4)
                  << torch.tensor([0, 8, 16, 24])).sum(-1)
        any_scales = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    else:
        any_scales = torch.rand(num_tokens, hidden // 128, generator=g) * 10.0 ** torch.randint(
            -6, 6, (num_tokens, hidden // 128), generator=g
        ).float()
    fails.same("cast back of arbitrary bytes", ops.per_token_cast_back(any_fp8, any_scales),
               oracle.per_token_cast_back(any_fp8, any_scales))
    fails.assert_none()


@pytest.mark.parametrize("round_scale,use_ue8m0", FP8_CAST_MODES)
def test_per_token_cast_of_zero_tokens(round_scale, use_ue8m0):
    """``[0, hidden]`` casts to empty FP8 and scales of the right shapes, and back."""
    x = torch.zeros(0, 1024, dtype=torch.bfloat16)
    x_fp8, scales = ops.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    ref_fp8, ref_scales = oracle.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    fails = Failures()
    fails.same("x_fp8", x_fp8, ref_fp8)
    fails.same("scales", scales, ref_scales)
    fails.same("cast back", ops.per_token_cast_back(x_fp8, scales), x)
    fails.assert_none()


@pytest.mark.parametrize("num_ranks, num_max, num_local, num_topk", [
    (1, 8, 4, 2), (2, 16, 3, 4), (4, 5, 2, 8), (8, 3, 1, 2),
])
def test_batched_low_latency_layout_matches_oracle(num_ranks, num_max, num_local, num_topk):
    """The vectorised layout the GPU pressure and graph runs check against
    (``oracle.low_latency_dispatch_batched``) equals the per-rank oracle: counts, layout ranges
    and the source of every row, with -1 entries, repeated experts and ranks of fewer tokens."""
    g = torch.Generator().manual_seed(num_ranks * 100 + num_max)
    num_experts = num_ranks * num_local
    tokens = [int(torch.randint(0, num_max + 1, (), generator=g)) for _ in range(num_ranks)]
    topk_all = torch.randint(-1, num_experts, (num_ranks, num_max, num_topk), generator=g)
    topk_all[:, :, -1] = torch.where(torch.rand(num_ranks, num_max, generator=g) < 0.3,
                                     topk_all[:, :, 0], topk_all[:, :, -1])  # repeats
    for r, count in enumerate(tokens):
        topk_all[r, count:] = -1
    xs = [torch.randn(count, 128, generator=g).bfloat16() for count in tokens]
    per_rank = oracle.low_latency_dispatch(xs, [topk_all[r, :tokens[r]] for r in range(num_ranks)],
                                           num_experts, num_max, use_fp8=False)
    for rank, want in enumerate(per_rank):
        got = oracle.low_latency_dispatch_batched(topk_all, rank, num_local)
        assert torch.equal(got["count"], want["recv_count"])
        assert torch.equal(got["layout_range"], want["layout_range"])
        src = torch.where(got["valid"], got["source"] % num_max, -1).to(torch.int32)
        assert torch.equal(src, want["src_info"])
        for l, rows in enumerate(want["rows"]):  # the source rank of each row, too
            sources = [int(s) // num_max for s in got["source"][l, :len(rows)]]
            assert sources == [s for s, _ in rows]
