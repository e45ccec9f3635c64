"""The ``deep_ep`` op table: every op's schema, written once, and nothing but strings.

Standard library only: ``deep_ep_ops/_sources.py`` loads this file by path (before anything is
built, without torch) to write ``csrc/generated/op_table.h`` (op ids and names) and
``csrc/generated/schemas.h`` (the schemas, for the C++ definition of the ops,
``csrc/ops.h``); ``deep_ep_ops/_library.py`` defines the ops from it in Python. Handle tensors
are spelled out in each schema so that no Python object crosses an op boundary; ``str buffer``
names a communicator in ``deep_ep_ops._registry``.
"""

from typing import NamedTuple, Optional

# The tensors every normal-mode handle carries, in DeepEP's positional order.
_HANDLE = (
    "Tensor rank_prefix_matrix, Tensor channel_prefix_matrix, Tensor recv_channel_prefix_matrix, "
    "Tensor recv_src_idx, Tensor is_token_in_rank, Tensor send_head"
)
# The internode handle: DeepEP's ten fields in its order (docs/DESIGN.md section 5). The one
# list of them: the schemas below, the checks (meta/), autograd and ops.InternodeHandle use it.
INTERNODE_HANDLE_FIELDS = (
    "is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
    "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
    "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
    "send_rdma_head", "send_nvl_head",
)
_INTERNODE_HANDLE = ", ".join(f"Tensor {name}" for name in INTERNODE_HANDLE_FIELDS)
# What an internode dispatch returns: its rows, then the handle but is_token_in_rank (an input).
_INTERNODE_DISPATCH_OUT = ", ".join(f"Tensor {name}" for name in (
    "recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
    "num_recv_tokens_per_expert", *INTERNODE_HANDLE_FIELDS[1:],
))
_INTERNODE_DISPATCH_ARGS = (
    "Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights,"
    " Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor is_token_in_rank,"
    " Tensor? num_tokens_per_expert, str buffer, int expert_alignment"
)
_LL_ARGS = "str buffer, int num_ranks, int num_max_dispatch_tokens_per_rank, int num_experts"
_LL_RECV = (
    "Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, Tensor layout_range"
)

_NVLINK, _NVSHMEM = "_C", "_C_nvshmem"  # the extensions: NVLink kernels, NVSHMEM kernels


class Op(NamedTuple):
    """One op: the CUDA extension with its kernel (``None``: the reference runs on CUDA too)
    and its schema."""

    kernel: Optional[str]
    schema: str


# The one table of ops. Everything else that lists ops derives from it: the reference kernels
# registered per dispatch key (every op has one, ``reference.<name>``), the CUDA ops that warn
# when they fall back for a missing extension, the ops whose kernel bindings call the reference
# for buffers without a runtime (those with a ``buffer`` argument), the effectful ops below.
OPS = {
    # Pure: no communication.
    "get_dispatch_layout": Op(_NVLINK, (
        "get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, int num_rdma_ranks)"
        " -> (Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank,"
        " Tensor num_tokens_per_expert, Tensor is_token_in_rank)"
    )),
    "per_token_cast_to_fp8": Op(None, (
        "per_token_cast_to_fp8(Tensor x, bool round_scale, bool use_ue8m0)"
        " -> (Tensor x_fp8, Tensor x_scales)"
    )),
    "per_token_cast_back": Op(None, "per_token_cast_back(Tensor x_fp8, Tensor x_scales) -> Tensor"),
    # Normal (high-throughput) mode. The number of received rows is data dependent.
    "dispatch": Op(_NVLINK, (
        "dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights,"
        " Tensor num_tokens_per_rank, Tensor is_token_in_rank, Tensor? num_tokens_per_expert,"
        " str buffer, int expert_alignment, int[] config)"
        " -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights,"
        " Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix,"
        " Tensor channel_prefix_matrix, Tensor recv_channel_prefix_matrix, Tensor recv_src_idx,"
        " Tensor send_head)"
    )),
    # Capacity mode (DeepEP's num_worst_tokens): static row count, no host sync.
    "capacity_dispatch": Op(_NVLINK, (
        "capacity_dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights,"
        " Tensor num_tokens_per_rank, Tensor is_token_in_rank, Tensor? num_tokens_per_expert,"
        " str buffer, int expert_alignment, int num_worst_tokens, int[] config)"
        " -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights,"
        " Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix,"
        " Tensor channel_prefix_matrix, Tensor recv_channel_prefix_matrix, Tensor recv_src_idx,"
        " Tensor send_head)"
    )),
    "cached_dispatch": Op(_NVLINK, (
        f"cached_dispatch(Tensor x, Tensor? x_scales, Tensor? topk_weights, {_HANDLE},"
        " str buffer, int num_worst_tokens, int[] config)"
        " -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights)"
    )),
    "combine": Op(_NVLINK, (
        f"combine(Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, {_HANDLE},"
        " str buffer, int num_worst_tokens, int[] config)"
        " -> (Tensor combined_x, Tensor combined_topk_weights)"
    )),
    # Internode normal mode (ranks on several nodes): the same rows, a handle of ten fields.
    # On CUDA the staged path (deep_ep_ops/internode_staged.py: Python over the kernels of
    # both extensions, registered where the NVSHMEM extension has the forward kernel), else
    # the reference.
    "internode_dispatch": Op(None, (
        f"internode_dispatch({_INTERNODE_DISPATCH_ARGS}, int[] config)"
        f" -> ({_INTERNODE_DISPATCH_OUT})"
    )),
    "internode_capacity_dispatch": Op(None, (
        f"internode_capacity_dispatch({_INTERNODE_DISPATCH_ARGS}, int num_worst_tokens,"
        f" int[] config) -> ({_INTERNODE_DISPATCH_OUT})"
    )),
    "internode_cached_dispatch": Op(None, (
        f"internode_cached_dispatch(Tensor x, Tensor? x_scales, Tensor? topk_weights,"
        f" {_INTERNODE_HANDLE}, str buffer, int num_worst_tokens, int[] config)"
        " -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights)"
    )),
    "internode_combine": Op(None, (
        f"internode_combine(Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1,"
        f" {_INTERNODE_HANDLE}, str buffer, int num_worst_tokens, int[] config)"
        " -> (Tensor combined_x, Tensor combined_topk_weights)"
    )),
    # Low-latency (decode) mode: static shapes everywhere.
    "low_latency_dispatch": Op(_NVSHMEM, (
        f"low_latency_dispatch(Tensor x, Tensor topk_idx, {_LL_ARGS},"
        " bool use_fp8, bool round_scale, bool use_ue8m0)"
        f" -> ({_LL_RECV})"
    )),
    "low_latency_dispatch_send": Op(_NVSHMEM, (
        f"low_latency_dispatch_send(Tensor x, Tensor topk_idx, {_LL_ARGS},"
        " bool use_fp8, bool round_scale, bool use_ue8m0)"
        f" -> ({_LL_RECV})"
    )),
    "low_latency_dispatch_recv": Op(_NVSHMEM, (
        "low_latency_dispatch_recv(Tensor(a!) recv_x, Tensor(b!) recv_x_scales,"
        " Tensor(c!) recv_count, Tensor(d!) src_info, Tensor(e!) layout_range,"
        " Tensor(f!)? cumulative_local_expert_recv_stats, str buffer) -> ()"
    )),
    "low_latency_combine": Op(_NVSHMEM, (
        "low_latency_combine(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor src_info,"
        f" Tensor layout_range, {_LL_ARGS}, bool zero_copy) -> Tensor"
    )),
    "low_latency_combine_out": Op(_NVSHMEM, (
        "low_latency_combine_out(Tensor x, Tensor topk_idx, Tensor topk_weights,"
        f" Tensor src_info, Tensor layout_range, {_LL_ARGS}, bool zero_copy,"
        " Tensor(a!) out) -> ()"
    )),
    "low_latency_combine_send": Op(_NVSHMEM, (
        "low_latency_combine_send(Tensor x, Tensor topk_idx, Tensor topk_weights,"
        f" Tensor src_info, Tensor layout_range, {_LL_ARGS}, bool zero_copy) -> Tensor"
    )),
    "low_latency_combine_recv": Op(_NVSHMEM, (
        "low_latency_combine_recv(Tensor(a!) combined_x, Tensor topk_idx, Tensor topk_weights,"
        " str buffer) -> ()"
    )),
    # Backward helpers of the low-latency ops (themselves communication ops).
    "low_latency_cached_dispatch": Op(None, (
        "low_latency_cached_dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights,"
        f" Tensor src_info, Tensor layout_range, {_LL_ARGS}) -> Tensor"
    )),
    "low_latency_gather": Op(None, (
        "low_latency_gather(Tensor x, Tensor topk_idx, Tensor src_info, Tensor layout_range,"
        f" {_LL_ARGS}) -> Tensor"
    )),
    "clean_low_latency_buffer": Op(_NVSHMEM, (
        "clean_low_latency_buffer(Tensor(a!) workspace, str buffer,"
        " int num_max_dispatch_tokens_per_rank, int hidden, int num_experts) -> ()"
    )),
}
