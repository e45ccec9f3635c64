"""Build of deep_ep_ops.

On a CPU-only torch this installs the pure-Python package (schemas, fakes, reference backend)
with no compiler step. With a CUDA build of torch and ``nvcc`` (gated on ``torch.version.cuda``
and ``CUDA_HOME``, not on a visible GPU) it also builds the ``deep_ep_ops._C`` extension from
``csrc/``; NVSHMEM sources only when NVSHMEM is found. ``meta/`` installs as
``deep_ep_ops.meta``.
"""

import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}


def _find_nvshmem(cuda_major: str):
    """NVSHMEM's root (with include/ and lib/): ``NVSHMEM_DIR``, else the pip package
    ``nvidia-nvshmem-cu<major>`` matching torch's CUDA major. ``(root or None, why)``."""
    import importlib.metadata
    import importlib.util

    root = os.environ.get("NVSHMEM_DIR")
    if root:
        if os.path.isfile(os.path.join(root, "include", "nvshmem.h")):
            return root, f"NVSHMEM_DIR={root}"
        return None, f"NVSHMEM_DIR={root} has no include/nvshmem.h"
    package = f"nvidia-nvshmem-cu{cuda_major}"
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None, f"neither NVSHMEM_DIR nor the pip package {package} is installed"
    spec = importlib.util.find_spec("nvidia.nvshmem")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(location, "include", "nvshmem.h")):
            return location, f"{package} at {location}"
    return None, f"{package} is installed but has no include/nvshmem.h"


def _cuda_extension():
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("DEEP_EP_OPS_NO_CUDA") == "1" or not torch.version.cuda:
        return None
    if cpp_extension.CUDA_HOME is None:
        return None
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    nvshmem_root, nvshmem_why = _find_nvshmem(torch.version.cuda.split(".")[0])
    nvshmem_sources = [s for s in sources if "/nvshmem/" in s]
    sources = [s for s in sources if "/nvshmem/" not in s]
    if not sources:
        return None
    include = [os.path.abspath("csrc"), os.path.join(cpp_extension.CUDA_HOME, "include", "cccl")]
    # The intranode path never needs NVSHMEM; its own sources join only when it is found.
    print(f"deep_ep_ops: NVSHMEM: {nvshmem_why}", file=sys.stderr)
    define_macros = []
    if nvshmem_root is not None and nvshmem_sources:
        sources += nvshmem_sources
        include.append(os.path.join(nvshmem_root, "include"))
        define_macros.append(("DEEP_EP_OPS_WITH_NVSHMEM", "1"))
    return cpp_extension.CUDAExtension(
        "deep_ep_ops._C",
        sources,
        include_dirs=include,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90"],
        },
    )


try:
    _ext = _cuda_extension()
except ImportError:  # no torch at metadata time: pure-Python install
    _ext = None
if _ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, cmdclass = [_ext], {"build_ext": BuildExtension}

setup(
    name="deep_ep_ops",
    version="0.1.0",
    description="Expert-parallel dispatch/combine for MoE as PyTorch custom ops",
    packages=["deep_ep_ops", "deep_ep_ops.meta"],
    package_dir={"deep_ep_ops": "deep_ep_ops", "deep_ep_ops.meta": "meta"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
