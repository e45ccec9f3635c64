"""What was built, and for which torch/CUDA: import explains itself."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers CUDA kernels for the deep_ep ops)

    EXTENSION_ERROR = None
except ImportError as error:  # CPU-only install, or an extension built for another torch
    _C = None
    EXTENSION_ERROR = error

HAS_CUDA_KERNELS = _C is not None


def build_info() -> str:
    """A one-paragraph report of the installed backends."""
    lines = [f"deep_ep_ops: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if HAS_CUDA_KERNELS:
        lines.append("  CUDA kernels: built (deep_ep_ops._C)")
    else:
        why = "no CUDA build of torch" if not torch.version.cuda else f"{EXTENSION_ERROR}"
        lines.append(f"  CUDA kernels: not built ({why}); CUDA tensors use the NCCL reference")
    lines.append("  reference backend: CPU (gloo) and CUDA (NCCL)")
    return "\n".join(lines)
