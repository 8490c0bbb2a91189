"""The benchmark: gcd against what operators use instead, on one private engine, one table.

Run it with `sudo tests/bench/run` (which installs what is missing). Every figure is a median
over several runs. Takes about 25 minutes, most of it filling the 10,000-image store.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import docker

from gcd import config as gcd_config
from gcd import cycle, disk
from gcd.engine import DockerEngine
from gcd.model import EngineInfo, Image, Snapshot, StateView
from gcd.state import Store
from tests.bench import trace
from tests.bench.store import generate, populate
from tests.dockerd import PrivateEngine, engine_on_a_small_filesystem
from tests.images import Layer, Spec, load, tarball

# One fixed "now" for the generated store, so the first 1,000 images of the 10,000 store are
# the very images of the 1,000 store.
EPOCH = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
POLICY = r"""
rules:
  - name: builds
    match: {tag: 'build-(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 5
  - name: releases
    match: {tag: '(?P<v>\d+\.\d+\.\d+)'}
    order_by: semver(v)
    keep_last: 3
  - name: branches
    match: {tag: '(?P<branch>[a-z-]+)-(?P<n>\d+)'}
    group_by: [repository, branch]
    order_by: numeric(n)
    keep_last: 2
"""


def timed(fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None) -> float:
    """Median wall time of `fn` over `runs`; `before` runs untimed ahead of each."""
    return statistics.median(samples(fn, runs, before))


def samples(
    fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None
) -> list[float]:
    times = []
    for _ in range(runs):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> str:
    """The median, and the range around it: on a shared machine the range is the news."""
    return f"{statistics.median(times):.2f} s ({min(times):.2f} to {max(times):.2f})"


def sh(*command: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    if done.returncode:
        # What the command said last (a gcd run's error lines), not only its exit code.
        said = [line for line in done.stderr.splitlines() if " INFO " not in line]
        print("\n".join(said[-20:]), file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, command)


class Rows:
    """The table: printed a row at a time, kept for --out."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def row(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"{what:<58} {value:>12}  {note}", flush=True)


class Bench:
    def __init__(self, engine: PrivateEngine, work: Path, runs: int, rows: Rows) -> None:
        self.engine = engine
        self.figures: dict[str, float] = {}  # seconds, for tests/matrix's table
        self.work = work
        self.runs = runs
        self.client = docker.APIClient(base_url=engine.url, version="auto", timeout=600)
        # gcd as installed: pip and the .deb compile its bytecode, a checkout run under
        # PYTHONDONTWRITEBYTECODE would compile every module on every start (about 0.15 s).
        pycache = work / "pycache"
        self.env = {**os.environ, "DOCKER_HOST": engine.url, "PYTHONPYCACHEPREFIX": str(pycache)}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        sh(
            sys.executable,
            "-m",
            "compileall",
            "-q",
            str(Path(gcd_config.__file__).parent),
            env=self.env,
        )
        self.row = rows.row

    def config(self, body: str, name: str = "bench.yaml", state: str = "state") -> str:
        path = self.work / name
        path.write_text(
            f"version: 1\nengine: {{url: '{self.engine.url}', timeout: 300s}}\nstate_dir: {self.work / state}\n"
            + body
        )
        return str(path)

    def gcd(self, *args: str) -> None:
        sh(sys.executable, "-m", "gcd", *args, env=self.env)

    # --- 1 and 3: planning cost and API calls as N grows ---------------------------------------

    def planning(self, n: int) -> None:
        config = self.config(POLICY)
        state = self.work / "state"
        ls = timed(lambda: sh("docker", "image", "ls", "-a", env=self.env), max(self.runs, 5))
        cold = timed(
            lambda: self.gcd("plan", "--config", config),
            self.runs,
            before=lambda: sh("rm", "-rf", str(state)),
        )
        warm = timed(lambda: self.gcd("plan", "--config", config), max(self.runs, 5))
        dcgc = timed(
            lambda: sh(dcgc_path(), "--max-image-age", "1s", "--dry-run", env=self.env), self.runs
        )
        self.row(f"N={n}: docker image ls -a", f"{ls:.2f} s")
        self.row(
            f"N={n}: gcd plan, warm (second run)",
            f"{warm:.2f} s",
            f"{warm / ls:.1f}x docker image ls -a (target <= 3x)",
        )
        self.row(
            f"N={n}: gcd plan, cold (empty state)",
            f"{cold:.2f} s",
            f"{cold / dcgc:.2f}x dcgc (target <= 0.5x)",
        )
        self.row(f"N={n}: dcgc --dry-run (docker-custodian)", f"{dcgc:.2f} s")
        with tempfile.TemporaryDirectory() as tmp:
            engine = DockerEngine(self.engine.url, 300)
            store = Store(tmp)
            snapshot, learned = engine.snapshot(store.facts())
            cold_calls = engine.calls
            store.observe(snapshot, learned, datetime.now(UTC))
            engine.calls = 0
            engine.snapshot(store.facts())
            warm_calls = engine.calls
            engine.close()
        self.row(
            f"N={n}: engine API calls per cycle, cold / warm",
            f"{cold_calls} / {warm_calls}",
            "warm target: constant",
        )

    # --- 2: removing the same 500 expired images --------------------------------------------

    def removal(self, count: int = 500) -> None:
        specs = [
            Spec([f"bench/expire:b{i:04d}"], [Layer(f"expire-{i}", 20_000)]) for i in range(count)
        ]
        keeper = Spec(["bench/expire:b9999"], [Layer("expire-keeper", 20_000)])
        config = self.config(
            "safety: {min_age: 0s, max_removal_fraction: 1.0, max_removals_per_run: 100000}\n"
            "rules:\n  - {name: expire, match: {repository: bench/expire}, order_by: natural, keep_last: 1}\n",
            name="removal.yaml",
            state="removal-state",
        )
        # The same state, a policy that keeps them all: a `gcd run` that removes nothing
        # (a dry run reads the state but never writes it, spec §2).
        warm = self.config(
            "rules:\n  - {name: expire, match: {repository: bench/expire}, keep_last: 100000}\n",
            name="removal-warm.yaml",
            state="removal-state",
        )
        tags = [s.tags[0] for s in specs]

        def raw(workers: int = 8) -> None:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda t: self.client.remove_image(t), tags))

        def seed() -> None:
            # The seed's one-liner, as an operator would type it.
            subprocess.run(
                "docker images -q bench/expire | xargs docker rmi",
                shell=True,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self.env,
            )

        # An image expires when newer builds push it out, so the daemon (or an earlier run)
        # has seen it before: "seen" warms the state with a run that keeps them all first.
        # "first sight" starts from an empty state and inspects all 500 within the timed run.
        def seen() -> None:
            load(self.client, [*specs, keeper])
            self.gcd("run", "--config", warm)

        def first_sight() -> None:
            load(self.client, [*specs, keeper])
            sh("rm", "-rf", str(self.work / "removal-state"))

        gcd_time = timed(lambda: self.gcd("run", "--config", config), self.runs, before=seen)
        cold_time = timed(
            lambda: self.gcd("run", "--config", config), self.runs, before=first_sight
        )
        self.client.remove_image("bench/expire:b9999")
        raw_time = timed(raw, self.runs, before=lambda: load(self.client, specs))
        # gcd's own concurrency on this engine (engine.REMOVE_WORKERS_CONTAINERD or
        # REMOVE_WORKERS_PODMAN off the classic store): the engine's delete rate at that many.
        engine = DockerEngine(self.engine.url, 600)
        engine.snapshot({})
        workers = engine.removal_workers()
        engine.close()
        wide_time = None
        if workers != 8:
            wide_time = timed(
                lambda: raw(workers), self.runs, before=lambda: load(self.client, specs)
            )
        seed_time = timed(seed, self.runs, before=lambda: load(self.client, specs))
        self.figures.update(raw=raw_time, seen=gcd_time, never_seen=cold_time)
        self.row(
            f"remove {count} expired images: raw parallel API deletes (8)", f"{raw_time:.2f} s"
        )
        if wide_time is not None:
            self.row(
                f"remove {count} expired images: raw parallel API deletes ({workers})",
                f"{wide_time:.2f} s",
                "gcd's removals at once on this engine",
            )
        self.row(
            f"remove {count} expired images: docker images -q | xargs docker rmi",
            f"{seed_time:.2f} s",
        )
        self.row(
            f"remove {count} expired images: gcd run (whole process)",
            f"{gcd_time:.2f} s",
            f"{raw_time / gcd_time:.2f}x the raw rate (8)",
        )
        self.row(
            f"remove {count} expired images: gcd run, images never seen before",
            f"{cold_time:.2f} s",
            f"{raw_time / cold_time:.2f}x the raw rate (8; target >= 0.9x)",
        )

    # --- 5: the idle daemon ------------------------------------------------------------------

    def daemon(self, n: int) -> None:
        config = self.config(
            POLICY + "schedule: {every: 1h}\nmetrics: {listen: ''}\n",
            name="daemon.yaml",
            state="daemon-state",
        )
        log = self.work / "daemon.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gcd", "daemon", "--config", config],
                stdout=out,
                stderr=out,
                env=self.env,
            )
        try:
            deadline = time.monotonic() + 600
            while " INFO run: " not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(5)
            cpu_before = cpu_seconds(process.pid)
            time.sleep(30)
            cpu = cpu_seconds(process.pid) - cpu_before
            rss = rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(60)
        self.row(
            f"N={n}: gcd daemon idle between cycles: resident memory",
            f"{rss:.0f} MB",
            "target < 60 MB",
        )
        self.row(
            f"N={n}: gcd daemon idle between cycles: CPU over 30 s", f"{cpu:.2f} s", "target: none"
        )


# --- 6: disk pressure ------------------------------------------------------------------------


def pressure(runs: int, rows: Rows, check_every: float = 2.0) -> None:
    """A daemon on a 400 MB ext4 loop filesystem (its schedule an hour away) with the engine's
    whole folder on it: one load pushes it past `high`. Measured: from the load's end to the
    first removal and to back under `low`, how far under `low` it lands, and the daemon's CPU
    while idle with its event follower and a statvfs every check_every."""
    mb = 1_000_000
    reacts, settles, overshoots = [], [], []
    cpu = 0.0
    for run in range(runs):
        with (
            tempfile.TemporaryDirectory(prefix="gcd-bench-") as tmp,
            engine_on_a_small_filesystem() as engine,
        ):
            client = docker.APIClient(base_url=engine.url, version="auto", timeout=300)
            load(client, [Spec(["keep:1"], [Layer("keep", 4 * mb)], EPOCH)])
            start = disk.measure(engine.root)
            size = start.used_bytes + start.avail_bytes
            high = start.bytes_ratio + 60 * mb / size
            low = start.bytes_ratio + 30 * mb / size
            config = Path(tmp) / "pressure.yaml"
            config.write_text(
                f"version: 1\nengine: {{url: '{engine.url}'}}\nstate_dir: {tmp}/state\n"
                f"schedule: {{every: 1h}}\nmetrics: {{listen: ''}}\n"
                f"disk: {{path: {engine.root}, high: {high:.4f}, low: {low:.4f}, "
                f"check_every: {int(check_every)}s}}\n"
                "safety: {min_age: 0s}\nrules:\n  - {name: all, keep_last: 100}\n"
            )
            log = Path(tmp) / "daemon.log"
            with open(log, "w") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gcd", "daemon", "--config", str(config)],
                    stdout=out,
                    stderr=out,
                )
            try:
                while " INFO run: " not in log.read_text():
                    time.sleep(0.1)
                if run == 0:
                    time.sleep(5)
                    before = cpu_seconds(process.pid)
                    time.sleep(30)
                    cpu = cpu_seconds(process.pid) - before
                # CI builds arriving one by one, 3 MB each (a load's upload sits on the same
                # filesystem while it runs: one big load would count twice until it ends).
                crossed = None
                for n in range(1, 41):
                    spec = Spec([f"ci:{n}"], [Layer(f"ci-{n}", 3 * mb)], EPOCH + timedelta(days=n))
                    client.load_image(tarball([spec]))
                    # The engine drops its copy of the upload a moment after it answers.
                    time.sleep(0.5)
                    if disk.measure(engine.root).bytes_ratio >= high:
                        crossed = time.monotonic()
                        break
                assert crossed is not None, "the loads did not reach the high mark"
                deadline = crossed + 60
                while " INFO removed " not in log.read_text() and time.monotonic() < deadline:
                    time.sleep(0.02)
                reacts.append(time.monotonic() - crossed)
                while disk.measure(engine.root).bytes_ratio > low and time.monotonic() < deadline:
                    time.sleep(0.02)
                settles.append(time.monotonic() - crossed)
                time.sleep(2)
                overshoots.append(low - disk.measure(engine.root).bytes_ratio)
            finally:
                process.terminate()
                process.wait(60)
    rows.row(
        f"disk pressure: from crossing high to the first removal (check_every {check_every:g}s)",
        f"{statistics.median(reacts):.2f} s",
        f"{spread(reacts)}; target <= check_every + 1 s",
    )
    rows.row(
        "disk pressure: from crossing high to back under low",
        f"{statistics.median(settles):.2f} s",
        spread(settles),
    )
    rows.row(
        "disk pressure: landed under low by (share of the filesystem)",
        f"{statistics.median(overshoots):.2%}",
        "target < 2 %",
    )
    rows.row(
        f"idle daemon with its event follower and a statvfs every {check_every:g}s: CPU over 30 s",
        f"{cpu:.2f} s ({cpu / 30:.2%})",
        "target < 0.5 %",
    )


# --- 4: the planner alone --------------------------------------------------------------------


def synthetic(n: int, distinct: bool = False) -> Snapshot:
    """The store generator's images, without an engine. `distinct`: every build and branch
    tag name made unique (`build-7` becomes `build-7000123`), as if each carried a commit
    hash: no tag name recurs across repositories, the planner's worst case."""
    images = []
    for index, spec in enumerate(generate(n, now=EPOCH)):
        layers = tuple(f"sha256:{layer.name}" for layer in spec.layers)
        tags = tuple(spec.tags)
        if distinct:
            tags = tuple(
                f"{t}{index:06d}" if re.search(r"-\d+$", t.rpartition(":")[2]) else t for t in tags
            )
        images.append(
            Image(
                id=f"sha256:{abs(hash(spec.labels['org.example.build'])):064x}"[:71],
                tags=tags,
                digests=(),
                parent=None,
                created=spec.created,
                size=sum(layer.size for layer in spec.layers),
                labels=spec.labels,
                layers=layers,
                layer_sizes=tuple(layer.size for layer in spec.layers),
            )
        )
    return Snapshot(EngineInfo("unix:///bench", "", ""), tuple(images), ())


def planner(runs: int, bench: Rows) -> None:
    config = gcd_config.parse("version: 1\n" + POLICY, "bench.yaml")
    state = StateView(new_store=False)
    for n in (10_000, 100_000):
        snapshot = synthetic(n)
        now = datetime.now(UTC) + timedelta(days=1)
        times = samples(partial(cycle.plan, snapshot, config, state, now), max(runs, 5))
        tracemalloc.start()
        cycle.plan(snapshot, config, state, now)
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        note = "target < 2 s" if n == 100_000 else ""
        bench.row(f"planner alone, {n} images (no engine)", spread(times), note)
        bench.row(
            f"planner alone, {n} images: peak memory of one plan", f"{peak:.0f} MB", "linear in N"
        )
    distinct = synthetic(100_000, distinct=True)
    now = datetime.now(UTC) + timedelta(days=1)
    times = samples(lambda: cycle.plan(distinct, config, state, now), max(runs, 5))
    bench.row(
        "planner alone, 100000 images, no tag name recurring",
        spread(times),
        "worst case for the per-name parse cache",
    )


def instructions(bench: Rows) -> None:
    """The planner's instructions and cache misses, counted by valgrind's cachegrind: the
    same from run to run, where wall time on a shared machine varies by half. A child builds
    the snapshot and plans once, or not at all; the difference is the plan."""

    def counted(n: int, plans: int, distinct: bool) -> dict[str, float]:
        valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=yes"]
        child = [sys.executable, "-m", "tests.bench.run", "--plan-once", str(n)]
        child += ["--plans", str(plans), *(["--distinct"] if distinct else [])]
        done = subprocess.run(
            [*valgrind, "--cachegrind-out-file=/dev/null", *child],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the synthetic IDs hash
        )
        figures: dict[str, float] = {}
        for name, label in (("I", r"I\s+refs"), ("D1", "D1  misses"), ("LL", "LL misses")):
            found = re.search(rf"{label}:\s+([\d,]+)", done.stderr)
            assert found, done.stderr
            figures[name] = int(found[1].replace(",", ""))
        return figures

    for distinct in (False, True):
        base, one = counted(100_000, 0, distinct), counted(100_000, 1, distinct)
        plan = {k: one[k] - base[k] for k in one}
        bench.row(
            "planner alone, 100000 images"
            + (", no tag name recurring" if distinct else "")
            + ": instructions (cachegrind)",
            f"{plan['I'] / 1e9:.2f} G",
            f"L1 data misses {plan['D1'] / 1e6:.1f} M, last-level misses {plan['LL'] / 1e6:.2f} M",
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dcgc_path() -> str:
    return os.environ.get("DCGC", "dcgc")


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB"


def main() -> int:
    # SIGTERM too ends in the `with` blocks below, so the private engine is always cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument(
        "--planner-only", action="store_true", help="only the planner alone: no engine, 2 minutes"
    )
    parser.add_argument(
        "--removal-only",
        action="store_true",
        help="only the removal rows (gcd run against raw parallel deletes), on GCD_TEST_ENGINE",
    )
    parser.add_argument(
        "--pressure-only",
        action="store_true",
        help="only the disk pressure rows, on a loop filesystem, on GCD_TEST_ENGINE",
    )
    parser.add_argument(
        "--trace-only",
        action="store_true",
        help="only the replayed CI trace (gcd, cron prune, oldest when full), on GCD_TEST_ENGINE",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="only the planner's instruction count, under valgrind: no engine, 6 minutes",
    )
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)  # the child's rows, for the parent
    parser.add_argument(
        "--figures-json", help=argparse.SUPPRESS
    )  # removal seconds, for tests/matrix
    # A child of --instructions: plan a synthetic snapshot of this many images, --plans times.
    parser.add_argument("--plan-once", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plans", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--distinct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = Rows()
    if args.plan_once:
        snapshot = synthetic(args.plan_once, distinct=args.distinct)
        config = gcd_config.parse("version: 1\n" + POLICY, "bench.yaml")
        for _ in range(args.plans):
            cycle.plan(snapshot, config, StateView(new_store=False), EPOCH + timedelta(days=1))
    elif args.instructions:
        instructions(rows)
    elif args.pressure_only:
        pressure(args.runs, rows)
    elif args.trace_only:
        trace.rows(rows.row)
    elif args.planner_only:
        planner(args.runs, rows)
        if args.rows_json:
            Path(args.rows_json).write_text(json.dumps(rows.rows))
    else:
        with tempfile.TemporaryDirectory(prefix="gcd-bench-") as tmp, PrivateEngine() as engine:
            bench = Bench(engine, Path(tmp), args.runs, rows)
            server = bench.client.version()
            print(
                f"machine: {machine()}; engine {server['Version']} (API {server['ApiVersion']}), storage {bench.client.info()['Driver']}"
            )
            loaded = 0
            if args.removal_only:
                bench.removal()
                sizes = []
                if args.figures_json:
                    Path(args.figures_json).write_text(json.dumps(bench.figures))
            for n in sizes:
                start = time.monotonic()
                populate(
                    bench.client, n, containers=n // 100 - loaded // 100, skip=loaded, now=EPOCH
                )
                loaded = n
                print(
                    f"-- store of {n} images, {n // 100} containers, loaded in {time.monotonic() - start:.0f} s",
                    flush=True,
                )
                bench.planning(n)
                if n == sizes[0]:
                    bench.removal()
            if sizes:
                bench.daemon(sizes[-1])
        if not args.removal_only:
            # The planner alone, in a fresh interpreter with the engine stopped: in this process,
            # after the engine phases, its heap is scattered and the same plans take 1.5x longer.
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                child = [sys.executable, "-m", "tests.bench.run", "--planner-only"]
                subprocess.run(
                    [*child, "--runs", str(args.runs), "--rows-json", out.name],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                for row in json.loads(Path(out.name).read_text()):
                    rows.row(*row)
    if args.out:
        lines = ["| measurement | value | note |", "|---|---:|---|"]

        def cell(text: str) -> str:
            return text.replace("|", "\\|")  # a pipe in a command

        lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in rows.rows]
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
