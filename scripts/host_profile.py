"""Where an eager call's host time goes: cProfile over the bench's host cases, one rank.

    python scripts/host_profile.py [--ops dispatch combine ...] [--calls 200] [--top 12]

Runs each host case of ``python -m deep_ep_ops.bench`` (the same inputs and ``Buffer`` calls)
``--calls`` times under cProfile, with and without inputs that require grad, while a long
``torch.cuda._sleep`` keeps the GPU busy (so no call waits for it; a case that syncs is profiled
all the same), and prints per case the wall µs per call and the functions with the most own
time. With ``DEEP_EP_OPS_HOST_TRACE=1`` it also prints, per case, the mean µs of each step the
C++ entries mark (checks, allocations, launches, the count wait, the conversion to Python;
``HostTrace`` in csrc/torch_common.h), timed in a second run without cProfile. A development
tool: the numbers of record come from the bench.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch
import torch.distributed as dist

from deep_ep_ops import _build, bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", default=None,
                        help="substrings of host-case row names to profile (default: all)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for key, value in bench.GPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    group = dist.group.WORLD
    s = bench.parse_args(["--num-ranks", "1", "--backend", "nccl" if on_gpu else "gloo"])
    buffer = bench._create_buffer(group, s)
    sleep = bench._GpuSleep() if on_gpu else None
    try:
        for mode in s.modes:
            setup = bench._host_setup(buffer, s, 0, device, mode)
            for case in (c for c in bench.HOST_CASES if c.mode == mode):
                if args.ops and not any(o in name for o in args.ops for name in case.ops):
                    continue
                for requires_grad in (False, True):
                    if requires_grad and case.no_grad_reason:
                        continue
                    _profile(case, buffer, setup, requires_grad, args, sleep, device)
    finally:
        buffer.destroy()
        dist.destroy_process_group()


def _profile(case, buffer, setup, requires_grad, args, sleep, device) -> None:
    phases = case.build(buffer, setup, requires_grad)
    for _ in range(10):
        bench._run_host_phases(phases)
    if sleep is not None:
        torch.cuda.synchronize(device)
        sleep(min(args.calls * 400.0 + 10_000, bench.HOST_MAX_SLEEP_US))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.calls):
        bench._run_host_phases(phases)
    profiler.disable()
    wall_us = (time.perf_counter() - start) / args.calls * 1e6
    if sleep is not None:
        torch.cuda.synchronize(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"=== {' + '.join(case.ops)} ({case.inputs}, grad={requires_grad}): "
          f"{wall_us:.1f} us per call under cProfile")
    lines = text.getvalue().splitlines()
    start_at = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join(line for line in lines[start_at:] if line.strip()))
    if os.environ.get("DEEP_EP_OPS_HOST_TRACE") == "1":
        _print_host_trace(phases, args.calls, sleep, device)


def _extensions():
    return [m for m in (_build._C, getattr(_build, "_C_nvshmem", None))
            if m is not None and hasattr(m, "host_trace")]


def _print_host_trace(phases, calls: int, sleep, device) -> None:
    """The C++ steps of the same calls, without cProfile, while the GPU sleeps."""
    for module in _extensions():
        module.host_trace()  # clear
    if sleep is not None:
        torch.cuda.synchronize(device)
        sleep(min(calls * 400.0 + 10_000, bench.HOST_MAX_SLEEP_US))
    start = time.perf_counter()
    for _ in range(calls):
        bench._run_host_phases(phases)
    wall_us = (time.perf_counter() - start) / calls * 1e6
    if sleep is not None:
        torch.cuda.synchronize(device)
    print(f"  C++ steps ({wall_us:.1f} us per call without cProfile): mean us per mark")
    for module in _extensions():
        for step, (marks, mean_us) in sorted(module.host_trace().items()):
            print(f"    {step:<48} {mean_us:8.2f}  ({marks} marks)")


if __name__ == "__main__":
    main()
