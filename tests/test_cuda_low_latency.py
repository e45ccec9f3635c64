"""GPU: the low-latency (decode) NVSHMEM kernels of low_latency_dispatch / low_latency_combine.

Every test runs in a pool of ranks (``tests/gpu_distributed.py``: one GPU each over NCCL, or
several per GPU under CUDA MPS over gloo), at 2, 4 and 8 ranks as far as the machine allows. Two
oracles: the reference backend, called directly on the same CUDA tensors and buffer; and, where
a reference call per step would be too slow (pressure, CUDA graphs), the vectorised layout of
every rank in ``tests/oracle.py`` (``low_latency_dispatch_batched``, held equal to the per-rank
oracle on CPU by tests/test_semantics.py), which each rank evaluates on its GPU from inputs
that all ranks generate from one shared seed.

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
  out-of-range expert id is reported as an exception; a peer that never arrives gives a
  RuntimeError naming the op and a rank, then every process exits cleanly.
- CUDA graphs with odd and even numbers of steps on two buffers, replayed and interleaved with
  eager low-latency and normal-mode calls; 10000 pressure iterations; opcheck of every
  low-latency op; autograd against the same computations done with the reference; the NVSHMEM
  put path (``DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT=1``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time

import pytest
import torch
import torch.distributed as dist

import gpu_distributed
import oracle
import test_semantics as semantics
from deep_ep_ops import Buffer, _build, _registry, meta, ops, reference
from deep_ep_ops._registry import TIMEOUT_ENV
from deep_ep_ops.buffer import FORCE_PUT_ENV
from deep_ep_ops.config import get_combine_config, get_dispatch_config
from gpu_distributed import max_ranks, run_on_gpus
from gpu_helpers import (  # noqa: F401  (world_size: the module-scoped fixture: 2, 4 and 8
    # ranks as far as there are GPUs, each size's pool closed after this module's tests of it)
    OPCHECK_UTILS, Diffs, _assert_no_diffs, _bits, _device, _generator, _grad, _new_buffer,
    _nvl_bytes, _opcheck_utils, _routing, _sync, scaled, world_size,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
    pytest.mark.skipif(
        not getattr(_build, "HAS_LOW_LATENCY_KERNELS", False),
        reason="the low-latency NVSHMEM kernels are not built (deep_ep_ops._C_nvshmem)",
    ),
]

PAYLOADS = {  # payload -> (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}
COMBINE_RTOL, COMBINE_ATOL = 2.0 ** -8, 1e-6
SKEW_CYCLES = 20_000_000  # rank 0 starts its send this late: the receive halves must wait
NAN = float("nan")


# --- rank side: helpers -----------------------------------------------------------------------


def _flags(payload: str) -> dict:
    return dict(zip(("use_fp8", "round_scale", "use_ue8m0"), PAYLOADS[payload]))


@contextlib.contextmanager
def _scoped_env(values: dict):
    """Environment variables set only inside (the Buffer reads its settings at creation)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _ll_buffer(shapes, num_ranks: int, timeout_s=None, num_rdma_bytes=None,
               force_put=False) -> Buffer:
    """A low-latency buffer on the pool's NCCL group, sized for every ``(M, hidden, E)``;
    ``timeout_s`` overrides DEEP_EP_OPS_TIMEOUT_S, ``force_put`` sets
    DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT=1 (both read at creation, for this buffer only)."""
    if num_rdma_bytes is None:
        num_rdma_bytes = max(
            Buffer.get_low_latency_rdma_size_hint(m, h, num_ranks, e) for m, h, e in shapes
        )
    env = {} if timeout_s is None else {TIMEOUT_ENV: str(timeout_s)}
    if force_put:
        env[FORCE_PUT_ENV] = "1"
    with _scoped_env(env):
        return Buffer(dist.group.WORLD, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True)


def _check_put_path(diffs: Diffs, rank: int, buffer: Buffer) -> None:
    """With DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT=1 no peer is reached with loads/stores."""
    mapped = buffer.low_latency_peers_mapped()
    diffs.check(f"rank {rank} low_latency_peers_mapped() with {FORCE_PUT_ENV}=1", mapped == 0,
                f"{mapped} peers reached with NVLink loads/stores, expected 0 (all puts)")


def _token_rows(num_tokens: int, hidden: int, g, device) -> torch.Tensor:
    """bfloat16 ``[num_tokens, hidden]``: magnitudes from 1e-5 to 1e4 per 8 channels (FP8 scales
    differ per token and group, some values pass 448), and one all-zero 128-channel group."""
    exponent = torch.randint(-5, 5, (num_tokens, hidden // 8), generator=g, device=device)
    magnitude = torch.pow(10.0, exponent.float()).repeat_interleave(8, dim=1)
    x = torch.randn(num_tokens, hidden, generator=g, device=device) * magnitude
    if num_tokens and hidden >= 128:
        x[0, :128] = 0
    return x.bfloat16()


def _ll_routing(kind, num_tokens, num_experts, num_topk, num_ranks, g, device) -> torch.Tensor:
    """test_cuda_intranode's routing kinds, plus "hot_expert": every token's first choice is
    expert 0, whose owner then receives a row from every token of every rank."""
    if kind == "hot_expert":
        idx = _routing("random", num_tokens, num_experts, num_topk, num_ranks, g, device)
        idx[:, 0] = 0  # may repeat another entry of the row: allowed
        return idx
    return _routing(kind, num_tokens, num_experts, num_topk, num_ranks, g, device)


def _expert_factors(num_experts: int, device) -> torch.Tensor:
    """The stand-in expert of global expert e multiplies by this (exact in float32): a row sent
    to the wrong expert comes back scaled wrongly."""
    return 0.5 + (torch.arange(num_experts, device=device) % 13).float() / 8


def _all_gather_tokens(x: torch.Tensor, num_max: int) -> torch.Tensor:
    """Every rank's tokens as ``[R, M, hidden]`` (zero rows past each rank's count)."""
    padded = x.new_zeros(num_max, x.size(1))
    padded[: x.size(0)] = x
    out = x.new_empty(dist.get_world_size() * num_max, x.size(1))
    gpu_distributed.all_gather_into_tensor(out, padded)
    return out.view(-1, num_max, x.size(1))


def _row_sources(handle: ops.LowLatencyHandle, recv_count: torch.Tensor):
    """``(flat, valid)`` ``[L, R*M]``: the source ``rank * M + token`` of every row as the handle
    describes it (0 where invalid), and whether the row is below ``recv_count`` and inside a
    source block."""
    num_max = handle.num_max_dispatch_tokens_per_rank
    begin, size = handle.layout_range >> 32, handle.layout_range & 0xFFFFFFFF  # [L, R]
    rows = torch.arange(handle.src_info.size(1), device=begin.device)
    inside = (rows.view(1, -1, 1) >= begin.unsqueeze(1)) & (
        rows.view(1, -1, 1) < (begin + size).unsqueeze(1)
    )  # [L, rows, R]
    token = handle.src_info.long()
    valid = (inside.any(-1) & (rows < recv_count.unsqueeze(1)) & (token >= 0)
             & (token < num_max))
    flat = torch.where(valid, inside.int().argmax(-1) * num_max + token, 0)
    return flat, valid


def _expert_outputs(x_all: torch.Tensor, out: ops.LowLatencyDispatchOutput, local_factors):
    """Combine input ``[L, R*M, hidden]`` bfloat16 laid out by the kernel's handle: row (e, j) is
    the stand-in expert e applied to the BF16 token it came from; NaN past recv_count (combine
    must not read those rows)."""
    flat, valid = _row_sources(out.handle, out.recv_count)
    rows = x_all.reshape(-1, x_all.size(-1))[flat].float()
    y = rows.mul_(local_factors.view(-1, 1, 1)).bfloat16()
    return y.masked_fill_(~valid.unsqueeze(-1), NAN)


def _skew(rank: int) -> None:
    if rank == 0 and _device().type == "cuda":
        torch.cuda._sleep(SKEW_CYCLES)


def _unrelated_compute(scratch: torch.Tensor) -> torch.Tensor:
    """GPU work between the send and receive halves that touches none of their tensors."""
    for _ in range(3):
        scratch = torch.tanh(scratch @ scratch * 0.01)
    return scratch


def _strides_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _expect_error(diffs: Diffs, where: str, types, pattern, call) -> None:
    """``call()`` must raise one of ``types`` at the call, naming ``pattern`` (a regex)."""
    names = "/".join(t.__name__ for t in types)
    try:
        call()
    except types as error:
        diffs.check(where, pattern is None or re.search(pattern, str(error), re.I) is not None,
                    f"{type(error).__name__} does not mention {pattern!r}: {error}")
        return
    except Exception as error:  # noqa: BLE001  (any other type is the failure reported)
        diffs.check(where, False, f"raised {type(error).__name__}, expected {names}: {error}")
        return
    diffs.check(where, False, f"no error, expected {names}")


def _drain_device_errors(diffs: Diffs, where: str) -> None:
    """Report (and clear) an error a kernel left in the device error word."""
    _sync(_device())
    try:
        ops.check_device_errors()
    except Exception as error:  # noqa: BLE001
        diffs.check(where, False, f"a kernel reported {type(error).__name__}: {error}")


# --- rank side: dispatch checks ---------------------------------------------------------------


def _same_rows(diffs: Diffs, where: str, got, want, valid) -> bool:
    """Rows ``(e, j)`` with ``valid[e, j]`` of ``[L, N, ...]`` tensors bit-identical."""
    if got.dtype != want.dtype or got.shape != want.shape:
        diffs.check(where, False, f"got {got.dtype}{list(got.shape)}, "
                                  f"expected {want.dtype}{list(want.shape)}")
        return False
    differ = _bits(got) != _bits(want)
    if differ.dim() > 2:
        differ = differ.flatten(2).any(-1)
    differ &= valid
    if not bool(differ.any()):
        return True
    bad = differ.nonzero()
    expert, row = bad[0].tolist()
    diffs.check(where, False, f"{bad.size(0)} of {int(valid.sum())} valid rows differ, first: "
                              f"local expert {expert}, row {row}")
    return False


def _rows_as_sets(out_x, out_scales, src_info, layout_range, counts, expert):
    """Sorted ``(source rank, source token, row bytes, scale bytes)`` of one expert's rows."""
    count = counts[expert]
    decoded, error = semantics._decode_rows(layout_range[expert].cpu(),
                                            src_info[expert].cpu(), count)
    if decoded is None:
        return None, error
    data = _bits(out_x[expert, :count]).cpu()
    scales = None if out_scales is None else _bits(out_scales[expert, :count]).cpu()
    return sorted(
        (rank, token, data[j].numpy().tobytes(),
         b"" if scales is None else scales[j].numpy().tobytes())
        for j, (rank, token) in enumerate(decoded)
    ), ""


def _order_diagnosis(got: ops.LowLatencyDispatchOutput, want) -> str:
    """Whether rows that differ from the reference's are its rows in another order."""
    want_x, want_scales, want_count, want_src, want_layout = want
    counts = want_count.tolist()
    differing = []
    for expert in range(len(counts)):
        mine, error = _rows_as_sets(got.recv_x, got.recv_x_scales, got.handle.src_info,
                                    got.handle.layout_range, counts, expert)
        theirs, _ = _rows_as_sets(want_x, want_scales if got.recv_x_scales is not None else None,
                                  want_src, want_layout, counts, expert)
        if mine is None:
            return f"the kernel's layout_range/src_info do not decode: {error}"
        if mine != theirs:
            differing.append(expert)
    if not differing:
        return ("ORDER ONLY: every expert's rows are the reference's as sets of (source rank, "
                "source token, row bytes, scale bytes), in another order; the kernel must order "
                "them like the reference (source rank major, ascending source token)")
    return (f"the rows differ as sets of (source rank, source token, row bytes, scale bytes) "
            f"too, in local experts {differing[:16]}")


def _check_dispatch(diffs: Diffs, where: str, got: ops.LowLatencyDispatchOutput, want,
                    flags: dict) -> None:
    """A kernel dispatch against the reference's outputs ``want`` (the op's raw tuple)."""
    want_x, want_scales, want_count, want_src, want_layout = want
    diffs.same(f"{where} recv_count", got.recv_count, want_count)
    diffs.same(f"{where} layout_range", got.handle.layout_range, want_layout)
    diffs.check(f"{where} recv_x", got.recv_x.dtype == want_x.dtype
                and got.recv_x.shape == want_x.shape,
                f"got {got.recv_x.dtype}{list(got.recv_x.shape)}, "
                f"expected {want_x.dtype}{list(want_x.shape)}")
    scales = got.recv_x_scales
    if flags["use_fp8"]:
        ok = (scales is not None and scales.dtype == want_scales.dtype
              and scales.shape == want_scales.shape and _strides_match(scales, want_scales))
        diffs.check(f"{where} recv_x_scales", ok, "got " + (
            "None" if scales is None else f"{scales.dtype}{list(scales.shape)} strides "
                                          f"{scales.stride()}")
            + f", expected {want_scales.dtype}{list(want_scales.shape)} strides "
              f"{want_scales.stride()} (column-major in the last two dims)")
        if not ok:
            return
    else:
        diffs.check(f"{where} recv_x_scales", scales is None, "BF16 dispatch returned scales")
    if not torch.equal(got.recv_count, want_count) or got.recv_x.shape != want_x.shape:
        return  # the rows cannot be lined up
    valid = (torch.arange(want_x.size(1), device=want_x.device)
             < want_count.unsqueeze(1))
    same = [
        _same_rows(diffs, f"{where} recv_x rows", got.recv_x, want_x, valid),
        _same_rows(diffs, f"{where} src_info rows", got.handle.src_info, want_src, valid),
    ]
    if flags["use_fp8"]:
        same.append(_same_rows(diffs, f"{where} recv_x_scales rows", scales, want_scales, valid))
    if not all(same):
        diffs.check(f"{where} row order", False, _order_diagnosis(got, want))


def _check_sender_rows(diffs: Diffs, where: str, got: ops.LowLatencyDispatchOutput, x_all,
                       flags: dict) -> None:
    """Every received row (as the kernel's own handle places it) is the BF16 token of its
    sender, or ``ops.per_token_cast_to_fp8`` of it, bit for bit."""
    flat, valid = _row_sources(got.handle, got.recv_count)
    x_flat = x_all.reshape(-1, x_all.size(-1))
    if not flags["use_fp8"]:
        _same_rows(diffs, f"{where} recv_x = the sender's BF16 token", got.recv_x, x_flat[flat],
                   valid)
        return
    x_fp8, scales = ops.per_token_cast_to_fp8(x_flat, flags["round_scale"], flags["use_ue8m0"])
    _same_rows(diffs, f"{where} recv_x = per_token_cast_to_fp8(sender's token)",
               got.recv_x.view(torch.uint8), x_fp8.view(torch.uint8)[flat], valid)
    if got.recv_x_scales is not None:
        _same_rows(diffs, f"{where} recv_x_scales = per_token_cast_to_fp8(sender's token)",
                   got.recv_x_scales, scales[flat], valid)


# --- rank side: combine checks ----------------------------------------------------------------


def _combine_violations(got, want, scale) -> torch.Tensor:
    """Elements outside ``|got - want| <= 2^-8 (scale + |want|) + 1e-6`` (NaN is outside)."""
    bound = COMBINE_RTOL * (scale + want.abs()) + COMBINE_ATOL
    return ~((got.float() - want).abs() <= bound)


def _check_bound(diffs: Diffs, where: str, got, want, scale, mask=None) -> bool:
    bad = _combine_violations(got, want, scale)
    if mask is not None:
        bad &= mask
    if not bool(bad.any()):
        return True
    at = tuple(bad.nonzero()[0].tolist())
    ref, s = float(want[at]), float(scale[at])
    diffs.check(where, False,
                f"{int(bad.sum())} of {bad.numel()} elements outside |got - ref| <= 2^-8 (S + "
                f"|ref|) + 1e-6, first at {at}: got {float(got[at]):.7g}, float32 reference "
                f"{ref:.7g}, S {s:.7g}, bound {COMBINE_RTOL * (s + abs(ref)) + COMBINE_ATOL:.3g}")
    return False


def _check_combine(diffs: Diffs, where: str, buffer: Buffer, handle: ops.LowLatencyHandle, y,
                   topk, weights, state=None) -> torch.Tensor:
    """The kernel combine of ``y`` against the float32 reference; returns the kernel's result.
    With ``state``, also shows once per job that the bound rejects two wrong results."""
    name, num_ranks = buffer.name, handle.layout_range.size(1)
    num_max, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.num_experts
    args = (handle.src_info, handle.layout_range, name, num_ranks, num_max, num_experts)
    combined = ops.low_latency_combine(name, y, topk, weights, handle)
    want = reference.low_latency_combine(y.float(), topk, weights, *args, False)
    rows = reference.low_latency_gather(y, topk, *args)  # [T, K, hidden], 0 where -1
    routed = (topk >= 0).unsqueeze(-1)
    terms = torch.where(routed, weights.unsqueeze(-1) * rows.float(), 0)
    scale = terms.abs().sum(1)
    shape = (topk.size(0), y.size(2))
    if combined.dtype != torch.bfloat16 or tuple(combined.shape) != shape:
        diffs.check(where, False, f"got {combined.dtype}{list(combined.shape)}, expected "
                                  f"torch.bfloat16{list(shape)}")
        return combined
    _check_bound(diffs, where, combined, want, scale)
    nowhere = ~routed.squeeze(-1).any(1)
    nonzero = (combined != 0) & nowhere.unsqueeze(1)
    diffs.check(f"{where} tokens routed nowhere", not bool(nonzero.any()),
                f"{int(nonzero.any(1).sum())} of {int(nowhere.sum())} such tokens are not exact "
                "zeros")
    if state is not None and not state.get("bound_rejects") and bool((scale > 0).any()):
        state["bound_rejects"] = True
        first = routed.squeeze(-1).int().argmax(1)  # each token's first routed entry
        dropped = want - terms.gather(1, first.view(-1, 1, 1).expand(-1, 1, shape[1])).squeeze(1)
        for what, wrong in (("every weight 10% heavier", (want * 1.1).bfloat16()),
                            ("each token's first expert left out", dropped.bfloat16())):
            diffs.check(f"{where} (the bound itself)",
                        bool(_combine_violations(wrong, want, scale).any()),
                        f"a result with {what} passes the bound: the check is vacuous")
    return combined


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
    fresh processes (a timed-out buffer must not poison other tests), run concurrently."""
    results, exit_codes = gpu_distributed.run_in_fresh_pools(
        world_size, {TIMEOUT_ENV: str(LL_TIMEOUT_S)}, _ll_timeout_job, LL_TIMEOUT_SCENARIOS,
        timeout=240,
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
