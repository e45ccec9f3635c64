"""Spawning the ranks and the command line entry point."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import _build
from .cases import _create_buffer, _progress, run_cases
from .host import host_modes, measure_host
from .report import best_rows, format_report, plot_bandwidth, write_outputs
from .settings import GPU_ENV_DEFAULTS, Settings, parse_args


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rank_main(rank: int, s: Settings, port: int, result_path: str) -> None:
    """Entry point of a spawned rank: set up, time, and (rank 0) write the results."""
    if s.shared_gpu:
        per_gpu = -(-s.num_ranks // torch.cuda.device_count())
        # Read when CUDA starts in this process: each rank's equal SM share.
        os.environ.setdefault("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", str(100 // per_gpu))
        device = torch.device("cuda", rank // per_gpu)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=s.num_ranks)
    elif s.on_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=s.num_ranks, device_id=device)
    else:
        device = torch.device("cpu")
        # The ranks share the host's cores: intra-op threads beyond a fair share only contend.
        torch.set_num_threads(max(1, _available_cpus() // s.num_ranks))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=s.num_ranks)
    group = dist.group.WORLD
    buffer = _create_buffer(group, s)
    try:
        results = run_cases(rank, s, group, device, buffer)
        host = None  # an internode run has no host table (the report says so)
        if host_modes(s):
            _progress(rank, "host time per eager call (every op, with and without grad) ...")
            host = measure_host(rank, s, group, device, buffer)
    finally:
        buffer.destroy()
    if rank == 0:
        report = {
            "settings": dataclasses.asdict(s),
            "device": torch.cuda.get_device_name(device) if s.on_gpu else "cpu",
            "torch": torch.__version__,
            "build_info": _build.build_info(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "results": results,
            "host": host,
        }
        with open(result_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(s: Settings) -> dict:
    """Spawn ``s.num_ranks`` rank processes, wait for them, and return rank 0's report."""
    if s.on_gpu:
        for key, value in GPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="deep_ep_ops_bench_") as tmp:
        result_path = os.path.join(tmp, "results.json")
        mp.spawn(_rank_main, args=(s, _free_port(), result_path), nprocs=s.num_ranks, join=True)
        with open(result_path) as f:
            return json.load(f)



def main(argv: Optional[Sequence[str]] = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    try:
        report = launch(settings)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        print(f"deep_ep_ops.bench: a rank failed:\n{error}", file=sys.stderr)
        return 1
    report["summary"] = best_rows(report)
    table = format_report(report)
    if settings.out:
        for path in write_outputs(report, table, settings.out):
            print(f"wrote {path}", file=sys.stderr)
    if settings.plot:
        plot_bandwidth(report, settings.plot)
        print(f"wrote {settings.plot}", file=sys.stderr)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(table, flush=True)  # the tables are the last thing on stdout
    return 0
