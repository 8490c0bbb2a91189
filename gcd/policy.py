"""plan(snapshot, config, state, now) -> Plan: the retention policy as a pure function.

Mark and sweep. Roots are protected images, images a rule (or `unmatched: keep`) keeps, and
untagged images still inside their dangling grace; every ancestor of a root is kept too. The
rest is garbage. Safety guards then turn some removals back into keeps, and the sweep runs
again. No I/O, no logging, no clock: every decision carries the reasons that produced it.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import semver

from gcd.config import Config, Protect, Rule
from gcd.model import (
    ContainerDecision,
    Decision,
    Image,
    Plan,
    Pressure,
    Snapshot,
    StateView,
    familiar,
    short_id,
    split_ref,
)
from gcd.units import format_duration

# Reproducible builds stamp `created` with 1970 (SOURCE_DATE_EPOCH=0): not a signal of age.
CREATED_FLOOR = datetime(2000, 1, 1, tzinfo=UTC)
_OLDEST = datetime.min.replace(tzinfo=UTC)
_NATURAL_CHUNK = re.compile(r"\d+|\D+")


# A time ahead of now by more than this is no signal either: a 9999 `created` (a broken
# build, a hostile image) made an image young forever, so min_age protected it forever.
# Within it, a clock a little ahead counts as now.
FUTURE_SKEW = timedelta(minutes=5)


def image_age(image: Image, state: StateView, now: datetime) -> timedelta | None:
    """now - youngest(created, last_tag_time, first_seen); None when no signal exists."""
    limit = now + FUTURE_SKEW
    youngest = image.created if CREATED_FLOOR <= image.created <= limit else None
    signals = (image.last_tag_time, state.tagged.get(image.id), state.first_seen.get(image.id))
    for signal in signals:
        if signal is not None and signal <= limit and (youngest is None or signal > youngest):
            youngest = signal
    return None if youngest is None else max(now - youngest, timedelta(0))


def future_times(image: Image, now: datetime) -> str | None:
    """What the image claims about its times that lies beyond now (said in its reasons)."""
    limit = now + FUTURE_SKEW
    claims = [
        f"{what} {_iso(when)}"
        for what, when in (("created", image.created), ("tagged", image.last_tag_time))
        if when is not None and when > limit
    ]
    if not claims:
        return None
    return f"{' and '.join(claims)}: in the future, not taken as its age or rank"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Verdict:
    """Mutable working record for one image while the plan is built: a plain class with
    slots, one per image. Its collections are tuples that grow by `+=`, so that most of them
    stay the one shared empty tuple."""

    __slots__ = (
        "age",
        "evicted",
        "expire_reasons",
        "expired",
        "first_seen",
        "guard",
        "image",
        "keep_reasons",
        "kept_tags",
        "last_used",
        "min_age_protected",
        "parent_of",
        "protections",
        "ranked_out",
        "remove",
        "tagged",
    )

    def __init__(
        self,
        image: Image,
        age: timedelta | None,
        first_seen: datetime | None = None,
        last_used: datetime | None = None,
        tagged: datetime | None = None,
    ) -> None:
        self.image = image
        self.age = age
        self.first_seen = first_seen
        self.last_used = last_used
        # The later of the engine's tag time and the event follower's.
        engine = image.last_tag_time
        self.tagged = (
            engine if tagged is None or (engine is not None and engine > tagged) else tagged
        )
        self.protections: tuple[str, ...] = ()
        self.min_age_protected = False
        self.keep_reasons: tuple[str, ...] = ()
        self.expire_reasons: tuple[str, ...] = ()
        self.expired: tuple[tuple[str, str], ...] = ()
        # (tag, rule, reason) for each tag a rule ranked beyond what it keeps.
        self.ranked_out: tuple[tuple[str, str, str], ...] = ()
        self.kept_tags: tuple[str, ...] = ()
        self.guard: str | None = None
        self.parent_of: str | None = None
        self.remove = False
        self.evicted: str | None = None  # why disk pressure takes it


# (verdict, tag, name): a tag of a repository, split once.
_Tag = tuple[_Verdict, str, str]


def plan(
    snapshot: Snapshot,
    config: Config,
    state: StateView,
    now: datetime,
    containers: tuple[ContainerDecision, ...] = (),
    evict: Mapping[str, str] | None = None,
) -> Plan:
    """Decide, for every image of the snapshot, whether it is kept or removed, and why.
    `containers` is the plan for stopped containers (gcd/containers.py): those it removes
    keep no image. `evict` names images disk pressure takes (see `evictions`), each with its
    reason: removed unless protected, and `max_removal_fraction` does not hold them back."""
    evict = evict or {}
    verdicts = {
        i.id: _Verdict(
            i,
            image_age(i, state, now),
            state.first_seen.get(i.id),
            state.last_used.get(i.id),
            state.tagged.get(i.id),
        )
        for i in snapshot.images
    }
    repositories = _by_repository(verdicts)
    leaving = frozenset(c.container_id for c in containers if c.action == "remove")
    _protect(snapshot, config, verdicts, leaving)
    _apply_rules(config, verdicts, repositories, now, snapshot.engine.full_names)
    _mark_candidates(snapshot, config, state, now, verdicts)
    for image_id, why in evict.items():
        v = verdicts.get(image_id)
        if v is not None and not v.protections:
            v.remove, v.evicted = True, why
            v.expired = tuple((tag, PRESSURE_RULE) for tag in v.image.tags)
    # Images whose parent is in the store: the legacy builder's, or none at all. The sweeps
    # visit only these, not every image's record again.
    children = [v for v in verdicts.values() if v.image.parent in verdicts]
    _sweep(snapshot, verdicts, children)
    _guard(snapshot, config, verdicts, repositories)
    _sweep(snapshot, verdicts, children)
    _name_kept_children(verdicts, children)
    removed = {i for i, v in verdicts.items() if v.remove}
    freed = _fold_into_children(snapshot, removed, snapshot.freed_bytes(removed))
    decisions = tuple(
        _decide(snapshot, config.untag_expired, verdicts[i], freed.get(i, 0), now)
        for i in sorted(verdicts)
    )
    return Plan(snapshot, now, decisions, sum(freed.values()), containers)


def _by_repository(verdicts: dict[str, _Verdict]) -> dict[str, list[_Tag]]:
    """repository -> its tags, each split once, an image's tags one after another. Rules
    and guards work a repository at a time, and there are far fewer repositories than tags."""
    repositories: dict[str, list[_Tag]] = defaultdict(list)
    for v in verdicts.values():
        for tag in v.image.tags:
            repository, name = split_ref(tag)
            repositories[repository].append((v, tag, name))
    return repositories


# --- protection -------------------------------------------------------------------------------


def _protect(
    snapshot: Snapshot, config: Config, verdicts: dict[str, _Verdict], leaving: frozenset[str]
) -> None:
    full_names = snapshot.engine.full_names
    named: set[str] = set()  # ancestors already named a parent of an in-use image (once)
    for container in snapshot.containers:
        if container.image_id not in verdicts or container.id in leaving:
            continue
        verdicts[container.image_id].protections += (
            f"in use by container {container.name} ({container.state})",
        )
        for ancestor in snapshot.ancestors(container.image_id):
            if ancestor not in named:
                named.add(ancestor)
                verdicts[ancestor].protections += (
                    f"parent of in-use image {short_id(container.image_id)} "
                    f"(container {container.name})",
                )
    min_age = config.safety.min_age
    for v in verdicts.values():
        if v.age is not None and v.age < min_age:
            v.min_age_protected = True
            v.protections += (
                f"younger than safety.min_age {format_duration(min_age)} "
                f"(age {format_duration(v.age)})",
            )
        for entry in config.protect:
            hit = _protect_hit(entry, v.image, full_names)
            if hit:
                v.protections += (f'protect[{entry.index}] {entry.kind} "{entry.value}" {hit}',)


def _protect_hit(entry: Protect, image: Image, full_names: bool = False) -> str | None:
    """How `entry` matches `image` (for the reason), or None."""
    if entry.kind == "ref":
        for tag in image.tags:
            if fnmatch.fnmatchcase(tag, entry.value) or (
                full_names and fnmatch.fnmatchcase(familiar(tag), entry.value)
            ):
                return f"matches {tag}"
    elif entry.kind == "tag":
        assert entry.regex is not None
        for tag in image.tags:
            if entry.regex.fullmatch(split_ref(tag)[1]):
                return f"matches {tag}"
    elif entry.kind == "label":
        if entry.labels_match(image.labels):
            return "matches the image's labels"
    elif entry.kind == "id" and image.id.removeprefix("sha256:").startswith(
        entry.value.removeprefix("sha256:")
    ):
        return "matches the image ID"
    return None


# --- rules ------------------------------------------------------------------------------------


class _Entry:
    """One image in one group of a rule: the best key and the greatest of its tags there
    (what it ranks by), and those tags."""

    __slots__ = ("greatest", "key", "tags", "verdict")

    def __init__(self, key: Any, tag: str, verdict: _Verdict) -> None:
        self.key = key
        self.greatest = tag
        self.tags: tuple[str, ...] = (tag,)
        self.verdict = verdict

    def add(self, key: Any, tag: str) -> None:
        """One more of the image's tags in the group."""
        if key > self.key:
            self.key = key
        if tag > self.greatest:
            self.greatest = tag
        self.tags += (tag,)


# What a tag's name alone tells a rule: its sort key (None when unparsable, or when the key
# is the image's) and the values of the named groups that group_by uses.
_Parsed = tuple[Any, tuple[str | None, ...]]
_NAME_KEYS = ("semver", "numeric", "natural")


def _apply_rules(
    config: Config,
    verdicts: dict[str, _Verdict],
    repositories: dict[str, list[_Tag]],
    now: datetime,
    full_names: bool,
) -> None:
    """Rank each rule's groups, then settle each tag: kept if any rule keeps it, expired if
    a rule matched it and none kept it, else as `unmatched` says."""
    keeps: dict[str, list[str]] = defaultdict(list)
    names = {name for tags in repositories.values() for _, _, name in tags}
    # By name, so that reasons read the same whatever the order of the rules in the file, and
    # an image's (tag, rule) pairs come out sorted.
    for rule in sorted(config.rules, key=lambda r: r.name):
        groups = _groups(repositories, names, rule, keeps, now, full_names)
        for label, entries in groups.items():
            _rank_group(rule, label, entries, keeps)
    unmatched_keep = config.unmatched == "keep"
    for v in verdicts.values():
        if not v.image.tags:
            continue
        ranked_out: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for tag, rule_name, reason in v.ranked_out:
            ranked_out[tag].append((rule_name, reason))
        pairs: list[tuple[str, str]] = []
        # Ordered sets: an image's tags in one group share their rule's reason, said once.
        expire_reasons: dict[str, None] = {}
        kept_tags: list[str] = []
        keep_reasons: dict[str, None] = {}
        for tag in v.image.tags:
            kept = keeps.get(tag)
            if kept is not None:
                kept_tags.append(tag)
                keep_reasons.update(dict.fromkeys(kept))
            elif tag in ranked_out:
                for rule_name, reason in ranked_out[tag]:
                    pairs.append((tag, rule_name))
                    expire_reasons[reason] = None
            elif unmatched_keep:
                kept_tags.append(tag)
                keep_reasons[f"no rule matches {tag} (unmatched: keep)"] = None
            else:
                pairs.append((tag, "unmatched"))
                expire_reasons[f"no rule matches {tag} (unmatched: expire)"] = None
        v.ranked_out = ()
        v.expired, v.expire_reasons = tuple(sorted(pairs)), tuple(expire_reasons)
        v.kept_tags, v.keep_reasons = tuple(kept_tags), tuple(keep_reasons)


def _groups(
    repositories: dict[str, list[_Tag]],
    names: set[str],
    rule: Rule,
    keeps: dict[str, list[str]],
    now: datetime,
    full_names: bool,
) -> dict[str, list[_Entry]]:
    """group label -> one entry per image the rule matches in that group. A tag whose sort
    key cannot be parsed is kept here and ranks nowhere."""
    groups: dict[str, list[_Entry]] = {}
    named = tuple(g for g in rule.group_by if g != "repository")
    # Far fewer names than tags (build-7, 1.2.0 and main-3 recur across repositories): each
    # is matched once per rule.
    parse = _parser(rule, named)
    parsed = {name: parse(name) for name in names}
    image_key = None if rule.order_by.kind in _NAME_KEYS else _image_key_function(rule, now)
    # Where each image's entry is, in groups that span repositories: an image's names in
    # other repositories come later, after other images' entries.
    # Podman names one repository two ways (`localhost/app` from a load, `docker.io/library/
    # app` from a tag through its Docker API): one taxonomy, ranked as one group by the
    # short name, an image with both names once.
    spans = "repository" not in rule.group_by or full_names
    placed: dict[tuple[str, str], _Entry] = {}
    for repository, tags in repositories.items():
        if not rule.repository.fullmatch(repository) and not (
            full_names and rule.repository.fullmatch(familiar(repository))
        ):
            continue
        by_values: dict[tuple[str | None, ...], tuple[str, list[_Entry]]] = {}
        for v, tag, name in tags:
            hit = parsed[name]
            if hit is None:
                continue
            key, values = hit
            if image_key is not None:
                key = image_key(v)
            elif key is None:
                keeps[tag].append(f"{rule.name}: cannot order {tag} by {rule.order_by}; kept")
                continue
            group = by_values.get(values)
            if group is None:
                # A group left out of the match and an empty one share a label, and a list.
                shown = familiar(repository) if full_names else repository
                label = _label(rule, shown, dict(zip(named, values, strict=True)))
                group = by_values[values] = label, groups.setdefault(label, [])
            label, entries = group
            if entries and entries[-1].verdict is v:
                # Another tag of the image this group saw last: an image's tags in a
                # repository come one after another, so mostly no lookup is needed.
                entries[-1].add(key, tag)
            elif spans and (entry := placed.get((label, v.image.id))) is not None:
                entry.add(key, tag)
            else:
                entries.append(_Entry(key, tag, v))
                if spans:
                    placed[label, v.image.id] = entries[-1]
    return groups


def _parser(rule: Rule, named: tuple[str, ...]) -> Callable[[str], _Parsed | None]:
    """parse(name): None when the rule does not match the tag name, else what the name
    tells the rule. Made once per rule: it runs once per distinct name."""
    fullmatch = rule.tag.fullmatch
    excluded = rule.exclude_tag.fullmatch if rule.exclude_tag else None
    kind, group = rule.order_by.kind, rule.order_by.group or 0
    several, first = len(named) > 1, named[0] if named else None

    def parse(name: str) -> _Parsed | None:
        match = fullmatch(name)
        if match is None or (excluded is not None and excluded(name)):
            return None
        values = match.group(*named) if several else (match.group(first),) if first else ()
        if kind == "numeric":
            number = match.group(group)
            try:
                return (int(number) if number else None), values
            except ValueError:
                return None, values
        if kind == "semver":
            return _semver_key(match.group(group) or ""), values
        if kind == "natural":
            return _natural_key(name), values
        return None, values

    return parse


def _label(rule: Rule, repository: str, values: dict[str, str | None]) -> str:
    shown = (repository if g == "repository" else values[g] or "" for g in rule.group_by)
    return ", ".join(f"{g}={v}" for g, v in zip(rule.group_by, shown, strict=True)) or "(all)"


def _rank_group(rule: Rule, label: str, entries: list[_Entry], keeps: dict[str, list[str]]) -> None:
    """Keep the top keep_last images and those within keep_within; the rest are ranked out,
    noted on the image as (tag, rule, reason)."""
    _newest_first(entries)
    name, keep_last, keep_within = rule.name, rule.keep_last, rule.keep_within
    for rank, entry in enumerate(entries[:keep_last], start=1):
        reason = f"{name}: rank {rank} <= keep_last {keep_last} in group {label}"
        for tag in entry.tags:
            keeps[tag].append(reason)
    # An expiry's reason, but for its rank, is the same throughout the group: made once.
    head, tail = f"{name}: rank ", f" > keep_last {keep_last} in group {label}"
    for rank, entry in enumerate(entries[keep_last:], start=keep_last + 1):
        v = entry.verdict
        # An image with no age signal at all counts as old, as everywhere (else keep_within
        # would keep a reproducible build with no tag time forever).
        if keep_within is not None and v.age is not None and v.age < keep_within:
            reason = (
                f"{name}: age {format_duration(v.age)} < keep_within "
                f"{format_duration(keep_within)} in group {label}"
            )
            for tag in entry.tags:
                keeps[tag].append(reason)
            continue
        reason = f"{head}{rank}{tail}"
        v.ranked_out += tuple((tag, name, reason) for tag in entry.tags)


def _newest_first(entries: list[_Entry]) -> None:
    """Greater key first; ties go to the later created image, then to the greater tag name,
    then to the greater image ID. The image is read only where keys tie (its record lies
    elsewhere in memory)."""
    if len({e.key for e in entries}) == len(entries):
        entries.sort(key=attrgetter("key"), reverse=True)
    else:
        entries.sort(
            key=lambda e: (e.key, e.verdict.image.created, e.greatest, e.verdict.image.id),
            reverse=True,
        )


def _image_key_function(rule: Rule, now: datetime) -> Callable[[_Verdict], Any]:
    """For the orders that rank the image rather than the tag's name: the value sorted on,
    greater is newer."""
    kind = rule.order_by.kind
    if kind == "last_used":
        return lambda v: v.last_used or _OLDEST
    limit = now + FUTURE_SKEW

    def created(v: _Verdict) -> datetime:
        # A created in the future (future_times) ranks as when gcd first saw the image.
        c = v.image.created
        return c if c <= limit else v.first_seen or now

    if kind == "created":
        return created
    if kind == "tagged":
        return lambda v: t if (t := v.tagged) and t <= limit else created(v)
    return lambda v: v.first_seen or created(v)


def _natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    return tuple(
        (0, int(c), "") if c.isdigit() else (1, 0, c) for c in _NATURAL_CHUNK.findall(name)
    )


def _semver_key(value: str) -> tuple[Any, ...] | None:
    """SemVer 2.0 precedence as a plain tuple (compared in C, unlike semver.Version): a
    release sorts above its pre-releases; pre-release identifiers compare numerically when
    numeric, numeric below alphanumeric, and a longer list above its prefix. Build metadata
    is ignored."""
    try:
        v = semver.Version.parse(
            value.removeprefix("v").removeprefix("V"), optional_minor_and_patch=True
        )
    except ValueError:
        return None
    if not v.prerelease:
        return (v.major, v.minor, v.patch, 1)
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in v.prerelease.split("."))
    return (v.major, v.minor, v.patch, 0, ids)


# --- marking, sweeping, guards ----------------------------------------------------------------


def _mark_candidates(
    snapshot: Snapshot,
    config: Config,
    state: StateView,
    now: datetime,
    verdicts: dict[str, _Verdict],
) -> None:
    """First pass: removal candidates are unprotected images whose every tag expired, and
    dangling images past their grace. Intermediates wait for the sweep."""
    for v in verdicts.values():
        image = v.image
        if v.protections:
            continue
        if image.tags:
            v.remove = not v.kept_tags
            continue
        if snapshot.children(image.id):
            v.remove = True  # an intermediate: kept by the sweep if any descendant is kept
            continue
        if config.dangling.action == "keep":
            v.keep_reasons += ("dangling (dangling.action: keep)",)
            continue
        since = state.first_seen_dangling.get(image.id)
        grace = format_duration(config.dangling.min_age)
        measured: timedelta | None
        if since is not None:
            measured = now - since
            what = f"dangling for {format_duration(measured)}"
        else:
            # Dangling since before gcd's records began: the image's own age stands in, and
            # the reason says it is the age that was measured.
            measured = v.age
            age = "unknown (counts as old)" if v.age is None else format_duration(v.age)
            what = f"dangling since before gcd's records began, age {age}"
        if measured is not None and measured < config.dangling.min_age:
            v.keep_reasons += (f"{what} < dangling.min_age {grace}",)
        else:
            v.expire_reasons += (f"{what} >= dangling.min_age {grace}",)
            v.remove = True


def _sweep(snapshot: Snapshot, verdicts: dict[str, _Verdict], children: list[_Verdict]) -> None:
    """Every ancestor of a kept image is kept: the engine could not delete it anyway."""
    for v in children:
        if v.remove:
            continue
        for ancestor in snapshot.ancestors(v.image.id):
            verdicts[ancestor].remove = False


def _name_kept_children(verdicts: dict[str, _Verdict], children: list[_Verdict]) -> None:
    """parent_of: the parent's kept child with the least ID, named in the parent's reasons.
    Once the plan is final: guards keep images, and keep their parents."""
    for v in children:
        if v.remove:
            continue
        parent = verdicts[v.image.parent or ""]
        if parent.parent_of is None or v.image.id < parent.parent_of:
            parent.parent_of = v.image.id


def _merged_by_familiar_name(
    by_repository: list[tuple[str, list[_Verdict]]],
) -> list[tuple[str, list[_Verdict]]]:
    """Podman's `localhost/app` and `docker.io/library/app` as the one repository `app` the
    rules rank them in (an image with both names once)."""
    merged: dict[str, dict[str, _Verdict]] = {}
    for repository, members in by_repository:
        into = merged.setdefault(familiar(repository), {})
        for v in members:
            into.setdefault(v.image.id, v)
    return sorted((name, list(members.values())) for name, members in merged.items())


def _guard(
    snapshot: Snapshot,
    config: Config,
    verdicts: dict[str, _Verdict],
    repositories: dict[str, list[_Tag]],
) -> None:
    """Each repository guard judges the plan as the rules left it, then all refusals apply
    at once: refusing an image of one repository must not change how another repository
    (that image's other name) is judged, or the outcome would hang on the order they are
    visited, and a second cycle could remove what the first refused."""
    safety = config.safety
    by_repository: list[tuple[str, list[_Verdict]]] = []
    for repository, tags in sorted(repositories.items()):
        members: list[_Verdict] = []
        for v, _, _ in tags:
            if not members or members[-1] is not v:  # an image's tags come one after another
                members.append(v)
        by_repository.append((repository, members))
    if snapshot.engine.full_names:
        by_repository = _merged_by_familiar_name(by_repository)
    refusals: list[tuple[_Verdict, str]] = []
    for repository, members in by_repository:
        removing = [v for v in members if v.remove and v.evicted is None]
        if removing and len(removing) / len(members) > safety.max_removal_fraction:
            why = (
                f"guard safety.max_removal_fraction: would remove {len(removing)} of "
                f"{len(members)} tagged images of {repository} "
                f"({len(removing) / len(members):.0%} > {safety.max_removal_fraction:.0%})"
            )
            refusals.extend((v, why) for v in removing)
    for v, why in refusals:
        _refuse(v, why)
    if safety.keep_one_per_repository:
        refusals = [
            (
                max(members, key=lambda v: (v.image.created, max(v.image.tags))),
                f"guard safety.keep_one_per_repository: last tagged image of {repository}",
            )
            for repository, members in by_repository
            if all(v.remove for v in members)
        ]
        for v, why in refusals:
            _refuse(v, why)
    direct = [v for v in verdicts.values() if v.remove and not _is_implied(snapshot, v.image)]
    if len(direct) > safety.max_removals_per_run:
        # Oldest first: an image with no age signal counts as the oldest of all.
        direct.sort(
            key=lambda v: (v.age is not None, -(v.age or timedelta()).total_seconds(), v.image.id)
        )
        for v in direct[safety.max_removals_per_run :]:
            _refuse(
                v,
                f"guard safety.max_removals_per_run: {safety.max_removals_per_run} removals "
                "reached; older images go first",
            )


def _refuse(v: _Verdict, why: str) -> None:
    v.remove = False
    if v.guard is None:
        v.guard = why


def _is_implied(snapshot: Snapshot, image: Image) -> bool:
    """An untagged, unreferenced parent: the engine deletes it with its last child."""
    return not image.tags and not image.digests and bool(snapshot.children(image.id))


# --- bytes and decisions ----------------------------------------------------------------------


def _fold_into_children(
    snapshot: Snapshot, removed: set[str], freed: dict[str, int]
) -> dict[str, int]:
    """A parent without a name goes with the child its reason names (sorted first; the
    executor deletes it right after), so its bytes count in that child's row: each row says
    what its removal frees, parents included, and the rows still add up to the total."""
    for image_id in list(freed):
        owner = intermediate_owner(snapshot, image_id)
        if owner is not None and owner in removed:
            freed[owner] = freed.get(owner, 0) + freed.pop(image_id)
    return freed


def intermediate_owner(snapshot: Snapshot, image_id: str) -> str | None:
    """The descendant whose row counts this parent's bytes (see _fold_into_children)."""
    if not _is_implied(snapshot, snapshot.image(image_id)):
        return None
    child = image_id
    while _is_implied(snapshot, snapshot.image(child)):
        child = sorted(snapshot.children(child))[0]
    return child


def parents_going_with(snapshot: Snapshot, image_id: str, plan: Plan) -> list[str]:
    """The parents without a name that go when `image_id` goes, nearest first: for a removed
    image those whose bytes its row counts; for a kept one those that would go with it."""
    found: list[str] = []
    parent = snapshot.image(image_id).parent
    if plan.decision(image_id).action == "remove":
        while (
            parent is not None
            and parent in snapshot
            and intermediate_owner(snapshot, parent) == image_id
        ):
            found.append(parent)
            parent = snapshot.image(parent).parent
        return found
    while parent is not None and parent in snapshot:
        image = snapshot.image(parent)
        if image.tags or image.digests or plan.decision(parent).action == "remove":
            break
        going = {image_id, *found}
        if any(
            c not in going and plan.decision(c).action != "remove"
            for c in snapshot.children(parent)
        ):
            break  # another child stays: so does the parent
        found.append(parent)
        parent = image.parent
    return found


def _decide(
    snapshot: Snapshot, untag_expired: bool, v: _Verdict, freed: int, now: datetime
) -> Decision:
    image = v.image
    # Said last: the first reason is the one a table row shows.
    told = future_times(image, now)
    note = (told,) if told else ()
    tags = image.tags  # sorted by the engine adapter
    expired = v.expired  # sorted by _apply_rules
    dangling = not tags and snapshot.is_dangling(image.id)
    if v.remove:
        removal = v.expire_reasons if v.evicted is None else (v.evicted,)
        if not tags and snapshot.children(image.id):
            child = sorted(snapshot.children(image.id))[0]
            removal += (f"intermediate: goes with its last child {short_id(child)}",)
        return Decision(
            image.id,
            tags,
            "remove",
            removal + note,
            bytes=freed,
            implied=_is_implied(snapshot, image),
            dangling=dangling,
            expired=expired,
            evicted=v.evicted is not None,
        )
    guard, parent_of = v.guard, v.parent_of
    reasons = v.protections
    if guard:
        reasons += (guard,)
    if parent_of:
        reasons += (f"parent of kept image {short_id(parent_of)}",)
    reasons += v.keep_reasons
    untag: tuple[str, ...] = ()
    # Untag only where a name stays, the image is not young, and no guard refused it.
    if untag_expired and expired and v.kept_tags and not guard and not v.min_age_protected:
        untag = tuple(sorted({tag for tag, _ in expired}))
        reasons += tuple(f"untag {tag}: expired" for tag in untag)
    # What would have removed it, so a kept image still explains what expired. (No reason
    # for a removal reads like one for a keep, so none repeats.)
    reasons += v.expire_reasons
    if not reasons:
        reasons = ("kept: nothing expired it",)
    return Decision(
        image.id,
        tags,
        "keep",
        reasons + note,
        untag=untag,
        protected=bool(v.protections) or parent_of is not None,
        dangling=dangling,
        expired=expired,
        pinned=bool(v.protections),
    )


# The rule name pressure's removals count under (gcd_tags_removed_total, regrets).
PRESSURE_RULE = "disk pressure"


def evictions(
    plan: Plan,
    state: StateView,
    pressure: Pressure,
    still: int,
    now: datetime,
    keep_one: bool,
) -> dict[str, str]:
    """Images the rules keep that pressure takes, least recently used first, until the
    bytes left to free (`still`, inodes counted as bytes: disk.bytes_needed) are predicted
    freed: each step's
    bytes are the layers no image that stays holds any more. Never a protected image (in
    use, young, matched by `protect`), never an image with a child that stays, never the
    last tagged image of a repository under keep_one_per_repository (the plan's guard
    refuses those again). Images never used rank by their age."""
    snapshot = plan.snapshot
    removing = {d.image_id for d in plan.removals()}
    staying = [i for i in snapshot.images if i.id not in removing]
    holders: dict[str, int] = defaultdict(int)
    for image in staying:
        for layer, _ in image.layer_bytes():
            holders[layer] += 1
    children: dict[str, int] = defaultdict(int)
    for image in staying:
        if image.parent:
            children[image.parent] += 1
    tagged: dict[str, int] = defaultdict(int)
    for image in staying:
        for repository in {split_ref(t)[0] for t in image.tags}:
            tagged[repository] += 1

    def last_use(image: Image) -> tuple[datetime, str]:
        used = state.last_used.get(image.id)
        if used is not None:
            return used, image.id
        age = image_age(image, state, now)
        return (now - age if age is not None else _OLDEST), image.id

    chosen: dict[str, str] = {}
    ordered = sorted(staying, key=last_use)
    # A parent can go once its children have: passes until one takes nothing more.
    while still > 0:
        taken = len(chosen)
        for image in ordered:
            if still <= 0:
                break
            if image.id in chosen:
                continue
            if plan.decision(image.id).pinned or children[image.id]:
                continue
            repositories = {split_ref(t)[0] for t in image.tags}
            if keep_one and any(tagged[r] <= 1 for r in repositories):
                continue
            freed = 0
            for layer, size in image.layer_bytes():
                holders[layer] -= 1
                if holders[layer] == 0:
                    freed += size
            for r in repositories:
                tagged[r] -= 1
            if image.parent:
                children[image.parent] -= 1
            used = state.last_used.get(image.id)
            when = (
                f"last used {format_duration(now - used)} ago"
                if used is not None
                else f"never seen in use, age {format_duration(now - last_use(image)[0])}"
            )
            chosen[image.id] = f"{pressure.reason}; least recently used ({when})"
            still -= freed
        if len(chosen) == taken:
            break
    return chosen
