"""Faults on the reference backend (gloo ranks): every failure is a clear, bounded error that
names the rank; nothing aborts, hangs or goes out of step.

Each scenario runs in fresh rank processes under a watchdog (the parent collects what each
rank reports before a deadline, then kills them all: the suite never hangs). The ops' timeout
is TIMEOUT_S; every error must come within TIMEOUT_S + 1 s of the call.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
from deep_ep_ops import ops
import fault_table
from distributed import RankPool, _free_port, _from_bytes

TIMEOUT_S = 2.0
BOUND_S = TIMEOUT_S + 1.0  # the bound: DEEP_EP_OPS_TIMEOUT_S + 1 s
E, T, H, K = 12, 6, 256, 2  # 12 experts: a multiple of 2 and 3 ranks
_KEPT = []  # buffers a rank keeps alive while it does something else


def _run(world_size: int, fn, *args, deadline_s: float = 60.0, silent=()) -> dict:
    """``fn(rank, world_size, *args)`` on fresh ranks; rank -> its result, ``("error", text)``
    or ``None`` (no report before the deadline: frozen, dead or stuck; the ``silent`` ranks
    are not waited for once the others reported). The ranks are killed afterwards whatever
    they do."""
    pool = RankPool(world_size, {"DEEP_EP_OPS_TIMEOUT_S": str(TIMEOUT_S)})
    try:
        for conn in pool.conns:
            conn.send((fn, args))
        end, results = time.monotonic() + deadline_s, {}
        order = [r for r in range(world_size) if r not in silent] + list(silent)
        for rank in order:
            conn = pool.conns[rank]
            if rank in silent:
                end = min(end, time.monotonic() + 1.0)
            try:
                ready = conn.poll(max(0.0, end - time.monotonic()))
                status, payload = conn.recv() if ready else (None, None)
            except (EOFError, OSError):  # the rank's process is gone
                status = None
            results[rank] = (None if status is None else _from_bytes(payload) if status == "ok"
                             else ("error", payload))
        return results
    finally:
        for proc in pool.procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)  # a frozen rank can then be killed cleanly
        pool.close(kill=True)


def _inputs(rank, world_size):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=g).bfloat16()
    topk = torch.randint(0, E, (T, K), generator=g)
    weights = torch.rand(T, K, generator=g)
    return x, topk, weights, ops.get_dispatch_layout(topk, E, world_size)


def _outcome(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except Exception as error:  # noqa: BLE001  (the test process checks type and message)
        return dict(type=type(error).__name__, message=str(error),
                    elapsed=time.monotonic() - start)
    return dict(type=None, message="", elapsed=time.monotonic() - start)


# --- a peer that stalls, freezes, dies or raises -------------------------------------------


def _faulty_peer(rank, world_size, fault):
    """Rank 1 misbehaves (``fault``) around a dispatch; the others report their error, then
    what a second call and destroy() do."""
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 0)
    x, topk, weights, layout = _inputs(rank, world_size)
    dispatch = lambda: ops.dispatch(buffer.name, x, layout, topk, weights)  # noqa: E731
    if rank == 1:
        _KEPT.append(buffer)
        if fault == "stalls":
            time.sleep(BOUND_S + 2)  # alive and answering, but late
        elif fault == "freezes":
            os.kill(os.getpid(), signal.SIGSTOP)  # answers nothing until the parent kills it
        elif fault == "dies":
            os._exit(3)
        elif fault == "dies inside":
            threading.Timer(0.5, os._exit, (3,)).start()  # while inside the exchange
            dispatch()
        elif fault == "raises":
            return _outcome(lambda: ops.dispatch(buffer.name, x[0], layout, topk, weights))
        return "rank 1 done"
    if fault == "dies inside":
        time.sleep(1.0)  # rank 1 is inside the exchange by then
    first = _outcome(dispatch)
    second = _outcome(dispatch)
    destroy = _outcome(buffer.destroy)
    return dict(first=first, second=second, destroy=destroy)


FAULTS = {  # fault -> (the error type on rank 0, what its message must say about rank 1)
    "stalls": ("TimeoutError", "rank 1 (never reached this call"),
    "freezes": ("TimeoutError", "rank 1 (does not answer"),
    "dies": (("RuntimeError", "TimeoutError"), "rank 1 (its process is gone)"),
    "dies inside": (("RuntimeError", "TimeoutError"), "rank 1 (its process is gone)"),
    "raises": ("TimeoutError", "rank 1 (raised ValueError: x must have 2 dims"),
}


@pytest.mark.parametrize("fault, num_ranks", [(fault, 2) for fault in FAULTS]
                         + [("stalls", 3), ("raises", 3)])
def test_a_faulty_peer_is_named_within_the_timeout(fault, num_ranks):
    silent = (1,) if fault in ("freezes", "dies", "dies inside") else ()
    results = _run(num_ranks, _faulty_peer, fault, deadline_s=60, silent=silent)
    for rank in range(num_ranks):
        if rank != 1:  # every survivor names rank 1
            _check_survivor(fault, results[rank])
            first = results[rank]["first"]
            fault_table.record("gloo", num_ranks, f"peer {fault} in dispatch", rank,
                               f"{first['type']}: {first['message']}", first["elapsed"])
    if fault == "raises":  # the rank that raised got its own clear error, at once
        assert results[1]["type"] == "ValueError" and results[1]["elapsed"] < 0.5, results[1]


def _check_survivor(fault, report):
    assert isinstance(report, dict), report
    kinds, says = FAULTS[fault]
    first = report["first"]
    assert first["type"] in ((kinds,) if isinstance(kinds, str) else kinds), first
    assert "deep_ep::dispatch" in first["message"] and says in first["message"], first
    assert first["elapsed"] <= BOUND_S, first
    # One behaviour after a failure: the buffer refuses further calls, at once.
    second = report["second"]
    assert second["type"] == "RuntimeError" and "unusable after a timeout" in second["message"]
    assert second["elapsed"] < 0.5, second
    # destroy() of the broken buffer returns at once (no meeting).
    assert report["destroy"]["type"] is None and report["destroy"]["elapsed"] < 0.5, report


# --- bounded creation and destroy ------------------------------------------------------------


def _absent_peer(rank, world_size, stage):
    """Rank 1 never creates the buffer (``stage="create"``) or never destroys it."""
    if stage == "create":
        if rank == 1:
            return "absent"
        return _outcome(lambda: deep_ep.Buffer(dist.group.WORLD, 1 << 26, 0))
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 0)
    if rank == 1:
        _KEPT.append(buffer)
        return "absent"
    destroy = _outcome(buffer.destroy)
    # The buffer is gone here; a new one on the same group, with everyone, works.
    return destroy


@pytest.mark.parametrize("stage", ["create", "destroy"])
def test_creation_and_destroy_are_bounded(stage):
    report = _run(2, _absent_peer, stage)[0]
    fault_table.record("gloo", 2, f"absent at {stage}", 0,
                       f"{report['type']}: {report['message']}", report["elapsed"])
    assert report["type"] == "TimeoutError", report
    assert report["elapsed"] <= BOUND_S, report
    if stage == "create":
        assert "rank(s) 1 did not create their Buffer" in report["message"], report
    else:
        assert "deep_ep::destroy" in report["message"], report
        assert "rank 1 (never reached this call" in report["message"], report


# --- interpreter exit after a timeout ----------------------------------------------------------

_EXIT_SCRIPT = textwrap.dedent("""
    import datetime, json, sys, time
    import torch, torch.distributed as dist
    import deep_ep_ops as deep_ep
    from deep_ep_ops import ops
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=600))
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 0)
    if rank == 1:
        time.sleep(60)  # stalls; the parent kills it
    topk = torch.randint(0, 8, (6, 2))
    layout = ops.get_dispatch_layout(topk, 8, 2)
    try:
        ops.dispatch(buffer.name, torch.randn(6, 256), layout, topk, torch.rand(6, 2))
    except TimeoutError:
        print(json.dumps({"failed_at": time.time()}), flush=True)
    # Leaves without destroy(), the buffer live: the interpreter exit must not wait for rank 1.
""")


@pytest.mark.parametrize("attempt", range(3))  # it once aborted at random: try it thrice
def test_interpreter_exit_after_a_timeout_is_bounded(tmp_path, attempt):
    script = tmp_path / "exit_after_timeout.py"
    script.write_text(_EXIT_SCRIPT)
    port = _free_port()
    env = dict(os.environ, DEEP_EP_OPS_TIMEOUT_S=str(TIMEOUT_S))
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port)], env=env,
                              stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=120)
        exited = time.time()
        assert procs[0].returncode == 0, out  # a clean exit, no abort
        failed_at = json.loads(out.strip().splitlines()[-1])["failed_at"]
        assert exited - failed_at <= BOUND_S, (exited - failed_at, out)
        assert procs[1].poll() is None  # the stalled rank was still there all along
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# --- names, threads and keys -------------------------------------------------------------------


def _names_from_threads(rank, world_size):
    """Two threads create buffers at once, each on its own group; then both work."""
    groups = [dist.new_group([0, 1]), dist.new_group([0, 1])]
    buffers = [None, None]

    def make(i):
        buffers[i] = deep_ep.Buffer(groups[i], 1 << 26, 0)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    x, topk, weights, layout = _inputs(rank, world_size)
    rows = [ops.dispatch(b.name, x, layout, topk, weights).recv_x.size(0) for b in buffers]
    names = [b.name for b in buffers]
    for b in buffers:
        b.destroy()
    return names, rows


def test_buffer_names_agree_when_made_from_threads():
    results = _run(2, _names_from_threads)
    (names_0, rows_0), (names_1, rows_1) = results[0], results[1]
    assert names_0 == names_1 and names_0[0] != names_0[1], results
    assert min(rows_0 + rows_1) > 0, results


def _keys_left(rank, world_size):
    store = dist.distributed_c10d._get_process_group_store(dist.group.WORLD)
    dist.barrier()
    before = store.num_keys()
    x, topk, weights, layout = _inputs(rank, world_size)
    for _ in range(3):
        buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 26, 0)
        ops.dispatch(buffer.name, x, layout, topk, weights)
        buffer.destroy()
    dist.barrier()
    return before, store.num_keys()


def test_buffers_leave_no_store_keys():
    results = _run(2, _keys_left)
    assert results[0][0] == results[0][1], results  # rank 0 hosts the store: its count is all


# --- the low-latency kernels' pinning call --------------------------------------------------------


def _pin_disagreement(rank, world_size):
    """reference.agree_on_pinned_shapes (the low-latency kernels call it at their pinning
    call): ranks that pin different shapes all raise naming the argument; agreeing ones pass."""
    from deep_ep_ops import reference

    buffer = deep_ep.Buffer(dist.group.WORLD, 0, 1 << 20, low_latency_mode=True)
    odd = rank == 0
    disagree = _outcome(lambda: reference.agree_on_pinned_shapes(
        "low_latency_dispatch", buffer.name, 8 + odd, 256, 12))
    agree = _outcome(lambda: reference.agree_on_pinned_shapes(
        "low_latency_dispatch", buffer.name, 8, 256, 12))
    buffer.destroy()
    return disagree, agree


def test_pinned_shapes_must_agree():
    for rank, (disagree, agree) in _run(2, _pin_disagreement).items():
        assert disagree["type"] == "ValueError", (rank, disagree)
        assert ("the ranks disagree on num_max_dispatch_tokens_per_rank (rank 0: 9, rank 1: 8)"
                in disagree["message"]), (rank, disagree)
        assert agree["type"] is None, (rank, agree)
