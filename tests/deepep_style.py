"""A script written against DeepEP's ``deep_ep.Buffer`` API, run unchanged on our package.

Only the import differs from DeepEP code. ``run(rank, world_size)`` is called on every rank of
an initialised process group (gloo on CPU) and returns what the tests compare with the oracle.
"""

import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep


def run(rank, num_ranks, num_tokens=24, hidden=512, num_topk=4, num_experts=16, seed=0):
    group = dist.group.WORLD
    torch.manual_seed(seed + rank)
    x = torch.randn((num_tokens, hidden), dtype=torch.bfloat16)
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)[1]
    topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32)
    topk_idx[0] = -1  # a token routed nowhere

    num_nvl_bytes = deep_ep.Config(24, 6, 256, 6, 128).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    num_max_dispatch_tokens_per_rank = 32
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
    )
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=num_experts // num_ranks, explicitly_destroy=True)
    out = {}

    # Normal mode: layout -> dispatch -> combine (DeepEP's test_intranode pattern).
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    config = deep_ep.Config(24, 6, 256, 6, 128)
    previous_event = deep_ep.Buffer.capture()
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \
        buffer.dispatch(x=x, num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                        is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                        topk_weights=topk_weights, config=config,
                        previous_event=previous_event, async_finish=True)
    event.current_stream_wait()
    out.update(recv_x=recv_x, recv_topk_idx=recv_topk_idx, recv_topk_weights=recv_topk_weights,
               num_recv_tokens_per_expert_list=num_recv_tokens_per_expert_list,
               num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, handle_len=len(handle),
               recv_src_idx=handle[3])
    combined_x, combined_topk_weights, event = buffer.combine(
        recv_x, handle, topk_weights=recv_topk_weights, config=config, async_finish=True)
    with event:
        pass
    out.update(x=x, topk_idx=topk_idx, topk_weights=topk_weights, combined_x=combined_x,
               combined_topk_weights=combined_topk_weights, is_token_in_rank=is_token_in_rank)

    # FP8 input as a (values, scales) tuple, then a cached dispatch with the handle.
    x_fp8 = deep_ep.per_token_cast_to_fp8(x)
    (recv_fp8, recv_scales), *_ = buffer.dispatch(
        x=x_fp8, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        config=config)
    cached_x, cached_topk_idx, *_ = buffer.dispatch(x=x, handle=handle, config=config)
    out.update(recv_fp8=recv_fp8, recv_scales=recv_scales, cached_x=cached_x,
               cached_topk_idx=cached_topk_idx)

    # Capacity mode: static row count, empty per-expert list.
    worst = num_tokens * num_ranks
    cap_x, _, _, cap_list, cap_handle, _ = buffer.dispatch(
        x=x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        num_worst_tokens=worst, config=config)
    cap_combined, _, _ = buffer.combine(cap_x, cap_handle, config=config)
    out.update(cap_rows=cap_x.size(0), cap_list=cap_list, cap_combined=cap_combined)

    # Low-latency: dispatch -> combine, FP8 dispatch, and the receive-hook form.
    buffer.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)
    stats = torch.zeros(num_experts // num_ranks, dtype=torch.int32)
    packed_recv_x, packed_recv_count, ll_handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
        cumulative_local_expert_recv_stats=stats, use_fp8=True, async_finish=False,
        return_recv_hook=False)
    out.update(ll_fp8=packed_recv_x, ll_count=packed_recv_count, ll_src_info=ll_handle[0],
               ll_layout_range=ll_handle[1], ll_stats=stats.clone(), ll_hook=hook)
    bf16_recv_x, _, ll_handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False,
        return_recv_hook=True)
    hook()
    combined_ll, event, hook = buffer.low_latency_combine(
        bf16_recv_x, topk_idx, topk_weights, ll_handle, return_recv_hook=True)
    hook()
    out.update(ll_bf16=bf16_recv_x, ll_combined=combined_ll)
    # Zero-copy: write the expert output straight into the communication buffer.
    zero_copy = buffer.get_next_low_latency_combine_buffer(ll_handle)
    zero_copy[:, :, :] = bf16_recv_x
    combined_zero_copy, _, _ = buffer.low_latency_combine(
        zero_copy, topk_idx, topk_weights, ll_handle, zero_copy=True)
    out_tensor = torch.empty_like(combined_ll)
    combined_out, _, _ = buffer.low_latency_combine(
        bf16_recv_x, topk_idx, topk_weights, ll_handle, out=out_tensor)
    out.update(ll_zero_copy=combined_zero_copy, ll_out_is_out=combined_out is out_tensor,
               ll_out=out_tensor)
    buffer.destroy()
    return out
