"""Fake (meta) implementations of every ``deep_ep`` op: the shape contract.

Installed as ``deep_ep_ops.meta``. This module depends on nothing in ``deep_ep_ops``: the op's
qualified name is the contract. Importing it attaches the fakes to ops that must already be
defined (``deep_ep_ops`` defines the schemas, then imports this module).

The checks here only read metadata (dtype, shape, sizes), so they raise at the call in eager
mode and at trace time under ``torch.compile``. Backends call the same ``check_*`` functions and
allocate through the same ``new_*`` helpers, so real outputs have exactly the fakes' strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deep_ep_ops._library import INTERNODE_HANDLE_FIELDS

FP8_DTYPE = torch.float8_e4m3fn
FP8_GROUP = 128  # channels per FP8 scale
UE8M0_PACK = 4  # UE8M0 exponent bytes packed per int32
NUM_CONFIG_FIELDS = 5


def _value(cond, msg: str) -> None:
    torch._check_value(cond, lambda: msg)


def _type(cond, msg: str) -> None:
    torch._check_type(cond, lambda: msg)


def check_tensor(t: torch.Tensor, name: str, ndim: int, dtypes: Sequence[torch.dtype]) -> None:
    """Raise naming ``name`` unless ``t`` has ``ndim`` dims and one of ``dtypes``."""
    _type(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _value(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    names = ", ".join(str(d) for d in dtypes)
    _type(t.dtype in dtypes, f"{name} must have dtype in ({names}), got {t.dtype}")


def check_size(t: torch.Tensor, name: str, dim: int, expected, what: str) -> None:
    _value(
        t.size(dim) == expected,
        f"{name}.size({dim}) must equal {what} ({expected}), got shape {tuple(t.shape)}",
    )


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
WEIGHT_DTYPES = (torch.float32, torch.float64)
ANY_DTYPES = FLOAT_DTYPES + (FP8_DTYPE, torch.uint8, torch.int8, torch.int32, torch.int64)


def num_channels(config: Sequence[int]) -> int:
    """Channels of a normal-mode config (DeepEP: two SMs per channel)."""
    _value(
        len(config) == NUM_CONFIG_FIELDS,
        f"config must have {NUM_CONFIG_FIELDS} ints (num_sms, nvl send/recv chunk, "
        f"rdma send/recv chunk), got {list(config)}",
    )
    _value(
        config[0] >= 2 and config[0] % 2 == 0,
        f"config.num_sms must be an even number >= 2, got {config[0]}",
    )
    return config[0] // 2


# --- pure ops -----------------------------------------------------------------------------


def check_layout(topk_idx, num_experts: int, num_ranks: int, num_rdma_ranks: int) -> None:
    check_tensor(topk_idx, "topk_idx", 2, (torch.int64,))
    _value(num_ranks >= 1, f"num_ranks must be >= 1, got {num_ranks}")
    _value(
        num_experts >= 1 and num_experts % num_ranks == 0,
        f"num_experts ({num_experts}) must be a positive multiple of num_ranks ({num_ranks})",
    )
    _value(
        num_rdma_ranks >= 1 and num_ranks % num_rdma_ranks == 0,
        f"num_rdma_ranks ({num_rdma_ranks}) must divide num_ranks ({num_ranks})",
    )


@torch.library.register_fake("deep_ep::get_dispatch_layout")
def _get_dispatch_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks):
    check_get_dispatch_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks)
    i32 = dict(dtype=torch.int32, device=topk_idx.device)
    return (
        torch.empty(num_ranks, **i32),
        torch.empty(num_rdma_ranks, **i32),
        torch.empty(num_experts, **i32),
        torch.empty(topk_idx.size(0), num_ranks, dtype=torch.bool, device=topk_idx.device),
    )


def check_fp8_cast(x, round_scale: bool, use_ue8m0: bool) -> None:
    check_tensor(x, "x", 2, FLOAT_DTYPES)
    _value(
        x.size(1) % FP8_GROUP == 0,
        f"hidden ({x.size(1)}) must be a multiple of {FP8_GROUP} for the FP8 cast",
    )
    if use_ue8m0:
        _value(round_scale, "use_ue8m0=True requires round_scale=True")
        _value(
            x.size(1) % (FP8_GROUP * UE8M0_PACK) == 0,
            f"hidden ({x.size(1)}) must be a multiple of {FP8_GROUP * UE8M0_PACK} for UE8M0 scales",
        )


def num_scales(hidden, use_ue8m0: bool):
    return hidden // (FP8_GROUP * UE8M0_PACK) if use_ue8m0 else hidden // FP8_GROUP


@torch.library.register_fake("deep_ep::per_token_cast_to_fp8")
def _per_token_cast_to_fp8(x, round_scale, use_ue8m0):
    check_per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    num_tokens, hidden = x.shape
    scale_dtype = torch.int32 if use_ue8m0 else torch.float32
    return (
        x.new_empty((num_tokens, hidden), dtype=FP8_DTYPE),
        x.new_empty((num_tokens, num_scales(hidden, use_ue8m0)), dtype=scale_dtype),
    )


def check_fp8_cast_back(x_fp8, x_scales) -> None:
    """``x_fp8 [..., H]`` float8 with ``x_scales [..., H/128]`` float32 or ``[..., H/512]``
    int32 (UE8M0): any number of leading dims (the same in both), any strides."""
    for t, name, dtypes in (
        (x_fp8, "x_fp8", (FP8_DTYPE,)), (x_scales, "x_scales", (torch.float32, torch.int32)),
    ):
        _type(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _value(t.dim() >= 1, f"{name} must have at least 1 dim ([..., hidden]), got a scalar")
        _type(t.dtype in dtypes, f"{name} must have dtype in "
              f"({', '.join(str(d) for d in dtypes)}), got {t.dtype}")
    _value(
        x_scales.dim() == x_fp8.dim() and x_scales.shape[:-1] == x_fp8.shape[:-1],
        f"x_scales must have x_fp8's leading dims ([..., S] for x_fp8 [..., hidden]), got "
        f"shapes {tuple(x_scales.shape)} and {tuple(x_fp8.shape)}",
    )
    hidden = x_fp8.size(-1)
    use_ue8m0 = x_scales.dtype == torch.int32
    _value(
        hidden % (FP8_GROUP * (UE8M0_PACK if use_ue8m0 else 1)) == 0,
        f"x_fp8.size(-1) ({hidden}) does not split into whole scale groups",
    )
    check_size(x_scales, "x_scales", -1, num_scales(hidden, use_ue8m0), "hidden / group")


@torch.library.register_fake("deep_ep::per_token_cast_back")
def _per_token_cast_back(x_fp8, x_scales):
    check_per_token_cast_back(x_fp8, x_scales)
    return x_fp8.new_empty(x_fp8.shape, dtype=torch.bfloat16)


# --- normal mode --------------------------------------------------------------------------


def check_payload(x, x_scales, topk_weights=None) -> None:
    """Checks of the per-token payload: ``x [T, H]``, ``x_scales [T, S]``, ``topk_weights``."""
    check_tensor(x, "x", 2, ANY_DTYPES)
    if x.dtype == FP8_DTYPE:
        _value(x_scales is not None, "x is float8_e4m3fn, so x_scales must be given")
    if x_scales is not None:
        _value(x.dtype == FP8_DTYPE, f"x_scales is only valid with float8_e4m3fn x, got {x.dtype}")
        check_tensor(x_scales, "x_scales", 2, (torch.float32, torch.int32))
        check_size(x_scales, "x_scales", 0, x.size(0), "x.size(0)")
    if topk_weights is not None:
        check_tensor(topk_weights, "topk_weights", 2, WEIGHT_DTYPES)
        check_size(topk_weights, "topk_weights", 0, x.size(0), "x.size(0)")


def _check_dispatch_args(
    x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
    num_tokens_per_expert, expert_alignment, config,
) -> None:
    check_payload(x, x_scales, topk_weights)
    check_tensor(is_token_in_rank, "is_token_in_rank", 2, (torch.bool,))
    check_size(is_token_in_rank, "is_token_in_rank", 0, x.size(0), "x.size(0)")
    num_ranks = is_token_in_rank.size(1)
    check_tensor(num_tokens_per_rank, "num_tokens_per_rank", 1, (torch.int32,))
    check_size(num_tokens_per_rank, "num_tokens_per_rank", 0, num_ranks, "num_ranks")
    _value(
        (topk_idx is None) == (topk_weights is None),
        "topk_idx and topk_weights must be given together",
    )
    if topk_idx is not None:
        check_tensor(topk_idx, "topk_idx", 2, (torch.int64,))
        check_size(topk_idx, "topk_idx", 0, x.size(0), "x.size(0)")
        check_size(topk_weights, "topk_weights", 1, topk_idx.size(1), "topk_idx.size(1)")
        _value(num_tokens_per_expert is not None, "num_tokens_per_expert is needed with topk_idx")
    if num_tokens_per_expert is not None:
        check_tensor(num_tokens_per_expert, "num_tokens_per_expert", 1, (torch.int32,))
        _value(
            num_tokens_per_expert.size(0) % num_ranks == 0,
            f"num_experts ({num_tokens_per_expert.size(0)}) must be a multiple of num_ranks "
            f"({num_ranks})",
        )
    _value(expert_alignment >= 1, f"expert_alignment must be >= 1, got {expert_alignment}")
    num_channels(config)


def _dispatch_outputs(
    x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_rows, config
):
    num_tokens, num_ranks = is_token_in_rank.shape
    num_topk = 0 if topk_idx is None else topk_idx.size(1)
    weight_dtype = torch.float32 if topk_weights is None else topk_weights.dtype
    scale_dtype = torch.float32 if x_scales is None else x_scales.dtype
    num_local_experts = 0 if num_tokens_per_expert is None else (
        num_tokens_per_expert.size(0) // num_ranks
    )
    channels = num_channels(config)
    i32 = dict(dtype=torch.int32)
    return (
        x.new_empty((num_rows, x.size(1))),
        x.new_empty((num_rows, 0 if x_scales is None else x_scales.size(1)), dtype=scale_dtype),
        x.new_empty((num_rows, num_topk), dtype=torch.int64),
        x.new_empty((num_rows, num_topk), dtype=weight_dtype),
        x.new_empty((num_local_experts,), **i32),
        x.new_empty((num_ranks, num_ranks), **i32),
        x.new_empty((num_ranks, channels), **i32),
        x.new_empty((num_ranks, channels), **i32),
        x.new_empty((num_rows,), **i32),
        x.new_empty((num_tokens, num_ranks), **i32),
    )


@torch.library.register_fake("deep_ep::dispatch")
def _dispatch(
    x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
    num_tokens_per_expert, buffer, expert_alignment, config,
):
    check_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
        num_tokens_per_expert, buffer, expert_alignment, config,
    )
    # Rows received from all ranks: known only after the count exchange.
    num_rows = torch.library.get_ctx().new_dynamic_size(min=0)
    return _dispatch_outputs(
        x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_rows,
        config,
    )


@torch.library.register_fake("deep_ep::capacity_dispatch")
def _capacity_dispatch(
    x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
    num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens, config,
):
    check_capacity_dispatch(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
        num_tokens_per_expert, buffer, expert_alignment, num_worst_tokens, config,
    )
    return _dispatch_outputs(
        x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
        num_worst_tokens, config,
    )


def check_handle(
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
    is_token_in_rank, send_head, num_worst_tokens, config,
) -> None:
    check_tensor(is_token_in_rank, "handle.is_token_in_rank", 2, (torch.bool,))
    num_tokens, num_ranks = is_token_in_rank.shape
    channels = num_channels(config)
    for name, t, shape in (
        ("rank_prefix_matrix", rank_prefix_matrix, (num_ranks, num_ranks)),
        ("channel_prefix_matrix", channel_prefix_matrix, (num_ranks, channels)),
        ("recv_channel_prefix_matrix", recv_channel_prefix_matrix, (num_ranks, channels)),
        ("send_head", send_head, (num_tokens, num_ranks)),
    ):
        check_tensor(t, f"handle.{name}", 2, (torch.int32,))
        _value(
            tuple(t.shape) == shape,
            f"handle.{name} must have shape {shape} (num_ranks={num_ranks}, channels={channels} "
            f"from config.num_sms={config[0]}), got {tuple(t.shape)}: handle and config mismatch",
        )
    check_tensor(recv_src_idx, "handle.recv_src_idx", 1, (torch.int32,))
    _value(num_worst_tokens >= 0, f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
    if num_worst_tokens > 0:
        check_size(recv_src_idx, "handle.recv_src_idx", 0, num_worst_tokens, "num_worst_tokens")


@torch.library.register_fake("deep_ep::cached_dispatch")
def _cached_dispatch(
    x, x_scales, topk_weights, rank_prefix_matrix, channel_prefix_matrix,
    recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
    num_worst_tokens, config,
):
    check_cached_dispatch(
        x, x_scales, topk_weights, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
        num_worst_tokens, config,
    )
    num_rows = recv_src_idx.size(0)
    return (
        x.new_empty((num_rows, x.size(1))),
        x.new_empty(
            (num_rows, 0 if x_scales is None else x_scales.size(1)),
            dtype=torch.float32 if x_scales is None else x_scales.dtype,
        ),
        x.new_empty(
            (num_rows, 0 if topk_weights is None else topk_weights.size(1)),
            dtype=torch.float32 if topk_weights is None else topk_weights.dtype,
        ),
    )


def _check_combine_args(x, topk_weights, bias_0, bias_1, recv_src_idx, is_token_in_rank,
                        rows_of: str = "handle.recv_src_idx") -> None:
    check_tensor(x, "x", 2, FLOAT_DTYPES)
    check_size(x, "x", 0, recv_src_idx.size(0), f"{rows_of}.size(0)")
    if topk_weights is not None:
        check_tensor(topk_weights, "topk_weights", 2, WEIGHT_DTYPES)
        check_size(topk_weights, "topk_weights", 0, x.size(0), "x.size(0)")
    for name, bias in (("bias_0", bias_0), ("bias_1", bias_1)):
        if bias is not None:
            check_tensor(bias, name, 2, FLOAT_DTYPES)
            _value(
                tuple(bias.shape) == (is_token_in_rank.size(0), x.size(1)),
                f"{name} must have shape (num_tokens, hidden) = "
                f"({is_token_in_rank.size(0)}, {x.size(1)}), got {tuple(bias.shape)}",
            )


@torch.library.register_fake("deep_ep::combine")
def _combine(
    x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
    recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
    num_worst_tokens, config,
):
    check_combine(
        x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
        num_worst_tokens, config,
    )
    num_tokens = is_token_in_rank.size(0)
    return (
        x.new_empty((num_tokens, x.size(1))),
        x.new_empty(
            (num_tokens, 0 if topk_weights is None else topk_weights.size(1)),
            dtype=torch.float32 if topk_weights is None else topk_weights.dtype,
        ),
    )


def _internode_dispatch_outputs(x, x_scales, topk_idx, topk_weights, num_tokens_per_rdma_rank,
                                is_token_in_rank, num_tokens_per_expert, num_rows,
                                num_forwarded, config):
    num_tokens, num_ranks = is_token_in_rank.shape
    num_nodes = num_tokens_per_rdma_rank.size(0)
    channels = num_channels(config)
    rows = _dispatch_outputs(x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                             num_tokens_per_expert, num_rows, config)[:5]
    i32 = dict(dtype=torch.int32)
    return (
        *rows,
        x.new_empty((num_nodes, channels), **i32),
        x.new_empty((num_ranks, channels), **i32),
        x.new_empty((num_nodes, channels), **i32),
        x.new_empty((num_nodes,), **i32),
        x.new_empty((num_ranks, channels), **i32),
        x.new_empty((num_ranks,), **i32),
        x.new_empty((num_rows, 2), **i32),
        x.new_empty((num_tokens, num_nodes), **i32),
        x.new_empty((num_forwarded, num_ranks // num_nodes), **i32),
    )


@torch.library.register_fake("deep_ep::internode_dispatch")
def _internode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                        num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, buffer,
                        expert_alignment, config):
    check_internode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                             num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                             buffer, expert_alignment, config)
    # Rows received, and rows forwarded as the same-local-index rank of every node: known
    # only after the count exchange.
    ctx = torch.library.get_ctx()
    return _internode_dispatch_outputs(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rdma_rank, is_token_in_rank,
        num_tokens_per_expert, ctx.new_dynamic_size(min=0), ctx.new_dynamic_size(min=0), config)


@torch.library.register_fake("deep_ep::internode_capacity_dispatch")
def _internode_capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                 num_tokens_per_rdma_rank, is_token_in_rank,
                                 num_tokens_per_expert, buffer, expert_alignment,
                                 num_worst_tokens, config):
    check_internode_capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                      num_tokens_per_rdma_rank, is_token_in_rank,
                                      num_tokens_per_expert, buffer, expert_alignment,
                                      num_worst_tokens, config)
    return _internode_dispatch_outputs(
        x, x_scales, topk_idx, topk_weights, num_tokens_per_rdma_rank, is_token_in_rank,
        num_tokens_per_expert, num_worst_tokens, num_worst_tokens, config)


@torch.library.register_fake("deep_ep::internode_cached_dispatch")
def _internode_cached_dispatch(x, x_scales, topk_weights, *handle_and_rest):
    *handle, buffer, num_worst_tokens, config = handle_and_rest
    check_internode_cached_dispatch(x, x_scales, topk_weights, *handle, buffer,
                                    num_worst_tokens, config)
    num_rows = _handle_of(handle)["recv_src_meta"].size(0)
    return (
        x.new_empty((num_rows, x.size(1))),
        x.new_empty((num_rows, 0 if x_scales is None else x_scales.size(1)),
                    dtype=torch.float32 if x_scales is None else x_scales.dtype),
        x.new_empty((num_rows, 0 if topk_weights is None else topk_weights.size(1)),
                    dtype=torch.float32 if topk_weights is None else topk_weights.dtype),
    )


@torch.library.register_fake("deep_ep::internode_combine")
def _internode_combine(x, topk_weights, bias_0, bias_1, *handle_and_rest):
    *handle, buffer, num_worst_tokens, config = handle_and_rest
    check_internode_combine(x, topk_weights, bias_0, bias_1, *handle, buffer, num_worst_tokens,
                            config)
    num_tokens = handle[0].size(0)
    return (
        x.new_empty((num_tokens, x.size(1))),
        x.new_empty((num_tokens, 0 if topk_weights is None else topk_weights.size(1)),
                    dtype=torch.float32 if topk_weights is None else topk_weights.dtype),
    )


# --- low-latency mode ---------------------------------------------------------------------


def check_low_latency(topk_idx, num_ranks, num_max_dispatch_tokens_per_rank, num_experts) -> int:
    """Checks shared by every low-latency op; returns the number of local experts."""
    check_tensor(topk_idx, "topk_idx", 2, (torch.int64,))
    _value(num_ranks >= 1, f"num_ranks must be >= 1, got {num_ranks}")
    _value(
        num_experts >= 1 and num_experts % num_ranks == 0,
        f"num_experts ({num_experts}) must be a positive multiple of num_ranks ({num_ranks})",
    )
    _value(
        num_max_dispatch_tokens_per_rank >= 1,
        f"num_max_dispatch_tokens_per_rank must be >= 1, got {num_max_dispatch_tokens_per_rank}",
    )
    _value(
        topk_idx.size(0) <= num_max_dispatch_tokens_per_rank,
        f"topk_idx has {topk_idx.size(0)} tokens, more than num_max_dispatch_tokens_per_rank "
        f"({num_max_dispatch_tokens_per_rank})",
    )
    return num_experts // num_ranks


def check_low_latency_handle(src_info, layout_range, num_ranks, num_max, num_experts) -> None:
    num_local = num_experts // num_ranks
    check_tensor(src_info, "handle.src_info", 2, (torch.int32,))
    check_tensor(layout_range, "handle.layout_range", 2, (torch.int64,))
    _value(
        tuple(src_info.shape) == (num_local, num_ranks * num_max),
        f"handle.src_info must have shape {(num_local, num_ranks * num_max)}, got "
        f"{tuple(src_info.shape)}: handle does not match num_max_dispatch_tokens_per_rank / "
        "num_experts / num_ranks",
    )
    _value(
        tuple(layout_range.shape) == (num_local, num_ranks),
        f"handle.layout_range must have shape {(num_local, num_ranks)}, got "
        f"{tuple(layout_range.shape)}",
    )


def _check_low_latency_dispatch_args(
    x, topk_idx, num_ranks, num_max, num_experts, use_fp8, round_scale, use_ue8m0
) -> None:
    check_low_latency(topk_idx, num_ranks, num_max, num_experts)
    check_tensor(x, "x", 2, FLOAT_DTYPES)
    check_size(x, "x", 0, topk_idx.size(0), "topk_idx.size(0)")
    if use_fp8:
        check_fp8_cast(x, round_scale, use_ue8m0)
    else:
        _value(not use_ue8m0 and not round_scale, "round_scale/use_ue8m0 need use_fp8=True")


def new_low_latency_scales(x, num_local, num_rows, use_fp8: bool, use_ue8m0: bool):
    """``[L, R*M, S]`` scales whose last two dims are column-major (S = 0 for BF16)."""
    columns = num_scales(x.size(1), use_ue8m0) if use_fp8 else 0
    dtype = torch.int32 if use_ue8m0 else torch.float32
    return x.new_empty((num_local, columns, num_rows), dtype=dtype).transpose(1, 2)


def new_low_latency_dispatch_outputs(x, num_ranks, num_max, num_experts, use_fp8, use_ue8m0):
    num_local = num_experts // num_ranks
    num_rows = num_ranks * num_max
    return (
        x.new_empty((num_local, num_rows, x.size(1)), dtype=FP8_DTYPE if use_fp8 else x.dtype),
        new_low_latency_scales(x, num_local, num_rows, use_fp8, use_ue8m0),
        x.new_empty((num_local,), dtype=torch.int32),
        x.new_empty((num_local, num_rows), dtype=torch.int32),
        x.new_empty((num_local, num_ranks), dtype=torch.int64),
    )


def _low_latency_dispatch_fake(op: str):
    """The fake of ``low_latency_dispatch`` and of its send half (each with its own check)."""

    def fake(x, topk_idx, buffer, num_ranks, num_max, num_experts, use_fp8, round_scale,
             use_ue8m0):
        globals()[f"check_{op}"](
            x, topk_idx, buffer, num_ranks, num_max, num_experts, use_fp8, round_scale, use_ue8m0
        )
        return new_low_latency_dispatch_outputs(
            x, num_ranks, num_max, num_experts, use_fp8, use_ue8m0
        )

    return fake


for _op in ("low_latency_dispatch", "low_latency_dispatch_send"):
    torch.library.register_fake(f"deep_ep::{_op}")(_low_latency_dispatch_fake(_op))


@torch.library.register_fake("deep_ep::low_latency_dispatch_recv")
def _low_latency_dispatch_recv(
    recv_x, recv_x_scales, recv_count, src_info, layout_range, stats, buffer
):
    check_low_latency_dispatch_recv(
        recv_x, recv_x_scales, recv_count, src_info, layout_range, stats, buffer
    )


def _check_low_latency_combine_args(
    x, topk_idx, topk_weights, src_info, layout_range, num_ranks, num_max, num_experts
) -> None:
    num_local = check_low_latency(topk_idx, num_ranks, num_max, num_experts)
    check_low_latency_handle(src_info, layout_range, num_ranks, num_max, num_experts)
    check_tensor(x, "x", 3, FLOAT_DTYPES)
    _value(
        tuple(x.shape[:2]) == (num_local, num_ranks * num_max),
        f"x must have shape (num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, "
        f"hidden) = ({num_local}, {num_ranks * num_max}, hidden), got {tuple(x.shape)}",
    )
    check_tensor(topk_weights, "topk_weights", 2, WEIGHT_DTYPES)
    _value(
        topk_weights.shape == topk_idx.shape,
        f"topk_weights must have the shape of topk_idx {tuple(topk_idx.shape)}, got "
        f"{tuple(topk_weights.shape)}",
    )


def _low_latency_combine_fake(op: str):
    """The fake of ``low_latency_combine`` and of its send half (each with its own check)."""

    def fake(x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
             num_experts, zero_copy):
        globals()[f"check_{op}"](
            x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
            num_experts, zero_copy,
        )
        return x.new_empty((topk_idx.size(0), x.size(2)))

    return fake


for _op in ("low_latency_combine", "low_latency_combine_send"):
    torch.library.register_fake(f"deep_ep::{_op}")(_low_latency_combine_fake(_op))


def check_low_latency_out(out, x, topk_idx) -> None:
    check_tensor(out, "out", 2, (x.dtype,))
    _value(
        tuple(out.shape) == (topk_idx.size(0), x.size(2)),
        f"out must have shape (num_tokens, hidden) = ({topk_idx.size(0)}, {x.size(2)}), got "
        f"{tuple(out.shape)}",
    )


@torch.library.register_fake("deep_ep::low_latency_combine_out")
def _low_latency_combine_out(
    x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max, num_experts,
    zero_copy, out,
):
    check_low_latency_combine_out(
        x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
        num_experts, zero_copy, out,
    )


@torch.library.register_fake("deep_ep::low_latency_combine_recv")
def _low_latency_combine_recv(combined_x, topk_idx, topk_weights, buffer):
    check_low_latency_combine_recv(combined_x, topk_idx, topk_weights, buffer)


@torch.library.register_fake("deep_ep::low_latency_cached_dispatch")
def _low_latency_cached_dispatch(
    x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max, num_experts
):
    check_low_latency_cached_dispatch(
        x, topk_idx, topk_weights, src_info, layout_range, buffer, num_ranks, num_max,
        num_experts,
    )
    return x.new_empty((num_experts // num_ranks, num_ranks * num_max, x.size(1)))


@torch.library.register_fake("deep_ep::low_latency_gather")
def _low_latency_gather(x, topk_idx, src_info, layout_range, buffer, num_ranks, num_max, num_experts):
    check_low_latency_gather(x, topk_idx, src_info, layout_range, buffer, num_ranks, num_max,
                             num_experts)
    return x.new_empty((topk_idx.size(0), topk_idx.size(1), x.size(2)))


@torch.library.register_fake("deep_ep::clean_low_latency_buffer")
def _clean_low_latency_buffer(workspace, buffer, num_max, hidden, num_experts):
    check_clean_low_latency_buffer(workspace, buffer, num_max, hidden, num_experts)


# --- one check per op ---------------------------------------------------------------------
#
# ``check_<op>`` takes the op's arguments under their schema names (tests/test_schemas.py holds
# the names equal) and is the first thing both the op's fake above and its reference backend
# (deep_ep_ops/reference.py) do, so that tracing and running raise the same exception with the
# same message for a bad argument. Checks that need the data (expert ids in range) or the
# buffer (ranks, bytes) come after, in the reference and the kernels only.


def _op_check(check, op=None):
    """``check_<op>``, first making sure every tensor argument is on one device (the first
    tensor's): mixed devices would otherwise reach a kernel of one of them (a meta tensor among
    CPU ones runs the fake and returns uninitialised tensors). ``op`` defaults to the name
    after ``check_`` (a send half shares its fused op's check under its own name)."""
    import functools
    import inspect

    names = list(inspect.signature(check).parameters)
    op = op or check.__name__[len("check_"):]

    @functools.wraps(check)
    def checked(*args):
        first = None
        for name, value in zip(names, args):
            if not isinstance(value, torch.Tensor):
                continue
            if first is None:
                first = (name, value.device)
            elif value.device != first[1]:
                raise ValueError(
                    f"deep_ep::{op}: {name} is on {value.device} but {first[0]} is on "
                    f"{first[1]}; every tensor argument must be on one device"
                )
        return check(*args)

    return checked


@_op_check
def check_get_dispatch_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks) -> None:
    check_layout(topk_idx, num_experts, num_ranks, num_rdma_ranks)


@_op_check
def check_per_token_cast_to_fp8(x, round_scale, use_ue8m0) -> None:
    check_fp8_cast(x, round_scale, use_ue8m0)


@_op_check
def check_per_token_cast_back(x_fp8, x_scales) -> None:
    check_fp8_cast_back(x_fp8, x_scales)


@_op_check
def check_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                   num_tokens_per_expert, buffer, expert_alignment, config) -> None:
    _check_dispatch_args(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                         is_token_in_rank, num_tokens_per_expert, expert_alignment, config)


@_op_check
def check_capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                            is_token_in_rank, num_tokens_per_expert, buffer, expert_alignment,
                            num_worst_tokens, config) -> None:
    _check_dispatch_args(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                         is_token_in_rank, num_tokens_per_expert, expert_alignment, config)
    _value(num_worst_tokens >= 1, f"num_worst_tokens must be >= 1, got {num_worst_tokens}")


@_op_check
def check_cached_dispatch(x, x_scales, topk_weights, rank_prefix_matrix, channel_prefix_matrix,
                          recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head,
                          buffer, num_worst_tokens, config) -> None:
    check_handle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
                 recv_src_idx, is_token_in_rank, send_head, num_worst_tokens, config)
    check_payload(x, x_scales, topk_weights)
    check_size(x, "x", 0, is_token_in_rank.size(0), "handle.is_token_in_rank.size(0)")


@_op_check
def check_combine(x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
                  recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, buffer,
                  num_worst_tokens, config) -> None:
    check_handle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
                 recv_src_idx, is_token_in_rank, send_head, num_worst_tokens, config)
    _check_combine_args(x, topk_weights, bias_0, bias_1, recv_src_idx, is_token_in_rank)


# --- internode normal mode -------------------------------------------------------------------



def _check_nodes(num_ranks: int, num_nodes: int, what: str) -> None:
    _value(num_nodes >= 1 and num_ranks % num_nodes == 0,
           f"{what} ({num_nodes} nodes) must divide num_ranks ({num_ranks})")


def _check_internode_dispatch_args(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                   num_tokens_per_rdma_rank, is_token_in_rank,
                                   num_tokens_per_expert, expert_alignment, config) -> None:
    _check_dispatch_args(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                         is_token_in_rank, num_tokens_per_expert, expert_alignment, config)
    check_tensor(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", 1, (torch.int32,))
    _check_nodes(is_token_in_rank.size(1), num_tokens_per_rdma_rank.size(0),
                 "num_tokens_per_rdma_rank.size(0)")


def check_internode_handle(handle: dict, num_worst_tokens, config) -> None:
    """The ten tensors of an internode handle (by field name) agree in shape with each other
    and with ``config`` (their channels)."""
    is_token_in_rank = handle["is_token_in_rank"]
    check_tensor(is_token_in_rank, "handle.is_token_in_rank", 2, (torch.bool,))
    num_tokens, num_ranks = is_token_in_rank.shape
    rdma = handle["rdma_channel_prefix_matrix"]
    check_tensor(rdma, "handle.rdma_channel_prefix_matrix", 2, (torch.int32,))
    num_nodes, channels = rdma.size(0), num_channels(config)
    _check_nodes(num_ranks, num_nodes, "handle.rdma_channel_prefix_matrix.size(0)")
    per_node = num_ranks // num_nodes
    recv_src_meta, send_nvl_head = handle["recv_src_meta"], handle["send_nvl_head"]
    check_tensor(recv_src_meta, "handle.recv_src_meta", 2, (torch.int32,))
    check_tensor(send_nvl_head, "handle.send_nvl_head", 2, (torch.int32,))
    shapes = {
        "rdma_channel_prefix_matrix": (num_nodes, channels),
        "gbl_channel_prefix_matrix": (num_ranks, channels),
        "recv_rdma_channel_prefix_matrix": (num_nodes, channels),
        "recv_rdma_rank_prefix_sum": (num_nodes,),
        "recv_gbl_channel_prefix_matrix": (num_ranks, channels),
        "recv_gbl_rank_prefix_sum": (num_ranks,),
        "recv_src_meta": (recv_src_meta.size(0), 2),
        "send_rdma_head": (num_tokens, num_nodes),
        "send_nvl_head": (send_nvl_head.size(0), per_node),
    }
    for name, shape in shapes.items():
        t = handle[name]
        check_tensor(t, f"handle.{name}", len(shape), (torch.int32,))
        _value(tuple(t.shape) == shape,
               f"handle.{name} must have shape {shape} (num_ranks={num_ranks}, nodes={num_nodes}, "
               f"channels={channels} from config.num_sms={config[0]}), got {tuple(t.shape)}: "
               "handle and config mismatch")
    _value(num_worst_tokens >= 0, f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
    if num_worst_tokens > 0:
        check_size(recv_src_meta, "handle.recv_src_meta", 0, num_worst_tokens, "num_worst_tokens")
        check_size(send_nvl_head, "handle.send_nvl_head", 0, num_worst_tokens, "num_worst_tokens")


def _handle_of(args) -> dict:
    """The handle fields by name, from their values in order or from a check's arguments
    (its ``locals()``)."""
    if isinstance(args, dict):
        return {name: args[name] for name in INTERNODE_HANDLE_FIELDS}
    return dict(zip(INTERNODE_HANDLE_FIELDS, args))


@_op_check
def check_internode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                             num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                             buffer, expert_alignment, config) -> None:
    _check_internode_dispatch_args(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                   num_tokens_per_rdma_rank, is_token_in_rank,
                                   num_tokens_per_expert, expert_alignment, config)


@_op_check
def check_internode_capacity_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                      num_tokens_per_rdma_rank, is_token_in_rank,
                                      num_tokens_per_expert, buffer, expert_alignment,
                                      num_worst_tokens, config) -> None:
    _check_internode_dispatch_args(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank,
                                   num_tokens_per_rdma_rank, is_token_in_rank,
                                   num_tokens_per_expert, expert_alignment, config)
    _value(num_worst_tokens >= 1, f"num_worst_tokens must be >= 1, got {num_worst_tokens}")


@_op_check
def check_internode_cached_dispatch(x, x_scales, topk_weights, is_token_in_rank,
                                    rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
                                    recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum,
                                    recv_gbl_channel_prefix_matrix, recv_gbl_rank_prefix_sum,
                                    recv_src_meta, send_rdma_head, send_nvl_head, buffer,
                                    num_worst_tokens, config) -> None:
    check_internode_handle(_handle_of(locals()), num_worst_tokens, config)
    check_payload(x, x_scales, topk_weights)
    check_size(x, "x", 0, is_token_in_rank.size(0), "handle.is_token_in_rank.size(0)")


@_op_check
def check_internode_combine(x, topk_weights, bias_0, bias_1, is_token_in_rank,
                            rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
                            recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum,
                            recv_gbl_channel_prefix_matrix, recv_gbl_rank_prefix_sum,
                            recv_src_meta, send_rdma_head, send_nvl_head, buffer,
                            num_worst_tokens, config) -> None:
    check_internode_handle(_handle_of(locals()), num_worst_tokens, config)
    _check_combine_args(x, topk_weights, bias_0, bias_1, recv_src_meta, is_token_in_rank,
                        rows_of="handle.recv_src_meta")


@_op_check
def check_low_latency_dispatch(x, topk_idx, buffer, num_ranks, num_max_dispatch_tokens_per_rank,
                               num_experts, use_fp8, round_scale, use_ue8m0) -> None:
    _check_low_latency_dispatch_args(x, topk_idx, num_ranks, num_max_dispatch_tokens_per_rank,
                                     num_experts, use_fp8, round_scale, use_ue8m0)


check_low_latency_dispatch_send = _op_check(check_low_latency_dispatch.__wrapped__,
                                            "low_latency_dispatch_send")


@_op_check
def check_low_latency_dispatch_recv(recv_x, recv_x_scales, recv_count, src_info, layout_range,
                                    cumulative_local_expert_recv_stats, buffer) -> None:
    stats = cumulative_local_expert_recv_stats
    if stats is not None:
        check_tensor(stats, "cumulative_local_expert_recv_stats", 1, (torch.int32,))
        check_size(stats, "cumulative_local_expert_recv_stats", 0, recv_count.size(0),
                   "num_local_experts")


@_op_check
def check_low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                              num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                              zero_copy) -> None:
    _check_low_latency_combine_args(x, topk_idx, topk_weights, src_info, layout_range, num_ranks,
                                    num_max_dispatch_tokens_per_rank, num_experts)


check_low_latency_combine_send = _op_check(check_low_latency_combine.__wrapped__,
                                           "low_latency_combine_send")


@_op_check
def check_low_latency_combine_out(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                  num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                                  zero_copy, out) -> None:
    _check_low_latency_combine_args(x, topk_idx, topk_weights, src_info, layout_range, num_ranks,
                                    num_max_dispatch_tokens_per_rank, num_experts)
    check_low_latency_out(out, x, topk_idx)


@_op_check
def check_low_latency_combine_recv(combined_x, topk_idx, topk_weights, buffer) -> None:
    """The receive completes what its send returned: nothing to check beyond the schema's
    types (the kernels' bindings hold it to the pending send)."""


@_op_check
def check_low_latency_cached_dispatch(x, topk_idx, topk_weights, src_info, layout_range, buffer,
                                      num_ranks, num_max_dispatch_tokens_per_rank,
                                      num_experts) -> None:
    num_max = num_max_dispatch_tokens_per_rank
    check_low_latency(topk_idx, num_ranks, num_max, num_experts)
    check_low_latency_handle(src_info, layout_range, num_ranks, num_max, num_experts)
    check_tensor(x, "x", 2, FLOAT_DTYPES)
    check_size(x, "x", 0, topk_idx.size(0), "topk_idx.size(0)")
    check_tensor(topk_weights, "topk_weights", 2, WEIGHT_DTYPES)
    _value(
        topk_weights.shape == topk_idx.shape,
        f"topk_weights must have the shape of topk_idx {tuple(topk_idx.shape)}, got "
        f"{tuple(topk_weights.shape)}",
    )


@_op_check
def check_low_latency_gather(x, topk_idx, src_info, layout_range, buffer, num_ranks,
                             num_max_dispatch_tokens_per_rank, num_experts) -> None:
    num_max = num_max_dispatch_tokens_per_rank
    num_local = check_low_latency(topk_idx, num_ranks, num_max, num_experts)
    check_low_latency_handle(src_info, layout_range, num_ranks, num_max, num_experts)
    check_tensor(x, "x", 3, FLOAT_DTYPES)
    _value(
        tuple(x.shape[:2]) == (num_local, num_ranks * num_max),
        f"x must have shape (num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, "
        f"hidden) = ({num_local}, {num_ranks * num_max}, hidden), got {tuple(x.shape)}",
    )


@_op_check
def check_clean_low_latency_buffer(workspace, buffer, num_max_dispatch_tokens_per_rank, hidden,
                                   num_experts) -> None:
    check_tensor(workspace, "workspace", 1, (torch.uint8,))
