"""An in-memory engine with the classic Docker store's removal rules, for executor unit tests.

It answers like dockerd 20.10-29 on overlay2 (checked against the real engine by the
integration suite): a reference deleted by name untags; an image deleted by ID must have at
most one tag and digests of that tag's repository; the last reference of an image a
container uses is refused; parents are never pruned with a child (gcd always sends
noprune=1); every change is an event. `before(method, target)` runs before each request, so a
test can change the world inside gcd's windows; `fail` maps a request to an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gcd.errors import ConflictError, EngineUnavailable, NotFoundError
from gcd.model import (
    BuildCacheEntry,
    Container,
    ContainerState,
    Deletion,
    EngineInfo,
    Image,
    ImageEvent,
    ImageFacts,
    Pruned,
    Recheck,
    Snapshot,
    short_id,
    split_ref,
)
from tests.unit.snapshots import NOW


@dataclass
class _Image:
    parent: str | None
    refs: list[str] = field(default_factory=list)


class FakeEngine:
    url = "unix:///fake.sock"
    timeout = 0.01  # engine.timeout: how long gcd waits for an unanswered DELETE to show

    def __init__(
        self,
        guards_children: bool = True,
        prunes_parents: bool = False,
        concurrent_untags: bool = True,
        loses_amid_tags: bool = False,
    ) -> None:
        # False: deletes a parent under its children, as the containerd store and Podman do.
        self.guards_children = guards_children
        # True: deletes an image's dangling parents with it, noprune or not (Podman before 5).
        self.prunes_parents = prunes_parents
        # False: says so, as Podman before 5 does (it loses untags of one image made at once).
        self._concurrent_untags = concurrent_untags
        self.calls = 0
        self.images: dict[str, _Image] = {}
        self.refs: dict[str, str] = {}  # tag or digest reference -> image ID
        self.containers: dict[str, tuple[str, str]] = {}  # name -> (image ID, state)
        self.finished: dict[str, datetime] = {}  # name -> when it exited
        # BuildKit's cache as /system/df lists it (None: the engine has none, as Podman),
        # and what a prune answers.
        self.cache: tuple[BuildCacheEntry, ...] | None = ()
        self.pruned = Pruned((), 0)
        self.log: list[ImageEvent] = []
        self.requests: list[tuple[str, str]] = []
        self.before: Callable[[str, str], None] = lambda method, target: None
        self.fail: dict[tuple[str, str], Exception] = {}
        # DELETEs of these references are carried out, but their answer never comes (a busy
        # engine, past engine.timeout); `down`: nor does any answer to a ping.
        self.late: set[str] = set()
        self.down = False
        # Runs inside a DELETE by ID, after the engine read the image's names: the containerd
        # store deletes those names only and keeps any made meanwhile, answering `Deleted`
        # all the same (the adapter then reports the image as survived).
        self.amid_delete: Callable[[str], None] | None = None
        # True: the names made there go with the image, and the answer names only those it
        # read (seen on Docker 26's containerd store in the race suite's long run).
        self.loses_amid_tags = loses_amid_tags
        # Reads of the event log that come back without the latest events (Podman's log
        # lags its answers): the first `lagging_reads` show none of `lagging_images`' events
        # (of any image's, if it is empty).
        self.lagging_reads = 0
        self.lags = True  # logs_late(): it says its log may lag, as Podman's does
        self.lagging_images: set[str] = set()
        # Each re-check's image and `since`; and, where a re-check may share a list under
        # way (`since` given), when that list began (its answer's read_ns).
        self.rechecks: list[tuple[str, int | None]] = []
        self.shared_list_began: int | None = None
        self._lock = threading.RLock()
        self._last_ns = 0

    # --- the world, changed by tests (and by `before`) -------------------------------------

    def _now(self) -> int:
        self._last_ns = max(self._last_ns + 1, time.time_ns())
        return self._last_ns

    def _event(self, action: str, image_id: str, name: str | None = None) -> None:
        self.log.append(ImageEvent(self._now(), action, image_id, name or image_id))

    def add(self, image_id: str, *refs: str, parent: str | None = None) -> None:
        """A built image with its tags (a `tag` event for each, as a build makes)."""
        with self._lock:
            self.images[image_id] = _Image(parent)
            for ref in refs:
                self.tag(image_id, ref)

    def load(self, image_id: str, *refs: str) -> None:
        """`docker load`: tags move with a `load` event only."""
        with self._lock:
            self.images.setdefault(image_id, _Image(None))
            for ref in refs:
                self._move(image_id, ref)
            self._event("load", image_id)

    def run(
        self, name: str, image_id: str, state: str = "created", finished: datetime | None = None
    ) -> None:
        with self._lock:
            self.containers[name] = (image_id, state)
            if finished is not None:
                self.finished[name] = finished

    def _move(self, image_id: str, ref: str) -> None:
        old = self.refs.get(ref)
        if old is not None:
            self.images[old].refs.remove(ref)
        self.refs[ref] = image_id
        self.images[image_id].refs.append(ref)

    def _request(self, method: str, target: str) -> None:
        self.calls += 1
        self.requests.append((method, target))
        self.before(method, target)
        failure = self.fail.get((method, target))
        if failure is not None:
            raise failure

    # --- the Engine protocol ----------------------------------------------------------------

    def snapshot(
        self, facts: Mapping[str, ImageFacts], stop: Callable[[], bool] = lambda: False
    ) -> tuple[Snapshot, dict[str, ImageFacts]]:
        with self._lock:
            images = tuple(
                Image(
                    id=i,
                    tags=tuple(sorted(r for r in img.refs if "@" not in r)),
                    digests=tuple(sorted(r for r in img.refs if "@" in r)),
                    parent=img.parent,
                    created=NOW.replace(year=2025),
                    size=1000,
                    labels={},
                    layers=(f"layer-{i}",),
                    layer_sizes=(1000,),
                )
                for i, img in self.images.items()
            )
            containers = tuple(
                Container(f"c-{name}", name, i, i, state, NOW.replace(year=2025))
                for name, (i, state) in self.containers.items()
            )
        return Snapshot(EngineInfo(self.url, "fake", "1.41"), images, containers), {}

    def stopped(self, container_ids: Sequence[str]) -> dict[str, ContainerState]:
        found = {}
        for container_id in container_ids:
            self._request("GET", container_id)
            name = container_id.removeprefix("c-")
            with self._lock:
                if name in self.containers:
                    found[container_id] = ContainerState(
                        self.containers[name][1], self.finished.get(name)
                    )
        return found

    def data_root(self) -> str | None:
        return None  # not on this host: pressure is not watched

    def accounted(self) -> int | None:
        return None  # it keeps no sizes

    def build_cache(self) -> tuple[BuildCacheEntry, ...] | None:
        self._request("GET", "/system/df")
        return self.cache

    def prune_build_cache(
        self, keep_storage: int | None, unused_for: int | None, until: datetime | None = None
    ) -> Pruned:
        self._request(
            "POST",
            f"/build/prune keep_storage={keep_storage} unused_for={unused_for}"
            + ("" if until is None else f" until={until.isoformat()}"),
        )
        return self.pruned

    def remove_container(self, container_id: str) -> None:
        self._request("DELETE", container_id)
        name = container_id.removeprefix("c-")
        with self._lock:
            if name not in self.containers:
                raise NotFoundError(f"No such container: {container_id}")
            if self.containers[name][1] not in ("exited", "created"):
                raise ConflictError(f"cannot remove container {name}: it is running")
            del self.containers[name]

    def current(self, image_id: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        self._request("GET", image_id)
        with self._lock:
            img = self.images.get(image_id)
            if img is None:
                return None
            tags = tuple(sorted(r for r in img.refs if "@" not in r))
            return tags, tuple(sorted(r for r in img.refs if "@" in r))

    def users(self, image_id: str) -> tuple[Container, ...]:
        self._request("GET", f"users:{image_id}")
        with self._lock:
            lineage = {i for i in self.images if image_id in self._ancestry(i)}
            return tuple(
                Container(f"c-{name}", name, i, i, state, NOW.replace(year=2025))
                for name, (i, state) in sorted(self.containers.items())
                if i in lineage
            )

    def removal_workers(self) -> int:
        return 8

    def concurrent_untags(self) -> bool:
        return self._concurrent_untags

    def loses_tags_amid_delete(self) -> bool:
        return self.loses_amid_tags

    def recheck(self, image_id: str, since: int | None = None) -> Recheck | None:
        self.rechecks.append((image_id, since))
        if self.guards_children:
            now = self.current(image_id)
            return None if now is None else Recheck(*now)
        self._request("GET", f"list:{image_id}")  # the image list, as gcd reads it there
        with self._lock:
            img = self.images.get(image_id)
            if img is None:
                return None
            return Recheck(
                tuple(sorted(r for r in img.refs if "@" not in r)),
                tuple(sorted(r for r in img.refs if "@" in r)),
                tuple(sorted(self._children(image_id))),
                tuple(self._dangling_parents(image_id) if self.prunes_parents else ()),
                self.shared_list_began or 0 if since is not None else 0,
            )

    def target(self, ref: str) -> str | None:
        self._request("GET", ref)
        with self._lock:
            return self.refs.get(ref)

    def tag(self, image_id: str, ref: str) -> None:
        with self._lock:
            if image_id not in self.images:
                raise NotFoundError(f"No such image: {image_id}")
            self._move(image_id, ref)
            self._event("tag", image_id, ref)

    def events(self, since_ns: int, until_ns: int) -> tuple[ImageEvent, ...]:
        self._request("GET", "events")
        with self._lock:
            hidden = set()
            if self.lagging_reads > 0:
                self.lagging_reads -= 1
                hidden = self.lagging_images or {e.image_id for e in self.log}
            return tuple(
                e
                for e in self.log
                if since_ns <= e.time_ns <= until_ns and e.image_id not in hidden
            )

    def logs_late(self) -> bool:
        return self.lags

    def alive(self) -> bool:
        self._request("GET", "_ping")
        return not self.down

    def delete(self, ref: str) -> Deletion:
        if ref in self.late:
            self._delete(ref)
            raise EngineUnavailable(
                "cannot reach the Docker engine at u: no answer within 3s (engine.timeout)",
                sent=True,
            )
        return self._delete(ref)

    def _delete(self, ref: str) -> Deletion:
        sent = self._now()
        self._request("DELETE", ref)
        with self._lock:
            deleted: list[str] = []
            untagged: list[str] = []
            if ref in self.images:
                image_id = ref
                img = self.images[image_id]
                tags = [r for r in img.refs if "@" not in r]
                repositories = {
                    split_ref(r)[0] if "@" not in r else r.partition("@")[0] for r in img.refs
                }
                if len(tags) > 1 or len(repositories) > 1:
                    raise ConflictError(
                        f"conflict: unable to delete {short_id(image_id)} (must be forced) - "
                        "image is referenced in multiple repositories"
                    )
                self._check_delete(image_id)
                names = list(img.refs)
                if self.amid_delete is not None:
                    self.amid_delete(image_id)
                for r in names:
                    self._untag(image_id, r, untagged)
                if self.loses_amid_tags:
                    for r in list(img.refs):  # gone without an event of their own
                        img.refs.remove(r)
                        del self.refs[r]
                # The containerd store keeps names made during the delete, and an image
                # that had a tag and has a child (as an untagged record): it says
                # `Deleted` all the same.
                tagged = any("@" not in r for r in names)
                if img.refs or (tagged and not self.guards_children and self._children(image_id)):
                    self._event("delete", image_id)
                    survived = tuple(sorted(img.refs))
                    return Deletion((), tuple(untagged), sent, self._now(), survived)
            else:
                image_id_or_none = self.refs.get(ref)
                if image_id_or_none is None:
                    raise NotFoundError(f"No such image: {ref}")
                image_id = image_id_or_none
                img = self.images[image_id]
                if len(img.refs) == 1 and self._user(image_id):
                    raise ConflictError(
                        f'conflict: unable to remove repository reference "{ref}" (must force) '
                        f"- container {self._user(image_id)} is using its referenced image"
                    )
                self._untag(image_id, ref, untagged)
                if img.refs or self._children(image_id):
                    return Deletion((), tuple(untagged), sent, self._now())
            self._delete_with_parents(image_id, deleted)
            return Deletion(tuple(deleted), tuple(untagged), sent, self._now())

    # --- the engine's rules -------------------------------------------------------------------

    def _ancestry(self, image_id: str) -> list[str]:
        out = [image_id]
        while (parent := self.images[out[-1]].parent) in self.images:
            out.append(parent)
        return out

    def _children(self, image_id: str) -> list[str]:
        return [i for i, img in self.images.items() if img.parent == image_id]

    def _user(self, image_id: str) -> str | None:
        return next((n for n, (i, _) in self.containers.items() if i == image_id), None)

    def _check_delete(self, image_id: str) -> None:
        user = self._user(image_id)
        if user is not None:
            raise ConflictError(
                f"conflict: unable to delete {short_id(image_id)} (must be forced) - image is "
                f"being used by stopped container {user}"
            )
        if self.guards_children and self._children(image_id):
            raise ConflictError(
                f"conflict: unable to delete {short_id(image_id)} (cannot be forced) - image "
                "has dependent child images"
            )

    def _untag(self, image_id: str, ref: str, untagged: list[str]) -> None:
        self.images[image_id].refs.remove(ref)
        del self.refs[ref]
        untagged.append(ref)
        self._event("untag", image_id)

    def _dangling_parents(self, image_id: str) -> list[str]:
        """The parents an engine that prunes deletes with this image: each untagged, unused
        and with no other child, up to the first that is not."""
        out, below = [], image_id
        while (parent := self.images[below].parent) in self.images:
            assert parent is not None
            img = self.images[parent]
            if img.refs or self._user(parent) or set(self._children(parent)) - {below}:
                break
            out.append(parent)
            below = parent
        return out

    def _delete_with_parents(self, image_id: str, deleted: list[str]) -> None:
        pruned = self._dangling_parents(image_id) if self.prunes_parents else []
        for gone in (image_id, *pruned):
            del self.images[gone]
            deleted.append(gone)
            self._event("delete", gone)
