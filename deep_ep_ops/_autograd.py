"""Autograd of every ``deep_ep`` op (docs/DESIGN.md §7), written with ``deep_ep`` ops so backward
graphs compile.

The eager fast path on CUDA (``ops._direct``) records the same formulas from C++
(``csrc/autograd.h`` and the autograd functions in both ``ops.cpp``), so a formula changed
here must change there too; ``tests/test_cuda_direct.py`` holds the two bit-equal per call form.

The rule: every op and every ``Buffer`` call form that can be reached with an input requiring
grad either has a correct backward or raises at the call. No op is left to PyTorch's default
autograd fallback. That fallback (torch 2.13, mode ``"warn"``) redispatches the op without
excluding autograd from the kernel's own calls, so the Python reference kernels record their
local arithmetic while the collectives cut the graph: outputs require grad, backward runs and
its gradients are silently wrong (the issue: through ``Buffer``'s ``return_recv_hook`` and
``out=`` forms the experts got no gradient and grad x was 70-90% off; the fallback warns at
backward for the send halves and not at all for an op with a mutated argument such as
``low_latency_combine_out``). Every op below has an ``Autograd`` kernel, and each (but
``get_dispatch_layout``'s fallthrough, see the end) runs the op under
``torch._C._AutoDispatchBelowAutograd()`` (what ``torch.library.register_autograd`` does), so
the backend kernel (the reference registered for CPU and CUDA, or the CUDA extension) records
nothing.

Formulas:

- dispatch / capacity_dispatch: grad x = combine(grad recv_x); grad topk_weights = combined
  grad recv_topk_weights (entries whose expert is not on the receiving rank did not depend on
  the input weight). An FP8 payload (``x`` float8 with ``x_scales``) carries no gradient: only
  ``topk_weights`` is differentiable, and ``x`` or ``x_scales`` requiring grad raises.
- cached_dispatch: grad x / topk_weights = combine of the gradients along the handle (FP8 ``x``
  or ``x_scales`` requiring grad raises, as for dispatch).
- combine: grad x = cached dispatch of grad combined_x (and of grad combined_topk_weights for
  the weights); grad of each bias = grad combined_x.
- low_latency_dispatch (BF16): grad x = sum over the token's copies (a low-latency combine with
  weight 1 on the first occurrence of each expert).
- low_latency_combine: grad x = weighted low-latency cached dispatch of grad; grad weights =
  ⟨grad[t], x[e_k][slot(t, k)]⟩ from a low-latency gather.
- low_latency_cached_dispatch (the backward of low_latency_combine, linear in x and weights):
  grad x = low_latency_combine(grad, topk_idx, topk_weights) (the transpose: token t gets
  ``Σ_k w[t, k] · grad[e_k][slot(t, k)]``); grad weights = ⟨gather(grad)[t, k], x[t]⟩.
- low_latency_gather (linear in x): grad x[e][slot(t)] = Σ_{k: e_k = e} grad[t, k], i.e. one
  cached dispatch per top-k column with a one-hot weight (K collectives; the helper is only
  differentiated in double backward), accumulated in float32 (float64 for float64).
  With these two, a low-latency layer differentiates twice (double backward).
- per_token_cast_back: grad x_scales = Σ over each 128-channel group of grad · float(x_fp8)
  (float32 scales; UE8M0 int32 scales cannot require grad). The gradient with respect to the
  float8 values is not a float8 quantity: ``x_fp8`` requiring grad raises.

The split forms (DeepEP's ``return_recv_hook``):

- ``low_latency_dispatch_send`` has the backward of ``low_latency_dispatch``. Its ``src_info``
  and ``layout_range`` outputs are *pending*: ``low_latency_dispatch_recv`` fills them in place
  later (on the CUDA kernels the send leaves them unspecified; the reference fills them early).
  The backward needs the completed values, so they are kept on ``ctx`` as attributes (the very
  tensor objects the receive completes) rather than saved with ``save_for_backward``: a saved
  tensor is pinned to its version at save time, and the receive, like every in-place op, bumps
  the version counter, so ``save_for_backward`` would raise "modified by an inplace operation"
  at backward. They are
  non-differentiable outputs without ``grad_fn``, so holding them on ``ctx`` makes no cycle.
  ``topk_idx`` is an input nobody mutates and is saved normally.
- ``low_latency_combine_send`` has the backward of ``low_latency_combine``; all its saved tensors
  are inputs, which its receive does not mutate.
- The receive ops mutate the send's outputs (``Tensor(a!)``), and ``register_autograd`` refuses
  mutable ops. Their ``Autograd`` kernel runs the op below autograd, so autograd keeps seeing the
  send as the producer of the completed outputs (``recv_x.grad_fn`` stays the send's node), then
  bumps the version counters of what it mutated (so a tensor saved from the pending outputs
  before the receive, a use-before-hook bug, raises at backward instead of using stale data).
  A receive into a leaf that requires grad raises, as any in-place op on one would.

Ops that raise instead (grad mode on and an input requiring grad):

- ``low_latency_dispatch`` / ``low_latency_dispatch_send`` with ``use_fp8=True`` and ``x``
  requiring grad: the float8 ``recv_x`` has no gradient (dispatch in BF16 to train through it,
  or dispatch ``x.detach()`` / under ``torch.no_grad()`` for inference).
- ``low_latency_combine_out``: an op writing into ``out!`` cannot record a backward; use
  ``low_latency_combine`` and copy its result into ``out`` (``Buffer.low_latency_combine(...,
  out=)`` does that when gradients are needed).
- ``per_token_cast_to_fp8``: float8 values and their scales of a rounding are not
  differentiable; cast ``x.detach()``.
- ``clean_low_latency_buffer`` (a uint8 workspace): nothing to differentiate; a workspace
  requiring grad raises.

``get_dispatch_layout`` takes one int64 tensor, which cannot require grad, and returns int32/bool
counts: its ``Autograd`` kernel is a fallthrough (free on the host, unlike a Python kernel).

When they raise: ops whose call leaves state behind raise *before* they run, so nothing is sent
and nothing written (a send half pairs with a later receive: raising after it would leave the
receive queue of the buffer one send ahead; ``_out`` would have written the user's tensor).
Fused ops (``low_latency_dispatch``, ``dispatch``, ``capacity_dispatch``, ``cached_dispatch``,
``per_token_cast_back``) raise from ``setup_context``, right after the op completed: the exchange
finished on every rank, so a peer whose inputs did not need grad is not left waiting and nothing
is pending. Either way the call raises, never the backward.
"""

from __future__ import annotations

import functools
import typing

import torch

from ._library import INTERNODE_HANDLE_FIELDS

_ops = torch.ops.deep_ep
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_FP8_GROUP = 128  # channels per FP8 scale


class _Named:
    """An op's arguments (or outputs) by their schema names: ``args.x``, ``args.buffer``."""

    def __init__(self, names, values) -> None:
        if len(names) != len(values):
            raise AssertionError(f"{len(values)} values for the {len(names)} names {names}")
        self.__dict__.update(zip(names, values))


@functools.cache  # read once per op: setup_context runs on every call with grad
def _argument_names(op: str) -> tuple[str, ...]:
    return tuple(a.name for a in getattr(_ops, op).default._schema.arguments)


@functools.cache
def _return_names(op: str) -> tuple[str, ...]:
    return tuple(r.name for r in getattr(_ops, op).default._schema.returns)


def _inputs(op: str, inputs) -> _Named:
    return _Named(_argument_names(op), inputs)


def _outputs(op: str, output) -> _Named:
    output = output if isinstance(output, (tuple, list)) else (output,)
    return _Named(_return_names(op), output)


def _grads(op: str, **grads) -> tuple:
    """The gradients ``backward`` returns, one per schema argument, given by name (``None``
    for the rest). An unknown name raises: a schema edit cannot misplace a gradient."""
    names = _argument_names(op)
    unknown = set(grads) - set(names)
    if unknown:
        raise AssertionError(f"deep_ep::{op} has no arguments {sorted(unknown)}")
    return tuple(grads.get(name) for name in names)


_HANDLE_NAMES = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix",
                 "recv_src_idx", "is_token_in_rank", "send_head")


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _requires_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _needs_grad(args) -> bool:
    """What ``register_autograd`` tests: grad mode on and some tensor argument requires grad."""
    return torch.is_grad_enabled() and any(_requires_grad(a) for a in args)


def _run_below_autograd(op, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _fp8_low_latency_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"deep_ep::{op}: x requires grad but use_fp8=True, whose float8 recv_x is not "
        "differentiable; dispatch in BF16 (use_fp8=False) to train through it, or dispatch "
        "x.detach() (or under torch.no_grad()) for inference"
    )


def _check_fp8_payload(op: str, x, x_scales) -> None:
    """An FP8 payload has no gradient: ``x`` (float8) or ``x_scales`` requiring grad raises."""
    if (x.dtype not in _FLOATS and x.requires_grad) or _requires_grad(x_scales):
        raise RuntimeError(
            f"deep_ep::{op}: the FP8 payload (x of dtype {x.dtype} with x_scales) is not "
            "differentiable, but x or x_scales requires grad; pass them detached (only "
            "topk_weights is differentiable with an FP8 payload), or dispatch BF16 to train "
            "through x"
        )


# --- normal mode ---------------------------------------------------------------------------


class _Family(typing.NamedTuple):
    """The normal-mode ops of one path (intranode or internode): their handle's field names (as
    in the schemas) and the ops the formulas call."""

    handle: tuple
    combine: str
    cached_dispatch: str


_INTRANODE = _Family(_HANDLE_NAMES, "combine", "cached_dispatch")
_INTERNODE = _Family(INTERNODE_HANDLE_FIELDS, "internode_combine", "internode_cached_dispatch")


def _setup_dispatch(op: str, family: _Family = _INTRANODE):
    """The dispatches of a family (the same formula; capacity adds num_worst_tokens): the
    backward is the family's combine along the handle."""

    def setup(ctx, inputs, output):
        a, out = _inputs(op, inputs), _outputs(op, output)
        _check_fp8_payload(op, a.x, a.x_scales)
        ctx.op, ctx.family, ctx.buffer, ctx.config = op, family, a.buffer, a.config
        ctx.num_worst_tokens = getattr(a, "num_worst_tokens", 0)
        ctx.has_weights = a.topk_weights is not None
        ctx.x_dtype = a.x.dtype
        handle = {**{n: getattr(out, n) for n in family.handle if n != "is_token_in_rank"},
                  "is_token_in_rank": a.is_token_in_rank}
        ctx.mark_non_differentiable(
            out.recv_x_scales, out.num_recv_tokens_per_expert, out.recv_topk_idx,
            *(t for n, t in handle.items() if n != "is_token_in_rank"),
        )
        if ctx.x_dtype not in _FLOATS:  # an FP8 payload carries no gradient
            ctx.mark_non_differentiable(out.recv_x)
        ctx.save_for_backward(out.recv_x, out.recv_topk_idx, out.recv_topk_weights,
                              *(handle[n] for n in family.handle))

    return setup


def _handle_args(ctx, handle) -> dict:
    return dict(zip(ctx.family.handle, handle), buffer=ctx.buffer,
                num_worst_tokens=ctx.num_worst_tokens, config=ctx.config)


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
    grad_x, grad_topk_weights = getattr(_ops, ctx.family.combine)(
        x=grad_recv_x, topk_weights=grad_weights, bias_0=None, bias_1=None,
        **_handle_args(ctx, handle),
    )
    return _grads(ctx.op, x=grad_x if ctx.x_dtype in _FLOATS else None,
                  topk_weights=grad_topk_weights if ctx.has_weights else None)


def _setup_cached_dispatch(op: str = "cached_dispatch", family: _Family = _INTRANODE):
    def setup(ctx, inputs, output):
        a, out = _inputs(op, inputs), _outputs(op, output)
        _check_fp8_payload(op, a.x, a.x_scales)
        ctx.op, ctx.family = op, family
        ctx.buffer, ctx.num_worst_tokens, ctx.config = a.buffer, a.num_worst_tokens, a.config
        ctx.has_weights = a.topk_weights is not None
        ctx.mark_non_differentiable(out.recv_x_scales)
        ctx.save_for_backward(out.recv_x, out.recv_topk_weights,
                              *(getattr(a, n) for n in family.handle))

    return setup


def _backward_cached_dispatch(ctx, grad_recv_x, grad_scales, grad_recv_topk_weights):
    recv_x, recv_topk_weights, *handle = ctx.saved_tensors
    weights = _zeros_if_none(grad_recv_topk_weights, recv_topk_weights) if ctx.has_weights else None
    grad_x, grad_weights = getattr(_ops, ctx.family.combine)(
        x=_zeros_if_none(grad_recv_x, recv_x), topk_weights=weights, bias_0=None, bias_1=None,
        **_handle_args(ctx, handle),
    )
    return _grads(ctx.op, x=grad_x, topk_weights=grad_weights if ctx.has_weights else None)


def _setup_combine(op: str = "combine", family: _Family = _INTRANODE):
    def setup(ctx, inputs, output):
        a, out = _inputs(op, inputs), _outputs(op, output)
        ctx.op, ctx.family = op, family
        ctx.buffer, ctx.num_worst_tokens, ctx.config = a.buffer, a.num_worst_tokens, a.config
        ctx.has_weights = a.topk_weights is not None
        ctx.bias_dtypes = {n: getattr(a, n).dtype for n in ("bias_0", "bias_1")
                           if getattr(a, n) is not None}
        ctx.save_for_backward(out.combined_x, out.combined_topk_weights,
                              *(getattr(a, n) for n in family.handle))

    return setup


def _backward_combine(ctx, grad_combined_x, grad_combined_topk_weights):
    combined_x, combined_weights, *handle = ctx.saved_tensors
    grad_combined_x = _zeros_if_none(grad_combined_x, combined_x)
    weights = (
        _zeros_if_none(grad_combined_topk_weights, combined_weights) if ctx.has_weights else None
    )
    grad_x, _, grad_weights = getattr(_ops, ctx.family.cached_dispatch)(
        x=grad_combined_x, x_scales=None, topk_weights=weights, **_handle_args(ctx, handle)
    )
    grad_biases = {n: grad_combined_x.to(d) for n, d in ctx.bias_dtypes.items()}
    return _grads(ctx.op, x=grad_x, topk_weights=grad_weights if ctx.has_weights else None,
                  **grad_biases)


# --- low-latency mode ----------------------------------------------------------------------


def _first_occurrence(topk_idx: torch.Tensor) -> torch.Tensor:
    """``[T, K]`` bool: ``topk_idx[t, k] >= 0`` and no earlier ``k'`` names the same expert."""
    num_topk = topk_idx.size(1)
    earlier = torch.ones(num_topk, num_topk, dtype=torch.bool, device=topk_idx.device).tril(-1)
    repeated = ((topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)) & earlier).any(2)
    return (topk_idx >= 0) & ~repeated


def _weight_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


_LL_NAMES = ("buffer", "num_ranks", "num_max_dispatch_tokens_per_rank", "num_experts")


def _low_latency_args(a: _Named) -> dict:
    """The arguments every low-latency op takes after its tensors, by name."""
    return {n: getattr(a, n) for n in _LL_NAMES}


def _setup_low_latency_dispatch(ctx, inputs, output, op="low_latency_dispatch",
                                pending_handle=False):
    a, out = _inputs(op, inputs), _outputs(op, output)
    if a.use_fp8 and a.x.requires_grad:
        raise _fp8_low_latency_error("low_latency_dispatch")
    ctx.op, ctx.ll_args = op, _low_latency_args(a)
    ctx.weight_dtype = _weight_dtype(a.x.dtype)
    ctx.mark_non_differentiable(out.recv_x_scales, out.recv_count, out.src_info, out.layout_range)
    if pending_handle:  # completed in place by the receive: see the module docstring
        ctx.save_for_backward(a.topk_idx)
        ctx.pending_handle = (out.src_info, out.layout_range)
    else:
        ctx.save_for_backward(a.topk_idx, out.src_info, out.layout_range)
        ctx.pending_handle = None


def _backward_low_latency_dispatch(ctx, grad_recv_x, *unused):
    if ctx.pending_handle is None:
        topk_idx, src_info, layout_range = ctx.saved_tensors
    else:
        (topk_idx,), (src_info, layout_range) = ctx.saved_tensors, ctx.pending_handle
    ones = _first_occurrence(topk_idx).to(ctx.weight_dtype)
    grad_x = _ops.low_latency_combine(
        x=grad_recv_x, topk_idx=topk_idx, topk_weights=ones, src_info=src_info,
        layout_range=layout_range, zero_copy=False, **ctx.ll_args,
    )
    return _grads(ctx.op, x=grad_x)


class _LowLatencyDispatchSend(torch.autograd.Function):
    """``low_latency_dispatch_send`` with the backward of ``low_latency_dispatch``.

    Not ``register_autograd``: the FP8 check must come before the send runs (see the module
    docstring), and ``register_autograd`` only offers ``setup_context``, after it.
    """

    @staticmethod
    def forward(ctx, *args):
        output = _run_below_autograd(_ops.low_latency_dispatch_send.default, args)
        _setup_low_latency_dispatch(ctx, args, output, op="low_latency_dispatch_send",
                                    pending_handle=True)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward_low_latency_dispatch(ctx, *grads)


def _low_latency_dispatch_send_autograd(*args):
    if not _needs_grad(args):
        return _run_below_autograd(_ops.low_latency_dispatch_send.default, args)
    if _inputs("low_latency_dispatch_send", args).use_fp8:  # raise before anything is sent
        raise _fp8_low_latency_error("low_latency_dispatch_send")
    return _LowLatencyDispatchSend.apply(*args)


def _setup_low_latency_combine(op: str):
    """``low_latency_combine`` and its send half (the same formula)."""

    def setup(ctx, inputs, output):
        a = _inputs(op, inputs)
        ctx.op, ctx.ll_args = op, _low_latency_args(a)
        ctx.save_for_backward(a.x, a.topk_idx, a.topk_weights, a.src_info, a.layout_range)

    return setup


def _gather_products(ctx, rows_of, other, acc, topk_weights, routes):
    """``⟨gather(rows_of)[t, k], other[t]⟩`` in ``acc``, masked to ``topk_idx >= 0``: the
    weights' gradient of a weighted low-latency combine or cached dispatch."""
    rows = _ops.low_latency_gather(x=rows_of, **routes, **ctx.ll_args)
    topk_idx = routes["topk_idx"]
    grad = (rows.to(acc) * other.to(acc).unsqueeze(1)).sum(-1)
    return torch.where(topk_idx >= 0, grad, 0).to(topk_weights.dtype)


def _backward_low_latency_combine(ctx, grad_combined):
    x, topk_idx, topk_weights, src_info, layout_range = ctx.saved_tensors
    routes = dict(topk_idx=topk_idx, src_info=src_info, layout_range=layout_range)
    grad_x = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.low_latency_cached_dispatch(
            x=grad_combined, topk_weights=topk_weights, **routes, **ctx.ll_args
        )
    if ctx.needs_input_grad[2]:
        acc = _weight_dtype(x.dtype, topk_weights.dtype)
        grad_weights = _gather_products(ctx, x, grad_combined, acc, topk_weights, routes)
    return _grads(ctx.op, x=grad_x, topk_weights=grad_weights)


def _setup_low_latency_cached_dispatch(ctx, inputs, output):
    a = _inputs("low_latency_cached_dispatch", inputs)
    ctx.ll_args = _low_latency_args(a)
    ctx.save_for_backward(a.x, a.topk_idx, a.topk_weights, a.src_info, a.layout_range)


def _backward_low_latency_cached_dispatch(ctx, grad):
    x, topk_idx, topk_weights, src_info, layout_range = ctx.saved_tensors
    routes = dict(topk_idx=topk_idx, src_info=src_info, layout_range=layout_range)
    grad_x = grad_weights = None
    if ctx.needs_input_grad[0]:  # the transpose of a weighted cached dispatch: a combine
        grad_x = _ops.low_latency_combine(
            x=grad, topk_weights=topk_weights, zero_copy=False, **routes, **ctx.ll_args
        ).to(x.dtype)
    if ctx.needs_input_grad[2]:
        acc = _weight_dtype(x.dtype, grad.dtype, topk_weights.dtype)
        grad_weights = _gather_products(ctx, grad, x, acc, topk_weights, routes)
    return _grads("low_latency_cached_dispatch", x=grad_x, topk_weights=grad_weights)


def _setup_low_latency_gather(ctx, inputs, output):
    a = _inputs("low_latency_gather", inputs)
    ctx.ll_args = _low_latency_args(a)
    ctx.x_dtype = a.x.dtype
    ctx.save_for_backward(a.topk_idx, a.src_info, a.layout_range)


def _backward_low_latency_gather(ctx, grad):
    topk_idx, src_info, layout_range = ctx.saved_tensors
    acc = _weight_dtype(ctx.x_dtype, grad.dtype)
    columns = torch.arange(topk_idx.size(1), device=topk_idx.device)
    grad_x = None
    for k in range(topk_idx.size(1)):  # same count on every rank: K is the same everywhere
        one_hot = (columns == k).to(acc).expand(topk_idx.shape)
        part = _ops.low_latency_cached_dispatch(
            x=grad[:, k].to(acc), topk_idx=topk_idx, topk_weights=one_hot, src_info=src_info,
            layout_range=layout_range, **ctx.ll_args,
        )
        grad_x = part if grad_x is None else grad_x + part
    return _grads("low_latency_gather", x=grad_x.to(ctx.x_dtype))


# --- FP8 casts -----------------------------------------------------------------------------


def _setup_per_token_cast_back(ctx, inputs, output):
    a = _inputs("per_token_cast_back", inputs)
    x_fp8, x_scales = a.x_fp8, a.x_scales
    if x_fp8.requires_grad:
        raise RuntimeError(
            "deep_ep::per_token_cast_back: x_fp8 requires grad, but a gradient with respect to "
            "float8 values is not defined; pass x_fp8.detach() (x_scales may require grad)"
        )
    ctx.save_for_backward(x_fp8)
    ctx.scales_dtype = x_scales.dtype


def _backward_per_token_cast_back(ctx, grad):
    (x_fp8,) = ctx.saved_tensors
    products = grad.float() * x_fp8.float()  # [..., H]: any leading dims
    groups = products.reshape(*x_fp8.shape[:-1], -1, _FP8_GROUP)
    return _grads("per_token_cast_back", x_scales=groups.sum(-1).to(ctx.scales_dtype))


# --- ops without a formula -----------------------------------------------------------------


def _completing_kernel(name: str):
    """``Autograd`` kernel of a receive half: the op below autograd, then version bumps.

    On the decode hot path: kept to what it must do (a fallthrough would be cheaper by about
    2 us per call, but would leave the backend's own ops under autograd and bump nothing).
    """
    op = getattr(_ops, name).default
    # The arguments the schema declares written (``Tensor(a!)``), by position in the schema.
    mutated = [i for i, a in enumerate(op._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]

    def kernel(*args):
        completed = [args[i] for i in mutated if args[i] is not None]
        if torch.is_grad_enabled():
            for t in completed:
                if t.requires_grad and t.is_leaf:
                    raise RuntimeError(
                        f"deep_ep::{name} completes its arguments in place, and one of them is "
                        "a leaf tensor that requires grad; pass the outputs of the matching "
                        "send half"
                    )
        with torch._C._AutoDispatchBelowAutograd():
            op(*args)
        torch._C._increment_version(completed)

    return kernel


_NO_FORMULA = {
    "low_latency_combine_out": (
        "an op writing into out cannot record a backward; use deep_ep::low_latency_combine "
        "(the functional form) and copy the result into out, or Buffer.low_latency_combine("
        "..., out=out), which does that when gradients are needed"
    ),
    "per_token_cast_to_fp8": (
        "its float8 values and scales are not differentiable; cast x.detach() (or under "
        "torch.no_grad())"
    ),
    "clean_low_latency_buffer": "resetting the workspace is not differentiable",
}


def _raising_kernel(name: str, reason: str):
    """``Autograd`` kernel of an op without a formula: raise before it runs if a gradient
    would be needed, else run it below autograd."""
    op = getattr(_ops, name).default

    def kernel(*args):
        if _needs_grad(args):
            names = [a.name for a in op._schema.arguments]
            which = ", ".join(n for n, a in zip(names, args) if _requires_grad(a))
            verb = "requires" if "," not in which else "require"
            raise RuntimeError(f"deep_ep::{name}: {which} {verb} grad, but {reason}")
        return _run_below_autograd(op, args)

    return kernel


def register() -> None:
    from ._library import LIB as lib

    for name, backward, setup in (
        ("dispatch", _backward_dispatch, _setup_dispatch("dispatch")),
        ("capacity_dispatch", _backward_dispatch, _setup_dispatch("capacity_dispatch")),
        ("cached_dispatch", _backward_cached_dispatch, _setup_cached_dispatch()),
        ("combine", _backward_combine, _setup_combine()),
        ("internode_dispatch", _backward_dispatch,
         _setup_dispatch("internode_dispatch", _INTERNODE)),
        ("internode_capacity_dispatch", _backward_dispatch,
         _setup_dispatch("internode_capacity_dispatch", _INTERNODE)),
        ("internode_cached_dispatch", _backward_cached_dispatch,
         _setup_cached_dispatch("internode_cached_dispatch", _INTERNODE)),
        ("internode_combine", _backward_combine, _setup_combine("internode_combine", _INTERNODE)),
        ("low_latency_dispatch", _backward_low_latency_dispatch, _setup_low_latency_dispatch),
        ("low_latency_combine", _backward_low_latency_combine,
         _setup_low_latency_combine("low_latency_combine")),
        ("low_latency_combine_send", _backward_low_latency_combine,
         _setup_low_latency_combine("low_latency_combine_send")),
        ("low_latency_cached_dispatch", _backward_low_latency_cached_dispatch,
         _setup_low_latency_cached_dispatch),
        ("low_latency_gather", _backward_low_latency_gather, _setup_low_latency_gather),
        ("per_token_cast_back", _backward_per_token_cast_back, _setup_per_token_cast_back),
    ):
        torch.library.register_autograd(f"deep_ep::{name}", backward, setup_context=setup)
    lib.impl("low_latency_dispatch_send", _low_latency_dispatch_send_autograd, "Autograd")
    for name in ("low_latency_dispatch_recv", "low_latency_combine_recv"):
        lib.impl(name, _completing_kernel(name), "Autograd")
    for name, reason in _NO_FORMULA.items():
        lib.impl(name, _raising_kernel(name, reason), "Autograd")
    # Its one tensor input is int64, which cannot require grad: autograd has nothing to do.
    lib.impl("get_dispatch_layout", torch.library.fallthrough_kernel, "Autograd")
