"""What every example shares: transport defaults, rank spawning and the pass/fail handshake."""

from __future__ import annotations

import os
import socket
import sys

# NVLink multicast off (NCCL NVLS, symmetric-memory multicast, NVSHMEM NVLS): not every machine
# supports it, and nothing here needs it. Set before torch starts any communicator.
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``."""
    scale = expected.abs().max().float().clamp_min(torch.finfo(torch.float32).tiny)
    return float((actual.float() - expected.float()).abs().max() / scale)


def spawn(run, num_ranks: int, args) -> int:
    """Run ``run(rank, num_ranks, args, port)`` on ``num_ranks`` processes; 0 if all succeed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(run, args=(num_ranks, args, port), nprocs=num_ranks, join=True)
    except mp.ProcessExitedException as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


def init_rank(rank: int, num_ranks: int, port: int, *, require_cuda: bool = False) -> torch.device:
    """Join the process group: NCCL with one GPU per rank when there are enough, else gloo."""
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= num_ranks
    if require_cuda and not use_cuda:
        raise RuntimeError(f"needs {num_ranks} CUDA GPUs (one per rank)")
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=num_ranks, **({"device_id": device} if use_cuda else {}),
    )
    torch.set_num_threads(1)
    return device


def decode_moe(args, rank: int, num_ranks: int, device: torch.device, dtype: torch.dtype,
               use_fp8: bool):
    """``(buffer, moe)``: a low-latency ``Buffer`` sized for ``args`` (tokens = M, hidden,
    experts per rank) and the example MoE layer dispatching through it, in eval mode."""
    import torch.distributed as dist

    from deep_ep_ops import Buffer
    from deep_ep_ops.nn import ExampleMoE, MoEDispatcher, buffer_size_hints

    num_experts = args.experts_per_rank * num_ranks
    _, num_rdma_bytes = buffer_size_hints(
        args.hidden, num_ranks, num_experts, num_max_dispatch_tokens_per_rank=args.tokens
    )
    buffer = Buffer(dist.group.WORLD, 0, num_rdma_bytes, low_latency_mode=True)
    dispatcher = MoEDispatcher(
        buffer, num_experts, "low_latency", num_max_dispatch_tokens_per_rank=args.tokens,
        use_fp8=use_fp8,
    )
    moe = ExampleMoE(
        dispatcher, args.hidden, args.ffn_hidden, args.top_k, rank=rank, seed=args.seed,
        dtype=dtype, device=device,
    ).eval()
    return buffer, moe


def finish(ok: bool, buffer, device: torch.device) -> None:
    """Agree on success across ranks, tear down, and exit non-zero on any rank's failure."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    buffer.destroy()
    dist.destroy_process_group()
    if not flag.item():
        sys.exit(1)
