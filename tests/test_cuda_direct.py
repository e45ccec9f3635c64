"""The eager fast path (``ops._direct``) gives what the ``torch.ops.deep_ep`` ops give, bit for bit.

One process, one GPU, one NCCL rank: the kernels run (NVLink runtime for one rank, NVSHMEM with
one PE), so this runs wherever one GPU is lent. Each call form runs once through the wrappers
with no grad (the direct path) and once through the ops, on the same inputs. With inputs that
require grad, the direct path records its backward from C++ (csrc/autograd.h): each
differentiable call form runs forward and backward through it and through the ops (whose
autograd is Python's), and outputs and gradients must agree bit for bit.
"""

import socket

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops as deep_ep
from deep_ep_ops import _build, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _build.HAS_LOW_LATENCY_KERNELS, reason="the NVSHMEM kernels are not built"),
]


@pytest.fixture(scope="module")
def buffer():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, device_id=torch.device("cuda", 0))
    num_max, hidden, num_experts = 128, 7168, 32
    group = dist.new_group([0])
    buf = deep_ep.Buffer(
        group, num_nvl_bytes=int(1e9),
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, hidden, 1, num_experts),
        low_latency_mode=True,
    )
    yield buf, num_max, hidden, num_experts
    buf.destroy()


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b)
    return all(_equal(x, y) for x, y in zip(a, b, strict=True))


def _inputs(num_tokens, hidden, num_experts, num_topk=8):
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.rand(num_tokens, num_experts, device="cuda").topk(num_topk, dim=1).indices
    topk_idx[0, 2] = -1
    weights = torch.rand(num_tokens, num_topk, device="cuda")
    return x, topk_idx, weights


_ops = torch.ops.deep_ep


def test_low_latency_direct_matches_ops(buffer):
    buf, num_max, hidden, num_experts = buffer
    torch.manual_seed(0)
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    ll = (buf.name, 1, num_max, num_experts)
    # The direct entries decide in C++: an input requiring grad in grad mode records the C++
    # backward, except for FP8 (not differentiable), which takes the ops (they raise).
    kernels = ops._direct(_build._C_nvshmem, x)
    assert kernels is _build._C_nvshmem
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        assert kernels.low_latency_dispatch(leaf, topk_idx, *ll, True, False, False, None) is None
        recorded = kernels.low_latency_dispatch(leaf, topk_idx, *ll, False, False, False, None)
        assert "LowLatencyDispatchFunction" in recorded[0].grad_fn.name()
    with torch.no_grad():
        plain = kernels.low_latency_dispatch(leaf, topk_idx, *ll, False, False, False, None)
        # The ops module's named tuples, built by the entry; BF16 has no scales.
        assert type(plain) is ops.LowLatencyDispatchOutput
        assert type(plain.handle) is ops.LowLatencyHandle
        assert plain.recv_x.grad_fn is None and plain.recv_x_scales is None
        assert plain.handle[2:] == (num_max, hidden, num_experts)
    assert ops._direct(_build._C_nvshmem, torch.nn.Parameter(x.float())) is None
    for use_fp8 in (False, True):
        stats = torch.zeros(num_experts, dtype=torch.int32, device="cuda")
        fast = ops.low_latency_dispatch(buf.name, x, topk_idx, num_max, num_experts,
                                        use_fp8=use_fp8, cumulative_local_expert_recv_stats=stats)
        slow = _ops.low_latency_dispatch(x, topk_idx, *ll, use_fp8, False, False)
        count = fast.recv_count
        assert type(fast) is ops.LowLatencyDispatchOutput
        assert (fast.recv_x_scales is not None) == use_fp8
        assert torch.equal(count, slow[2]) and torch.equal(stats, slow[2])
        assert torch.equal(fast.handle.layout_range, slow[4])
        for e in range(num_experts):
            n = int(count[e])
            assert _equal(fast.recv_x[e, :n], slow[0][e, :n])
            assert torch.equal(fast.handle.src_info[e, :n], slow[3][e, :n])
            if use_fp8:
                assert torch.equal(fast.recv_x_scales[e, :n], slow[1][e, :n])
    recv = ops.low_latency_dispatch(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    handle = recv.handle
    rows = torch.randn_like(recv.recv_x)
    fast = ops.low_latency_combine(buf.name, rows, topk_idx, weights, handle)
    slow = _ops.low_latency_combine(rows, topk_idx, weights, handle.src_info, handle.layout_range,
                                    *ll, False)
    assert torch.equal(fast, slow)
    out = torch.empty_like(fast)
    ops.low_latency_combine(buf.name, rows, topk_idx, weights, handle, out=out)
    assert torch.equal(out, fast)
    pending = ops.low_latency_combine_send(buf.name, rows, topk_idx, weights, handle)
    ops.low_latency_combine_recv(buf.name, pending, topk_idx, weights)
    assert torch.equal(pending, fast)
    sent = ops.low_latency_dispatch_send(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    ops.low_latency_dispatch_recv(buf.name, sent)
    assert torch.equal(sent.recv_count, recv.recv_count)
    for e in range(num_experts):
        n = int(recv.recv_count[e])
        assert torch.equal(sent.recv_x[e, :n], recv.recv_x[e, :n])


def test_normal_direct_matches_ops(buffer):
    buf, _, hidden, num_experts = buffer
    torch.manual_seed(1)
    x, topk_idx, weights = _inputs(512, hidden, num_experts)
    layout = ops.get_dispatch_layout(topk_idx, num_experts, 1)
    assert _equal(tuple(layout), tuple(_ops.get_dispatch_layout(topk_idx, num_experts, 1, 1)))
    config = deep_ep.Buffer.get_dispatch_config(1).to_list()
    combine_config = deep_ep.Buffer.get_combine_config(1).to_list()
    args = (x, None, topk_idx, weights, layout.num_tokens_per_rank, layout.is_token_in_rank,
            layout.num_tokens_per_expert, buf.name, 1)
    for num_worst_tokens in (0, 1024):
        fast = ops.dispatch(buf.name, x, layout, topk_idx, weights, num_worst_tokens=num_worst_tokens)
        if num_worst_tokens:
            slow = _ops.capacity_dispatch(*args, num_worst_tokens, config)
        else:
            slow = _ops.dispatch(*args, config)
        assert _equal(tuple(fast[:5]), tuple(slow[:5]))
        handle = fast.handle
        assert _equal(tuple(handle[:4]) + (handle.send_head,), tuple(slow[5:10]))
        fast_c = ops.combine(buf.name, fast.recv_x, handle, topk_weights=fast.recv_topk_weights)
        slow_c = _ops.combine(fast.recv_x, fast.recv_topk_weights, None, None, *handle[:6],
                              buf.name, num_worst_tokens, combine_config)
        assert _equal(tuple(fast_c), tuple(slow_c))
        # The host list of rows per expert comes from mapped memory with the row count.
        out, host = ops._dispatch(buf.name, x, layout.num_tokens_per_rank,
                                  layout.is_token_in_rank, layout.num_tokens_per_expert, topk_idx,
                                  weights, None, 4, num_worst_tokens, None)
        # Built by the kernel entry: the ops' named tuples, the handle holding the caller's
        # is_token_in_rank and the mode's row count.
        assert type(out) is ops.DispatchOutput and type(out.handle) is ops.DispatchHandle
        assert out.handle.is_token_in_rank is layout.is_token_in_rank
        assert out.handle.num_worst_tokens == num_worst_tokens
        # Buffer.dispatch's lean form: the same rows and handle, without the tensors it drops.
        lean, lean_host = ops._dispatch(buf.name, x, layout.num_tokens_per_rank,
                                        layout.is_token_in_rank, layout.num_tokens_per_expert,
                                        topk_idx, weights, None, 4, num_worst_tokens, None, True)
        assert lean.num_recv_tokens_per_expert is None and lean.recv_x_scales is None
        assert lean_host == host
        assert _equal((lean.recv_x, lean.recv_topk_idx, lean.recv_topk_weights, *lean.handle[:6]),
                      (out.recv_x, out.recv_topk_idx, out.recv_topk_weights, *out.handle[:6]))
        if num_worst_tokens:
            assert host is None
        else:
            assert host == out.num_recv_tokens_per_expert.tolist() and len(host) == num_experts
            assert sum(host) >= out.recv_x.size(0)
        fast_d = ops.cached_dispatch(buf.name, x, handle)
        slow_d = _ops.cached_dispatch(x, None, None, *handle[:6], buf.name, num_worst_tokens, config)
        assert _equal(tuple(fast_d), tuple(slow_d))


# --- autograd of the direct path -----------------------------------------------------------


def _forms(buf, num_max, hidden, num_experts):
    """``name -> (make_leaves, call)``: the differentiable call forms of the wrappers."""
    torch.manual_seed(2)
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    recv = ops.low_latency_dispatch(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    rows = torch.randn_like(recv.recv_x)
    layout = ops.get_dispatch_layout(topk_idx, num_experts, 1)
    normal = ops.dispatch(buf.name, x, layout, topk_idx, weights)
    normal_rows = torch.randn_like(normal.recv_x)
    bias = torch.randn_like(x)
    ll = (buf.name,)

    def low_latency_dispatch(x):
        out = ops.low_latency_dispatch(*ll, x, topk_idx, num_max, num_experts, use_fp8=False)
        return [out.recv_x], out.recv_count

    def low_latency_dispatch_split(x):
        sent = ops.low_latency_dispatch_send(*ll, x, topk_idx, num_max, num_experts, use_fp8=False)
        out = ops.low_latency_dispatch_recv(*ll, sent)
        return [out.recv_x], out.recv_count

    def low_latency_combine(rows, w):
        return [ops.low_latency_combine(*ll, rows, topk_idx, w, recv.handle)], None

    def low_latency_combine_split(rows, w):
        pending = ops.low_latency_combine_send(*ll, rows, topk_idx, w, recv.handle)
        return [ops.low_latency_combine_recv(*ll, pending, topk_idx, w)], None

    def dispatch(num_worst_tokens):
        def call(x, w):
            out = ops.dispatch(buf.name, x, layout, topk_idx, w, num_worst_tokens=num_worst_tokens)
            return [out.recv_x, out.recv_topk_weights], None
        return call

    def lean_dispatch(num_worst_tokens):  # Buffer.dispatch's form
        def call(x, w):
            out, _ = ops._dispatch(buf.name, x, layout.num_tokens_per_rank,
                                   layout.is_token_in_rank, layout.num_tokens_per_expert,
                                   topk_idx, w, None, 1, num_worst_tokens, None, True)
            return [out.recv_x, out.recv_topk_weights], None
        return call

    def cached_dispatch(x, w):
        out = ops.cached_dispatch(buf.name, x, normal.handle, topk_weights=w)
        return [out[0], out[2]], None

    def combine(rows, w, b):
        return list(ops.combine(buf.name, rows, normal.handle, topk_weights=w, bias=b)), None

    return {
        "low_latency_dispatch": ((x,), low_latency_dispatch),
        "low_latency_dispatch send/recv": ((x,), low_latency_dispatch_split),
        "low_latency_combine": ((rows, weights), low_latency_combine),
        "low_latency_combine send/recv": ((rows, weights), low_latency_combine_split),
        "dispatch": ((x, weights), dispatch(0)),
        "capacity_dispatch": ((x, weights), dispatch(1024)),
        "dispatch (lean)": ((x, weights), lean_dispatch(0)),
        "capacity_dispatch (lean)": ((x, weights), lean_dispatch(1024)),
        "cached_dispatch": ((x, weights), cached_dispatch),
        "combine": ((normal_rows, normal.recv_topk_weights, bias), combine),
    }


def _forward_backward(tensors, call, cotangents=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outputs, recv_count = call(*leaves)
    grad_fn = outputs[0].grad_fn
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outputs]
    if recv_count is not None:  # rows past recv_count are unspecified: no cotangent there
        valid = torch.arange(outputs[0].size(1), device="cuda") < recv_count[:, None]
        cotangents = [c * valid[..., None] for c in cotangents]
    torch.autograd.backward(outputs, cotangents)
    return outputs, [leaf.grad for leaf in leaves], grad_fn, cotangents, recv_count


@pytest.mark.parametrize("form", [
    "low_latency_dispatch", "low_latency_dispatch send/recv", "low_latency_combine",
    "low_latency_combine send/recv", "dispatch", "capacity_dispatch", "dispatch (lean)",
    "capacity_dispatch (lean)", "cached_dispatch", "combine",
])
def test_direct_autograd_matches_ops(buffer, form, monkeypatch):
    buf, num_max, hidden, num_experts = buffer
    tensors, call = _forms(buf, num_max, hidden, num_experts)[form]
    fast, fast_grads, fast_fn, cotangents, count = _forward_backward(tensors, call)
    assert "Function" in fast_fn.name() and "deep_ep_ops" in fast_fn.name(), fast_fn.name()
    monkeypatch.setattr(ops, "_direct", lambda *args: None)  # everything through torch.ops
    monkeypatch.setattr(ops, "_DISPATCH_ENTRIES", None)  # (dispatch tests for them inline)
    slow, slow_grads, slow_fn, _, _ = _forward_backward(tensors, call, cotangents)
    assert "deep_ep_ops" not in slow_fn.name()
    for a, b in zip(fast, slow, strict=True):
        if count is None:
            assert _equal(a, b)
        else:
            for e in range(a.size(0)):
                assert _equal(a[e, :int(count[e])], b[e, :int(count[e])])
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert a is not None and b is not None and _equal(a, b)


def test_direct_backward_keeps_the_saved_tensor_rules(buffer):
    """The C++ backward of a direct call holds what it keeps as saved tensors are held: a second
    backward without retain_graph raises, and so does a backward after a kept tensor (the
    handle's send_head, the low-latency src_info) was changed in place."""
    buf, num_max, hidden, num_experts = buffer
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    layout = ops.get_dispatch_layout(topk_idx, num_experts, 1)

    def normal(leaf):
        out = ops.dispatch(buf.name, leaf, layout, topk_idx, weights)
        return out.recv_x, out.handle.send_head

    def low_latency(leaf):
        out = ops.low_latency_dispatch(buf.name, leaf, topk_idx, num_max, num_experts,
                                       use_fp8=False)
        return out.recv_x, out.handle.src_info

    for call in (normal, low_latency):
        leaf = x.detach().clone().requires_grad_()
        rows, _ = call(leaf)
        assert "deep_ep_ops" in rows.grad_fn.name(), rows.grad_fn.name()
        rows.float().sum().backward()
        assert leaf.grad is not None
        with pytest.raises(RuntimeError, match="second time"):
            rows.float().sum().backward()
        rows, kept = call(leaf)
        kept.add_(0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            rows.float().sum().backward()


def test_direct_autograd_double_backward(buffer, monkeypatch):
    """create_graph through the C++ node: its backward calls the ops, which record again."""
    buf, num_max, hidden, num_experts = buffer
    (rows, weights), call = _forms(buf, num_max, hidden, num_experts)["low_latency_combine"]
    results = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(ops, "_direct", lambda *args: None)
        r, w = rows.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
        (out,), _ = call(r, w)
        grad_w, = torch.autograd.grad(out.float().square().sum(), w, create_graph=True)
        grad_r, = torch.autograd.grad(grad_w.sum(), r)
        results.append((grad_w.detach(), grad_r))
    assert _equal(results[0], results[1])


def test_direct_autograd_refusals(buffer):
    """Forms without a gradient raise through the direct path as through the ops."""
    buf, num_max, hidden, num_experts = buffer
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    leaf = x.detach().requires_grad_()
    with pytest.raises(RuntimeError, match="use_fp8=True"):
        ops.low_latency_dispatch(buf.name, leaf, topk_idx, num_max, num_experts, use_fp8=True)
    with pytest.raises(RuntimeError, match="use_fp8=True"):
        ops.low_latency_dispatch_send(buf.name, leaf, topk_idx, num_max, num_experts, use_fp8=True)
    sent = ops.low_latency_dispatch_send(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    stolen = sent._replace(recv_x=sent.recv_x.detach().requires_grad_())  # a leaf: refused
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        ops.low_latency_dispatch_recv(buf.name, stolen)
    ops.low_latency_dispatch_recv(buf.name, sent)  # the buffer's queue stays in step


# --- kernels that share the GPU: beside a long compute kernel, two buffers in flight ----------


@pytest.fixture(scope="module")
def second_buffer(buffer):
    buf, num_max, hidden, num_experts = buffer
    other = deep_ep.Buffer(buf.group, num_nvl_bytes=int(1e9), num_rdma_bytes=buf.num_rdma_bytes,
                           low_latency_mode=True)
    yield other
    other.destroy()


def _low_latency_round(buf, x, topk_idx, weights, num_max, num_experts):
    recv = ops.low_latency_dispatch(buf.name, x, topk_idx, num_max, num_experts, use_fp8=False)
    combined = ops.low_latency_combine(buf.name, recv.recv_x, topk_idx, weights, recv.handle)
    return recv.recv_count, combined


def _normal_round(buf, x, topk_idx, weights, num_experts):
    layout = ops.get_dispatch_layout(topk_idx, num_experts, 1)
    out = ops.dispatch(buf.name, x, layout, topk_idx, weights, num_worst_tokens=x.size(0))
    return ops.combine(buf.name, out.recv_x, out.handle).combined_x


def test_low_latency_beside_long_matmuls(buffer):
    """A low-latency round while matmuls hold the SMs on another stream: same bits, no hang."""
    buf, num_max, hidden, num_experts = buffer
    torch.manual_seed(3)
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    want_count, want = _low_latency_round(buf, x, topk_idx, weights, num_max, num_experts)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    for _ in range(20):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(8):
                a = (a @ a).clamp_(-1, 1)
        count, got = _low_latency_round(buf, x, topk_idx, weights, num_max, num_experts)
        torch.cuda.synchronize()
        assert torch.equal(count, want_count) and torch.equal(got, want)


def test_two_buffers_in_flight_on_two_streams(buffer, second_buffer):
    """Two low-latency and two intranode buffers, each on its own stream, launched interleaved:
    every result equals the same call made alone."""
    buf, num_max, hidden, num_experts = buffer
    torch.manual_seed(4)
    x, topk_idx, weights = _inputs(num_max, hidden, num_experts)
    want_count, want = _low_latency_round(buf, x, topk_idx, weights, num_max, num_experts)
    want_normal = _normal_round(buf, x, topk_idx, weights, num_experts)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    results = []
    for _ in range(20):
        for b, s in zip((buf, second_buffer), streams):
            with torch.cuda.stream(s):
                results.append(_low_latency_round(b, x, topk_idx, weights, num_max, num_experts)
                               + (_normal_round(b, x, topk_idx, weights, num_experts),))
    torch.cuda.synchronize()
    for count, got, normal in results:
        assert torch.equal(count, want_count) and torch.equal(got, want)
        assert torch.equal(normal, want_normal)


def test_errors_on_cuda_match_cpu(buffer):
    """tests/test_errors.py's table of bad calls on CUDA tensors (the kernels, their direct
    entries) raises the same exception types with the same messages as on CPU (the reference),
    but for the data-dependent cases the kernels report at the next call."""
    import re

    import test_errors
    from distributed import run_on_ranks

    def normalized(observed):  # the two processes hold different buffers
        return {label: (kind, re.sub(r"\(live: [^)]*\)", "(live: ...)",
                                     re.sub(r"deep_ep_buffer_\w+", "deep_ep_buffer_N", message)))
                for label, (kind, message) in observed.items()}

    ((_, _, cpu),) = run_on_ranks(1, test_errors._bad_inputs)
    failures, _, cuda = test_errors._bad_inputs(0, 1, "cuda", skip=test_errors.DATA_DEPENDENT)
    cpu, cuda = normalized(cpu), normalized(cuda)
    assert failures == {}
    mismatched = {label: {"cpu": cpu[label], "cuda": cuda.get(label)} for label in cpu
                  if label not in test_errors.DATA_DEPENDENT and cuda.get(label) != cpu[label]}
    assert mismatched == {}


def test_buffer_size_formulas_agree():
    """The kernels' own size checks and the Python size hints users size buffers by are two
    formulas (C++ and Python): held equal over a grid of shapes and configs."""
    from deep_ep_ops.config import Config, get_low_latency_rdma_size_hint

    for num_ranks in (1, 2, 4, 8, 16):
        for hidden_bytes in (2 * 256, 2 * 7168, 7168 + 4 * 56, 2 * 200):
            for config in ((20, 6, 256, 6, 128), (24, 8, 512, 16, 128), (2, 1, 16, 1, 8)):
                want = Config(*config).get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
                got = _build._C.nvl_buffer_size_hint(list(config), hidden_bytes, num_ranks)
                assert got == want, (num_ranks, hidden_bytes, config)
        for num_max, hidden, num_experts in ((128, 7168, 256), (1, 128, 16), (1024, 2048, 64)):
            if num_experts % num_ranks:
                continue
            want = get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
            got = _build._C_nvshmem.low_latency_buffer_bytes(num_max, hidden, num_ranks, num_experts)
            assert got == want, (num_max, hidden, num_ranks, num_experts)


def test_kernel_op_names_are_the_op_table():
    """The op ids and names the kernels' device error reports use (generated by setup.py from
    the op table) are the op table, in order, in both extensions."""
    from deep_ep_ops import _library

    want = {i: f"deep_ep::{name}" for i, name in enumerate(_library.OP_NAMES)}
    for module in (_build._C, _build._C_nvshmem):
        assert module.op_names() == want
