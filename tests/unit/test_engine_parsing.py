"""What the engine adapter makes of each engine's answers (no engine needed)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from gcd import engine, logs
from gcd.engine import DockerEngine, followed
from gcd.errors import EngineError
from gcd.model import ContainerUse, ImageEvent, ImageFacts


def test_ids_without_sha256_get_it_as_docker_writes_them() -> None:
    # Podman leaves it off ParentId, deleted IDs and event actors.
    bare = "a" * 64
    assert engine._full_id(bare) == f"sha256:{bare}"
    assert engine._full_id(f"sha256:{bare}") == f"sha256:{bare}"
    assert engine._full_id("") == ""
    assert engine._full_id(None) == ""
    assert engine._full_id("app:1") == "app:1"  # a name stays a name


def test_the_engine_kind_comes_from_the_components_of_version() -> None:
    podman = {"Version": "5.4.2", "Components": [{"Name": "Podman Engine", "Version": "5.4.2"}]}
    docker = {"Version": "26.1.5", "Components": [{"Name": "Engine"}, {"Name": "containerd"}]}
    assert engine._kind(podman) == "podman"
    assert engine._kind(docker) == "docker"
    assert engine._kind({"Version": "20.10.24"}) == "docker"
    assert engine._kind({"Components": "garbage"}) == "docker"


def test_the_store_comes_from_the_driver_of_info() -> None:
    containerd = {
        "Driver": "overlayfs",
        "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
    }
    assert engine._store(containerd) == "containerd"
    assert (
        engine._store({"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "extfs"]]})
        == "overlay2"
    )
    assert engine._store({"Driver": "overlay", "DriverStatus": None}) == "overlay"
    assert engine._store({}) == "unknown"


def test_the_api_version_is_capped_at_the_newest_the_matrix_tests() -> None:
    assert engine.MAX_API_VERSION == "1.51"
    assert engine._capped("1.52") == "1.51"  # Docker 29
    assert engine._capped("1.100") == "1.51"
    assert engine._capped("1.51") == "1.51"
    assert engine._capped("1.41") == "1.41"  # Docker 20.10, Podman
    assert engine._capped("garbage") == "garbage"  # asked as the engine said


def test_the_containerd_stores_name_at_id_digests_are_not_references() -> None:
    image_id = "sha256:" + "d" * 64
    raw = {
        "Id": image_id,
        "RepoDigests": [f"p@{image_id}", f"q@{image_id}", "r@sha256:" + "e" * 64],
    }
    assert engine._digests(raw, "containerd") == ("r@sha256:" + "e" * 64,)
    assert len(engine._digests(raw, "overlay2")) == 3
    assert engine._digests({"Id": image_id, "RepoDigests": None}, "containerd") == ()
    # Podman deletes none of its digests by name ("tag not known"): not references there.
    assert engine._digests(raw, "podman") == ()


def test_the_content_of_an_image_on_docker_28s_containerd_store() -> None:
    # The inspect with ?manifests=1 of a loaded image on Docker 28.5 (shortened): its
    # manifest (737 bytes) names a config (709 bytes as loaded) and three layer blobs.
    raw = {
        "Architecture": "amd64",
        "Os": "linux",
        "Created": "2026-03-01T00:00:00Z",
        "Config": {"Cmd": ["/bin/busybox", "sleep", "3600"], "Labels": None, "Env": []},
        "RootFS": {"Type": "layers", "Layers": ["sha256:" + c * 64 for c in "abc"]},
        "Size": 2418086,
        "Descriptor": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json"},
        "Manifests": [
            {
                "Descriptor": {"size": 737},
                "Available": True,
                "Size": {"Content": 2418086, "Total": 4830630},
                "Kind": "image",
            }
        ],
    }
    history = [{"CreatedBy": step} for step in ("CMD 1", "layer own-1", "layer shared")]
    content, own = engine._content(raw, history)
    assert content == 2418086
    assert 737 + 600 <= own <= 737 + 800  # the manifest, and about the config's 709
    # An index: its own bytes count, and so does an attestation's content, all its own;
    # a platform not pulled counts nothing.
    index = {
        **raw,
        "Descriptor": {"mediaType": "application/vnd.oci.image.index.v1+json", "size": 900},
        "Manifests": [
            raw["Manifests"][0],  # type: ignore[index]
            {"Available": True, "Size": {"Content": 1500}, "Kind": "attestation"},
            {"Available": False, "Size": {"Content": 0}, "Kind": "image"},
        ],
    }
    assert engine._content(index, history) == (2418086 + 1500 + 900, own + 1500 + 900)
    # No manifests (an older answer): the image's size, and no guess.
    assert engine._content({"Size": 5}, []) == (5, 0)


def test_docker_28s_containerd_store_charges_packed_blobs_and_rereads_older_facts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image_id, layer = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    answers = {
        "/version": {"ApiVersion": "1.51", "Version": "28.5.2", "Components": []},
        "/info": {"DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]]},
        "/images/json?all=1": [{"Id": image_id, "RepoTags": ["a:1"], "Size": 9000}],
        "/containers/json?all=1": [],
        f"/images/{image_id}/json?manifests=1": {
            "Created": "2026-03-01T00:00:00Z",
            "RootFS": {"Layers": [layer]},
            "Manifests": [
                {
                    "Available": True,
                    "Kind": "image",
                    "Descriptor": {"size": 500},
                    "Size": {"Content": 5000},
                },
            ],
        },
        f"/images/{image_id}/history": [{"Size": 4096, "CreatedBy": "COPY f /"}],
    }
    asked: list[str] = []

    def json_of(path: str, method: str = "GET", versioned: bool = True) -> object:
        asked.append(path)
        return answers[path]

    docker28 = DockerEngine("unix:///nonexistent.sock", 5)
    monkeypatch.setattr(docker28, "_json", json_of)
    # Facts a gcd cached before it counted blobs: the unpacked layer alone.
    old = ImageFacts(("a:1",), (layer,), (4096,), None, engine._EPOCH)
    snapshot, learned = docker28.snapshot({image_id: old})
    assert f"/images/{image_id}/json?manifests=1" in asked  # read again
    (image,) = snapshot.images
    assert image.layers == (layer, f"{layer}/blob", f"{image_id}/content")
    assert image.layer_sizes[0] == 4096 and sum(image.layer_sizes[1:]) == 5000
    assert 500 < image.layer_sizes[2] < 1000  # the manifest and a guess at the config
    # Facts a gcd cached before it read blob sizes from the manifests: read again, once.
    estimated = ImageFacts(
        ("a:1",),
        (layer, f"{layer}/blob", f"{image_id}/own"),
        (4096, 4000, 1000),
        None,
        engine._EPOCH,
    )
    asked.clear()
    docker28.snapshot({image_id: estimated})
    assert f"/images/{image_id}/json?manifests=1" in asked
    # Its one platform's unpacked size is the sum of its layers': one unknown layer is the
    # difference, and no history is read.
    manifest = answers[f"/images/{image_id}/json?manifests=1"]["Manifests"][0]  # type: ignore[index]
    manifest["ImageData"] = {"Size": {"Unpacked": 4096}}
    asked.clear()
    (again,) = docker28.snapshot({})[0].images
    assert f"/images/{image_id}/history" not in asked
    assert again.layers == image.layers and again.layer_sizes[0] == 4096
    assert sum(again.layer_sizes[1:]) == 5000
    assert abs(again.layer_sizes[2] - image.layer_sizes[2]) < 100  # a guessed history
    # Facts with the blobs are kept: no inspect.
    asked.clear()
    docker28.snapshot(learned)
    assert not any("/images/sha256" in path for path in asked)
    # Before Docker 28.2 (API 1.50) the engine counts no blobs, and neither does gcd.
    answers["/version"] = {"ApiVersion": "1.45", "Version": "26.1.5", "Components": []}
    answers[f"/images/{image_id}/json"] = answers[f"/images/{image_id}/json?manifests=1"]
    other = DockerEngine("unix:///nonexistent.sock", 5)
    monkeypatch.setattr(other, "_json", json_of)
    (image,) = other.snapshot({})[0].images
    assert image.layers == (layer,) and image.layer_sizes == (4096,)


def _docker28(data_root: Path) -> dict[str, object]:
    """A Docker 28.5 engine on the containerd store, its data root there, no containers."""
    return {
        "/version": {"ApiVersion": "1.51", "Version": "28.5.2", "Components": []},
        "/info": {
            "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
            "DockerRootDir": str(data_root),
        },
        "/containers/json?all=1": [],
    }


def test_docker_28s_packed_blobs_come_from_the_manifests_where_gcd_can_read_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Two images on one base layer, first seen together, the base (random bytes) packing
    # to most of its size and their own (text) layers to little: shared in proportion to
    # the unpacked sizes, the base blob would be charged a third of its size. Their
    # manifests in the engine's content store give each blob its own.
    base, own = "sha256:" + "b" * 64, ["sha256:" + c * 64 for c in "cd"]
    blobs = tmp_path / "data/containerd/daemon/io.containerd.content.v1.content/blobs/sha256"
    blobs.mkdir(parents=True)
    answers = _docker28(tmp_path / "data")
    listed, manifests = [], []
    for n, layer in enumerate(own):
        body = json.dumps(
            {"config": {"size": 800}, "layers": [{"size": 1_000_000}, {"size": 900 + n}]}
        )
        digest = hashlib.sha256(body.encode()).hexdigest()
        (blobs / digest).write_text(body)
        manifests.append(body)
        image_id = f"sha256:{digest}"
        listed.append({"Id": image_id, "RepoTags": [f"a:{n}"], "Size": 1})
        answers[f"/images/{image_id}/json?manifests=1"] = {
            "Created": "2026-03-01T00:00:00Z",
            "RootFS": {"Layers": [base, layer]},
            "Manifests": [
                {
                    "ID": image_id,
                    "Available": True,
                    "Kind": "image",
                    "Descriptor": {"size": len(body)},
                    "Size": {"Content": 1_000_000 + 900 + n + 800 + len(body)},
                    "ImageData": {"Size": {"Unpacked": 1_003_520 + 2_000_000}},
                }
            ],
        }
        answers[f"/images/{image_id}/history"] = [{"Size": 2_000_000}, {"Size": 1_003_520}]
    answers["/images/json?all=1"] = listed
    docker28 = DockerEngine(f"unix://{tmp_path}/nonexistent.sock", 5)
    monkeypatch.setattr(docker28, "_json", lambda path, *_, **__: answers[path])
    images = docker28.snapshot({})[0].images
    for n, image in enumerate(images):
        sizes = dict(zip(image.layers, image.layer_sizes, strict=True))
        chain = image.layers[1]
        assert sizes[f"{base}/blob"] == 1_000_000
        assert sizes[f"{chain}/blob"] == 900 + n
        assert sizes[f"{image.id}/content"] == 800 + len(manifests[n])  # config and manifest
    # A manifest gcd cannot read (another host's engine, no permission): the estimate.
    for path in blobs.iterdir():
        path.unlink()
    estimated = DockerEngine(f"unix://{tmp_path}/nonexistent.sock", 5)
    monkeypatch.setattr(estimated, "_json", lambda path, *_, **__: answers[path])
    (first, _) = estimated.snapshot({})[0].images
    assert dict(zip(first.layers, first.layer_sizes, strict=True))[f"{base}/blob"] < 500_000


def test_a_content_store_gcd_cannot_read_is_said_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image_id = "sha256:" + "a" * 64
    answers = _docker28(tmp_path / "elsewhere") | {
        "/images/json?all=1": [{"Id": image_id, "RepoTags": ["a:1"], "Size": 1}],
        f"/images/{image_id}/json?manifests=1": {"RootFS": {"Layers": ["sha256:" + "b" * 64]}},
        f"/images/{image_id}/history": [{"Size": 4096}],
    }
    monkeypatch.setattr(logs, "_SAID", set())
    # Only the data root's folder (this machine may have a /var/lib/containerd).
    monkeypatch.setattr(engine, "folders", lambda _, root: (f"{root}/containerd/daemon/x",))
    caplog.set_level(logging.INFO, logger="gcd.engine")
    for _ in range(2):  # two cycles, as a daemon's (a new engine after it was lost)
        docker28 = DockerEngine(f"unix://{tmp_path}/nonexistent.sock", 5)
        monkeypatch.setattr(docker28, "_json", lambda path, *_, **__: answers[path])
        docker28.snapshot({})
    assert [r.getMessage() for r in caplog.records] == [
        f"the engine's content store is not readable here ({tmp_path}/elsewhere/containerd/"
        "daemon/x): the packed bytes of layers that images share are estimated "
        "(docs/engines.md)"
    ]


def test_podman_events_read_as_dockers() -> None:
    bare = "a" * 64
    raw = {
        "status": "loadfromarchive",
        "id": bare,
        "Type": "image",
        "Action": "loadfromarchive",
        "Actor": {"ID": bare, "Attributes": {"name": "/var/tmp/api_load.tar1"}},
        "time": 1796408964,
        "timeNano": 1796408964985227169,
    }
    event = engine._event(raw)
    assert event is not None
    assert (event.action, event.image_id, event.time_ns) == (
        "load",
        f"sha256:{bare}",
        1796408964985227169,
    )


def test_podman_4s_load_event_names_no_image_and_is_still_a_load() -> None:
    """As Podman 4.3.1 sends it: no `id`, an empty actor, the archive's path for a name.
    The follower then lists the images to learn what came (gcd/events.py)."""
    line = json.dumps(
        {
            "status": "loadfromarchive",
            "Type": "image",
            "Action": "loadfromarchive",
            "Actor": {"ID": "", "Attributes": {"image": "", "name": "/var/tmp/api_load.tar32"}},
            "scope": "local",
            "time": 1796535056,
            "timeNano": 1796535056276259927,
        }
    ).encode()
    assert followed(line) == ImageEvent(1796535056276259927, "load", "", "/var/tmp/api_load.tar32")
    # Any other action without an image is no event.
    assert followed(line.replace(b"loadfromarchive", b"tag")) is None


def test_a_first_sight_inspect_the_engine_fails_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Docker 28.5, containerd store, race suite: an inspect meeting a delete answered 500
    # "consistency error: data changed during operation, retry", and the whole cycle failed.
    engine = DockerEngine("unix:///nonexistent.sock", 5)
    answers: list[object] = [EngineError("consistency error: data changed during operation, retry")]
    raw = {
        "Created": "2026-03-01T00:00:00Z",
        "RootFS": {"Layers": ["sha256:" + "a" * 64]},
        "Size": 5,
    }

    def read(*_: object) -> object:
        if answers:
            raise answers.pop()  # type: ignore[misc]
        return raw

    monkeypatch.setattr(engine, "_read", read)
    monkeypatch.setattr(engine, "api_version", lambda: "1.41")
    monkeypatch.setattr(engine, "_store", lambda: "overlay2")
    monkeypatch.setattr("gcd.engine.LIST_RETRY_DELAY", 0)
    learned, provisional = engine._inspect_all(
        ["sha256:a"], {"sha256:a": ("a:1",)}, {}, {}, lambda: False
    )
    assert list(learned) == ["sha256:a"] and provisional == {}
    answers[:] = [EngineError("boom")] * 5  # it gives up in the end
    with pytest.raises(EngineError, match="boom"):
        engine._inspect_all(["sha256:a"], {"sha256:a": ("a:1",)}, {}, {}, lambda: False)


def test_first_sight_images_are_sized_base_first_whatever_order_the_inspects_end_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A legacy build's three images come back child first. Sized base first, each adds one
    # layer of unknown size: the difference of its size, no history (classic store).
    engine = DockerEngine("unix:///nonexistent.sock", 5)
    a, b, c = ("sha256:" + x * 64 for x in "abc")
    raws = {
        "sha256:3": {
            "Created": "2026-03-01T00:00:00Z",
            "RootFS": {"Layers": [a, b, c]},
            "Size": 600,
        },
        "sha256:2": {"Created": "2026-03-01T00:00:00Z", "RootFS": {"Layers": [a, b]}, "Size": 300},
        "sha256:1": {"Created": "2026-03-01T00:00:00Z", "RootFS": {"Layers": [a]}, "Size": 100},
    }
    asked: list[str] = []

    def json_of(path: str, method: str = "GET", versioned: bool = True) -> object:
        asked.append(path)
        return raws[path.split("/")[2]]

    monkeypatch.setattr(engine, "_json", json_of)
    monkeypatch.setattr(engine, "api_version", lambda: "1.41")
    monkeypatch.setattr(engine, "_store", lambda: "overlay2")
    tags = {i: () for i in raws}
    learned, _ = engine._inspect_all(list(raws), tags, {}, {}, lambda: False)
    assert not [path for path in asked if path.endswith("/history")]
    assert learned["sha256:3"].layer_sizes == (100, 200, 300)
    assert learned["sha256:2"].layer_sizes == (100, 200)


@pytest.mark.parametrize(
    "line",
    [
        # API 1.52 and later: Action and Actor only.
        b'{"Type":"container","Action":"start","Actor":{"ID":"c1","Attributes":{"image":"app:1"}},'
        b'"scope":"local","time":1700000000,"timeNano":1700000000123456789}',
        # Older: status, id and from only.
        b'{"status":"start","id":"c1","from":"app:1","time":1700000000,'
        b'"timeNano":1700000000123456789}',
    ],
)
def test_a_container_start_reads_in_either_event_format(line: bytes) -> None:
    assert followed(line) == ContainerUse(1700000000123456789, "c1", "app:1")


@pytest.mark.parametrize(
    "line",
    [
        b'{"Type":"container","Action":"die","Actor":{"ID":"c1"},"timeNano":1}',
        b'{"Type":"image","Action":"untag","Actor":{"ID":"sha256:ab"},"timeNano":1}',
        b'{"Type":"container","Action":"create","Actor":{"ID":7},"timeNano":1}',
        b"[1, 2]",
        b"not json",
        b"",
    ],
)
def test_other_events_and_garbage_are_no_use(line: bytes) -> None:
    assert followed(line) is None


def test_an_image_tagged_or_loaded_is_an_arrival() -> None:
    tag = b'{"Type":"image","Action":"tag","Actor":{"ID":"sha256:ab","Attributes":{"name":"app:1"}},"timeNano":5}'
    assert followed(tag) == ImageEvent(5, "tag", "sha256:ab", "app:1")
    podman = (
        b'{"Type":"image","Action":"loadfromarchive","Actor":{"ID":"'
        + b"c" * 64
        + b'"},"timeNano":6}'
    )
    assert followed(podman) == ImageEvent(6, "load", "sha256:" + "c" * 64, "")


@pytest.mark.parametrize(
    ("kind", "store", "lags"),
    [("docker", "overlay2", False), ("docker", "containerd", False), ("podman", "overlay", True)],
)
def test_every_engine_has_its_events_read_after_a_delete_by_id(
    kind: str, store: str, lags: bool
) -> None:
    # Docker 20.10's classic store too: it untagged app:3, took app:stable made meanwhile
    # and deleted the image, answering `Untagged: app:3` (CI's race suite, seed 2414158);
    # and Podman 4.3 (the race suite's long run, seed 307628400), whose log lags its answers.
    docker = DockerEngine("unix:///nonexistent.sock", 5)
    docker._kind, docker._store_name = kind, store
    assert docker.loses_tags_amid_delete()
    assert docker.logs_late() is lags
