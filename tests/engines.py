"""The engines of the matrix (docs/engines.md), each started privately like tests/dockerd.py.

`host` is the machine's own dockerd. The others run inside a Debian 13 root made here with
debootstrap from the host's apt mirror (nothing is installed on the host): Debian 13's
docker.io (Docker 26) on overlay2 and on the containerd image store, sid's docker.io
(Docker 28) unpacked into a folder of that root and put first on PATH, and Debian 13's
Podman serving the Docker API. Tests reach every engine through a socket under the root.

`GCD_TEST_ENGINE=<name>` picks the engine tests/dockerd.PrivateEngine starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(os.environ.get("GCD_MATRIX_ROOT", "/var/tmp/gcd-matrix/trixie"))
SUITE = "trixie"
# What the root holds besides the base system; sid's engine goes to SID_DIR, unpacked.
PACKAGES = (
    "docker.io",
    "podman",
    "runc",
    "busybox-static",
    "iptables",
    "procps",
    "python3",
)
SID_PACKAGES = ("docker.io", "containerd", "runc")
SID_DIR = "/opt/sid"
READY = ".gcd-matrix-ready"


@dataclass(frozen=True)
class Kind:
    """One engine of the matrix."""

    name: str
    engine: str  # docker | podman
    in_root: bool = True
    containerd_store: bool = False
    sid: bool = False  # sid's docker.io, first on PATH

    @property
    def path(self) -> str:
        base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return f"{SID_DIR}/usr/sbin:{SID_DIR}/usr/bin:{base}" if self.sid else base


KINDS = {
    k.name: k
    for k in (
        Kind("host", "docker", in_root=False),
        Kind("docker26", "docker"),
        Kind("docker26-containerd", "docker", containerd_store=True),
        Kind("docker28-containerd", "docker", containerd_store=True, sid=True),
        Kind("podman", "podman"),
        # Debian 12's Podman 4.3, on the host itself (tests/matrix installs it there).
        Kind("podman4", "podman", in_root=False),
    )
}
# Podman on a machine without CAP_SYS_RESOURCE (the default ulimits cannot be raised), with
# runc where crun refuses hybrid cgroups, and no systemd to manage cgroups or keep a journal.
PODMAN_CONF = (
    "[containers]\n"
    'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
    "[engine]\n"
    'runtime = "runc"\n'
    'cgroup_manager = "cgroupfs"\n'
    'events_logger = "file"\n'
)
# Where a Podman of the matrix logs its events: `file` (the default here), or `journald`,
# Podman's default under systemd, where a journal is running (GCD_TEST_PODMAN_EVENTS).
JOURNAL_SOCKET = "run/systemd/journal/socket"


def podman_conf(root: str = "/") -> str:
    """containers.conf for a Podman of the matrix whose `/` is `root` (its events logger
    from GCD_TEST_PODMAN_EVENTS)."""
    logger = os.environ.get("GCD_TEST_PODMAN_EVENTS", "file")
    if logger not in ("file", "journald"):
        raise RuntimeError(f"GCD_TEST_PODMAN_EVENTS={logger}: expected file or journald")
    if logger == "journald" and not os.path.exists(os.path.join(root, JOURNAL_SOCKET)):
        raise RuntimeError(
            f"GCD_TEST_PODMAN_EVENTS=journald: no journal at {os.path.join(root, JOURNAL_SOCKET)}"
            " (start systemd-journald there first: docs/engines.md)"
        )
    return PODMAN_CONF.replace('events_logger = "file"', f'events_logger = "{logger}"')


def ensure_host_podman() -> None:
    """Debian 12's Podman 4.3 on the host, for the `podman4` row."""
    if shutil.which("podman") is None:
        _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "podman", "runc",
             stdout=subprocess.DEVNULL)  # fmt: skip


def chosen() -> Kind:
    name = os.environ.get("GCD_TEST_ENGINE", "host")
    if name not in KINDS:
        raise RuntimeError(f"GCD_TEST_ENGINE={name}: expected one of {', '.join(KINDS)}")
    return KINDS[name]


def _run(*command: str, **kwargs: object) -> None:
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def _mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def mount(root: Path = ROOT) -> None:
    """What a root needs to run engines: it must be a mount point itself (else dockerd
    fails with `remount /, flags: 0x84000: invalid argument`), with /proc, /sys (cgroups),
    /dev and a /run of its own."""
    if not _mounted(root):
        _run("mount", "--bind", str(root), str(root))
    for target, command in (
        ("proc", ["mount", "-t", "proc", "proc"]),
        ("sys", ["mount", "--rbind", "/sys"]),
        ("dev", ["mount", "--bind", "/dev"]),
        ("dev/pts", ["mount", "-t", "devpts", "devpts"]),
        ("dev/shm", ["mount", "-t", "tmpfs", "tmpfs"]),
        ("run", ["mount", "-t", "tmpfs", "tmpfs"]),
    ):
        path = root / target
        path.mkdir(parents=True, exist_ok=True)
        if not _mounted(path):
            _run(*command, str(path))


def unmount(root: Path = ROOT) -> None:
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(root))]
    for path in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", path], check=False, capture_output=True)


def chroot(*command: str, root: Path = ROOT, path: str | None = None) -> list[str]:
    env = ["env", f"PATH={path or KINDS['docker26'].path}", "DEBIAN_FRONTEND=noninteractive"]
    return ["chroot", str(root), *env, *command]


def ensure(root: Path = ROOT) -> None:
    """Make the root once (about 3 minutes; kept under /var/tmp for the next run). One
    process at a time: two test runs on two engines of the root (a race suite on each)
    once ran its `update-ca-certificates` together, and one failed."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "ensure.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _ensure(root)


def _ensure(root: Path) -> None:
    if (root / READY).exists():
        mount(root)
        _trust_as_the_host(root)
        return
    if not (root / "usr/bin/apt-get").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        mirror = _mirror()
        _run(
            "debootstrap",
            "--variant=minbase",
            "--include=ca-certificates",
            SUITE,
            str(root),
            mirror,
            stdout=subprocess.DEVNULL,
        )
    mount(root)
    _trust_as_the_host(root)
    # Packages install without starting anything.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    sources = root / "etc/apt/sources.list.d/sid.sources"
    sources.write_text(
        f"Types: deb\nURIs: {_mirror()}\nSuites: sid\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        # A mirror may serve a dated snapshot, whose sid Release has expired.
        "Check-Valid-Until: no\n"
    )
    (root / "etc/apt/preferences.d/sid").write_text(
        "Package: *\nPin: release n=sid\nPin-Priority: -10\n"
    )
    _run(*chroot("apt-get", "update", "-qq", root=root))
    _run(
        *chroot(
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            *PACKAGES,
            root=root,
        ),
        stdout=subprocess.DEVNULL,
    )
    # sid's engine, unpacked beside Debian 13's: never installed, first on PATH when chosen.
    debs = root / "var/tmp/sid-debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(
        *chroot(
            "sh",
            "-c",
            "cd /var/tmp/sid-debs && apt-get download -qq "
            + " ".join(f"{p}/sid" for p in SID_PACKAGES),
            root=root,
        )
    )
    for deb in debs.glob("*.deb"):
        _run("dpkg-deb", "-x", str(deb), str(root / SID_DIR.lstrip("/")))
    conf = root / "etc/containers/containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(PODMAN_CONF)
    (root / READY).write_text(json.dumps(versions(root)) + "\n")


def _trust_as_the_host(root: Path) -> None:
    """The host's own certificate authorities and pip settings, so that the root reaches
    what the host reaches (a machine behind an inspecting proxy trusts the proxy's CA)."""
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir() and any(local.iterdir()):
        target = root / "usr/local/share/ca-certificates"
        target.mkdir(parents=True, exist_ok=True)
        for cert in local.iterdir():
            shutil.copy(cert, target / cert.name)
        if (root / "usr/sbin/update-ca-certificates").exists():
            _run(*chroot("update-ca-certificates", root=root), stdout=subprocess.DEVNULL)
    confs = [Path("/etc/pip.conf")]
    if Path("/etc/xdg/pip").is_dir():
        confs += Path("/etc/xdg/pip").iterdir()  # pip.conf and the files it names
    for conf in confs:
        if conf.is_file():
            (root / str(conf).lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(conf, root / str(conf).lstrip("/"))


def _mirror() -> str:
    """The host's Debian mirror, from its apt sources."""
    for source in Path("/etc/apt/sources.list.d").glob("*.sources"):
        for line in source.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


def versions(root: Path = ROOT) -> dict[str, str]:
    """What each engine of the root says of its version."""
    found = {}
    for name, command, path in (
        ("docker26", ["dockerd", "--version"], KINDS["docker26"].path),
        ("docker28", ["dockerd", "--version"], KINDS["docker28-containerd"].path),
        ("podman", ["podman", "--version"], KINDS["podman"].path),
    ):
        done = subprocess.run(
            chroot(*command, root=root, path=path), capture_output=True, text=True
        )
        found[name] = done.stdout.strip() or done.stderr.strip()
    return found


if __name__ == "__main__":  # python -m tests.engines: make and mount the root, print versions
    ensure()
    print(json.dumps(versions(), indent=2))
