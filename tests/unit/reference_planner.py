"""A slow planner, written straight from "How gcd decides" (docs/configuration.md), for tests
only: one pass per step, plain dicts and lists, no shortcut. The property in
test_properties.py holds gcd's planner (gcd/policy.py, tuned for 100,000 images) to the same
decisions, tags to untag and reasons, word for word and in order, on every generated store."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import semver

from gcd.config import Config, Protect, Rule
from gcd.model import Image, Snapshot, StateView, familiar, short_id, split_ref
from gcd.units import format_duration as fd

SKEW = timedelta(minutes=5)  # a time further ahead of now is no signal
FLOOR = datetime(2000, 1, 1, tzinfo=UTC)  # a `created` before it is no signal


@dataclass
class Verdict:
    action: str
    reasons: tuple[str, ...]
    untag: tuple[str, ...] = ()


@dataclass
class _Image:
    image: Image
    age: timedelta | None
    protections: list[str] = field(default_factory=list)
    young: bool = False
    keeps: dict[str, list[str]] = field(default_factory=dict)  # tag -> why kept
    expiries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # tag -> (rule, why)
    matched: set[str] = field(default_factory=set)  # tags some rule matched
    reasons_keep: list[str] = field(default_factory=list)
    reasons_expire: list[str] = field(default_factory=list)
    remove: bool = False
    guard: str | None = None


def age_of(image: Image, state: StateView, now: datetime) -> timedelta | None:
    signals = [image.created] if FLOOR <= image.created <= now + SKEW else []
    for t in (image.last_tag_time, state.first_seen.get(image.id)):
        if t is not None and t <= now + SKEW:
            signals.append(t)
    return max(now - max(signals), timedelta(0)) if signals else None


def plan(snapshot: Snapshot, config: Config, state: StateView, now: datetime) -> dict[str, Verdict]:
    full = snapshot.engine.full_names
    images = {i.id: _Image(i, age_of(i, state, now)) for i in snapshot.images}

    # 1. Protected: in use by a container (and the ancestors), young, or a protect entry.
    for c in snapshot.containers:
        if c.image_id not in images:
            continue
        images[c.image_id].protections.append(f"in use by container {c.name} ({c.state})")
        for a in snapshot.ancestors(c.image_id):
            said = images[a].protections
            if not any(p.startswith("parent of in-use image") for p in said):
                said.append(f"parent of in-use image {short_id(c.image_id)} (container {c.name})")
    for x in images.values():
        if x.age is not None and x.age < config.safety.min_age:
            x.young = True
            x.protections.append(
                f"younger than safety.min_age {fd(config.safety.min_age)} (age {fd(x.age)})"
            )
        for entry in config.protect:
            hit = protected_by(entry, x.image, full)
            if hit:
                x.protections.append(f'protect[{entry.index}] {entry.kind} "{entry.value}" {hit}')

    # 2. Each rule, in the order of the rules' names, ranks its groups.
    for rule in sorted(config.rules, key=lambda r: r.name):
        _rank(rule, images, snapshot, state, now, full)

    # 3. A tag expires when a rule matched it and none kept it; no rule: `unmatched`.
    for x in images.values():
        for tag in x.image.tags:
            if tag in x.keeps:
                continue
            if tag in x.matched:
                continue
            if config.unmatched == "keep":
                x.keeps[tag] = [f"no rule matches {tag} (unmatched: keep)"]
            else:
                x.expiries[tag] = [("unmatched", f"no rule matches {tag} (unmatched: expire)")]
        for tag in x.image.tags:
            for why in x.keeps.get(tag, ()):
                if why not in x.reasons_keep:
                    x.reasons_keep.append(why)
            if tag not in x.keeps:
                for _, why in x.expiries.get(tag, ()):
                    if why not in x.reasons_expire:
                        x.reasons_expire.append(why)

    # 4. Removed: unprotected, every tag expired; dangling past its grace; intermediates
    # with their last child.
    for x in images.values():
        if x.protections:
            continue
        image = x.image
        if image.tags:
            x.remove = not any(t in x.keeps for t in image.tags)
        elif snapshot.children(image.id):
            x.remove = True
        elif config.dangling.action == "keep":
            x.reasons_keep.append("dangling (dangling.action: keep)")
        else:
            grace = config.dangling.min_age
            since = state.first_seen_dangling.get(image.id)
            if since is not None:
                measured: timedelta | None = now - since
                what = f"dangling for {fd(now - since)}"
            else:
                measured = x.age
                shown = "unknown (counts as old)" if x.age is None else fd(x.age)
                what = f"dangling since before gcd's records began, age {shown}"
            if measured is not None and measured < grace:
                x.reasons_keep.append(f"{what} < dangling.min_age {fd(grace)}")
            else:
                x.reasons_expire.append(f"{what} >= dangling.min_age {fd(grace)}")
                x.remove = True

    # 5. Every parent of a kept image is kept.
    _keep_parents(images, snapshot)

    # 6. The guards, each judging the plan as the rules left it.
    _guards(images, snapshot, config)
    _keep_parents(images, snapshot)

    return {i: _verdict(x, images, snapshot, config, now) for i, x in images.items()}


def protected_by(entry: Protect, image: Image, full: bool) -> str | None:
    """How a protect entry matches the image (for its reason), or None."""
    for tag in image.tags:
        if entry.kind == "ref" and (
            fnmatch.fnmatchcase(tag, entry.value)
            or (full and fnmatch.fnmatchcase(familiar(tag), entry.value))
        ):
            return f"matches {tag}"
        if entry.kind == "tag" and entry.regex and entry.regex.fullmatch(split_ref(tag)[1]):
            return f"matches {tag}"
    if entry.kind == "label":
        key, has_value, value = entry.value.partition("=")
        if key in image.labels and (not has_value or image.labels[key] == value):
            return "matches the image's labels"
    if entry.kind == "id" and image.id.removeprefix("sha256:").startswith(
        entry.value.removeprefix("sha256:")
    ):
        return "matches the image ID"
    return None


def _rank(
    rule: Rule,
    images: dict[str, _Image],
    snapshot: Snapshot,
    state: StateView,
    now: datetime,
    full: bool,
) -> None:
    # group label -> image ID -> (the image's tags in the group, their keys)
    groups: dict[str, dict[str, list[tuple[str, Any]]]] = {}
    for x in images.values():
        for tag in x.image.tags:
            repository, name = split_ref(tag)
            shown = familiar(repository) if full else repository
            if not rule.repository.fullmatch(repository) and not (
                full and rule.repository.fullmatch(shown)
            ):
                continue
            m = rule.tag.fullmatch(name)
            if m is None or (rule.exclude_tag is not None and rule.exclude_tag.fullmatch(name)):
                continue
            x.matched.add(tag)
            key = _key(rule, m, name, x, state, now)
            if key is None:
                x.keeps.setdefault(tag, []).append(
                    f"{rule.name}: cannot order {tag} by {rule.order_by}; kept"
                )
                continue
            parts = [
                f"{g}={shown if g == 'repository' else m.group(g) or ''}" for g in rule.group_by
            ]
            label = ", ".join(parts) or "(all)"
            groups.setdefault(label, {}).setdefault(x.image.id, []).append((tag, key))
    for label, members in groups.items():
        ranked = sorted(
            members,
            key=lambda i: (
                max(k for _, k in members[i]),
                images[i].image.created,
                max(t for t, _ in members[i]),
                i,
            ),
            reverse=True,
        )
        for rank, image_id in enumerate(ranked, start=1):
            x, tags = images[image_id], [t for t, _ in members[image_id]]
            if rank <= rule.keep_last:
                why = f"{rule.name}: rank {rank} <= keep_last {rule.keep_last} in group {label}"
            elif rule.keep_within is not None and x.age is not None and x.age < rule.keep_within:
                why = (
                    f"{rule.name}: age {fd(x.age)} < keep_within {fd(rule.keep_within)} "
                    f"in group {label}"
                )
            else:
                why = f"{rule.name}: rank {rank} > keep_last {rule.keep_last} in group {label}"
                for tag in tags:
                    x.expiries.setdefault(tag, []).append((rule.name, why))
                continue
            for tag in tags:
                x.keeps.setdefault(tag, []).append(why)


def _key(rule: Rule, m: Any, name: str, x: _Image, state: StateView, now: datetime) -> Any | None:
    kind, group = rule.order_by.kind, rule.order_by.group
    if kind == "numeric":
        text = m.group(group)
        return _int_or_none(text)
    if kind == "semver":
        try:
            v = semver.Version.parse(
                (m.group(group) or "").removeprefix("v").removeprefix("V"),
                optional_minor_and_patch=True,
            )
        except ValueError:
            return None
        return _Semver(v)
    if kind == "natural":
        return [(0, int(c), "") if c.isdigit() else (1, 0, c) for c in re.findall(r"\d+|\D+", name)]
    image = x.image
    created = image.created
    if created > now + SKEW:  # a created in the future ranks as when gcd first saw it
        created = state.first_seen.get(image.id) or now
    if kind == "created":
        return created
    if kind == "tagged":
        t = image.last_tag_time
        return t if t is not None and t <= now + SKEW else created
    if kind == "first_seen":
        return state.first_seen.get(image.id) or created
    return state.last_used.get(image.id) or datetime.min.replace(tzinfo=UTC)  # last_used


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


class _Semver:
    """SemVer 2.0 precedence, by the semver library itself."""

    def __init__(self, v: semver.Version) -> None:
        self.v = v.replace(build=None)

    def __lt__(self, other: _Semver) -> bool:
        return bool(self.v.compare(other.v) < 0)

    def __gt__(self, other: _Semver) -> bool:
        return bool(self.v.compare(other.v) > 0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Semver) and self.v.compare(other.v) == 0

    def __hash__(self) -> int:
        return hash(self.v.finalize_version())


def _keep_parents(images: dict[str, _Image], snapshot: Snapshot) -> None:
    for x in images.values():
        if not x.remove:
            for a in snapshot.ancestors(x.image.id):
                images[a].remove = False


def _implied(image: Image, snapshot: Snapshot) -> bool:
    return not image.tags and not image.digests and bool(snapshot.children(image.id))


def _guards(images: dict[str, _Image], snapshot: Snapshot, config: Config) -> None:
    safety = config.safety
    repos: dict[str, list[_Image]] = {}
    for x in images.values():
        for tag in x.image.tags:
            repository = split_ref(tag)[0]
            name = familiar(repository) if snapshot.engine.full_names else repository
            if x not in repos.setdefault(name, []):
                repos[name].append(x)
    refused: list[tuple[_Image, str]] = []
    for name, members in sorted(repos.items(), key=lambda r: r[0]):
        removing = [x for x in members if x.remove]
        share = len(removing) / len(members)
        if removing and share > safety.max_removal_fraction:
            why = (
                f"guard safety.max_removal_fraction: would remove {len(removing)} of "
                f"{len(members)} tagged images of {name} "
                f"({share:.0%} > {safety.max_removal_fraction:.0%})"
            )
            refused += [(x, why) for x in removing]
    _refuse(refused)
    if safety.keep_one_per_repository:
        refused = []
        for name, members in sorted(repos.items(), key=lambda r: r[0]):
            if all(x.remove for x in members):
                newest = max(members, key=lambda x: (x.image.created, max(x.image.tags)))
                why = f"guard safety.keep_one_per_repository: last tagged image of {name}"
                refused.append((newest, why))
        _refuse(refused)
    direct = [x for x in images.values() if x.remove and not _implied(x.image, snapshot)]
    if len(direct) > safety.max_removals_per_run:
        oldest_first = sorted(
            direct,
            key=lambda x: (x.age is not None, -(x.age or timedelta()).total_seconds(), x.image.id),
        )
        cap = safety.max_removals_per_run
        why = f"guard safety.max_removals_per_run: {cap} removals reached; older images go first"
        _refuse([(x, why) for x in oldest_first[cap:]])


def _refuse(refused: list[tuple[_Image, str]]) -> None:
    for x, why in refused:
        x.remove = False
        x.guard = x.guard or why


def _verdict(
    x: _Image, images: dict[str, _Image], snapshot: Snapshot, config: Config, now: datetime
) -> Verdict:
    image = x.image
    future = [
        f"{what} {when.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        for what, when in (("created", image.created), ("tagged", image.last_tag_time))
        if when is not None and when > now + SKEW
    ]
    note = (
        (f"{' and '.join(future)}: in the future, not taken as its age or rank",) if future else ()
    )
    expired = sorted(
        (t, rule) for t, pairs in x.expiries.items() if t not in x.keeps for rule, _ in pairs
    )
    if x.remove:
        reasons = list(x.reasons_expire)
        if not image.tags and snapshot.children(image.id):
            child = min(snapshot.children(image.id))
            reasons.append(f"intermediate: goes with its last child {short_id(child)}")
        return Verdict("remove", (*reasons, *note))
    reasons = list(x.protections)
    if x.guard:
        reasons.append(x.guard)
    kept_children = [c for c in snapshot.children(image.id) if not images[c].remove]
    if kept_children:
        reasons.append(f"parent of kept image {short_id(min(kept_children))}")
    reasons += x.reasons_keep
    untag: tuple[str, ...] = ()
    kept_tags = [t for t in image.tags if t in x.keeps]
    if config.untag_expired and expired and kept_tags and not x.guard and not x.young:
        untag = tuple(sorted({t for t, _ in expired}))
        reasons += [f"untag {t}: expired" for t in untag]
    reasons += x.reasons_expire
    return Verdict("keep", (*(reasons or ["kept: nothing expired it"]), *note), untag)
