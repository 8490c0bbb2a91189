"""The state store on a real filesystem that fails: full, out of inodes, read-only.

Build hosts fill their disks exactly when GC matters. A store gcd cannot write must never
make it forget: images it saw arrive stay protected by min_age, the run says so in one
line and exits 1, and the next run recovers by itself once the disk has room again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker
import pytest

from tests.images import Layer, Spec, load
from tests.integration.conftest import Gcd, ids_now

POLICY = r"""
safety: {min_age: 1h, max_removal_fraction: 1.0, keep_one_per_repository: false}
rules:
  - name: ci
    match: {repository: app, tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 1
"""
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)  # built long ago, pulled onto this host just now


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_bytes(mount: Path) -> None:
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    for size in (65536, 1):  # to the last byte
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * size)
    os.close(fd)


def fill_inodes(mount: Path) -> None:
    n = 0
    with contextlib.suppress(OSError):
        while True:
            (mount / f"i{n}").touch()
            n += 1


def remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


def pulled_builds(client: docker.APIClient) -> list[str]:
    """Five builds of app, made long ago and loaded now: only first_seen says they are new."""
    return load(client, [Spec([f"app:{n}"], [Layer(f"app-{n}")], LONG_AGO) for n in range(1, 6)])


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ("size=512k", fill_bytes),
        ("size=8m,nr_inodes=64", fill_inodes),
        ("size=8m", remount_read_only),
    ],
    ids=["disk-full", "no-inodes", "read-only"],
)
def test_a_store_that_cannot_be_written_never_lets_young_images_go(
    gcd: Gcd,
    client: docker.APIClient,
    tmp_path: Path,
    options: str,
    fault: object,
) -> None:
    with tmpfs(tmp_path / "mnt", options) as mount:
        state = mount / "state"
        config = gcd.config(POLICY.replace("rules:", f"state_dir: {state}\nrules:"))
        config.write_text(config.read_text().replace(f"state_dir: {gcd.tmp / 'state'}\n", ""))
        first = gcd("run", "--config", str(config))  # the store exists before the pulls
        assert first.returncode == 0, first.stderr
        fault(mount)  # type: ignore[operator]
        ids = pulled_builds(client)
        result = gcd("run", "--config", str(config))
        assert result.returncode == 1, result.stderr
        assert set(ids) <= ids_now(client), "an image younger than min_age was removed"
        lines = [line for line in result.stderr.splitlines() if line.startswith("gcd: ")]
        assert len(lines) == 1
        assert lines[0].endswith(
            "; images it could not vouch for counted as first seen now "
            "(safety.min_age protected them)"
        )
        assert "Traceback" not in result.stderr
        assert not [p for p in os.listdir(state) if ".unreadable-" in p]
        # A dry run says the same, changes nothing and exits 0.
        dry = gcd("plan", "--config", str(config))
        assert dry.returncode == 0 and "Traceback" not in dry.stderr
        # Room again: the next run records what it sees and keeps protecting the new images.
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        for name in os.listdir(mount):
            if name != "state":
                os.unlink(mount / name)
        again = gcd("run", "--config", str(config))
        assert again.returncode == 0, again.stderr
        assert set(ids) <= ids_now(client)
        assert "gcd: " not in again.stderr
