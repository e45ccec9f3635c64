"""Every op's expanded schema, pinned: a schema change (an argument renamed, reordered, added,
an alias annotation changed) shows here in review, together with what it breaks.

The autograd formulas (``_autograd.py`` and the C++ ones in ``csrc/autograd.h``'s users) read
arguments and return gradients by these names; the fakes, the reference and the kernels take
them in this order. Accept a deliberate change with ``EXPECTTEST_ACCEPT=1 python -m pytest
tests/test_schemas.py``.
"""

import os

import expecttest
import torch

import deep_ep_ops  # noqa: F401  (defines the ops)
from deep_ep_ops import _library
from deep_ep_ops._library import SCHEMAS


def _expanded_schemas() -> str:
    """One block per op: its name, one argument per line, then its returns (no argument type
    of these schemas holds a comma, so splitting the printed schema at ", " is exact)."""
    blocks = []
    for name in sorted(SCHEMAS):
        head, returns = str(getattr(torch.ops.deep_ep, name).default._schema).split(") -> ")
        qualified, arguments = head.split("(", 1)
        lines = "".join(f"    {a},\n" for a in arguments.split(", "))
        blocks.append(f"{qualified}(\n{lines}) -> {returns}\n")
    return "".join(blocks)


class TestSchemas(expecttest.TestCase):
    def test_every_schema(self):
        self.assertExpectedInline(_expanded_schemas(), """\
deep_ep::cached_dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor? topk_weights,
    Tensor rank_prefix_matrix,
    Tensor channel_prefix_matrix,
    Tensor recv_channel_prefix_matrix,
    Tensor recv_src_idx,
    Tensor is_token_in_rank,
    Tensor send_head,
    str buffer,
    int num_worst_tokens,
    int[] config,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights)
deep_ep::capacity_dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor? topk_idx,
    Tensor? topk_weights,
    Tensor num_tokens_per_rank,
    Tensor is_token_in_rank,
    Tensor? num_tokens_per_expert,
    str buffer,
    int expert_alignment,
    int num_worst_tokens,
    int[] config,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix, Tensor channel_prefix_matrix, Tensor recv_channel_prefix_matrix, Tensor recv_src_idx, Tensor send_head)
deep_ep::clean_low_latency_buffer(
    Tensor(a!) workspace,
    str buffer,
    int num_max_dispatch_tokens_per_rank,
    int hidden,
    int num_experts,
) -> ()
deep_ep::combine(
    Tensor x,
    Tensor? topk_weights,
    Tensor? bias_0,
    Tensor? bias_1,
    Tensor rank_prefix_matrix,
    Tensor channel_prefix_matrix,
    Tensor recv_channel_prefix_matrix,
    Tensor recv_src_idx,
    Tensor is_token_in_rank,
    Tensor send_head,
    str buffer,
    int num_worst_tokens,
    int[] config,
) -> (Tensor combined_x, Tensor combined_topk_weights)
deep_ep::dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor? topk_idx,
    Tensor? topk_weights,
    Tensor num_tokens_per_rank,
    Tensor is_token_in_rank,
    Tensor? num_tokens_per_expert,
    str buffer,
    int expert_alignment,
    int[] config,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix, Tensor channel_prefix_matrix, Tensor recv_channel_prefix_matrix, Tensor recv_src_idx, Tensor send_head)
deep_ep::get_dispatch_layout(
    Tensor topk_idx,
    int num_experts,
    int num_ranks,
    int num_rdma_ranks,
) -> (Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)
deep_ep::internode_cached_dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor? topk_weights,
    Tensor is_token_in_rank,
    Tensor rdma_channel_prefix_matrix,
    Tensor gbl_channel_prefix_matrix,
    Tensor recv_rdma_channel_prefix_matrix,
    Tensor recv_rdma_rank_prefix_sum,
    Tensor recv_gbl_channel_prefix_matrix,
    Tensor recv_gbl_rank_prefix_sum,
    Tensor recv_src_meta,
    Tensor send_rdma_head,
    Tensor send_nvl_head,
    str buffer,
    int num_worst_tokens,
    int[] config,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights)
deep_ep::internode_capacity_dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor? topk_idx,
    Tensor? topk_weights,
    Tensor num_tokens_per_rank,
    Tensor num_tokens_per_rdma_rank,
    Tensor is_token_in_rank,
    Tensor? num_tokens_per_expert,
    str buffer,
    int expert_alignment,
    int num_worst_tokens,
    int[] config,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rdma_channel_prefix_matrix, Tensor gbl_channel_prefix_matrix, Tensor recv_rdma_channel_prefix_matrix, Tensor recv_rdma_rank_prefix_sum, Tensor recv_gbl_channel_prefix_matrix, Tensor recv_gbl_rank_prefix_sum, Tensor recv_src_meta, Tensor send_rdma_head, Tensor send_nvl_head)
deep_ep::internode_combine(
    Tensor x,
    Tensor? topk_weights,
    Tensor? bias_0,
    Tensor? bias_1,
    Tensor is_token_in_rank,
    Tensor rdma_channel_prefix_matrix,
    Tensor gbl_channel_prefix_matrix,
    Tensor recv_rdma_channel_prefix_matrix,
    Tensor recv_rdma_rank_prefix_sum,
    Tensor recv_gbl_channel_prefix_matrix,
    Tensor recv_gbl_rank_prefix_sum,
    Tensor recv_src_meta,
    Tensor send_rdma_head,
    Tensor send_nvl_head,
    str buffer,
    int num_worst_tokens,
    int[] config,
) -> (Tensor combined_x, Tensor combined_topk_weights)
deep_ep::internode_dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor? topk_idx,
    Tensor? topk_weights,
    Tensor num_tokens_per_rank,
    Tensor num_tokens_per_rdma_rank,
    Tensor is_token_in_rank,
    Tensor? num_tokens_per_expert,
    str buffer,
    int expert_alignment,
    int[] config,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rdma_channel_prefix_matrix, Tensor gbl_channel_prefix_matrix, Tensor recv_rdma_channel_prefix_matrix, Tensor recv_rdma_rank_prefix_sum, Tensor recv_gbl_channel_prefix_matrix, Tensor recv_gbl_rank_prefix_sum, Tensor recv_src_meta, Tensor send_rdma_head, Tensor send_nvl_head)
deep_ep::low_latency_cached_dispatch(
    Tensor x,
    Tensor topk_idx,
    Tensor topk_weights,
    Tensor src_info,
    Tensor layout_range,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
) -> Tensor
deep_ep::low_latency_combine(
    Tensor x,
    Tensor topk_idx,
    Tensor topk_weights,
    Tensor src_info,
    Tensor layout_range,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
    bool zero_copy,
) -> Tensor
deep_ep::low_latency_combine_out(
    Tensor x,
    Tensor topk_idx,
    Tensor topk_weights,
    Tensor src_info,
    Tensor layout_range,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
    bool zero_copy,
    Tensor(a!) out,
) -> ()
deep_ep::low_latency_combine_recv(
    Tensor(a!) combined_x,
    Tensor topk_idx,
    Tensor topk_weights,
    str buffer,
) -> ()
deep_ep::low_latency_combine_send(
    Tensor x,
    Tensor topk_idx,
    Tensor topk_weights,
    Tensor src_info,
    Tensor layout_range,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
    bool zero_copy,
) -> Tensor
deep_ep::low_latency_dispatch(
    Tensor x,
    Tensor topk_idx,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
    bool use_fp8,
    bool round_scale,
    bool use_ue8m0,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, Tensor layout_range)
deep_ep::low_latency_dispatch_recv(
    Tensor(a!) recv_x,
    Tensor(b!) recv_x_scales,
    Tensor(c!) recv_count,
    Tensor(d!) src_info,
    Tensor(e!) layout_range,
    Tensor(f!)? cumulative_local_expert_recv_stats,
    str buffer,
) -> ()
deep_ep::low_latency_dispatch_send(
    Tensor x,
    Tensor topk_idx,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
    bool use_fp8,
    bool round_scale,
    bool use_ue8m0,
) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, Tensor layout_range)
deep_ep::low_latency_gather(
    Tensor x,
    Tensor topk_idx,
    Tensor src_info,
    Tensor layout_range,
    str buffer,
    int num_ranks,
    int num_max_dispatch_tokens_per_rank,
    int num_experts,
) -> Tensor
deep_ep::per_token_cast_back(
    Tensor x_fp8,
    Tensor x_scales,
) -> Tensor
deep_ep::per_token_cast_to_fp8(
    Tensor x,
    bool round_scale,
    bool use_ue8m0,
) -> (Tensor x_fp8, Tensor x_scales)
""")

    def test_every_registered_op_is_in_the_schema_table(self):
        registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                      if n.startswith("deep_ep::")}
        assert registered == set(SCHEMAS), registered ^ set(SCHEMAS)


def test_gradients_are_returned_by_name():
    """``_autograd._grads`` places each gradient at its argument's schema position and refuses
    a name the schema does not have (a renamed argument fails loudly, not silently)."""
    import pytest

    from deep_ep_ops import _autograd

    names = _autograd._argument_names("combine")
    grads = _autograd._grads("combine", x="gx", bias_1="gb")
    assert len(grads) == len(names)
    assert grads[names.index("x")] == "gx" and grads[names.index("bias_1")] == "gb"
    assert sum(g is not None for g in grads) == 2
    with pytest.raises(AssertionError, match="no arguments"):
        _autograd._grads("combine", bias_2="g")


def _sample_args(name: str) -> list:
    """Arguments of the schema's types (values meaningless: the patched check raises first)."""
    values = []
    for a in getattr(torch.ops.deep_ep, name).default._schema.arguments:
        kind = str(a.type)
        values.append(
            torch.zeros(1) if kind == "Tensor" else None if kind == "Optional[Tensor]"
            else "no_buffer" if kind == "str" else [2, 1, 1, 1, 1] if kind == "List[int]"
            else False if kind == "bool" else 1
        )
    return values


class _Called(Exception):
    pass


def test_one_check_per_op_called_first_by_fake_and_reference(monkeypatch):
    """Every op has ``meta.check_<op>`` taking its schema's argument names, and both its fake
    and its reference call it before anything else: tracing and running raise alike."""
    import inspect

    from torch._subclasses.fake_tensor import FakeTensorMode

    from deep_ep_ops import _autograd, meta, reference

    for name in sorted(SCHEMAS):
        check = getattr(meta, f"check_{name}", None)
        assert check is not None, f"meta has no check_{name}"
        names = tuple(inspect.signature(check).parameters)
        assert names == _autograd._argument_names(name), name

        def called(*args, **kwargs):
            raise _Called

        monkeypatch.setattr(meta, f"check_{name}", called)
        args = _sample_args(name)
        try:
            getattr(reference, name)(*args)
        except _Called:
            pass
        else:
            raise AssertionError(f"reference.{name} did not call meta.check_{name}")
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            try:
                getattr(torch.ops.deep_ep, name)(*fake_args)
            except _Called:
                pass
            else:
                raise AssertionError(f"the fake of deep_ep::{name} did not call check_{name}")
        monkeypatch.undo()


def test_cpp_op_ids_are_generated_from_the_op_table():
    """The build writes the C++ op ids and names from the op table (an op's id is its index);
    every kOp constant csrc/ uses is one of them."""
    import glob
    import re

    from deep_ep_ops import _sources

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    assert _sources.op_names(root) == list(_library.OP_NAMES)
    text = _sources.op_table_header(_sources.op_names(root))
    generated = dict(re.findall(r"  (kOp\w+) = (\d+),", text))
    assert len(generated) == len(_library.OP_NAMES)
    for i, name in enumerate(_library.OP_NAMES):
        assert generated[_sources.op_constant(name)] == str(i)
        assert f'"deep_ep::{name}",' in text
    used = set()
    for source in glob.glob(os.path.join(root, "csrc", "**", "*.*"), recursive=True):
        if "generated" not in source:
            used |= set(re.findall(r"\bkOp[A-Z]\w*", open(source).read()))
    assert used and used <= set(generated), used - set(generated)
