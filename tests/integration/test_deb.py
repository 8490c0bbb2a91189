"""The Debian package (tests/deb/build), installed into a clean Debian root of this machine's
release (debootstrap minbase, with only the package's dependencies and systemd): it installs, gcd runs, the example
configuration passes, the units verify and their documentation exists, and nothing started
or was enabled by itself."""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gcd import __version__
from tests import engines

ROOT = Path(__file__).resolve().parents[2]
# A minbase root per release, made once (about 3 minutes) and copied for each test; with
# what the package depends on (as apt would install it) and systemd for systemd-analyze.
CACHE = Path("/var/tmp/gcd-deb-root")
PACKAGES = ("python3", "procps", "systemd")


def codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise AssertionError("/etc/os-release names no release")


def clean_root(where: Path) -> Path:
    """A fresh copy of a minbase Debian root of this release with PACKAGES."""
    release = codename()
    archive = CACHE / f"{release}-{'-'.join(PACKAGES)}.tar"
    if not archive.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build = CACHE / f"{release}.build"
        shutil.rmtree(build, ignore_errors=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                release,
                str(build),
                engines._mirror(),
            ],
            check=True,
            capture_output=True,
        )
        with tarfile.open(f"{archive}.part", "w") as tar:
            tar.add(build, arcname=".")
        os.rename(f"{archive}.part", archive)
        shutil.rmtree(build)
    root = where / "root"
    root.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="fully_trusted")
    return root


@contextlib.contextmanager
def mounted_proc(root: Path) -> Iterator[None]:
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def inside(root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    return subprocess.run(
        ["chroot", str(root), *command], capture_output=True, text=True, env=env, check=False
    )


def started_from(process: Path, root: Path) -> bool:
    """Whether a process runs the package's gcd (a postinst that started the daemon)."""
    with contextlib.suppress(OSError):
        return b"/opt/gcd/bin/python" in (process / "cmdline").read_bytes()
    return False


def test_the_debian_package_installs_and_verifies_in_a_clean_root(tmp_path: Path) -> None:
    if engines.chosen().name != "host":
        pytest.skip("the package does not depend on the engine: tested on the host's row")
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing: tests/setup.sh installs it")
    built = subprocess.run(
        [str(ROOT / "tests/deb/build"), str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    deb = Path(built.stdout.strip().splitlines()[-1])
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.name == f"gcd_{__version__}_{arch}.deb"

    root = clean_root(tmp_path)
    shutil.copy(deb, root / "tmp" / deb.name)
    with mounted_proc(root):
        installed = inside(root, "dpkg", "-i", f"/tmp/{deb.name}")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "systemctl enable --now gcd" in installed.stderr  # what to do next, said

        version = inside(root, "gcd", "--version")
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"gcd {__version__}"
        checked = inside(root, "gcd", "check-config", "/etc/gcd/config.yaml")
        assert (checked.returncode, checked.stdout.strip()) == (0, "ok"), checked.stderr
        schema = inside(root, "gcd", "schema")
        assert schema.returncode == 0 and '"$schema"' in schema.stdout

        units = root / "usr/lib/systemd/system"
        for unit in ("gcd.service", "gcd-once.service", "gcd.timer"):
            # --man=no: a minbase root has no man; the pages are checked below.
            verified = inside(
                root, "systemd-analyze", "verify", "--man=no", f"/usr/lib/systemd/system/{unit}"
            )
            assert verified.returncode == 0, unit + verified.stdout + verified.stderr
            parser = configparser.ConfigParser(strict=False, interpolation=None)
            parser.read(units / unit)
            for page in parser["Unit"]["Documentation"].split():
                if page.startswith("file://"):
                    assert (root / page.removeprefix("file:///")).is_file(), page
                else:
                    man = re.fullmatch(r"man:(\S+)\((\d)\)", page)
                    assert man is not None, page
                    name, section = man.groups()
                    assert (root / f"usr/share/man/man{section}/{name}.{section}.gz").is_file()
            for line in (units / unit).read_text().splitlines():
                if line.startswith("ExecStart="):
                    assert line.split("=", 1)[1].split()[0] == "/usr/bin/gcd"

        # A conffile, the docs an operator needs, nothing started or enabled.
        conffiles = inside(root, "dpkg-query", "-W", "-f=${Conffiles}", "gcd").stdout
        assert "/etc/gcd/config.yaml" in conffiles
        for doc in (
            "operations.md",
            "configuration.md",
            "metrics.md",
            "alerts.yml",
            "grafana-dashboard.json",
            "config.schema.json",
        ):
            assert (root / "usr/share/doc/gcd" / doc).is_file(), doc
        assert not list((root / "etc/systemd/system").glob("*.wants/gcd*"))
        assert not [p for p in Path("/proc").glob("[0-9]*") if started_from(p, root)]

        removed = inside(root, "dpkg", "--purge", "gcd")
        assert removed.returncode == 0, removed.stderr
        assert not (root / "opt/gcd").exists()
