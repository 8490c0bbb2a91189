"""The engine adapter against a real engine: call counts, kept-alive connections, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import TypeVar

import docker
import pytest

from gcd.engine import DockerEngine
from gcd.errors import ConflictError, EngineError, EngineUnavailable, NotFoundError
from gcd.model import Image, ImageFacts
from gcd.transport import Tls
from tests.dockerd import PrivateEngine, make_certificates
from tests.images import Layer, Spec, busybox_layer, load, tarball
from tests.integration.conftest import counts_content, podman, short_refs

F = TypeVar("F", Image, ImageFacts)


def test_warm_snapshots_cost_three_calls_and_a_retag_one_inspect(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    ids = load(client, [Spec([f"a:{n}"], [Layer(f"a{n}")]) for n in range(20)])
    engine = DockerEngine(dockerd.url, 30)
    snapshot, learned = engine.snapshot({})
    assert len(learned) == 20
    # Version negotiation, version/images/containers, the store (/info, once), an inspect
    # each: on the classic store a one-layer image's layer size is its size, and so is its
    # unpacked size on Docker 28.2's containerd store, so no history is read; elsewhere the
    # history is where sizes come from.
    derived = snapshot.engine.store == "overlay2" or counts_content(client)
    histories = 0 if derived else 20
    assert engine.calls == 1 + 3 + 1 + 20 + histories
    engine.calls = 0
    _, again = engine.snapshot(learned)
    assert (engine.calls, again) == (3, {})
    client.tag(ids[0], "a", "retagged")
    engine.calls = 0
    _, retagged = engine.snapshot(learned)
    assert engine.calls == 3 + 1  # the one image whose tags changed, for its last tag time
    assert list(retagged) == [ids[0]]
    # Podman records no tag time (docs/engines.md).
    assert (retagged[ids[0]].last_tag_time is not None) == (not podman(client))
    assert retagged[ids[0]].layers == learned[ids[0]].layers


def _unpacked(facts: F) -> F:
    """Image facts without the packed blobs and the image's own content."""
    pairs = zip(facts.layers, facts.layer_sizes, strict=True)
    kept = [(k, n) for k, n in pairs if not k.endswith(("/own", "/content")) and "/blob" not in k]
    return dataclasses.replace(
        facts, layers=tuple(k for k, _ in kept), layer_sizes=tuple(n for _, n in kept)
    )


def layer_sizes(facts: ImageFacts) -> list[int]:
    """The unpacked layers' sizes gcd holds: without the image's own config and manifests
    (Podman, Docker 28.2's containerd store) and the packed blobs (the latter)."""
    return list(_unpacked(facts).layer_sizes)


def test_layer_sizes_come_from_history_only_where_they_cannot_be_derived(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    base = [Layer("base-os", 300_000), Layer("base-deps", 70_000)]
    (first,) = load(client, [Spec(["d:first"], [*base, Layer("d-first", 5_000)])])
    builds = load(
        client, [Spec([f"d:{n}"], [*base, Layer(f"d{n}", 1_000 * n)]) for n in range(1, 6)]
    )
    two_new = load(client, [Spec(["d:two"], [*base, Layer("d-x", 10), Layer("d-y", 20)])])
    engine = DockerEngine(dockerd.url, 30)
    snapshot, cache = engine.snapshot({})
    # Where an image's size (classic) or unpacked size (Docker 28.2's containerd store) is
    # its layers' sum, one unknown layer is a difference.
    derived = snapshot.engine.store == "overlay2" or counts_content(client)

    # Cold, a base layer is learned before or after its builds: whatever the order, the
    # sizes must be the engine's own (its history), each layer counted as such.
    for image_id in [first, *builds, *two_new]:
        history = [e["Size"] for e in reversed(client.history(image_id)) if e["Size"]]
        assert layer_sizes(cache[image_id]) == history
    # Warm base, new builds: one inspect each and no history. Two new layers on one image
    # cannot be split by arithmetic: that one needs its history.
    fresh = load(client, [Spec([f"e:{n}"], [*base, Layer(f"e{n}", 2_000 + n)]) for n in range(4)])
    (pair,) = load(client, [Spec(["e:pair"], [*base, Layer("e-x", 30), Layer("e-y", 40)])])
    engine.calls = 0
    _, learned = engine.snapshot(cache)
    assert sorted(learned) == sorted([*fresh, pair])
    assert engine.calls == (3 + 4 + 2 if derived else 3 + 5 + 5)
    for image_id in [*fresh, pair]:
        history = [e["Size"] for e in reversed(client.history(image_id)) if e["Size"]]
        assert layer_sizes(learned[image_id]) == history


def test_an_image_listed_before_its_layers_are_unpacked_is_in_the_snapshot(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    """Docker 26's containerd store lists every image of a `docker load` whose progress
    nobody has read yet, but has unpacked only the first: the others' history answers 404.
    gcd once read that 404 as "deleted since the list" and left them out of the snapshot.
    Each image must be there, charged its listed size, and learned once it is unpacked."""
    specs = [Spec([f"u:{n}"], [Layer(f"u{n}", 3_000_000 + n)]) for n in range(1, 5)]
    progress = client.load_image(tarball(specs))  # the engine's answer, not read yet
    try:
        deadline = time.monotonic() + 30
        while len(listed := [i["Id"] for i in client.images(all=True)]) < 4:
            assert time.monotonic() < deadline, f"the engine listed {len(listed)} of 4"
            time.sleep(0.1)
        snapshot, learned = DockerEngine(dockerd.url, 30).snapshot({})
        assert {i.id for i in snapshot.images} == set(listed)
        for image in snapshot.images:
            if image.id not in learned:  # not unpacked: no layers known, its size charged
                assert image.layers == ()
    finally:
        for _ in progress or ():
            pass
    snapshot, learned = DockerEngine(dockerd.url, 30).snapshot(learned)
    assert len(snapshot.images) == 4
    assert all(image.layers for image in snapshot.images)


def test_the_unix_socket_and_tcp_with_tls_read_and_remove_alike(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    """The same engine through its socket and through tcp:// with --tlsverify (certificates
    as DOCKER_CERT_PATH holds them): both must see and do the same."""
    if dockerd.tcp_url is None or dockerd.tls_dir is None:
        pytest.skip("Podman's API service listens on a socket here, without TLS")
    ids = load(
        client,
        [
            Spec(["p:1"], [busybox_layer(), Layer("p1")]),
            Spec(["p:2", "q:2"], [busybox_layer(), Layer("p2"), Layer("p2-extra")]),
            Spec(["p:3"], [Layer("p3")]),
        ],
    )
    none = client.create_host_config(network_mode="none")
    client.create_container(ids[0], ["/bin/busybox", "true"], name="user", host_config=none)
    own = DockerEngine(dockerd.url, 30)
    py = DockerEngine(dockerd.tcp_url, 30, Tls.from_cert_path(dockerd.tls_dir, verify=True))
    (a, learned_a), (b, learned_b) = own.snapshot({}), py.snapshot({})
    images_a, images_b = list(a.images), list(b.images)
    if counts_content(client) and dockerd.kind.in_root:
        # Through tcp:// gcd looks for the content store at the engine's own paths, which
        # are inside the Debian 13 root here: it estimates the packed blobs' split instead
        # of reading it (gcd.content). The rest must be the same.
        images_a, images_b = [_unpacked(i) for i in images_a], [_unpacked(i) for i in images_b]
        learned_a = {k: _unpacked(f) for k, f in learned_a.items()}
        learned_b = {k: _unpacked(f) for k, f in learned_b.items()}
    # The engine lists images of equal age in any order.
    assert sorted(images_a, key=lambda i: i.id) == sorted(images_b, key=lambda i: i.id)
    assert (a.containers, learned_a, a.engine.api_version) == (
        b.containers,
        learned_b,
        b.engine.api_version,
    )
    for image_id in ids:
        assert own.current(image_id) == py.current(image_id)
        assert own.users(image_id) == py.users(image_id)
    assert [c.name for c in py.users(ids[0])] == ["user"]
    with pytest.raises(ConflictError):
        py.delete("p:1")  # a container uses it
    for engine in (own, py):
        assert engine.target("p:2") == ids[1]
        assert engine.target("nothing:here") is None
    untag = py.delete("q:2")
    assert (untag.deleted, untag.untagged) == ((), ("q:2",))  # p:2 still names the image
    assert untag.sent_ns <= untag.answered_ns
    own.tag(ids[1], "q:2")  # put back
    py.tag(ids[1], "r:2")
    assert own.current(ids[1]) == (("p:2", "q:2", "r:2"), ())
    by_id = own.delete(ids[2])  # with its layers' chain IDs
    assert ids[2] in by_id.deleted and by_id.untagged == ("p:3",)
    assert py.current(ids[2]) is None
    with pytest.raises(NotFoundError):
        py.delete("p:3")
    # The event log the same through both transports.
    since, until = untag.sent_ns - 10**9, by_id.answered_ns
    events = own.events(since, until)
    assert events == py.events(since, until)
    # An untag event names the image (the classic store) or the tag (the containerd store).
    actions = [
        (e.action, e.image_id, e.name if e.action == "tag" else e.image_id)
        for e in events
        if e.time_ns >= untag.sent_ns
    ]
    assert actions == [
        ("untag", ids[1], ids[1]),
        ("tag", ids[1], "q:2"),
        ("tag", ids[1], "r:2"),
        ("untag", ids[2], ids[2]),
        ("delete", ids[2], ids[2]),
    ]
    own.close()
    py.close()


def test_tls_failures_say_which_side_refused(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    if dockerd.tcp_url is None or dockerd.tls_dir is None:
        pytest.skip("Podman's API service listens on a socket here, without TLS")
    make_certificates(str(tmp_path / "other"))  # another CA: the engine's is not it
    stranger = DockerEngine(dockerd.tcp_url, 10, Tls.from_cert_path(str(tmp_path / "other"), True))
    with pytest.raises(EngineUnavailable) as caught:
        stranger.snapshot({})
    assert str(caught.value) == (
        f"cannot reach the Docker engine at {dockerd.tcp_url}: the engine's TLS certificate "
        "is not trusted (unable to get local issuer certificate)"
    )
    # Without a client certificate, dockerd --tlsverify ends the handshake.
    anonymous = DockerEngine(dockerd.tcp_url, 10, Tls(ca=f"{dockerd.tls_dir}/ca.pem"))
    with pytest.raises(EngineUnavailable) as caught:
        anonymous.snapshot({})
    assert str(caught.value).startswith(f"cannot reach the Docker engine at {dockerd.tcp_url}: ")
    assert str(caught.value).endswith(
        "): cert.pem and key.pem must be signed by the CA the engine trusts"
    )
    # Plain HTTP to a TLS port.
    plain = DockerEngine(dockerd.tcp_url, 10)
    with pytest.raises(EngineError) as failed:
        plain.snapshot({})
    assert str(failed.value) == (
        f"the Docker engine at {dockerd.tcp_url} answered: Client sent an HTTP request to an "
        "HTTPS server."
    )
    missing = DockerEngine(dockerd.tcp_url, 10, Tls.from_cert_path(str(tmp_path / "none"), True))
    with pytest.raises(EngineUnavailable) as caught:
        missing.snapshot({})
    assert str(caught.value) == (
        f"cannot reach the Docker engine at {dockerd.tcp_url}: cannot read "
        f"{tmp_path}/none/ca.pem: No such file or directory"
    )


def _connections(engine: PrivateEngine) -> int:
    """This process's open connections to the engine's unix socket.

    Only those: other sockets of the process (a previous test's, closed by the collector
    mid-test) would make the count drift. The engine's end of each connection carries the
    path it bound, and its peer is our socket's inode.
    """
    gc.collect()  # a previous test's unreferenced connections close now, not mid-count
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed meanwhile
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                ours.add(link[len("socket:[") : -1])
    bound = os.path.join(engine.inner, "docker.sock")
    listing = subprocess.run(["ss", "-xHn"], capture_output=True, text=True, check=True).stdout
    # Netid State Recv-Q Send-Q Local-Address Port Peer-Address Port
    peers = [row.split() for row in listing.splitlines()]
    return sum(1 for cols in peers if len(cols) == 8 and cols[4] == bound and cols[7] in ours)


def test_the_inspect_workers_connections_are_closed_when_they_end(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    ids = load(client, [Spec([f"w:{n}"], [Layer(f"w{n}")]) for n in range(24)])
    before = _connections(dockerd)
    engine = DockerEngine(dockerd.url, 30)
    engine.snapshot({})  # cold: 8 workers inspect, each on its own connection
    engine.current(ids[0])
    assert _connections(dockerd) - before == 1  # the calling thread's, kept alive
    engine.close()
    assert _connections(dockerd) == before


def test_a_kept_alive_connection_survives_an_engine_restart() -> None:
    with PrivateEngine() as private:
        client = docker.APIClient(base_url=private.url, version="auto")
        (image_id,) = load(client, [Spec(["a:1"], [Layer("x")])])
        engine = DockerEngine(private.url, 10)
        assert short_refs(engine.current(image_id)) == (("a:1",), ())
        private.stop()
        with pytest.raises(EngineUnavailable) as caught:
            engine.current(image_id)
        assert str(caught.value).startswith(f"cannot reach the Docker engine at {private.url}: ")
        private.start()
        assert short_refs(engine.current(image_id)) == (("a:1",), ())
        engine.close()


def test_the_engine_kind_and_store_are_detected_and_reported(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    load(client, [Spec(["k:1"], [Layer("k1")])])
    engine = DockerEngine(dockerd.url, 30)
    snapshot, _ = engine.snapshot({})
    info = snapshot.engine
    version = client.version()
    expected_store = {
        "host": client.info()["Driver"],
        "docker26": "overlay2",
        "docker26-containerd": "containerd",
        "docker28-containerd": "containerd",
        "podman": "overlay",
        "podman4": "overlay",
    }[dockerd.kind.name]
    assert (info.kind, info.store) == (dockerd.kind.engine, expected_store)
    # Where each removal waits for a fresh image list, more of them share one list.
    podman = dockerd.kind.engine == "podman"
    workers = 256 if expected_store == "containerd" else 64 if podman else 8
    assert engine.removal_workers() == workers
    assert info.server_version == version["Version"]
    name = "Podman" if dockerd.kind.engine == "podman" else "Docker"
    shown = "containerd image store" if expected_store == "containerd" else expected_store
    assert str(info) == (
        f"{name} {version['Version']} (API {version['ApiVersion']}, {shown}) at {dockerd.url}"
    )
    engine.close()


def test_a_delete_by_id_that_a_tag_races_is_reported_as_it_ended(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    """The containerd store reads an image's names, then deletes those: a tag made between
    keeps the image, yet the answer says `Deleted`. gcd's answer must say what happened."""
    engine = DockerEngine(dockerd.url, 30)
    containerd = engine.snapshot({})[0].engine.store == "containerd"
    tagger = docker.APIClient(base_url=dockerd.url, version="auto", timeout=30)
    survived = attempts = 0
    # Until the window was hit twice: Docker 26 hits it about one try in twenty, 28 one
    # in thirty, each at its own delay, so the tag is sent 0 to 4 ms after the delete.
    while attempts < 40 or (containerd and survived < 2 and attempts < 600):
        (image_id,) = load(client, [Spec([f"r:{attempts}"], [Layer(f"race-{attempts}")])])
        threading.Timer(0.00025 * (attempts % 17), _tag, (tagger, image_id, "r:stable")).start()
        try:
            deletion = engine.delete(image_id)
        except (ConflictError, NotFoundError):  # the tag came first: two tags, refused
            deletion = None
        time.sleep(0.01)
        now = engine.current(image_id)
        if deletion is not None and deletion.survived is not None:
            survived += 1
            assert image_id not in deletion.deleted
            assert now is not None and deletion.survived == now[0] + now[1]
        elif deletion is not None:
            assert image_id in deletion.deleted
            assert now is None  # a tag sent after the delete was refused (404)
        for ref in ("r:stable", image_id):
            with contextlib.suppress(docker.errors.APIError):
                client.remove_image(ref)
        attempts += 1
    tagger.close()
    engine.close()
    if containerd and not survived:
        # Docker 28.5 hit it one try in thirty once, and then in no try of 600 in two
        # matrix passes: what gcd reports then is checked by the unit test
        # (test_an_image_tagged_while_the_containerd_store_deletes_it_is_reported_kept).
        pytest.skip(f"the window was not hit in {attempts} tries on this engine")


def _tag(api: docker.APIClient, image_id: str, ref: str) -> None:
    with contextlib.suppress(docker.errors.APIError):
        api.tag(image_id, *ref.split(":"))
