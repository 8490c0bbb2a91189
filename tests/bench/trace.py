"""A replayed CI trace: three days of a build host, compressed into minutes, on a 400 MB ext4
loop filesystem that holds the engine's whole folder, once per cleaner:

- gcd: its daemon (retention rules, disk pressure with `evict: lru`, its event follower);
- gcd-pressure-only: the same daemon without rules: only disk pressure frees, least recently
  used first;
- cron: `docker image prune -a --filter until=24h` once a (simulated) day, as the common
  cron line does;
- oldest: "remove the oldest images when full", as CI runners' cleanup hooks do: before each
  build, while the filesystem is over 85 %, the image created first goes (never forced), down
  to 70 %.

Every simulated hour: two builds (`main` and a feature branch that changes every 12 hours;
6 MB of their own on a shared 20 MB base), the test stage runs the previous `main` build; every
6 hours a deploy runs `release:current`; a release a day (`release:vN`, `release:current`
moves); a tool is needed every 8 hours and a rollback target (the previous release) once a day.
What the trace needs and does not find is a **regret**: it is pulled again (loaded), as a CI job
would. A build that the engine refuses for lack of space **failed**.

Run with `tests/bench/run --trace-only` (docs/performance.md). Image times are simulated (the
trace's hours), so the rules, `until` and "oldest" all see the trace's ages; the engine's own
tag times are real, so gcd runs with `min_age: 0s` here (on a host, keep the default).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
from prometheus_client.parser import text_string_to_metric_families

from gcd import disk
from tests.dockerd import PrivateEngine, engine_on_a_small_filesystem
from tests.images import Layer, Spec, busybox_layer, tarball

MB = 1_000_000
HOURS = 72
START = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS)
BASE = Layer("trace-base", 20 * MB)
HIGH, LOW = 0.85, 0.70
GCD_CONFIG = r"""
schedule: {{every: 5s}}
metrics: {{listen: '127.0.0.1:{port}'}}
disk: {{path: {root}, high: 85%, low: 70%, check_every: 1s}}
safety: {{min_age: 0s, max_removal_fraction: 1.0}}
dangling: {{min_age: 0s}}
protect:
  - tag: current
rules:
  - name: branches
    match: {{repository: app, tag: '(?P<branch>[a-z0-9]+)-(?P<build>\d+)'}}
    group_by: [repository, branch]
    order_by: numeric(build)
    keep_last: 2
  - name: releases
    match: {{repository: release, tag: 'v(?P<n>\d+)'}}
    order_by: numeric(n)
    keep_last: 3
"""


@dataclass
class Outcome:
    cleaner: str
    builds: int = 0
    failed: int = 0
    regrets: int = 0
    removals: int = 0
    peak: float = 0.0


def base() -> Spec:
    return Spec(["base:1"], [busybox_layer(), BASE], START - timedelta(days=30))


def tool() -> Spec:
    return Spec(["tool:1"], [Layer("trace-tool", 10 * MB)], START - timedelta(days=60))


def build(branch: str, hour: int) -> Spec:
    own = Layer(f"trace-{branch}-{hour}", 6 * MB)
    return Spec(
        [f"app:{branch}-{hour}"], [busybox_layer(), BASE, own], START + timedelta(hours=hour)
    )


def release(n: int, current: bool = True) -> Spec:
    tags = [f"release:v{n}"] + (["release:current"] if current else [])
    return Spec(
        tags,
        [busybox_layer(), BASE, Layer(f"trace-rel-{n}", 8 * MB)],
        START + timedelta(days=n - 1),
    )


class Trace:
    """One replay against one engine; `before_build` and `hourly` are the cleaner's hooks."""

    def __init__(self, engine: PrivateEngine, outcome: Outcome) -> None:
        self.engine = engine
        self.client = docker.APIClient(base_url=engine.url, version="auto", timeout=300)
        self.outcome = outcome
        self.before_build: Callable[[], None] = lambda: None
        self.hourly: Callable[[int], None] = lambda hour: None

    def used(self) -> float:
        ratio = disk.measure(self.engine.root).bytes_ratio
        self.outcome.peak = max(self.outcome.peak, ratio)
        return ratio

    def load(self, spec: Spec) -> bool:
        """Load as `docker load` does (reading its progress); False if the engine refused."""
        try:
            for chunk in self.client.load_image(tarball([spec])) or ():
                if isinstance(chunk, dict) and (chunk.get("error") or chunk.get("errorDetail")):
                    return False
        except docker.errors.APIError:
            return False
        finally:
            self.used()
        return True

    def need(self, ref: str, spec: Spec) -> None:
        """The trace needs `ref`: missing, it is a regret and is pulled (loaded) again."""
        try:
            self.client.inspect_image(ref)
        except docker.errors.NotFound:
            self.outcome.regrets += 1
            self.load(spec)

    def run(self, ref: str) -> None:
        """`docker run --rm --network none REF true`: a use the daemon's follower sees."""
        none = self.client.create_host_config(network_mode="none")
        with contextlib.suppress(docker.errors.APIError):
            container = self.client.create_container(
                ref, ["/bin/busybox", "true"], host_config=none
            )
            try:
                self.client.start(container)
                self.client.wait(container)
            finally:
                self.client.remove_container(container)

    def replay(self) -> None:
        self.load(base())
        self.load(tool())
        for hour in range(HOURS):
            day, release_n = hour // 24, hour // 24 + 1
            if hour % 24 == 0:
                self.need("base:1", base())
                self.outcome.builds += 1
                if not self.load(release(release_n)):
                    self.outcome.failed += 1
            for branch in ("main", f"feat{hour // 12}"):
                self.before_build()
                self.need("base:1", base())
                self.outcome.builds += 1
                if not self.load(build(branch, hour)):
                    self.outcome.failed += 1
            if hour >= 1:
                self.need(f"app:main-{hour - 1}", build("main", hour - 1))
                self.run(f"app:main-{hour - 1}")
            if hour % 6 == 3:
                self.need("release:current", release(release_n))
                self.run("release:current")
            if hour % 8 == 0:
                self.need("tool:1", tool())
            if hour % 24 == 12 and day >= 1:
                self.need(f"release:v{release_n - 1}", release(release_n - 1, current=False))
            self.hourly(hour)
            self.used()


def with_gcd(trace: Trace, tmp: Path, rules: bool = True) -> Callable[[], None]:
    """The gcd daemon, started now; returns what stops it (and counts its removals). Without
    `rules`, only disk pressure frees (least recently used first, by its event follower)."""
    port = free_port()
    config = tmp / "gcd.yaml"
    body = GCD_CONFIG.format(port=port, root=trace.engine.root)
    if not rules:
        body = body[: body.index("rules:")]
    config.write_text(
        f"version: 1\nengine: {{url: '{trace.engine.url}'}}\nstate_dir: {tmp}/state\n" + body
    )
    log = open(tmp / "daemon.log", "w")  # noqa: SIM115 (closed by the stopper)
    process = subprocess.Popen(
        [sys.executable, "-m", "gcd", "daemon", "--config", str(config)], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while " INFO run: " not in (tmp / "daemon.log").read_text():
        assert time.monotonic() < deadline and process.poll() is None, "the daemon did not start"
        time.sleep(0.1)

    def stop() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "gcd_images_removed":
                trace.outcome.removals = int(
                    sum(s.value for s in family.samples if s.name.endswith("_total"))
                )
        process.terminate()
        process.wait(60)
        log.close()

    return stop


def with_cron(trace: Trace) -> None:
    """`docker image prune -a -f --filter until=24h` at each simulated midnight (the trace's
    hour, as an absolute time: the engine's clock is real)."""

    def hourly(hour: int) -> None:
        if hour % 24 != 23:
            return
        until = START + timedelta(hours=hour + 1) - timedelta(hours=24)
        answer = trace.client.prune_images(
            filters={"dangling": False, "until": str(int(until.timestamp()))}
        )
        trace.outcome.removals += len(
            [d for d in answer.get("ImagesDeleted") or () if d.get("Deleted")]
        )

    trace.hourly = hourly


def with_oldest(trace: Trace) -> None:
    """Before each build, while over 85 %: remove the image created first, never forced,
    down to 70 % (a container's image is refused and skipped)."""

    def before_build() -> None:
        if trace.used() < HIGH:
            return
        for image in sorted(trace.client.images(), key=lambda i: i["Created"]):
            refs = [t for t in image.get("RepoTags") or () if t != "<none>:<none>"] or [image["Id"]]
            try:
                for ref in refs:
                    trace.client.remove_image(ref)
            except docker.errors.APIError:
                continue
            trace.outcome.removals += 1
            if trace.used() <= LOW:
                return

    trace.before_build = before_build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replay(cleaner: str) -> Outcome:
    outcome = Outcome(cleaner)
    with (
        tempfile.TemporaryDirectory(prefix="gcd-trace-") as tmp,
        engine_on_a_small_filesystem() as engine,
    ):
        trace = Trace(engine, outcome)
        stop = None
        if cleaner.startswith("gcd"):
            stop = with_gcd(trace, Path(tmp), rules=cleaner == "gcd")
        elif cleaner == "cron":
            with_cron(trace)
        else:
            with_oldest(trace)
        started = time.monotonic()
        try:
            trace.replay()
        finally:
            if stop is not None:
                stop()
        print(f"  {cleaner}: replayed in {time.monotonic() - started:.0f} s", flush=True)
    return outcome


def rows(add: Callable[[str, str, str], None]) -> None:
    """One row per cleaner, side by side (tests/bench/run --trace-only)."""
    for cleaner in ("gcd", "gcd-pressure-only", "cron", "oldest"):
        o = replay(cleaner)
        share = f"{o.regrets / o.removals:.1%} of removals" if o.removals else "no removals"
        add(
            f"CI trace, {HOURS} h on 400 MB: {cleaner}",
            f"{o.failed} of {o.builds} builds failed for space; {o.regrets} regrets; "
            f"{o.removals} removals; peak {o.peak:.0%}",
            f"regrets {share}; targets: no build fails, regrets < 1 % of removals"
            if cleaner.startswith("gcd")
            else share,
        )
