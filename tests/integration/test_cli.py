"""The command line against the real engine: outputs, exit codes, nothing removed on error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import docker
import pytest

from gcd import __version__
from gcd.model import short_id
from gcd.units import format_bytes
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load
from tests.integration.conftest import (
    NO_AGE_GUARDS,
    WHEN,
    Gcd,
    counts_content,
    engine_line,
    ids_now,
    podman,
    report_of,
    size_cell,
    tags_now,
)
from tests.proxy import Delay, FaultProxy

POLICY = (
    NO_AGE_GUARDS
    + r"""
rules:
  - name: ci
    match: {repository: app, tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 1
"""
)


def two_builds(client: docker.APIClient) -> tuple[str, str]:
    old, new = load(
        client, [Spec([f"app:{n}"], [Layer(f"app-{n}", 2_000_000)], WHEN) for n in (1, 2)]
    )
    return old, new


def freed(client: docker.APIClient) -> int:
    """What removing one of two_builds frees: its 2 MB layer, twice where the engine counts
    the packed blob beside the unpacked layer (Docker 28.2 on, containerd store)."""
    return 2_000_000 * (2 if counts_content(client) else 1)


def test_plan_and_dry_run_change_nothing_and_print_a_table(
    gcd: Gcd, client: docker.APIClient
) -> None:
    old, new = two_builds(client)
    config = str(gcd.config(POLICY))
    before = ids_now(client)
    size, mb = size_cell(client, old), format_bytes(freed(client))
    for args in (["plan"], ["run", "--dry-run"]):
        result = gcd(*args, "--config", config)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"engine: {engine_line(client, gcd.url)}\n"
            "IMAGE         TAGS   DECISION  SIZE   REASON\n"
            f"{short_id(old)}  app:1  remove    {size}  ci: rank 2 > keep_last 1 in group repository=app\n"
            f"{short_id(new)}  app:2  keep      {size}  ci: rank 1 <= keep_last 1 in group repository=app\n"
            "\n"
            f"plan: 2 images, 1 to remove, 0 tags to untag, 1 kept; {mb} reclaimable (dry run: nothing removed)\n"
        )
    assert ids_now(client) == before
    document = gcd.json("plan", "--config", config)
    assert document["dry_run"] is True
    assert {d["outcome"] for d in document["decisions"]} == {"planned"}
    assert document["engine"]["url"] == gcd.url
    assert f"{document['engine']['kind']} {document['engine']['store']}" in (
        "docker overlay2",
        "docker containerd",
        "podman overlay",
    )
    assert document["version"] == f"gcd {__version__}"
    assert set(document["summary"]) == {
        "images",
        "tags",
        "containers",
        "remove",
        "untag",
        "keep",
        "skipped",
        "failed",
        "unplanned",
        "tags_restored",
        "reclaimable_bytes",
        "reclaimed_bytes",
        "containers_to_remove",
        "containers_removed",
        "freed_accounted_bytes",
        "freed_measured_bytes",
    }


def test_run_prints_outcomes_and_a_summary(gcd: Gcd, client: docker.APIClient) -> None:
    old, new = two_builds(client)
    size, mb = size_cell(client, old), format_bytes(freed(client))
    result = gcd("run", "--config", str(gcd.config(POLICY)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"engine: {engine_line(client, gcd.url)}"
    assert lines[1] == "IMAGE         TAGS   DECISION  OUTCOME  SIZE   REASON"
    assert (
        lines[2]
        == f"{short_id(old)}  app:1  remove    done     {size}  ci: rank 2 > keep_last 1 in group repository=app"
    )
    assert lines[-1] == (
        "run: 2 images, 1 to remove, 0 tags to untag, 1 kept; removed 1, skipped 0, failed 0; "
        f"reclaimed {mb} of {mb} planned"
    )
    # Side by side: the engine's count (Podman 4 keeps none) and the data root's statvfs
    # (Podman tells no data root: not watched). Both vary by engine; test_retention has
    # the engine's count to the byte.
    assert re.fullmatch(
        rf"bytes freed: {re.escape(mb)} planned, {re.escape(mb)} reclaimed, "
        r"(?:[\d.]+k?M?B by the engine's count|the engine keeps no count), "
        r"(?:[\d.]+k?M?G?B measured on /\S+|disk not watched)",
        lines[-2],
    ), lines[-2]
    assert f"INFO removed {short_id(old)} app:1" in result.stderr
    assert ids_now(client) == {new}


def test_bad_config_exits_2_names_every_problem_and_removes_nothing(
    gcd: Gcd, client: docker.APIClient
) -> None:
    two_builds(client)
    before = ids_now(client)
    config = gcd.config(
        POLICY
        + "  - name: broken\n    keep_last: three\n    order_by: semver(version)\nunmatchd: keep\n"
    )
    result = gcd("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f'{config}:14: rules[1].keep_last: expected an integer >= 1, got "three"\n'
        f'{config}:15: rules[1].order_by: unknown group "version"; match.tag has no group of that name\n'
        f"{config}:16: unmatchd: unknown key (expected one of: version, engine, schedule, metrics, "
        "state_dir, safety, protect, rules, dangling, unmatched, untag_expired, disk, regret_window, build_cache, containers)\n"
    )
    assert ids_now(client) == before
    check = gcd("check-config", str(config))
    assert (check.returncode, check.stdout) == (2, "")
    assert check.stderr.count("\n") == 3
    ok = gcd("check-config", str(gcd.config(POLICY.replace("min_age: 0s", "min_age: 1h", 1))))
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "ok\n", "")
    path = gcd.config(POLICY)
    risky = gcd("check-config", str(path))
    assert (risky.returncode, risky.stdout) == (0, "ok\n")
    assert risky.stderr.startswith(f"{path}:5: safety.min_age: warning: 0s is below 10m: ")


def test_unreachable_engine_exits_3_naming_the_address(gcd: Gcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "c.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path}/state\nengine: {{url: 'unix://{tmp_path}/none.sock'}}\n"
    )
    result = gcd("run", "--config", str(config))
    assert result.returncode == 3
    assert result.stderr == (
        f"gcd: cannot reach the Docker engine at unix://{tmp_path}/none.sock: "
        "no such socket (is dockerd running? set engine.url or $DOCKER_HOST)\n"
    )


def test_engine_address_comes_from_docker_host_when_the_config_has_none(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    two_builds(client)
    config = tmp_path / "c.yaml"
    config.write_text(f"version: 1\nstate_dir: {tmp_path}/state\n")
    result = gcd("plan", "--config", str(config), "--output", "json", env={"DOCKER_HOST": gcd.url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["images"] == 2


def test_unwritable_state_dir_stops_a_run_before_anything_is_removed(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    two_builds(client)
    before = ids_now(client)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"version: 1\nengine: {{url: '{gcd.url}'}}\nstate_dir: {blocker}/state\n" + POLICY
    )
    result = gcd("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines(keepends=True)[-1] == (
        f"gcd: state_dir {blocker}/state is not writable: Not a directory; "
        "give the gcd user write access or set state_dir in the configuration\n"
    )
    assert ids_now(client) == before
    planned = gcd("plan", "--config", str(config))  # reads a store if there is one
    assert planned.returncode == 0, planned.stderr


def test_explain_names_every_reason(gcd: Gcd, client: docker.APIClient) -> None:
    old, _ = two_builds(client)
    size = size_cell(client, old)
    result = gcd("explain", "--config", str(gcd.config(POLICY)), "app:1", short_id(old))
    assert result.returncode == 0, result.stderr
    block = (
        f"{old}\n"
        "  tags:     app:1\n"
        "  created:  2026-03-01T00:00:00Z\n"
        f"  size:     {size} ({format_bytes(freed(client))} freed by removing it)\n"
        "  decision: remove\n"
        "  reasons:\n"
        "    - ci: rank 2 > keep_last 1 in group repository=app\n"
    )
    assert result.stdout == f"app:1: {block}{short_id(old)}: {block}"
    missing = gcd("explain", "--config", str(gcd.config(POLICY)), "nope:1")
    assert missing.returncode == 2
    assert missing.stderr.endswith(f"gcd: no image matches nope:1 in the engine at {gcd.url}\n")


def test_version_and_module_entry_point(gcd: Gcd) -> None:
    result = gcd("--version")
    assert (result.returncode, result.stdout) == (0, f"gcd {__version__}\n")


def test_run_writes_the_metrics_textfile_atomically(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.test_daemon import promtool

    two_builds(client)
    textfile = tmp_path / "textfile" / "gcd.prom"
    textfile.parent.mkdir()
    config = gcd.config(POLICY + f"metrics: {{textfile: '{textfile}'}}\n")
    assert gcd("run", "--config", str(config)).returncode == 0
    text = textfile.read_text()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert values[("gcd_images_removed_total", (("reason", "expired"),))] == 1
    assert values[("gcd_tags_removed_total", (("rule", "ci"),))] == 1
    assert values[("gcd_cycles_total", (("result", "success"), ("trigger", "schedule")))] == 1
    # The one layer app:1 held alone (on the containerd store, its size on disk, in blocks).
    assert values[("gcd_bytes_reclaimed_total", ())] == pytest.approx(freed(client), rel=0.01)
    assert values[("gcd_engine_up", ())] == 1
    assert [p.name for p in textfile.parent.iterdir()] == ["gcd.prom"]  # no temporary file left
    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    down = tmp_path / "down.yaml"
    down.write_text(
        f"version: 1\nstate_dir: {tmp_path}/state2\nengine: {{url: 'unix://{tmp_path}/none.sock'}}\nmetrics: {{textfile: '{textfile}'}}\n"
    )
    assert gcd("run", "--config", str(down)).returncode == 3
    assert "gcd_engine_up 0.0" in textfile.read_text().splitlines()
    assert (
        'gcd_cycles_total{result="error",trigger="schedule"} 1.0'
        in textfile.read_text().splitlines()
    )


def test_logs_under_journald_carry_priorities_instead_of_timestamps(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    two_builds(client)
    log = tmp_path / "journal.log"
    with open(log, "w") as stderr:
        st = os.fstat(stderr.fileno())
        subprocess.run(
            [sys.executable, "-m", "gcd", "run", "--config", str(gcd.config(POLICY))],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            check=True,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
    warning, *lines = log.read_text().splitlines()
    assert warning.startswith("<4>") and "safety.min_age: warning: 0s is below 10m" in warning
    # Every line a priority, none a timestamp (an engine in the matrix's Debian 13 root adds
    # a <4> "disk pressure is not watched" line: its data root is not on this host's tree).
    assert all(re.match(r"<[0-7]>[a-z]", line) for line in lines), lines
    assert [line for line in lines if line.startswith("<6>removed ")], lines


def test_an_engine_hanging_on_its_socket_fails_fast_with_the_timeout(gcd: Gcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import time

    path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(path)
    hung.listen(16)  # accepts connections (the kernel queues them) and never answers
    try:
        config = tmp_path / "c.yaml"
        config.write_text(
            f"version: 1\nstate_dir: {tmp_path}/state\nengine: {{url: 'unix://{path}', timeout: 1s}}\n"
        )
        started = time.monotonic()
        result = gcd("plan", "--config", str(config))
        assert time.monotonic() - started < 15
        assert result.returncode == 3
        assert (
            result.stderr
            == f"gcd: cannot reach the Docker engine at unix://{path}: no answer within 1s (engine.timeout)\n"
        )
    finally:
        hung.close()


def json_run(config: Path, stderr: IO[str]) -> subprocess.Popen[str]:
    """`gcd run --output json` in the background, its log to `stderr`."""
    return subprocess.Popen(
        [sys.executable, "-m", "gcd", "run", "--config", str(config), "--output", "json"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def signalled_mid_run(
    gcd: Gcd,
    client: docker.APIClient,
    tmp_path: Path,
    send: Callable[[subprocess.Popen[str]], None],
    timeout: float = 30,
) -> tuple[int, str, str]:
    """`gcd run` over 300 expired builds, `send` called once the first is removed: the
    exit code, the JSON report and the log."""
    import time

    load(client, [Spec([f"bulk:{n}"], [Layer(f"bulk-{n}", 100)], WHEN) for n in range(300)])
    config = gcd.config(
        POLICY.replace("repository: app", "repository: bulk").replace(
            "max_removal_fraction: 1.0", "max_removal_fraction: 1.0, max_removals_per_run: 1000"
        )
    )
    log = tmp_path / "run.log"
    with open(log, "w") as stderr:
        process = json_run(config, stderr)
        deadline = time.monotonic() + 60
        while "INFO removed " not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        send(process)
        out, _ = process.communicate(timeout=timeout)
    return process.returncode, out, log.read_text()


def test_sigterm_stops_a_shell_run_between_removals_and_reports_the_rest(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    import signal

    code, out, log = signalled_mid_run(
        gcd, client, tmp_path, lambda process: process.send_signal(signal.SIGTERM)
    )
    assert code == 0
    assert "WARNING SIGTERM received: stopping after the current removal" in log
    report = report_of(out)
    stopped = [
        d
        for d in report["decisions"]
        if "skipped: cycle stopped before this action" in d["reasons"]
    ]
    done = [d for d in report["decisions"] if d["decision"] == "remove" and d["outcome"] == "done"]
    assert stopped and done, (len(stopped), len(done))
    assert len(stopped) + len(done) == 299
    assert {d["tags"][0] for d in stopped} <= set(tags_now(client))  # untouched


def test_a_burst_of_signals_never_wedges_a_shell_run(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    # A signal handler that sets an Event can be interrupted by the next signal inside the
    # Event's lock, and its handler then waits for that lock forever (Ctrl-C pressed twice).
    import os
    import signal

    def burst(process: subprocess.Popen[str]) -> None:
        for n in range(20_000):
            try:
                os.kill(process.pid, signal.SIGINT if n % 2 else signal.SIGTERM)
            except ProcessLookupError:
                break  # it ended while they came

    code, out, text = signalled_mid_run(gcd, client, tmp_path, burst, timeout=60)
    assert code == 0
    said = [line for line in text.splitlines() if " received: stopping" in line]
    assert len(said) == 1, text[-2000:]  # Python runs SIGINT's handler first of two pending
    assert said[0].endswith(
        (
            "WARNING SIGTERM received: stopping after the current removal",
            "WARNING SIGINT received: stopping after the current removal",
        )
    )
    assert "Traceback" not in text
    assert report_of(out)["decisions"]


def test_sigterm_while_an_image_loses_thousands_of_tags_stops_within_a_request(
    gcd: Gcd, client: docker.APIClient, dockerd: PrivateEngine, tmp_path: Path
) -> None:
    import signal
    import time

    old, _ = load(
        client,
        [Spec(["many:1"], [Layer("many-1")], WHEN), Spec(["many:99999"], [Layer("new")], WHEN)],
    )
    # Podman tags through its API at about 90 ms a tag: 300 there (the SIGTERM still lands
    # mid-untagging, each untag being held).
    count = 300 if podman(client) else 1000
    names = [f"many:{n}" for n in range(2, count + 1)]
    for name in names:
        client.tag(old, "many", name.partition(":")[2])
    log = tmp_path / "run.log"
    # Each untag held 10 ms (4 at a time: 2.5 s in all), so that the SIGTERM finds gcd
    # untagging on any engine (Podman untags faster than it lists 1,000 names).
    with FaultProxy(dockerd.socket, tmp_path / "proxy.sock") as proxy, open(log, "w") as stderr:
        proxy.rule("DELETE", r"/images/.*many", Delay(0.01, 0.01))
        config = Gcd(proxy.url, tmp_path).config(
            POLICY.replace("repository: app", "repository: many")
        )
        process = json_run(config, stderr)
        deadline = time.monotonic() + 60
        while len(tags_now(client)) > count - 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        out, _ = process.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 5
    assert process.returncode == 0
    (decision,) = [d for d in report_of(out)["decisions"] if d["image_id"] == old]
    assert decision["outcome"] == "skipped"
    left = {t for t, i in tags_now(client).items() if i == old}
    # The report names exactly the tags that went; the image keeps the rest.
    assert 0 < len(decision["untagged"]) < count
    assert set(decision["untagged"]) == {"many:1", *names} - left
    first = ", ".join(sorted(decision["untagged"])[:3])
    assert (
        f"skipped: cycle stopped after untagging {first} and {len(decision['untagged']) - 3} more"
        in decision["reasons"]
    )
