"""A low-latency MoE decode loop under ``torch.compile(fullgraph=True)``, checked against eager.

    python examples/decode_compiled.py                 # 2 gloo ranks on CPU (Inductor)
    python examples/decode_compiled.py --num-ranks 4 --steps 8 --no-fp8

Each decode step runs, for a batch of new tokens on every rank:
router -> ``low_latency_dispatch`` (FP8 with per-128-channel scales by default) -> the rank's
local experts on their static ``[R*M, H]`` slabs -> ``low_latency_combine`` (weighted). Every
shape is static and no op syncs with the host, so the whole step is one graph: compiling with
``fullgraph=True`` fails loudly on any graph break. On CPU the backend is Inductor; with CUDA
(NCCL, one GPU per rank) it uses ``mode="reduce-overhead"``, i.e. Inductor plus CUDA graphs.

Each step's compiled output is compared with the eager module's on the same tokens. The
``deep_ep`` ops and the matmuls run the same kernels in both, but Inductor fuses the
dequantisation, SiLU and softmax into its own kernels, which may round differently, so the check
allows a few units of the model dtype's rounding (often the results are bit-identical). The step
is compiled once: the script fails if a later step recompiles.
"""

from __future__ import annotations

import argparse
import sys
import time

from _launch import decode_moe, finish, init_rank, relative_error, spawn  # noqa: E402  (sets transport env first)

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Norm-wise relative tolerance, max|compiled - eager| <= TOL * max|eager|: a few ulps of dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8, help="tokens per rank and step (= M)")
    parser.add_argument("--hidden", type=int, default=256, help="a multiple of 128 for FP8")
    parser.add_argument("--ffn-hidden", type=int, default=128)
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--no-fp8", dest="use_fp8", action="store_false",
                        help="dispatch in the model dtype instead of FP8")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead"), default=None,
                        help="torch.compile mode (default: reduce-overhead with CUDA, else "
                        "default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(rank: int, num_ranks: int, args, port: int) -> None:
    device = init_rank(rank, num_ranks, port)
    use_cuda = device.type == "cuda"
    torch._inductor.config.compile_threads = 1  # the ranks share the machine's cores
    dtype = DTYPES[args.dtype]
    M = args.tokens
    buffer, moe = decode_moe(args, rank, num_ranks, device, dtype, args.use_fp8)
    mode = args.compile_mode or ("reduce-overhead" if use_cuda else "default")
    compiled = torch.compile(moe, fullgraph=True, mode=mode)
    if rank == 0:
        print(f"{num_ranks} ranks, {'NCCL on CUDA' if use_cuda else 'gloo on CPU'}, "
              f"torch.compile mode={mode}, {dtype}, {'FP8' if args.use_fp8 else 'no-FP8'} "
              f"dispatch, E={args.experts_per_rank * num_ranks}, top-{args.top_k}, T=M={M}, H={args.hidden}",
              flush=True)

    tolerance = TOLERANCE[dtype]
    ok = True
    with torch.no_grad():
        for step in range(args.steps):
            g = torch.Generator().manual_seed(args.seed * 7919 + step * num_ranks + rank)
            x = torch.randn(M, args.hidden, generator=g).to(dtype=dtype, device=device)
            start = time.perf_counter()
            # With CUDA graphs the output lives in the graph's memory pool: copy it out.
            out = compiled(x).clone()
            seconds = time.perf_counter() - start
            if step == 0:
                # Every later step must reuse this graph.
                torch.compiler.set_stance("fail_on_recompile")
            expected = moe(x)
            error = relative_error(out, expected)
            step_ok = bool(torch.isfinite(out).all()) and error <= tolerance
            ok &= step_ok
            if rank == 0:
                what = "compile + run" if step == 0 else "run"
                print(f"step {step}: {what} {seconds * 1e3:.1f} ms, "
                      f"max|compiled - eager|/max|eager| = {error:.1e}"
                      + ("" if step_ok else f"  MISMATCH (tolerance {tolerance:g})"), flush=True)
    torch.compiler.set_stance("default")
    # Drop the compiled graphs (CUDA graphs included) before the communicators go away.
    del compiled
    torch.compiler.reset()
    finish(ok, buffer, device)
    if rank == 0:
        print(f"OK: {args.steps} compiled decode steps match eager on every rank")


def main(argv=None) -> int:
    args = parse_args(argv)
    return spawn(run, args.num_ranks, args)


if __name__ == "__main__":
    sys.exit(main())
