"""The internode forward stage alone (csrc/nvshmem/internode.cu; docs/DESIGN.md section 5): after
it, every forwarder's region for each source node holds that source's stream to its node, in
source token order, with the token's scales, top-k, weights, destination mask, source index and
its source's token count (the records of tests/staged_internode.py's forward),
and every rank's send_rdma_head gives each token's index in its stream to each node.

At 2 ranks as 2 nodes of 1 and at 4 ranks as 2 nodes of 2 (the one-GPU multi-rank mode, or one
rank per GPU), on a low-latency buffer's symmetric memory (the development entry
``_C_nvshmem.internode_forward``). Several calls in a row (the regions reused, the ready and
arrival counts growing), BF16 and FP8 rows, random routing with -1 entries and tokens that go
nowhere, and a rank with no tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deep_ep_ops import Buffer, _build
from gpu_distributed import max_ranks, run_on_gpus
from gpu_helpers import Diffs, _assert_no_diffs, _device, _generator, world_size  # noqa: F401

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(max_ranks() < 2, reason="needs 2 CUDA GPUs, or one under CUDA MPS"),
    pytest.mark.skipif(
        not hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"),
        reason="the NVSHMEM kernels with the internode forward are not built",
    ),
]

RDMA_BYTES = 256 << 20


def _inputs(rank, call, num_tokens, hidden, num_topk, num_experts, num_ranks, fp8, device):
    g = _generator(device, 1000 * call + rank)
    x = torch.randn(num_tokens, hidden, generator=g, device=device).to(torch.bfloat16)
    scales = None
    if fp8:
        x = x.to(torch.float8_e4m3fn)
        scales = torch.rand(num_tokens, hidden // 128, generator=g, device=device)
    scores = torch.rand(num_tokens, num_experts, generator=g, device=device)
    topk = scores.topk(num_topk, dim=1).indices
    drop = torch.rand(num_tokens, num_topk, generator=g, device=device) < 0.2
    topk = topk.masked_fill(drop, -1)
    topk[::7] = -1  # tokens that go nowhere
    weights = torch.rand(num_tokens, num_topk, generator=g, device=device)
    per_rank = num_experts // num_ranks
    owner = torch.where(topk >= 0, topk // per_rank, -1)
    in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
    for k in range(num_topk):
        valid = owner[:, k] >= 0
        in_rank[valid.nonzero().squeeze(1), owner[valid, k]] = True
    return x, scales, topk, weights, in_rank


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(t.size(0), -1)


def _forward_job(rank, world_size, ranks_per_node, shapes):
    device = _device()
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=RDMA_BYTES, low_latency_mode=True)
    memory = buffer._comm.workspace
    nvshmem = _build._C_nvshmem
    diffs = Diffs()
    num_nodes = world_size // ranks_per_node
    my_node, my_local = rank // ranks_per_node, rank % ranks_per_node
    try:
        for call, (tokens, hidden, num_topk, num_experts, fp8, num_blocks) in enumerate(shapes):
            num_tokens = 0 if (call == 1 and rank == world_size - 1) else tokens  # one rank empty
            x, scales, topk, weights, in_rank = _inputs(
                rank, call, num_tokens, hidden, num_topk, num_experts, world_size, fp8, device)
            valid = topk >= 0
            experts = torch.bincount(topk[valid], minlength=num_experts).int()  # per expert
            head, per_node, off = nvshmem.internode_forward(
                buffer.name, x, scales, topk, weights, in_rank, experts, ranks_per_node,
                num_blocks)
            torch.cuda.synchronize(device)
            nvshmem.check_device_errors(device.index)
            where = f"rank {rank} call {call}"
            # This rank's streams: token t goes to node m if one of m's ranks holds an expert.
            goes = in_rank.view(num_tokens, num_nodes, ranks_per_node).any(2)
            want_head = torch.where(goes, goes.int().cumsum(0) - 1, -1).int()
            diffs.same(f"{where} send_rdma_head", head, want_head)
            diffs.same(f"{where} num_tokens_per_node", per_node, goes.sum(0).int())
            # Every rank's inputs, for the regions here.
            dist.barrier()
            gathered = [None] * world_size
            dist.all_gather_object(gathered, [None if t is None else t.cpu() for t in
                                              (x.view(torch.uint8), scales, topk, weights,
                                               in_rank, experts)])
            for n in range(num_nodes):
                src = n * ranks_per_node + my_local
                sx, ss, st, sw, sr, se = gathered[src]
                mine = sr.view(-1, num_nodes, ranks_per_node)[:, my_node].any(1)
                tokens_in = mine.nonzero().squeeze(1)
                rows = tokens_in.numel()
                at = off["headers"] + off["header_stride"] * n
                value = int(memory[at:at + 8].view(torch.int64).item())
                diffs.check(f"{where} region {n} header", value == ((call + 1) << 32) | rows,
                            f"0x{value:x}, expected seq {call + 1} rows {rows}")
                e_node = off["experts_per_node"]
                counts = memory[at + 8:at + 8 + 4 * e_node].view(torch.int32).cpu()
                diffs.same(f"{where} region {n} per-expert counts", counts,
                           se[my_node * e_node:(my_node + 1) * e_node])
                base = off["shares"] + (1 + n) * off["share_bytes"]
                got_rows = memory[base:base + rows * off["row_stride"]].view(rows, off["row_stride"])
                got_rows = got_rows[:, :off["row_bytes"]].cpu()
                diffs.same(f"{where} region {n} rows", got_rows,
                           sx[tokens_in].reshape(rows, off["row_bytes"]))
                metas_at = base + off["slots"] * off["row_stride"]
                metas = memory[metas_at:metas_at + rows * off["meta_bytes"]]
                metas = metas.view(rows, off["meta_bytes"]).cpu()

                def field(offset, count, dtype):
                    width = torch.tensor([], dtype=dtype).element_size()
                    return metas[:, offset:offset + count * width].contiguous().view(dtype)

                if ss is not None:
                    diffs.same(f"{where} region {n} scales",
                               field(off["meta_scales"], ss.size(1), torch.float32),
                               ss[tokens_in])
                diffs.same(f"{where} region {n} topk", field(off["meta_topk"], st.size(1),
                                                             torch.int64), st[tokens_in])
                diffs.same(f"{where} region {n} weights", field(off["meta_weights"], sw.size(1),
                                                                torch.float32), sw[tokens_in])
                bits = (sr[tokens_in].long() << torch.arange(world_size)).sum(1)
                diffs.same(f"{where} region {n} mask", field(off["meta_mask"], 1,
                                                             torch.int64).squeeze(1), bits)
                diffs.same(f"{where} region {n} src", field(off["meta_src"], 1,
                                                            torch.int32).squeeze(1),
                           tokens_in.int())
                diffs.same(f"{where} region {n} src_tokens",
                           field(off["meta_src_tokens"], 1, torch.int32).squeeze(1),
                           torch.full((rows,), sr.size(0), dtype=torch.int32))
    finally:
        buffer.destroy()
    return diffs.messages


# (tokens, hidden, top-k, experts, FP8, blocks): five calls in a row, shapes changing between
# calls, more blocks than one token each.
SHAPES = [
    (300, 1024, 8, 64, False, 8), (257, 2048, 4, 32, True, 24), (64, 7168, 8, 256, False, 4),
    (513, 512, 6, 48, True, 16), (100, 1024, 8, 64, False, 132),
]


def test_forward_regions_hold_the_streams(world_size):
    if world_size not in (2, 4):
        pytest.skip("checked as 2 x 1 and 2 x 2")
    ranks_per_node = world_size // 2
    _assert_no_diffs(run_on_gpus(world_size, _forward_job, ranks_per_node, SHAPES, timeout=300))
