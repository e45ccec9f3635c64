"""Which ranks form a node: found from the hosts, or set (DEEP_EP_OPS_RANKS_PER_NODE, the Buffer
argument) so that one host stands for several; the layout counts tokens per node accordingly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
import oracle
from deep_ep_ops import topology
from deep_ep_ops.topology import RANKS_PER_NODE_ENV
from distributed import run_on_ranks

WHERE = "deep_ep_ops.Buffer b (rank 0/4)"


@pytest.mark.parametrize("hosts, want", [
    (["a"] * 4, 4),                      # one host: one node
    (["a"] * 16, 8),                     # more ranks than one NVLink domain holds: nodes of 8
    (["a"] * 12, 6),                     # the largest divisor up to 8
    (["a", "a", "b", "b"], 2),           # two hosts of two
    (["a", "b", "a", "b"], 1),           # interleaved: every rank a node of its own
    (["a", "a", "a", "b"], 1),           # unequal hosts: the same
])
def test_ranks_per_node_from_the_hosts(hosts, want):
    assert topology.ranks_per_node(hosts, [0] * len(hosts), WHERE) == want


def test_requested_ranks_per_node_must_fit():
    assert topology.ranks_per_node(["a"] * 4, [2] * 4, WHERE) == 2
    with pytest.raises(ValueError, match=r"3 ranks per node \(DEEP_EP_OPS_RANKS_PER_NODE or "
                                         r"num_ranks_per_node\) does not divide the 4 ranks"):
        topology.ranks_per_node(["a"] * 4, [3] * 4, WHERE)
    with pytest.raises(ValueError, match=r"node 0 would span hosts a, b; a node is one NVLink"):
        topology.ranks_per_node(["a", "b", "b", "b"], [2] * 4, WHERE)
    with pytest.raises(ValueError, match=r"the ranks disagree on the ranks per node \(rank 0: 2, "
                                         r"rank 1: from the hosts, rank 2: 2, rank 3: 2\)"):
        topology.ranks_per_node(["a"] * 4, [2, 0, 2, 2], WHERE)


def test_requested_ranks_per_node_is_checked(monkeypatch):
    monkeypatch.delenv(RANKS_PER_NODE_ENV, raising=False)
    assert topology.requested_ranks_per_node(None) == 0
    assert topology.requested_ranks_per_node(4) == 4
    monkeypatch.setenv(RANKS_PER_NODE_ENV, "2")
    assert topology.requested_ranks_per_node(None) == 2
    assert topology.requested_ranks_per_node(1) == 1  # the argument wins
    for bad, source in ((0, "num_ranks_per_node"), (9, "num_ranks_per_node"),
                        (True, "num_ranks_per_node"), (2.0, "num_ranks_per_node")):
        with pytest.raises(ValueError, match=rf"^{source} must be an integer in \[1, 8\]"):
            topology.requested_ranks_per_node(bad)
    monkeypatch.setenv(RANKS_PER_NODE_ENV, "two")
    with pytest.raises(ValueError, match=r"^DEEP_EP_OPS_RANKS_PER_NODE must be an integer, got 'two'"):
        topology.requested_ranks_per_node(None)
    monkeypatch.setenv(RANKS_PER_NODE_ENV, "16")
    with pytest.raises(ValueError, match=r"^DEEP_EP_OPS_RANKS_PER_NODE must be an integer in \[1, 8\]"):
        topology.requested_ranks_per_node(None)


def _topology_job(rank, world_size, env_value, argument):
    """A buffer made with the environment variable ``env_value`` (None: unset) and the Buffer
    argument ``argument``: its topology, and its layout beside the oracle's."""
    if env_value is None:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    else:
        os.environ[RANKS_PER_NODE_ENV] = env_value
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 22, num_ranks_per_node=argument)
    finally:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    num_experts = 4 * world_size
    g = torch.Generator().manual_seed(rank)
    topk_idx = torch.randint(-1, num_experts, (33, 3), generator=g)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx,
                                                                                  num_experts)
    want = oracle.layout(topk_idx, num_experts, world_size, buffer.num_rdma_ranks)
    layout_ok = (torch.equal(per_rank, want["num_tokens_per_rank"])
                 and torch.equal(per_expert, want["num_tokens_per_expert"])
                 and torch.equal(in_rank, want["is_token_in_rank"])
                 and (per_rdma_rank is None if buffer.num_rdma_ranks == 1 else
                      torch.equal(per_rdma_rank, want["num_tokens_per_rdma_rank"])))
    shape = (buffer.num_nvl_ranks, buffer.num_rdma_ranks, buffer.nvl_rank, buffer.rdma_rank)
    buffer.destroy()
    return shape, layout_ok


@pytest.mark.parametrize("world_size, env_value, argument, per_node", [
    (4, None, None, 4),   # one host: one node
    (4, "2", None, 2),    # emulated: 2 nodes of 2
    (4, "2", 1, 1),       # the argument wins: 4 nodes of 1
    (8, "4", None, 4),    # emulated: 2 nodes of 4
])
def test_buffer_topology_and_layout(world_size, env_value, argument, per_node):
    results = run_on_ranks(world_size, _topology_job, env_value, argument, timeout=120)
    for rank, (shape, layout_ok) in enumerate(results):
        assert shape == (per_node, world_size // per_node, rank % per_node, rank // per_node)
        assert layout_ok, rank


def _disagreeing_ranks_per_node(rank, world_size):
    try:
        deep_ep.Buffer(dist.group.WORLD, 1 << 20, num_ranks_per_node=1 if rank == 0 else 2)
    except ValueError as error:
        return str(error)
    return None


def test_ranks_that_disagree_on_the_topology_all_raise():
    messages = run_on_ranks(2, _disagreeing_ranks_per_node, timeout=60)
    for message in messages:
        assert message is not None and "the ranks disagree on the ranks per node (rank 0: 1, " \
            "rank 1: 2)" in message, message
