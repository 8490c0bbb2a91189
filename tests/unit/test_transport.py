"""The transport's error classification: by exception type, errno, TLS alert and status."""

from __future__ import annotations

import errno
import importlib.util
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from gcd.engine import DockerEngine, Fresh
from gcd.errors import ConflictError, EngineError, EngineUnavailable, NotFoundError
from gcd.transport import SSH_HELP, HttpTransport, answer, reason


class _Wrapper(Exception):
    """As requests and urllib3 wrap the OSError that ended a connection."""


def _wrapped(inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise _Wrapper("Connection aborted.", e) from None
    except _Wrapper as outer:
        return outer


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (FileNotFoundError(errno.ENOENT, "x"), "no such socket (is dockerd running? set engine.url or $DOCKER_HOST)"),
        (PermissionError(errno.EACCES, "x"), "permission denied on the socket (is this user in the docker group?)"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "x"), "connection refused (is dockerd running?)"),
        (ConnectionResetError(errno.ECONNRESET, "x"), "the engine closed the connection"),
        (TimeoutError("timed out"), "no answer within 7s (engine.timeout)"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "cannot resolve the engine's host name (Name or service not known)"),
        (OSError(errno.EMFILE, "Too many open files"), "Too many open files"),
    ],
    ids=["enoent", "eacces", "refused", "reset", "timeout", "dns", "other-errno"],
)  # fmt: skip
def test_a_connection_failure_is_named_by_its_errno(error: OSError, said: str) -> None:
    assert reason(error, 7) == said
    assert reason(_wrapped(error), 7) == said  # however deep a client library wrapped it


def test_the_engines_tls_alert_about_gcds_certificate_is_named() -> None:
    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
    alert.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
    assert reason(alert, 7) == (
        "the engine refused gcd's client certificate (SSLV3_ALERT_BAD_CERTIFICATE): cert.pem "
        "and key.pem must be signed by the CA the engine trusts"
    )


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, b'{"message": "No such image: a:1"}', NotFoundError("No such image: a:1")),
        (409, b'{"message": "conflict"}', ConflictError("conflict")),
        (500, b"not json", EngineError("the Docker engine at u answered: not json")),
        (500, b"[1, 2]", EngineError("the Docker engine at u answered: [1, 2]")),
        (503, b"", EngineError("the Docker engine at u answered: HTTP 503")),
    ],
)
def test_a_status_is_the_error_it_means(status: int, body: bytes, error: Exception) -> None:
    with pytest.raises(type(error)) as caught:
        answer("u", status, body)
    assert str(caught.value) == str(error)
    assert answer("u", 200, b"{}") == b"{}"


def test_an_ssh_address_without_paramiko_says_what_to_do() -> None:
    if importlib.util.find_spec("paramiko") is not None:
        pytest.skip("paramiko is installed here")
    engine = DockerEngine("ssh://ci@build-host", 5)
    with pytest.raises(EngineUnavailable) as caught:
        engine.snapshot({})
    assert str(caught.value) == f"cannot reach the Docker engine at ssh://ci@build-host: {SSH_HELP}"


def gated_reads(n: int) -> tuple[Fresh[int], list[threading.Event], list[int]]:
    """A Fresh whose k-th read (answering k) ends when gate[k - 1] is set; `started` lists
    the reads begun."""
    gate = [threading.Event() for _ in range(n)]
    started: list[int] = []

    def read() -> int:
        started.append(len(started) + 1)
        gate[len(started) - 1].wait(5)
        return len(started)

    return Fresh(read), gate, started


def test_a_shared_read_is_never_older_than_its_caller() -> None:
    """Three workers need the image list; the second and third ask while the first's read
    is under way: they share the next read, never the one that began before they asked."""
    fresh, gate, started = gated_reads(2)
    results: dict[str, int] = {}

    def ask(name: str) -> None:
        results[name] = fresh.get()

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    while not started:
        time.sleep(0.001)
    late = [threading.Thread(target=ask, args=(n,)) for n in ("second", "third")]
    for thread in late:
        thread.start()
    time.sleep(0.05)  # both wait: read 1 began before they asked
    assert started == [1] and results == {}
    gate[0].set()
    first.join(5)
    while len(started) < 2:
        time.sleep(0.001)
    gate[1].set()
    for thread in late:
        thread.join(5)
    assert results == {"first": 1, "second": 2, "third": 2}
    assert started == [1, 2]  # three callers, two reads


def test_a_read_under_way_serves_callers_whose_since_it_began_after() -> None:
    """The first removals of a run give `since`: a read begun after it and under way when
    they ask serves them, and says when it began; one begun before it never does, nor a
    read that had ended when they asked."""
    fresh, gate, started = gated_reads(3)
    results: dict[str, tuple[int, int]] = {}

    def ask(name: str, since: int | None) -> None:
        results[name] = fresh.read(since)

    def wait_for(n: int) -> None:
        while len(started) < n:
            time.sleep(0.001)

    early = time.monotonic_ns()
    before = time.time_ns()
    first = threading.Thread(target=ask, args=("first", None))
    first.start()
    wait_for(1)
    late = time.monotonic_ns()  # after read 1 began
    joining = threading.Thread(target=ask, args=("joining", early))
    too_late = threading.Thread(target=ask, args=("too late", late))
    for thread in (joining, too_late):
        thread.start()
    time.sleep(0.05)
    gate[0].set()
    first.join(5)
    joining.join(5)
    assert results["joining"] == results["first"]
    assert results["first"][0] == 1 and results["first"][1] >= before
    wait_for(2)  # "too late" asked for a read begun after read 1 did
    gate[1].set()
    too_late.join(5)
    assert results["too late"][0] == 2
    # Read 2 has ended: a caller with `since` now starts read 3 rather than take it.
    after_all = threading.Thread(target=ask, args=("after", early))
    after_all.start()
    wait_for(3)
    gate[2].set()
    after_all.join(5)
    assert results["after"][0] == 3
    assert started == [1, 2, 3]


def test_a_shared_read_that_failed_fails_every_caller_that_shared_it() -> None:
    def read() -> int:
        raise EngineError("the list failed")

    fresh = Fresh(read)
    with pytest.raises(EngineError, match="the list failed"):
        fresh.get()


def test_a_request_the_engine_got_but_never_answered_is_marked_sent(tmp_path: Path) -> None:
    # A DELETE that reached a slow engine may be carried out after gcd stops waiting; one
    # that never left gcd cannot be. The executor words its report on that difference.
    path = tmp_path / "engine.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    transport = HttpTransport(f"unix://{path}", 0.3)
    try:
        with pytest.raises(EngineUnavailable) as caught:
            transport.request("DELETE", "/v1.41/images/sha256:ab?force=0&noprune=1")
        assert str(caught.value) == (
            f"cannot reach the Docker engine at unix://{path}: no answer within 0.3s "
            "(engine.timeout)"
        )
        assert caught.value.sent
        assert held and held[0].recv(64).startswith(b"DELETE /v1.41/images/sha256:ab")
    finally:
        transport.close()
        for s in (*held, server):
            s.close()
    path.unlink()
    with pytest.raises(EngineUnavailable) as caught:
        HttpTransport(f"unix://{path}", 0.3).request("DELETE", "/v1.41/images/sha256:ab")
    assert not caught.value.sent
