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
    parser.add_argument("--layers", action="store_true",
                        help="instead: the host µs of each layer of the normal-mode calls "
                             "(kernel entry, ops, Buffer) against torch.add, interleaved")
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
        if args.layers:
            _layers(buffer, bench._host_setup(buffer, s, 0, device, bench.NORMAL), sleep, device)
            return
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


def _layers(buffer, h, sleep, device, calls: int = 100, repeats: int = 15) -> None:
    """Host µs per call of each layer of the capacity, cached dispatch and combine calls (no
    grad), while the GPU sleeps: the kernel entry called directly, ``ops``, ``Buffer``, each
    block of ``calls`` calls right after a ``torch.add`` block; medians over ``repeats`` of the
    block and of its difference to the ``torch.add`` block before it."""
    from deep_ep_ops import ops
    from deep_ep_ops.config import default_config_list

    x, w, topk_idx = h.inputs.x, h.inputs.topk_weights, h.inputs.topk_idx
    per_rank, _, per_expert, in_rank = h.layout
    worst, name, handle = h.num_worst_tokens, buffer.name, h.handle
    cfg = default_config_list("dispatch", buffer.group_size, buffer.num_sms)
    ccfg = default_config_list("combine", buffer.group_size, buffer.num_sms)
    kernels = _build._C
    d_args = (x, None, topk_idx, w, per_rank, in_rank, per_expert, name, 1, worst, cfg)
    c_args = (x, None, None, *handle[:6], name, handle.num_worst_tokens, cfg)
    m_args = (h.recv_x, None, None, None, *handle[:6], name, handle.num_worst_tokens, ccfg)
    xg, wg = (t.detach().clone().requires_grad_() for t in (x, w))
    rg = h.recv_x.detach().clone().requires_grad_()
    cases = {
        "torch.empty (one allocation)": lambda: torch.empty(1 << 20, device=device),
        "capacity: _C entry": lambda: kernels.capacity_dispatch(*d_args),
        "capacity: ops._dispatch": lambda: ops._dispatch(
            name, x, per_rank, in_rank, per_expert, topk_idx, w, None, 1, worst, cfg),
        "capacity: Buffer.dispatch": lambda: buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=w,
            num_worst_tokens=worst),
        "cached: _C entry": lambda: kernels.cached_dispatch(*c_args),
        "cached: ops.cached_dispatch": lambda: ops.cached_dispatch(name, x, handle),
        "cached: Buffer.dispatch": lambda: buffer.dispatch(x, handle=handle),
        "combine: _C entry": lambda: kernels.combine(*m_args),
        "combine: ops.combine": lambda: ops.combine(name, h.recv_x, handle),
        "combine: Buffer.combine": lambda: buffer.combine(h.recv_x, handle),
        "grad capacity: Buffer.dispatch": lambda: buffer.dispatch(
            xg, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=wg,
            num_worst_tokens=worst),
        "grad cached: Buffer.dispatch": lambda: buffer.dispatch(xg, handle=handle),
        "grad combine: Buffer.combine": lambda: buffer.combine(rg, handle),
    }
    if kernels is None:  # CPU: the reference through the ops only
        cases = {k: v for k, v in cases.items() if "_C entry" not in k}
    base = lambda: torch.add(topk_idx, 1)  # noqa: E731
    base_grad = lambda: torch.add(wg, 1)  # noqa: E731 (grad rows: a node recorded too)

    def block(fn) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e6

    print(f"layers: us per call, {calls} calls per block, medians of {repeats} blocks")
    print(f"  {'call':<30} {'host us':>8} {'- torch.add':>12} {'torch.add':>10}  (grad rows: "
          "torch.add of a leaf that requires grad)")
    for label, fn in cases.items():
        for _ in range(10):
            fn()
        own, diff, bases = [], [], []
        for _ in range(repeats):
            if sleep is not None:
                torch.cuda.synchronize(device)
                sleep(2 * calls * 60.0 + 10_000)
            b = block(base_grad if label.startswith("grad") else base)
            t = block(fn)
            own.append(t), bases.append(b), diff.append(t - b)
        if sleep is not None:
            torch.cuda.synchronize(device)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        print(f"  {label:<30} {med(own):8.2f} {med(diff):+12.2f} {med(bases):10.2f}")


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
