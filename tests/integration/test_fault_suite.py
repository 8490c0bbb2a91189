"""The fault suite: the engine dies, freezes, restarts, errs or hangs in the middle of a run.

For `gcd run` and for the daemon: no traceback, the documented exit code (an engine lost
mid-run is exit 3), nothing wrong removed, a state store the next run uses as it is, and a
daemon that recovers by itself. gcd talks to a private engine of this module through the
fault proxy (tests/proxy.py), which holds a request at the moment a fault is injected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker
import pytest

from gcd.engine import LIST_ATTEMPTS
from gcd.state import Store
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load
from tests.integration import conftest
from tests.integration.test_daemon import Daemon, wait_for
from tests.proxy import Call, FaultProxy, Hang, Hold, Reset, Status, Truncate

WHEN = datetime(2026, 3, 1, tzinfo=UTC)
# min_age 0s: the containerd store stamps a tag time on every image it loads, so with the
# default 1h the fixtures would all be young there.
POLICY = r"""
safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false}
rules:
  - name: ci
    match: {repository: app, tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 2
"""
BUILDS = 8  # app:1 .. app:8; app:7 and app:8 are kept


@pytest.fixture(scope="module")
def engine() -> Iterator[PrivateEngine]:
    if os.geteuid() != 0:
        pytest.fail("the fault suite starts a private dockerd and needs root")
    private = PrivateEngine()
    private.start()
    try:
        yield private
    finally:
        private.cleanup()


@pytest.fixture
def proxy(engine: PrivateEngine, tmp_path: Path) -> Iterator[FaultProxy]:
    if engine.process is None or engine.process.poll() is not None:
        engine.start()  # a test before this one killed it
    with FaultProxy(engine.socket, tmp_path / "proxy.sock") as p:
        yield p


@pytest.fixture
def builds(engine: PrivateEngine, proxy: FaultProxy) -> dict[str, str]:
    """app:1 .. app:8 on a clean engine; tag -> image ID."""
    client = docker.APIClient(base_url=engine.url, version="auto", timeout=60)
    for c in client.containers(all=True):
        client.remove_container(c["Id"], force=True)
    for image in client.images(all=True):
        client.remove_image(image["Id"], force=True)  # set-up only: gcd never forces
    specs = [Spec([f"app:{n}"], [Layer(f"app-{n}")], WHEN) for n in range(1, BUILDS + 1)]
    ids = load(client, specs)
    client.close()
    return {f"app:{n}": image_id for n, image_id in zip(range(1, BUILDS + 1), ids, strict=True)}


def config(tmp_path: Path, url: str, timeout: str = "3s") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"version: 1\nengine: {{url: '{url}', timeout: {timeout}}}\n"
        f"state_dir: {tmp_path / 'state'}\n" + POLICY
    )
    return path


def gcd_run(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gcd", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def images_now(engine: PrivateEngine) -> set[str]:
    with contextlib.closing(docker.APIClient(base_url=engine.url, version="auto")) as client:
        return conftest.ids_now(client)


def tags_now(engine: PrivateEngine) -> dict[str, str]:
    with contextlib.closing(docker.APIClient(base_url=engine.url, version="auto")) as client:
        return conftest.tags_now(client)


def kill(engine: PrivateEngine) -> None:
    engine.kill()


def restart(engine: PrivateEngine) -> None:
    engine.stop()
    engine.start()


def assert_kept_and_store_sound(
    engine: PrivateEngine, builds: dict[str, str], tmp_path: Path
) -> None:
    """The kept builds are there; the state store opens without a problem; a run with the
    engine healthy again finishes the plan with exit 0."""
    assert {builds["app:7"], builds["app:8"]} <= images_now(engine)
    store = Store(str(tmp_path / "state"))
    assert store.problem is None
    store.close()
    again = subprocess.run(
        [sys.executable, "-m", "gcd", "run", "--config", str(config(tmp_path, engine.url))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    # An image whose DELETE the engine died under may stay, untagged (dangling, in grace).
    assert tags_now(engine) == {"app:7": builds["app:7"], "app:8": builds["app:8"]}


FAULTS: dict[str, Callable[[PrivateEngine], None]] = {
    "SIGKILL": kill,
    "restart": restart,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_an_engine_lost_mid_run_is_exit_3_without_a_traceback(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path, fault: str
) -> None:
    hold = Hold()
    proxy.rule("DELETE", r"/images/", hold, times=1)
    run = gcd_run(config(tmp_path, proxy.url))
    assert hold.arrived.wait(60), "gcd sent no DELETE"
    FAULTS[fault](engine)
    hold.release.set()
    _out, err = run.communicate(timeout=60)
    assert "Traceback" not in err
    if fault == "restart" and run.returncode == 0:
        # An engine back before gcd's next request (Podman's API service keeps no state; a
        # quick dockerd restart) carries the held DELETE out, and the run ends as if
        # nothing happened: what the restart took meanwhile is "already gone".
        assert "INFO removed " in err and " failed" not in err
    elif engine.kind.containerd_store and fault == "restart" and run.returncode == 1:
        # Shutting down gracefully, dockerd on the containerd store answers the requests
        # in flight with 500 ("grpc: the client connection is closing"): each of those
        # removals fails, said, before the connection drops.
        assert "the client connection is closing" in err
    else:
        assert run.returncode == 3, err
        assert "gcd: cannot reach the Docker engine at " in err
    if engine.process is None:
        engine.start()
    assert_kept_and_store_sound(engine, builds, tmp_path)


def test_a_frozen_engine_is_exit_3_within_the_timeout(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path
) -> None:
    hold = Hold()
    proxy.rule("DELETE", r"/images/", hold, times=1)
    run = gcd_run(config(tmp_path, proxy.url, timeout="2s"))
    assert hold.arrived.wait(60)
    assert engine.process is not None
    os.killpg(engine.process.pid, signal.SIGSTOP)
    try:
        hold.release.set()
        started = time.monotonic()
        _out, err = run.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        os.killpg(engine.process.pid, signal.SIGCONT)
    assert run.returncode == 3, err
    assert "no answer within 2s (engine.timeout)" in err and "Traceback" not in err
    # The held DELETE reached the engine: it may carry it out once it runs again.
    assert "no answer within 2s (engine.timeout); the engine got the DELETE of " in err
    assert "and may carry it out all the same" in err
    assert took < 15  # one timeout, not one per image
    assert_kept_and_store_sound(engine, builds, tmp_path)


def test_a_busy_engine_that_answers_a_delete_late_removes_it_and_says_so(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path
) -> None:
    # The DELETE reaches the engine, which carries it out only after gcd stopped waiting
    # (a busy containerd store answers 256 DELETEs at once): it answers a ping, so gcd waits
    # for the image to go instead of ending the run as if the engine were lost.
    victim = builds["app:3"]
    hold = Hold()
    proxy.rule("DELETE", victim, hold, times=1)
    proxy.rule("GET", r"/_ping", Call(lambda m, p: hold.release.set()), times=1)
    run = gcd_run(config(tmp_path, proxy.url, timeout="2s"))
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert (
        f"WARNING {victim[7:19]}: the engine deleted it after gcd stopped waiting for its "
        "answer (engine.timeout)"
    ) in err
    assert "Traceback" not in err and "cannot reach" not in err
    assert "the engine answered late: gone after engine.timeout; planned: " in out
    assert images_now(engine) == {builds["app:7"], builds["app:8"]}
    assert_kept_and_store_sound(engine, builds, tmp_path)


def test_a_busy_engine_that_never_answers_a_delete_fails_that_image_only(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path
) -> None:
    victim = builds["app:3"]
    proxy.rule("DELETE", victim, Hang(), times=1)
    run = gcd_run(config(tmp_path, proxy.url, timeout="2s"))
    started = time.monotonic()
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 1, err  # a failed removal; the engine was not lost
    assert (
        "WARNING the engine answers slowly: at most 8 DELETEs at once for the rest of this cycle"
    ) in err
    assert (
        f"no answer within 2s (engine.timeout); the engine got the DELETE of {victim[7:19]} "
        "and may carry it out all the same"
    ) in err
    assert "Traceback" not in err
    assert not [line for line in err.splitlines() if line.startswith("gcd: ")]  # not exit 3's
    assert time.monotonic() - started < 30  # the timeout, then one more, not one per image
    assert images_now(engine) == {victim, builds["app:7"], builds["app:8"]}
    assert_kept_and_store_sound(engine, builds, tmp_path)


@pytest.mark.parametrize(
    ("method", "path", "action", "code", "message"),
    [
        # The list is a read asked LIST_ATTEMPTS times (see the next test): every one fails.
        ("GET", r"/images/json", Status(500, "boom"), 1, "answered: boom"),
        ("GET", r"/images/json", Truncate(12), 1, "with malformed JSON"),
        ("GET", r"/containers/json", Truncate(1), 1, "with malformed JSON"),
        ("GET", r"/version", Hang(), 3, "no answer within 2s (engine.timeout)"),
    ],
    ids=["500-list", "truncated-list", "truncated-containers", "hung-version"],
)
def test_a_broken_answer_before_the_plan_removes_nothing(
    engine: PrivateEngine,
    proxy: FaultProxy,
    builds: dict[str, str],
    tmp_path: Path,
    method: str,
    path: str,
    action: object,
    code: int,
    message: str,
) -> None:
    times = LIST_ATTEMPTS if path == r"/images/json" else 1
    proxy.rule(method, path, action, times=times)  # type: ignore[arg-type]
    run = gcd_run(config(tmp_path, proxy.url, timeout="2s"))
    out, err = run.communicate(timeout=60)
    assert (run.returncode, out) == (code, ""), err
    assert message in err and "Traceback" not in err
    assert images_now(engine) == set(builds.values())
    assert_kept_and_store_sound(engine, builds, tmp_path)


@pytest.mark.parametrize("after", [False, True], ids=["before-the-engine", "after-it"])
def test_a_read_whose_new_connection_breaks_is_asked_again(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path, after: bool
) -> None:
    # The run's first request goes on a connection of its own: the engine resets it (before
    # or after reading the request). A GET is sent once more on a new connection; before, a
    # connection never used went unretried, and the whole run ended "engine lost" (exit 3).
    proxy.rule("GET", r"^/version", Reset(after=after), times=1)
    run = gcd_run(config(tmp_path, proxy.url))
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert proxy.requests[:2] == [("GET", "/version"), ("GET", "/version")]
    assert images_now(engine) == {builds["app:7"], builds["app:8"]}


def test_a_list_answered_404_while_an_image_goes_is_asked_again(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path
) -> None:
    # The containerd store answers the image list with 404 while one of its images is
    # being deleted (the race suite found it aborting the cycle with a traceback).
    gone = Status(404, "failed to get rootfs of image app:9: content digest sha256:0: not found")
    proxy.rule("GET", r"/images/json", gone, times=2)
    run = gcd_run(config(tmp_path, proxy.url))
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert images_now(engine) == {builds["app:7"], builds["app:8"]}

    # A 500 for a while: asked again as well (the same race, another answer).
    proxy.rule("GET", r"/images/json", Status(500, "failed to calculate size"), times=2)
    run = gcd_run(config(tmp_path, proxy.url))
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err

    proxy.rule("GET", r"/images/json", gone)  # for good: the cycle gives up, in one line
    run = gcd_run(config(tmp_path, proxy.url))
    out, err = run.communicate(timeout=60)
    assert (run.returncode, out) == (1, "")
    assert err.splitlines()[-1] == (
        f"gcd: the Docker engine at {proxy.url} could not list its images: "
        "failed to get rootfs of image app:9: content digest sha256:0: not found"
    )
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("action", "error"),
    [(Status(500, "boom"), "answered: boom"), (Truncate(5), "with malformed JSON")],
    ids=["500", "truncated"],
)
def test_a_broken_answer_mid_run_fails_that_image_only(
    engine: PrivateEngine,
    proxy: FaultProxy,
    builds: dict[str, str],
    tmp_path: Path,
    action: object,
    error: str,
) -> None:
    victim = builds["app:3"]
    proxy.rule("DELETE", victim, action, times=1)  # type: ignore[arg-type]
    run = gcd_run(config(tmp_path, proxy.url))
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    assert error in err and "Traceback" not in err
    left = images_now(engine)
    assert {builds["app:7"], builds["app:8"]} <= left
    # A 500 is never retried (the first DELETE may have been carried out): app:3 is failed,
    # gone or not; every other expired build went.
    assert left - {victim} == {builds["app:7"], builds["app:8"]}
    assert_kept_and_store_sound(engine, builds, tmp_path)


def test_the_daemon_rides_out_faults_and_recovers_by_itself(
    engine: PrivateEngine, proxy: FaultProxy, builds: dict[str, str], tmp_path: Path
) -> None:
    # Two cycles fail on the list (each asks it LIST_ATTEMPTS times), one on the containers.
    proxy.rule("GET", r"/images/json", Status(500, "boom"), times=2 * LIST_ATTEMPTS)
    proxy.rule("GET", r"/containers/json", Truncate(1), times=1)
    d = Daemon(tmp_path, proxy.url, POLICY, every="1s", engine_timeout="2s")
    try:
        wait_for(lambda: d.value("gcd_cycles_total", result="error") >= 3, what="failed cycles")
        hold = Hold()
        proxy.rule("DELETE", r"/images/", hold, times=1)
        wait_for(lambda: hold.arrived.is_set(), timeout=30, what="a removal")
        kill(engine)
        hold.release.set()
        wait_for(lambda: d.value("gcd_engine_up") == 0, timeout=30, what="engine_up 0")
        successes = d.value("gcd_cycles_total", result="success")
        engine.start()
        wait_for(lambda: d.value("gcd_engine_up") == 1, timeout=30, what="engine_up 1")
        wait_for(
            lambda: d.value("gcd_cycles_total", result="success") > successes,
            timeout=30,
            what="a cycle that succeeds after the engine came back",
        )
        # Every expired build lost its tag (the one whose DELETE the engine died under may
        # remain, untagged: a dangling image in its grace); the kept builds are whole.
        assert tags_now(engine) == {"app:7": builds["app:7"], "app:8": builds["app:8"]}
        assert d.process.poll() is None
        assert "Traceback" not in d.logs()
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- daemon log:\n{d.logs()[-4000:]}") from None
    finally:
        assert d.stop(30) == 0
    store = Store(str(tmp_path / "state"))
    assert store.problem is None
    store.close()
