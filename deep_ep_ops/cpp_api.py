"""Compile and link C++ code against deep_ep_ops' C++ API (``deep_ep_ops/buffer.h``,
docs/CPP_API.md): the header directory, the package's libraries and torch's, as compiler flags
or as ``torch.utils.cpp_extension`` arguments.

``python -m deep_ep_ops.cpp_api --cflags --libs`` prints the flags (as ``pkg-config`` does);
``examples/cpp_engine/build.sh`` builds a C++ program with them. Python finds the paths only:
the program runs without it. In a ``torch.utils.cpp_extension`` build, pass
``**extension_kwargs()`` to ``CUDAExtension`` (or ``load``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

PACKAGE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(PACKAGE, "include")
LIB = os.path.join(PACKAGE, "lib")
LIBRARIES = ("deep_ep_ops", "deep_ep_ops_nvshmem")  # the second only where NVSHMEM was found
TORCH_LIBRARIES = ("torch", "torch_cpu", "torch_cuda", "c10", "c10_cuda")


def built_libraries() -> list[str]:
    """The package's C++ libraries that this install has (none on a CPU-only install)."""
    return [name for name in LIBRARIES if os.path.isfile(os.path.join(LIB, f"lib{name}.so"))]


def _cuda_home() -> str:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME or "/usr/local/cuda"


def include_dirs() -> list[str]:
    from torch.utils import cpp_extension

    return [INCLUDE, *cpp_extension.include_paths(), os.path.join(_cuda_home(), "include")]


def library_dirs() -> list[str]:
    from torch.utils import cpp_extension

    return [LIB, *cpp_extension.library_paths(), os.path.join(_cuda_home(), "lib64")]


def _libraries() -> list[str]:
    """The package's C++ libraries, or a RuntimeError on an install that has none."""
    libraries = built_libraries()
    if not libraries:
        raise RuntimeError("deep_ep_ops has no C++ libraries here (a CPU-only install builds "
                           "none): install it with a CUDA build of torch and nvcc")
    return libraries


def _link(dirs: list[str], libraries) -> list[str]:
    """Linker flags for `libraries` in `dirs`. --no-as-needed comes first, as it only applies to
    the libraries after it: torch_cuda and the NVSHMEM library register kernels when loaded and
    are not called by name. The rpaths find every library again at run time."""
    return (["-Wl,--no-as-needed"] + [f"-L{d}" for d in dirs] + [f"-Wl,-rpath,{d}" for d in dirs]
            + [f"-l{name}" for name in libraries])


def extension_kwargs() -> dict:
    """``CUDAExtension`` / ``load`` arguments for a torch extension that uses the C++ API. The
    package's libraries go in ``extra_link_args`` (after --no-as-needed), not ``libraries``,
    which setuptools puts before any extra argument."""
    return {"include_dirs": [INCLUDE], "extra_link_args": _link([LIB], _libraries())}


def cflags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{d}" for d in include_dirs())]


def libs() -> list[str]:
    return _link(library_dirs(), (*_libraries(), *TORCH_LIBRARIES, "cudart"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cflags", action="store_true", help="compiler flags")
    parser.add_argument("--libs", action="store_true", help="linker flags")
    args = parser.parse_args(argv)
    if not (args.cflags or args.libs):
        parser.error("give --cflags and/or --libs")
    try:
        flags = (cflags() if args.cflags else []) + (libs() if args.libs else [])
    except RuntimeError as error:  # a CPU-only install: say why, without a traceback
        print(f"deep_ep_ops.cpp_api: {error}", file=sys.stderr)
        return 1
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
