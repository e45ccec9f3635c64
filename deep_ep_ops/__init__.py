"""deep_ep_ops: expert-parallel dispatch/combine for MoE models as PyTorch custom ops.

``import deep_ep_ops as deep_ep`` gives a drop-in for DeepEP's V1 ``Buffer`` API; the ops
themselves are ``torch.ops.deep_ep.*`` (typed wrappers in ``deep_ep_ops.ops``).
"""

import torch

from . import _library
from . import meta  # noqa: F401  (attaches the fakes; installed from the top-level meta/)
from . import _autograd, _build, reference

reference.register(_library.LIB, "CPU")
# CUDA ops without a kernel in the extension (all of them without it) run the same reference
# code over NCCL.
_build.CUDA_REFERENCE_OPS = tuple(reference.register(_library.LIB, "CUDA"))
if _build.HAS_CUDA_KERNELS:
    # Buffers without an NVLink runtime (gloo groups, more than 8 ranks) take the reference
    # path from inside the CUDA kernels' bindings.
    for _name in ("dispatch", "capacity_dispatch", "cached_dispatch", "combine"):
        _build._C.set_fallback(_name, getattr(reference, _name))
if _build.HAS_LOW_LATENCY_KERNELS:
    # Low-latency calls the NVSHMEM kernels do not take (see csrc/nvshmem/bindings.cpp).
    for _name in (
        "low_latency_dispatch", "low_latency_dispatch_send", "low_latency_dispatch_recv",
        "low_latency_combine", "low_latency_combine_out", "low_latency_combine_send",
        "low_latency_combine_recv", "clean_low_latency_buffer",
    ):
        _build._C_nvshmem.set_fallback(_name, getattr(reference, _name))
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
