"""A fault-injection proxy on a Unix socket, between gcd and a private engine.

Each request is read whole, matched against rules (method and a regular expression on the
path), and then delayed, held, answered with an error, reset, truncated or left hanging,
or forwarded as it is. Every request goes upstream on a connection of its own and every
answer closes the client's connection (`Connection: close`), so one request never waits on
another and a fault never leaks into the next request.

    proxy = FaultProxy(engine.socket, tmp / "proxy.sock")
    proxy.rule("DELETE", r"/images/", Delay(0.0, 0.03))      # widen gcd's windows
    proxy.rule("GET", r"/images/json", Status(500), times=1)  # one 500, then normal
    with proxy: ...                                          # gcd at proxy.url
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


@dataclass
class Delay:
    """Forward after a random pause in [low, high] seconds."""

    low: float
    high: float


@dataclass
class Hold:
    """Forward once `release` is set (or after `timeout`): a window held open."""

    release: threading.Event = field(default_factory=threading.Event)
    timeout: float = 30.0
    arrived: threading.Event = field(default_factory=threading.Event)


@dataclass
class Status:
    """Answer with this status and a JSON message; nothing reaches the engine."""

    code: int
    message: str = "injected by the fault proxy"


@dataclass
class Reset:
    """Close the connection with a TCP-style reset; `after` forwards the request first."""

    after: bool = False


@dataclass
class Truncate:
    """Forward, then cut the answer's body to `keep` bytes (a broken JSON document)."""

    keep: int = 10


@dataclass
class Hang:
    """Never answer (until the proxy stops)."""


@dataclass
class Call:
    """Run `fn(method, path)` in the request's thread, then forward: a test's hook into
    the exact moment a request passes."""

    fn: Callable[[str, str], None]


Action = Delay | Hold | Status | Reset | Truncate | Hang | Call


@dataclass
class _Rule:
    method: str
    path: re.Pattern[str]
    action: Action
    times: int | None  # None: every match
    probability: float


class FaultProxy:
    def __init__(self, upstream: str | Path, listen: str | Path, seed: int = 0) -> None:
        self.upstream = str(upstream)
        self.listen = str(listen)
        self.url = f"unix://{self.listen}"
        self.random = random.Random(seed)
        self.requests: list[tuple[str, str]] = []
        # Forwarded requests: (method, path, sent upstream, answered), nanoseconds.
        self.forwarded: list[tuple[str, str, int, int]] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._hung: list[socket.socket] = []

    def rule(
        self,
        method: str,
        path: str,
        action: Action,
        times: int | None = None,
        probability: float = 1.0,
    ) -> None:
        """Apply `action` to requests whose method is `method` ("*" for any) and whose path
        matches `path` (re.search); at most `times` times, each with `probability`."""
        with self._lock:
            self._rules.append(_Rule(method, re.compile(path), action, times, probability))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.listen).unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.listen)
        server.listen(64)
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fault-proxy")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._server is not None:
            self._server.close()
        for conn in self._hung:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    # --- one request ----------------------------------------------------------------------

    def _match(self, method: str, path: str) -> Action | None:
        with self._lock:
            for rule in self._rules:
                if rule.method not in ("*", method) or not rule.path.search(path):
                    continue
                if rule.times is not None and rule.times <= 0:
                    continue
                if self.random.random() >= rule.probability:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                return rule.action
        return None

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn)
            if request is None:
                conn.close()
                return
            head, body = request
            method, path = head.split(b" ", 2)[:2]
            m, p = method.decode(), path.decode(errors="replace")
            with self._lock:
                self.requests.append((m, p))
            action = self._match(m, p)
            if isinstance(action, Delay):
                time.sleep(self.random.uniform(action.low, action.high))
            elif isinstance(action, Hold):
                action.arrived.set()
                action.release.wait(action.timeout)
            elif isinstance(action, Call):
                action.fn(m, p)
            elif isinstance(action, Status):
                payload = json.dumps({"message": action.message}).encode()
                conn.sendall(_response(action.code, payload))
                conn.close()
                return
            elif isinstance(action, Reset) and not action.after:
                _reset(conn)
                return
            elif isinstance(action, Hang):
                with self._lock:
                    self._hung.append(conn)
                return
            sent = time.time_ns()
            answer = self._forward(head, body)
            with self._lock:
                self.forwarded.append((m, p, sent, time.time_ns()))
            if isinstance(action, Reset):
                _reset(conn)
                return
            if isinstance(action, Truncate):
                answer = _truncated(answer, action.keep)
            conn.sendall(answer)
            conn.close()
        except OSError:
            with contextlib.suppress(OSError):
                conn.close()

    def _forward(self, head: bytes, body: bytes) -> bytes:
        lines = [
            line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")
        ]
        lines.append(b"Connection: close")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(120)
        try:
            upstream.connect(self.upstream)
            upstream.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            chunks = []
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            upstream.close()
        answer = b"".join(chunks)
        # Tell the client this connection ends here (it opens a new one for the next).
        status_head, _, rest = answer.partition(b"\r\n\r\n")
        kept = [
            line
            for line in status_head.split(b"\r\n")
            if not line.lower().startswith(b"connection:")
        ]
        return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n" + rest


def _read_request(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 request: the head (without its blank line) and the whole body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return head, body


def _response(code: int, payload: bytes) -> bytes:
    return (
        f"HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


def _truncated(answer: bytes, keep: int) -> bytes:
    """The answer with its body cut short, framed as if complete."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    chunked = any(line.lower() == b"transfer-encoding: chunked" for line in lines)
    if chunked:
        body = _dechunk(body)
    body = body[:keep]
    kept = [
        line
        for line in lines
        if not line.lower().startswith((b"content-length:", b"transfer-encoding:"))
    ]
    kept.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def _dechunk(body: bytes) -> bytes:
    out, at = b"", 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return out
        size = int(body[at:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return out
        out += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


def _reset(conn: socket.socket) -> None:
    """Close at once, unanswered (SO_LINGER 0: no orderly shutdown)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
