"""Helpers the multi-rank GPU tests share (tests/test_cuda_intranode.py,
tests/test_cuda_low_latency*.py, tests/test_cuda_faults.py): the world-size fixture, the rank's device and generators,
buffers, the per-rank difference collector, routings and opcheck utilities."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import gpu_distributed
from deep_ep_ops import Buffer, Config
from deep_ep_ops._registry import TIMEOUT_ENV
from test_semantics import _bits  # noqa: F401  (the bit view of the CPU tests, re-exported)

# "0.1": the long GPU runs (pressure iterations, graph replays) at a tenth of their length, e.g.
# for the one-GPU multi-rank mode, where every rank shares one GPU (scripts/gpu_run.sh sets it
# there). Default 1.
SCALE_ENV = "DEEP_EP_OPS_GPU_TEST_SCALE"


def scaled(count: int) -> int:
    """``count`` iterations scaled by DEEP_EP_OPS_GPU_TEST_SCALE (at least 1)."""
    try:
        factor = float(os.environ.get(SCALE_ENV, "1"))
    except ValueError:
        raise ValueError(f"{SCALE_ENV} must be a number, got {os.environ[SCALE_ENV]!r}") from None
    if not 0 < factor <= 1:
        raise ValueError(f"{SCALE_ENV} must be in (0, 1], got {factor}")
    return max(1, round(count * factor))


def _show(t: torch.Tensor, index) -> str:
    value = t[index]
    if value.dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float16):
        return f"{float(value.float()):g} (bits {int(_bits(value.reshape(1))[0])})"
    return repr(value.item())


WORLD_SIZES = gpu_distributed.world_sizes()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"{n}ranks")
def world_size(request):
    """Module scoped, so pytest runs every test of one world size before the next one and
    each size's pool is started once and closed when its tests are done."""
    reason = gpu_distributed.why_not(request.param)
    if reason is not None:
        pytest.skip(reason)
    yield request.param
    gpu_distributed.close_pool(request.param)


def _device() -> torch.device:
    """This rank's device: its GPU under NCCL, or the GPU it shares with other ranks (gloo
    under MPS, DEEP_EP_OPS_DEVICE=cuda); the CPU under a plain gloo group (trying jobs out)."""
    if dist.get_backend() == "nccl" or os.environ.get("DEEP_EP_OPS_DEVICE") == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _nvl_bytes(configs, hidden_bytes, num_ranks: int) -> int:
    """The largest NVLink size hint of any config and payload width a job uses."""
    return max(
        Config(*config).get_nvl_buffer_size_hint(width, num_ranks)
        for config in configs for width in hidden_bytes
    )


def _new_buffer(num_nvl_bytes: int, timeout_s: float | None = None) -> Buffer:
    """A normal-mode buffer; ``timeout_s`` overrides the pool's DEEP_EP_OPS_TIMEOUT_S (read
    here, at creation) for jobs whose ranks may drift apart on the host, such as compiling."""
    if timeout_s is None:
        return Buffer(dist.group.WORLD, num_nvl_bytes=num_nvl_bytes)
    previous = os.environ.get(TIMEOUT_ENV)
    os.environ[TIMEOUT_ENV] = str(timeout_s)
    try:
        return Buffer(dist.group.WORLD, num_nvl_bytes=num_nvl_bytes)
    finally:
        if previous is None:
            del os.environ[TIMEOUT_ENV]
        else:
            os.environ[TIMEOUT_ENV] = previous


class Diffs:
    """Mismatches of one job, as messages the test process reports."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, where: str, ok: bool, what: str) -> None:
        if not ok:
            self.messages.append(f"{where}: {what}")

    def same(self, where: str, got: torch.Tensor, want: torch.Tensor) -> None:
        """Bit-identical, with dtype, shape and (where it matters) strides equal."""
        if got.dtype != want.dtype or got.shape != want.shape:
            self.messages.append(f"{where}: got {got.dtype}{list(got.shape)}, "
                                 f"expected {want.dtype}{list(want.shape)}")
            return
        a, b = _bits(got), _bits(want)
        if not torch.equal(a, b):
            bad = (a != b).nonzero()
            first = tuple(bad[0].tolist())
            self.messages.append(
                f"{where}: {bad.size(0)} of {a.numel()} elements differ, first at {first}: "
                f"got {_show(got, first)}, expected {_show(want, first)}"
            )
            return
        strides = [(g, w) for g, w, n in zip(got.stride(), want.stride(), got.shape) if n > 1]
        self.check(where, got.numel() == 0 or all(g == w for g, w in strides),
                   f"strides {got.stride()}, expected {want.stride()}")


def _routing(kind, num_tokens, num_experts, num_topk, num_ranks, g, device) -> torch.Tensor:
    """``topk_idx [num_tokens, num_topk]`` int64 on ``device`` for a routing kind."""
    def uniform():
        return torch.rand(num_tokens, num_experts, generator=g, device=device)

    def distinct(scores):
        return scores.topk(num_topk, dim=1).indices

    if kind == "random":
        return distinct(uniform())
    if kind == "skewed":  # without replacement, P(expert e) ~ 1/(e+1)^2 (Gumbel top-k)
        log_p = -2.0 * torch.log(torch.arange(num_experts, device=device) + 1.0)
        gumbel = -torch.log(-torch.log(uniform().clamp(1e-12, 1.0 - 1e-7)))
        return distinct(log_p + gumbel)
    if kind == "holes":  # -1 entries, and the first token routed nowhere
        idx = distinct(uniform())
        idx[torch.rand(idx.shape, generator=g, device=device) < 0.3] = -1
        idx[:1] = -1
        return idx
    if kind == "duplicates":  # a repeated expert in about half the tokens' top-k, some -1
        idx = distinct(uniform())
        if num_topk >= 2:
            dup = torch.rand(num_tokens, generator=g, device=device) < 0.5
            idx[:, -1] = torch.where(dup, idx[:, 0], idx[:, -1])
        idx[torch.rand(idx.shape, generator=g, device=device) < 0.1] = -1
        return idx
    if kind == "rank0_only":  # only rank 0's experts: the other ranks receive nothing
        num_local = num_experts // num_ranks
        return torch.randint(0, num_local, (num_tokens, num_topk), generator=g, device=device)
    if kind == "nowhere":
        return torch.full((num_tokens, num_topk), -1, dtype=torch.int64, device=device)
    raise ValueError(kind)


def _assert_no_diffs(per_rank: list[list[str]]) -> None:
    messages = [m for rank_messages in per_rank for m in rank_messages]
    assert not messages, f"{len(messages)} mismatches:\n" + "\n".join(messages[:60])


OPCHECK_UTILS = (
    "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"
)


def _grad(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _opcheck_utils(args) -> tuple[str, ...]:
    utils = OPCHECK_UTILS
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.dtype == torch.float8_e4m3fn for t in tensors):
        # test_schema compares inputs before and after with allclose, and the AOT check sums
        # every output to backpropagate: neither has float8 kernels. The schema is the same for
        # every dtype (checked on the BF16 samples).
        utils = tuple(u for u in utils if u != "test_schema")
        if any(t.requires_grad for t in tensors):
            utils = tuple(u for u in utils if u != "test_aot_dispatch_dynamic")
    return utils


def _bit_flags(pairs, names, label: str, host_failures: list, device) -> torch.Tensor:
    """One device flag per ``(got, want)`` pair: the bits differ (no host sync). A dtype or
    shape mismatch is a host failure (``label``: the iteration) and a set flag."""
    differs = []
    for k, (a, b) in enumerate(pairs):
        if a.dtype != b.dtype or a.shape != b.shape:
            host_failures.append(f"{label}: {names[k]} is {a.dtype}{list(a.shape)}, expected "
                                 f"{b.dtype}{list(b.shape)}")
            differs.append(torch.ones((), dtype=torch.bool, device=device))
        else:
            differs.append((_bits(a) != _bits(b)).any())
    return torch.stack(differs)
