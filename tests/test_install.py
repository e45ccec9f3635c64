"""What a new install needs and says: declared runtime dependencies, the warning of a CUDA op
that falls back to the reference for a missing or broken extension, and ``per_token_cast_back``
on inputs of any rank (``[..., H]``, as low-latency dispatch returns them)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import oracle
from deep_ep_ops import _build, ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ops = torch.ops.deep_ep


# --- runtime dependencies ----------------------------------------------------------------------


def _install_requires() -> list[str]:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no install_requires")


def _third_party_imports() -> set[str]:
    """Top-level modules that deep_ep_ops/ and meta/ import, outside the standard library."""
    found = set()
    for folder in ("deep_ep_ops", "meta"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(ROOT, folder, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "deep_ep_ops"}


def test_runtime_dependencies_are_declared():
    """Every third-party import is declared (numpy: torch's object collectives need it, and a
    CPU torch wheel does not pull it in); torch is only a lower bound, so installing the package
    next to a torch >= 2.6 (a CUDA build say) keeps that torch."""
    requires = _install_requires()
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    optional = {"matplotlib"}  # --plot only: the bench says how to install it
    assert _third_party_imports() - optional <= names, (requires, _third_party_imports())
    assert "numpy" in names
    (torch_requirement,) = [r for r in requires if r.startswith("torch")]
    assert torch_requirement.replace(" ", "") == "torch>=2.6"
    # The installed metadata says the same (the editable install is not stale).
    import importlib.metadata

    installed = importlib.metadata.requires("deep_ep_ops") or []
    assert "numpy" in {r.split(">")[0].split("=")[0].strip() for r in installed}, installed


def test_object_collectives_work():
    """``all_gather_object`` (the benchmark, the CUDA runtimes' set-up) in a 1-rank gloo group:
    fails with 'Numpy is not available' where numpy is missing."""
    script = textwrap.dedent("""
        import socket
        import torch.distributed as dist
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
        out = [None]
        dist.all_gather_object(out, {"rank": 0})
        assert out == [{"rank": 0}], out
        dist.destroy_process_group()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- the CUDA fallback warning -----------------------------------------------------------------

_CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _cuda_path(name: str, *args):
    """The op's kernel for the CUDA key, called on these (CPU) tensors: what a CUDA tensor
    reaches when the extension did not register a kernel."""
    return getattr(_ops, name).default.redispatch(_CUDA, *args)


@pytest.fixture
def cuda_build(monkeypatch):
    """A CUDA torch whose extensions are missing (tests set the flags); warning state reset."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build, "HAS_CUDA_KERNELS", False)
    monkeypatch.setattr(_build, "HAS_LOW_LATENCY_KERNELS", False)
    monkeypatch.setattr(_build, "EXTENSION_ERROR", "not built")
    monkeypatch.setattr(_build, "LOW_LATENCY_EXTENSION_ERROR", "not built")
    monkeypatch.setattr(reference, "_fallback_warned", False)
    return monkeypatch


def _topk():
    return torch.tensor([[0, 3], [5, -1], [7, 7]])


def test_cuda_fallback_warns_once(cuda_build):
    cuda_build.setattr(_build, "EXTENSION_ERROR", "built but failed to load (undefined symbol)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _cuda_path("get_dispatch_layout", _topk(), 8, 2, 1)
        _cuda_path("get_dispatch_layout", _topk(), 8, 2, 1)
        assert not reference.warn_cuda_fallback("dispatch")  # already warned in this process
    fallback = [w for w in caught if issubclass(w.category, reference.CudaFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert issubclass(reference.CudaFallbackWarning, UserWarning)
    message = str(fallback[0].message)
    for part in ("deep_ep::get_dispatch_layout", "deep_ep_ops.build_info()",
                 "deep_ep_ops._C is built but failed to load (undefined symbol)", "once"):
        assert part in message, message
    # The reference's result, all the same.
    assert torch.equal(first[0], ops.get_dispatch_layout(_topk(), 8, 2).num_tokens_per_rank)


def test_cuda_fallback_does_not_warn_on_cpu_or_without_a_kernel(cuda_build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        ops.get_dispatch_layout(_topk(), 8, 2)  # CPU tensors: the CPU registration
        x = torch.randn(2, 128).bfloat16()
        _cuda_path("per_token_cast_to_fp8", x, False, False)  # no kernel in any build
        fp8, scales = ops.per_token_cast_to_fp8(x)
        _cuda_path("per_token_cast_back", fp8, scales)
    assert not reference._fallback_warned


def test_cuda_fallback_reasons(cuda_build):
    reason = reference.cuda_fallback_reason
    assert "deep_ep_ops._C is not built" in reason("dispatch")
    assert "deep_ep_ops._C is not built" in reason("low_latency_dispatch")  # no _C: no NVSHMEM
    assert reason("low_latency_gather") is None  # the reference in every build
    cuda_build.setattr(_build, "HAS_CUDA_KERNELS", True)
    assert reason("dispatch") is None
    assert "deep_ep_ops._C_nvshmem is not built" in reason("low_latency_combine_send")
    cuda_build.setattr(_build, "HAS_LOW_LATENCY_KERNELS", True)
    assert reason("low_latency_combine_send") is None
    cuda_build.setattr(torch.version, "cuda", None)  # a CPU-only torch has no CUDA tensors
    cuda_build.setattr(_build, "HAS_CUDA_KERNELS", False)
    assert reason("dispatch") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cuda_path("get_dispatch_layout", _topk(), 8, 2, 1)


def test_deliberate_fallbacks_are_not_wrapped():
    """The built kernels hand gloo groups and calls they do not take to ``reference.<op>``
    (``_C.set_fallback``): those functions must not warn; only the dispatcher's CUDA
    registration of a missing kernel does."""
    for name in reference.CUDA_KERNEL_OPS + reference.LOW_LATENCY_KERNEL_OPS:
        assert not hasattr(getattr(reference, name), "__wrapped__"), name
    wrapped = reference._warning_fallback("dispatch", reference.dispatch)
    assert wrapped.__wrapped__ is reference.dispatch


def test_cuda_fallback_warning_end_to_end():
    """A process whose torch reports CUDA and whose ``deep_ep_ops._C`` fails to load (a stale
    build): the import registers the reference for CUDA and the first call warns, once."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.machinery, sys, warnings
        import torch

        torch.version.cuda = "13.0"

        class Stale(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "deep_ep_ops._C":
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ImportError("undefined symbol: _ZN3c1010TensorImpl (built for torch X)")
            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, Stale())
        import deep_ep_ops
        from deep_ep_ops import _build
        assert not _build.HAS_CUDA_KERNELS and "failed to load" in _build.EXTENSION_ERROR
        assert "failed to load" in deep_ep_ops.build_info()
        cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        op = torch.ops.deep_ep.get_dispatch_layout.default
        topk = torch.tensor([[0, 1], [2, 3]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                op.redispatch(cuda, topk, 4, 2, 1)
        print(len(caught))
        print(caught[0].category.__name__ if caught else "")
        print(caught[0].message if caught else "")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, category, message = proc.stdout.strip().split("\n", 2)
    assert (count, category) == ("1", "CudaFallbackWarning"), proc.stdout
    assert "failed to load" in message and "undefined symbol" in message
    assert "deep_ep_ops.build_info()" in message


# --- per_token_cast_back on [..., H] -----------------------------------------------------------


def _rows_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The oracle, one row ``[1, H]`` at a time, reshaped back."""
    flat_x = x_fp8.reshape(-1, x_fp8.size(-1))
    flat_s = scales.reshape(-1, scales.size(-1))
    rows = [oracle.per_token_cast_back(flat_x[i : i + 1], flat_s[i : i + 1])
            for i in range(flat_x.size(0))]
    out = torch.cat(rows) if rows else torch.empty(0, x_fp8.size(-1), dtype=torch.bfloat16)
    return out.view(x_fp8.shape)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims column-major (low-latency dispatch's scales)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


MODES = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize("round_scale,use_ue8m0", MODES)
@pytest.mark.parametrize("shape", [(3, 5, 1024), (2, 2, 3, 512), (1024,), (0, 4, 512)])
def test_cast_back_any_leading_dims(shape, round_scale, use_ue8m0):
    g = torch.Generator().manual_seed(len(shape))
    hidden = shape[-1]
    x = (torch.randn(*shape, generator=g) * 50).bfloat16()
    x_fp8, scales = ops.per_token_cast_to_fp8(x.reshape(-1, hidden), round_scale, use_ue8m0)
    x_fp8, scales = x_fp8.view(*shape[:-1], hidden), scales.view(*shape[:-1], scales.size(-1))
    expected = _rows_cast_back(x_fp8, scales)
    out = ops.per_token_cast_back(x_fp8, scales)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, expected)
    # The 2-D op on the same rows, reshaped: the same bits.
    flat = ops.per_token_cast_back(x_fp8.reshape(-1, hidden), scales.reshape(-1, scales.size(-1)))
    assert torch.equal(out, flat.view(x.shape))
    if x.numel() and not use_ue8m0:
        assert (out.float() - x.float()).abs().max() <= x.float().abs().max() / 8  # near x


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_cast_back_any_strides(use_ue8m0):
    """Low-latency dispatch's ``[L, R*M, H]`` fp8 with column-major ``[L, R*M, S]`` scales, a
    transposed ``x_fp8`` and a strided slice: the result is the contiguous cast back."""
    g = torch.Generator().manual_seed(5)
    num_local, rows, hidden = 3, 6, 1024
    x = (torch.randn(num_local * rows, hidden, generator=g) * 10).bfloat16()
    x_fp8, scales = ops.per_token_cast_to_fp8(x, use_ue8m0, use_ue8m0)
    x_fp8 = x_fp8.view(num_local, rows, hidden)
    scales = scales.view(num_local, rows, -1)
    expected = _rows_cast_back(x_fp8, scales)

    col = _column_major(scales)
    assert col.stride(-2) == 1 and torch.equal(col, scales)
    transposed_x = x_fp8.transpose(0, 1).contiguous().transpose(0, 1)
    assert not transposed_x.is_contiguous()
    for fp8_in, scales_in in ((x_fp8, col), (transposed_x, scales), (transposed_x, col)):
        out = ops.per_token_cast_back(fp8_in, scales_in)
        assert out.is_contiguous() and out.stride() == expected.stride()
        assert torch.equal(out, expected)
    every_other = ops.per_token_cast_back(x_fp8[:, ::2], col[:, ::2])
    assert torch.equal(every_other, expected[:, ::2])


def test_cast_back_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x_fp8 = torch.empty(4, 6, 1024, dtype=torch.float8_e4m3fn)
        scales = _column_major(torch.empty(4, 6, 8))
        out = _ops.per_token_cast_back(x_fp8, scales)
        ue8m0 = _ops.per_token_cast_back(x_fp8, torch.empty(4, 6, 2, dtype=torch.int32))
    for t in (out, ue8m0):
        assert t.shape == (4, 6, 1024) and t.dtype == torch.bfloat16
        assert t.stride() == (6 * 1024, 1024, 1)


def test_cast_back_opcheck_3d():
    """opcheck (autograd registration, fake tensor, AOT dispatch with dynamic shapes) of 3-D
    inputs: contiguous and column-major float32 scales, and UE8M0. As in test_opcheck.py,
    without test_schema: its mutation check compares every input with torch.allclose, which has
    no CPU kernel for float8 (the schema is dtype independent and checked there on BF16)."""
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2 * 5, 512, generator=g) * 30).bfloat16()
    samples = []
    for round_scale, use_ue8m0 in ((False, False), (True, True)):
        x_fp8, scales = ops.per_token_cast_to_fp8(x, round_scale, use_ue8m0)
        x_fp8, scales = x_fp8.view(2, 5, 512), scales.view(2, 5, -1)
        samples += [(x_fp8, scales), (x_fp8, _column_major(scales))]
    for args in samples:
        results = torch.library.opcheck(_ops.per_token_cast_back.default, args,
                                        test_utils=utils, raise_exception=False)
        assert set(results) == set(utils), results
        assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize(
    "x_shape, scales_shape, scales_dtype, message",
    [
        ((4, 512), (4, 4, 4), torch.float32, "leading dims"),
        ((2, 4, 512), (2, 3, 4), torch.float32, "leading dims"),
        ((2, 4, 512), (2, 4, 3), torch.float32, "hidden / group"),
        ((2, 4, 256), (2, 4, 1), torch.int32, "whole scale groups"),
        ((), (), torch.float32, "at least 1 dim"),
    ],
)
def test_cast_back_bad_inputs(x_shape, scales_shape, scales_dtype, message):
    x_fp8 = torch.zeros(x_shape).to(torch.float8_e4m3fn)
    scales = torch.zeros(scales_shape, dtype=scales_dtype)
    with pytest.raises(ValueError, match=message):
        ops.per_token_cast_back(x_fp8, scales)


def test_cast_back_bad_dtypes():
    with pytest.raises(TypeError, match="x_fp8 must have dtype"):
        ops.per_token_cast_back(torch.zeros(2, 128), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="x_scales must have dtype"):
        ops.per_token_cast_back(torch.zeros(2, 128).to(torch.float8_e4m3fn),
                                torch.zeros(2, 1, dtype=torch.float64))


def test_source_hash_follows_the_sources_not_the_generated_headers(tmp_path):
    """The hash build_info() compares a built extension with: it changes with any source and
    ignores csrc/generated/ (which setup.py writes from it)."""
    import shutil

    from deep_ep_ops import _sources

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(root, "csrc"), copy / "csrc",
                    ignore=shutil.ignore_patterns("generated"))
    os.makedirs(copy / "deep_ep_ops")
    shutil.copy(os.path.join(root, "setup.py"), copy / "setup.py")
    shutil.copy(os.path.join(root, "deep_ep_ops", "_schemas.py"), copy / "deep_ep_ops")
    shutil.copytree(os.path.join(root, "deep_ep_ops", "include"), copy / "deep_ep_ops" / "include")
    first = _sources.source_hash(str(copy))
    assert first == _sources.source_hash(root)
    os.makedirs(copy / "csrc" / "generated")
    (copy / "csrc" / "generated" / "op_table.h").write_text("// generated\n")
    assert _sources.source_hash(str(copy)) == first
    with open(copy / "csrc" / "runtime.h", "a") as f:
        f.write("// a change\n")
    second = _sources.source_hash(str(copy))
    assert second != first
    with open(copy / "deep_ep_ops" / "include" / "deep_ep_ops" / "buffer.h", "a") as f:
        f.write("// a change of the C++ API\n")
    assert _sources.source_hash(str(copy)) != second
    assert _sources.source_hash(str(tmp_path)) is None  # no csrc/: nothing to compare
