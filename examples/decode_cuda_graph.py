"""One low-latency MoE decode step captured in a CUDA graph and replayed with fresh tokens.

    python examples/decode_cuda_graph.py                 # every visible GPU, one rank each
    python examples/decode_cuda_graph.py --num-ranks 2 --replays 20

A decode step (router -> ``low_latency_dispatch`` in FP8 -> local experts ->
``low_latency_combine``) has static shapes and never syncs with the host, so it can be captured
once with ``torch.cuda.CUDAGraph`` and replayed: each replay copies new tokens into the graph's
static input, replays, and is checked against the eager module on the same tokens. Eager calls
are interleaved with the replays on purpose: the low-latency state must stay correct when
captured and eager calls mix (docs/DESIGN.md §5, "CUDA-graph safety").

Needs CUDA GPUs (one per rank, NCCL); without them it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import sys

from _launch import decode_moe, finish, init_rank, relative_error, spawn  # noqa: E402  (sets transport env first)

import torch
import torch.distributed as dist

# Replay and eager run the same kernels on the same inputs; allow for a different cuBLAS
# algorithm choice under capture all the same (a few bf16 ulps, norm-wise).
TOLERANCE = 2e-2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-ranks", type=int, default=0, help="default: every visible GPU")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per rank (= M)")
    parser.add_argument("--hidden", type=int, default=1024, help="a multiple of 128 for FP8")
    parser.add_argument("--ffn-hidden", type=int, default=512)
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(rank: int, num_ranks: int, args, port: int) -> None:
    device = init_rank(rank, num_ranks, port, require_cuda=True)
    M = args.tokens
    buffer, moe = decode_moe(args, rank, num_ranks, device, torch.bfloat16, use_fp8=True)

    def tokens(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(args.seed * 7919 + step * num_ranks + rank)
        return torch.randn(M, args.hidden, generator=g).to(torch.bfloat16).to(device)

    ok = True
    with torch.no_grad():
        static_x = tokens(0)
        # Warm up on a side stream (lazy initialisation, NCCL communicators, cuBLAS handles)
        # before capturing, as torch.cuda.graph's documentation asks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                moe(static_x)
        torch.cuda.current_stream().wait_stream(side)
        dist.barrier()

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe(static_x)

        for step in range(1, args.replays + 1):
            x = tokens(step)
            static_x.copy_(x)
            graph.replay()
            replayed = static_out.clone()
            expected = moe(x)  # an eager step between two replays
            error = relative_error(replayed, expected)
            step_ok = bool(torch.isfinite(replayed).all()) and error <= TOLERANCE
            ok &= step_ok
            if rank == 0:
                print(f"replay {step}: max|replay - eager|/max|eager| = {error:.1e}"
                      f"{' (bit-identical)' if torch.equal(replayed, expected) else ''}"
                      + ("" if step_ok else f"  MISMATCH (tolerance {TOLERANCE:g})"), flush=True)

        # Every rank replays: the graph holds collectives, so a rank replaying alone would wait
        # for its peers forever.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        if rank == 0:
            print(f"graph replay: {start.elapsed_time(end) / 10 * 1e3:.0f} us per decode step "
                  "(rank 0)", flush=True)

    del graph  # release the captured pools before the buffer goes
    finish(ok, buffer, device)
    if rank == 0:
        print(f"OK: {args.replays} replays of the captured decode step match eager on every rank")


def main(argv=None) -> int:
    args = parse_args(argv)
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    num_ranks = args.num_ranks or num_gpus
    if num_gpus == 0:
        print("skipped: needs CUDA GPUs (CUDA graphs capture GPU work; none is visible)")
        return 0
    if num_ranks > num_gpus:
        print(f"skipped: needs {num_ranks} CUDA GPUs (one per rank), found {num_gpus}")
        return 0
    print(f"{num_ranks} ranks, NCCL, one GPU each; bf16 model, FP8 low-latency dispatch, "
          f"T=M={args.tokens}, H={args.hidden}", flush=True)
    return spawn(run, num_ranks, args)


if __name__ == "__main__":
    sys.exit(main())
