"""What a run prints and writes: the tables, the summary, the plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional


from .settings import (
    EAGER, GPU_DEFAULTS, GRAPH, INTERNODE, INTERNODE_GOALS_GBPS, LOW_LATENCY, NORMAL,
    NOT_CAPTURABLE, NOT_PERFORMANCE, SHARED_GPU_BACKEND, SM_BUDGET, TARGETS, reference_label,
)


# --- output -----------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "op", "mode", "tokens/rank", "SMs", "median us", "send/recv us", "GB/s", "backend",
    "ref us", "ref GB/s", "vs ref",
)
SUMMARY_COLUMNS = (
    "op", "mode", "tokens/rank", "best SMs", "median us", "GB/s", "target", "vs target",
    "ref us", "speedup",
)
# CPU (gloo) runs time the reference only: no GPU targets, no ratios to them.
CPU_SUMMARY_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c not in ("target", "vs target"))
# Tables with internode rows add DeepEP's RDMA (bottleneck) bandwidth beside GB/s (its NVL one).
INTERNODE_TABLE_COLUMNS = (
    "op", "mode", "tokens/rank", "SMs", "median us", "send/recv us", "GB/s", "RDMA GB/s",
    "backend", "ref us", "ref GB/s", "ref RDMA GB/s", "vs ref",
)
INTERNODE_SUMMARY_COLUMNS = (
    "op", "mode", "tokens/rank", "best SMs", "median us", "GB/s", "RDMA GB/s", "target",
    "vs target", "ref us", "speedup",
)
CPU_INTERNODE_SUMMARY_COLUMNS = tuple(
    c for c in INTERNODE_SUMMARY_COLUMNS if c not in ("target", "vs target")
)
LEFT_COLUMNS = {"op", "mode", "backend", "best SMs", "target"}  # the rest is right-aligned
HOST_COLUMNS = (
    "op", "inputs", "tokens/rank", "host us", "op layer us", "vs target", "host us (grad)",
    "op layer us (grad)", "vs target (grad)", "note",
)
CPU_HOST_COLUMNS = tuple(
    c for c in HOST_COLUMNS if not c.startswith(("vs target", "op layer"))
)


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}x"


def op_label(row: dict) -> str:
    """The op as the tables name it: ``dispatch fp8``, or ``dispatch fp8 [graph]`` for replays."""
    return row["op"] + (" [graph]" if row.get("timing", EAGER) == GRAPH else "")


def is_internode(row: dict) -> bool:
    return row["mode"] == INTERNODE


def _nodes(row: dict) -> str:
    return f"{row['num_nodes']} x {row['ranks_per_node']}"


def emulation(row: dict) -> str:
    """What an internode row ran on: ``S x L nodes emulated on one host`` (the bench spawns
    every rank on one host, so every internode row is emulated)."""
    return f"{_nodes(row)} nodes emulated on one host"


def mode_label(row: dict) -> str:
    """The mode as the tables name it; an internode row says that its nodes are emulated."""
    return f"{row['mode']} ({_nodes(row)} emulated)" if is_internode(row) else row["mode"]


def _emulation_title(rows: list[dict]) -> str:
    """`` -- internode: S x L nodes emulated on one host`` for a table with internode rows."""
    internode = [r for r in rows if is_internode(r)]
    return f" -- {INTERNODE}: {emulation(internode[0])}" if internode else ""


RDMA_LEGEND = (
    "RDMA GB/s: DeepEP's RDMA (bottleneck) convention, per rank its (token, destination node) "
    "pairs, the rank's own node included, x row bytes / time (combine: the pairs of its "
    "dispatch); GB/s is DeepEP's NVL convention"
)


def _median(row: dict) -> str:
    return NOT_CAPTURABLE if row.get("capture_error") else _number(row["median_us"], ".1f")


def _reference_median(row: dict) -> str:
    if row.get("reference_capture_error"):
        return NOT_CAPTURABLE
    return _number(row["reference_median_us"], ".1f")


def _speedup(row: dict, key: str) -> str:
    if row[key] is None and (row.get("capture_error") or row.get("reference_capture_error")):
        return "n/a"
    return _ratio(row[key])


def _phases(row: dict) -> str:
    """``send/recv`` medians of a split op, in phase order (``-`` for single-phase ops)."""
    phases = row.get("phases_median_us")
    return "-" if not phases else "/".join(f"{us:.1f}" for us in phases.values())


def _align_rows(columns: Sequence[str], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Header, rule and rows: columns separated by at least two spaces, numbers right-aligned."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    header = line(columns)
    return [header, "-" * len(header), *(line(r) for r in rows)]


def _align_cells(columns: Sequence[str], cells: list[dict]) -> list[str]:
    """``_align_rows`` of rows given as ``{column: cell}`` (extra cells ignored), the columns
    outside ``LEFT_COLUMNS`` right-aligned."""
    rows = [tuple(row[c] for c in columns) for row in cells]
    return _align_rows(columns, rows, {i for i, c in enumerate(columns) if c not in LEFT_COLUMNS})


def capture_notes(rows: list[dict], reference: str = reference_label(False)) -> list[str]:
    """One line per backend and op that did not capture in a CUDA graph, with the reason
    (``reference``: the baseline's label)."""
    notes = []
    for r in rows:
        failures = [(r["backend"], r.get("capture_error"))]
        if r.get("reference_capture_error"):
            failures.append((reference, r["reference_capture_error"]))
        for backend, error in failures:
            note = (f"  {op_label(r)} ({r['mode']}, {r['tokens_per_rank']} tokens/rank) on "
                    f"{backend}: {error}")
            if error and note not in notes:  # the reference repeats beside every SM count
                notes.append(note)
    return ["not capturable in a CUDA graph (the rows show n/a):", *notes] if notes else []


def format_table(report: dict) -> str:
    """The full result table: one row per op, tokens per rank, SM count and eager/graph;
    ``-`` when n/a; capture failures listed under it. With internode rows: the RDMA columns,
    and the emulation in the title and in every internode row's mode."""
    s = report["settings"]
    results = report["results"]
    cells = [
        {
            "op": op_label(r), "mode": mode_label(r), "tokens/rank": str(r["tokens_per_rank"]),
            "SMs": _number(r.get("num_sms"), "d"), "median us": _median(r),
            "send/recv us": _phases(r), "GB/s": _number(r["gbps"], ".4g"),
            "RDMA GB/s": _number(r.get("rdma_gbps"), ".4g"), "backend": r["backend"],
            "ref us": _reference_median(r), "ref GB/s": _number(r["reference_gbps"], ".4g"),
            "ref RDMA GB/s": _number(r.get("reference_rdma_gbps"), ".4g"),
            "vs ref": _speedup(r, "ratio_vs_reference"),
        }
        for r in results
    ]
    internode = any(is_internode(r) for r in results)
    title = (
        f"deep_ep_ops bench: {s['num_ranks']} rank{'s' * (s['num_ranks'] != 1)} "
        f"({report['device']}), hidden {s['hidden']}, top-{s['num_topk']} "
        f"of {s['num_experts']} experts, {s['num_iters']} iterations after {s['num_warmup']} "
        "warm-up" + (f" -- {NOT_PERFORMANCE}" if is_shared_gpu_run(report) else "")
        + _emulation_title(results)
    )
    reference = reference_label(is_shared_gpu_run(report))
    legend = (
        "median us: max over ranks of each rank's median; GB/s: received payload per rank, own "
        f"share included\nSMs: Config.num_sms; ref: {reference} (one run per op, shown "
        "beside every SM count); vs ref: ref us / ours (= our GB/s / ref GB/s)\n"
        "send/recv us: the two halves of a split op; [graph]: replays of the same calls "
        "captured in CUDA graphs (one per half), beside the reference's replays"
    )
    if internode:
        legend += f"\n{RDMA_LEGEND}"
    columns = INTERNODE_TABLE_COLUMNS if internode else TABLE_COLUMNS
    lines = [title, legend, *_align_cells(columns, cells)]
    return "\n".join(lines + capture_notes(results, reference))


def is_cpu_run(report: dict) -> bool:
    """A gloo run on CPU tensors: it times the reference backend only."""
    return report.get("device") == "cpu"


def is_shared_gpu_run(report: dict) -> bool:
    """Ranks sharing GPUs: the kernels ran, but the timings are not performance figures."""
    return report.get("settings", {}).get("backend") == SHARED_GPU_BACKEND


def best_rows(report: dict, sm_budget: int = SM_BUDGET) -> list[dict]:
    """One row per op with a docs/DESIGN.md §11 target, and per internode op, per timing (eager,
    graph), at its best SM count.

    Per mode, the tokens per rank of the targets (GPU defaults: 4096 normal and internode, 128
    low-latency) where swept, else the largest swept. The best SM count is the fastest within
    ``sm_budget`` (``over_budget`` is set when every swept count exceeds it: then the fastest
    of all). ``vs_target`` is >= 1 when the target is met: GB/s / target for bandwidth
    targets, target / median us for time targets; ``None`` for a graph that did not capture.
    On a CPU run (the reference over gloo) ``target`` and ``vs_target`` are ``None``: the
    targets are for the CUDA kernels on 4xH200. Internode rows have no target anywhere (their
    goals are for real clusters; a bench run emulates the nodes on one host): ``target`` and
    ``vs_target`` are ``None``, and the row carries its RDMA GB/s and emulation.
    """
    cpu = is_cpu_run(report)
    swept: dict[str, set[int]] = {}
    for r in report["results"]:
        swept.setdefault(r["mode"], set()).add(r["tokens_per_rank"])
    target_tokens = GPU_DEFAULTS["tokens"]
    chosen = {
        mode: target_tokens[mode][0] if target_tokens[mode][0] in ts else max(ts)
        for mode, ts in swept.items()
    }
    groups: dict[tuple[str, str, int, str], list[dict]] = {}
    for r in report["results"]:
        summarized = (r["mode"], r["op"]) in TARGETS or is_internode(r)
        if summarized and r["tokens_per_rank"] == chosen[r["mode"]]:
            key = (r["mode"], r["op"], r["tokens_per_rank"], r.get("timing", EAGER))
            groups.setdefault(key, []).append(r)
    summary = []
    for (mode, op, tokens, timing), rows in groups.items():
        timed = [r for r in rows if r["median_us"] is not None] or rows
        within = [r for r in timed if r.get("num_sms") is None or r["num_sms"] <= sm_budget]
        best = min(within or timed, key=lambda r: r["median_us"] or 0.0)
        target = TARGETS.get((mode, op))
        vs_target = None
        if target is not None:
            unit, bound = target
            if unit == "GB/s":
                vs_target = None if best["gbps"] is None else best["gbps"] / bound
            else:
                vs_target = None if best["median_us"] is None else bound / best["median_us"]
        summary.append({
            "op": op, "mode": mode, "timing": timing, "tokens_per_rank": tokens,
            "num_sms": best.get("num_sms"), "over_budget": not within, "sm_budget": sm_budget,
            "median_us": best["median_us"], "gbps": best["gbps"],
            "target": None if cpu or target is None else {"unit": unit, "bound": bound},
            "vs_target": None if cpu else vs_target,
            "reference_median_us": best["reference_median_us"],
            "speedup_vs_reference": best["ratio_vs_reference"],
            "capture_error": best.get("capture_error"),
            "reference_capture_error": best.get("reference_capture_error"),
            **{key: best[key] for key in SUMMARY_INTERNODE_KEYS if key in best},
        })
    return summary


# What a summary row keeps of its internode result row.
SUMMARY_INTERNODE_KEYS = (
    "num_nodes", "ranks_per_node", "emulated", "rdma_gbps", "reference_rdma_gbps",
)


def _host_cells(row: Optional[dict], gpu: bool) -> list[str]:
    """``host us`` (and on GPUs ``vs target``) of one grad variant."""
    if row is None or row["host_us"] is None:
        return ["n/a"] * 3 if gpu else ["n/a"]
    host = f"{row['host_us']:.1f}"
    if not gpu:
        return [host]
    layer = row.get("op_layer_us")
    return [host, "-" if layer is None else f"{layer:+.1f}", _ratio(row["vs_target"], ".2f")]


def format_host(host: dict) -> str:
    """The host table: one line per op (phase) and inputs, without and with grad inputs."""
    gpu = host.get("device") != "cpu"
    grouped: dict[tuple[str, str, int], dict[bool, dict]] = {}
    for r in host["rows"]:
        grouped.setdefault((r["op"], r["inputs"], r["tokens_per_rank"]), {})[r["grad"]] = r
    rows = []
    for (op, inputs, tokens), by_grad in grouped.items():
        notes = []
        for r in by_grad.values():
            for note in (r.get("note"), r.get("method") if gpu and r.get("syncs") else None):
                if note and note not in notes:
                    notes.append(note)
        rows.append((op, inputs, str(tokens), *_host_cells(by_grad.get(False), gpu),
                     *_host_cells(by_grad.get(True), gpu), "; ".join(notes) or "-"))
    calls = f"{host['calls']} back-to-back eager calls, median of {host['repeats']} repeats"
    if gpu:
        title = (
            f"host: host us per eager call through deep_ep_ops.Buffer ({host['backend']}): wall "
            f"time of {calls}, while a torch.cuda._sleep keeps the GPU busy (ops that sync: "
            "their wall time per call minus their GPU busy time per call); max over ranks; "
            "(grad): inputs require grad; "
            "op layer us = median over the repeats of (host us minus a torch.add timed the same "
            "way right after the op's calls in that repeat; (grad) rows: a torch.add of a leaf "
            "that requires grad, so with its autograd node) (the launch every op "
            + (f"pays); target: the op layer adds <= {host['target_us']:g} us per call, vs "
               "target = target / op layer us (>= 1x meets it)"
               if host.get("target_us") is not None else f"pays); {NOT_PERFORMANCE}, no target")
        )
        columns, right = HOST_COLUMNS, {2, 3, 4, 5, 6, 7, 8}
    else:
        title = (
            f"host (CPU, gloo: the reference backend): wall time per eager call through "
            f"deep_ep_ops.Buffer, {calls}, max over ranks; (grad): inputs require grad. On CPU "
            "this is the reference's whole call (its computation and exchange), not the op "
            "layer's host overhead"
        )
        columns, right = CPU_HOST_COLUMNS, {2, 3, 4}
    lines = [title, *_align_rows(columns, rows, right)]
    for key, rows_of in (("baseline", "every row"), ("baseline_grad", "every (grad) row")):
        baseline = host.get(key)
        if baseline is None:
            continue
        spread = (f" ({baseline['min_us']:.1f} to {baseline['max_us']:.1f} over the rows)"
                  if baseline.get("min_us") is not None and baseline["max_us"] > baseline["min_us"]
                  else "")
        host_us = baseline["host_us"]
        lines.append(f"baseline: {baseline['op']} on a [{baseline['tokens']}, top-k] tensor, "
                     f"timed the same way beside {rows_of}: "
                     + (f"{host_us:.1f} us per call (median){spread}" if host_us is not None
                        else "not timed"))
    return "\n".join(lines)


def _target_cells(r: dict) -> dict:
    """``target`` and ``vs target`` of a summary row (``-`` for a row without a target)."""
    if r["target"] is None:
        return {"target": "-", "vs target": "-"}
    unit, bound = r["target"]["unit"], r["target"]["bound"]
    return {
        "target": f">= {bound:g} GB/s" if unit == "GB/s" else f"<= {bound:g} us",
        "vs target": "n/a" if r.get("capture_error") else _ratio(r["vs_target"], ".3g"),
    }


def _summary_cells(r: dict) -> dict:
    sms = "-" if r["num_sms"] is None else str(r["num_sms"])
    if r["over_budget"]:
        sms += f" (>{r['sm_budget']})"
    return {
        "op": op_label(r), "mode": mode_label(r), "tokens/rank": str(r["tokens_per_rank"]),
        "best SMs": sms, "median us": _median(r), "GB/s": _number(r["gbps"], ".4g"),
        "RDMA GB/s": _number(r.get("rdma_gbps"), ".4g"), **_target_cells(r),
        "ref us": _reference_median(r), "speedup": _speedup(r, "speedup_vs_reference"),
    }


def _internode_summary_line(rows: list[dict], goals: bool) -> str:
    """The summary's line on its internode rows: emulated, no target (with ``goals``, GPU runs:
    the cluster goals, as goals not measured here)."""
    line = (f"{INTERNODE}: {emulation(rows[0])}, no target; RDMA GB/s: (token, destination "
            "node) pairs per rank, own node included, x row bytes / time")
    if goals:
        line += (f"; goals on real clusters, not measured here: RDMA GB/s >= "
                 f"{INTERNODE_GOALS_GBPS['dispatch']:g} dispatch and >= "
                 f"{INTERNODE_GOALS_GBPS['combine']:g} combine at EP16 with 400 Gb/s NICs")
    return line


def format_summary(report: dict) -> str:
    """The short table: one line per op with a target (eager and graph apart) and per internode
    op, then the host table. On CPU runs without targets and ratios to them (the reference is
    timed, not the kernels the targets are for); internode rows never have one (emulated)."""
    summary = report.get("summary")
    if summary is None:
        summary = best_rows(report)
    cpu = is_cpu_run(report)
    shared = is_shared_gpu_run(report)
    cells = [_summary_cells(r) for r in summary]
    internode = [r for r in summary if is_internode(r)]
    if cpu:
        lines = [
            f"summary (CPU, gloo): the reference backend only, not the CUDA kernels; fastest SM "
            f"count within {SM_BUDGET} SMs; no GPU targets on a CPU run (docs/DESIGN.md §11's are for "
            "4xH200)",
        ]
        columns = CPU_SUMMARY_COLUMNS
    elif shared:
        lines = [f"summary ({NOT_PERFORMANCE}; no targets): fastest SM count within {SM_BUDGET} "
                 "SMs"]
        columns = CPU_SUMMARY_COLUMNS
    else:
        lines = [
            f"summary: fastest SM count within {SM_BUDGET} SMs; targets of docs/DESIGN.md §11 (4xH200, "
            "4096 / 128 tokens per rank), vs target >= 1x meets it; speedup: ref us / ours "
            "(eager against eager, [graph] against the reference's graph replays)",
        ]
        columns = SUMMARY_COLUMNS
    if internode:
        lines.append(_internode_summary_line(internode, goals=not (cpu or shared)))
        columns = (CPU_INTERNODE_SUMMARY_COLUMNS if columns == CPU_SUMMARY_COLUMNS
                   else INTERNODE_SUMMARY_COLUMNS)
    if cells:
        lines += _align_cells(columns, cells)
    if report.get("host"):
        lines += ["", format_host(report["host"])]
    elif internode:
        lines += ["", "host: no host table in internode mode (it covers the normal and "
                      "low-latency ops: run those modes for it)"]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """What the command prints last and writes to ``table.txt``: full table, then summary."""
    return format_table(report) + "\n\n" + format_summary(report)


def write_outputs(report: dict, table: str, out_dir: str) -> list[str]:
    """``results.json`` and ``table.txt`` in ``out_dir`` (created if needed)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    table_path = os.path.join(out_dir, "table.txt")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(table_path, "w") as f:
        f.write(table + "\n")
    return [json_path, table_path]


PLOT_MARKERS = {NORMAL: "o", LOW_LATENCY: "s", INTERNODE: "^"}


def plot_bandwidth(report: dict, path: str) -> None:
    """GB/s against tokens per rank, one line per op, SM count and eager/graph (the reference
    dashed, once per op and timing, where timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, Optional[int]], list[dict]] = {}
    for row in report["results"]:
        if row["gbps"] is not None:
            key = (row["mode"], op_label(row), row.get("num_sms"))
            series.setdefault(key, []).append(row)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn_reference = set()
    for (mode, op, num_sms), rows in series.items():
        rows = sorted(rows, key=lambda r: r["tokens_per_rank"])
        tokens = [r["tokens_per_rank"] for r in rows]
        sms = "" if num_sms is None else f", {num_sms} SMs"
        emulated = f", {emulation(rows[0])}" if is_internode(rows[0]) else ""
        (line,) = ax.plot(tokens, [r["gbps"] for r in rows], marker=PLOT_MARKERS[mode],
                          label=f"{mode} {op} ({rows[0]['backend']}{sms}{emulated})")
        with_reference = [r for r in rows if r["reference_gbps"] is not None]
        if with_reference and (mode, op) not in drawn_reference:
            drawn_reference.add((mode, op))
            ax.plot([r["tokens_per_rank"] for r in with_reference],
                    [r["reference_gbps"] for r in with_reference], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{mode} {op} (reference baseline)")
    s = report["settings"]
    ax.set_xscale("log", base=2)
    all_tokens = sorted({r["tokens_per_rank"] for rows in series.values() for r in rows})
    ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
    ax.minorticks_off()
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s (received payload per rank)")
    ax.set_title(
        f"deep_ep_ops: {s['num_ranks']} ranks, {report['device']}, hidden {s['hidden']}, "
        f"top-{s['num_topk']} of {s['num_experts']} experts", fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
