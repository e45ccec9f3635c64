"""Autograd formulas (DESIGN.md §7), written with ``deep_ep`` ops so backward graphs compile.

- dispatch: grad x = combine(grad recv_x); grad topk_weights = combined grad recv_topk_weights
  (entries whose expert is not on the receiving rank did not depend on the input weight).
- combine: grad x = cached dispatch of grad combined_x (and of grad combined_topk_weights for
  the weights); grad of each bias = grad combined_x.
- low_latency_dispatch (BF16): grad x = sum over the token's copies (a low-latency combine with
  weight 1 on the first occurrence of each expert).
- low_latency_combine: grad x = weighted low-latency cached dispatch of grad; grad weights =
  ⟨grad[t], x[e_k][slot(t, k)]⟩ from a low-latency gather.
"""

from __future__ import annotations

import torch

_ops = torch.ops.deep_ep
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


# --- normal mode ---------------------------------------------------------------------------


def _setup_dispatch(ctx, inputs, output):
    # inputs: x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
    # num_tokens_per_expert, buffer, expert_alignment, [num_worst_tokens,] config
    ctx.buffer, ctx.config = inputs[7], inputs[-1]
    ctx.num_inputs = len(inputs)
    ctx.num_worst_tokens = inputs[9] if len(inputs) == 11 else 0
    ctx.has_weights = inputs[3] is not None
    ctx.x_dtype = inputs[0].dtype
    recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights = output[:4]
    ctx.mark_non_differentiable(recv_x_scales, *output[4:])
    if ctx.x_dtype not in _FLOATS:  # an FP8 payload carries no gradient
        ctx.mark_non_differentiable(recv_x)
    ctx.save_for_backward(recv_x, recv_topk_idx, recv_topk_weights, *output[5:9], inputs[5], output[9])


def _backward_dispatch(ctx, grad_recv_x, grad_scales, grad_topk_idx, grad_recv_topk_weights,
                       *unused):
    recv_x, recv_topk_idx, recv_topk_weights, *handle = ctx.saved_tensors
    grad_weights = None
    if ctx.has_weights:
        grad_weights = _zeros_if_none(grad_recv_topk_weights, recv_topk_weights)
        grad_weights = torch.where(recv_topk_idx >= 0, grad_weights, 0)
    if ctx.x_dtype in _FLOATS:
        grad_recv_x = _zeros_if_none(grad_recv_x, recv_x)
    else:  # FP8 payload: only the weights are differentiable
        grad_recv_x = recv_x.new_zeros(recv_x.shape, dtype=torch.float32)
    grad_x, grad_topk_weights = _ops.combine(
        grad_recv_x, grad_weights, None, None, *handle, ctx.buffer, ctx.num_worst_tokens,
        ctx.config,
    )
    grads = [None] * ctx.num_inputs
    grads[0] = grad_x if ctx.x_dtype in _FLOATS else None
    grads[3] = grad_topk_weights if ctx.has_weights else None
    return tuple(grads)


def _setup_cached_dispatch(ctx, inputs, output):
    ctx.buffer, ctx.num_worst_tokens, ctx.config = inputs[9], inputs[10], inputs[11]
    ctx.has_weights = inputs[2] is not None
    ctx.save_for_backward(output[0], output[2], *inputs[3:9])


def _backward_cached_dispatch(ctx, grad_recv_x, grad_scales, grad_recv_topk_weights):
    recv_x, recv_topk_weights, *handle = ctx.saved_tensors
    weights = _zeros_if_none(grad_recv_topk_weights, recv_topk_weights) if ctx.has_weights else None
    grad_x, grad_weights = _ops.combine(
        _zeros_if_none(grad_recv_x, recv_x), weights, None, None, *handle, ctx.buffer,
        ctx.num_worst_tokens, ctx.config,
    )
    return (grad_x, None, grad_weights if ctx.has_weights else None) + (None,) * 9


def _setup_combine(ctx, inputs, output):
    ctx.buffer, ctx.num_worst_tokens, ctx.config = inputs[10], inputs[11], inputs[12]
    ctx.has_weights = inputs[1] is not None
    ctx.bias_dtypes = [None if b is None else b.dtype for b in inputs[2:4]]
    ctx.save_for_backward(output[0], output[1], *inputs[4:10])


def _backward_combine(ctx, grad_combined_x, grad_combined_topk_weights):
    combined_x, combined_weights, *handle = ctx.saved_tensors
    grad_combined_x = _zeros_if_none(grad_combined_x, combined_x)
    weights = (
        _zeros_if_none(grad_combined_topk_weights, combined_weights) if ctx.has_weights else None
    )
    grad_x, _, grad_weights = _ops.cached_dispatch(
        grad_combined_x, None, weights, *handle, ctx.buffer, ctx.num_worst_tokens, ctx.config
    )
    grad_biases = [None if d is None else grad_combined_x.to(d) for d in ctx.bias_dtypes]
    return (grad_x, grad_weights if ctx.has_weights else None, *grad_biases) + (None,) * 9


# --- low-latency mode ----------------------------------------------------------------------


def _first_occurrence(topk_idx: torch.Tensor) -> torch.Tensor:
    """``[T, K]`` bool: ``topk_idx[t, k] >= 0`` and no earlier ``k'`` names the same expert."""
    num_topk = topk_idx.size(1)
    earlier = torch.ones(num_topk, num_topk, dtype=torch.bool, device=topk_idx.device).tril(-1)
    repeated = ((topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)) & earlier).any(2)
    return (topk_idx >= 0) & ~repeated


def _setup_low_latency_dispatch(ctx, inputs, output):
    x, topk_idx, buffer, num_ranks, num_max, num_experts, use_fp8 = inputs[:7]
    ctx.args = (buffer, num_ranks, num_max, num_experts)
    ctx.use_fp8 = use_fp8
    ctx.weight_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ctx.save_for_backward(topk_idx, output[3], output[4])


def _backward_low_latency_dispatch(ctx, grad_recv_x, *unused):
    if ctx.use_fp8:
        raise RuntimeError(
            "deep_ep::low_latency_dispatch with use_fp8=True is not differentiable (its output "
            "is float8); dispatch in BF16 (use_fp8=False) to train through it"
        )
    topk_idx, src_info, layout_range = ctx.saved_tensors
    ones = _first_occurrence(topk_idx).to(ctx.weight_dtype)
    grad_x = _ops.low_latency_combine(
        grad_recv_x, topk_idx, ones, src_info, layout_range, *ctx.args, False
    )
    return (grad_x,) + (None,) * 8


def _setup_low_latency_combine(ctx, inputs, output):
    x, topk_idx, topk_weights, src_info, layout_range, *args = inputs
    ctx.args = tuple(args[:4])  # buffer, num_ranks, num_max, num_experts
    ctx.save_for_backward(x, topk_idx, topk_weights, src_info, layout_range)


def _backward_low_latency_combine(ctx, grad_combined):
    x, topk_idx, topk_weights, src_info, layout_range = ctx.saved_tensors
    grad_x = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.low_latency_cached_dispatch(
            grad_combined, topk_idx, topk_weights, src_info, layout_range, *ctx.args
        )
    if ctx.needs_input_grad[2]:
        rows = _ops.low_latency_gather(x, topk_idx, src_info, layout_range, *ctx.args)
        acc = torch.float64 if torch.float64 in (x.dtype, topk_weights.dtype) else torch.float32
        grad_weights = (rows.to(acc) * grad_combined.to(acc).unsqueeze(1)).sum(-1)
        grad_weights = torch.where(topk_idx >= 0, grad_weights, 0).to(topk_weights.dtype)
    return (grad_x, None, grad_weights) + (None,) * 7


def register() -> None:
    for name, backward, setup in (
        ("dispatch", _backward_dispatch, _setup_dispatch),
        ("capacity_dispatch", _backward_dispatch, _setup_dispatch),
        ("cached_dispatch", _backward_cached_dispatch, _setup_cached_dispatch),
        ("combine", _backward_combine, _setup_combine),
        ("low_latency_dispatch", _backward_low_latency_dispatch, _setup_low_latency_dispatch),
        ("low_latency_combine", _backward_low_latency_combine, _setup_low_latency_combine),
    ):
        torch.library.register_autograd(f"deep_ep::{name}", backward, setup_context=setup)
