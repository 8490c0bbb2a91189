"""What the daemon tells systemd: one assignment a line, and never a wait on a full queue."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from sdnotify import SystemdNotifier

from gcd.config import Config
from gcd.daemon import NOTIFY_TIMEOUT, Daemon


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def notify(self, state: str) -> None:
        self.sent.append(state)


def test_engine_text_cannot_start_a_line_of_its_own() -> None:
    recorder = Recorder()
    daemon = Daemon(Config(), None, notifier=recorder, environ={})
    daemon._notify("STATUS=last cycle failed: boom\nMAINPID=1\x07", "WATCHDOG=1")
    assert recorder.sent == ["STATUS=last cycle failed: boom MAINPID=1 \nWATCHDOG=1"]


def test_a_notify_socket_nobody_reads_never_holds_the_daemon_up(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(path)  # bound, never read: its queue fills up
    os.environ["NOTIFY_SOCKET"] = path
    try:
        daemon = Daemon(Config(), None, notifier=SystemdNotifier(), environ={})
    finally:
        del os.environ["NOTIFY_SOCKET"]
    started = time.monotonic()

    def chatter() -> None:
        for n in range(50):
            daemon._notify(f"STATUS=message {n}")

    # Once the queue is full each message waits at most NOTIFY_TIMEOUT, then is dropped.
    # (A blocking send would never return: the thread is left behind, daemonic.)
    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    thread.join(50 * NOTIFY_TIMEOUT + 5)
    assert not thread.is_alive(), "a notification blocked on a full notify socket"
    assert time.monotonic() - started < 50 * NOTIFY_TIMEOUT + 5
    systemd.close()
