"""A private, throwaway dockerd for tests and the demo: own data root, socket and namespace.

No container networking (bridge none, no iptables): the engine sends nothing beyond loopback.
Needs root, dockerd (Debian: docker.io) and, for runnable images, busybox-static.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType

import docker

from tests import engines


class PrivateEngine:
    """The engine GCD_TEST_ENGINE names (tests/engines.py; the host's dockerd by default)."""

    def __init__(
        self, root: str | None = None, kind: engines.Kind | None = None, tls: bool = False
    ) -> None:
        self.kind = kind or engines.chosen()
        if self.kind.in_root:
            engines.ensure()
            (engines.ROOT / "var/tmp").mkdir(parents=True, exist_ok=True)
        base = str(engines.ROOT / "var/tmp") if self.kind.in_root else None
        self.root = root or tempfile.mkdtemp(prefix="gcd-dockerd-", dir=base)
        # The engine's own view of its folder: inside the Debian 13 root, where it runs.
        self.inner = (
            "/" + os.path.relpath(self.root, engines.ROOT) if self.kind.in_root else self.root
        )
        self.socket = os.path.join(self.root, "docker.sock")
        self.url = f"unix://{self.socket}"
        self.log_path = os.path.join(self.root, "dockerd.log")
        self.process: subprocess.Popen[bytes] | None = None
        # tls: dockerd also listens on loopback TCP with --tlsverify, certificates made here
        # (ca.pem, cert.pem, key.pem for clients in tls_dir, as DOCKER_CERT_PATH wants).
        self.tls_dir: str | None = None
        self.tcp_url: str | None = None
        if tls and self.kind.engine == "docker":
            self.tls_dir = os.path.join(self.root, "tls")
            make_certificates(self.tls_dir)
            self.tcp_url = f"tcp://127.0.0.1:{_free_port()}"

    def _command(self) -> list[str]:
        inner, url = self.inner, f"unix://{self.inner}/docker.sock"
        if self.kind.engine == "podman":
            command = [
                "podman",
                f"--root={inner}/storage",
                f"--runroot={inner}/run",
                f"--tmpdir={inner}/tmp",
                "system",
                "service",
                "--time=0",
                url,
            ]
        else:
            # containerd accepts [A-Za-z0-9] runs joined by single . _ or -; mkdtemp's random
            # suffix may hold "_" next to "-" or at the end, so the name is derived instead.
            namespace = "gcd-test-" + hashlib.sha256(self.root.encode()).hexdigest()[:16]
            features = {"containerd-snapshotter": self.kind.containerd_store}
            with open(os.path.join(self.root, "daemon.json"), "w") as f:
                json.dump({"features": features}, f)
            command = [
                "dockerd",
                f"--config-file={inner}/daemon.json",
                f"--data-root={inner}/data",
                f"--exec-root={inner}/exec",
                f"--pidfile={inner}/docker.pid",
                f"--host={url}",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip6tables=false",
                f"--containerd-namespace={namespace}",
                f"--containerd-plugins-namespace={namespace}-plugins",
            ]
            if self.tcp_url is not None:
                tls = f"{inner}/tls"
                command += [
                    f"--host={self.tcp_url}",
                    "--tlsverify",
                    f"--tlscacert={tls}/ca.pem",
                    f"--tlscert={tls}/server-cert.pem",
                    f"--tlskey={tls}/server-key.pem",
                ]
        if self.kind.engine == "podman":
            # Its settings from a file of its own (the events logger may differ by run).
            with open(os.path.join(self.root, "containers.conf"), "w") as f:
                f.write(engines.podman_conf(str(engines.ROOT) if self.kind.in_root else "/"))
            command = ["env", f"CONTAINERS_CONF={self.inner}/containers.conf", *command]
        if self.kind.in_root:
            return engines.chroot(*command, path=self.kind.path)
        return command

    def start(self, timeout: float = 60) -> None:
        if self.kind.name == "podman4":
            engines.ensure_host_podman()
        elif not self.kind.in_root and shutil.which("dockerd") is None:
            raise RuntimeError("dockerd not found: apt-get install docker.io busybox-static")
        command = self._command()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if os.path.exists(self.socket) and self._ping():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout}s:\n{self.log_tail()}")

    def _ping(self) -> bool:
        try:
            client = docker.APIClient(base_url=self.url, version="auto", timeout=5)
            client.ping()
            client.close()
            return True
        except Exception:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """Stop dockerd (it stops its containers and its own containerd)."""
        if self.process is None:
            return
        if self.kind.engine == "podman" and self.process.poll() is None:
            # Podman's containers outlive its API service: remove them first.
            podman = [
                "podman",
                f"--root={self.inner}/storage",
                f"--runroot={self.inner}/run",
                "rm",
                "--all",
                "--force",
                "--time=0",
            ]
            podman = ["env", f"CONTAINERS_CONF={self.inner}/containers.conf", *podman]
            if self.kind.in_root:
                podman = engines.chroot(*podman)
            subprocess.run(podman, capture_output=True, check=False)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL dockerd, as the OOM killer would; its containerd dies with it. The next
        start() makes a new containerd: the old one's pid file is removed, since here its
        zombie may never be reaped (PID 1 of a sandbox need not reap) and would pass for a
        live containerd."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "exec", "containerd", "containerd.pid"))

    def remove(self) -> None:
        """Delete the data root; unmount anything a crashed engine left mounted first."""
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if self.root in line]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateEngine:
        self.start()
        return self

    def cleanup(self) -> None:
        """Stop and remove, uninterrupted: a SIGTERM or Ctrl-C arriving meanwhile is held
        back until the engine is gone, instead of leaving it running."""
        held = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            self.stop()
            self.remove()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certificates(folder: str, names: str = "IP:127.0.0.1,DNS:localhost") -> None:
    """A CA of its own, a server certificate for `names` and a client certificate, as
    `dockerd --tlsverify` and DOCKER_CERT_PATH want them (openssl; EC keys: quick)."""
    os.makedirs(folder, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    # Key usage on the CA: Python 3.13's strict verification refuses a CA without it.
    openssl("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "3",
            "-subj", "/CN=gcd test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for name, subject, extensions in (
        ("server", "/CN=localhost", f"subjectAltName={names}\nextendedKeyUsage=serverAuth"),
        ("client", "/CN=gcd", "extendedKeyUsage=clientAuth"),
    ):
        with open(os.path.join(folder, f"{name}.ext"), "w") as f:
            # Key identifiers: Python 3.13's strict verification wants them.
            f.write(f"{extensions}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        openssl("req", *key, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "3",
                "-extfile", f"{name}.ext")  # fmt: skip
    shutil.copy(os.path.join(folder, "client-cert.pem"), os.path.join(folder, "cert.pem"))
    shutil.copy(os.path.join(folder, "client-key.pem"), os.path.join(folder, "key.pem"))


@contextlib.contextmanager
def engine_on_a_small_filesystem(
    size: str = "400M", inodes: int | None = None
) -> Iterator[PrivateEngine]:
    """A private engine whose folder (socket, data root, storage) is an ext4 loop mount, with
    `inodes` inodes if given (mkfs.ext4 -N)."""
    kind = engines.chosen()
    base = None
    if kind.in_root:
        engines.ensure()
        base = str(engines.ROOT / "var/tmp")
    root = tempfile.mkdtemp(prefix="gcd-pressure-", dir=base)
    image = f"{root}.ext4"
    subprocess.run(["truncate", "-s", size, image], check=True)
    count = ["-N", str(inodes)] if inodes else []
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", *count, image], check=True)
    subprocess.run(["mount", "-o", "loop", image, root], check=True)
    engine = PrivateEngine(root=root, kind=kind)
    try:
        engine.start()
        yield engine
    finally:
        engine.cleanup()  # unmounts the loop mount too
        with contextlib.suppress(OSError):
            os.unlink(image)


if __name__ == "__main__":  # manual use: python -m tests.dockerd, Ctrl-C stops it
    with PrivateEngine() as engine:
        print(f"export DOCKER_HOST={engine.url}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            sys.exit(0)
