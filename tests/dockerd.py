"""A private, throwaway dockerd for tests and the demo: own data root, socket and namespace.

No container networking (bridge none, no iptables): the engine sends nothing beyond loopback.
Needs root, dockerd (Debian: docker.io) and, for runnable images, busybox-static.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType

import docker


class PrivateEngine:
    def __init__(self, root: str | None = None) -> None:
        self.root = root or tempfile.mkdtemp(prefix="gcd-dockerd-")
        self.socket = os.path.join(self.root, "docker.sock")
        self.url = f"unix://{self.socket}"
        self.log_path = os.path.join(self.root, "dockerd.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        if shutil.which("dockerd") is None:
            raise RuntimeError("dockerd not found: apt-get install docker.io busybox-static")
        # containerd accepts [A-Za-z0-9] runs joined by single . _ or -; mkdtemp's random
        # suffix may hold "_" next to "-" or at the end, so the name is derived instead.
        namespace = "gcd-test-" + hashlib.sha256(self.root.encode()).hexdigest()[:16]
        command = [
            "dockerd",
            f"--data-root={self.root}/data",
            f"--exec-root={self.root}/exec",
            f"--pidfile={self.root}/docker.pid",
            f"--host={self.url}",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip6tables=false",
            f"--containerd-namespace={namespace}",
            f"--containerd-plugins-namespace={namespace}-plugins",
        ]
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


if __name__ == "__main__":  # manual use: python -m tests.dockerd, Ctrl-C stops it
    with PrivateEngine() as engine:
        print(f"export DOCKER_HOST={engine.url}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            sys.exit(0)
