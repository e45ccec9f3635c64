"""Run DeepEP V1's own tests unchanged against deep_ep_ops (or against DeepEP itself).

    python scripts/deepep_suite.py --deepep DIR [--impl ours|deepep] [--num-processes N]
                                   [--tests intranode low_latency] [--out DIR]

``DIR`` is an unpacked DeepEP V1 tree (its ``tests/`` folder, and for ``--impl deepep`` its
``deep_ep`` package with the built ``deep_ep_cpp`` extension beside it, e.g. after
``python setup.py build_ext --inplace``). Nothing of DeepEP enters this repository: export it
into a git-ignored folder, e.g. ``git -C DeepEP archive 29d31c0 | tar -x -C .deepep``.

With ``--impl ours`` the tests import ``deep_ep`` from a temporary folder whose ``deep_ep``
module is an alias of ``deep_ep_ops`` (``sys.modules`` entry), so ``import deep_ep`` and
``deep_ep.Buffer`` resolve to this package and the test files run as DeepEP ships them.

Prints one line per section of each test (pass/fail, read from the test's own progress lines)
and DeepEP's timing lines, then exits non-zero if any test failed. Full logs go to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import re
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
}
TIMING = re.compile(r"(Kernel performance|\[tuning\] Best|bandwidth|send/recv time)")


def sections(name: str, output: str, returncode: int) -> list[tuple[str, bool]]:
    """(section, passed) read from the progress lines a DeepEP test prints."""
    found: list[tuple[str, bool]] = []
    if name == "intranode":
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
    args = parser.parse_args()
    if not (Path(args.deepep) / "tests").is_dir():
        parser.error(f"--deepep {args.deepep} has no tests/ folder")
    failed = False
    with tempfile.TemporaryDirectory() as alias_dir:
        if args.impl == "ours":
            Path(alias_dir, "deep_ep.py").write_text(ALIAS)
        for i, name in enumerate(args.tests):
            returncode, output = run_one(args, name, alias_dir if args.impl == "ours" else None,
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
