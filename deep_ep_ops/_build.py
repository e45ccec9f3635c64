"""What was built, and for which torch/CUDA: import explains itself."""

from __future__ import annotations

import importlib
import importlib.util

import torch

EXTENSION = "deep_ep_ops._C"

if importlib.util.find_spec(EXTENSION) is None:
    _C, EXTENSION_ERROR = None, "not built"
else:
    try:  # registers the CUDA kernels for the deep_ep ops
        _C, EXTENSION_ERROR = importlib.import_module(EXTENSION), None
    except ImportError as error:  # built for another torch/CUDA, or a missing library
        _C, EXTENSION_ERROR = None, f"built but failed to load ({error})"

HAS_CUDA_KERNELS = _C is not None
CUDA_REFERENCE_OPS: tuple[str, ...] = ()  # filled by deep_ep_ops/__init__.py


def build_info() -> str:
    """A short report of the installed backends."""
    lines = [f"deep_ep_ops: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if HAS_CUDA_KERNELS:
        lines.append(f"  CUDA kernels: built ({EXTENSION}): layout and intranode NVLink kernels")
        lines.append(
            "  NVSHMEM kernels: built" if _C.with_nvshmem else
            "  NVSHMEM kernels: not built (none written yet, or the build found no NVSHMEM: "
            "NVSHMEM_DIR or pip nvidia-nvshmem-cu<torch's CUDA major>); low-latency ops use the "
            "NCCL reference"
        )
        if CUDA_REFERENCE_OPS:
            lines.append(f"  CUDA ops still on the NCCL reference: {', '.join(CUDA_REFERENCE_OPS)}")
    else:
        why = "CPU-only torch" if not torch.version.cuda else EXTENSION_ERROR
        lines.append(f"  CUDA kernels: not available ({why}); CUDA tensors use the NCCL reference")
    lines.append("  reference backend: CPU (gloo) and CUDA (NCCL)")
    return "\n".join(lines)
