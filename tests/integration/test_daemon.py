"""`gcd daemon` as systemd runs it: a real NOTIFY_SOCKET, real signals, a real /metrics scrape."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import docker
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, busybox_layer, load
from tests.integration.conftest import (
    NO_AGE_GUARDS,
    WHEN,
    Gcd,
    ids_now,
    podman,
    store_bytes,
    tags_now,
)

RULES = (
    NO_AGE_GUARDS
    + r"""
rules:
  - name: ci
    match: {tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: KEEP
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def promtool() -> str:
    path = shutil.which("promtool") or os.path.join(os.path.dirname(sys.executable), "promtool")
    assert os.access(path, os.X_OK), "promtool is missing: tests/setup.sh installs it"
    return path


def wait_for(condition: Callable[[], object], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:  # the endpoint is not up yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Daemon:
    """`gcd daemon` in a subprocess, with the notify socket systemd would give it."""

    def __init__(
        self,
        tmp: Path,
        url: str,
        body: str,
        every: str = "1h",
        watchdog_usec: int = 0,
        engine_timeout: str = "3s",
    ) -> None:
        self.tmp = tmp
        self.engine_timeout = engine_timeout
        self.port = free_port()
        self.config = tmp / "config.yaml"
        self.write_config(url, body, every)
        self.notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        self.log_path = tmp / "daemon.log"
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gcd", "daemon", "--config", str(self.config)],
            stdout=self.log,
            stderr=self.log,
            env=env,
        )

    def write_config(self, url: str, body: str, every: str = "1h") -> None:
        self.config.write_text(
            f"version: 1\nengine: {{url: '{url}', timeout: {self.engine_timeout}}}\n"
            f"state_dir: {self.tmp / 'state'}\n"
            f"schedule: {{every: {every}}}\nmetrics: {{listen: '127.0.0.1:{self.port}'}}\n" + body
        )

    def receive(self) -> list[str]:
        while self.notify.fileno() != -1:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                break
        return self.messages

    def saw(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for m in self.receive() for line in m.splitlines())

    def logs(self) -> str:
        return self.log_path.read_text()

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def value(self, name: str, **labels: str) -> float:
        """The sum of the series of `name` whose labels include `labels` (cycles by result
        count every trigger)."""
        found = [
            float(sample.value)
            for family in text_string_to_metric_families(self.scrape())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]
        if not found:
            raise KeyError(name)
        return sum(found)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.receive()  # what it said on the way out
        self.log.close()
        self.notify.close()
        return code


def test_notify_protocol_schedule_and_scraped_metrics(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path, daemons: list[Daemon]
) -> None:
    ids = load(
        client,
        [
            Spec([f"app:{n}"], [Layer("shared", 100_000), Layer(f"own-{n}", 20_000)], WHEN)
            for n in range(1, 6)
        ],
    )
    layers_before = store_bytes(dockerd, client)
    d = Daemon(
        tmp_path, dockerd.url, RULES.replace("KEEP", "2"), every="2s", watchdog_usec=1_000_000
    )
    daemons.append(d)
    wait_for(lambda: d.saw("READY=1"), what="READY=1")
    wait_for(lambda: d.saw("STATUS=last cycle"), what="a STATUS after the first cycle")
    status = next(
        line for m in d.messages for line in m.splitlines() if line.startswith("STATUS=last cycle")
    )
    assert "removed 3 images" in status and "; next " in status
    assert status.isascii()
    pings = sum(m == "WATCHDOG=1" for m in d.receive())
    time.sleep(2)
    assert sum(m == "WATCHDOG=1" for m in d.receive()) >= pings + 3  # every WatchdogSec/2 = 0.5s
    wait_for(
        lambda: d.value("gcd_cycles_total", result="success") >= 3, what="three cycles on schedule"
    )

    assert set(tags_now(client)) == {"app:4", "app:5"}
    assert d.value("gcd_images_removed_total", reason="expired") == 3
    assert d.value("gcd_tags_removed_total", rule="ci") == 3
    freed = layers_before - store_bytes(dockerd, client)
    assert d.value("gcd_bytes_reclaimed_total") == freed
    assert d.value("gcd_engine_up") == 1
    assert d.value("gcd_images", state="keep") == 2
    assert d.value("gcd_images", state="remove") == 0
    assert d.value("gcd_reclaimable_bytes") == 0
    assert d.value("gcd_image_store_bytes") == store_bytes(dockerd, client)
    assert d.value("gcd_last_success_timestamp_seconds") > time.time() - 10
    assert d.value("gcd_cycle_duration_seconds_count") >= 3
    assert d.value("gcd_build_info", version=__import__("gcd").__version__) == 1
    assert d.value("gcd_removal_failures_total") == 0
    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=d.scrape(), capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    assert d.stop() == 0
    assert d.saw("STOPPING=1")
    assert not set(ids[3:]) - ids_now(client)


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_broken_one(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path, daemons: list[Daemon]
) -> None:
    load(client, [Spec([f"app:{n}"], [Layer(f"own-{n}")], WHEN) for n in range(1, 6)])
    d = Daemon(tmp_path, dockerd.url, RULES.replace("KEEP", "4"))
    daemons.append(d)
    wait_for(lambda: d.saw("STATUS=last cycle"), what="the first cycle")
    assert len(tags_now(client)) == 4

    d.write_config(dockerd.url, RULES.replace("KEEP", "2"))
    d.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: the new policy" in d.logs(), what="the reload diff")
    assert (
        "reload: the new policy removes 2 images the old one kept and keeps 0 it removed "
        "(2 to remove at the next cycle)" in d.logs()
    )
    assert d.value("gcd_config_reloads_total", result="success") == 1

    d.write_config(dockerd.url, RULES.replace("KEEP", "two"))
    d.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in d.logs(), what="the failed reload")
    assert (
        f'ERROR reload: {d.config}:13: rules[0].keep_last: expected an integer >= 1, got "two"'
        in d.logs()
    )
    assert "ERROR reload failed: keeping the configuration that runs now" in d.logs()
    assert d.value("gcd_config_reloads_total", result="failure") == 1
    assert d.process.poll() is None
    assert len(tags_now(client)) == 4  # no cycle since: the next one is an hour away
    assert d.stop() == 0


def test_sigterm_mid_cycle_stops_between_removals_and_exits_cleanly(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path, daemons: list[Daemon]
) -> None:
    count = 300
    load(client, [Spec([f"bulk:{n}"], [Layer(f"bulk-{n}", 100)], WHEN) for n in range(count)])
    d = Daemon(
        tmp_path,
        dockerd.url,
        RULES.replace("KEEP", "1").replace(
            "max_removal_fraction: 1.0", "max_removal_fraction: 1.0, max_removals_per_run: 1000"
        ),
        # The containerd store takes up to 256 DELETEs at once and answers them together: on
        # a busy machine Docker 26 took over 3s to answer the first of them (CI, 2026-12-06).
        engine_timeout="30s",
    )
    daemons.append(d)
    # A cold cycle reads 300 images first: on the containerd store, two requests each.
    wait_for(lambda: "INFO removed " in d.logs(), timeout=120, what="the first removal")
    d.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert d.stop() == 0
    # The removals in flight end first (on the containerd store up to 256, answered
    # together: 8 s on a busy machine); none starts after.
    assert time.monotonic() - stopped_at < 30
    assert d.saw("STOPPING=1")
    left = tags_now(client)
    removed = count - len(left)
    assert 0 < removed < count - 1, (
        f"removed {removed} of {count - 1}: the stop came too late to test"
    )
    assert "stopping: waiting for the current cycle to stop between two removals" in d.logs()
    # Every image left is whole: each still has its one tag.
    assert all(tag.startswith("bulk:") for tag in left)
    assert len(ids_now(client)) == len(left)


def test_engine_stopped_and_restarted_while_the_daemon_runs(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    engine = PrivateEngine()
    engine.start()
    try:
        d = Daemon(tmp_path, engine.url, "", every="1s")
        daemons.append(d)
        wait_for(lambda: d.saw("READY=1"), what="READY=1")
        wait_for(lambda: d.value("gcd_cycles_total", result="success") >= 1, what="a first cycle")
        engine.stop()
        wait_for(lambda: d.value("gcd_engine_up") == 0, what="engine_up 0")
        wait_for(
            lambda: d.value("gcd_cycles_total", result="error") >= 3, what="three failed cycles"
        )
        assert d.process.poll() is None
        assert d.logs().count("cannot reach the Docker engine") == 1
        assert d.saw("STATUS=engine unreachable since")
        engine.start()
        wait_for(lambda: d.value("gcd_engine_up") == 1, timeout=30, what="engine_up 1 again")
        assert d.logs().count(f"the Docker engine at {engine.url} answers again") == 1
        assert d.stop() == 0
    finally:
        engine.stop()
        engine.remove()


def test_the_watchdog_goes_quiet_while_a_cycle_is_wedged_and_resumes_after(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    hung_path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(hung_path)
    hung.listen(16)  # the engine accepts connections and never answers: a wedged cycle
    try:
        d = Daemon(
            tmp_path, f"unix://{hung_path}", "", watchdog_usec=1_000_000, engine_timeout="8s"
        )
        daemons.append(d)
        wait_for(lambda: d.saw("READY=1"), what="READY=1")
        time.sleep(2.5)  # the first cycle is stuck on its first call
        d.receive()
        wedged_from = len(d.messages)
        time.sleep(3)
        assert "WATCHDOG=1" not in d.receive()[wedged_from:]
        wait_for(
            lambda: "no answer within 8s" in d.logs(), timeout=15, what="the cycle to time out"
        )
        resumed_from = len(d.receive())
        time.sleep(2)
        assert d.receive()[resumed_from:].count("WATCHDOG=1") >= 2
        assert d.stop() == 0
    finally:
        hung.close()


def test_the_last_of_a_burst_of_sighups_always_wins(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path, daemons: list[Daemon]
) -> None:
    import random

    load(client, [Spec([f"app:{n}"], [Layer(f"burst-{n}")], WHEN) for n in range(1, 6)])
    d = Daemon(tmp_path, dockerd.url, RULES.replace("KEEP", "5"))
    daemons.append(d)
    wait_for(lambda: d.saw("STATUS=last cycle"), what="the first cycle")
    rng = random.Random(7)

    def write(keep: int) -> None:  # atomically, as config management does
        real, d.config = d.config, d.config.with_suffix(".new")
        try:
            d.write_config(dockerd.url, RULES.replace("KEEP", str(keep)))
        finally:
            d.config = real
        real.with_suffix(".new").replace(real)

    for _ in range(50):  # reloads run while more SIGHUPs arrive
        write(rng.choice([3, 4, 5]))
        d.process.send_signal(signal.SIGHUP)
        time.sleep(rng.uniform(0.0, 0.02))
    write(1)
    d.process.send_signal(signal.SIGHUP)

    def last_diff() -> str:
        lines = [line for line in d.logs().splitlines() if "reload: the new policy" in line]
        return lines[-1] if lines else ""

    # keep_last 1 of 5 images: 4 to remove, a count no earlier file in the burst gives.
    try:
        wait_for(
            lambda: last_diff().endswith("(4 to remove at the next cycle)"),
            timeout=60,
            what="the last SIGHUP's policy",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{d.logs()[-3000:]}") from None
    time.sleep(2)  # nothing after it may override it
    assert last_diff().endswith("(4 to remove at the next cycle)")
    assert d.value("gcd_config_reloads_total", result="failure") == 0
    assert d.process.poll() is None
    assert d.stop() == 0


def test_a_taken_metrics_port_does_not_stop_the_daemon(
    dockerd: PrivateEngine,
    client: docker.APIClient,
    tmp_path: Path,
    daemons: list[Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load(client, [Spec([f"app:{n}"], [Layer(f"port-{n}")], WHEN) for n in range(1, 4)])
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    taken = int(squatter.getsockname()[1])
    monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: taken)
    d = Daemon(tmp_path, dockerd.url, RULES.replace("KEEP", "1"))  # metrics on the taken port
    daemons.append(d)
    try:
        # Before the fix the daemon exited here: a restart loop under systemd.
        wait_for(lambda: d.saw("STATUS=last cycle"), what="a cycle without /metrics")
        assert len(tags_now(client)) == 1
        assert d.process.poll() is None
    finally:
        squatter.close()
    wait_for(
        lambda: d.value("gcd_cycles_total", result="success") == 1,
        timeout=20,
        what="/metrics once the port is free",
    )
    assert d.value("gcd_metrics_listen_failures_total") >= 1
    errors = [line for line in d.logs().splitlines() if "cannot serve metrics" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "Address already in use; collecting anyway, trying again every 5s"
    ), errors
    assert d.stop() == 0


def catches(pid: int, signum: int) -> bool:
    """The process has a handler for `signum` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def test_signals_in_the_daemons_first_moments_wait_for_it(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # Sent as soon as the process catches the signal, while it still loads gcd: under
    # Python's own handling, SIGHUP there ended it with rc 129 and SIGTERM with -15.
    load(client, [Spec([f"app:{n}"], [Layer(f"own-{n}")], WHEN) for n in range(1, 4)])
    (tmp_path / "hup").mkdir()
    d = Daemon(tmp_path / "hup", dockerd.url, RULES.replace("KEEP", "3"))
    daemons.append(d)
    wait_for(lambda: catches(d.process.pid, signal.SIGHUP), what="SIGHUP caught")
    d.process.send_signal(signal.SIGHUP)
    wait_for(lambda: d.saw("STATUS=last cycle"), what="the first cycle")
    wait_for(lambda: "configuration reloaded from" in d.logs(), what="the reload")
    assert d.process.poll() is None
    assert d.stop() == 0

    (tmp_path / "term").mkdir()
    d = Daemon(tmp_path / "term", dockerd.url, RULES.replace("KEEP", "1"))
    daemons.append(d)
    wait_for(lambda: catches(d.process.pid, signal.SIGTERM), what="SIGTERM caught")
    d.process.send_signal(signal.SIGTERM)
    assert d.process.wait(15) == 0
    assert "gcd daemon stopped" in d.logs()
    assert not d.saw("STATUS=last cycle")
    assert len(tags_now(client)) == 3  # KEEP 1 would have removed two: no cycle ran


def test_a_container_run_between_two_cycles_counts_as_a_use_also_after_an_engine_restart(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    engine = PrivateEngine()
    engine.start()
    try:
        client = docker.APIClient(base_url=engine.url, version="auto", timeout=60)
        ids = load(
            client,
            [
                Spec(["app:1"], [busybox_layer(), Layer("one")], datetime(2026, 1, 1, tzinfo=UTC)),
                Spec(["app:2"], [busybox_layer(), Layer("two")], datetime(2026, 2, 1, tzinfo=UTC)),
            ],
        )
        # The daemon keeps both (its first cycle at start, the next in an hour).
        d = Daemon(tmp_path, engine.url, "rules:\n  - {name: all, keep_last: 2}\n")
        daemons.append(d)
        wait_for(lambda: d.value("gcd_cycles_total", result="success") >= 1, what="a cycle")
        wait_for(lambda: d.value("gcd_events_up") == 1, what="events followed")
        kept = planned_keeps(engine.url, tmp_path, "last_used", full_names=podman(client))

        assert kept() == ["app:2"]  # never used: the younger one
        run_and_remove(client, "app:1")  # no snapshot ever sees this container
        wait_for(lambda: kept() == ["app:1"], what="app:1 ranked as just used")

        engine.stop()
        wait_for(lambda: d.value("gcd_events_up") == 0, what="events lost")
        engine.start()
        wait_for(lambda: d.value("gcd_events_up") == 1, timeout=30, what="events followed again")
        # What the engine no longer holds of the gap, a snapshot takes in (removing nothing).
        wait_for(lambda: "after the gap in the engine's events, a snapshot: 2 images" in d.logs())
        client = docker.APIClient(base_url=engine.url, version="auto", timeout=60)
        run_and_remove(client, "app:2")
        wait_for(lambda: kept() == ["app:2"], what="app:2 ranked as just used")
        assert d.logs().count("lost the engine's events") == 1
        assert d.logs().count("following the engine's events again") == 1
        assert d.stop() == 0
        assert set(ids) <= ids_now(client)
    finally:
        engine.stop()
        engine.remove()


def test_a_tag_the_event_follower_sees_is_the_image_s_tag_time(
    tmp_path: Path, dockerd: PrivateEngine, client: docker.APIClient, daemons: list[Daemon]
) -> None:
    """x:2 was built before x:1 but loaded after it: ranked by tag time it is the newer.
    Podman records no tag time (docs/engines.md): there only the daemon's event follower
    knows, and `gcd plan` reads what it recorded."""
    d = Daemon(tmp_path, dockerd.url, "rules:\n  - {name: all, keep_last: 10}\n")
    daemons.append(d)
    wait_for(lambda: d.value("gcd_events_up") == 1, what="events followed")
    wait_for(lambda: d.value("gcd_cycles_total", result="success") >= 1, what="a cycle")
    load(client, [Spec(["x:1"], [Layer("x-one")], datetime(2026, 2, 1, tzinfo=UTC))])
    time.sleep(1.1)  # tag times a second apart, for engines that count whole seconds
    load(client, [Spec(["x:2"], [Layer("x-two")], datetime(2026, 1, 1, tzinfo=UTC))])
    kept = planned_keeps(dockerd.url, tmp_path, "tagged", full_names=podman(client))
    wait_for(lambda: kept() == ["x:2"], what="x:2 ranked as tagged last")
    assert d.stop() == 0


def planned_keeps(
    url: str, tmp_path: Path, order_by: str, full_names: bool
) -> Callable[[], list[str]]:
    """What `gcd plan` keeps, by first tag, with the daemon's state store and one rule that
    keeps the newest image by `order_by`."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"version: 1\nengine: {{url: '{url}'}}\nstate_dir: {tmp_path / 'state'}\n"
        "safety: {min_age: 0s, max_removal_fraction: 1.0}\n"
        f"rules:\n  - {{name: newest, order_by: {order_by}, keep_last: 1}}\n"
    )

    def kept() -> list[str]:
        document = Gcd(url, tmp_path, full_names=full_names).json("plan", "--config", str(plan))
        return [d["tags"][0] for d in document["decisions"] if d["decision"] == "keep"]

    return kept


def run_and_remove(client: docker.APIClient, image: str) -> None:
    """`docker run --rm --network none IMAGE true`."""
    none = client.create_host_config(network_mode="none")
    container = client.create_container(image, ["/bin/busybox", "true"], host_config=none)
    client.start(container)
    client.wait(container)
    client.remove_container(container)


def test_a_burst_of_signals_never_wedges_the_daemon(
    dockerd: PrivateEngine, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # A Python signal handler runs in the main thread between two bytecodes, maybe while
    # that thread holds an Event's lock: a handler that set an Event there deadlocked the
    # daemon, which then never stopped (test_sigterm_mid_cycle…, 2026-12-06).
    d = Daemon(tmp_path, dockerd.url, RULES.replace("KEEP", "3"))
    daemons.append(d)
    wait_for(lambda: d.saw("READY=1"), what="READY=1")
    for _ in range(BURST):
        os.kill(d.process.pid, signal.SIGHUP)
    d.process.send_signal(signal.SIGTERM)
    assert d.stop(timeout=60) == 0, d.logs()[-2000:]
    assert "gcd daemon stopped" in d.logs()


BURST = 20_000
