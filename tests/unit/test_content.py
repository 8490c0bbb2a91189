import hashlib
import json
import os
import socket
from pathlib import Path

from gcd.content import MAX_MANIFEST, ContentStore, folders


def _put(folder: Path, body: bytes, name: str | None = None) -> str:
    digest = hashlib.sha256(body).hexdigest()
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / (name or digest)).write_bytes(body)
    return f"sha256:{digest}"


def _manifest(*sizes: object) -> bytes:
    layers = [
        {"mediaType": "x", "digest": f"sha256:{n:064x}", "size": s} for n, s in enumerate(sizes)
    ]
    return json.dumps({"schemaVersion": 2, "config": {"size": 900}, "layers": layers}).encode()


def test_a_manifest_gives_its_layers_blob_sizes_from_the_first_folder_holding_it(
    tmp_path: Path,
) -> None:
    digest = _put(tmp_path / "b", _manifest(1_048_576, 2_020))
    store = ContentStore([str(tmp_path / "a"), str(tmp_path / "b")])
    assert store.layer_sizes(digest, 2) == (1_048_576, 2_020)


def test_a_manifest_is_used_only_when_it_is_the_one_the_engine_named(tmp_path: Path) -> None:
    store = ContentStore([str(tmp_path)])
    good = _put(tmp_path, _manifest(10, 20))
    assert store.layer_sizes(good, 3) is None  # the image has three layers: not its manifest
    # A file under the digest's name whose bytes hash otherwise (a stale or altered file).
    other = "sha256:" + "e" * 64
    _put(tmp_path, _manifest(10, 20), name="e" * 64)
    assert store.layer_sizes(other, 2) is None
    # Not a digest gcd reads a file by (no path of the engine's choosing).
    assert store.layer_sizes("sha256:../../etc/passwd", 2) is None
    assert store.layer_sizes("sha512:" + "a" * 128, 2) is None
    assert store.layer_sizes("sha256:" + "f" * 64, 2) is None  # not there


def test_a_manifest_gcd_cannot_read_as_one_leaves_the_estimate(tmp_path: Path) -> None:
    store = ContentStore([str(tmp_path)])
    for body in (
        b"not json",
        b"[]",
        json.dumps({"layers": "x"}).encode(),
        _manifest(10, -1),
        _manifest(10, 2.5),
        _manifest(10, True),
        json.dumps({"layers": [{"size": 1}, "x"]}).encode(),
    ):
        assert store.layer_sizes(_put(tmp_path, body), 2) is None, body
    big = _manifest(1, 2) + b" " * MAX_MANIFEST
    assert store.layer_sizes(_put(tmp_path, big), 2) is None


def test_the_content_store_is_looked_for_through_the_engine_s_own_root(tmp_path: Path) -> None:
    # This process listens: its root is this root, so the paths stay as they are.
    path = str(tmp_path / "engine.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        assert folders(path, "/srv/docker") == (
            "/srv/docker/containerd/daemon/io.containerd.content.v1.content",
            "/var/lib/containerd/io.containerd.content.v1.content",
        )
    # No one listens (or no socket: tcp://): the paths as this process sees them.
    os.unlink(path)
    assert folders(path, None) == ("/var/lib/containerd/io.containerd.content.v1.content",)
    assert folders(None, "/d")[0] == "/d/containerd/daemon/io.containerd.content.v1.content"


def test_a_store_is_readable_when_one_of_its_folders_opens(tmp_path: Path) -> None:
    assert not ContentStore([str(tmp_path / "a")]).readable()
    (tmp_path / "b" / "blobs" / "sha256").mkdir(parents=True)
    assert ContentStore([str(tmp_path / "a"), str(tmp_path / "b")]).readable()


def test_a_blob_that_is_not_a_regular_file_is_not_read(tmp_path: Path) -> None:
    # A FIFO would keep the read waiting for a writer; a link may lead anywhere.
    body = _manifest(10, 20)
    digest = hashlib.sha256(body).hexdigest()
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    os.mkfifo(blobs / digest)
    assert ContentStore([str(tmp_path)]).layer_sizes(f"sha256:{digest}", 2) is None
    os.unlink(blobs / digest)
    (tmp_path / "elsewhere").write_bytes(body)
    (blobs / digest).symlink_to(tmp_path / "elsewhere")
    assert ContentStore([str(tmp_path)]).layer_sizes(f"sha256:{digest}", 2) is None
    os.unlink(blobs / digest)
    (blobs / digest).write_bytes(body)
    assert ContentStore([str(tmp_path)]).layer_sizes(f"sha256:{digest}", 2) == (10, 20)
