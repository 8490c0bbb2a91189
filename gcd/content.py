"""Image manifests read from the containerd content store, where gcd runs beside the engine.

Docker's containerd image store (28.2 on) counts every packed blob in its `/system/df`, but
its API gives only an image's whole content, never one blob's size, so how the content of
images first seen together splits between the layers they share and their own is a guess
(`layers.content_sizes`). Each image manifest lists its layers' blobs with their sizes:
where gcd can read the engine's content store (on the same host, as a user who may), it
takes them from there. A manifest is used only when its bytes hash to the digest the engine
gave, so a wrong folder or a stale file is never read as the image's own; anything else
(no such folder, no permission, another engine) leaves the estimate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import struct
from collections.abc import Sequence

# The content store under containerd's root, and its blobs by algorithm and hex digest.
_CONTENT = "io.containerd.content.v1.content"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
# The OCI distribution spec lets a registry refuse manifests over 4 MiB; gcd reads no more.
MAX_MANIFEST = 4 << 20


def folders(socket_path: str | None, data_root: str | None) -> tuple[str, ...]:
    """Where the engine's content store may be, as this process sees it: the containerd that
    dockerd starts itself keeps it under the data root (`containerd/daemon`), a system
    containerd (Docker's packages from 29 on) under its own root, /var/lib/containerd. Both
    are seen through the engine's own root (`/proc/<pid>/root`, the process at the other end
    of its socket): an engine in a chroot or a container sees its paths there."""
    prefix = _engine_root(socket_path) if socket_path else ""
    roots = [f"{data_root}/containerd/daemon"] if data_root else []
    roots.append("/var/lib/containerd")
    return tuple(os.path.join(prefix + root, _CONTENT) for root in roots)


def _engine_root(socket_path: str) -> str:
    """`/proc/<pid>/root` of the process listening on the socket, or "" where it cannot be
    told (not Linux, no /proc, another user's process)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(socket_path)
            ucred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", ucred)[0]
        root = f"/proc/{pid}/root"
        theirs, ours = os.stat(root), os.stat("/")  # the first: the same user, or root
    except (OSError, AttributeError, struct.error):
        return ""
    # Not by the link's text: an engine in another mount namespace (a container) reads "/".
    return "" if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) else root


class ContentStore:
    """Manifests by digest from the first folder that holds them."""

    def __init__(self, folders: Sequence[str]) -> None:
        self.folders = tuple(folders)

    def readable(self) -> bool:
        """Whether gcd may read the blobs of any of the folders (tried: access(2) would
        judge by the real user, not by a capability such as CAP_DAC_READ_SEARCH)."""
        return any(_opens(os.path.join(folder, "blobs", "sha256")) for folder in self.folders)

    def layer_sizes(self, digest: str, layers: int) -> tuple[int, ...] | None:
        """The packed size of each layer blob the image manifest `digest` lists, if the
        manifest is there, is what its digest says, and lists `layers` layers; else None."""
        found = _DIGEST.fullmatch(digest)
        if found is None:
            return None
        for folder in self.folders:
            body = _read(os.path.join(folder, "blobs", "sha256", found.group(1)))
            if body is None or hashlib.sha256(body).hexdigest() != found.group(1):
                continue
            return _sizes(body, layers)
        return None


def _opens(folder: str) -> bool:
    try:
        os.close(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
    except OSError:
        return False
    return True


def _read(path: str) -> bytes | None:
    """A blob's bytes, if it is a regular file of at most MAX_MANIFEST bytes (never a link,
    and never a FIFO or device, which could keep a read waiting)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            body = f.read(MAX_MANIFEST + 1)
        except OSError:
            return None
    return body if len(body) <= MAX_MANIFEST else None


def _sizes(body: bytes, layers: int) -> tuple[int, ...] | None:
    try:
        manifest = json.loads(body)
    except ValueError:
        return None
    listed = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(listed, list) or len(listed) != layers:
        return None
    sizes: list[int] = []
    for layer in listed:
        size = layer.get("size") if isinstance(layer, dict) else None
        if type(size) is not int or size < 0:
            return None
        sizes.append(size)
    return tuple(sizes)
