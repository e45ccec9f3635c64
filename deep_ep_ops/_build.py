"""What was built, and for which torch/CUDA: import explains itself."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import _sources


def _load(name: str):
    """``(module or None, why not)``; importing registers the module's CUDA kernels."""
    if importlib.util.find_spec(name) is None:
        return None, "not built"
    try:
        return importlib.import_module(name), None
    except ImportError as error:  # built for another torch/CUDA, or a missing library
        return None, f"built but failed to load ({error})"


EXTENSION, LOW_LATENCY_EXTENSION = "deep_ep_ops._C", "deep_ep_ops._C_nvshmem"
_C, EXTENSION_ERROR = _load(EXTENSION)
_C_nvshmem, LOW_LATENCY_EXTENSION_ERROR = _load(LOW_LATENCY_EXTENSION) if _C else (None, "not built")

HAS_CUDA_KERNELS = _C is not None
HAS_LOW_LATENCY_KERNELS = _C_nvshmem is not None
CUDA_REFERENCE_OPS: tuple[str, ...] = ()  # filled by deep_ep_ops/__init__.py


def _sources_line() -> str:
    """Which sources the extensions were built from, and whether those beside the package (an
    editable install) are still them."""
    built = sorted({getattr(m, "source_hash", "unknown") for m in (_C, _C_nvshmem) if m})
    here = _sources.source_hash(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    state = ("" if here is None else ", the sources here" if built == [here] else
             f", STALE: the sources here are {here}; rebuild")
    return f"  built from sources {' and '.join(built)}{state}"


def build_info() -> str:
    """A short report of the installed backends."""
    lines = [f"deep_ep_ops: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if HAS_CUDA_KERNELS:
        lines.append(f"  CUDA kernels: built ({EXTENSION}): layout and intranode NVLink kernels")
        lines.append(_sources_line())
        lines.append(
            f"  NVSHMEM kernels: built ({LOW_LATENCY_EXTENSION}): low-latency dispatch/combine"
            if HAS_LOW_LATENCY_KERNELS else
            f"  NVSHMEM kernels: {LOW_LATENCY_EXTENSION_ERROR} (the build needs NVSHMEM: "
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
