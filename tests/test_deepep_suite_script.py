"""scripts/deepep_suite.py's rewrite of DeepEP's test_internode.py for emulated nodes: exactly
its two topology asserts change, and a file without them is refused (no DeepEP code here: the
text below only has the shape of those lines)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "deepep_suite", Path(__file__).resolve().parents[1] / "scripts" / "deepep_suite.py")
suite = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(suite)

TEXT = """def test_main(args, num_local_ranks, num_ranks, num_experts):
    assert num_experts % num_ranks == 0 and num_local_ranks == 8
    return 1


def test_loop(num_local_ranks, num_ranks):
    assert num_local_ranks == 8 and num_ranks > 8
"""


def test_the_two_asserts_are_relaxed_for_the_emulated_nodes():
    relaxed = suite.relax_internode_asserts(TEXT, 2)
    assert "num_local_ranks == 2\n" in relaxed
    assert "assert num_local_ranks == 2 and num_ranks > 2" in relaxed
    assert "== 8" not in relaxed and "> 8" not in relaxed
    # Nothing else changes.
    assert relaxed.replace("== 2", "== 8").replace("> 2", "> 8") == TEXT


def test_an_unknown_test_file_is_refused():
    with pytest.raises(ValueError, match="expected 1: another DeepEP version"):
        suite.relax_internode_asserts(TEXT.replace("num_local_ranks == 8 and", "True and"), 2)
