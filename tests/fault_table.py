"""The fault table of the reliability report: per fault or disagreement case, the backend, the
ranks, the rank that raised, the seconds to the error and the error's first words.

The fault tests (CPU and GPU) append a row here when ``DEEP_EP_OPS_FAULT_TABLE`` names a file;
``scripts/gpu_run.sh`` sets it for the GPU tests and prints the table, and a CPU run gets one
with ``DEEP_EP_OPS_FAULT_TABLE=faults.tsv python -m pytest tests/test_faults.py
tests/test_errors.py``. Tab-separated, one line per row; nothing is written without the
variable.
"""

from __future__ import annotations

import os

ENV = "DEEP_EP_OPS_FAULT_TABLE"


def record(backend: str, world_size: int, case: str, rank: int, error: str,
           seconds: float) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    text = " ".join(str(error).split())
    with open(path, "a") as table:
        table.write(f"{case}\t{backend}\t{world_size}\t{rank}\t{seconds:.2f}\t{text[:300]}\n")
