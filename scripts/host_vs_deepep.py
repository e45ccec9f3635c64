"""Host time per eager normal-mode call: deep_ep_ops beside DeepEP V1, same inputs, same method.

    python scripts/host_vs_deepep.py --deepep PATH [--num-ranks 2] [--rounds 3]

``PATH`` is an unpacked DeepEP V1 tree with its extension built in place (``python setup.py
build_ext --inplace``; ``scripts/gpu_run.sh`` does that with ``DEEPEP=PATH``). DeepEP's
intranode kernels need at least 2 ranks, so the ranks are processes: one per GPU, or all on
one GPU under CUDA MPS (start the daemon first; ``DEEPEP_HOST=1 scripts/gpu_run.sh`` does)
over a gloo group, as in the bench's ``--backend gloo-cuda``. Every rank makes a
``deep_ep_ops.Buffer`` and a DeepEP ``Buffer`` of the same NVLink bytes (no NVSHMEM) and
runs the bench's normal-mode host cases through each in turn, round after round, with the
bench's method and inputs (``python -m deep_ep_ops.bench`` host table: 128 tokens, hidden 7168,
top-8 of 256 experts; 100 back-to-back calls while the GPU sleeps, a ``torch.add`` right
after them in each of 15 repeats; the data-dependent ``dispatch`` as wall time minus GPU busy
time), without grad (DeepEP has no autograd). Prints per op the medians over the rounds of
the max over ranks. Host time only: with several ranks on one GPU the kernels' times are not
performance figures, and none is shown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deep_ep_ops import bench
from deep_ep_ops.bench.cli import _free_port


def _rank(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key, value in bench.GPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, os.path.abspath(args.deepep))
    deep_ep = importlib.import_module("deep_ep")
    if "deep_ep_ops" in (getattr(deep_ep, "__file__", "") or ""):
        raise SystemExit(f"--deepep {args.deepep}: no DeepEP package there")
    import deep_ep_ops

    shared = torch.cuda.device_count() < args.num_ranks
    device = torch.device("cuda", 0 if shared else rank)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo", rank=rank, world_size=args.num_ranks)
    group = dist.group.WORLD
    s = bench.parse_args(["--num-ranks", str(args.num_ranks), "--backend", "gloo-cuda",
                          "--mode", "normal"])
    num_nvl_bytes, _ = bench.buffer_sizes(s)
    buffers = {"deep_ep_ops": deep_ep_ops.Buffer(group, num_nvl_bytes, 0, device="cuda"),
               "DeepEP": deep_ep.Buffer(group, num_nvl_bytes, 0)}
    sleep = bench._GpuSleep()
    cases = [c for c in bench.HOST_CASES if c.mode == bench.NORMAL]
    setups = {name: bench._host_setup(b, s, rank, device, bench.NORMAL)
              for name, b in buffers.items()}
    samples: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for _ in range(args.rounds):
        for case in cases:
            for name, buffer in buffers.items():
                row = bench.measure_host_case(case, buffer, setups[name], False, device, group,
                                              sleep)[0]
                samples.setdefault((case.ops[0], name), []).append(
                    (row["host_us"], row["op_layer_us"], row["method"]))
    gathered: list = [None] * args.num_ranks
    dist.all_gather_object(gathered, samples, group=group)
    buffers["deep_ep_ops"].destroy()
    dist.barrier(group=group)
    if rank == 0:
        _print(gathered, cases, args, device)
    dist.destroy_process_group()


def _print(gathered, cases, args, device) -> None:
    print(f"host us per eager call through Buffer, {args.num_ranks} ranks "
          f"({'one GPU under MPS' if torch.cuda.device_count() < args.num_ranks else 'a GPU each'}"
          f", {torch.cuda.get_device_name(device)}), 128 tokens, hidden 7168, top-8 of 256 "
          f"experts, no grad; per round the max over ranks, then the median over {args.rounds} "
          "rounds; op layer = host - the torch.add timed beside it")
    header = ("op", "ours host", "ours op layer", "DeepEP host", "DeepEP op layer",
              "ours / DeepEP host")
    print("  ".join(f"{h:>18}" for h in header))
    for case in cases:
        op = case.ops[0]
        med = {}
        for name in ("deep_ep_ops", "DeepEP"):
            rounds = zip(*(g[(op, name)] for g in gathered))  # per round, every rank's sample
            per_round = [(max(r[0] for r in rs), max(r[1] for r in rs)) for rs in rounds]
            med[name] = [statistics.median(v[i] for v in per_round) for i in (0, 1)]
        ours, theirs = med["deep_ep_ops"], med["DeepEP"]
        print("  ".join(f"{v:>18}" for v in (
            op, f"{ours[0]:.1f}", f"{ours[1]:+.1f}", f"{theirs[0]:.1f}", f"{theirs[1]:+.1f}",
            f"{ours[0] / theirs[0]:.2f}x")))
    for name in ("deep_ep_ops", "DeepEP"):  # a call found waiting for the GPU is timed synced
        methods = sorted({f"{op}: {m}" for g in gathered for (op, n), v in g.items()
                          if n == name for *_, m in v})
        print(f"methods, {name}: " + "; ".join(methods))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepep", required=True, help="DeepEP tree with deep_ep_cpp built")
    parser.add_argument("--num-ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    mp.spawn(_rank, args=(args, _free_port()), nprocs=args.num_ranks, join=True)


if __name__ == "__main__":
    main()
