"""``nn.Module`` wrappers over the ``deep_ep`` ops: a token dispatcher and an example MoE layer.

Everything here goes through ``deep_ep_ops.ops``, so autograd (docs/DESIGN.md §7), ``torch.compile``
and CUDA graphs see only ``deep_ep`` ops plus ordinary torch code.

Three modes of :class:`MoEDispatcher`:

- ``"normal"``: high-throughput dispatch; the number of received rows ``N`` is data dependent
  (one host sync per dispatch; under ``torch.compile`` it needs
  ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``).
- ``"capacity"``: DeepEP's ``num_worst_tokens``: ``N`` is static (default ``R * T``, dropless
  when every rank has ``T`` tokens: a token goes at most once to each rank), no host sync,
  compile-static.
- ``"low_latency"``: decode path, ``recv_x [L, R*M, hidden]`` static, weighting done by the
  combine.

Where the top-k weights are applied: in normal/capacity mode the expert rank receives
``recv_topk_idx``/``recv_topk_weights`` with the tokens, weights each expert's output there, and
the (unweighted) combine sums the ranks' partial results. In low-latency mode
``low_latency_combine`` applies the weights. Either way the weights receive gradients.

Notation as in docs/DESIGN.md: ``T`` local tokens, ``H`` hidden, ``K`` top-k, ``R`` ranks, ``E``
experts, ``L = E / R`` local experts (rank ``r`` owns experts ``r*L .. r*L + L - 1``), ``M`` max
tokens per rank (low latency), ``N`` received rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _registry, ops
from .buffer import Buffer
from .config import Config, get_combine_config, get_dispatch_config

MODES = ("normal", "capacity", "low_latency")

__all__ = [
    "MODES", "Dispatched", "LowLatencyState", "MoEDispatcher", "ExpertMLP", "ExampleMoE",
    "DenseMoE", "route", "make_router_weight", "make_expert", "buffer_size_hints",
]


class LowLatencyState(NamedTuple):
    """What ``low_latency_combine`` needs besides the expert output: the routing of the tokens."""

    handle: ops.LowLatencyHandle
    topk_idx: torch.Tensor  # [T, K] int64 global expert or -1
    topk_weights: torch.Tensor  # [T, K] float32 (or float64)


class Dispatched(NamedTuple):
    """Result of :meth:`MoEDispatcher.forward`, the same fields in every mode.

    - ``recv_x``: normal/capacity ``[N, H]``; low latency ``[L, R*M, H]`` (float8_e4m3fn with
      ``use_fp8``, else ``x.dtype``; rows of expert ``l`` past ``num_recv_tokens_per_expert[l]``
      are unspecified).
    - ``recv_x_scales``: low latency with ``use_fp8``: ``[L, R*M, H/128]`` float32; else ``None``.
    - ``recv_topk_idx``: normal/capacity ``[N, K]`` int64 local expert or -1 (every rank-``k``
      entry whose expert lives elsewhere, and all of a capacity padding row, are -1); ``None``
      in low latency.
    - ``recv_topk_weights``: ``[N, K]`` float32, 0 where ``recv_topk_idx`` is -1; ``None`` in low
      latency.
    - ``num_recv_tokens_per_expert``: ``[L]`` int32 on the device.
    - ``state``: what :meth:`MoEDispatcher.combine` needs (a ``DispatchHandle`` or a
      :class:`LowLatencyState`).
    """

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert: torch.Tensor
    state: Union[ops.DispatchHandle, ops.InternodeHandle, LowLatencyState]


def buffer_size_hints(
    hidden: int, num_ranks: int, num_experts: int, *, element_size: int = 2,
    num_max_dispatch_tokens_per_rank: int = 0,
) -> tuple[int, int]:
    """``(num_nvl_bytes, num_rdma_bytes)`` for a ``Buffer`` serving a :class:`MoEDispatcher`.

    ``element_size`` is the byte size of the dispatched dtype (2 for bfloat16, 4 for float32).
    ``num_rdma_bytes`` is 0 unless ``num_max_dispatch_tokens_per_rank`` is given (low latency).
    """
    hidden_bytes = hidden * max(element_size, 2)
    num_nvl_bytes = max(
        get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
        get_combine_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
    )
    num_rdma_bytes = 0
    if num_max_dispatch_tokens_per_rank:
        num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )
    return num_nvl_bytes, num_rdma_bytes


class MoEDispatcher(nn.Module):
    """Sends tokens to the ranks of their experts and brings the expert outputs back.

    ``buffer`` is a :class:`deep_ep_ops.Buffer` (or its ``name``). ``mode`` is one of
    ``"normal"``, ``"capacity"``, ``"low_latency"`` (see the module docstring).
    ``num_worst_tokens`` (capacity) defaults to ``R * T``, dropless when no rank has more
    tokens than this one (pass the bound explicitly when ranks differ);
    ``num_max_dispatch_tokens_per_rank`` (``M``) is required for low latency, and the same on
    every rank. ``use_fp8`` (low latency only) dispatches float8 with per-128-channel scales
    (not differentiable: train with ``use_fp8=False``). The module has no parameters; all its
    attributes are Python constants, so ``torch.compile`` specialises on them.
    """

    def __init__(
        self,
        buffer: Union[Buffer, str],
        num_experts: int,
        mode: str = "normal",
        *,
        num_worst_tokens: Optional[int] = None,
        num_max_dispatch_tokens_per_rank: Optional[int] = None,
        use_fp8: bool = False,
        dispatch_config: Optional[Config] = None,
        combine_config: Optional[Config] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "low_latency" and not num_max_dispatch_tokens_per_rank:
            raise ValueError("mode='low_latency' needs num_max_dispatch_tokens_per_rank")
        if use_fp8 and mode != "low_latency":
            raise ValueError("use_fp8 is only supported in mode='low_latency'")
        if num_worst_tokens is not None and mode != "capacity":
            raise ValueError("num_worst_tokens is only used in mode='capacity'")
        self.buffer_name = buffer if isinstance(buffer, str) else buffer.name
        comm = _registry.get(self.buffer_name)
        self.num_ranks, self.num_rdma_ranks = comm.num_ranks, comm.num_rdma_ranks
        # A buffer of several nodes takes the internode ops (normal and capacity modes).
        self.internode = self.num_rdma_ranks > 1 and mode != "low_latency"
        if num_experts < 1 or num_experts % self.num_ranks:
            raise ValueError(
                f"num_experts ({num_experts}) must be a positive multiple of the number of "
                f"ranks ({self.num_ranks})"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.num_ranks
        self.mode = mode
        self.num_worst_tokens = num_worst_tokens
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.use_fp8 = use_fp8
        # Plain lists: constants for the compiler, no Config object to trace through.
        self.dispatch_config = (dispatch_config or get_dispatch_config(self.num_ranks)).to_list()
        self.combine_config = (combine_config or get_combine_config(self.num_ranks)).to_list()

    def extra_repr(self) -> str:
        return (
            f"buffer={self.buffer_name!r}, mode={self.mode!r}, num_experts={self.num_experts}, "
            f"num_ranks={self.num_ranks}"
        )

    def forward(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> Dispatched:
        """Dispatch ``x [T, H]`` along ``topk_idx [T, K]`` int64 (global experts, -1: none)
        with ``topk_weights [T, K]`` float32. Differentiable in ``x`` (unless FP8) and
        ``topk_weights``."""
        if self.mode == "low_latency":
            out = ops.low_latency_dispatch(
                self.buffer_name, x, topk_idx, self.num_max_dispatch_tokens_per_rank,
                self.num_experts, use_fp8=self.use_fp8,
            )
            state = LowLatencyState(out.handle, topk_idx, topk_weights)
            return Dispatched(out.recv_x, out.recv_x_scales, None, None, out.recv_count, state)
        layout = ops.get_dispatch_layout(topk_idx, self.num_experts, self.num_ranks,
                                         self.num_rdma_ranks)
        num_worst_tokens = 0
        if self.mode == "capacity":
            # A token reaches a rank at most once: with at most T tokens on every rank, R * T
            # rows never drop one.
            num_worst_tokens = self.num_worst_tokens or self.num_ranks * x.size(0)
        dispatch = ops.internode_dispatch if self.internode else ops.dispatch
        out = dispatch(
            self.buffer_name, x, layout, topk_idx, topk_weights,
            num_worst_tokens=num_worst_tokens, config=self.dispatch_config,
        )
        return Dispatched(
            out.recv_x, None, out.recv_topk_idx, out.recv_topk_weights,
            out.num_recv_tokens_per_expert, out.handle,
        )

    def combine(
        self, expert_out: torch.Tensor, state: Union[ops.DispatchHandle, LowLatencyState]
    ) -> torch.Tensor:
        """Bring expert outputs back: ``[T, H]`` in ``expert_out.dtype``.

        Normal/capacity: ``expert_out [N, H]`` rows already weighted by their ranks' top-k
        weights; summed over ranks. Low latency: ``expert_out [L, R*M, H]`` unweighted; the
        combine applies ``topk_weights`` (only rows below the received count are read).
        """
        if self.mode == "low_latency":
            return ops.low_latency_combine(
                self.buffer_name, expert_out, state.topk_idx, state.topk_weights, state.handle
            )
        combine = ops.internode_combine if self.internode else ops.combine
        return combine(
            self.buffer_name, expert_out, state, config=self.combine_config
        ).combined_x


# --- an example MoE layer -------------------------------------------------------------------


class ExpertMLP(nn.Module):
    """``down(silu(up(x)))``: one expert, ``[*, H] -> [*, H]``."""

    def __init__(self, hidden: int, ffn_hidden: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, ffn_hidden, bias=False, dtype=dtype)
        self.down = nn.Linear(ffn_hidden, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


def _generator(seed: int, what: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + what)


def make_router_weight(hidden: int, num_experts: int, seed: int) -> torch.Tensor:
    """``[E, H]`` float32 router weight, the same on every rank and in :class:`DenseMoE`."""
    return torch.randn(num_experts, hidden, generator=_generator(seed, 0)) * hidden**-0.5


def make_expert(
    hidden: int, ffn_hidden: int, expert: int, seed: int, dtype: torch.dtype = torch.float32
) -> ExpertMLP:
    """Global expert ``expert``, initialised from ``(seed, expert)`` only: whichever process
    builds it (its owner rank or the dense reference) gets the same weights."""
    mlp = ExpertMLP(hidden, ffn_hidden, dtype)
    g = _generator(seed, 1 + expert)
    with torch.no_grad():
        mlp.up.weight.copy_(torch.randn(ffn_hidden, hidden, generator=g) * hidden**-0.5)
        mlp.down.weight.copy_(torch.randn(hidden, ffn_hidden, generator=g) * ffn_hidden**-0.5)
    return mlp


def route(
    logits: torch.Tensor, top_k: int, weight_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: ``logits [T, E]`` -> ``(topk_idx [T, K] int64, topk_weights [T, K])``.

    The weights are the softmax probabilities of the chosen experts renormalised to sum to 1,
    which is the softmax over the chosen logits. Top-k is taken on the logits (softmax is
    monotonic, so the choice is the same): it then depends only on the router matmul, and an
    eager and a compiled run pick the same experts even if they round the softmax differently.
    """
    top_logits, topk_idx = logits.topk(top_k, dim=-1)
    topk_weights = torch.softmax(top_logits.to(weight_dtype), dim=-1)
    return topk_idx, topk_weights


def _weight_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dequantize(recv_x: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 ``[L, R*M, H]`` with ``[L, R*M, H/128]`` scales -> ``dtype`` (static shapes)."""
    num_local, num_rows, hidden = recv_x.shape
    groups = recv_x.to(torch.float32).view(num_local, num_rows, -1, 128) * scales.unsqueeze(-1)
    return groups.view(num_local, num_rows, hidden).to(dtype)


class ExampleMoE(nn.Module):
    """A small expert-parallel MoE layer: router -> dispatch -> local experts -> combine.

    The router (``[E, H]``, replicated: every rank keeps a copy and gets the gradient of its own
    tokens) picks ``top_k`` experts per token. This rank owns experts ``rank*L .. rank*L+L-1``
    (``self.experts[l]`` is global expert ``rank*L + l``), each an :class:`ExpertMLP`.
    Parameters are built from ``seed`` and the global expert index, so :class:`DenseMoE` with the
    same arguments holds exactly the same weights.

    Per-expert compute has static shapes in every mode (no ``.item()``, ``nonzero`` or boolean
    indexing), so capacity and low-latency layers compile with ``fullgraph=True`` and capture in
    CUDA graphs:

    - normal/capacity: every local expert runs over all ``N`` received rows and its output is
      weighted by ``Σ_k recv_topk_weights[:, k] * (recv_topk_idx[:, k] == l)``, which is 0 for
      rows not routed to it and for capacity padding. That costs ``L`` times the FLOPs of a
      grouped GEMM; it keeps the example short. Padding rows are zeroed before the experts, so
      whatever the backend left in them cannot turn into NaN/inf, neither in the output
      (``0 * inf = nan``) nor in the weight gradients.
    - low latency: expert ``l`` runs on all ``R*M`` rows of ``recv_x[l]``. Rows past
      ``recv_count[l]`` are unspecified; ``low_latency_combine`` never reads them, so they do not
      reach the output, but their activations would still enter the weight gradients
      (``grad_out`` is 0 there, and ``0 * nan = nan``), so they are zeroed first too.
    """

    def __init__(
        self,
        dispatcher: MoEDispatcher,
        hidden: int,
        ffn_hidden: int,
        top_k: int,
        *,
        rank: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.hidden, self.top_k, self.rank = hidden, top_k, rank
        num_experts, num_local = dispatcher.num_experts, dispatcher.num_local_experts
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        with torch.no_grad():
            self.router.weight.copy_(make_router_weight(hidden, num_experts, seed))
        self.experts = nn.ModuleList(
            make_expert(hidden, ffn_hidden, rank * num_local + l, seed, dtype)
            for l in range(num_local)
        )
        if device is not None:
            self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]``: ``out[t] = Σ_k w[t, k] * expert_{e[t, k]}(x[t])`` with
        ``(e, w)`` the router's top-k experts and weights."""
        topk_idx, topk_weights = route(self.router(x), self.top_k, _weight_dtype(x.dtype))
        recv = self.dispatcher(x, topk_idx, topk_weights)
        if self.dispatcher.mode == "low_latency":
            expert_out = self._low_latency_experts(recv, x.dtype)
        else:
            expert_out = self._weighted_experts(recv)
        return self.dispatcher.combine(expert_out, recv.state)

    def _weighted_experts(self, recv: Dispatched) -> torch.Tensor:
        """``[N, H]``: each received row times its local experts' outputs and weights, summed."""
        routed = recv.recv_topk_idx >= 0  # [N, K]; all False on capacity padding rows
        recv_x = torch.where(routed.any(-1, keepdim=True), recv.recv_x, 0)
        out = None
        for l, expert in enumerate(self.experts):
            weight = torch.where(recv.recv_topk_idx == l, recv.recv_topk_weights, 0).sum(-1)
            y = weight.unsqueeze(-1) * expert(recv_x)
            out = y if out is None else out + y
        return out.to(recv.recv_x.dtype)

    def _low_latency_experts(self, recv: Dispatched, dtype: torch.dtype) -> torch.Tensor:
        """``[L, R*M, H]``: expert ``l`` on ``recv_x[l]``; unweighted (the combine weights)."""
        recv_x = recv.recv_x
        if recv.recv_x_scales is not None:
            recv_x = _dequantize(recv_x, recv.recv_x_scales, dtype)
        rows = torch.arange(recv_x.size(1), device=recv_x.device)
        valid = rows < recv.num_recv_tokens_per_expert.unsqueeze(-1)  # [L, R*M]
        recv_x = torch.where(valid.unsqueeze(-1), recv_x, 0)
        return torch.stack([expert(recv_x[l]) for l, expert in enumerate(self.experts)])


class DenseMoE(nn.Module):
    """The MoE of :class:`ExampleMoE` on one process: all ``E`` experts, no communication.

    With the same ``hidden, ffn_hidden, num_experts, top_k, seed, dtype`` its router and
    ``experts[e]`` equal those of the distributed layer (expert ``e`` lives on rank ``e // L``).
    Feed it every rank's tokens (concatenated) to get every rank's output; the loss of the
    distributed run is the sum of the ranks' losses, so compare against the dense loss built the
    same way. Used by the tests and ``examples/train_moe.py`` as the oracle.
    """

    def __init__(
        self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *, seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        with torch.no_grad():
            self.router.weight.copy_(make_router_weight(hidden, num_experts, seed))
        self.experts = nn.ModuleList(
            make_expert(hidden, ffn_hidden, e, seed, dtype) for e in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = route(self.router(x), self.top_k, _weight_dtype(x.dtype))
        out = torch.zeros(x.shape, dtype=topk_weights.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            weight = torch.where(topk_idx == e, topk_weights, 0).sum(-1)
            out = out + weight.unsqueeze(-1) * expert(x)
        return out.to(x.dtype)
