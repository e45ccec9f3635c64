"""Build of deep_ep_ops.

On a CPU-only torch this installs the pure-Python package (schemas, fakes, reference backend)
with no compiler step. With a CUDA build of torch and ``nvcc`` (gated on ``torch.version.cuda``
and ``CUDA_HOME``, not on a visible GPU) it also builds the ``deep_ep_ops._C`` extension from
``csrc/`` and, when NVSHMEM is found, ``deep_ep_ops._C_nvshmem`` from ``csrc/nvshmem/``. ``meta/`` installs as
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


_NVCC = ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90"]
# torch's extension flags hide the bf16/half operators that NVSHMEM's headers use.
_NVSHMEM_UNDEFINE = [f"-U__CUDA_NO_{name}__" for name in (
    "HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS", "BFLOAT16_CONVERSIONS",
    "BFLOAT16_OPERATORS")]
LIB, NVSHMEM_LIB = "deep_ep_ops.lib.libdeep_ep_ops", "deep_ep_ops.lib.libdeep_ep_ops_nvshmem"


def _library(cpp_extension, name: str, sources: list, links=(), **kwargs):
    """A shared library of the package: libtorch only, no Python (a C++ engine loads it without
    an interpreter), so torch_python is left out. ``links``: libraries of the package it needs
    (found next to it at run time)."""
    import torch

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    ext = cpp_extension.CUDAExtension(name, sources, **kwargs)
    ext.libraries = [lib for lib in ext.libraries if lib != "torch_python"]
    ext.deep_ep_links = tuple(links)
    ext.libraries += [link.rsplit(".", 1)[-1][len("lib"):] for link in links]  # -ldeep_ep_ops
    here = "$ORIGIN/lib" if name.count(".") == 1 else "$ORIGIN"
    ext.extra_link_args = list(ext.extra_link_args) + [f"-Wl,-rpath,{here}", f"-Wl,-rpath,{torch_lib}"]
    return ext


def _nvshmem_extensions(cpp_extension, root: str, sources: list, include: list):
    """libdeep_ep_ops_nvshmem (the low-latency and internode kernels, relocatable device code
    linked against NVSHMEM's device library; apart from libdeep_ep_ops so that its kernels keep
    whole-program compilation) and its Python bindings ``deep_ep_ops._C_nvshmem``."""
    lib = os.path.join(root, "lib")
    hosts = sorted(glob.glob(os.path.join(lib, "libnvshmem_host.so*")))
    if not hosts or not os.path.isfile(os.path.join(lib, "libnvshmem_device.a")):
        print(f"deep_ep_ops: NVSHMEM at {root} lacks lib/libnvshmem_host.so or "
              "lib/libnvshmem_device.a: low-latency kernels not built", file=sys.stderr)
        return []
    include = include + [os.path.join(root, "include")]
    python = [s for s in sources if s.endswith("python.cpp")]
    library = _library(
        cpp_extension, NVSHMEM_LIB, [s for s in sources if s not in python], links=[LIB],
        include_dirs=include,
        library_dirs=[lib],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": _NVCC + ["-rdc=true"] + _NVSHMEM_UNDEFINE},
        extra_link_args=[os.path.join(lib, "libnvshmem_device.a"), hosts[0], f"-Wl,-rpath,{lib}"],
        dlink=True,
        dlink_libraries=["nvshmem_device"],
    )
    bindings = _library(cpp_extension, "deep_ep_ops._C_nvshmem", python, links=[NVSHMEM_LIB],
                        include_dirs=include,
                        extra_compile_args={"cxx": ["-O3", "-std=c++17"]})
    bindings.libraries.append("torch_python")
    return [library, bindings]


def _write_generated_headers() -> str:
    """csrc/generated/ (op ids and names from the op table, the sources' hash): see
    deep_ep_ops/_sources.py, loaded by path (nothing is importable before the build)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sources", os.path.join("deep_ep_ops", "_sources.py"))
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    return sources.write_headers(os.getcwd())


def _cuda_extensions():
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("DEEP_EP_OPS_NO_CUDA") == "1" or not torch.version.cuda:
        return []
    if cpp_extension.CUDA_HOME is None:
        return []
    print(f"deep_ep_ops: sources {_write_generated_headers()}", file=sys.stderr)
    os.makedirs(os.path.join("deep_ep_ops", "lib"), exist_ok=True)  # an editable install's libraries
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    nvshmem_sources = [s for s in sources if "/nvshmem/" in s]
    sources = [s for s in sources if "/nvshmem/" not in s]
    include = [os.path.abspath("csrc"), os.path.abspath(os.path.join("deep_ep_ops", "include")),
               os.path.join(cpp_extension.CUDA_HOME, "include", "cccl")]
    flags = {"cxx": ["-O3", "-std=c++17"], "nvcc": _NVCC}
    # libdeep_ep_ops (the NVLink kernels, their op kernels and runtimes, the C++ Buffer) and its
    # Python bindings deep_ep_ops._C.
    python = [s for s in sources if s.endswith("python.cpp")]
    bindings = _library(cpp_extension, "deep_ep_ops._C", python, links=[LIB], include_dirs=include,
                        extra_compile_args=flags)
    bindings.libraries.append("torch_python")
    extensions = [
        _library(cpp_extension, LIB, [s for s in sources if s not in python], include_dirs=include,
                 extra_compile_args=flags),
        bindings,
    ]
    # The intranode path never needs NVSHMEM; the low-latency kernels build only when found.
    nvshmem_root, nvshmem_why = _find_nvshmem(torch.version.cuda.split(".")[0])
    print(f"deep_ep_ops: NVSHMEM: {nvshmem_why}", file=sys.stderr)
    if nvshmem_root is not None:
        extensions += _nvshmem_extensions(cpp_extension, nvshmem_root, nvshmem_sources, include)
    return extensions


try:
    ext_modules = _cuda_extensions()
except ImportError:  # no torch at metadata time: pure-Python install
    ext_modules = []
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    class _BuildExtension(BuildExtension):
        """Builds the libraries before the modules that link them (the order of ext_modules),
        linking each against the package's libraries where this build puts them, and names
        them plainly (libdeep_ep_ops.so, _C.so: no ABI suffix, so engines can link them)."""

        def build_extension(self, ext):
            for link in getattr(ext, "deep_ep_links", ()):
                ext.library_dirs.append(os.path.dirname(self.get_ext_fullpath(link)))
            super().build_extension(ext)

    cmdclass = {"build_ext": _BuildExtension.with_options(no_python_abi_suffix=True)}

setup(
    name="deep_ep_ops",
    version="0.1.0",
    description="Expert-parallel dispatch/combine for MoE as PyTorch custom ops",
    packages=["deep_ep_ops", "deep_ep_ops.bench", "deep_ep_ops.meta"],
    # The C++ API's headers (docs/CPP_API.md), installed with the package.
    package_data={"deep_ep_ops": ["include/deep_ep_ops/*.h"]},
    package_dir={"deep_ep_ops": "deep_ep_ops", "deep_ep_ops.meta": "meta"},
    python_requires=">=3.10",
    # numpy: torch.distributed's object collectives (all_gather_object, used by the benchmark
    # and the CUDA runtimes' set-up) need it, and torch does not depend on it. torch stays a
    # lower bound only, so an installed torch >= 2.6 (a CUDA build) is kept as it is.
    install_requires=["torch>=2.6", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
