"""The data gcd works on: frozen values with no I/O and no docker import."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from types import MappingProxyType
from typing import Literal, NamedTuple

DecisionKind = Literal["keep", "remove"]
OutcomeKind = Literal["planned", "done", "skipped", "failed"]


def short_id(image_id: str) -> str:
    """The 12-hex-digit form `docker images` prints."""
    return image_id.removeprefix("sha256:")[:12]


def split_ref(ref: str) -> tuple[str, str]:
    """`registry:5000/team/app:1.2` -> (`registry:5000/team/app`, `1.2`)."""
    repository, _, tag = ref.rpartition(":")
    return repository, tag


# How Podman names what Docker shows as `app:1`, `demo:1.0` and `team/app:1` (docs/engines.md).
_FULL_PREFIXES = ("localhost/", "docker.io/library/", "docker.io/")


def familiar(ref: str) -> str:
    """`localhost/app:1` -> `app:1`, `docker.io/library/demo:1.0` -> `demo:1.0`,
    `docker.io/team/app` -> `team/app`: the short form a Docker user writes."""
    for prefix in _FULL_PREFIXES:
        if ref.startswith(prefix) and len(ref) > len(prefix):
            return ref[len(prefix) :]
    return ref


@dataclass(frozen=True, slots=True)
class EngineInfo:
    url: str
    server_version: str
    api_version: str
    kind: str = "docker"  # docker | podman
    # The image store: overlay2 (Docker's classic graphdriver), containerd (Docker's
    # containerd image store), or the graph driver Podman or an older Docker names.
    store: str = "overlay2"

    @property
    def full_names(self) -> bool:
        """Names come back in full (Podman): `app` and `demo:1.0` in a policy or on the
        command line also match `localhost/app` and `docker.io/library/demo:1.0`."""
        return self.kind == "podman"

    def __str__(self) -> str:
        name = "Podman" if self.kind == "podman" else "Docker"
        store = "containerd image store" if self.store == "containerd" else self.store
        return f"{name} {self.server_version} (API {self.api_version}, {store}) at {self.url}"


@dataclass(frozen=True, slots=True)
class Image:
    id: str
    tags: tuple[str, ...]
    digests: tuple[str, ...]
    parent: str | None
    created: datetime
    size: int
    labels: Mapping[str, str]
    last_tag_time: datetime | None = None
    # Chain IDs bottom first and their sizes: what the store really holds, so bytes can be
    # counted once per layer however many images share it.
    layers: tuple[str, ...] = ()
    layer_sizes: tuple[int, ...] = ()

    @property
    def short_id(self) -> str:
        return short_id(self.id)

    def layer_bytes(self) -> Iterator[tuple[str, int]]:
        """(layer key, bytes) pairs; an image whose layers are unknown counts as one layer."""
        if self.layers:
            yield from zip(self.layers, self.layer_sizes, strict=True)
        else:
            yield self.id, self.size


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    name: str
    image_id: str
    image: str
    state: str
    created: datetime
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return short_id(self.id)


@dataclass(frozen=True, slots=True)
class Usage:
    """One statvfs of `path`, as `df` reads it: the used share is used / (used + available
    to unprivileged users), so the blocks reserved for root count as full."""

    path: str
    used_bytes: int
    avail_bytes: int
    total_inodes: int
    used_inodes: int

    @property
    def bytes_ratio(self) -> float:
        size = self.used_bytes + self.avail_bytes
        return self.used_bytes / size if size else 0.0

    @property
    def inodes_ratio(self) -> float:
        return self.used_inodes / self.total_inodes if self.total_inodes else 0.0


@dataclass(frozen=True, slots=True)
class Pressure:
    """What is over its mark, and what freeing must reach: bytes to free (the filesystem's
    and the budget's, whichever is more) and inodes to free."""

    usage: Usage
    over: tuple[str, ...]  # "used 91% >= high 85%", ...
    bytes_to_free: int
    inodes_to_free: int
    needed: int = 0  # bytes to free in all, inodes counted as bytes (disk.bytes_needed)

    @property
    def reason(self) -> str:
        return f"disk pressure: {'; '.join(self.over)}"


class ContainerUse(NamedTuple):
    """A container created or started (an engine event): its image was used then."""

    time_ns: int
    container_id: str
    image: str  # the image as the container names it (a tag, or an ID)


class Regret(NamedTuple):
    """A tag gcd removed (with its image) that came back within `regret_window`."""

    tag: str
    rule: str  # the rule that expired it, or "unmatched"
    removed_at: datetime
    seen_at: datetime


class BuildCacheEntry(NamedTuple):
    """One record of BuildKit's cache (`/system/df`)."""

    id: str
    size: int
    in_use: bool
    last_used: datetime  # or when it was made, if never used since


class BuildCachePlan(NamedTuple):
    """The build cache as the snapshot found it, and what `build_cache` would prune: an
    estimate (BuildKit decides entry by entry; the report gives what it did)."""

    entries: int
    bytes: int
    keep_storage: int | None
    unused_for: int | None  # seconds
    # (entries, bytes) it would prune for being unused long, then for the size.
    unused: tuple[int, int] = (0, 0)
    over: tuple[int, int] = (0, 0)
    available: bool = True  # False: the engine keeps no BuildKit cache (Podman)
    # Disk pressure: every unused entry last used before `until` goes too (strictly
    # least recently used first), (entries, bytes) beyond the two above.
    until: datetime | None = None
    pressed: tuple[int, int] = (0, 0)

    def planned(self) -> tuple[int, int]:
        """(entries, bytes) the plan expects to prune, all steps together."""
        parts = (self.unused, self.over, self.pressed)
        return sum(n for n, _ in parts), sum(b for _, b in parts)


class Pruned(NamedTuple):
    """What one build cache prune removed, as the engine says."""

    deleted: tuple[str, ...]
    reclaimed: int


class BuildCacheOutcome(NamedTuple):
    status: OutcomeKind
    entries: int = 0
    reclaimed: int = 0
    error: str | None = None


# The container states `containers.remove_exited_after` may remove: run and ended, or never
# started. Never running, paused, restarting, removing or dead ones.
REMOVABLE_STATES = ("exited", "created")


class ContainerState(NamedTuple):
    """A stopped container as an inspect shows it: its state (`exited`, `created`) and when
    it finished (None if it never ran)."""

    state: str
    finished: datetime | None


class ContainerDecision(NamedTuple):
    """What the plan says of one stopped container (`containers.remove_exited_after`)."""

    container_id: str
    name: str
    image_id: str
    state: str
    action: DecisionKind
    reason: str
    # When it finished (exited) or was created (never started): what its age counts from;
    # the executor skips it if an inspect right before the removal shows another.
    since: datetime | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent read of the engine plus the graph queries the planner needs."""

    engine: EngineInfo
    images: tuple[Image, ...]
    containers: tuple[Container, ...]
    _by_id: Mapping[str, Image] = field(init=False, repr=False, compare=False)
    _children: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _users: Mapping[str, tuple[Container, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = {image.id: image for image in self.images}
        children: dict[str, list[str]] = {}
        for image in self.images:
            if image.parent and image.parent in by_id:
                children.setdefault(image.parent, []).append(image.id)
        users: dict[str, list[Container]] = {}
        for container in self.containers:
            users.setdefault(container.image_id, []).append(container)
        object.__setattr__(self, "_by_id", MappingProxyType(by_id))
        object.__setattr__(
            self, "_children", MappingProxyType({k: tuple(v) for k, v in children.items()})
        )
        object.__setattr__(
            self, "_users", MappingProxyType({k: tuple(v) for k, v in users.items()})
        )

    def image(self, image_id: str) -> Image:
        return self._by_id[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._by_id

    def children(self, image_id: str) -> tuple[str, ...]:
        return self._children.get(image_id, ())

    def users(self, image_id: str) -> tuple[Container, ...]:
        """Containers in any state created from exactly this image."""
        return self._users.get(image_id, ())

    def ancestors(self, image_id: str) -> Iterator[str]:
        """Parent, grandparent, ... of an image, as far as the store holds them."""
        seen = {image_id}
        parent = self._by_id[image_id].parent
        while parent and parent in self._by_id and parent not in seen:
            seen.add(parent)
            yield parent
            parent = self._by_id[parent].parent

    def depth(self, image_id: str) -> int:
        return sum(1 for _ in self.ancestors(image_id))

    def is_dangling(self, image_id: str) -> bool:
        """No tag and no child image (digest references are allowed)."""
        return not self._by_id[image_id].tags and not self.children(image_id)

    def freed_bytes(self, removed: set[str]) -> dict[str, int]:
        """Bytes that removing `removed` frees, per image, every layer counted once.

        A layer is freed when every image holding it goes; it is credited to the removed
        image that holds the fewest layers (the one closest to the base), so the per-image
        figures add up to the total without counting a shared layer twice.
        """
        # The layers an image that stays holds, gathered in C: the store's every layer passes
        # through here, 500,000 at N = 100,000.
        held = set(
            chain.from_iterable(i.layers or (i.id,) for i in self.images if i.id not in removed)
        )
        freed: dict[str, int] = {}
        owned: set[str] = set()
        for image in sorted(
            (self._by_id[i] for i in removed if i in self._by_id),
            key=lambda i: (len(i.layers), i.id),
        ):
            for layer, size in image.layer_bytes():
                if layer not in held and layer not in owned:
                    owned.add(layer)
                    freed[image.id] = freed.get(image.id, 0) + size
        return freed

    def resolve(self, ref_or_id: str) -> Image | None:
        """An image by tag (`demo` means `demo:latest`), full ID, or unique ID prefix."""
        wanted = ref_or_id if ":" in ref_or_id.rpartition("/")[2] else f"{ref_or_id}:latest"
        for image in self.images:
            if wanted in image.tags or ref_or_id in image.digests:
                return image
        if self.engine.full_names:
            for image in self.images:
                if any(familiar(t) == wanted for t in image.tags):
                    return image
        hex_part = ref_or_id.removeprefix("sha256:")
        if len(hex_part) >= 4 and all(c in "0123456789abcdef" for c in hex_part):
            found = [i for i in self.images if i.id.removeprefix("sha256:").startswith(hex_part)]
            if len(found) == 1:
                return found[0]
        return None


@dataclass(frozen=True, slots=True)
class StateView:
    """What gcd itself remembers about images (Docker records none of it)."""

    new_store: bool
    first_seen: Mapping[str, datetime] = field(default_factory=dict)
    first_seen_dangling: Mapping[str, datetime] = field(default_factory=dict)
    last_used: Mapping[str, datetime] = field(default_factory=dict)
    # When a tag last came onto the image (or it was loaded, pulled, imported), from the
    # daemon's event follower: a tag time where the engine keeps none (Podman) or an older
    # one.
    tagged: Mapping[str, datetime] = field(default_factory=dict)


class Decision(NamedTuple):
    """What the plan says of one image (`action`: keep or remove), and why. A named tuple,
    where the other values are frozen dataclasses: a plan makes one per image, and a frozen
    dataclass sets each field through object.__setattr__. Just as immutable; nothing
    iterates or indexes it."""

    image_id: str
    tags: tuple[str, ...]
    action: DecisionKind
    reasons: tuple[str, ...]
    untag: tuple[str, ...] = ()
    bytes: int = 0
    # An untagged parent removed right after its last child (by gcd, by ID).
    implied: bool = False
    protected: bool = False
    dangling: bool = False
    # (tag, rule name or "unmatched") for every tag that expired on this image.
    expired: tuple[tuple[str, str], ...] = ()
    evicted: bool = False  # taken by disk pressure beyond what the rules remove
    # Protected itself (in use, young, `protect`), not only as a parent of a kept image.
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    snapshot: Snapshot
    now: datetime
    decisions: tuple[Decision, ...]
    reclaimable_bytes: int
    # Stopped containers, when `containers.remove_exited_after` is set; removed first.
    containers: tuple[ContainerDecision, ...] = ()
    # BuildKit's cache, when `build_cache` is set; pruned last.
    build_cache: BuildCachePlan | None = None
    # The watched filesystem (`disk`) at planning time, and its pressure if any.
    disk: Usage | None = None
    pressure: Pressure | None = None
    _by_id: Mapping[str, Decision] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_by_id", MappingProxyType({d.image_id: d for d in self.decisions})
        )

    def removals(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action == "remove")

    def container_removals(self) -> tuple[ContainerDecision, ...]:
        return tuple(c for c in self.containers if c.action == "remove")

    def decision(self, image_id: str) -> Decision:
        return self._by_id[image_id]


@dataclass(frozen=True, slots=True)
class Outcome:
    image_id: str
    status: OutcomeKind
    reason: str | None = None
    error: str | None = None
    untagged: tuple[str, ...] = ()
    # Why it was skipped, as a metric label: gone, in_use, tag_changed, conflict,
    # child_kept, parent_kept, no_tag_left, stopped, engine_down; or "unplanned" on a failed keep.
    code: str | None = None
    # Images the engine deleted while carrying this action out that the plan did not remove.
    unplanned: tuple[str, ...] = ()
    # Tags gcd took from another image by mistake (it was moved there meanwhile) and put back.
    restored: tuple[str, ...] = ()


class ContainerOutcome(NamedTuple):
    """How a container removal ended: done, skipped (with a reason and a code: gone,
    changed, conflict, stopped, engine_down) or failed (with the error)."""

    status: OutcomeKind
    reason: str | None = None
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    plan: Plan
    dry_run: bool
    started_at: datetime
    outcomes: Mapping[str, Outcome]
    reclaimed_bytes: int = 0
    # What gcd's state store could not read, vouch for or record in this cycle: an error.
    state_problem: str | None = None
    # By container ID, for the plan's container removals.
    container_outcomes: Mapping[str, ContainerOutcome] = field(default_factory=dict)
    build_cache: BuildCacheOutcome | None = None
    # Tags removed within regret_window that this cycle found back.
    regrets: tuple[Regret, ...] = ()
    # The watched filesystem measured again after the removals (plan.disk is before).
    disk_after: Usage | None = None
    # The engine's own count of its image store's bytes right before and after the
    # removals (Engine.accounted); None where it keeps none or was not asked (no removals).
    accounted_before: int | None = None
    accounted_after: int | None = None

    def outcome(self, image_id: str) -> Outcome:
        return self.outcomes[image_id]

    def count(self, kind: OutcomeKind) -> int:
        """Images whose outcome is `kind`."""
        return sum(1 for o in self.outcomes.values() if o.status == kind)

    def planned_to_free(self) -> int:
        """What the plan frees on disk, as predicted: images (each layer once) and build
        cache."""
        planned = self.plan.reclaimable_bytes
        if self.plan.build_cache is not None:
            planned += self.plan.build_cache.unused[1] + self.plan.build_cache.over[1]
        return planned

    def short_of_low(self) -> int:
        """Bytes disk pressure still had to free after all it planned (0: none)."""
        pressure = self.plan.pressure
        return 0 if pressure is None else max(0, pressure.needed - self.planned_to_free())

    def freed_measured(self) -> int:
        """How much the watched filesystem's used bytes dropped over the removals."""
        if self.plan.disk is None or self.disk_after is None:
            return 0
        return max(0, self.plan.disk.used_bytes - self.disk_after.used_bytes)

    def freed_accounted(self) -> int | None:
        """How much the engine's own count of its image store dropped over the removals."""
        if self.accounted_before is None or self.accounted_after is None:
            return None
        return max(0, self.accounted_before - self.accounted_after)

    def containers_removed(self) -> int:
        return sum(1 for o in self.container_outcomes.values() if o.status == "done")

    def failed(self) -> bool:
        """Whether the cycle failed (exit 1): a removal failed, the engine deleted what the
        plan did not remove, or the state store had a problem."""
        container_failed = any(o.status == "failed" for o in self.container_outcomes.values())
        cache_failed = self.build_cache is not None and self.build_cache.status == "failed"
        return bool(
            self.count("failed")
            or container_failed
            or cache_failed
            or self.unplanned()
            or self.state_problem
        )

    def unplanned(self) -> tuple[str, ...]:
        """Images the engine deleted that the plan did not remove: each is an error."""
        return tuple(sorted({i for o in self.outcomes.values() for i in o.unplanned}))

    def restored(self) -> tuple[str, ...]:
        return tuple(t for o in self.outcomes.values() for t in o.restored)

    def removed(self) -> set[str]:
        """IDs of the images this cycle removed (planned removals whose outcome is done)."""
        return {
            d.image_id
            for d in self.plan.decisions
            if d.action == "remove" and self.outcomes[d.image_id].status == "done"
        }


class Recheck(NamedTuple):
    """An image as one fresh read of the engine shows it right before its removal. Where
    the engine deletes a parent under its children (the containerd store, Podman) that read
    is an image list, which also gives the image's children and what the engine would
    prune with it; dockerd's classic store guards both itself, and an inspect does."""

    tags: tuple[str, ...]
    digests: tuple[str, ...]
    children: tuple[str, ...] = ()
    # Untagged parents the engine would delete along with it although asked not to.
    pruned: tuple[str, ...] = ()
    # When the read began (nanoseconds, this host's clock): a shared list may have begun
    # before the re-check asked for it (see Engine.recheck's `since`). 0: when asked.
    read_ns: int = 0


@dataclass(frozen=True, slots=True)
class Deletion:
    """The engine's answer to one `DELETE /images/{ref}`, with when it was sent and answered
    (nanoseconds on the engine's clock), so the engine's events can be matched to it."""

    deleted: tuple[str, ...]  # image IDs and layer chain IDs, as the engine lists them
    untagged: tuple[str, ...]  # references it removed, tags and digests
    sent_ns: int
    answered_ns: int
    # An image deleted by ID that is still there although the engine answered `Deleted`
    # (the containerd store keeps a tag made while it deletes): the references it still
    # has, and its ID is not in `deleted`. None where the image went.
    survived: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ImageEvent:
    """One image event of the engine's event log: `tag`, `untag`, `delete`, `load`, ..."""

    time_ns: int
    action: str
    image_id: str
    name: str  # a tag for `tag` events; often the image ID itself for others


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What only an inspect tells about an image; cached by ID (content addressed).

    `tags` is the tag set when it was read: LastTagTime is the one fact that changes, and it
    changes only when the tags do.
    """

    tags: tuple[str, ...]
    layers: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    last_tag_time: datetime | None
    # `Created` at the engine's full precision (the list API gives whole seconds, and two
    # builds within one second must still rank in the order they were made).
    created: datetime | None = None
