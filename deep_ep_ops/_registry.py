"""Communicators by name, the way c10d keys process groups by ``group_name``.

Ops take ``str buffer``; the name resolves here to the process group, the rank and the
communication memory. Nothing else is global: several communicators may live at once.

Creation (``create``) meets the peers through the group's store within the timeout and gives
each buffer its own gloo group; the per-process progress server lets a failed exchange name
the ranks it waited for (docs/DESIGN.md §4).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from . import topology

_COMMUNICATORS: dict[str, Communicator] = {}
_CREATIONS: dict[str, int] = {}  # buffers created so far per process group (by group name)
_LOCK = threading.Lock()

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


class _ProgressServer:
    """Answers peers asking where this process stands in a buffer's calls (one per process, a
    daemon thread on an ephemeral TCP port). Error messages use it to name the rank a call
    waits for; it costs nothing per op call (it reads the communicator's fields)."""

    _instance: "_ProgressServer | None" = None

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, name="deep_ep_ops progress", daemon=True).start()

    @classmethod
    def get(cls) -> "_ProgressServer":
        with _LOCK:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(1.0)
                    name = conn.recv(256).decode(errors="replace").strip()
                    comm = _COMMUNICATORS.get(name)
                    conn.sendall(json.dumps(None if comm is None else comm.progress()).encode())
                except OSError:
                    pass


def _ask(host: str, port: int, name: str, deadline: float):
    """A peer's progress on buffer ``name``: a dict, or why there is none ("gone": nothing
    listens any more; "silent": no answer before ``deadline``)."""
    try:
        with socket.create_connection((host, port), timeout=max(0.05, deadline - time.monotonic())) as conn:
            conn.sendall(name.encode() + b"\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        return json.loads(reply.decode()) if reply else "silent"
    except ConnectionRefusedError:
        return "gone"
    except (OSError, ValueError):
        return "silent"


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
    # The buffer's own gloo group over the same ranks, its collectives bounded by ``timeout``
    # (gloo's own limit too, so an abandoned exchange never outlives it): the reference's
    # exchanges on host groups, and destroy's barrier on every group.
    pg: dist.ProcessGroup | None = None
    # Every rank's progress server (host, port), for messages naming the rank a call waits for.
    peers: list = dataclasses.field(default_factory=list)
    # This rank's progress: calls made, the last op, and the error it raised, if any.
    num_calls: int = 0
    op: str = ""
    error: str = ""
    # The group's collectives run on the host (not NCCL): the reference stages CUDA tensors
    # through host copies.
    host_collectives: bool = False
    # A collective of this buffer timed out or failed: further calls raise (the group may hold
    # a half-done exchange).
    broken: bool = False
    # Ranks per node (NVLink domain), consecutive: rank = node * num_nvl_ranks + local index.
    num_nvl_ranks: int = 1

    @property
    def num_rdma_ranks(self) -> int:
        """Nodes of the buffer (1: intranode)."""
        return self.num_ranks // self.num_nvl_ranks

    def enter(self, op: str) -> None:
        """Mark the start of a collective op (local only: peers read it when they must)."""
        self.num_calls, self.op, self.error = self.num_calls + 1, op, ""

    def failed(self, op: str, error: BaseException, entered: bool) -> None:
        """Record that this rank's call of ``op`` raised (before its exchange unless
        ``entered``), so that peers waiting for it can say so."""
        if not entered:
            self.num_calls, self.op = self.num_calls + 1, op
        self.error = f"{type(error).__name__}: {error}"[:400]

    def progress(self) -> dict:
        return {"calls": self.num_calls, "op": self.op, "error": self.error}

    def peer_report(self, budget_s: float = 0.5) -> str:
        """Where each peer stands relative to this rank's current call, asked within
        ``budget_s``: the ranks behind, gone, silent or failed, or that all reached it."""
        deadline = time.monotonic() + budget_s
        answers: dict = {}

        def ask(peer: int) -> None:
            host, port = self.peers[peer]
            answers[peer] = _ask(host, port, self.name, deadline)

        others = [peer for peer in range(self.num_ranks) if peer != self.rank]
        threads = [threading.Thread(target=ask, args=(peer,), daemon=True) for peer in others]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        problems = []
        for peer in others:
            answer = answers.get(peer, "silent")  # still asking at the deadline: silent
            if answer == "gone":
                problems.append(f"rank {peer} (its process is gone)")
            elif answer == "silent":
                problems.append(f"rank {peer} (does not answer: stalled, frozen or unreachable)")
            elif answer is None:
                problems.append(f"rank {peer} (has destroyed this buffer, or never made it)")
            elif answer["calls"] < self.num_calls:
                at = (f"it is at call {answer['calls']}, {answer['op']}" if answer["calls"] else
                      "it has made no call on this buffer")
                problems.append(f"rank {peer} (never reached this call: {at})")
            elif answer["calls"] == self.num_calls and answer["error"]:
                problems.append(f"rank {peer} (raised {answer['error']})")
            elif answer["calls"] > self.num_calls:
                problems.append(f"rank {peer} (ahead, at call {answer['calls']}, {answer['op']})")
        if problems:
            return ", ".join(problems)
        return "a peer (every peer reached this call and answers; one may be stalled inside it)"

    def wait(self, op: str, work) -> None:
        """Wait for ``work`` of the buffer's own group (or a gloo group) within the timeout; on
        a timeout or a failure the buffer is broken (the group may hold a half-done exchange:
        further calls raise, as the CUDA kernels' buffers do after a timeout, one behaviour for
        one event) and the error names the op and the problem peers."""
        try:
            work.wait(self.timeout)
        except RuntimeError as error:
            self.broken = True
            raise self.exchange_error(op, error) from error

    def exchange_error(self, op: str, error: BaseException) -> Exception:
        """The error every survivor of a failed exchange raises: the op, this rank and the
        ranks that are behind, gone, silent or failed (asked within half a second)."""
        who = self.peer_report()
        where = f"deep_ep::{op} on buffer {self.name!r} (rank {self.rank}/{self.num_ranks})"
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            return TimeoutError(
                f"{where}: timed out after {self.timeout.total_seconds():g} s waiting for "
                f"{who}; set {TIMEOUT_ENV} to change the limit. Cause: {error}")
        return RuntimeError(f"{where}: the exchange failed; {who}. Cause: {error}")


def _host() -> str:
    return socket.gethostname()


def _address(host: str, port: int) -> tuple[str, int]:
    return ("127.0.0.1" if host == _host() else host, port)


def _group_store(group: dist.ProcessGroup) -> dist.Store:
    return dist.distributed_c10d._get_process_group_store(group)


def _own_store(group: dist.ProcessGroup, timeout: datetime.timedelta) -> dist.Store:
    """A store connection of the buffer's own over the group's store: gloo's rendezvous blocks
    its store client while it waits, so two buffers made at once from two threads must not
    share one (they would wait on each other). Stores other than a TCPStore are shared."""
    store = _group_store(group)
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, timeout=timeout,
                             wait_for_workers=False)
    return _group_store(group)


def _rendezvous(group: dist.ProcessGroup, rank: int, num_ranks: int,
                timeout: datetime.timedelta,
                ranks_per_node: int) -> tuple[str, list, dist.ProcessGroup, int]:
    """Collectively, through the group's store, every wait bounded by ``timeout``: name the
    buffer, learn the ranks' progress servers and hosts, agree on the ranks per node (this
    rank asks for ``ranks_per_node``, 0: from the hosts; ``topology.ranks_per_node``) and build
    the buffer's own gloo group. Every key written is deleted before returning.

    The name is the group's name and the number of buffers this process made on the group
    before: identical on every rank (creation is collective, so every rank counts the same),
    whatever each process made on other groups, and unique in the process (safe from several
    threads, each on its own group)."""
    server = _ProgressServer.get()
    with _LOCK:
        seq = _CREATIONS.get(group.group_name, 0)
        _CREATIONS[group.group_name] = seq + 1
    name = f"deep_ep_buffer_{group.group_name}_{seq}"
    where = f"deep_ep_ops.Buffer {name} (rank {rank}/{num_ranks})"
    store = dist.PrefixStore(f"deep_ep_ops/{group.group_name}/{seq}/", _own_store(group, timeout))
    store.set(f"peer/{rank}", json.dumps([_host(), server.port, ranks_per_node]))
    keys = [f"peer/{r}" for r in range(num_ranks)]
    deadline = time.monotonic() + timeout.total_seconds()
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise TimeoutError(
                f"{where}: rank(s) {', '.join(map(str, missing))} did not create their Buffer "
                f"within {timeout.total_seconds():g} s; set {TIMEOUT_ENV} to change the limit")
        time.sleep(0.002)
    entries = [json.loads(store.get(key)) for key in keys]
    peers = [_address(host, port) for host, port, _ in entries]
    pg_store = dist.PrefixStore("pg/", store)
    try:
        pg = dist.ProcessGroupGloo(pg_store, rank, num_ranks, timeout)
        pg.barrier().wait(timeout)  # everyone read the keys and joined the group
    except RuntimeError as error:
        raise TimeoutError(f"{where}: the ranks did not all join the buffer's group within "
                           f"{timeout.total_seconds():g} s ({error})") from error
    store.delete_key(f"peer/{rank}")
    pg_store.delete_key(f"0/{rank}")  # gloo's rendezvous key of this rank
    # After the group's barrier: every rank has read every key, whatever it raises here.
    per_node = topology.ranks_per_node([host for host, _, _ in entries],
                                       [request for _, _, request in entries], where)
    return name, peers, pg, per_node


def create(
    group: dist.ProcessGroup,
    *,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    low_latency_mode: bool,
    device: torch.device,
    workspace: torch.Tensor,
    ranks_per_node: Optional[int] = None,
) -> Communicator:
    """Collectively create and register a communicator over ``group`` (eager only), within
    ``DEEP_EP_OPS_TIMEOUT_S`` whatever the peers do. ``ranks_per_node``: the ``Buffer``
    argument (``topology``)."""
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    timeout = timeout_from_env()
    requested = topology.requested_ranks_per_node(ranks_per_node)
    name, peers, pg, per_node = _rendezvous(group, rank, num_ranks, timeout, requested)
    comm = Communicator(
        name=name, group=group, rank=rank, num_ranks=num_ranks, device=device,
        num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=low_latency_mode, timeout=timeout, workspace=workspace, pg=pg,
        peers=peers, host_collectives=dist.get_backend(group) != dist.Backend.NCCL,
        num_nvl_ranks=per_node,
    )
    _COMMUNICATORS[name] = comm
    return comm


def get(name: str) -> Communicator:
    comm = _COMMUNICATORS.get(name)
    if comm is None:
        known = ", ".join(sorted(_COMMUNICATORS)) or "none"
        raise ValueError(
            f"buffer {name!r} is not a live deep_ep_ops buffer (live: {known}); "
            "was it destroyed, or created on another process?"
        )
    return comm


@atexit.register
def _release_groups() -> None:
    """Drop the buffers' own groups while the interpreter is whole (their threads end within
    the timeout of their last exchange): torn down later, at finalisation, a group whose
    exchange timed out can abort the process."""
    for comm in list(_COMMUNICATORS.values()):
        comm.pg = None


def lookup(name) -> Communicator | None:
    """The live communicator named ``name``, or ``None`` (no error)."""
    return _COMMUNICATORS.get(name) if isinstance(name, str) else None


def remove(name: str) -> None:
    _COMMUNICATORS.pop(name, None)
