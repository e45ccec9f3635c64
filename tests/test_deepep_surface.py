"""``import deep_ep_ops as deep_ep`` offers every public name of DeepEP V1's ``deep_ep`` module.

The names are DeepEP V1's at commit 29d31c0 (``deep_ep/__init__.py``, ``deep_ep/utils.py``,
``deep_ep/buffer.py`` and the ``Config`` its C++ extension exports), written down here as facts.
"""

import inspect

import pytest
import torch

import deep_ep_ops as deep_ep
from distributed import new_test_buffer, run_on_ranks

DEEPEP_MODULE_NAMES = ("Buffer", "EventOverlap", "Config", "topk_idx_t", "buffer", "utils")
DEEPEP_UTILS_NAMES = ("EventOverlap", "check_nvlink_connections")
DEEPEP_BUFFER_METHODS = (
    "destroy", "is_sm90_compiled", "set_num_sms", "capture", "get_low_latency_rdma_size_hint",
    "get_comm_stream", "get_local_buffer_tensor", "get_dispatch_config", "get_combine_config",
    "get_dispatch_layout", "dispatch", "combine", "internode_dispatch", "internode_combine",
    "clean_low_latency_buffer", "low_latency_dispatch", "low_latency_combine",
    "low_latency_update_mask_buffer", "low_latency_query_mask_buffer",
    "low_latency_clean_mask_buffer", "get_next_low_latency_combine_buffer",
)
DEEPEP_BUFFER_ARGS = (
    "group", "num_nvl_bytes", "num_rdma_bytes", "low_latency_mode", "num_qps_per_rank",
    "allow_nvlink_for_low_latency_mode", "allow_mnnvl", "use_fabric", "explicitly_destroy",
    "enable_shrink", "comm",
)
DEEPEP_CONFIG_METHODS = ("get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint")


def test_module_names_cover_deepep_v1():
    missing = [name for name in DEEPEP_MODULE_NAMES if not hasattr(deep_ep, name)]
    assert not missing, f"deep_ep_ops lacks DeepEP V1 names {missing}"
    assert deep_ep.topk_idx_t is torch.int64
    assert [n for n in DEEPEP_UTILS_NAMES if not hasattr(deep_ep.utils, n)] == []
    assert deep_ep.utils.EventOverlap is deep_ep.EventOverlap
    assert deep_ep.buffer.Buffer is deep_ep.Buffer


def test_buffer_and_config_cover_deepep_v1():
    missing = [m for m in DEEPEP_BUFFER_METHODS if not callable(getattr(deep_ep.Buffer, m, None))]
    assert not missing, f"Buffer lacks DeepEP V1 methods {missing}"
    params = inspect.signature(deep_ep.Buffer.__init__).parameters
    # DeepEP's arguments in DeepEP's order (positional calls keep working), then ours,
    # keyword-only.
    ours = ["device", "num_ranks_per_node"]
    assert list(params)[1:] == list(DEEPEP_BUFFER_ARGS) + ours
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ours)
    assert [m for m in DEEPEP_CONFIG_METHODS if not hasattr(deep_ep.Config, m)] == []
    # DeepEP's tests build configs positionally with three arguments.
    assert deep_ep.Config(24, 8, 256).to_list()[:3] == [24, 8, 256]


def _dispatch_without_topk(rank, num_ranks):
    torch.manual_seed(rank)
    num_tokens, hidden, num_experts, num_topk = 12, 64, 4 * num_ranks, 3
    buffer = new_test_buffer()
    scores = torch.rand(num_tokens, num_experts)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_idx[0, 1] = -1
    x = torch.randn(num_tokens, hidden).bfloat16()
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    lists = {}
    for with_topk in (False, True):
        extra = dict(topk_idx=topk_idx, topk_weights=torch.rand(num_tokens, num_topk)) if with_topk else {}
        _, _, _, per_expert_list, _, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, **extra,
        )
        lists[with_topk] = per_expert_list
    buffer.destroy()
    return {"topk_idx": topk_idx, "lists": lists}


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_per_expert_list_with_and_without_topk(num_ranks):
    """DeepEP's test_intranode.py asserts the list equals the global per-expert counts of this
    rank's experts, with and without top-k."""
    results = run_on_ranks(num_ranks, _dispatch_without_topk)
    num_experts = 4 * num_ranks
    everything = torch.cat([r["topk_idx"] for r in results])
    counts = torch.stack([(everything == e).sum() for e in range(num_experts)]).view(num_ranks, -1)
    for rank, got in enumerate(results):
        assert got["lists"][False] == counts[rank].tolist()
        assert got["lists"][True] == counts[rank].tolist()


def _device_choices(rank, num_ranks):
    """Which device a Buffer on a gloo group serves: the argument, else DEEP_EP_OPS_DEVICE."""
    import os

    import torch.distributed as dist

    from deep_ep_ops.buffer import DEVICE_ENV

    results = {}
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20)
    results["default"] = str(buffer.device)
    buffer.destroy()
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, device="cpu")
    results["explicit"] = str(buffer.device)
    buffer.destroy()
    for where, kwargs, env in (("argument", {"device": "tpu"}, None),
                               ("env", {}, "not a device")):
        if env is not None:
            os.environ[DEVICE_ENV] = env
        try:  # raises before any collective: every rank raises the same
            deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, **kwargs)
        except ValueError as error:
            results[where] = str(error)
        finally:
            os.environ.pop(DEVICE_ENV, None)
    return results


def test_buffer_device_on_gloo():
    (results,) = run_on_ranks(1, _device_choices)
    assert results["default"] == "cpu" and results["explicit"] == "cpu"
    assert results["argument"].startswith("device must"), results["argument"]
    assert "DEEP_EP_OPS_DEVICE" in results["env"] and "not a device" in results["env"]
