"""``torch.compile(fullgraph=True)`` of MoE layers and ``deep_ep`` ops (Inductor on CPU).

Each job compiles on every rank of a gloo pool and returns to the test process:

- the ``deep_ep`` ops of every graph Inductor compiled, in order, read from its post-grad graph
  (after dead-code elimination, just before lowering), pinned here with ``assertExpectedInline``
  and required to be the same on every rank (every rank must issue the same collectives in the
  same order);
- how far the compiled results are from eager ones.

``fullgraph=True`` turns any graph break into an error, so a job that returns compiled cleanly.
Later steps run under ``torch.compiler.set_stance("fail_on_recompile")``: the first graph must
serve them all.

Numerics: the ``deep_ep`` ops and the matmuls (``aten.mm``, an extern kernel in Inductor) run
the same kernels compiled or not; Inductor generates its own code for the pointwise parts
(softmax, SiLU, the weighting) which may round differently from ATen's kernels. So compiled
results equal eager ones to float32 rounding (relative 1e-5), and the ``aot_eager`` backend,
which runs the traced ATen graph without Inductor, gives results equal to eager bit for bit.
"""

import contextlib
import re

import expecttest
import torch

from distributed import run_on_ranks

HIDDEN, FFN_HIDDEN, LOCAL_EXPERTS, TOP_K, SEED = 16, 24, 2, 2, 5
FLOAT32_ROUNDING = 1e-5  # norm-wise relative: max|compiled - eager| <= 1e-5 * max|eager|

# --- rank side ------------------------------------------------------------------------------


def _deep_ep_ops(graph: torch.fx.Graph) -> list[str]:
    """Qualified names of the ``deep_ep`` ops called in ``graph``, in order.

    Ops registered as ordered effects appear as ``with_effects(token, op, *args)``; ops with
    declared mutations may appear as ``auto_functionalized(op, ...)``: both are unwrapped.
    """
    from torch._higher_order_ops.auto_functionalize import (
        auto_functionalized, auto_functionalized_v2,
    )

    names = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target is torch.ops.higher_order.with_effects:
            target = node.args[1]
        if target in (auto_functionalized, auto_functionalized_v2):
            target = node.args[0]
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "deep_ep":
            names.append(str(target))
    return names


def _recorder_class():
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass

    class RecordDeepEPOps(CustomInferenceAwareGraphPass):
        """Inductor post-grad pass that records, and changes nothing."""

        def __init__(self):
            self.graphs = []

        def __call__(self, graph, is_inference):
            tangents = any(
                n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes
            )
            kind = "inference" if is_inference else "backward" if tangents else "forward"
            self.graphs.append((kind, _deep_ep_ops(graph)))

        def uuid(self):
            return None  # never cached: the pass must see every compilation

        def format(self):
            return "\n".join(f"{kind}:\n" + "".join(f"  {op}\n" for op in ops)
                             for kind, ops in self.graphs)

    return RecordDeepEPOps


@contextlib.contextmanager
def _compiling():
    """Fresh Dynamo state and a recorder of Inductor's post-grad graphs."""
    torch._dynamo.reset()
    recorder = _recorder_class()()
    with torch._inductor.config.patch(
        post_grad_custom_post_pass=recorder,
        compile_threads=1,  # the ranks share two cores
    ):
        yield recorder


def _make_layer(rank, world_size, mode, tokens, hidden=HIDDEN, use_fp8=False,
                num_ranks_per_node=None):
    import torch.distributed as dist

    from deep_ep_ops import Buffer
    from deep_ep_ops.nn import ExampleMoE, MoEDispatcher, buffer_size_hints

    num_experts = LOCAL_EXPERTS * world_size
    num_nvl_bytes, num_rdma_bytes = buffer_size_hints(
        hidden, world_size, num_experts, element_size=4, num_max_dispatch_tokens_per_rank=tokens
    )
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                    num_ranks_per_node=num_ranks_per_node)
    dispatcher = MoEDispatcher(
        buffer, num_experts, mode, use_fp8=use_fp8,
        num_max_dispatch_tokens_per_rank=tokens if mode == "low_latency" else None,
    )
    moe = ExampleMoE(dispatcher, hidden, FFN_HIDDEN, TOP_K, rank=rank, seed=SEED)
    return buffer, moe


def _tokens(rank, step, tokens, hidden=HIDDEN):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(tokens, hidden, generator=g)


def _relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _train_step(moe, fn, x):
    """Forward and backward of ``fn`` (the module or its compiled form): output and grads."""
    x = x.clone().requires_grad_()
    moe.zero_grad()
    out = fn(x)
    (out**2).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]


def _training_job(rank, world_size, mode, tokens, steps=2, num_ranks_per_node=None):
    buffer, moe = _make_layer(rank, world_size, mode, tokens,
                              num_ranks_per_node=num_ranks_per_node)
    errors = []
    with _compiling() as recorder:
        compiled = torch.compile(moe, fullgraph=True)
        for step in range(steps):
            stance = "default" if step == 0 else "fail_on_recompile"
            with torch.compiler.set_stance(stance):
                got = _train_step(moe, compiled, _tokens(rank, step, tokens))
            expected = _train_step(moe, moe, _tokens(rank, step, tokens))
            errors.append(max(_relative_error(a, b) for a, b in zip(got, expected)))
    # Without Inductor's code generation, the traced graph computes exactly what eager does.
    torch._dynamo.reset()
    aot_eager = torch.compile(moe, fullgraph=True, backend="aot_eager")
    got = _train_step(moe, aot_eager, _tokens(rank, 0, tokens))
    expected = _train_step(moe, moe, _tokens(rank, 0, tokens))
    exact = all(torch.equal(a, b) for a, b in zip(got, expected))
    buffer.destroy()
    return dict(ops=recorder.format(), max_error=max(errors), aot_eager_exact=exact)


def _dynamic_normal_job(rank, world_size, tokens, num_ranks_per_node=None):
    # Ranks hold different numbers of tokens and every step routes differently: the received
    # row count N (and, internode, the forwarded row count) is an unbacked size, so one graph
    # serves every step.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return _training_job(rank, world_size, "normal", tokens[rank], steps=3,
                             num_ranks_per_node=num_ranks_per_node)


def _decode_job(rank, world_size, tokens):
    hidden = 128  # FP8 scales cover 128 channels
    buffer, moe = _make_layer(rank, world_size, "low_latency", tokens, hidden, use_fp8=True)
    errors = []
    with _compiling() as recorder, torch.no_grad():
        compiled = torch.compile(moe, fullgraph=True)
        for step in range(3):
            x = _tokens(rank, step, tokens, hidden)
            with torch.compiler.set_stance("default" if step == 0 else "fail_on_recompile"):
                got = compiled(x)
            errors.append(_relative_error(got, moe(x)))
    buffer.destroy()
    return dict(ops=recorder.format(), max_error=max(errors))


def _side_effects_job(rank, world_size):
    """Communication whose result is unused must still happen, in program order."""
    from torch._inductor.utils import run_and_get_code

    from deep_ep_ops import _registry, ops

    tokens = 4
    buffer, moe = _make_layer(rank, world_size, "capacity", tokens)
    name, num_experts = buffer.name, LOCAL_EXPERTS * world_size
    x = _tokens(rank, 0, tokens)
    g = torch.Generator().manual_seed(rank)
    topk_idx = torch.randn(tokens, num_experts, generator=g).topk(TOP_K).indices
    topk_weights = torch.rand(tokens, TOP_K, generator=g)
    layout = ops.get_dispatch_layout(topk_idx, num_experts, world_size)
    handle = ops.dispatch(
        name, x, layout, topk_idx, topk_weights, num_worst_tokens=world_size * tokens
    ).handle
    ll = ops.low_latency_dispatch(name, x, topk_idx, tokens, num_experts, use_fp8=False)

    def step(y_unused, y, ll_y, ll_unused):
        ops.combine(name, y_unused, handle)  # result unused
        a = ops.low_latency_combine(name, ll_y, topk_idx, topk_weights, ll.handle)
        ops.low_latency_combine(name, ll_unused, topk_idx, topk_weights, ll.handle)  # unused
        b = ops.combine(name, y, handle).combined_x
        return a, b

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (
            torch.randn(handle.recv_src_idx.shape + (HIDDEN,), generator=g),
            torch.randn(handle.recv_src_idx.shape + (HIDDEN,), generator=g),
            torch.randn(ll.recv_x.shape, generator=g),
            torch.randn(ll.recv_x.shape, generator=g),
        )

    comm = _registry.get(name)
    calls_before = comm.num_calls
    with _compiling() as recorder:
        compiled = torch.compile(step, fullgraph=True)
        got, (code,) = run_and_get_code(compiled, *inputs(1))
        with torch.compiler.set_stance("fail_on_recompile"):
            got_2 = compiled(*inputs(2))
    compiled_calls = comm.num_calls - calls_before
    expected, expected_2 = step(*inputs(1)), step(*inputs(2))
    buffer.destroy()
    return dict(
        ops=recorder.format(),
        # What the generated code calls, in its order (after Inductor's scheduling).
        code_ops=re.findall(r"torch\.ops\.deep_ep\.(\w+)\.default\(", code),
        # Every op call on a buffer enters the communicator once: 4 ops x 2 calls.
        compiled_calls=compiled_calls,
        exact=all(torch.equal(a, b) for a, b in zip(got + got_2, expected + expected_2)),
    )


# --- test process -----------------------------------------------------------------------------


class TestCompile(expecttest.TestCase):
    def _run(self, fn, *args):
        results = run_on_ranks(2, fn, *args)
        for rank, result in enumerate(results[1:], 1):
            self.assertEqual(result["ops"], results[0]["ops"], f"rank {rank} differs from rank 0")
        return results

    def test_capacity_moe_training_step(self):
        results = self._run(_training_job, "capacity", 8)
        for result in results:
            self.assertLessEqual(result["max_error"], FLOAT32_ROUNDING)
            self.assertTrue(result["aot_eager_exact"])
        # Forward: layout, static-row dispatch, combine. Backward: combine's backward is a
        # cached dispatch of the output gradient; dispatch's backward combines the gradients of
        # recv_x and recv_topk_weights.
        self.assertExpectedInline(results[0]["ops"], """\
forward:
  deep_ep.get_dispatch_layout.default
  deep_ep.capacity_dispatch.default
  deep_ep.combine.default

backward:
  deep_ep.cached_dispatch.default
  deep_ep.combine.default
""")

    def test_internode_capacity_moe_training_step(self):
        # One rank per node: the internode ops (their reference), traced like the intranode.
        results = self._run(_training_job, "capacity", 8, 2, 1)
        for result in results:
            self.assertLessEqual(result["max_error"], FLOAT32_ROUNDING)
            self.assertTrue(result["aot_eager_exact"])
        self.assertExpectedInline(results[0]["ops"], """\
forward:
  deep_ep.get_dispatch_layout.default
  deep_ep.internode_capacity_dispatch.default
  deep_ep.internode_combine.default

backward:
  deep_ep.internode_cached_dispatch.default
  deep_ep.internode_combine.default
""")

    def test_low_latency_moe_training_step(self):
        results = self._run(_training_job, "low_latency", 8)
        for result in results:
            self.assertLessEqual(result["max_error"], FLOAT32_ROUNDING)
            self.assertTrue(result["aot_eager_exact"])
        # Backward: the combine's backward sends the weighted output gradient back to the
        # experts (cached dispatch) and gathers their rows for the weights' gradient; the
        # dispatch's backward sums each token's copies (a combine with unit weights).
        self.assertExpectedInline(results[0]["ops"], """\
forward:
  deep_ep.low_latency_dispatch.default
  deep_ep.low_latency_combine.default

backward:
  deep_ep.low_latency_cached_dispatch.default
  deep_ep.low_latency_gather.default
  deep_ep.low_latency_combine.default
""")

    def test_low_latency_decode_step(self):
        results = self._run(_decode_job, 4)
        for result in results:
            self.assertLessEqual(result["max_error"], FLOAT32_ROUNDING)
        self.assertExpectedInline(results[0]["ops"], """\
inference:
  deep_ep.low_latency_dispatch.default
  deep_ep.low_latency_combine.default
""")

    def test_normal_dispatch_with_dynamic_output_shapes(self):
        results = self._run(_dynamic_normal_job, [5, 9])
        for result in results:
            self.assertLessEqual(result["max_error"], FLOAT32_ROUNDING)
            self.assertTrue(result["aot_eager_exact"])
        self.assertExpectedInline(results[0]["ops"], """\
forward:
  deep_ep.get_dispatch_layout.default
  deep_ep.dispatch.default
  deep_ep.combine.default

backward:
  deep_ep.cached_dispatch.default
  deep_ep.combine.default
""")

    def test_internode_dispatch_with_dynamic_output_shapes(self):
        results = self._run(_dynamic_normal_job, [5, 9], 1)
        for result in results:
            self.assertLessEqual(result["max_error"], FLOAT32_ROUNDING)
            self.assertTrue(result["aot_eager_exact"])
        self.assertExpectedInline(results[0]["ops"], """\
forward:
  deep_ep.get_dispatch_layout.default
  deep_ep.internode_dispatch.default
  deep_ep.internode_combine.default

backward:
  deep_ep.internode_cached_dispatch.default
  deep_ep.internode_combine.default
""")

    def test_unused_communication_is_kept_in_order(self):
        results = self._run(_side_effects_job)
        program_order = ["combine", "low_latency_combine", "low_latency_combine", "combine"]
        for result in results:
            self.assertEqual(result["code_ops"], program_order)
            self.assertEqual(result["compiled_calls"], 2 * len(program_order))
            self.assertTrue(result["exact"])
        self.assertExpectedInline(results[0]["ops"], """\
inference:
  deep_ep.combine.default
  deep_ep.low_latency_combine.default
  deep_ep.low_latency_combine.default
  deep_ep.combine.default
""")


if __name__ == "__main__":
    expecttest.run_tests()
