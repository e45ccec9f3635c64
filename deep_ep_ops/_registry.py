"""Communicators by name, the way c10d keys process groups by ``group_name``.

Ops take ``str buffer``; the name resolves here to the process group, the rank and the
communication memory. Nothing else is global: several communicators may live at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading

import torch
import torch.distributed as dist

_COMMUNICATORS: dict[str, Communicator] = {}
_NEXT_ID = 0  # the least id this process may give a new buffer
_NEXT_ID_LOCK = threading.Lock()


def _agreed_name(group: dist.ProcessGroup) -> str:
    """A buffer name identical on every rank of ``group`` and new in every rank's registry,
    whatever each process created before: the largest of the ranks' next ids (collective)."""
    global _NEXT_ID
    with _NEXT_ID_LOCK:
        local = _NEXT_ID
    ids: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(ids, local, group=group)
    agreed = max(ids)
    with _NEXT_ID_LOCK:
        _NEXT_ID = max(_NEXT_ID, agreed + 1)
    return f"deep_ep_buffer_{agreed}"

TIMEOUT_ENV = "DEEP_EP_OPS_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


def timeout_from_env() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


@dataclasses.dataclass
class Communicator:
    """What an op needs to know about the buffer it names."""

    name: str
    group: dist.ProcessGroup
    rank: int
    num_ranks: int
    device: torch.device
    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool
    timeout: datetime.timedelta
    # Low-latency workspace (the zero-copy combine buffer lives in it on the reference path).
    workspace: torch.Tensor
    # Peer tracking for timeout messages: every op call publishes this rank's call count.
    store: dist.Store | None = None
    num_calls: int = 0
    # The group's collectives run on the host (not NCCL): the reference stages CUDA tensors
    # through host copies.
    host_collectives: bool = False
    # A collective of this buffer timed out or failed: further calls raise (the group may hold
    # a half-done exchange).
    broken: bool = False

    def enter(self, op: str) -> None:
        """Mark the start of a collective op, so that a timeout can name the lagging peers."""
        self.num_calls += 1
        if self.store is not None:
            self.store.set(self._key(self.rank), f"{self.num_calls}:{op}")

    def lagging_peers(self) -> list[str]:
        if self.store is None:
            return []
        lagging = []
        for peer in range(self.num_ranks):
            if peer == self.rank:
                continue
            calls, _, op = self.store.get(self._key(peer)).decode().partition(":")
            if int(calls) < self.num_calls:
                lagging.append(f"rank {peer} (at call {calls}{', ' + op if op else ''})")
        return lagging

    def _key(self, rank: int) -> str:
        return f"deep_ep_ops/{self.name}/calls/{rank}"


def create(
    group: dist.ProcessGroup,
    *,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    low_latency_mode: bool,
    device: torch.device,
    workspace: torch.Tensor,
) -> Communicator:
    """Collectively create and register a communicator over ``group`` (eager only)."""
    name = _agreed_name(group)
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    store = None
    if dist.get_backend(group) == dist.Backend.GLOO:
        # Gloo ops run on the host, so a store write per call costs little and lets a timeout
        # say which peer is missing. Keys are per buffer name; names repeat only per process.
        store = dist.PrefixStore(f"deep_ep_ops/{group.group_name}", _group_store(group))
    comm = Communicator(
        name=name, group=group, rank=rank, num_ranks=num_ranks, device=device,
        num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=low_latency_mode, timeout=timeout_from_env(), workspace=workspace,
        store=store, host_collectives=dist.get_backend(group) != dist.Backend.NCCL,
    )
    if store is not None:
        store.set(comm._key(rank), "0:")
    _COMMUNICATORS[name] = comm
    dist.barrier(group=group)
    return comm


def _group_store(group: dist.ProcessGroup) -> dist.Store:
    return dist.distributed_c10d._get_process_group_store(group)


def get(name: str) -> Communicator:
    comm = _COMMUNICATORS.get(name)
    if comm is None:
        known = ", ".join(sorted(_COMMUNICATORS)) or "none"
        raise ValueError(
            f"buffer {name!r} is not a live deep_ep_ops buffer (live: {known}); "
            "was it destroyed, or created on another process?"
        )
    return comm


def remove(name: str) -> None:
    _COMMUNICATORS.pop(name, None)

