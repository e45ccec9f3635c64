"""Which ranks of a buffer form one node (an NVLink domain): the topology of internode mode.

A buffer's ranks split into ``num_rdma_ranks`` nodes of ``num_nvl_ranks`` consecutive ranks each
(rank = node * num_nvl_ranks + local index, as in DeepEP). By default a node is the ranks of
one host, found from the host names the ranks exchange at creation; ``DEEP_EP_OPS_RANKS_PER_NODE``
or ``Buffer(num_ranks_per_node=...)`` sets it, so that one host can stand for several (4 ranks as
2 nodes of 2). Every rank must ask for the same, or creation raises on every rank.
"""

from __future__ import annotations

import os
from typing import Optional

from .config import NUM_MAX_NVL_PEERS

RANKS_PER_NODE_ENV = "DEEP_EP_OPS_RANKS_PER_NODE"


def requested_ranks_per_node(argument: Optional[int]) -> int:
    """What this rank asks for: the ``Buffer`` argument, else the environment, else 0 (find it
    from the hosts). Raises ``ValueError`` naming the source of a value that is not a count."""
    if argument is not None:
        source, value = "num_ranks_per_node", argument
    else:
        raw = os.environ.get(RANKS_PER_NODE_ENV, "")
        if not raw:
            return 0
        source = RANKS_PER_NODE_ENV
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{RANKS_PER_NODE_ENV} must be an integer, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= NUM_MAX_NVL_PEERS:
        raise ValueError(f"{source} must be an integer in [1, {NUM_MAX_NVL_PEERS}] (ranks of one "
                         f"NVLink domain), got {value!r}")
    return value


def ranks_per_node(hosts: list[str], requests: list[int], where: str) -> int:
    """The ranks per node of a buffer whose rank ``r`` runs on ``hosts[r]`` and asked for
    ``requests[r]`` (``requested_ranks_per_node``; 0: from the hosts).

    From the hosts: the size of each host's block of consecutive ranks when every host holds
    one such block and all are equal (largest divisor of it up to 8 when a host holds more:
    one NVLink domain has at most 8 GPUs); otherwise 1 (every rank a node of its own: always
    a valid split). A requested size must divide the ranks, and a node may not span hosts."""
    num_ranks = len(hosts)
    if len(set(requests)) > 1:
        each = ", ".join(f"rank {r}: {v or 'from the hosts'}" for r, v in enumerate(requests))
        raise ValueError(f"{where}: the ranks disagree on the ranks per node ({each}); set "
                         f"{RANKS_PER_NODE_ENV} or num_ranks_per_node alike on every rank")
    requested = requests[0]
    if requested:
        if num_ranks % requested:
            raise ValueError(f"{where}: {requested} ranks per node ({RANKS_PER_NODE_ENV} or "
                             f"num_ranks_per_node) does not divide the {num_ranks} ranks")
        for node in range(num_ranks // requested):
            spanned = sorted(set(hosts[node * requested:(node + 1) * requested]))
            if len(spanned) > 1:
                raise ValueError(f"{where}: with {requested} ranks per node, node {node} would "
                                 f"span hosts {', '.join(spanned)}; a node is one NVLink domain")
        return requested
    blocks = []  # (host, ranks) of each run of consecutive ranks on one host
    for host in hosts:
        if blocks and blocks[-1][0] == host:
            blocks[-1][1] += 1
        else:
            blocks.append([host, 1])
    sizes = {size for _, size in blocks}
    if len(sizes) > 1 or len({host for host, _ in blocks}) != len(blocks):
        return 1
    per_host = sizes.pop()
    return max(d for d in range(1, NUM_MAX_NVL_PEERS + 1) if per_host % d == 0)
