"""The benchmark CLI: a tiny two-rank run end to end, and its argument errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from deep_ep_ops import bench

NUM_RANKS, TOKENS, HIDDEN, NUM_EXPERTS, NUM_TOPK = 2, (16, 32), 256, 8, 2

EXPECTED_OPS = {
    "normal": ["layout", "dispatch bf16", "dispatch fp8", "combine bf16"],
    "low-latency": [
        "dispatch fp8", "combine bf16", "dispatch fp8 send+recv", "combine bf16 send+recv",
    ],
}


def _parse_table(stdout: str) -> list[dict]:
    """Rows of the table that ends stdout, as ``{column: cell}``."""
    lines = stdout.rstrip("\n").splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("op "))
    columns = re.split(r"\s{2,}", lines[header].strip())
    assert columns == list(bench.TABLE_COLUMNS)
    assert set(lines[header + 1]) == {"-"}
    return [dict(zip(columns, re.split(r"\s{2,}", line.strip()))) for line in lines[header + 2 :]]


def test_bench_cli_two_ranks(tmp_path):
    out_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "deep_ep_ops.bench", "--backend", "gloo", "--mode", "all",
        "--num-ranks", str(NUM_RANKS), "--tokens", *map(str, TOKENS), "--hidden", str(HIDDEN),
        "--num-experts", str(NUM_EXPERTS), "--num-topk", str(NUM_TOPK), "--num-iters", "3",
        "--num-warmup", "1", "--out", str(out_dir),
    ]
    env = dict(os.environ, DEEP_EP_OPS_TIMEOUT_S="60")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "[1/16] normal layout tokens=16" in proc.stderr  # progress, from rank 0 only
    assert proc.stderr.count("[1/16]") == 1

    rows = _parse_table(proc.stdout)
    expected = [
        (op, mode, str(t)) for mode in EXPECTED_OPS for t in TOKENS for op in EXPECTED_OPS[mode]
    ]
    assert [(r["op"], r["mode"], r["tokens/rank"]) for r in rows] == expected
    for row in rows:
        assert row["hidden"] == str(HIDDEN)
        assert float(row["median us"]) > 0
        assert row["backend"] == "reference/gloo"
        assert row["vs ref"] == "-"  # CPU: ours is the reference
        if row["op"] == "layout":
            assert row["GB/s"] == "-"
        else:
            assert float(row["GB/s"]) > 0

    report = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "table.txt").read_text().strip() == "\n".join(
        proc.stdout.strip().splitlines()[-len(rows) - 4 :]
    )
    fp8_row = HIDDEN + 4 * HIDDEN // 128
    for result in report["results"]:
        assert result["min_us"] <= result["median_us"] <= result["max_us"]
        if result["op"] == "layout":
            continue
        row_bytes = fp8_row if "fp8" in result["op"] else 2 * HIDDEN
        rows_per_rank = result["rows_per_rank"]
        assert result["bytes_per_rank"] == [n * row_bytes for n in rows_per_rank]
        pairs = NUM_RANKS * result["tokens_per_rank"] * NUM_TOPK  # distinct experts per token
        if result["mode"] == "low-latency":  # one row per (token, expert)
            assert sum(rows_per_rank) == pairs
        else:  # one row per (token, destination rank)
            assert NUM_RANKS * result["tokens_per_rank"] <= sum(rows_per_rank) <= pairs
        if "send+recv" in result["op"]:
            assert set(result["phases_median_us"]) == {"send", "recv"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-ranks", "3", "--num-experts", "32"], "multiple of --num-ranks"),
        (["--hidden", "1000"], "multiple of 128"),
        (["--num-topk", "64", "--num-experts", "32"], "--num-topk"),
        (["--tokens", "0"], "--tokens must be positive"),
        (["--num-iters", "0"], "--num-iters"),
    ],
)
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--backend", "gloo", *argv])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
