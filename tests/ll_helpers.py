"""Rank-side helpers of the low-latency GPU tests (test_cuda_low_latency*.py): buffers, inputs,
stand-in experts and the checks of dispatch and combine results against the reference."""

from __future__ import annotations

import contextlib
import os
import re

import torch
import torch.distributed as dist

import gpu_distributed
import test_semantics as semantics
from deep_ep_ops import Buffer, ops, reference
from deep_ep_ops._registry import TIMEOUT_ENV
from deep_ep_ops.buffer import FORCE_PUT_ENV
from gpu_helpers import Diffs, _bits, _device, _routing, _sync

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
