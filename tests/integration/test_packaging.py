"""Shipped files checked by the tools that consume them: systemd units, alert rules."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import docker
import pytest

from gcd.config import DEFAULT_PATH, EngineConfig
from gcd.errors import ConfigError
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load
from tests.integration.conftest import WHEN, Gcd, podman, tags_now
from tests.integration.test_daemon import promtool

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("gcd.service", "gcd-once.service", "gcd.timer")
NOBODY = 65534  # a user of no files, as DynamicUser's is


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root for `systemd-analyze verify --root`: the host's own units, the
    commands our units run, and our units, so nothing is installed on the host."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian: systemd)")
    root = tmp_path_factory.mktemp("root")
    # A merged-/usr root, as Debian's are: systemd 257 (Debian 13) looks for units in
    # usr/lib only, 252 (Debian 12) finds them through the lib symlink.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy("/usr/bin/kill", root / "usr/bin/kill")
    for link in ("lib", "bin", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "usr/sbin").mkdir()
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/gcd").write_text("#!/bin/sh\n")
    (root / "usr/local/bin/gcd").chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(ROOT / "systemd" / unit, root / "etc/systemd/system" / unit)
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_units_pass_systemd_analyze_verify(unit_root: Path, unit: str) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={unit_root}",
            "--man=no",
            str(unit_root / "etc/systemd/system" / unit),
        ],
        capture_output=True,
        text=True,
    )
    # verify reports unknown keys and bad values on stderr but may still exit 0.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(("unit", "limit"), [("gcd.service", 1.5), ("gcd-once.service", 1.5)])
def test_service_exposure_is_low(unit: str, limit: float) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--no-pager",
            str(ROOT / "systemd" / unit),
        ],
        capture_output=True,
        text=True,
    )
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= limit


def _unit(path: Path) -> dict[str, str]:
    """A unit's [Service] settings, the last of each key (as systemd reads them)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return dict(parser["Service"])


def _span(text: str) -> timedelta:
    """A systemd time span as units write them here: `90`, `30s`, `5min`."""
    number, unit = re.fullmatch(r"(\d+)\s*(s|min|h)?", text).groups()  # type: ignore[union-attr]
    return timedelta(seconds=int(number) * {None: 1, "s": 1, "min": 60, "h": 3600}[unit])


def test_service_settings_fit_what_the_daemon_does() -> None:
    service = _unit(ROOT / "systemd/gcd.service")
    # The daemon speaks sd_notify from its main process, and pings the watchdog while a
    # cycle makes progress: one engine call may take the whole engine.timeout.
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    timeout = EngineConfig().timeout
    assert _span(service["WatchdogSec"]) >= 2 * timeout
    # SIGTERM takes effect within one engine call: systemd must wait longer than that.
    assert _span(service["TimeoutStopSec"]) > timeout
    # A bad configuration (exit 2) is not restarted into a loop; a crash is.
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(ConfigError.exit_code)
    # Reload is SIGHUP, which the daemon takes as "read the file again".
    assert service["ExecReload"].split() == ["/bin/kill", "-HUP", "$MAINPID"]
    assert service["ExecStart"].split()[1:] == ["daemon", "--config", DEFAULT_PATH]
    # The engine's socket is the docker group's; the state store is StateDirectory's.
    assert "docker" in service["SupplementaryGroups"].split()
    assert service["StateDirectory"] == "gcd"


def test_example_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ROOT / "docs/alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_the_service_s_user_watches_the_data_root_with_the_unit_s_one_capability(
    gcd: Gcd, client: docker.APIClient, dockerd: PrivateEngine, tmp_path: Path
) -> None:
    """gcd as gcd.service runs it: a user of its own, in the group of the engine's socket,
    with the unit's capabilities (setpriv sets them as systemd does from those lines). The
    data root is not this user's to read (/var/lib/docker is 0710 root:root; the private
    engine's folder 0700): the capability lets it measure the disk there (`disk.path:
    auto`) and, on Docker 28.2's containerd store, read the manifests (gcd.content)."""
    if dockerd.kind.in_root or podman(client):
        pytest.skip("the data root is inside the Debian 13 root, or Podman tells none")
    service = _unit(ROOT / "systemd/gcd.service")
    capabilities = service["AmbientCapabilities"].split()
    assert capabilities == service["CapabilityBoundingSet"].split() == ["CAP_DAC_READ_SEARCH"]
    assert _unit(ROOT / "systemd/gcd-once.service")["AmbientCapabilities"].split() == capabilities
    load(client, [Spec([f"svc:{n}"], [Layer(f"svc-{n}")], WHEN, note=str(n)) for n in (1, 2)])
    state = tmp_path / "service-state"  # StateDirectory: the user's own
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    config = gcd.config(
        "safety: {min_age: 0s, max_removal_fraction: 1.0}\n"
        "rules:\n  - {name: svc, match: {repository: svc}, keep_last: 1}\n"
    )
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(state)))
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in capabilities)
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            f"--groups={os.stat(dockerd.socket).st_gid}",
            f"--inh-caps={caps}",
            f"--ambient-caps={caps}",
            sys.executable,
            "-m",
            "gcd",
            "run",
            "--config",
            str(config),
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "not watched" not in result.stderr and "not readable" not in result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["freed_measured_bytes"] is not None
    assert sorted(tags_now(client)) == ["svc:2"]
