"""Train an expert-parallel MoE layer with autograd and check it against a dense MoE.

    python examples/train_moe.py                      # 2 gloo ranks on CPU, normal mode
    python examples/train_moe.py --mode capacity      # static rows (num_worst_tokens)
    python examples/train_moe.py --mode low_latency --num-ranks 4

Every rank owns ``--experts-per-rank`` experts of a ``deep_ep_ops.nn.ExampleMoE`` layer and a
copy of the router. Each step every rank runs its own tokens through
router -> dispatch -> local experts -> combine, takes a loss and calls ``backward()``: the
gradients flow back through the ``deep_ep`` ops (dispatch's backward is a combine, combine's a
cached dispatch), so each expert's gradient, computed on its owner, includes every rank's tokens.
The router is replicated, so its gradients are summed over ranks (data parallel) before SGD.

Rank 0 also holds the whole MoE on one process (``deep_ep_ops.nn.DenseMoE``, built from the same
seeds), runs every rank's tokens through it and checks at every step that the loss, the input
gradients and all parameter gradients agree; it exits non-zero on a mismatch. With CUDA and at
least ``--num-ranks`` GPUs the ranks use NCCL, one GPU each; otherwise gloo on CPU.
"""

from __future__ import annotations

import argparse
import sys

from _launch import finish, init_rank, relative_error, spawn  # noqa: E402  (sets transport env first)

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Norm-wise relative tolerance: max|a - b| <= TOL * max|b|. The distributed and dense runs
# differ only in the order of float additions (per-rank partial sums, then the combine).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-ranks", type=int, default=2)
    parser.add_argument("--mode", choices=("normal", "capacity", "low_latency"), default="normal")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn-hidden", type=int, default=96)
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def batch(step: int, args, num_ranks: int, dtype, device):
    """Every rank's ``(x, target)`` for ``step``: the same on every process (so rank 0 can feed
    the dense model all of them), each rank then takes its own slice."""
    g = torch.Generator().manual_seed(args.seed * 7919 + step)
    shape = (num_ranks, args.tokens, args.hidden)
    x, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x.to(dtype=dtype, device=device), target.to(dtype=dtype, device=device)


def run(rank: int, num_ranks: int, args, port: int) -> None:
    from deep_ep_ops import Buffer
    from deep_ep_ops.nn import DenseMoE, ExampleMoE, MoEDispatcher, buffer_size_hints

    device = init_rank(rank, num_ranks, port)
    use_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    num_experts = args.experts_per_rank * num_ranks
    M = args.tokens  # low-latency: max tokens per rank
    num_nvl_bytes, num_rdma_bytes = buffer_size_hints(
        args.hidden, num_ranks, num_experts, element_size=dtype.itemsize,
        num_max_dispatch_tokens_per_rank=M,
    )
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True)
    dispatcher = MoEDispatcher(
        buffer, num_experts, args.mode,
        num_max_dispatch_tokens_per_rank=M if args.mode == "low_latency" else None,
    )
    moe = ExampleMoE(
        dispatcher, args.hidden, args.ffn_hidden, args.top_k, rank=rank, seed=args.seed,
        dtype=dtype, device=device,
    )
    optimizer = torch.optim.SGD(moe.parameters(), lr=args.lr)
    dense = dense_optimizer = None
    if rank == 0:
        dense = DenseMoE(
            args.hidden, args.ffn_hidden, num_experts, args.top_k, seed=args.seed, dtype=dtype
        ).to(device)
        dense_optimizer = torch.optim.SGD(dense.parameters(), lr=args.lr)
        print(f"{num_ranks} ranks, {'NCCL on CUDA' if use_cuda else 'gloo on CPU'}, "
              f"mode={args.mode}, {dtype}, E={num_experts}, top-{args.top_k}, "
              f"T={args.tokens}/rank, H={args.hidden}", flush=True)

    tolerance = TOLERANCE[dtype]
    loss_dtype = torch.promote_types(dtype, torch.float32)
    ok = True
    for step in range(args.steps):
        xs, targets = batch(step, args, num_ranks, dtype, device)
        x = xs[rank].clone().requires_grad_()
        # The global loss is the mean over all ranks' tokens; each rank contributes its share.
        loss = ((moe(x) - targets[rank]).to(loss_dtype) ** 2).sum() / (
            num_ranks * args.tokens * args.hidden
        )
        optimizer.zero_grad()
        loss.backward()

        # Replicated router: sum its gradients over ranks (data parallel), as any DP setup does.
        dist.all_reduce(moe.router.weight.grad)
        # Collect what rank 0 compares: the loss, every rank's input gradients, every expert's
        # parameter gradients (rank r holds experts r*L .. r*L + L - 1).
        total_loss = loss.detach().clone()
        dist.all_reduce(total_loss)
        grad_x = [torch.empty_like(x) for _ in range(num_ranks)]
        dist.all_gather(grad_x, x.grad)
        expert_grads = torch.cat([p.grad.flatten() for p in moe.experts.parameters()])
        all_expert_grads = [torch.empty_like(expert_grads) for _ in range(num_ranks)]
        dist.all_gather(all_expert_grads, expert_grads)

        if rank == 0:
            dense_x = xs.reshape(-1, args.hidden).clone().requires_grad_()
            dense_out = dense(dense_x) - targets.reshape(-1, args.hidden)
            dense_loss = (dense_out.to(loss_dtype) ** 2).mean()
            dense_optimizer.zero_grad()
            dense_loss.backward()
            errors = {
                "loss": relative_error(total_loss, dense_loss.detach()),
                "grad x": relative_error(torch.cat(grad_x), dense_x.grad),
                "grad router": relative_error(moe.router.weight.grad, dense.router.weight.grad),
                "grad experts": relative_error(
                    torch.cat(all_expert_grads),
                    torch.cat([p.grad.flatten() for p in dense.experts.parameters()]),
                ),
            }
            step_ok = all(e <= tolerance for e in errors.values())
            ok &= step_ok
            print(f"step {step}: loss {float(total_loss):.6f} (dense {dense_loss.item():.6f}); "
                  "max|diff|/max|ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
                  + ("" if step_ok else f"  MISMATCH (tolerance {tolerance:g})"), flush=True)
            dense_optimizer.step()
        optimizer.step()

    finish(ok, buffer, device)
    if rank == 0:
        print(f"OK: {args.steps} steps, loss and gradients match the dense MoE")


def main(argv=None) -> int:
    args = parse_args(argv)
    return spawn(run, args.num_ranks, args)


if __name__ == "__main__":
    sys.exit(main())
