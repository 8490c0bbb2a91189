"""The engine matrix: for each engine, the integration suite and the demo, then one table
with what passed and how long it took. Run it through tests/matrix."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import engines


def run(kind: str, pytest_args: list[str]) -> tuple[str, str, float]:
    env = {**os.environ, "GCD_TEST_ENGINE": kind}
    start = time.monotonic()
    suite = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/integration",
            "-q",
            "-p",
            "no:cacheprovider",
            *pytest_args,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    counts = re.findall(r"(\d+) (passed|failed|error)", suite.stdout)
    summary = ", ".join(f"{n} {what}" for n, what in counts) or suite.stdout[-300:]
    failed = [line for line in suite.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    for line in failed:
        print(f"  {kind}: {line}", flush=True)
    # The whole output, for the failures' details (a race suite's seed and findings).
    log = engines.ROOT.parent / "logs" / f"{kind}.pytest.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(suite.stdout + suite.stderr)
    if failed:
        print(f"  {kind}: details in {log}", flush=True)
    demo = subprocess.run(
        [sys.executable, "-m", "tests.demo"], env=env, capture_output=True, text=True
    )
    demo_result = "ok" if demo.returncode == 0 else f"failed ({demo.returncode})"
    if demo.returncode:
        print(demo.stdout[-2000:], demo.stderr[-2000:], flush=True)
    return summary, demo_result, time.monotonic() - start


def removal_rate(kind: str, runs: int) -> str:
    """gcd run's removal rate against raw parallel API deletes on this engine (tests/bench:
    500 images gcd has never seen, against 8 DELETEs at once), as the table shows it."""
    env = {**os.environ, "GCD_TEST_ENGINE": kind}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "tests.bench.run", "--removal-only"]
        bench = subprocess.run(
            [*command, "--runs", str(runs), "--figures-json", out.name],
            env=env,
            capture_output=True,
            text=True,
        )
        if bench.returncode:
            print(bench.stdout[-2000:], bench.stderr[-2000:], flush=True)
            return f"failed ({bench.returncode})"
        figures = json.loads(Path(out.name).read_text())
    raw, cold = figures["raw"], figures["never_seen"]
    return f"{raw / cold:.2f}x ({cold:.2f} s against {raw:.2f} s)"


def check_in_root() -> int:
    """tests/check as a Debian 13 machine runs it: a clone of this checkout's HEAD inside
    the root, set up and run there (its own virtualenv, its own private dockerd)."""
    engines.ensure()
    clone = engines.ROOT / "var/tmp/gcd-check"
    subprocess.run(["rm", "-rf", str(clone)], check=True)
    subprocess.run(["git", "clone", "-q", ".", str(clone)], check=True)
    done = subprocess.run(
        engines.chroot("bash", "-c", "cd /var/tmp/gcd-check && CI=true tests/check -q")
    )
    print(f"tests/check on Debian 13: exit {done.returncode}", flush=True)
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kinds", nargs="*", default=list(engines.KINDS), metavar="ENGINE")
    parser.add_argument("--pytest", default="", help="more pytest arguments, e.g. '-k retention'")
    parser.add_argument(
        "--debian13-check",
        action="store_true",
        help="instead: run tests/check on a clone of HEAD inside the Debian 13 root",
    )
    parser.add_argument(
        "--removal-rate",
        type=int,
        metavar="RUNS",
        help="also measure gcd run's removal rate on each engine (tests/bench, median of RUNS)",
    )
    args = parser.parse_args()
    if args.debian13_check:
        return check_in_root()
    unknown = [k for k in args.kinds if k not in engines.KINDS]
    if unknown:
        parser.error(f"unknown engine {', '.join(unknown)}: expected {', '.join(engines.KINDS)}")
    if any(engines.KINDS[k].in_root for k in args.kinds):
        engines.ensure()
        print(f"Debian 13 root {engines.ROOT}: {engines.versions()}", flush=True)
    rows = []
    for kind in args.kinds:
        print(f"-- {kind}", flush=True)
        summary, demo, took = run(kind, shlex.split(args.pytest))
        rate = removal_rate(kind, args.removal_rate) if args.removal_rate else ""
        if rate:
            print(f"  {kind}: removal rate {rate}", flush=True)
        rows.append((kind, summary, demo, took, rate))
    print("\n| engine | integration suite | demo | time | removal rate, never seen / raw |")
    print("|---|---|---|---:|---|")
    for kind, summary, demo, took, rate in rows:
        print(f"| {kind} | {summary} | {demo} | {took:.0f} s | {rate or 'not measured'} |")
    passed = all(
        "failed" not in s and "error" not in s and d == "ok" and not r.startswith("failed")
        for _, s, d, _, r in rows
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
