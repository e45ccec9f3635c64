"""The benchmark CLI: tiny runs end to end (two ranks; four as two emulated nodes), its argument
errors and its summary."""

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from deep_ep_ops import Buffer, bench
from deep_ep_ops.config import get_combine_config, get_dispatch_config

NUM_RANKS, TOKENS, HIDDEN, NUM_EXPERTS, NUM_TOPK = 2, (16, 32), 256, 8, 2
NUM_SMS = (2, 4)

EXPECTED_OPS = {
    "normal": ["layout", "dispatch bf16", "dispatch fp8", "combine bf16"],
    "low-latency": [
        "dispatch fp8", "combine bf16", "dispatch fp8 send+recv", "combine bf16 send+recv",
    ],
}
SM_SWEPT = {("normal", "dispatch bf16"), ("normal", "dispatch fp8"), ("normal", "combine bf16")}
# The host table: (op, inputs), each without and with grad inputs.
EXPECTED_HOST_ROWS = [
    ("get_dispatch_layout", "topk_idx"), ("dispatch", "bf16 + weights"),
    ("capacity dispatch", "bf16 + weights"), ("cached dispatch", "bf16"), ("combine", "bf16"),
    ("low_latency_dispatch", "fp8"), ("low_latency_dispatch", "bf16"),
    ("low_latency_dispatch send", "fp8"), ("low_latency_dispatch recv hook", "fp8"),
    ("low_latency_dispatch send", "bf16"), ("low_latency_dispatch recv hook", "bf16"),
    ("low_latency_combine", "bf16 + weights"), ("low_latency_combine send", "bf16 + weights"),
    ("low_latency_combine recv hook", "bf16 + weights"),
]


def _assert_no_gpu_targets(text: str) -> None:
    """A CPU run's output has no docs/DESIGN.md §11 bounds, no target columns and no ratios."""
    assert "vs target" not in text and "target <=" not in text
    assert not re.search(r"[<>]= [\d.]+ (us|GB/s)", text), text
    assert not re.search(r"\b\d+(\.\d+)?x\b", text), text  # no "0.0004x" ratio anywhere


def _gpu_report(args: list[str], results: list[dict]) -> tuple[dict, str]:
    """The report of ``results`` as a run on one H200 with gloo ``args`` makes it (no host
    table), and its full text."""
    s = bench.parse_args(["--backend", "gloo", *args])
    report = {"settings": dataclasses.asdict(s), "device": "NVIDIA H200", "results": results,
              "host": None}
    report["summary"] = bench.best_rows(report)
    return report, bench.format_report(report)


def _parse_tables(text: str) -> list[list[dict]]:
    """Every aligned table in ``text`` (a header starting ``op``, a rule, rows up to a blank or
    non-table line), each as a list of ``{column: cell}``."""
    lines = text.rstrip("\n").splitlines()
    tables = []
    for i, line in enumerate(lines):
        if not line.startswith("op ") or i + 1 >= len(lines) or set(lines[i + 1]) != {"-"}:
            continue
        columns = re.split(r"\s{2,}", line.strip())
        assert tuple(columns) in (
            bench.TABLE_COLUMNS, bench.SUMMARY_COLUMNS, bench.CPU_SUMMARY_COLUMNS,
            bench.HOST_COLUMNS, bench.CPU_HOST_COLUMNS, bench.INTERNODE_TABLE_COLUMNS,
            bench.INTERNODE_SUMMARY_COLUMNS, bench.CPU_INTERNODE_SUMMARY_COLUMNS,
        )
        rows = []
        for row in lines[i + 2 :]:
            cells = re.split(r"\s{2,}", row.strip())
            if not row.strip() or len(cells) != len(columns):
                break
            rows.append(dict(zip(columns, cells)))
        tables.append(rows)
    return tables


def test_bench_cli_two_ranks(tmp_path):
    out_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "deep_ep_ops.bench", "--backend", "gloo", "--mode", "all",
        "--num-ranks", str(NUM_RANKS), "--tokens", *map(str, TOKENS), "--hidden", str(HIDDEN),
        "--num-experts", str(NUM_EXPERTS), "--num-topk", str(NUM_TOPK), "--num-iters", "3",
        "--num-warmup", "1", "--num-sms", *map(str, reversed(NUM_SMS)), "--out", str(out_dir),
    ]
    env = dict(os.environ, DEEP_EP_OPS_TIMEOUT_S="60")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr
    # normal: layout + 3 ops x 2 SM counts, low-latency: 4 ops; per tokens value
    total = len(TOKENS) * (1 + 3 * len(NUM_SMS) + 4)
    assert f"[1/{total}] normal layout tokens=16 (reference/gloo)" in proc.stderr
    assert f"[2/{total}] normal dispatch bf16 tokens=16 sms=2 (reference/gloo)" in proc.stderr
    assert proc.stderr.count(f"[1/{total}]") == 1  # progress, from rank 0 only

    full, summary, host = _parse_tables(proc.stdout)
    # No internode rows: the tables of before the internode mode, without RDMA columns.
    assert list(full[0]) == list(bench.TABLE_COLUMNS)
    assert list(summary[0]) == list(bench.CPU_SUMMARY_COLUMNS)
    assert "RDMA" not in proc.stdout and "emulated" not in proc.stdout
    expected = [
        (op, mode, str(t), str(n) if (mode, op) in SM_SWEPT else "-")
        for mode in EXPECTED_OPS for t in TOKENS for op in EXPECTED_OPS[mode]
        for n in (NUM_SMS if (mode, op) in SM_SWEPT else (None,))
    ]
    assert [(r["op"], r["mode"], r["tokens/rank"], r["SMs"]) for r in full] == expected
    for row in full:
        assert float(row["median us"]) > 0
        assert row["backend"] == "reference/gloo"
        if "send+recv" in row["op"]:  # both halves, each timed
            send, recv = map(float, row["send/recv us"].split("/"))
            assert send > 0 and recv > 0
        else:
            assert row["send/recv us"] == "-"
        assert row["ref us"] == row["ref GB/s"] == row["vs ref"] == "-"  # CPU: ours is the ref
        if row["op"] == "layout":
            assert row["GB/s"] == "-"
        else:
            assert float(row["GB/s"]) > 0

    # CUDA graphs are timed on CUDA only: no graph rows, so no capture notes either.
    assert not any(r["op"].endswith("[graph]") for r in full + summary)
    assert "not capturable" not in proc.stdout

    # Summary: one line per op with a target, at the largest tokens swept (4096/128 not swept).
    assert [(r["op"], r["mode"], r["tokens/rank"]) for r in summary] == [
        ("layout", "normal", "32"), ("dispatch bf16", "normal", "32"),
        ("dispatch fp8", "normal", "32"), ("combine bf16", "normal", "32"),
        ("dispatch fp8", "low-latency", "32"), ("combine bf16", "low-latency", "32"),
    ]
    for row in summary:
        swept = (row["mode"], row["op"]) in SM_SWEPT
        assert row["best SMs"] in ({"2", "4"} if swept else {"-"})
        assert "target" not in row and "vs target" not in row and row["speedup"] == "-"
        match = [r for r in full if (r["op"], r["mode"], r["tokens/rank"], r["SMs"]) == (
            row["op"], row["mode"], row["tokens/rank"], row["best SMs"])]
        assert len(match) == 1 and match[0]["median us"] == row["median us"]
    _assert_no_gpu_targets(proc.stdout)
    assert "summary (CPU, gloo): the reference backend only" in proc.stdout

    # Host table: every op (and half) without and with grad inputs, or why not; CPU-labelled.
    assert "host (CPU, gloo: the reference backend)" in proc.stdout
    assert [(r["op"], r["inputs"]) for r in host] == EXPECTED_HOST_ROWS
    for row in host:
        assert row["tokens/rank"] == str(TOKENS[0])
        assert float(row["host us"]) > 0
        if row["host us (grad)"] == "n/a":
            assert row["note"].startswith(("no differentiable input", "FP8 output")), row
        else:
            assert float(row["host us (grad)"]) > 0
    for rows_of in ("every row", r"every \(grad\) row"):
        assert re.search(rf"^baseline: torch\.add .* beside {rows_of}: [\d.]+ us per call "
                         r"\(median\)( \([\d.]+ to [\d.]+ over the rows\))?$", proc.stdout, re.M)

    table_txt = (out_dir / "table.txt").read_text().strip()
    assert table_txt.startswith("deep_ep_ops bench: 2 ranks (cpu)")
    assert proc.stdout.rstrip().endswith(table_txt)

    report = json.loads((out_dir / "results.json").read_text())
    assert report["settings"]["num_sms"] == list(NUM_SMS)
    assert report["settings"]["graph"] is True  # asked for, but there are no graphs on CPU
    host_report = report["host"]
    assert host_report["device"] == "cpu" and host_report["target_us"] is None
    for row in host_report["rows"]:
        assert row["vs_target"] is None
        if row["host_us"] is None:  # no variant with grad inputs
            assert row["grad"] and row["note"]
            continue
        assert row["host_us"] > 0 and len(row["host_us_per_rank"]) == NUM_RANKS
        assert row["autograd_graph"] is row["grad"]  # grad inputs: a graph; else none
        # Each repeat's op layer is taken against the baseline timed right after it in that
        # repeat (positive), so the median of the differences is below the op's own median.
        assert row["baseline_us"] > 0
        assert row["op_layer_us"] < row["host_us"]
    for key, grad in (("baseline", False), ("baseline_grad", True)):
        timed = [r["baseline_us"] for r in host_report["rows"]
                 if r["host_us"] is not None and r["grad"] is grad]
        assert host_report[key]["min_us"] == min(timed)
        assert host_report[key]["max_us"] == max(timed)
    assert {(r["op"], r["inputs"], r["grad"]) for r in host_report["rows"]} == {
        (op, inputs, grad) for op, inputs in EXPECTED_HOST_ROWS for grad in (False, True)
    }
    assert len(report["summary"]) == len(summary)
    assert all(r["target"] is None and r["vs_target"] is None for r in report["summary"])
    fp8_row = HIDDEN + 4 * HIDDEN // 128
    for result in report["results"]:
        assert result["min_us"] <= result["median_us"] <= result["max_us"]
        swept = (result["mode"], result["op"]) in SM_SWEPT
        assert result["num_sms"] in (NUM_SMS if swept else (None,))
        assert result["ratio_vs_reference"] is None and result["gbps_ratio_vs_reference"] is None
        assert result["timing"] == "eager" and result["capture_error"] is None
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


INTERNODE_RANKS, INTERNODE_NODES, INTERNODE_TOKENS = 4, 2, 16
INTERNODE_OPS = ["dispatch bf16", "dispatch fp8", "combine bf16"]


def _destination_nodes(settings, rank: int) -> list[int]:
    """Per token of ``rank``'s bench inputs, the nodes holding one of its experts, counted from
    the expert ids alone (experts by rank, ranks by node: both in blocks)."""
    inputs = bench.make_inputs(INTERNODE_TOKENS, settings, rank, torch.device("cpu"))
    experts_per_node = NUM_EXPERTS // INTERNODE_NODES
    return [len(set((inputs.topk_idx[t] // experts_per_node).tolist()))
            for t in range(INTERNODE_TOKENS)]


def test_bench_cli_internode_emulated(tmp_path):
    """Four gloo ranks as 2 x 2 emulated nodes: the internode ops, swept over SM counts, with
    both of DeepEP's bandwidths, labelled emulated everywhere, and no target anywhere."""
    out_dir = tmp_path / "out"
    args = [
        "--backend", "gloo", "--mode", "internode", "--num-ranks", str(INTERNODE_RANKS),
        "--tokens", str(INTERNODE_TOKENS), "--hidden", str(HIDDEN), "--num-experts",
        str(NUM_EXPERTS), "--num-topk", str(NUM_TOPK), "--num-iters", "2", "--num-warmup", "1",
        "--num-sms", *map(str, reversed(NUM_SMS)),
    ]
    env = dict(os.environ, DEEP_EP_OPS_TIMEOUT_S="60")
    proc = subprocess.run([sys.executable, "-m", "deep_ep_ops.bench", *args, "--out",
                           str(out_dir)], capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr
    total = len(INTERNODE_OPS) * len(NUM_SMS)
    assert (f"[1/{total}] internode dispatch bf16 tokens={INTERNODE_TOKENS} sms=2 "
            "(reference/gloo)") in proc.stderr
    assert "host time per eager call" not in proc.stderr  # no host table for this mode

    lines = proc.stdout.splitlines()
    assert lines[0].startswith("deep_ep_ops bench: 4 ranks (cpu)")
    assert lines[0].endswith(" -- internode: 2 x 2 nodes emulated on one host")
    assert "internode: 2 x 2 nodes emulated on one host, no target" in proc.stdout
    assert lines[-1].startswith("host: no host table in internode mode")
    _assert_no_gpu_targets(proc.stdout)  # no target ratio, nor a goal, on a CPU run

    full, summary = _parse_tables(proc.stdout)
    assert list(full[0]) == list(bench.INTERNODE_TABLE_COLUMNS)
    assert list(summary[0]) == list(bench.CPU_INTERNODE_SUMMARY_COLUMNS)
    mode = "internode (2 x 2 emulated)"
    assert [(r["op"], r["mode"], r["tokens/rank"], r["SMs"]) for r in full] == [
        (op, mode, str(INTERNODE_TOKENS), str(n)) for op in INTERNODE_OPS for n in NUM_SMS
    ]
    for row in full:
        assert float(row["median us"]) > 0 and row["backend"] == "reference/gloo"
        assert float(row["GB/s"]) > 0 and float(row["RDMA GB/s"]) > 0
        assert row["ref us"] == row["ref RDMA GB/s"] == row["vs ref"] == "-"
    assert [(r["op"], r["mode"]) for r in summary] == [(op, mode) for op in INTERNODE_OPS]
    for row in summary:
        assert row["best SMs"] in {"2", "4"} and row["speedup"] == "-"
        (match,) = [r for r in full if (r["op"], r["SMs"]) == (row["op"], row["best SMs"])]
        assert (match["median us"], match["RDMA GB/s"]) == (row["median us"], row["RDMA GB/s"])

    report = json.loads((out_dir / "results.json").read_text())
    assert report["settings"]["ranks_per_node"] == 2 and report["host"] is None
    assert report["settings"]["modes"] == ["internode"]
    settings = bench.parse_args(args)
    pairs = [sum(_destination_nodes(settings, rank)) for rank in range(INTERNODE_RANKS)]
    fp8_row = HIDDEN + 4 * HIDDEN // 128
    for result in report["results"]:
        assert (result["num_nodes"], result["ranks_per_node"], result["emulated"]) == (2, 2, True)
        row_bytes = fp8_row if "fp8" in result["op"] else 2 * HIDDEN
        # A token counts once per node it reaches, its own rank's node included (DeepEP's
        # count); combine sends the same rows back: the same pairs.
        assert result["rdma_pairs_per_rank"] == pairs
        assert result["rdma_bytes_per_rank"] == [n * row_bytes for n in pairs]
        expected_gbps = statistics.fmean(pairs) * row_bytes / (result["median_us"] * 1e3)
        assert result["rdma_gbps"] == pytest.approx(expected_gbps)
        assert result["gbps"] == pytest.approx(
            statistics.fmean(result["rows_per_rank"]) * row_bytes / (result["median_us"] * 1e3)
        )
        assert result["reference_rdma_gbps"] is None and result["ratio_vs_reference"] is None
    for row in report["summary"]:
        assert row["target"] is None and row["vs_target"] is None and row["emulated"]
        assert row["rdma_gbps"] > 0


def test_rdma_token_pairs_count_each_destination_node_once():
    """DeepEP's RDMA count: a token counts once per node holding one of its destination ranks
    (however many ranks there), its own rank's node included; a token going nowhere, never."""
    is_token_in_rank = torch.tensor([
        [1, 0, 0, 0],  # rank 0 only (node 0): one pair
        [1, 1, 0, 0],  # both ranks of node 0: still one
        [0, 1, 1, 0],  # one rank of each node: two
        [0, 0, 0, 0],  # nowhere: none
        [0, 0, 1, 1],  # both ranks of node 1: one
        [1, 1, 1, 1],  # everywhere: two
    ], dtype=torch.bool)
    assert bench.rdma_token_pairs(is_token_in_rank, 2) == 1 + 1 + 2 + 0 + 1 + 2
    assert bench.rdma_token_pairs(is_token_in_rank, 4) == int(is_token_in_rank.sum())  # 4 x 1
    assert bench.rdma_token_pairs(is_token_in_rank, 1) == 5  # one node: tokens sent anywhere
    assert bench.rdma_token_pairs(is_token_in_rank[:0], 2) == 0


def test_bench_internode_settings():
    """--mode all is normal + low-latency; internode only when asked for, with two emulated
    nodes by default and the normal mode's tokens per rank."""
    every = bench.parse_args(["--backend", "gloo"])
    assert every.modes == ("normal", "low-latency") and every.ranks_per_node is None
    assert every.num_nodes == 1
    internode = bench.parse_args(["--backend", "gloo", "--mode", "internode", "--num-ranks", "4"])
    assert (internode.modes, internode.ranks_per_node, internode.num_nodes) == (
        ("internode",), 2, 2)
    assert internode.tokens == {"internode": bench.CPU_DEFAULTS["tokens"]["normal"]}
    assert bench.GPU_DEFAULTS["tokens"]["internode"] == bench.GPU_DEFAULTS["tokens"]["normal"]
    assert bench.parse_args(["--backend", "gloo", "--mode", "internode"]).ranks_per_node == 1
    four = bench.parse_args(["--backend", "gloo", "--mode", "internode", "--num-ranks", "4",
                             "--ranks-per-node", "1"])
    assert (four.ranks_per_node, four.num_nodes) == (1, 4)
    assert "internode" in bench.build_parser().format_help()


def test_bench_internode_buffer(monkeypatch):
    """An internode run's buffer: its nodes, no low-latency mode, and NVLink bytes for every
    swept config as in normal mode."""
    s = bench.parse_args(["--backend", "gloo", "--num-ranks", "4", "--hidden", "7168",
                          "--num-experts", "256", "--num-sms", "8", "32", "--mode", "internode"])
    num_nvl_bytes, num_rdma_bytes = bench.buffer_sizes(s)
    assert num_nvl_bytes == get_dispatch_config(4, 32).get_nvl_buffer_size_hint(2 * 7168, 4)
    # The staged kernels' need (a whole call's tokens per node), not DeepEP's ring-buffer hint
    # (0 within one 8-rank domain).
    tokens = max(s.tokens["internode"])
    assert num_rdma_bytes == Buffer.get_internode_rdma_size_hint(tokens, 7168, 4, 2,
                                                                s.num_topk, 256)
    assert num_rdma_bytes >= 3 * tokens * 2 * 7168  # a staging share and a region per node
    created = []
    monkeypatch.setattr(bench.cases, "Buffer", lambda group, **kwargs: created.append(kwargs))
    bench._create_buffer(None, s)
    bench._create_buffer(None, bench.parse_args(["--backend", "gloo", "--mode", "normal"]))
    internode, normal = created
    assert internode["num_ranks_per_node"] == 2 and not internode["low_latency_mode"]
    assert internode["num_nvl_bytes"] == num_nvl_bytes
    assert "num_ranks_per_node" not in normal and normal["low_latency_mode"]


def _internode_row(op, num_sms, us, ref_us, pairs=1000, rows=1500):
    """An internode result row as ``time_case`` makes it (one rank, made-up samples) on GPUs."""
    s = bench.parse_args(["--backend", "gloo", "--num-ranks", "4", "--mode", "internode",
                          "--hidden", "7168", "--num-experts", "256"])
    (case,) = [c for c in bench.CASES if (c.mode, c.op) == ("internode", op)]

    def timed(label, t):
        sample = bench.RankSample([[t * 1e-6]] * 3, rows, pairs)
        return bench.summarize(case, ["x"], [sample], 4096, s, label, num_sms)

    return bench._with_reference(timed("cuda", us), timed("reference/nccl", ref_us))


def test_bench_internode_gpu_report():
    """On GPUs: RDMA GB/s beside GB/s for ours and the reference, no target nor ratio to one
    for internode rows (the cluster goals are printed as goals, not measured), emulated."""
    results = [_internode_row("dispatch bf16", n, us, 2000.0)
               for n, us in ((16, 900.0), (24, 700.0), (32, 600.0))]
    results.append(_internode_row("combine bf16", 24, 800.0, 1600.0))
    report, text = _gpu_report(["--num-ranks", "4", "--mode", "internode"], results)
    full, summary = _parse_tables(text)
    assert list(full[0]) == list(bench.INTERNODE_TABLE_COLUMNS)
    bf16 = 2 * 7168
    row = full[1]  # 24 SMs
    assert row["RDMA GB/s"] == f"{1000 * bf16 / 700e-6 / 1e9:.4g}"
    assert row["GB/s"] == f"{1500 * bf16 / 700e-6 / 1e9:.4g}"
    assert row["ref RDMA GB/s"] == f"{1000 * bf16 / 2000e-6 / 1e9:.4g}"
    assert row["vs ref"] == f"{2000 / 700:.2f}x"
    assert all(r["mode"] == "internode (2 x 2 emulated)" for r in full + summary)
    assert list(summary[0]) == list(bench.INTERNODE_SUMMARY_COLUMNS)
    assert [(r["op"], r["best SMs"], r["target"], r["vs target"], r["speedup"])
            for r in summary] == [
        ("dispatch bf16", "24", "-", "-", f"{2000 / 700:.2f}x"),
        ("combine bf16", "24", "-", "-", "2.00x"),
    ]
    assert all(r["target"] is None and r["vs_target"] is None for r in report["summary"])
    assert text.splitlines()[0].endswith(" -- internode: 2 x 2 nodes emulated on one host")
    assert ("goals on real clusters, not measured here: RDMA GB/s >= 90 dispatch and >= 81 "
            "combine at EP16 with 400 Gb/s NICs") in text
    json.dumps(report)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-ranks", "3", "--num-experts", "32"], "multiple of --num-ranks"),
        (["--hidden", "1000"], "multiple of 128"),
        (["--num-topk", "64", "--num-experts", "32"], "--num-topk"),
        (["--tokens", "0"], "--tokens must be positive"),
        (["--num-iters", "0"], "--num-iters"),
        (["--num-sms", "8", "3"], "--num-sms values must be even ints >= 2"),
        (["--num-sms", "0"], "--num-sms values must be even ints >= 2"),
        (["--num-sms", "-4"], "--num-sms values must be even ints >= 2"),
        (["--num-sms"], "expected at least one argument"),
        (["--num-sms", "eight"], "invalid int value"),
        (["--mode", "internode", "--num-ranks", "1"], "--mode internode needs >= 2 ranks"),
        (["--mode", "internode", "--num-ranks", "4", "--ranks-per-node", "3"],
         "--ranks-per-node (3) must divide --num-ranks (4)"),
        (["--mode", "internode", "--num-ranks", "4", "--ranks-per-node", "4"],
         "internode mode needs >= 2 nodes"),
        (["--mode", "internode", "--num-ranks", "4", "--ranks-per-node", "0"],
         "--ranks-per-node must be in [1, 8]"),
        (["--mode", "internode", "--num-ranks", "32", "--num-experts", "32",
          "--ranks-per-node", "16"], "--ranks-per-node must be in [1, 8]"),
        (["--mode", "all", "--ranks-per-node", "1"], "applies to --mode internode only"),
        (["--mode", "normal", "--num-ranks", "4", "--ranks-per-node", "2"],
         "applies to --mode internode only"),
    ],
)
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--backend", "gloo", *argv])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_num_sms_parsing():
    default = bench.parse_args(["--backend", "gloo"])
    assert default.num_sms == (get_dispatch_config(1).num_sms,)  # CPU: the default config only
    assert bench.GPU_DEFAULTS["num_sms"] == (8, 16, 20, 24, 32)
    swept = bench.parse_args(["--backend", "gloo", "--num-sms", "24", "2", "8", "24"])
    assert swept.num_sms == (2, 8, 24)  # sorted, duplicates dropped


def test_bench_no_graph_flag():
    default = bench.parse_args(["--backend", "gloo", "--mode", "low-latency"])
    assert default.graph and not bench.parse_args(["--backend", "gloo", "--no-graph"]).graph
    assert not default.graphed("low-latency")  # CPU: never
    # On GPUs (backend nccl) graphs time the low-latency ops only, unless --no-graph.
    gpu = dataclasses.replace(default, backend="nccl")
    assert gpu.graphed("low-latency") and not gpu.graphed("normal")
    assert not dataclasses.replace(gpu, graph=False).graphed("low-latency")


def test_bench_capture_failure_reporting():
    assert bench.first_capture_failure([None, None]) is None
    assert bench.first_capture_failure(["E: a", "E: b"]) == "E: a (every rank)"
    assert bench.first_capture_failure([None, "E: b", None, "E: d"]) == "E: b (ranks 1, 3)"
    assert bench.first_capture_failure([None, "E: b"]) == "E: b (rank 1)"

    first_line = bench.describe_error(RuntimeError("\n  first line\nsecond"))
    assert first_line == "RuntimeError: first line"
    assert bench.describe_error(ValueError()) == "ValueError"
    long = bench.describe_error(RuntimeError("x" * 500), limit=50)
    assert len(long) == 50 and long.endswith("...")

    # Ending a capture that a call broke raises again; the call's error is the one to report.
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as error:
        assert "not permitted" in bench.describe_error(bench._capture_cause(error))
    try:
        try:
            raise KeyError("internal")
        except KeyError:
            raise ValueError("a bad argument")
    except ValueError as error:
        assert bench._capture_cause(error) is error


def test_bench_buffer_covers_every_swept_config():
    s = bench.parse_args(["--backend", "gloo", "--num-ranks", "4", "--hidden", "7168",
                          "--num-experts", "256", "--num-sms", "8", "32", "--mode", "normal"])
    num_nvl_bytes, _ = bench.buffer_sizes(s)
    for n in (8, 20, 32):  # 20: the reference's default config
        for config in (get_dispatch_config(4, n), get_combine_config(4, n)):
            assert config.get_nvl_buffer_size_hint(2 * 7168, 4) <= num_nvl_bytes
    assert num_nvl_bytes == get_dispatch_config(4, 32).get_nvl_buffer_size_hint(2 * 7168, 4)


def _result(op, mode, num_sms, median_us, gbps, ref_us=None):
    return {
        "op": op, "mode": mode, "tokens_per_rank": 4096 if mode == "normal" else 128,
        "num_sms": num_sms, "median_us": median_us, "gbps": gbps,
        "reference_median_us": ref_us, "ratio_vs_reference": ref_us and ref_us / median_us,
    }


def test_bench_summary_best_sms_and_targets():
    results = [_result("layout", "normal", None, 10.0, None, 170.0)]
    # dispatch bf16: 32 SMs is fastest, but over the 24-SM budget; 24 wins within it.
    for n, us in ((8, 900.0), (24, 700.0), (32, 600.0)):
        results.append(_result("dispatch bf16", "normal", n, us, 255.5 * 700.0 / us, 1400.0))
    results.append(_result("combine bf16", "normal", 32, 500.0, 500.0, 1000.0))  # none within
    results.append(_result("dispatch fp8 send+recv", "low-latency", None, 20.0, 1.0))  # no target
    report = {"results": results, "host": None}
    by_op = {r["op"]: r for r in bench.best_rows(report)}
    assert set(by_op) == {"layout", "dispatch bf16", "combine bf16"}
    assert by_op["layout"]["vs_target"] == pytest.approx(2.0)  # 20 us target / 10 us
    best = by_op["dispatch bf16"]
    assert (best["num_sms"], best["median_us"], best["over_budget"]) == (24, 700.0, False)
    assert best["vs_target"] == pytest.approx(255.5 / 365)
    assert best["speedup_vs_reference"] == pytest.approx(2.0)
    assert by_op["combine bf16"]["over_budget"] and by_op["combine bf16"]["num_sms"] == 32

    report["host"] = _host_report("cuda")
    text = bench.format_summary(report)
    rows, host = _parse_tables(text)
    assert [(r["op"], r["best SMs"], r["target"], r["vs target"], r["speedup"]) for r in rows] == [
        ("layout", "-", "<= 20 us", "2x", "17.00x"),
        ("dispatch bf16", "24", ">= 365 GB/s", "0.7x", "2.00x"),
        ("combine bf16", "32 (>24)", ">= 445 GB/s", "1.12x", "2.00x"),
    ]
    # GPU host table: both grad variants of an op on one line; the op layer's share (host us
    # minus the 3.5 us torch.add baseline) against the 8 us target.
    assert [tuple(r.values()) for r in host] == [
        ("get_dispatch_layout", "topk_idx", "128", "4.0", "+0.5", "2.00x", "n/a", "n/a", "n/a",
         "no differentiable input (topk_idx is int64)"),
        ("dispatch", "bf16 + weights", "128", "16.0", "+12.5", "0.50x", "20.0", "+16.5",
         "0.40x", "syncs (learns N on the host); wall - GPU busy time"),
        ("low_latency_dispatch send", "bf16", "128", "6.0", "+2.5", "1.33x", "9.0", "+5.5",
         "0.89x", "-"),
        ("low_latency_dispatch recv hook", "bf16", "128", "2.0", "-1.5", "4.00x", "3.0", "-0.5",
         "2.67x", "-"),
    ]
    lines = text.splitlines()
    assert "adds <= 8 us per call" in lines[lines.index("") + 1]
    assert lines[-2:] == [
        "baseline: torch.add on a [128, top-k] tensor, timed the same way beside every row: "
        "3.5 us per call (median) (3.0 to 4.0 over the rows)",
        "baseline: torch.add of a leaf that requires grad on a [128, top-k] tensor, timed the "
        "same way beside every (grad) row: 5.5 us per call (median)",
    ]


def _host_report(device: str) -> dict:
    """A host table as ``measure_host`` returns it (made-up numbers)."""
    gpu = device == "cuda"

    def row(op, inputs, grad, us, note="", syncs=False):
        return {"op": op, "inputs": inputs, "tokens_per_rank": 128, "grad": grad, "host_us": us,
                "vs_target": us and 8.0 / us if gpu else None, "note": note, "syncs": syncs,
                "op_layer_us": None if us is None else us - 3.5,
                "method": bench.WALL_MINUS_GPU if syncs else bench.SLEEPING_GPU}

    rows = [
        row("get_dispatch_layout", "topk_idx", False, 4.0),
        row("get_dispatch_layout", "topk_idx", True, None,
            "no differentiable input (topk_idx is int64)"),
        row("dispatch", "bf16 + weights", False, 16.0, "syncs (learns N on the host)", True),
        row("dispatch", "bf16 + weights", True, 20.0, "syncs (learns N on the host)", True),
    ]
    for grad, send, recv in ((False, 6.0, 2.0), (True, 9.0, 3.0)):
        rows += [row("low_latency_dispatch send", "bf16", grad, send),
                 row("low_latency_dispatch recv hook", "bf16", grad, recv)]
    return {"device": device, "backend": "cuda" if gpu else "reference/gloo", "calls": 100,
            "repeats": 7, "target_us": 8.0 if gpu else None, "rows": rows,
            "baseline": {"op": "torch.add", "tokens": 128, "host_us": 3.5, "min_us": 3.0,
                         "max_us": 4.0},
            "baseline_grad": {"op": "torch.add of a leaf that requires grad", "tokens": 128,
                              "host_us": 5.5, "min_us": 5.5, "max_us": 5.5}}


def test_bench_cpu_report_has_no_gpu_targets():
    """A CPU (gloo) run times the reference: its summary and host table show no targets and no
    ratios to them, and say what was measured; the same rows on a GPU run do show them."""
    results = [_result("layout", "normal", None, 300.0, None),
               _result("dispatch bf16", "normal", 20, 2000.0, 0.05),
               _result("combine bf16", "low-latency", None, 1500.0, 0.02)]
    for device in ("cpu", "NVIDIA H200"):
        report = {"device": device, "results": results,
                  "host": _host_report("cpu" if device == "cpu" else "cuda")}
        report["summary"] = bench.best_rows(report)
        text = bench.format_summary(report)
        summary, host = _parse_tables(text)
        if device != "cpu":  # the check below would fail on these
            assert summary[0]["target"] == "<= 20 us" and summary[0]["vs target"] == "0.0667x"
            assert host[0]["vs target"] == "2.00x" and "adds <= 8 us" in text
            with pytest.raises(AssertionError):
                _assert_no_gpu_targets(text)
            continue
        _assert_no_gpu_targets(text)
        assert all(r["target"] is None and r["vs_target"] is None for r in report["summary"])
        assert list(summary[0]) == list(bench.CPU_SUMMARY_COLUMNS)
        assert list(host[0]) == list(bench.CPU_HOST_COLUMNS)
        assert text.splitlines()[0].startswith("summary (CPU, gloo): the reference backend only")
        assert "not the op layer's host overhead" in text
        assert [(r["op"], r["host us"], r["host us (grad)"]) for r in host] == [
            ("get_dispatch_layout", "4.0", "n/a"), ("dispatch", "16.0", "20.0"),
            ("low_latency_dispatch send", "6.0", "9.0"),
            ("low_latency_dispatch recv hook", "2.0", "3.0"),
        ]


def test_bench_host_cases_cover_every_op():
    """Every op of the Buffer API has host rows, with and without grad inputs or a reason."""
    ops = {op for case in bench.HOST_CASES for op in case.ops}
    assert ops == {op for op, _ in EXPECTED_HOST_ROWS}
    for case in bench.HOST_CASES:
        if case.no_grad_reason:
            assert case.inputs in ("topk_idx", "fp8")  # nothing differentiable goes in
        assert case.syncs == (case.ops == ("dispatch",))  # only normal dispatch learns N


LL_CASES = {c.op: c for c in bench.CASES if c.mode == "low-latency"}


def _timed(op, us, label="cuda", timing="eager", phases_us=None):
    """A result row as ``time_case`` makes it, from one rank's made-up samples."""
    s = bench.parse_args(["--backend", "gloo", "--num-ranks", "1"])
    names, per_phase = (["send", "recv"], phases_us) if phases_us else ([op], (us,))
    samples = [[t * 1e-6 for t in per_phase]] * 3
    return bench.summarize(LL_CASES[op], names, [bench.RankSample(samples, 1000)], 128, s, label,
                           None, timing)


def _failed(op, reason, label="cuda"):
    s = bench.parse_args(["--backend", "gloo", "--num-ranks", "1"])
    return bench.not_capturable_row(LL_CASES[op], 128, s, label, reason)


def _ref(op, us, timing="eager"):
    return _timed(op, us, "reference/nccl", timing)


def test_bench_graph_rows_table_and_summary():
    ref_failure = "AcceleratorError: operation not permitted when stream is capturing (every rank)"
    ours_failure = "RuntimeError: boom (rank 1)"
    results = [
        bench._with_reference(_timed("dispatch fp8", 40.0), _ref("dispatch fp8", 200.0)),
        bench._with_reference(_timed("dispatch fp8", 12.0, timing="graph"),
                              _ref("dispatch fp8", 150.0, "graph")),
        bench._with_reference(_timed("combine bf16", 60.0), _ref("combine bf16", 100.0)),
        bench._with_reference(_timed("combine bf16", 20.0, timing="graph"),
                              _failed("combine bf16", ref_failure, "reference/nccl")),
        bench._with_reference(_timed("dispatch fp8 send+recv", None, phases_us=(10.0, 5.5))),
        bench._with_reference(_failed("dispatch fp8 send+recv", ours_failure),
                              _ref("dispatch fp8 send+recv", 90.0, "graph")),
    ]
    report, text = _gpu_report(["--num-ranks", "1", "--mode", "low-latency"], results)
    full, summary = _parse_tables(text)
    na = "n/a (not capturable)"
    assert [(r["op"], r["median us"], r["send/recv us"], r["ref us"], r["vs ref"])
            for r in full] == [
        ("dispatch fp8", "40.0", "-", "200.0", "5.00x"),
        ("dispatch fp8 [graph]", "12.0", "-", "150.0", "12.50x"),
        ("combine bf16", "60.0", "-", "100.0", "1.67x"),
        ("combine bf16 [graph]", "20.0", "-", na, "n/a"),
        ("dispatch fp8 send+recv", "15.5", "10.0/5.5", "-", "-"),
        ("dispatch fp8 send+recv [graph]", na, "-", "90.0", "n/a"),
    ]
    assert all(r["mode"] == "low-latency" and r["SMs"] == "-" for r in full)
    lines = text.splitlines()
    notes = lines.index("not capturable in a CUDA graph (the rows show n/a):")
    assert lines[notes + 1 : notes + 3] == [
        f"  combine bf16 [graph] (low-latency, 128 tokens/rank) on reference/nccl: {ref_failure}",
        f"  dispatch fp8 send+recv [graph] (low-latency, 128 tokens/rank) on cuda: {ours_failure}",
    ]
    assert lines[notes - 1].startswith("dispatch fp8 send+recv [graph]")  # right under the table

    # Summary: eager and graph apart, each against the target and its own kind of reference.
    assert [(r["op"], r["median us"], r["target"], r["vs target"], r["ref us"], r["speedup"])
            for r in summary] == [
        ("dispatch fp8", "40.0", "<= 18 us", "0.45x", "200.0", "5.00x"),
        ("dispatch fp8 [graph]", "12.0", "<= 18 us", "1.5x", "150.0", "12.50x"),
        ("combine bf16", "60.0", "<= 30 us", "0.5x", "100.0", "1.67x"),
        ("combine bf16 [graph]", "20.0", "<= 30 us", "1.5x", na, "n/a"),
    ]
    by_timing = {(r["op"], r["timing"]): r for r in report["summary"]}
    assert by_timing[("dispatch fp8", "graph")]["vs_target"] == pytest.approx(1.5)
    assert by_timing[("combine bf16", "graph")]["reference_capture_error"] == ref_failure
    json.dumps(report)  # results.json holds all of it

    # A graph of ours that did not capture: no time, no ratio, and the summary says n/a.
    failed = {"settings": report["settings"], "device": "NVIDIA H200", "host": None, "results": [
        bench._with_reference(_failed("dispatch fp8", ours_failure),
                              _ref("dispatch fp8", 150.0, "graph")),
    ]}
    (row,) = bench.best_rows(failed)
    assert row["median_us"] is None and row["vs_target"] is None
    (rows,) = _parse_tables(bench.format_summary(failed))
    assert [(r["op"], r["median us"], r["vs target"], r["ref us"], r["speedup"]) for r in rows] == [
        ("dispatch fp8 [graph]", na, "n/a", "150.0", "n/a"),
    ]


def test_bench_shared_gpu_report_is_labelled_not_performance():
    """Ranks sharing a GPU (--backend gloo-cuda): the kernels ran, but every table says the
    figures are not performance figures, and no target or ratio to one is shown."""
    results = [_result("dispatch bf16", "normal", 20, 2000.0, 0.05),
               _result("combine bf16", "low-latency", None, 1500.0, 0.02)]
    host = _host_report("cuda")
    host.update(target_us=None, shared_gpu=True)
    for row in host["rows"]:
        row["vs_target"] = None
    report = {"device": "NVIDIA H200", "results": results, "host": host,
              "settings": {"backend": bench.SHARED_GPU_BACKEND, "num_ranks": 4, "hidden": 7168,
                           "num_topk": 8, "num_experts": 256, "num_iters": 10, "num_warmup": 2}}
    report["summary"] = bench.best_rows(report)
    text = bench.format_summary(report)
    summary, host_rows = _parse_tables(text)
    assert bench.NOT_PERFORMANCE in text.splitlines()[0]
    assert "target" not in summary[0] and "vs target" not in summary[0]
    assert "adds <=" not in text and "no target" in text
    assert all(r["vs target"] == "-" for r in host_rows)
    for r in results:
        r.update(backend="cuda", reference_gbps=None)
    results[1]["reference_capture_error"] = "RuntimeError: no capture"
    table = bench.format_table(report)
    assert bench.NOT_PERFORMANCE in table.splitlines()[0]
    # The baseline ran on the gloo group, staged through the host (NCCL refuses shared GPUs).
    assert "ref: reference/gloo (host-staged)" in table and "NCCL" not in table
    assert "on reference/gloo (host-staged): RuntimeError: no capture" in table
    with pytest.raises(SystemExit):  # no GPU here (or, on one, no MPS daemon named): refused
        bench.parse_args(["--backend", bench.SHARED_GPU_BACKEND])


@pytest.mark.parametrize("backend, gpus, expected", [("nccl", 4, 4), ("auto", 2, 2)])
def test_gpu_backends_default_to_one_rank_per_gpu(monkeypatch, backend, gpus, expected):
    """On a GPU machine the bench's settings come from the GPU defaults, which have no rank
    count: the ranks default to the GPUs (parse_args once looked up the CPU default for every
    backend and raised KeyError on GPUs, 2026-12-03)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"multi_processor_count": 132}))
    s = bench.parse_args(["--backend", backend])
    assert s.backend == "nccl" and s.num_ranks == expected


def test_internode_rows_name_what_runs_on_gpus(monkeypatch):
    """Until the internode kernels exist the internode ops run the NCCL reference on CUDA: their
    rows say so, while the other modes' rows say cuda when the kernels are built."""
    from deep_ep_ops import _build
    from deep_ep_ops.bench import cases

    monkeypatch.setattr(_build, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_build, "CUDA_REFERENCE_OPS", ("internode_dispatch", "internode_combine"))
    assert cases.backend_label(True, bench.INTERNODE) == "reference/nccl"
    assert cases.backend_label(True, bench.NORMAL) == "cuda"
    monkeypatch.setattr(_build, "CUDA_REFERENCE_OPS", ())
    assert cases.backend_label(True, bench.INTERNODE) == "cuda"
    assert cases.backend_label(False, bench.INTERNODE) == "reference/gloo"
