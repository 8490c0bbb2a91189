"""Metrics.record on a synthetic report: what each outcome adds to which series."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gcd import __version__, policy
from gcd import metrics as gcd_metrics
from gcd.metrics import MAX_CONNECTIONS, Metrics
from gcd.model import (
    ContainerDecision,
    ContainerOutcome,
    EngineInfo,
    Outcome,
    Plan,
    Report,
    Snapshot,
)
from tests.unit.snapshots import NOW, cfg, iid, image, snapshot, state


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The series with exactly `labels`; for gcd_cycles_total, `trigger` is `schedule` unless
    given."""
    if name == "gcd_cycles_total":
        labels = {"trigger": "schedule", **labels}
    return metrics.registry.get_sample_value(name, labels)


def test_record_counts_removals_by_reason_tags_by_rule_and_skips_by_code() -> None:
    images = [
        image("mid"),
        image("old", ["app:1"], parent="mid"),
        image("gone", ["app:2"]),
        image("busy", ["app:3"]),
        image("dangling"),
        image("top", ["app:9", "app:x"]),
    ]
    config = cfg(
        "rules:\n  - {name: ci, match: {tag: '\\d+'}, order_by: natural, keep_last: 1}\nuntag_expired: true\n"
    )
    plan = policy.plan(snapshot(images), config, state(), NOW)
    assert plan.decision(iid("top")).untag == ()
    outcomes = {d.image_id: Outcome(d.image_id, "done") for d in plan.decisions}
    # The tags counted are those the engine said went: the executor's untagged list.
    outcomes[iid("old")] = Outcome(iid("old"), "done", untagged=("app:1",))
    outcomes[iid("gone")] = Outcome(iid("gone"), "skipped", reason="already gone", code="gone")
    outcomes[iid("busy")] = Outcome(iid("busy"), "failed", error="500")
    report = Report(plan, False, NOW, outcomes, reclaimed_bytes=1234)
    metrics = Metrics()
    metrics.record(report, duration=2.5, ended=1000.0)
    assert sample(metrics, "gcd_images_removed_total", reason="expired") == 1
    assert sample(metrics, "gcd_images_removed_total", reason="intermediate") == 1
    assert sample(metrics, "gcd_images_removed_total", reason="dangling") == 1
    assert sample(metrics, "gcd_tags_removed_total", rule="ci") == 1
    assert sample(metrics, "gcd_removals_skipped_total", reason="gone") == 1
    assert sample(metrics, "gcd_removal_failures_total") == 1
    assert sample(metrics, "gcd_cycles_total", result="failure") == 1
    assert sample(metrics, "gcd_cycles_total", result="success") == 0
    assert sample(metrics, "gcd_last_cycle_timestamp_seconds") == 1000.0
    assert sample(metrics, "gcd_last_success_timestamp_seconds") == 0
    assert sample(metrics, "gcd_bytes_reclaimed_total") == 1234
    assert sample(metrics, "gcd_cycle_duration_seconds_sum") == 2.5
    assert sample(metrics, "gcd_images", state="remove") == 5
    assert sample(metrics, "gcd_images", state="dangling") == 1
    assert sample(metrics, "gcd_image_store_bytes") == 6000
    assert sample(metrics, "gcd_engine_up") == 1


def test_a_dry_run_sets_plan_gauges_only() -> None:
    plan = policy.plan(snapshot([image("d")]), cfg(), state(), NOW)
    metrics = Metrics()
    metrics.record(Report(plan, True, NOW, {}, 0), duration=1, ended=1)
    assert sample(metrics, "gcd_images", state="remove") == 1
    assert sample(metrics, "gcd_reclaimable_bytes") == 1000
    assert sample(metrics, "gcd_cycles_total", result="success") == 0
    assert sample(metrics, "gcd_images_removed_total", reason="dangling") == 0


def test_every_metric_has_help_and_every_label_value_exists_from_the_start() -> None:
    text = generate_latest(Metrics().registry).decode()
    for name in (
        "gcd_cycles_total",
        "gcd_cycle_duration_seconds",
        "gcd_last_cycle_timestamp_seconds",
        "gcd_last_success_timestamp_seconds",
        "gcd_images_removed_total",
        "gcd_tags_removed_total",
        "gcd_bytes_reclaimed_total",
        "gcd_removals_skipped_total",
        "gcd_removal_failures_total",
        "gcd_images",
        "gcd_image_store_bytes",
        "gcd_reclaimable_bytes",
        "gcd_engine_up",
        "gcd_config_reloads_total",
        "gcd_metrics_connections_refused_total",
        "gcd_build_info",
    ):
        family = name.removesuffix("_total")
        assert f"# HELP {family}" in text or f"# HELP {name}" in text, name
    assert 'gcd_cycles_total{result="skipped",trigger="pressure"} 0.0' in text
    assert 'gcd_removals_skipped_total{reason="engine_down"} 0.0' in text
    assert 'gcd_config_reloads_total{result="failure"} 0.0' in text


def test_serve_binds_loopback_by_default_config() -> None:
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0")
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.close()


def test_the_textfile_is_readable_by_node_exporter_whatever_the_umask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    previous = os.umask(0o077)  # what the systemd units set
    try:
        Metrics().write_textfile(str(tmp_path / "gcd.prom"))
    finally:
        os.umask(previous)
    assert (tmp_path / "gcd.prom").stat().st_mode & 0o777 == 0o644


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_connections_to_metrics_are_bounded() -> None:
    # 2,000 idle connections made 2,000 threads (+55 MB): now at most MAX_CONNECTIONS.
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0")
    port = server.httpd.server_address[1]
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        deadline = time.monotonic() + 10
        while sample(metrics, "gcd_metrics_connections_refused_total") != 100 - MAX_CONNECTIONS:
            assert time.monotonic() < deadline, "the extra connections were not refused"
            time.sleep(0.05)
        assert threading.active_count() - threads <= MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()
    try:
        deadline = time.monotonic() + 10
        while threading.active_count() > threads:  # closed: their threads end
            assert time.monotonic() < deadline, "threads outlived their connections"
            time.sleep(0.05)
        assert "gcd_build_info" in _scrape(port)
    finally:
        server.close()


def test_a_silent_connection_times_out_and_frees_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gcd_metrics._Handler, "timeout", 0.5)
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0")
    port = server.httpd.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(1.5)
        assert "gcd_build_info" in _scrape(port)
        assert sample(metrics, "gcd_metrics_connections_refused_total") == 0
    finally:
        for s in idle:
            s.close()
        server.close()


def test_build_info_names_the_engine_kind_and_store_once_a_cycle_read_it() -> None:
    metrics = Metrics()
    assert sample(metrics, "gcd_build_info", version=__version__, kind="", store="") == 1
    podman = Snapshot(EngineInfo("unix:///p.sock", "5.4.2", "1.41", "podman", "overlay"), (), ())
    plan = policy.plan(podman, cfg(), state(), NOW)
    metrics.record(Report(plan, True, NOW, {}, 0), duration=1, ended=1)
    assert (
        sample(metrics, "gcd_build_info", version=__version__, kind="podman", store="overlay") == 1
    )
    assert sample(metrics, "gcd_build_info", version=__version__, kind="", store="") is None


def test_every_metric_is_in_the_metrics_reference() -> None:
    documented = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{name}` |" in documented, f"docs/metrics.md does not describe {name}"


def test_removed_containers_are_counted() -> None:
    snap = snapshot([image("a", ["app:1"])])
    decided = ContainerDecision("c1", "job", iid("a"), "exited", "remove", "exited 4d ago")
    plan = Plan(snap, NOW, policy.plan(snap, cfg(), state(), NOW).decisions, 0, (decided,))
    outcomes = {iid("a"): Outcome(iid("a"), "done")}
    metrics = Metrics()
    done = Report(plan, False, NOW, outcomes, container_outcomes={"c1": ContainerOutcome("done")})
    metrics.record(done, 1.0, 0.0)
    assert sample(metrics, "gcd_containers_removed_total") == 1
    failed = Report(
        plan, False, NOW, outcomes, container_outcomes={"c1": ContainerOutcome("failed", error="x")}
    )
    metrics.record(failed, 1.0, 0.0)
    assert sample(metrics, "gcd_containers_removed_total") == 1
    assert sample(metrics, "gcd_cycles_total", result="failure") == 1
