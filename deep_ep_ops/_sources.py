"""The identity of the CUDA sources an extension is built from (standard library only: setup.py
loads this file by path before anything is built).

``source_hash(root)`` digests every file the extensions are compiled from (``csrc/`` but its
generated headers, ``setup.py``, and the op table the generated headers come from). setup.py
writes it into ``csrc/generated/build_id.h``; the extensions report it as ``source_hash`` and
``build_info()`` says whether the built extension matches the sources beside it (an editable
install) or is stale. ``python deep_ep_ops/_sources.py [ROOT]`` prints it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys

_PATTERNS = ("csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "csrc/**/*.cuh", "setup.py",
             "deep_ep_ops/_library.py")


def source_files(root: str) -> list[str]:
    files = set()
    for pattern in _PATTERNS:
        files.update(glob.glob(os.path.join(root, pattern), recursive=True))
    generated = os.path.join(root, "csrc", "generated") + os.sep
    return sorted(f for f in files if not f.startswith(generated))


def source_hash(root: str) -> str | None:
    """12 hex digits over the sources' paths and contents, or ``None`` without ``csrc/``."""
    files = source_files(root)
    if not any(os.sep + "csrc" + os.sep in f for f in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    print(source_hash(sys.argv[1] if len(sys.argv) > 1 else os.getcwd()))
