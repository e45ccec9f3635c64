"""The ops' C++ definition (``csrc/ops.h``, ``deep_ep_ops::define_ops``): the schemas of the one op
table, so a process can have ``deep_ep::*`` without the Python package defining them.

- ``csrc/generated/schemas.h`` is written from ``deep_ep_ops/_schemas.py`` (standard library
  only) and holds exactly the schemas ``deep_ep_ops/_library.py`` defines, in table order;
- where a C++ compiler is found, a shared library of ``define_ops()`` alone (no Python in it)
  is compiled against this torch and loaded into a fresh process before ``deep_ep_ops``: every
  op then has the Python table's schema, a second call defines nothing, and importing the
  package afterwards (its definition adds nothing) still runs the ops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from deep_ep_ops import _library, _sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_schemas_are_the_op_table():
    schemas = _sources.op_schemas(ROOT)
    assert schemas == _library.SCHEMAS and tuple(schemas) == _library.OP_NAMES
    header = _sources.schemas_header(schemas)
    rows = [line.strip() for line in header.splitlines() if line.startswith("    {")]
    assert rows == [f"{{{json.dumps(n)}, {json.dumps(s)}}}," for n, s in schemas.items()]
    assert _sources.op_names(ROOT) == list(_library.OP_NAMES)


def _compiler():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


_CHILD = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    names = sys.argv[2].split(",")
    found = {n: [str(s) for s in torch._C._jit_get_schemas_for_operator("deep_ep::" + n)]
             for n in names}
    import deep_ep_ops  # its own definition must add nothing and break nothing
    from deep_ep_ops import _library
    wanted = {n: [str(torch._C.parse_schema("deep_ep::" + s))] for n, s in _library.SCHEMAS.items()}
    assert found == wanted, {n: (found[n], wanted[n]) for n in names if found[n] != wanted[n]}
    topk = torch.tensor([[0, 3], [1, -1], [2, 3]])
    per_rank = torch.ops.deep_ep.get_dispatch_layout(topk, 4, 2, 1)[0]
    assert per_rank.tolist() == [2, 2], per_rank
    print("ok", len(found))
""")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler (CXX, c++ or g++)")
def test_ops_defined_from_cpp_are_the_python_ops(tmp_path):
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "schemas.h").write_text(
        _sources.schemas_header(_sources.op_schemas(ROOT)))
    shutil.copy(os.path.join(ROOT, "csrc", "ops.h"), tmp_path / "ops.h")
    source = tmp_path / "define.cpp"
    source.write_text(textwrap.dedent("""
        #include <cstdlib>
        #include "ops.h"
        namespace {
        // Loading the library defines every op; a second call finds them all defined.
        const int defined = [] {
          const int n = deep_ep_ops::define_ops();
          if (n != static_cast<int>(std::size(deep_ep_ops::kSchemaTable)) ||
              deep_ep_ops::define_ops() != 0)
            std::abort();
          return n;
        }();
        }  // namespace
    """))
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    library = tmp_path / "libdefine.so"
    abi = int(torch.compiled_with_cxx11_abi())
    compiled = subprocess.run(
        [_compiler(), "-std=c++20", "-shared", "-fPIC", "-O0", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
         "-I", include, "-I", os.path.join(include, "torch", "csrc", "api", "include"),
         "-I", str(tmp_path), str(source), "-o", str(library), "-L", lib, "-ltorch",
         "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}", "-w"],
        capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(library), ",".join(_library.OP_NAMES)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    assert child.stdout.split() == ["ok", str(len(_library.OP_NAMES))]
