"""deep_ep_ops: expert-parallel dispatch/combine for MoE models as PyTorch custom ops.

``import deep_ep_ops as deep_ep`` gives a drop-in for DeepEP's V1 ``Buffer`` API; the ops
themselves are ``torch.ops.deep_ep.*`` (typed wrappers in ``deep_ep_ops.ops``).
"""

import torch

from . import _library
from . import meta  # noqa: F401  (attaches the fakes; installed from the top-level meta/)
from . import _autograd, _build, reference

reference.register(_library.LIB, "CPU")
# The staged internode dispatch (deep_ep_ops/internode_staged.py) on the buffers that have the
# internode runtime; the reference on the others.
if _build.HAS_CUDA_KERNELS and hasattr(getattr(_build, "_C_nvshmem", None), "internode_forward"):
    from . import internode_staged as _internode_staged

    _internode_staged.register(_library.LIB)
# CUDA ops without a kernel in the extension (all of them without it) run the same reference
# code over NCCL.
_build.CUDA_REFERENCE_OPS = tuple(reference.register(_library.LIB, "CUDA"))
# The kernels' bindings call the reference for the calls they do not take: buffers without a
# runtime (no NVLink runtime: more than 8 ranks, a CPU buffer; no NVSHMEM runtime), and the
# low-latency shapes the kernels do not support (see csrc/nvshmem/ops.cpp). Every kernel
# op that takes a buffer gets its fallback, from the op table.
# Their argument errors are worded by the op's one check (meta.check_<op>), as on CPU.
for _extension in (_library._NVLINK, _library._NVSHMEM):
    _module = getattr(_build, _extension, None)
    for _name in _library.kernel_ops(_extension) if _module is not None else ():
        if _library.takes_buffer(_name):
            _module.set_fallback(_name, getattr(reference, _name))
        if hasattr(_module, "set_check"):  # an extension built before it had checks
            _module.set_check(_name, getattr(meta, f"check_{_name}"))
if hasattr(getattr(_build, _library._NVSHMEM, None), "set_pin_agreement"):
    _build._C_nvshmem.set_pin_agreement(reference.agree_on_pinned_shapes)
_autograd.register()

from .buffer import Buffer, EventOverlap  # noqa: E402
from .config import Config, get_low_latency_rdma_size_hint  # noqa: E402
from .ops import (  # noqa: E402
    CombineOutput, DispatchHandle, DispatchLayout, DispatchOutput, LowLatencyDispatchOutput,
    LowLatencyHandle, per_token_cast_back, per_token_cast_to_fp8,
)
from ._build import build_info  # noqa: E402
from . import utils  # noqa: E402,F401  (DeepEP's deep_ep.utils)

# DeepEP V1's index dtype for topk_idx (its C++ extension exports it; DeepEP's tests convert
# topk_idx to it first).
topk_idx_t = torch.int64

__all__ = [
    "Buffer", "EventOverlap", "Config", "get_low_latency_rdma_size_hint", "DispatchHandle",
    "DispatchLayout", "DispatchOutput", "CombineOutput", "LowLatencyHandle",
    "LowLatencyDispatchOutput", "per_token_cast_to_fp8", "per_token_cast_back", "build_info",
    "topk_idx_t",
]
__version__ = "0.1.0"
