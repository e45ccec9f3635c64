"""Multi-rank test harness: a pool of gloo ranks that runs test functions.

Spawning Python + torch per test is slow on small machines, so each world size gets one pool of
long-lived processes (spawned once per pytest session) that run test functions on request.
A function is called as ``fn(rank, world_size, *args)`` on every rank and must be importable
(a module-level function); its return values come back as a list indexed by rank.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback

import torch.multiprocessing as mp

JOB_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(value) -> bytes:
    """Results travel as ``torch.save`` bytes: no shared-memory file descriptors to run out of."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank, world_size, port, conn, env):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=JOB_TIMEOUT_S),
    )
    import deep_ep_ops  # noqa: F401

    while True:
        job = conn.recv()
        if job is None:
            break
        fn, args = job
        try:
            conn.send(("ok", _to_bytes(fn(rank, world_size, *args))))
        except BaseException as error:  # report every failure to the parent
            conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


def new_test_buffer(timeout_s: float = 20.0, num_ranks_per_node=None):
    """A low-latency-capable Buffer on WORLD whose ops give up on a failed peer after ``timeout_s``.

    Sizes are far above the size hints of the small test problems.
    """
    import torch.distributed as dist

    import deep_ep_ops
    from deep_ep_ops._registry import TIMEOUT_ENV

    previous = os.environ.get(TIMEOUT_ENV)
    os.environ[TIMEOUT_ENV] = str(timeout_s)
    try:
        return deep_ep_ops.Buffer(
            dist.group.WORLD, num_nvl_bytes=1 << 28, num_rdma_bytes=1 << 24, low_latency_mode=True,
            num_ranks_per_node=num_ranks_per_node,
        )
    finally:
        if previous is None:
            del os.environ[TIMEOUT_ENV]
        else:
            os.environ[TIMEOUT_ENV] = previous


class RankFailure(AssertionError):
    pass


class RankPool:
    def __init__(self, world_size: int, env: dict[str, str] | None = None):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world_size = world_size
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, world_size, port, child, dict(env or {})), daemon=True
            )
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.broken = False

    def run(self, fn, *args, timeout: float = JOB_TIMEOUT_S, expect_errors: bool = False):
        """Run ``fn`` on every rank; return per-rank results (or ``("error", text)`` tuples)."""
        for conn in self.conns:
            conn.send((fn, args))
        results = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(timeout):
                self.close(kill=True)
                raise RankFailure(f"rank {rank} did not finish {fn.__name__} within {timeout} s")
            results.append(conn.recv())
        errors = [(r, text) for r, (status, text) in enumerate(results) if status == "error"]
        if errors:
            # A failed rank may leave collectives half done: this pool is not reused.
            self.broken = True
            if not expect_errors:
                raise RankFailure("\n".join(f"rank {r}: {text}" for r, text in errors))
            return results
        return [_from_bytes(value) for _, value in results]

    def close(self, kill: bool = False) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if not kill:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.kill()
        self.conns, self.procs = [], []


_POOLS: dict[int, RankPool] = {}


def run_on_ranks(world_size: int, fn, *args, timeout: float = JOB_TIMEOUT_S):
    """Run ``fn(rank, world_size, *args)`` on a shared pool of ``world_size`` gloo ranks."""
    pool = _POOLS.get(world_size)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close(kill=True)
        pool = _POOLS[world_size] = RankPool(world_size, {"DEEP_EP_OPS_TIMEOUT_S": "60"})
    return pool.run(fn, *args, timeout=timeout)


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
