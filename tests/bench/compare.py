"""Two versions of gcd side by side on one engine: removal of 500 never-seen images.

Run: `sudo .venv/bin/python -m tests.bench.compare OLD NEW --runs 6`, where OLD and NEW are
checkouts of gcd (a `git worktree` of the older commit, and this one), on GCD_TEST_ENGINE.
Each round loads the 500 images and deletes them raw (8 parallel API deletes), then loads
them again before each checkout's `gcd run` (fresh state store). On a shared machine one
run of the benchmark against another differs by more than most changes do: taking turns
on one engine puts the same noise on every column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load

COUNT = 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="gcd checkouts to compare")
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    specs = [Spec([f"bench/expire:b{i:04d}"], [Layer(f"expire-{i}", 20_000)]) for i in range(COUNT)]
    keeper = Spec(["bench/expire:b9999"], [Layer("expire-keeper", 20_000)])
    tags = [s.tags[0] for s in specs]
    names = [str(c) for c in args.checkouts]
    times: dict[str, list[float]] = {name: [] for name in ["raw", *names]}
    with tempfile.TemporaryDirectory() as tmp, PrivateEngine() as engine:
        client = docker.APIClient(base_url=engine.url, version="auto", timeout=600)
        envs = {}
        for n, checkout in enumerate(args.checkouts):
            # Each checkout as installed: its own bytecode, compiled ahead.
            env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
            env["PYTHONPYCACHEPREFIX"] = f"{tmp}/pycache-{n}"
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(checkout / "gcd")],
                env=env,
                check=True,
            )
            envs[str(checkout)] = env
        config = Path(tmp) / "removal.yaml"
        config.write_text(
            f"version: 1\nengine: {{url: '{engine.url}', timeout: 300s}}\n"
            f"state_dir: {tmp}/state\n"
            "safety: {min_age: 0s, max_removal_fraction: 1.0, max_removals_per_run: 100000}\n"
            "rules:\n  - {name: expire, match: {repository: bench/expire}, "
            "order_by: natural, keep_last: 1}\n"
        )
        for run in range(args.runs):
            load(client, specs)
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(client.remove_image, tags))
            times["raw"].append(time.perf_counter() - start)
            for name in names:
                load(client, [*specs, keeper])
                subprocess.run(["rm", "-rf", f"{tmp}/state"], check=True)
                start = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "gcd", "run", "--config", str(config)],
                    capture_output=True,
                    text=True,
                    env=envs[name],
                    cwd=tmp,
                )
                times[name].append(time.perf_counter() - start)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                client.remove_image("bench/expire:b9999")
            print(f"round {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    raw = statistics.median(times["raw"])
    for name, spent in times.items():
        median = statistics.median(spent)
        print(
            f"{name}: median {median:.2f} s ({min(spent):.2f} to {max(spent):.2f}), "
            f"{raw / median:.2f}x the raw rate"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
