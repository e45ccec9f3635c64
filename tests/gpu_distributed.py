"""Multi-GPU test harness: pools of rank processes that run test functions.

One rank per GPU, in an NCCL group, when there are enough GPUs. With fewer GPUs than ranks
(the one-GPU multi-rank mode) several rank processes share each GPU under CUDA MPS: NCCL
refuses two ranks on one GPU, so they form a gloo group, and their ``Buffer``s drive the CUDA
kernels anyway (``DEEP_EP_OPS_DEVICE=cuda``: the group only bootstraps them; the reference
stages CUDA tensors through the host). Each process gets an equal SM share
(``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``), NVSHMEM runs several PEs per GPU, and the MPS control
daemon is started here (pipe and log directories under /tmp) unless one is running, and stopped
at exit if it was started here. Timings in this mode share one GPU: correctness only.

The NCCL counterpart of ``tests/distributed.py``. Starting Python + torch + CUDA + NCCL per test
costs many seconds, so each world size gets one long-lived pool (rank ``r`` on ``cuda:r``) that
runs functions on request. A function is called as ``fn(rank, world_size, *args)`` on every rank
with ``torch.cuda.set_device(rank)`` done and the default process group (NCCL, eagerly
initialised on that device) up; it must be importable (a module-level function). Results come
back as a list indexed by rank, tensors moved to the CPU.

Failures: the first rank that raises starts a grace period in which the other ranks may report
too (peers of a failed rank usually fail as well once their ops time out); then every traceback
is raised as one ``RankFailure`` and the pool, possibly stuck in half-done collectives, is
killed. A rank process that dies is reported with its exit code.
"""

from __future__ import annotations

import atexit
import datetime
import io
import multiprocessing.connection
import os
import shutil
import socket
import subprocess
import time
import traceback

import torch.multiprocessing as mp

import fault_table

# NVLink multicast off (NCCL NVLS, symmetric-memory multicast, NVSHMEM NVLS): not every machine
# supports it and nothing here needs it.
TRANSPORT_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
DEFAULT_ENV = {
    **TRANSPORT_ENV,
    # A kernel waiting for a peer that failed gives up after this (read at Buffer creation).
    "DEEP_EP_OPS_TIMEOUT_S": "30",
    # Deterministic cuBLAS, so that eager and captured/compiled matmuls can be compared exactly.
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "PYTHONUNBUFFERED": "1",
}
START_TIMEOUT_S = 240.0  # spawn + import torch + CUDA context + NCCL init
JOB_TIMEOUT_S = 300.0
ERROR_GRACE_S = 45.0  # > DEEP_EP_OPS_TIMEOUT_S: peers stuck in a kernel get to report
PROCESS_GROUP_TIMEOUT_S = 180.0


# "4" or "4,8": run the multi-GPU tests at these numbers of ranks only (default 2, 4 and 8, as
# far as the machine has GPUs), e.g. to spend a 4-GPU machine's time on the 4-rank variants.
WORLD_SIZES_ENV = "DEEP_EP_OPS_GPU_WORLD_SIZES"


def world_sizes() -> tuple[int, ...]:
    """The numbers of ranks the multi-GPU tests are parametrized over."""
    value = os.environ.get(WORLD_SIZES_ENV, "").strip()
    if not value:
        return (2, 4, 8)
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(f"{WORLD_SIZES_ENV} must be comma-separated ints, got {value!r}") from None
    if not sizes or min(sizes) < 2:
        raise ValueError(f"{WORLD_SIZES_ENV} must name numbers of ranks >= 2, got {value!r}")
    return sizes


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# "0": never put two ranks on one GPU (the multi-rank tests then need a GPU per rank).
SHARE_ENV = "DEEP_EP_OPS_GPU_SHARE"
MAX_RANKS_PER_GPU = 8
MPS_DIR = "/tmp/deep_ep_ops_mps"


def sharing_allowed() -> bool:
    return os.environ.get(SHARE_ENV, "1") != "0" and shutil.which("nvidia-cuda-mps-control") is not None


def max_ranks() -> int:
    """The most ranks a pool may have here: a GPU each, or several per GPU under MPS."""
    gpus = gpu_count()
    return gpus * MAX_RANKS_PER_GPU if gpus and sharing_allowed() else gpus


def ranks_per_gpu(world_size: int) -> int:
    gpus = gpu_count()
    return max(1, -(-world_size // gpus)) if gpus else 1


def why_not(world_size: int) -> str | None:
    """Why ``world_size`` ranks cannot run here, or ``None``."""
    if world_size <= gpu_count():
        return None
    if not gpu_count():
        return "needs a CUDA GPU"
    if not sharing_allowed():
        return (f"{world_size} ranks need {world_size} GPUs, found {gpu_count()} (sharing a GPU "
                f"needs CUDA MPS, nvidia-cuda-mps-control, and {SHARE_ENV} not 0)")
    if ranks_per_gpu(world_size) > MAX_RANKS_PER_GPU:
        return f"at most {MAX_RANKS_PER_GPU} ranks per GPU"
    return None


class _Mps:
    """The CUDA MPS control daemon for the shared-GPU mode: one running already (its pipe
    directory in ``CUDA_MPS_PIPE_DIRECTORY``, as scripts/gpu_run.sh starts it) is used as it
    is; otherwise one is started with its directories under /tmp and stopped at exit. Nothing
    changes a GPU's settings (no compute-mode change: MPS clients share the GPU)."""

    started = False

    @classmethod
    def ensure(cls) -> None:
        if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or cls.started:
            return
        pipe, log = os.path.join(MPS_DIR, "pipe"), os.path.join(MPS_DIR, "log")
        os.makedirs(pipe, exist_ok=True)
        os.makedirs(log, exist_ok=True)
        os.environ["CUDA_MPS_PIPE_DIRECTORY"], os.environ["CUDA_MPS_LOG_DIRECTORY"] = pipe, log
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True, timeout=30)
        cls.started = True
        atexit.register(cls.stop)

    @classmethod
    def stop(cls) -> None:
        if cls.started:
            cls.started = False
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", timeout=30, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(value) -> bytes:
    import torch
    from torch.utils._pytree import tree_map

    cpu = tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, value)
    buffer = io.BytesIO()
    torch.save(cpu, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}\n{traceback.format_exc()}"


def _worker(rank, world_size, port, conn, env, hard_exit, per_gpu):
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", rank // per_gpu)
        torch.cuda.set_device(device)
        if per_gpu == 1:
            dist.init_process_group(
                "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S), device_id=device,
            )
        else:  # ranks sharing a GPU: NCCL refuses them, gloo bootstraps the kernels
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S),
            )
        import deep_ep_ops  # noqa: F401  (registers the ops, loads the extension)
    except BaseException as error:
        conn.send(("error", "process group setup failed: " + _describe(error)))
        return
    conn.send(("ok", _to_bytes(None)))

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the test process went away
            job = None
        if job is None:
            break
        fn, args = job
        try:
            result = fn(rank, world_size, *args)
            torch.cuda.synchronize()  # asynchronous CUDA errors belong to this job
            reply = ("ok", _to_bytes(result))
        except BaseException as error:  # report every failure to the test process
            reply = ("error", _describe(error))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    if hard_exit:
        # For pools whose communication state is deliberately broken (a timed-out buffer):
        # no destroy, no collective teardown, no interpreter cleanup.
        os._exit(0)
    try:
        torch.cuda.synchronize()
        dist.destroy_process_group()
    except BaseException:
        pass


class RankFailure(AssertionError):
    pass


class GpuRankPool:
    """``world_size`` processes in one process group: rank ``r`` on ``cuda:r`` over NCCL, or,
    with fewer GPUs than ranks, ``ranks_per_gpu`` consecutive ranks per GPU over gloo under MPS
    (see the module docstring).

    ``env`` is added to :data:`DEFAULT_ENV` in every rank before torch is imported.
    ``hard_exit`` makes the ranks leave with ``os._exit(0)`` when closed (nothing collective).
    """

    def __init__(self, world_size: int, env: dict[str, str] | None = None, hard_exit=False):
        reason = why_not(world_size)
        if reason is not None:
            raise RuntimeError(reason)
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world_size = world_size
        self.per_gpu = per_gpu = ranks_per_gpu(world_size)
        self.conns, self.procs = [], []
        full_env = dict(DEFAULT_ENV)
        if per_gpu > 1:
            _Mps.ensure()
            full_env.update({
                "DEEP_EP_OPS_DEVICE": "cuda",
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(100 // per_gpu),
                "CUDA_MPS_PIPE_DIRECTORY": os.environ["CUDA_MPS_PIPE_DIRECTORY"],
            })
        full_env.update(env or {})
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, world_size, port, child, full_env, hard_exit, per_gpu),
                daemon=True, name=f"gpu-rank-{rank}",
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.broken = False
        self._started = False
        self._pending_job = None

    # --- jobs ---------------------------------------------------------------------------

    def submit(self, fn, *args) -> None:
        """Start ``fn`` on every rank; :meth:`collect` gets the results."""
        if self.broken:
            raise RankFailure("this pool is broken (an earlier job failed)")
        if not self._started:
            self._gather("process group setup", START_TIMEOUT_S)
            self._started = True
        for conn in self.conns:
            conn.send((fn, args))
        self._pending_job = fn.__name__

    def collect(self, timeout: float = JOB_TIMEOUT_S) -> list:
        what, self._pending_job = self._pending_job, None
        return [_from_bytes(payload) for payload in self._gather(what, timeout)]

    def run(self, fn, *args, timeout: float = JOB_TIMEOUT_S) -> list:
        """Run ``fn(rank, world_size, *args)`` on every rank; per-rank results, by rank."""
        self.submit(fn, *args)
        return self.collect(timeout)

    def _gather(self, what: str, timeout: float) -> list:
        rank_of = {conn: rank for rank, conn in enumerate(self.conns)}
        replies: list = [None] * self.world_size
        pending = set(self.conns)
        deadline = time.monotonic() + timeout
        first_error_at = None
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in multiprocessing.connection.wait(list(pending), timeout=remaining):
                rank = rank_of[conn]
                pending.discard(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    self.procs[rank].join(timeout=5)
                    replies[rank] = (
                        "error", f"the rank process died (exit code {self.procs[rank].exitcode})"
                    )
                if replies[rank][0] == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
                    deadline = min(deadline, first_error_at + ERROR_GRACE_S)
        errors = [f"rank {r}: {reply[1]}" for r, reply in enumerate(replies)
                  if reply is not None and reply[0] == "error"]
        missing = sorted(rank_of[conn] for conn in pending)
        if errors or missing:
            self.broken = True
            self.close(kill=True)
            why = (f"no reply within {ERROR_GRACE_S:g} s of the first failure" if errors
                   else f"did not finish within {timeout:g} s")
            errors += [f"rank {r}: {why} ({what}); killed" for r in missing]
            raise RankFailure(f"{what} failed on {self.world_size} ranks:\n" + "\n".join(errors))
        return [payload for _, payload in replies]

    # --- teardown -----------------------------------------------------------------------

    def close(self, kill: bool = False, join_timeout: float = 60.0) -> list:
        """Stop every rank; returns their exit codes (``None``: had to be killed)."""
        codes = []
        if not kill:
            for conn in self.conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + (0.0 if kill else join_timeout)
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            code = proc.exitcode
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
                code = None
            codes.append(code)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        return codes


_POOLS: dict[int, GpuRankPool] = {}


def get_pool(world_size: int) -> GpuRankPool:
    """The shared pool of ``world_size`` ranks (a new one if the last failed)."""
    pool = _POOLS.get(world_size)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close(kill=True)
        pool = _POOLS[world_size] = GpuRankPool(world_size)
    return pool


def run_on_gpus(world_size: int, fn, *args, timeout: float = JOB_TIMEOUT_S) -> list:
    """Run ``fn(rank, world_size, *args)`` on the shared pool of ``world_size`` GPU ranks."""
    return get_pool(world_size).run(fn, *args, timeout=timeout)


def run_in_fresh_pools(world_size: int, env: dict[str, str], fn, scenarios,
                       timeout: float, at_once: bool = True) -> tuple[dict, dict]:
    """Run ``fn(rank, world_size, scenario)`` for every scenario, each in its own new pool
    (started with ``env``, exiting hard: a scenario may leave its ranks unusable): all at once,
    or with ``at_once=False`` one scenario after the other. Returns ``(results, exit_codes)``,
    both by scenario."""
    results, exit_codes = {}, {}
    if not at_once:
        for scenario in scenarios:
            one, codes = run_in_fresh_pools(world_size, env, fn, [scenario], timeout)
            results.update(one)
            exit_codes.update(codes)
        return results, exit_codes
    pools = {scenario: GpuRankPool(world_size, env=env, hard_exit=True) for scenario in scenarios}
    try:
        for scenario, pool in pools.items():
            pool.submit(fn, scenario)
        for scenario, pool in pools.items():
            results[scenario] = pool.collect(timeout=timeout)
    finally:
        for scenario, pool in pools.items():
            exit_codes[scenario] = pool.close(join_timeout=60)
    return results, exit_codes


def record_fault(world_size: int, case: str, rank: int, error: str, seconds: float) -> None:
    """One CUDA row of the fault table (tests/fault_table.py)."""
    fault_table.record("cuda", world_size, case, rank, error, seconds)


def timeout_problems(label: str, results: list, exit_codes: list, timeout_s: float) -> list[str]:
    """What is wrong with a scenario where rank 0 alone called a communication op (its result
    first): reported too early or too late, another rank called it, or a rank did not exit."""
    first, *others = results
    problems = []
    if not timeout_s - 1 <= first["elapsed"] <= 60:
        problems.append(f"{label}: reported after {first['elapsed']:.1f} s, expected about "
                        f"the {timeout_s} s timeout")
    if any(other["called"] for other in others):
        problems.append(f"{label}: another rank called the op")
    if exit_codes != [0] * len(results):
        problems.append(f"{label}: ranks did not exit cleanly within 60 s: exit codes "
                        f"{exit_codes} (None: killed)")
    return problems


def all_reduce(t) -> None:
    """``dist.all_reduce`` of a CUDA tensor in place, over NCCL or (ranks sharing a GPU) gloo
    through a host copy."""
    import torch.distributed as dist

    if dist.get_backend() == dist.Backend.NCCL:
        dist.all_reduce(t)
        return
    host = t.cpu()
    dist.all_reduce(host)
    t.copy_(host)


def all_gather_into_tensor(out, t) -> None:
    import torch.distributed as dist

    if dist.get_backend() == dist.Backend.NCCL:
        dist.all_gather_into_tensor(out, t)
        return
    host = out.cpu()
    dist.all_gather_into_tensor(host, t.cpu())
    out.copy_(host)


def close_pool(world_size: int) -> None:
    pool = _POOLS.pop(world_size, None)
    if pool is not None:
        pool.close(kill=pool.broken)


def close_pools() -> None:
    for world_size in list(_POOLS):
        close_pool(world_size)


atexit.register(close_pools)
