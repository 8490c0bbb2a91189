"""The Docker Engine API: each endpoint written once, in the engine's own terms.

Raw JSON stops here: callers get model values and gcd errors (EngineUnavailable,
ConflictError, NotFoundError, EngineError). Requests travel through gcd.transport (unix://,
tcp:// with TLS, ssh://); this module adapts to the engine and store behind them (Docker's
classic and containerd stores, Podman): IDs, names, byte model, the checks an engine does not
make itself.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from gcd import layers, logs
from gcd.content import ContentStore, folders
from gcd.errors import ConflictError, EngineError, EngineUnavailable, NotFoundError, Stopped
from gcd.model import (
    REMOVABLE_STATES,
    BuildCacheEntry,
    Container,
    ContainerState,
    ContainerUse,
    Deletion,
    EngineInfo,
    Image,
    ImageEvent,
    ImageFacts,
    Pruned,
    Recheck,
    Snapshot,
    split_ref,
)
from gcd.transport import Stream, Tls, open_transport

T = TypeVar("T")
log = logging.getLogger(__name__)
_NO_TAG = "<none>:<none>"
_NO_DIGEST = "<none>@<none>"
_ISO_FRACTION = re.compile(r"(\.\d{1,6})\d*")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Concurrent inspects on a cold snapshot (a connection each).
INSPECT_WORKERS = 8
# Removals in flight at once (docs/performance.md). dockerd's classic store deletes
# concurrently, and more than 8 only queue in it (8 run at twice the sequential rate, 4 at
# 1.8x). Elsewhere each removal also waits for an image list begun after its re-read (the
# children check, see Fresh): one list serves every removal waiting for it, and a list of
# a few hundred images takes about a second on the containerd store, so more removals at
# once mean fewer lists (500 removals on Docker 28's containerd store: 25 s with 64 at once,
# 18 s with 128, 11 to 17 s with 256, 12 s with 512). Podman serializes deletes in its
# store: 7.4 s with 64 or 256, so it keeps 64 threads and connections.
REMOVE_WORKERS = 8
REMOVE_WORKERS_CONTAINERD = 256
REMOVE_WORKERS_PODMAN = 64
# The newest API version the engine matrix tests (sid's Docker 28.5, docs/engines.md): a
# newer engine is spoken to in this version, which it still serves, not in one gcd has
# never seen answer.
MAX_API_VERSION = "1.51"
# A list the engine answered with 404 (see _list_images) is asked again this often.
LIST_ATTEMPTS = 5
LIST_RETRY_DELAY = 0.2


class _Unpacked(Exception):
    """An image the engine lists and inspects but whose layers it has not unpacked: its
    history answers 404. `facts` are what gcd knows of it without the history."""

    def __init__(self, facts: ImageFacts) -> None:
        super().__init__("layers not unpacked")
        self.facts = facts


class Engine(Protocol):
    url: str
    calls: int
    timeout: float  # seconds each request may take (engine.timeout)

    def snapshot(
        self, facts: Mapping[str, ImageFacts], stop: Callable[[], bool] = ...
    ) -> tuple[Snapshot, dict[str, ImageFacts]]:
        """Read the engine once; return the snapshot and the facts learned by inspecting.
        `stop` is polled between inspects; raises Stopped when it says so."""

    def current(self, image_id: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """The image's tags and digest references now, or None if it is gone."""

    def users(self, image_id: str) -> tuple[Container, ...]:
        """Containers (any state) created from this image or from a descendant of it."""

    def target(self, ref: str) -> str | None:
        """The ID of the image a tag names now, or None if it names none."""

    def data_root(self) -> str | None:
        """Where the engine keeps its data (`/info` DockerRootDir), as the engine sees it."""

    def stopped(self, container_ids: Sequence[str]) -> dict[str, ContainerState]:
        """Each container's state and finish time as an inspect shows it now (one gone is
        left out)."""

    def remove_container(self, container_id: str) -> None:
        """Remove a stopped container, never forced and never its volumes (ConflictError on
        409, NotFoundError on 404)."""

    def recheck(self, image_id: str, since: int | None = None) -> Recheck | None:
        """The image as a read begun after this call shows it (see Recheck), or None if it
        is gone: an inspect on dockerd's classic store, an image list elsewhere. With
        `since` (time.monotonic_ns()), a shared list under way at the call that began at
        or after it serves too: it is as fresh as the DELETE that follows needs (the read
        to DELETE window is one list long either way), for a caller whose own earlier
        requests, if any, all ended before `since`."""

    def removal_workers(self) -> int:
        """How many removals suit this engine at once (docs/performance.md)."""

    def concurrent_untags(self) -> bool:
        """Whether tags of one image may be deleted at once. Podman before 5 answers
        `Untagged` to each of several, and keeps some of them."""

    def delete(self, ref: str) -> Deletion:
        """Delete one reference or an image ID, never forced and never pruning parents
        (ConflictError on 409, NotFoundError on 404)."""

    def loses_tags_amid_delete(self) -> bool:
        """Whether a tag made while the engine deletes an image by ID can go with the image
        and go unsaid in its answer (dockerd, either store, and Podman 4): the engine's
        events tell."""

    def tag(self, image_id: str, ref: str) -> None:
        """Put the tag `ref` on an image (moving it if it names another)."""

    def logs_late(self) -> bool:
        """Whether the engine writes its event log a moment after it answers (Podman), so
        that a read right after an answer may lack the request's events."""

    def alive(self) -> bool:
        """Whether the engine answers a ping within engine.timeout: after a request it got
        and did not answer in time, busy (True) or lost (False)."""

    def build_cache(self) -> tuple[BuildCacheEntry, ...] | None:
        """BuildKit's cache entries, or None where the engine keeps no such cache (Podman)."""

    def accounted(self) -> int | None:
        """The engine's own count of its image store's bytes (`/system/df` LayersSize), or
        None where it keeps none (Podman 4 answers 0)."""

    def prune_build_cache(
        self, keep_storage: int | None, unused_for: int | None, until: datetime | None = None
    ) -> Pruned:
        """Remove unused cache entries: those unused for `unused_for` seconds, then BuildKit's
        choice until the cache holds at most `keep_storage` bytes, then every one last used
        before `until`."""

    def events(self, since_ns: int, until_ns: int) -> tuple[ImageEvent, ...]:
        """The engine's image events between two times on its clock (both included)."""


class DockerEngine:
    """The engine at `url`: explicit timeout, API version negotiated on first use."""

    def __init__(self, url: str, timeout: float, tls: Tls | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.calls = 0
        self._count_lock = threading.Lock()
        self.transport = open_transport(url, timeout, tls)
        self._api_version: str | None = None
        self._store_name: str | None = None
        self._data_root: str | None = None
        self._content: ContentStore | None = None  # where packed blobs are counted
        self._kind = "docker"  # from /version: at negotiation, then each snapshot's
        # Podman before 5: deletes untagged parents despite noprune, loses concurrent untags.
        self._podman4 = False
        # The image list read right before a removal (children, Podman's users): one read
        # at a time, shared by the removal workers that asked while none was under way.
        self._fresh_list = Fresh(self._list_images)

    def api_version(self) -> str:
        """The engine's API version, asked once, capped at MAX_API_VERSION."""
        if self._api_version is None:
            answer = self._json("/version", versioned=False)
            version = answer.get("ApiVersion") if isinstance(answer, dict) else None
            if not isinstance(version, str):
                raise EngineError(f"the Docker engine at {self.url} did not say its API version")
            self._api_version = _capped(version)
            # Known before any other request (snapshots renew them).
            self._kind, self._podman4 = _kind(answer), _podman_before_5(answer)
        return self._api_version

    def close(self) -> None:
        self.transport.close()

    def _raw(self, method: str, path: str, versioned: bool = True) -> bytes:
        """One request of the negotiated API version; the answer's body."""
        url = f"/v{self.api_version()}{path}" if versioned else path
        with self._count_lock:
            self.calls += 1
        try:
            return self.transport.request(method, url)
        except EngineUnavailable:
            self._store_name = self._content = None  # it may come back with another store
            raise

    def _json(self, path: str, method: str = "GET", versioned: bool = True) -> Any:
        """One request; its JSON answer (None for an empty body)."""
        body = self._raw(method, path, versioned)
        try:
            return json.loads(body) if body.strip() else None
        except ValueError:
            raise EngineError(
                f"the Docker engine at {self.url} answered {method} {path} with malformed JSON"
            ) from None

    # --- reading ---------------------------------------------------------------------------

    def snapshot(
        self, facts: Mapping[str, ImageFacts], stop: Callable[[], bool] = lambda: False
    ) -> tuple[Snapshot, dict[str, ImageFacts]]:
        version = self._json("/version")
        # Before the inspects, which read sizes by engine and store.
        self._kind, store = _kind(version), self._store()
        self._podman4 = _podman_before_5(version)
        if self._counts_content():
            # Facts cached by a gcd that counted no packed blobs, or that estimated every
            # blob (`<id>/own`, before it read the manifests: gcd.content): read again, once.
            facts = {
                i: f for i, f in facts.items() if not f.layers or f.layers[-1].endswith("/content")
            }
        raw_images = self._list_images()
        raw_containers = self._json("/containers/json?all=1")
        tags_of = {
            raw["Id"]: tuple(sorted(t for t in raw.get("RepoTags") or () if t != _NO_TAG))
            for raw in raw_images
        }
        unknown = [
            i
            for i, tags in tags_of.items()
            if i not in facts or facts[i].tags != tags or facts[i].created is None
        ]
        unknown_set = set(unknown)
        # Layer sizes by chain ID, from every image already read that is still there: an
        # image with at most one layer of unknown size needs no history (see _facts).
        sized = {
            layer: size
            for image_id, known in facts.items()
            if image_id in tags_of
            for layer, size in zip(known.layers, known.layer_sizes, strict=True)
        }
        learned, provisional = self._inspect_all(unknown, tags_of, facts, sized, stop)
        images = []
        for raw in raw_images:
            if raw["Id"] in unknown_set:
                known = learned.get(raw["Id"]) or provisional.get(raw["Id"])
            else:
                known = facts[raw["Id"]]
            if known is not None:  # None: deleted between the list and the inspect
                images.append(_image(raw, tags_of[raw["Id"]], known, self._names_only()))
        containers = tuple(_container(c) for c in raw_containers)
        info = EngineInfo(
            self.url,
            str(version.get("Version", "")),
            str(version.get("ApiVersion", "")),
            self._kind,
            store,
        )
        return Snapshot(info, tuple(images), containers), learned

    def _list_images(self) -> Any:
        """GET /images/json?all=1. The containerd store answers 404 ("failed to get rootfs
        of image …") or 500 ("failed to calculate size of image …: content digest …: not
        found") while one of its images is being deleted: the list (a read) is asked again
        a few times before the cycle gives up with an engine error."""
        for attempt in range(LIST_ATTEMPTS):
            try:
                return self._json("/images/json?all=1")
            except EngineUnavailable:
                raise
            except EngineError as e:  # NotFoundError included
                if attempt < LIST_ATTEMPTS - 1:
                    time.sleep(LIST_RETRY_DELAY)
                elif isinstance(e, NotFoundError):
                    raise EngineError(
                        f"the Docker engine at {self.url} could not list its images: {e}"
                    ) from None
                else:
                    raise
        raise AssertionError("unreachable")

    def _classic(self) -> bool:
        """dockerd on a classic graph driver (overlay2, btrfs, ...): an image's size is its
        layers' sum, and the engine refuses to delete a parent under its children."""
        return self._kind != "podman" and self._store() != "containerd"

    def _counts_content(self) -> bool:
        """Docker's containerd store from 28.2 (API 1.50) on: its /system/df counts the
        content store's packed blobs beside the unpacked layers, so gcd counts both."""
        return (
            self._kind == "docker"
            and self._store() == "containerd"
            and _version_key(self.api_version()) >= (1, 50)
        )

    def _names_only(self) -> str:
        """How far the engine's digest references are references (see _digests)."""
        return "podman" if self._kind == "podman" else self._store()

    def _store(self) -> str:
        """The image store, from /info: asked once per engine (and again after the engine
        was lost, since it may come back with another store)."""
        if self._store_name is None:
            info = self._json("/info")
            info = info if isinstance(info, dict) else {}
            self._store_name = _store(info)
            root = info.get("DockerRootDir")
            self._data_root = root if isinstance(root, str) and root else None
        return self._store_name

    def data_root(self) -> str | None:
        """Where the engine keeps its data (`/info` DockerRootDir), as the engine sees it."""
        self._store()
        return self._data_root

    def _inspect_all(
        self,
        ids: list[str],
        tags_of: Mapping[str, tuple[str, ...]],
        facts: Mapping[str, ImageFacts],
        sized: dict[str, int],
        stop: Callable[[], bool],
    ) -> tuple[dict[str, ImageFacts], dict[str, ImageFacts]]:
        """Inspect the images the cache lacks, a few at a time (the engine answers inspects
        concurrently; one at a time leaves it idle between round trips), then work out
        their layers' sizes, images with fewer layers first: a base is sized before the
        builds on it, so theirs are differences (no history) and a packed blob's share is
        its own image's (`layers.content_sizes`), whatever order the inspects came back in.
        `sized` gains the sizes learned. Returns the facts learned and the provisional ones
        (images whose layers are not unpacked: not to be cached)."""
        if not ids:
            return {}, {}
        learned: dict[str, ImageFacts] = {}
        provisional: dict[str, ImageFacts] = {}  # one key per thread: safe across threads

        def retried(read: Callable[[], T]) -> T | None:
            for attempt in range(LIST_ATTEMPTS):
                if stop():
                    raise Stopped("stopped while reading the engine")
                try:
                    return read()
                except NotFoundError:
                    return None  # deleted between the list and the inspect
                except EngineUnavailable:
                    raise
                except EngineError:
                    # Docker 28's containerd store answers 500 ("consistency error: data
                    # changed during operation, retry") to an inspect that meets a delete:
                    # asked again, as the list is, before the cycle gives up.
                    if attempt == LIST_ATTEMPTS - 1:
                        raise
                    time.sleep(LIST_RETRY_DELAY)
            raise AssertionError("unreachable")

        def read(image_id: str) -> tuple[str, Any]:
            return image_id, retried(lambda: self._read(image_id))

        def size(item: tuple[str, Any]) -> tuple[str, ImageFacts | None]:
            image_id, raw = item
            try:
                return image_id, retried(
                    lambda: self._facts(
                        image_id, raw, tags_of[image_id], facts.get(image_id), sized
                    )
                )
            except _Unpacked as e:
                provisional[image_id] = e.facts
                return image_id, None

        self.api_version()  # negotiated once, before the threads start
        if self._counts_content() and self._content is None:
            parsed = urllib.parse.urlparse(self.url)
            socket_path = parsed.path if parsed.scheme == "unix" else None
            self._content = ContentStore(folders(socket_path, self.data_root()))
            if not self._content.readable():
                where = ", ".join(self._content.folders)
                logs.once(
                    log,
                    logging.INFO,
                    f"the engine's content store is not readable here ({where}): the packed "
                    "bytes of layers that images share are estimated (docs/engines.md)",
                )
        with ThreadPoolExecutor(max_workers=min(INSPECT_WORKERS, len(ids))) as pool:
            answers = [(i, raw) for i, raw in pool.map(read, ids) if raw is not None]
            by_depth: dict[int, list[tuple[str, Any]]] = {}
            for image_id, raw in answers:
                depth = len((raw.get("RootFS") or {}).get("Layers") or ())
                by_depth.setdefault(depth, []).append((image_id, raw))
            for depth in sorted(by_depth):
                for image_id, found in pool.map(size, by_depth[depth]):
                    if found is not None:
                        learned[image_id] = found
        return learned, provisional

    def _read(self, image_id: str) -> dict[str, Any]:
        """An image's inspect, with its manifests where gcd counts packed blobs; only the
        fields _facts reads are kept (a cold cycle holds all of them at once)."""
        packed = self._counts_content()
        raw = self._json(f"/images/{image_id}/json" + ("?manifests=1" if packed else ""))
        if not isinstance(raw, dict):
            raise EngineError(f"the Docker engine at {self.url} did not describe {image_id}")
        return {k: raw[k] for k in (_PACKED_FIELDS if packed else _FIELDS) if k in raw}

    def _facts(
        self,
        image_id: str,
        raw: Mapping[str, Any],
        tags: tuple[str, ...],
        known: ImageFacts | None,
        sized: dict[str, int],
    ) -> ImageFacts:
        packed = self._counts_content()
        last_tag_time = _parse_time((raw.get("Metadata") or {}).get("LastTagTime"))
        if not tags and self._store_name == "containerd":
            # There it is when the engine made the untagged image's record (a load, or the
            # moment it lost its last tag): no tag time. gcd keeps its own dangling time.
            last_tag_time = None
        # A missing or zero Created is the epoch: a time before 2000 is no signal of age.
        created = _parse_time(raw.get("Created")) or _EPOCH
        if known is not None:
            # Only the tags changed (or the cache predates `created`): layers are content
            # addressed.
            return ImageFacts(tags, known.layers, known.layer_sizes, last_tag_time, created)
        chain = layers.chain_ids(tuple((raw.get("RootFS") or {}).get("Layers") or ()))
        total = int(raw.get("Size") or 0)
        # An image's size is the sum of its layers' on the classic store, and so is its
        # unpacked size on Docker's containerd store from 28.2 on (`?manifests=1`): one
        # unknown layer is then the difference. Elsewhere the history says.
        classic = self._classic()
        unpacked = _unpacked(raw) if packed else None
        whole = total if classic else unpacked
        sizes = None if whole is None else layers.derived_sizes(chain, whole, sized)
        history = None
        if sizes is None:
            try:
                history = self._json(f"/images/{image_id}/history")
            except NotFoundError:
                # The image is there (its inspect answered) but its layers are not unpacked:
                # Docker 26's containerd store unpacks only the first image of a `docker
                # load` ("snapshot sha256:… does not exist"). It is kept in the snapshot,
                # charged its listed size, and read again next cycle (not cached).
                raise _Unpacked(ImageFacts(tags, (), (), last_tag_time, created)) from None
            sizes = layers.history_sizes(len(chain), history, total, exact=classic)
            if sizes is None:
                return ImageFacts(tags, (), (), last_tag_time, created)
            own = total - sum(sizes)
            if own > 0 and self._kind == "podman":
                # Podman counts the image's own config and manifest in its size (and its
                # /system/df): bytes no other image shares, freed with it.
                chain, sizes = (*chain, f"{image_id}/own"), (*sizes, own)
        if packed:
            # Docker 28.2 on counts the content store's blobs in /system/df too: a layer's
            # packed blob goes when its unpacked layer does.
            content, own_guess = _content(raw, history)
            exact = self._packed_sizes(raw, len(chain))
            if exact is not None and sum(exact) > content:
                exact = None  # not this image's manifest after all: the estimate
            blobs = layers.blob_keys(chain, content, sized, exact)
            if exact is not None:
                blob_sizes, own = exact, content - sum(exact)
            else:
                blob_sizes, own = layers.content_sizes(blobs, sizes, content, own_guess, sized)
            chain = (*chain, *blobs, f"{image_id}/content")
            sizes = (*sizes, *blob_sizes, own)
        sized.update(zip(chain, sizes, strict=True))  # one item at a time: safe across threads
        return ImageFacts(tags, chain, sizes, last_tag_time, created)

    def _packed_sizes(self, raw: Mapping[str, Any], count: int) -> tuple[int, ...] | None:
        """Each layer's packed blob size from the image's manifest in the content store
        (gcd.content), where the image holds one platform's layers and gcd can read it."""
        manifest = _platform_manifest(raw)
        digest = manifest.get("ID") if manifest is not None else None
        if self._content is None or not isinstance(digest, str):
            return None
        return self._content.layer_sizes(digest, count)

    def current(self, image_id: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        try:
            raw = self._json(f"/images/{image_id}/json")
        except NotFoundError:
            return None
        return _refs(raw.get("RepoTags"), _NO_TAG), _digests(raw, self._names_only())

    def tags_by_image(self) -> dict[str, tuple[str, ...]]:
        """Every image's ID and tags, from one list."""
        listed = self._list_images()
        if not isinstance(listed, list):
            raise EngineError(f"the Docker engine at {self.url} did not list its images")
        return {
            raw["Id"]: _refs(raw.get("RepoTags"), _NO_TAG)
            for raw in listed
            if isinstance(raw, dict) and isinstance(raw.get("Id"), str)
        }

    def nameless_loads(self) -> bool:
        """Podman before 5 names no image in a load's event (`loadfromarchive`, with the
        archive's path only)."""
        self.api_version()
        return self._podman4

    def users(self, image_id: str) -> tuple[Container, ...]:
        if self._kind == "podman":
            return self._users_by_graph(image_id)
        ancestor = urllib.parse.quote(json.dumps({"ancestor": [image_id]}))
        raw = self._json(f"/containers/json?all=1&filters={ancestor}")
        return tuple(_container(c) for c in raw)

    def _users_by_graph(self, image_id: str) -> tuple[Container, ...]:
        """Podman's ancestor filter ignores `sha256:<id>`: read every container and the
        image graph, and find the users of the image and of its descendants here."""
        raw_containers = self._json("/containers/json?all=1")
        children = _children(self._fresh_list.get())
        family, todo = {image_id}, [image_id]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in family:
                    family.add(child)
                    todo.append(child)
        found = (_container(c) for c in raw_containers)
        return tuple(c for c in found if c.image_id in family)

    def removal_workers(self) -> int:
        if self._classic():
            return REMOVE_WORKERS
        return REMOVE_WORKERS_PODMAN if self._kind == "podman" else REMOVE_WORKERS_CONTAINERD

    def concurrent_untags(self) -> bool:
        return not self._podman4

    def logs_late(self) -> bool:
        return self._kind == "podman"

    def alive(self) -> bool:
        try:
            self._raw("GET", "/_ping", versioned=False)
        except EngineUnavailable:
            return False
        except EngineError:
            return True  # it answered, if with an error
        return True

    def loses_tags_amid_delete(self) -> bool:
        # Every engine of the matrix: the containerd store, the classic one (Docker 20.10
        # untagged app:3, took app:stable made meanwhile, and deleted the image, answering
        # `Untagged: app:3`: CI's race suite, seed 2414158), and Podman 4.3 (app:stable
        # tagged 5 ms into a DELETE by ID, gone with the image, the answer naming only
        # app:6: the race suite's long run, seed 307628400, 2026-12-06).
        return True

    def recheck(self, image_id: str, since: int | None = None) -> Recheck | None:
        if self._classic():
            sent = time.time_ns()
            now = self.current(image_id)  # dockerd answers 409 itself, and never prunes
            return None if now is None else Recheck(*now, read_ns=sent)
        # One list, shared by the removals that wait for it (Fresh), serves as the re-read:
        # it shows the image's references, its children and its untagged parents at once.
        raw_images, began = self._fresh_list.read(since)
        raw = next((r for r in raw_images if _full_id(r.get("Id")) == image_id), None)
        if raw is None:
            return None
        parent_of = {_full_id(r.get("Id")): _full_id(r.get("ParentId")) for r in raw_images}
        children = _children(raw_images)
        pruned: list[str] = []
        if self._podman4:
            tagged = {
                _full_id(r.get("Id")) for r in raw_images if _refs(r.get("RepoTags"), _NO_TAG)
            }
            below, parent = image_id, parent_of.get(image_id, "")
            # Podman deletes a parent left dangling (no tag, no other child), then its parent.
            while parent and parent in parent_of and parent not in tagged:
                if children.get(parent, set()) - {below}:
                    break
                pruned.append(parent)
                below, parent = parent, parent_of[parent]
        return Recheck(
            _refs(raw.get("RepoTags"), _NO_TAG),
            _digests(raw, self._names_only()),
            tuple(sorted(children.get(image_id, ()))),
            tuple(pruned),
            began,
        )

    def stopped(self, container_ids: Sequence[str]) -> dict[str, ContainerState]:
        def one(container_id: str) -> tuple[str, ContainerState | None]:
            try:
                raw = self._json(f"/containers/{container_id}/json")
            except NotFoundError:
                return container_id, None
            state = raw.get("State") if isinstance(raw, dict) else None
            if not isinstance(state, dict) or not isinstance(state.get("Status"), str):
                raise EngineError(
                    f"the Docker engine at {self.url} answered an inspect of container "
                    f"{container_id[:12]} without its state"
                )
            return container_id, ContainerState(
                state["Status"], _parse_time(state.get("FinishedAt"))
            )

        if not container_ids:
            return {}
        self.api_version()  # negotiated once, before the threads start
        with ThreadPoolExecutor(max_workers=min(INSPECT_WORKERS, len(container_ids))) as pool:
            return {i: s for i, s in pool.map(one, container_ids) if s is not None}

    def accounted(self) -> int | None:
        version = self.api_version()  # first: it tells Podman 4, even on a thread of its own
        if self._podman4:
            return None  # its /system/df says 0 whatever it holds
        # `type` (API 1.42) spares the engine sizing every container and volume.
        only_images = _version_key(version) >= (1, 42)
        raw = self._json("/system/df?type=image" if only_images else "/system/df")
        value = raw.get("LayersSize") if isinstance(raw, dict) else None
        return value if isinstance(value, int) and value >= 0 else None

    def build_cache(self) -> tuple[BuildCacheEntry, ...] | None:
        if self._kind == "podman":
            return None  # it answers 404 to /build/prune, and lists no cache
        # `type` (API 1.42) spares the engine sizing every image, container and volume.
        only_cache = _version_key(self.api_version()) >= (1, 42)
        raw = self._json("/system/df?type=build-cache" if only_cache else "/system/df")
        entries = raw.get("BuildCache") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            return ()
        return tuple(
            BuildCacheEntry(
                str(e.get("ID", "")),
                int(e.get("Size") or 0),
                bool(e.get("InUse")),
                _parse_time(e.get("LastUsedAt")) or _parse_time(e.get("CreatedAt")) or _EPOCH,
            )
            for e in entries
            if isinstance(e, dict)
        )

    # --- removing --------------------------------------------------------------------------

    def prune_build_cache(
        self, keep_storage: int | None, unused_for: int | None, until: datetime | None = None
    ) -> Pruned:
        # all=1: any unused entry may go, not only those no build step names; BuildKit
        # never removes one in use. One request each: given both, BuildKit would remove
        # only entries that are old *and* over the size.
        def unused_longer_than(seconds: float) -> str:
            since = urllib.parse.quote(json.dumps({"until": [f"{seconds:.6f}s"]}))
            return f"/build/prune?all=1&filters={since}"

        asked: list[Callable[[], str]] = []
        if unused_for is not None:
            asked.append(lambda: unused_longer_than(unused_for))
        if keep_storage is not None:
            asked.append(lambda: f"/build/prune?all=1&keep-storage={keep_storage}")
        if until is not None:
            # Unused since `until` (a whole second), counted as the request leaves: counted
            # from the plan, the cut-off would move on by however long the removals took.
            # (Docker 20.10 takes a duration here, not a time.)
            cut = until.timestamp()
            asked.append(lambda: unused_longer_than(max(time.time() - cut, 1e-6)))
        deleted: list[str] = []
        reclaimed = 0
        for request in asked:
            path = request()
            answer = self._json(path, "POST")
            if not isinstance(answer, dict):
                raise EngineError(f"the Docker engine at {self.url} answered POST {path} oddly")
            deleted += [str(i) for i in answer.get("CachesDeleted") or ()]
            reclaimed += int(answer.get("SpaceReclaimed") or 0)
        return Pruned(tuple(deleted), reclaimed)

    def remove_container(self, container_id: str) -> None:
        # force=0: the engine refuses a running container (409). v=0: no volume goes with it.
        try:
            self._json(f"/containers/{container_id}?force=0&v=0", "DELETE")
        except (ConflictError, NotFoundError, EngineUnavailable):
            raise
        except EngineError as e:
            # Podman answers 500, not 409, to a container that runs again ("container state
            # improper"): the container as it is now says which it was.
            now = self.stopped([container_id]) if self._kind == "podman" else {}
            if container_id in now and now[container_id].state not in REMOVABLE_STATES:
                raise ConflictError(str(e)) from None
            raise

    def target(self, ref: str) -> str | None:
        try:
            raw = self._json(f"/images/{_quoted(ref)}/json")
        except NotFoundError:
            return None
        return str(raw["Id"])

    def delete(self, ref: str) -> Deletion:
        # force=0: the engine refuses what is in use. noprune=1: it deletes this image only,
        # never an untagged parent with it (one the plan kept may have lost its last user
        # meanwhile); gcd deletes the parents it planned itself, after their children.
        sent = time.time_ns()
        try:
            answer = self._json(f"/images/{_quoted(ref)}?force=0&noprune=1", "DELETE")
        except (ConflictError, NotFoundError, EngineUnavailable):
            raise
        except EngineError as e:
            # Podman answers 500, not 409, to an image deleted by ID while it has two names
            # (one made after gcd's re-read): the image as it is now says which it was.
            by_id = ref.startswith("sha256:")
            now = self.current(ref) if self._kind == "podman" and by_id else None
            if now is not None and len(now[0]) > 1:
                raise ConflictError(str(e)) from None
            raise
        answered = time.time_ns()
        items = answer if isinstance(answer, list) else ()
        deleted = tuple(
            _full_id(i["Deleted"]) for i in items if isinstance(i, dict) and "Deleted" in i
        )
        untagged = tuple(
            str(i["Untagged"]) for i in items if isinstance(i, dict) and "Untagged" in i
        )
        survived = None
        if ref in deleted and self._store() == "containerd":
            # The containerd store reads an image's names once, then deletes those: a tag
            # made in between stays on the image, and the answer still says `Deleted`.
            now = self.current(ref)
            if now is not None:
                survived = now[0] + now[1]
                deleted = tuple(i for i in deleted if i != ref)
        return Deletion(deleted, untagged, sent, answered, survived)

    def tag(self, image_id: str, ref: str) -> None:
        repository, tag = split_ref(ref)
        query = urllib.parse.urlencode({"repo": repository, "tag": tag})
        self._raw("POST", f"/images/{image_id}/tag?{query}")

    def events(self, since_ns: int, until_ns: int) -> tuple[ImageEvent, ...]:
        query = {
            "since": _api_time(since_ns),
            "until": _api_time(until_ns),
            "filters": json.dumps({"type": ["image"]}),
        }
        if self._kind == "podman":
            # Podman takes whole seconds only ("s.ns" gives nothing) and its type filter
            # drops untag events: the window starts at a whole second, and is filtered here.
            # An `until` in the past stops its file logger's reader as it starts, so that
            # it answers with some of the events or none (podman#29579): `stream=false`
            # reads to the log's end instead.
            query = {"since": str(since_ns // 10**9), "stream": "false"}
        body = self._raw("GET", f"/events?{urllib.parse.urlencode(query)}")
        raw = [
            e
            for e in _json_stream(body)
            if not isinstance(e, dict) or e.get("Type", "image") == "image"
        ]
        return tuple(
            e for e in map(_event, raw) if e is not None and since_ns <= e.time_ns <= until_ns
        )

    # --- following (the daemon's event follower; not part of a cycle) -----------------------

    def follow(self, since_ns: int | None) -> Stream:
        """The engine's container and image events from `since_ns` (replayed from the
        engine's recent log) on, as they come: read them with `followed`."""
        self.api_version()  # the engine's kind is known from here
        query: dict[str, str] = {}
        if self._kind == "podman":
            if since_ns is not None:  # whole seconds only (see events())
                query["since"] = str(since_ns // 10**9)
        else:
            events = [*USE_ACTIONS, *ARRIVAL_ACTIONS]
            query["filters"] = json.dumps({"type": ["container", "image"], "event": events})
            if since_ns is not None:
                query["since"] = _api_time(since_ns)
        return self.transport.stream(
            f"/v{self.api_version()}/events?{urllib.parse.urlencode(query)}"
        )

    def container_image(self, container_id: str, name: str) -> str | None:
        """The ID of the image a container was made from: its inspect says, or, once it is
        gone (`docker run --rm`), the image its image name names now."""
        try:
            raw = self._json(f"/containers/{container_id}/json")
        except EngineUnavailable:
            raise
        except EngineError:  # 404; Podman answers 500 "no such container"
            try:
                return self.target(name) if name else None
            except EngineUnavailable:
                raise
            except EngineError:
                return None
        image = raw.get("Image") if isinstance(raw, dict) else None
        return _full_id(image) if isinstance(image, str) and image else None


class Fresh(Generic[T]):
    """A read shared by the threads that need it at the same time, and never older than the
    moment each asked: a caller gets the answer of a request that began after its call did
    (joining the next one when one is already under way). So eight removal workers that each
    need the whole image list right now make one or two lists, not eight at once: on the
    containerd store a list of a few hundred images takes seconds, and concurrent ones slow
    each other down.

    A caller that gives `since` (time.monotonic_ns()) also takes the read under way when
    it began at or after then: the first removals of a run, which follow no request of
    their own, then share the list the first of them started instead of waiting for it to
    end and a second to be read."""

    def __init__(self, read: Callable[[], T]) -> None:
        self._read = read
        self._changed = threading.Condition()
        self._started = 0  # reads begun
        self._running = False
        self._running_since = 0  # when the read under way began (time.monotonic_ns())
        self._finished = 0  # the number of the last read that ended
        # The last read's answer or error, and when it began (time.time_ns()).
        self._outcome: tuple[T | None, BaseException | None, int] = (None, None, 0)

    def get(self) -> T:
        return self.read()[0]

    def read(self, since: int | None = None) -> tuple[T, int]:
        """The answer, and when the read that gave it began (time.time_ns())."""
        with self._changed:
            under_way = self._running and since is not None and self._running_since >= since
            needed = self._started if under_way else self._started + 1
            while self._finished < needed:
                if not self._running:
                    self._running = True
                    self._started += 1
                    self._running_since = time.monotonic_ns()
                    mine = self._started
                    break
                self._changed.wait()
            else:
                return self._result()
        began = time.time_ns()
        value: T | None = None
        error: BaseException | None = None
        try:
            value = self._read()
        except BaseException as e:  # handed to every caller that shared this read
            error = e
        with self._changed:
            self._running = False
            self._finished = mine
            self._outcome = (value, error, began)
            self._changed.notify_all()
            return self._result()

    def _result(self) -> tuple[T, int]:
        value, error, began = self._outcome
        if error is not None:
            raise error
        return value, began  # type: ignore[return-value]


def _quoted(ref: str) -> str:
    """A reference or ID in a request path."""
    return urllib.parse.quote(ref, safe="/:@")


# Container events that use an image.
USE_ACTIONS = ("create", "start")
# Image events that bring a name onto the engine (a regret, if gcd removed it lately).
ARRIVAL_ACTIONS = ("tag", "load", "pull", "import")


def followed(line: bytes) -> ContainerUse | ImageEvent | None:
    """A container create or start, or an image's arrival (tag, load, pull, import), in an
    event stream's line (either format); else None."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if isinstance(raw, dict) and raw.get("Type") == "image":
        event = _event(raw)
        return event if event is not None and event.action in ARRIVAL_ACTIONS else None
    return container_use(raw)


def container_use(raw: Any) -> ContainerUse | None:
    """A container create or start (an event's JSON, either format), else None."""
    if not isinstance(raw, dict) or (raw.get("Type") or "container") != "container":
        return None
    actor = raw.get("Actor")
    actor = actor if isinstance(actor, dict) else {}
    attributes = actor.get("Attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    action = raw.get("Action") or raw.get("status")
    container_id = actor.get("ID") or raw.get("id")
    if action not in USE_ACTIONS or not isinstance(container_id, str):
        return None
    when = raw.get("timeNano") or int(raw.get("time") or 0) * 1_000_000_000
    image = attributes.get("image") or raw.get("from") or ""
    return ContainerUse(int(when), container_id, str(image))


def _api_time(ns: int) -> str:
    """A time for /events' since and until: seconds.nanoseconds since the epoch."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _json_stream(body: bytes) -> list[Any]:
    """The JSON values of a stream (/events sends one object after another)."""
    decoder = json.JSONDecoder()
    text = body.decode(errors="replace")
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            raise EngineError("the engine's event stream is not JSON") from None
        values.append(value)


def _event(raw: Any) -> ImageEvent | None:
    """An image event in either format: Action/Actor (every API version gcd speaks; the only
    one from API 1.52), or status/id of the older ones."""
    if not isinstance(raw, dict):
        return None
    actor = raw.get("Actor")
    actor = actor if isinstance(actor, dict) else {}
    action = raw.get("Action") or raw.get("status")
    image_id = actor.get("ID") or raw.get("id")
    attributes = actor.get("Attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    if not isinstance(action, str):
        return None
    action = _PODMAN_ACTIONS.get(action, action)
    if action == "load" and not image_id:
        image_id = ""  # Podman 4 names the archive only: the follower lists what came
    if not isinstance(image_id, str):
        return None
    when = raw.get("timeNano") or int(raw.get("time") or 0) * 1_000_000_000
    return ImageEvent(int(when), action, _full_id(image_id), str(attributes.get("name") or ""))


_HEX_ID = re.compile(r"[0-9a-f]{64}")
# Podman's names for Docker's image event actions.
_PODMAN_ACTIONS = {"loadfromarchive": "load"}


def _full_id(value: Any) -> str:
    """An image ID as Docker writes it: Podman leaves `sha256:` off parents, deleted IDs and
    event actors, and every comparison with a listed ID would miss."""
    text = str(value or "")
    return f"sha256:{text}" if _HEX_ID.fullmatch(text) else text


def _version_key(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


def _capped(version: str) -> str:
    """The engine's API version, or MAX_API_VERSION if that is older."""
    return MAX_API_VERSION if _version_key(version) > _version_key(MAX_API_VERSION) else version


def _platform_manifest(raw: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """From `?manifests=1`: the one platform's manifest the image holds, or None where it
    holds several (a multi-platform image pulled for more than one) or none."""
    images = [
        m
        for m in raw.get("Manifests") or ()
        if isinstance(m, dict) and m.get("Available") and m.get("Kind") == "image"
    ]
    return images[0] if len(images) == 1 else None


def _unpacked(raw: Mapping[str, Any]) -> int | None:
    """An image's unpacked size from `?manifests=1`, where it holds one platform's layers
    (the sum of their snapshots' sizes, as the history tells them); None otherwise."""
    manifest = _platform_manifest(raw)
    if manifest is None:
        return None
    size = ((manifest.get("ImageData") or {}).get("Size") or {}).get("Unpacked")
    return size if isinstance(size, int) and size >= 0 else None


def _content(raw: Mapping[str, Any], history: Any) -> tuple[int, int]:
    """An image's bytes in the content store (`?manifests=1`: every manifest's own content,
    and the index that names them), and a guess at the part no other image shares: the
    indexes, manifests and attestations (exact) and each config (about the size of its
    JSON, rebuilt from the inspect and the history, or a typical step a layer where the
    history was not read)."""
    manifests = [m for m in raw.get("Manifests") or () if isinstance(m, dict)]
    available = [m for m in manifests if m.get("Available")]
    if not available:
        return int(raw.get("Size") or 0), 0
    content = sum(int((m.get("Size") or {}).get("Content") or 0) for m in available)
    descriptor = raw.get("Descriptor") or {}
    index = int(descriptor.get("size") or 0) if "index" in str(descriptor.get("mediaType")) else 0
    layers_of = (raw.get("RootFS") or {}).get("Layers") or []
    config = {
        "architecture": raw.get("Architecture"),
        "config": {k: v for k, v in (raw.get("Config") or {}).items() if v},
        "created": raw.get("Created"),
        "history": [
            {"created": _CREATED, "created_by": e.get("CreatedBy")}
            for e in (history if isinstance(history, list) else _STEPS * len(layers_of))
            if isinstance(e, dict)
        ],
        "os": raw.get("Os"),
        "rootfs": {"type": "layers", "diff_ids": layers_of},
    }
    guess = len(json.dumps(config, separators=(",", ":")))
    own = index + sum(
        int((m.get("Descriptor") or {}).get("size") or 0) + guess
        if m.get("Kind") == "image"
        else int((m.get("Size") or {}).get("Content") or 0)  # an attestation: its own
        for m in available
    )
    return content + index, own


# What _facts reads of an inspect; and where packed blobs are counted, what _content does.
_FIELDS = ("Created", "Metadata", "RootFS", "Size")
_PACKED_FIELDS = (*_FIELDS, "Architecture", "Config", "Descriptor", "Manifests", "Os")
# A history entry's time as a config writes it (RFC 3339): its length is what counts.
_CREATED = "2026-01-01T00:00:00.000000000Z"
# A history entry per layer where the history was not read: a build step of typical length.
_STEPS = [{"CreatedBy": "/bin/sh -c #(nop) COPY file:0123456789abcdef0123456789abcd in / "}]


def _kind(version: Any) -> str:
    """docker or podman, from /version: Podman names itself among the components."""
    components = version.get("Components") if isinstance(version, dict) else None
    for component in components if isinstance(components, list) else ():
        if isinstance(component, dict) and "podman" in str(component.get("Name", "")).lower():
            return "podman"
    return "docker"


def _podman_before_5(version: Any) -> bool:
    """Podman before 5 ignores noprune (deleting an image deletes its dangling parents too)
    and loses untags of one image made at once (measured on 4.3.1; 5.4.2 does neither)."""
    if _kind(version) != "podman":
        return False
    number = str(version.get("Version", "")) if isinstance(version, dict) else ""
    major = re.match(r"v?(\d+)\.", number)
    return major is None or int(major.group(1)) < 5


def _store(info: Mapping[str, Any]) -> str:
    """containerd for Docker's containerd image store (its driver reports a snapshotter),
    else the graph driver's name (overlay2; Podman's overlay)."""
    status = info.get("DriverStatus")
    for pair in status if isinstance(status, list) else ():
        if isinstance(pair, list) and len(pair) == 2 and "containerd.snapshotter" in str(pair[1]):
            return "containerd"
    return str(info.get("Driver") or "unknown")


def _children(raw_images: Any) -> dict[str, set[str]]:
    """Each image's children, by ID, from one image list."""
    children: dict[str, set[str]] = {}
    for raw in raw_images:
        parent = _full_id(raw.get("ParentId"))
        if parent:
            children.setdefault(parent, set()).add(_full_id(raw.get("Id")))
    return children


def _refs(values: Any, placeholder: str) -> tuple[str, ...]:
    return tuple(sorted(v for v in values or () if v != placeholder))


def _digests(raw: Mapping[str, Any], engine: str) -> tuple[str, ...]:
    """The image's digest references. The containerd store lists `repo@<image ID>` for each
    of its names: the name again, not a reference of its own (deleting `p@<ID>` untags
    `p:2`), so those are left out. Podman lists `repo@<manifest digest>` for each name, and
    deletes none of them ("tag not known"): no references at all there."""
    digests = _refs(raw.get("RepoDigests"), _NO_DIGEST)
    if engine == "podman":
        return ()
    if engine != "containerd":
        return digests
    image_id = str(raw.get("Id") or "")
    return tuple(d for d in digests if d.partition("@")[2] != image_id)


def _image(
    raw: Mapping[str, Any], tags: tuple[str, ...], facts: ImageFacts, engine: str = "overlay2"
) -> Image:
    return Image(
        id=raw["Id"],
        tags=tags,
        digests=_digests(raw, engine),
        parent=_full_id(raw.get("ParentId")) or None,
        created=facts.created or datetime.fromtimestamp(int(raw.get("Created") or 0), UTC),
        size=int(raw.get("Size") or 0),
        labels=dict(raw.get("Labels") or {}),
        last_tag_time=facts.last_tag_time,
        layers=facts.layers,
        layer_sizes=facts.layer_sizes,
    )


def _container(raw: Mapping[str, Any]) -> Container:
    names = raw.get("Names") or [raw["Id"][:12]]
    return Container(
        id=raw["Id"],
        name=names[0].lstrip("/"),
        image_id=_full_id(raw.get("ImageID")),
        image=raw.get("Image") or "",
        state=raw.get("State") or "unknown",
        created=datetime.fromtimestamp(int(raw.get("Created") or 0), UTC),
        labels=dict(raw.get("Labels") or {}),
    )


def _parse_time(text: str | None) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds, Z); the zero time 0001-01-01 means none."""
    if not text or text.startswith("0001-01-01"):
        return None
    try:
        value = datetime.fromisoformat(_ISO_FRACTION.sub(r"\1", text.replace("Z", "+00:00")))
    except (TypeError, ValueError):
        return None  # not a time: no signal
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
