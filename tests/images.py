"""Fixture images built offline: `docker load` of tarballs crafted here, or legacy builds.

A crafted image controls everything gcd looks at: tags, layers (shared by content), the
`created` time, labels. Legacy builds (the API's /build, FROM scratch) give real
intermediate parent images.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import docker

BUSYBOX = "/bin/busybox"


@dataclass
class Layer:
    """One layer: a file `/name` with `size` bytes of content derived from `name` (or, with
    `files`, that many small files under `/name/`: a layer heavy on inodes). The content
    repeats a 32-byte seed, so it compresses to almost nothing; `random` makes it
    incompressible (still derived from `name`)."""

    name: str
    size: int = 1024
    binary: str | None = None  # a host file to put at /bin/busybox instead (runnable images)
    files: int = 0
    random: bool = False

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            if self.binary:
                with open(self.binary, "rb") as f:
                    data = f.read()
                _add(tar, "bin/busybox", data, 0o755)
                for applet in ("sh", "sleep", "true"):
                    link = tarfile.TarInfo(f"bin/{applet}")
                    link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "busybox", 0
                    tar.addfile(link)
            elif self.files:
                folder = self.name.strip("/").replace("/", "_")
                for n in range(self.files):
                    _add(tar, f"{folder}/{n}", f"{self.name} {n}".encode(), 0o644)
            else:
                if self.random:
                    data = hashlib.shake_256(self.name.encode()).digest(self.size)
                else:
                    seed = hashlib.sha256(self.name.encode()).digest()
                    data = (seed * (self.size // len(seed) + 1))[: self.size]
                _add(tar, self.name.strip("/").replace("/", "_"), data, 0o644)
        return out.getvalue()


def busybox_layer() -> Layer:
    return Layer("busybox", binary=BUSYBOX)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


@dataclass
class Spec:
    """An image to load. Two specs with the same layers, created and labels are one image."""

    tags: Sequence[str] = ()
    layers: Sequence[Layer] = ()
    created: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    labels: dict[str, str] = field(default_factory=dict)
    note: str = ""  # makes otherwise identical specs distinct images

    def config(self) -> tuple[bytes, list[bytes]]:
        tars = [layer.tar() for layer in self.layers]
        when = self.created.astimezone(UTC)
        fraction = f".{when.microsecond:06d}" if when.microsecond else ""
        created = when.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {"Labels": self.labels or None, "Cmd": ["/bin/busybox", "sleep", "3600"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars],
            },
            "history": [
                {"created": created, "created_by": f"layer {layer.name}"} for layer in self.layers
            ]
            + [{"created": created, "created_by": f"CMD {self.note}", "empty_layer": True}],
        }
        return json.dumps(config, sort_keys=True).encode(), tars


def image_id(spec: Spec) -> str:
    return "sha256:" + hashlib.sha256(spec.config()[0]).hexdigest()


def tarball(specs: Iterable[Spec], gzipped: bool = False) -> bytes:
    """A `docker save`-format archive holding every spec; with `gzipped`, each layer's tar is
    compressed in it, as a pulled image's blobs are (the containerd store keeps them so)."""
    out = io.BytesIO()
    manifest = []
    written: set[str] = set()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for spec in specs:
            config, tars = spec.config()
            config_name = hashlib.sha256(config).hexdigest() + ".json"
            if config_name not in written:
                _add(tar, config_name, config, 0o644)
                written.add(config_name)
            layer_names = []
            for data in tars:
                name = hashlib.sha256(data).hexdigest() + "/layer.tar"
                if name not in written:
                    _add(tar, name, gzip.compress(data, mtime=0) if gzipped else data, 0o644)
                    written.add(name)
                layer_names.append(name)
            manifest.append(
                {"Config": config_name, "RepoTags": list(spec.tags) or None, "Layers": layer_names}
            )
        _add(tar, "manifest.json", json.dumps(manifest).encode(), 0o644)
    return out.getvalue()


def load(client: docker.APIClient, specs: Sequence[Spec], gzipped: bool = False) -> list[str]:
    """Load the specs; return their image IDs, as the engine names them, in order. A tag
    already present moves. An error in the load stream raises."""
    lines: list[str] = []
    for chunk in client.load_image(tarball(specs, gzipped)) or ():
        if isinstance(chunk, dict) and (chunk.get("error") or chunk.get("errorDetail")):
            raise RuntimeError(f"docker load: {chunk.get('error') or chunk['errorDetail']}")
        if isinstance(chunk, dict):
            lines += str(chunk.get("stream") or "").splitlines()
    # Untagged images are named only in the stream, in the archive's order (the containerd
    # store's IDs are manifest digests, which the archive does not hold).
    loaded = [line.split(": ", 1)[1] for line in lines if line.startswith("Loaded image ID: ")]
    ids = []
    for spec in specs:
        config = image_id(spec)
        try:
            ids.append(client.inspect_image(config)["Id"])  # the overlay2 store, Podman
            continue
        except docker.errors.NotFound:
            pass
        if spec.tags:
            ids.append(client.inspect_image(spec.tags[0])["Id"])
        elif loaded:
            ids.append(loaded.pop(0))
        else:
            raise RuntimeError(f"docker load: no ID for the untagged image {config}")
    return ids


def legacy_build(
    client: docker.APIClient,
    tags: Sequence[str],
    files: dict[str, str],
    base: str = "scratch",
    labels: dict[str, str] | None = None,
) -> str:
    """`DOCKER_BUILDKIT=0 docker build --network none` FROM `base`: one parent image per step.

    Steps: COPY busybox, then one COPY per file (in order), then CMD. Returns the image ID.
    """
    context = tempfile.mkdtemp(prefix="gcd-build-")
    try:
        lines = [f"FROM {base}"]
        if base == "scratch":
            shutil.copy(BUSYBOX, os.path.join(context, "busybox"))
            lines.append("COPY busybox /bin/busybox")
        for name, content in files.items():
            with open(os.path.join(context, name), "w") as f:
                f.write(content)
            lines.append(f"COPY {name} /app/{name}")
        for key, value in (labels or {}).items():
            lines.append(f'LABEL {key}="{value}"')
        lines.append('CMD ["/bin/busybox", "sleep", "3600"]')
        with open(os.path.join(context, "Dockerfile"), "w") as f:
            f.write("\n".join(lines) + "\n")
        image = None
        for chunk in client.build(
            path=context, tag=tags[0] if tags else None, network_mode="none", rm=True, decode=True
        ):
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if "aux" in chunk and "ID" in chunk["aux"]:
                image = chunk["aux"]["ID"]
            stream = chunk.get("stream", "")
            if stream.startswith("Successfully built "):
                image = image or stream.split()[-1]
        assert image, "build produced no image"
        full = str(client.inspect_image(image)["Id"])
        if ":" not in full:
            full = f"sha256:{full}"  # Podman's IDs come bare
        for tag in tags[1:]:
            repository, _, name = tag.rpartition(":")
            client.tag(full, repository, name)
        return full
    finally:
        shutil.rmtree(context, ignore_errors=True)


def buildkit_build(client: docker.APIClient, tag: str, files: dict[str, bytes]) -> None:
    """A BuildKit build FROM scratch, one COPY per file: `POST /build?version=2` with the
    context as a tarball, so no docker CLI or buildx plugin is needed. It leaves entries in
    BuildKit's cache (`docker system df`); Podman builds with Buildah and leaves none.

    Only on engines known to read such a context from the request: Docker 26 on the
    containerd store looks its made-up host name up in DNS instead (and fails: no network
    here), so no BuildKit build is sent to Docker 26 at all."""
    if not buildkit_builds_offline(client):
        raise RuntimeError("this engine cannot build with BuildKit offline (see buildkit_build)")
    body = io.BytesIO()
    dockerfile = "FROM scratch\n" + "".join(f"COPY {name} /{name}\n" for name in files)
    with tarfile.open(fileobj=body, mode="w") as tar:
        for name, data in {"Dockerfile": dockerfile.encode(), **files}.items():
            _add(tar, name, data, 0o644)
    answer = client._post(
        client._url("/build"),
        params={"version": "2", "t": tag, "networkmode": "none"},
        data=body.getvalue(),
        headers={"Content-Type": "application/x-tar"},
    )
    client._raise_for_status(answer)
    decoder, text, at = json.JSONDecoder(), answer.text, 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        chunk, at = decoder.raw_decode(text, at)
        if "error" in chunk:
            raise RuntimeError(f"BuildKit build of {tag}: {chunk['error']}")


def buildkit_builds_offline(client: docker.APIClient) -> bool:
    """Whether buildkit_build works on this engine without the network: Docker 20.10 and
    28 or later (checked); not Docker 26 (see buildkit_build), not Podman (Buildah)."""
    version = client.version()
    if any("podman" in str(c.get("Name", "")).lower() for c in version.get("Components") or ()):
        return False
    major = int(str(version.get("Version", "0")).split(".")[0] or 0)
    return major == 20 or major >= 28
