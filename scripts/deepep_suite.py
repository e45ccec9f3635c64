"""Run DeepEP V1's own tests unchanged against deep_ep_ops (or against DeepEP itself).

    python scripts/deepep_suite.py --deepep DIR [--impl ours|deepep] [--num-processes N]
                                   [--tests intranode low_latency internode] [--out DIR]

``DIR`` is an unpacked DeepEP V1 tree (its ``tests/`` folder, and for ``--impl deepep`` its
``deep_ep`` package with the built ``deep_ep_cpp`` extension beside it, e.g. after
``python setup.py build_ext --inplace``). Nothing of DeepEP enters this repository: export it
into a git-ignored folder, e.g. ``git -C DeepEP archive 29d31c0 | tar -x -C .deepep``.

With ``--impl ours`` the tests import ``deep_ep`` from a temporary folder whose ``deep_ep``
module is an alias of ``deep_ep_ops`` (``sys.modules`` entry), so ``import deep_ep`` and
``deep_ep.Buffer`` resolve to this package and the test files run as DeepEP ships them.

``internode`` (ours only) runs ``test_internode.py`` on emulated nodes: it asserts 8 ranks per
node and more than 8 ranks, so a copy of DeepEP's tests folder (in a temporary folder) relaxes
exactly those two asserts to ``--internode-nodes`` nodes of ``N / nodes`` ranks; one launcher per
node (``WORLD_SIZE`` nodes, ``RANK`` its index, as DeepEP's ``init_dist`` reads them) with its
own GPUs and ``DEEP_EP_OPS_RANKS_PER_NODE``, so the package splits the ranks the same way.

Prints one line per section of each test (pass/fail, read from the test's own progress lines)
and DeepEP's timing lines, then exits non-zero if any test failed. Full logs go to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALIAS = "import sys\nimport deep_ep_ops\n\nsys.modules[__name__] = deep_ep_ops\n"

# Per test: the arguments (DeepSeek-V3 decode shapes for the low-latency test, as in DESIGN §11).
TESTS = {
    "intranode": ("test_intranode.py", []),
    "low_latency": ("test_low_latency.py", ["--num-experts", "256"]),
    "internode": ("test_internode.py", []),
}
# The two asserts of test_internode.py that need 8 ranks per node and more than 8 ranks.
INTERNODE_ASSERTS = (
    ("assert num_experts % num_ranks == 0 and num_local_ranks == 8",
     "assert num_experts % num_ranks == 0 and num_local_ranks == {per_node}"),
    ("assert num_local_ranks == 8 and num_ranks > 8",
     "assert num_local_ranks == {per_node} and num_ranks > {per_node}"),
)
TIMING = re.compile(r"(Kernel performance|\[tuning\] Best|bandwidth|send/recv time)")


def sections(name: str, output: str, returncode: int) -> list[tuple[str, bool]]:
    """(section, passed) read from the progress lines a DeepEP test prints."""
    found: list[tuple[str, bool]] = []
    if name in ("intranode", "internode"):
        found.append(("layout", "[layout] Kernel performance" in output))
        for match in re.finditer(r"\[testing\] Running with (.*?) \.\.\.( passed)?", output):
            found.append((f"dispatch/combine {match.group(1)}", bool(match.group(2))))
        found.append(("tuning dispatch", "[tuning] Best dispatch" in output))
        found.append(("tuning combine", "[tuning] Best combine" in output))
    else:
        # The correctness loops print nothing; reaching the benchmark means they passed.
        found.append(("correctness (every dispatch/combine variant)", "Dispatch + combine bandwidth" in output))
        found.append(("bench_kineto dispatch/combine", "Dispatch bandwidth" in output))
        found.append(("bench_kineto send/recv halves", "Dispatch send/recv time" in output))
    found.append(("exit status 0", returncode == 0))
    return found


def relax_internode_asserts(text: str, per_node: int) -> str:
    """test_internode.py with its two topology asserts for ``per_node`` ranks per node; raises
    if either is not found exactly once (a DeepEP version this script does not know)."""
    for old, new in INTERNODE_ASSERTS:
        if text.count(old) != 1:
            raise ValueError(f"test_internode.py has {text.count(old)} copies of {old!r}, "
                             "expected 1: another DeepEP version?")
        text = text.replace(old, new.format(per_node=per_node))
    return text


def run_internode(args, alias_dir: str, port: int, work: str) -> tuple[int, str]:
    """test_internode.py on ``args.internode_nodes`` emulated nodes (see the module docstring)."""
    nodes = args.internode_nodes
    if nodes < 2 or args.num_processes % nodes:
        return 2, f"[deepep_suite] internode: {args.num_processes} processes do not split into " \
                  f"{nodes} nodes\n"
    per_node = args.num_processes // nodes
    tests = Path(work) / "tests"
    shutil.copytree(Path(args.deepep) / "tests", tests)
    script = tests / "test_internode.py"
    script.write_text(relax_internode_asserts(script.read_text(), per_node))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([alias_dir, str(tests), env.get("PYTHONPATH", "")])
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
               WORLD_SIZE=str(nodes), DEEP_EP_OPS_RANKS_PER_NODE=str(per_node))
    command = [sys.executable, script.name, "--num-processes", str(per_node),
               *args.internode_args.split()]
    start, launchers = time.time(), []
    for node in range(nodes):
        gpus = ",".join(str(g) for g in range(node * per_node, (node + 1) * per_node))
        launchers.append(subprocess.Popen(
            command, cwd=tests, env={**env, "RANK": str(node), "CUDA_VISIBLE_DEVICES": gpus},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, returncode = [], 0
    for node, launcher in enumerate(launchers):
        try:
            output, _ = launcher.communicate(timeout=max(1.0, args.timeout_s - (time.time() - start)))
        except subprocess.TimeoutExpired:
            launcher.kill()
            output = (launcher.communicate()[0] or "") + \
                f"\n[deepep_suite] timed out after {args.timeout_s} s\n"
        outputs.append(output)
        returncode = returncode or launcher.returncode
    text = outputs[0] + "".join(f"\n[deepep_suite] node {n}:\n{o}" for n, o in
                                enumerate(outputs[1:], 1) if launchers[n].returncode)
    text += f"\n[deepep_suite] {' '.join(command)} on {nodes} nodes of {per_node}: " \
            f"rc={returncode} in {time.time() - start:.0f} s\n"
    return returncode, text


def run_one(args, name: str, alias_dir: str | None, port: int) -> tuple[int, str]:
    script, extra = TESTS[name]
    tests = Path(args.deepep) / "tests"
    path = [str(tests)]
    path.insert(0, alias_dir if alias_dir else str(Path(args.deepep).resolve()))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    extra = extra + getattr(args, f"{name}_args").split()
    command = [sys.executable, script, "--num-processes", str(args.num_processes), *extra]
    start = time.time()
    try:
        done = subprocess.run(
            command, cwd=tests, env=env, capture_output=True, text=True, timeout=args.timeout_s
        )
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        output += f"\n[deepep_suite] timed out after {args.timeout_s} s\n"
        returncode = 124
    output += f"\n[deepep_suite] {' '.join(command)}: rc={returncode} in {time.time() - start:.0f} s\n"
    return returncode, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepep", required=True, help="unpacked DeepEP V1 tree (with tests/)")
    parser.add_argument("--impl", choices=("ours", "deepep"), default="ours")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--tests", nargs="+", choices=tuple(TESTS), default=list(TESTS))
    parser.add_argument("--out", default=None, help="folder for the full logs")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--intranode-args", default="",
                        help="extra arguments of test_intranode.py, e.g. '--num-experts 128'")
    parser.add_argument("--low-latency-args", default="",
                        help="extra arguments of test_low_latency.py")
    parser.add_argument("--internode-args", default="",
                        help="extra arguments of test_internode.py, e.g. '--num-tokens 1024'")
    parser.add_argument("--internode-nodes", type=int, default=2,
                        help="emulated nodes for test_internode.py (ours only)")
    args = parser.parse_args()
    if not (Path(args.deepep) / "tests").is_dir():
        parser.error(f"--deepep {args.deepep} has no tests/ folder")
    failed = False
    with tempfile.TemporaryDirectory() as alias_dir:
        if args.impl == "ours":
            Path(alias_dir, "deep_ep.py").write_text(ALIAS)
        for i, name in enumerate(args.tests):
            if name == "internode" and args.impl != "ours":
                print("== DeepEP test_internode.py against deepep: not run (DeepEP needs "
                      "RDMA between its nodes)")
                continue
            if name == "internode":
                with tempfile.TemporaryDirectory() as work:
                    returncode, output = run_internode(args, alias_dir, args.port + i, work)
            else:
                returncode, output = run_one(args, name,
                                             alias_dir if args.impl == "ours" else None,
                                             args.port + i)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                Path(args.out, f"deepep-{name}-{args.impl}.log").write_text(output)
            print(f"== DeepEP {TESTS[name][0]} against {args.impl} "
                  f"({args.num_processes} processes): rc={returncode}")
            for section, passed in sections(name, output, returncode):
                print(f"  {'PASS' if passed else 'FAIL'}  {section}")
                failed |= not passed
            for line in output.splitlines():
                if TIMING.search(line):
                    print(f"  {line.strip()}")
            if returncode != 0:
                tail = [l for l in output.splitlines() if l.strip()][-12:]
                print("  last lines:\n    " + "\n    ".join(tail))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
