"""The DeepEP-style script (tests/deepep_style.py) runs unchanged and gives DeepEP's semantics.

Every result is checked against the independent oracle (tests/oracle.py) on the inputs that all
ranks generated, at 1, 2 and 4 ranks.
"""

import dataclasses

import pytest
import torch

import deep_ep_ops as deep_ep
import deepep_style
import oracle
from distributed import run_on_ranks


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_deepep_script_matches_oracle(num_ranks):
    results = run_on_ranks(num_ranks, deepep_style.run)
    num_experts, num_max = 16, 32
    xs = [r["x"] for r in results]
    topk = [r["topk_idx"] for r in results]
    weights = [r["topk_weights"] for r in results]
    expected = oracle.dispatch(xs, topk, weights, num_experts)
    capacity = oracle.dispatch(xs, topk, weights, num_experts, num_worst_tokens=24 * num_ranks)
    fp8 = [oracle.per_token_cast_to_fp8(x) for x in xs]
    expected_fp8 = oracle.dispatch(
        [v for v, _ in fp8], topk, weights, num_experts, x_scales=[s for _, s in fp8]
    )
    combined = oracle.combine(
        [e["recv_x"] for e in expected], expected, [x.size(0) for x in xs],
        recv_topk_weights=[e["recv_topk_weights"] for e in expected],
    )
    cap_combined = oracle.combine([c["recv_x"] for c in capacity], capacity, [24] * num_ranks)
    ll_fp8 = oracle.low_latency_dispatch(xs, topk, num_experts, num_max)
    ll_bf16 = oracle.low_latency_dispatch(xs, topk, num_experts, num_max, use_fp8=False)
    ll_combined = oracle.low_latency_combine(
        [r["recv_x"] for r in ll_bf16], ll_bf16, topk, weights
    )
    for rank, got in enumerate(results):
        want = expected[rank]
        assert torch.equal(got["recv_x"], want["recv_x"])
        assert torch.equal(got["recv_topk_idx"], want["recv_topk_idx"])
        assert torch.equal(got["recv_topk_weights"], want["recv_topk_weights"])
        assert torch.equal(got["recv_src_idx"], want["recv_src_idx"])
        assert got["num_recv_tokens_per_expert_list"] == want["num_recv_tokens_per_expert"].tolist()
        assert got["num_tokens_per_rdma_rank"] is None and got["handle_len"] == 7
        assert torch.equal(got["combined_x"], combined[rank]["combined_x"])
        assert torch.equal(got["combined_topk_weights"], combined[rank]["combined_topk_weights"])
        # DeepEP's own check: combining the dispatched x gives x times its number of ranks.
        sent_to = got["is_token_in_rank"].sum(1, keepdim=True).float()
        assert torch.equal(got["combined_x"], (got["x"].float() * sent_to).bfloat16())
        assert torch.equal(_bits(got["recv_fp8"]), _bits(expected_fp8[rank]["recv_x"]))
        assert torch.equal(got["recv_scales"], expected_fp8[rank]["recv_x_scales"])
        assert torch.equal(got["cached_x"], want["recv_x"]) and got["cached_topk_idx"] is None
        assert got["cap_rows"] == 24 * num_ranks and got["cap_list"] == []
        assert torch.equal(got["cap_combined"], cap_combined[rank]["combined_x"])

        # Low latency: identical rows per expert, counts, layout and scales.
        recv_fp8, scales = got["ll_fp8"]
        want_ll = ll_fp8[rank]
        assert torch.equal(got["ll_count"], want_ll["recv_count"])
        assert torch.equal(got["ll_stats"], want_ll["recv_count"])
        assert torch.equal(got["ll_src_info"], want_ll["src_info"])
        assert torch.equal(got["ll_layout_range"], want_ll["layout_range"])
        assert scales.stride(1) == 1  # column-major scales
        assert got["ll_hook"] is None
        for expert, count in enumerate(want_ll["recv_count"].tolist()):
            assert torch.equal(_bits(recv_fp8[expert, :count]), _bits(want_ll["recv_x"][expert, :count]))
            assert torch.equal(scales[expert, :count], want_ll["recv_x_scales"][expert, :count])
            bf16_rows = got["ll_bf16"][expert, :count]
            assert torch.equal(bf16_rows, ll_bf16[rank]["recv_x"][expert, :count])
        assert torch.equal(got["ll_combined"], ll_combined[rank])
        assert torch.equal(got["ll_zero_copy"], ll_combined[rank])
        assert got["ll_out_is_out"] and torch.equal(got["ll_out"], ll_combined[rank])


def test_import_swap_exposes_deepep_names():
    for name in ("Buffer", "Config", "EventOverlap"):
        assert hasattr(deep_ep, name)
    for method in (
        "get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch",
        "low_latency_combine", "get_next_low_latency_combine_buffer", "clean_low_latency_buffer",
        "get_low_latency_rdma_size_hint", "get_dispatch_config", "get_combine_config",
        "set_num_sms", "capture", "get_local_buffer_tensor", "destroy",
    ):
        assert callable(getattr(deep_ep.Buffer, method)), method
    config = deep_ep.Buffer.get_dispatch_config(8)
    assert config.num_sms == deep_ep.Buffer.num_sms
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8) > 0
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) >= 256 * 128 * 7168 * 2


def test_default_configs_are_the_get_config_lists():
    """Calls without a config take cached lists (no Config built per call): the same values as
    get_dispatch_config / get_combine_config, per rank count and SM count; a given Config or
    list passes as it is, and Config.to_list keeps the fields' order."""
    from deep_ep_ops import ops
    from deep_ep_ops.config import default_config_list, get_combine_config, get_dispatch_config

    for num_ranks in (1, 2, 3, 4, 8, 16):
        for num_sms in (2, 20, 24):
            assert default_config_list("dispatch", num_ranks, num_sms) == \
                get_dispatch_config(num_ranks, num_sms).to_list()
            assert default_config_list("combine", num_ranks, num_sms) == \
                get_combine_config(num_ranks, num_sms).to_list()
    assert ops._config_list(None, 4, "dispatch") == get_dispatch_config(4).to_list()
    given = deep_ep.Config(24, 6, 256, 6, 128)
    assert ops._config_list(given, 4, "dispatch") == [24, 6, 256, 6, 128]
    assert ops._config_list((24, 6, 256, 6, 128), 4, "combine") == [24, 6, 256, 6, 128]
    assert given.to_list() == [getattr(given, f.name) for f in dataclasses.fields(given)]
