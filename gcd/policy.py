"""plan(snapshot, config, state, now) -> Plan: the retention policy as a pure function.

Mark and sweep. Roots are protected images, images a rule (or `unmatched: keep`) keeps, and
untagged images still inside their dangling grace; every ancestor of a root is kept too. The
rest is garbage. Safety guards then turn some removals back into keeps, and the sweep runs
again. No I/O, no logging, no clock: every decision carries the reasons that produced it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import semver

from gcd.config import Config, Protect, Rule
from gcd.model import Decision, Image, Plan, Snapshot, StateView, short_id, split_ref
from gcd.units import format_duration

# Reproducible builds stamp `created` with 1970 (SOURCE_DATE_EPOCH=0): not a signal of age.
CREATED_FLOOR = datetime(2000, 1, 1, tzinfo=UTC)
_OLDEST = datetime.min.replace(tzinfo=UTC)
_NATURAL_CHUNK = re.compile(r"\d+|\D+")


def image_age(image: Image, state: StateView, now: datetime) -> timedelta | None:
    """now - youngest(created, last_tag_time, first_seen); None when no signal exists."""
    youngest = image.created if image.created >= CREATED_FLOOR else None
    for signal in (image.last_tag_time, state.first_seen.get(image.id)):
        if signal is not None and (youngest is None or signal > youngest):
            youngest = signal
    return None if youngest is None else now - youngest


class _Verdict:
    """Mutable working record for one image while the plan is built. (A plain class: one is
    made per image, and a dataclass's default factories cost a third of the planner.)"""

    __slots__ = (
        "age",
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
        "remove",
    )

    def __init__(
        self,
        image: Image,
        age: timedelta | None,
        first_seen: datetime | None = None,
        last_used: datetime | None = None,
    ) -> None:
        self.image = image
        self.age = age
        self.first_seen = first_seen
        self.last_used = last_used
        self.protections: list[str] = []
        self.min_age_protected = False
        self.keep_reasons: list[str] = []
        self.expire_reasons: list[str] = []
        self.expired: list[tuple[str, str]] = []
        self.kept_tags: list[str] = []
        self.guard: str | None = None
        self.parent_of: str | None = None
        self.remove = False


def plan(snapshot: Snapshot, config: Config, state: StateView, now: datetime) -> Plan:
    """Decide, for every image of the snapshot, whether it is kept or removed, and why."""
    verdicts = {
        i.id: _Verdict(
            i, image_age(i, state, now), state.first_seen.get(i.id), state.last_used.get(i.id)
        )
        for i in snapshot.images
    }
    _protect(snapshot, config, verdicts)
    _apply_rules(snapshot, config, verdicts)
    _mark_candidates(snapshot, config, state, now, verdicts)
    _sweep(snapshot, verdicts)
    _guard(snapshot, config, verdicts)
    _sweep(snapshot, verdicts)
    freed = snapshot.freed_bytes({i for i, v in verdicts.items() if v.remove})
    decisions = tuple(
        _decide(snapshot, config, v, freed.get(v.image.id, 0))
        for v in sorted(verdicts.values(), key=lambda v: v.image.id)
    )
    return Plan(snapshot, now, decisions, sum(freed.values()))


# --- protection -------------------------------------------------------------------------------


def _protect(snapshot: Snapshot, config: Config, verdicts: dict[str, _Verdict]) -> None:
    for container in snapshot.containers:
        if container.image_id not in verdicts:
            continue
        verdicts[container.image_id].protections.append(
            f"in use by container {container.name} ({container.state})"
        )
        for ancestor in snapshot.ancestors(container.image_id):
            reasons = verdicts[ancestor].protections
            if not any(r.startswith("parent of in-use image") for r in reasons):
                reasons.append(
                    f"parent of in-use image {short_id(container.image_id)} "
                    f"(container {container.name})"
                )
    min_age = config.safety.min_age
    for v in verdicts.values():
        if v.age is not None and v.age < min_age:
            v.min_age_protected = True
            v.protections.append(
                f"younger than safety.min_age {format_duration(min_age)} "
                f"(age {format_duration(v.age)})"
            )
        for entry in config.protect:
            hit = _protect_hit(entry, v.image)
            if hit:
                v.protections.append(f'protect[{entry.index}] {entry.kind} "{entry.value}" {hit}')


def _protect_hit(entry: Protect, image: Image) -> str | None:
    """How `entry` matches `image` (for the reason), or None."""
    if entry.kind == "ref":
        for tag in image.tags:
            if fnmatch.fnmatchcase(tag, entry.value):
                return f"matches {tag}"
    elif entry.kind == "tag":
        assert entry.regex is not None
        for tag in image.tags:
            if entry.regex.fullmatch(split_ref(tag)[1]):
                return f"matches {tag}"
    elif entry.kind == "label":
        key, has_value, value = entry.value.partition("=")
        if key in image.labels and (not has_value or image.labels[key] == value):
            return "matches the image's labels"
    elif image.id.removeprefix("sha256:").startswith(entry.value.removeprefix("sha256:")):
        return "matches the image ID"
    return None


# --- rules ------------------------------------------------------------------------------------


def _apply_rules(snapshot: Snapshot, config: Config, verdicts: dict[str, _Verdict]) -> None:
    """Rank each rule's groups; collect, per tag, the rules that keep or expire it."""
    keeps: dict[str, list[str]] = defaultdict(list)
    expires: dict[str, list[tuple[str, str]]] = defaultdict(list)
    # Every tag split once; there are far fewer repositories than tags.
    tags = [(image.id, tag, *split_ref(tag)) for image in snapshot.images for tag in image.tags]
    for rule in config.rules:
        for label, members in _groups(tags, rule).items():
            _rank_group(rule, label, members, verdicts, keeps, expires)
    for v in verdicts.values():
        for tag in v.image.tags:
            kept = keeps.get(tag)
            if kept is not None:
                v.kept_tags.append(tag)
                reasons = v.keep_reasons
                for r in kept:
                    if r not in reasons:
                        reasons.append(r)
            elif tag in expires:
                reasons = v.expire_reasons
                for rule_name, reason in expires[tag]:
                    v.expired.append((tag, rule_name))
                    if reason not in reasons:
                        reasons.append(reason)
            elif config.unmatched == "keep":
                v.kept_tags.append(tag)
                v.keep_reasons.append(f"no rule matches {tag} (unmatched: keep)")
            else:
                v.expired.append((tag, "unmatched"))
                v.expire_reasons.append(f"no rule matches {tag} (unmatched: expire)")


def _groups(
    tags: list[tuple[str, str, str, str]], rule: Rule
) -> dict[str, dict[str, list[tuple[str, re.Match[str]]]]]:
    """group label -> image ID -> the (tag, match) pairs of that image the rule matches."""
    groups: dict[str, dict[str, list[tuple[str, re.Match[str]]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    repository_ok: dict[str, bool] = {}
    labels: dict[tuple[str, ...], str] = {}
    by_repository_only = rule.group_by == ("repository",)
    for image_id, tag, repository, name in tags:
        ok = repository_ok.get(repository)
        if ok is None:
            ok = repository_ok[repository] = rule.repository.fullmatch(repository) is not None
        if not ok:
            continue
        match = rule.tag.fullmatch(name)
        if match is None or (rule.exclude_tag and rule.exclude_tag.fullmatch(name)):
            continue
        values = (
            (repository,)
            if by_repository_only
            else tuple(
                repository if g == "repository" else match.group(g) or "" for g in rule.group_by
            )
        )
        label = labels.get(values)
        if label is None:
            label = labels[values] = (
                ", ".join(f"{g}={v}" for g, v in zip(rule.group_by, values, strict=True)) or "(all)"
            )
        groups[label][image_id].append((tag, match))
    return groups


def _rank_group(
    rule: Rule,
    label: str,
    members: dict[str, list[tuple[str, re.Match[str]]]],
    verdicts: dict[str, _Verdict],
    keeps: dict[str, list[str]],
    expires: dict[str, list[tuple[str, str]]],
) -> None:
    # Locals, not attribute lookups: this loop runs once per (rule, image).
    name, keep_last, keep_within = rule.name, rule.keep_last, rule.keep_within
    ranked: list[tuple[Any, datetime, str, str]] = []
    ranked_tags: dict[str, list[str]] = {}
    for image_id, matches in members.items():
        verdict = verdicts[image_id]
        best: Any = None
        tags: list[str] = []
        for tag, match in matches:
            key = _sort_key(rule, tag, match, verdict)
            if key is None:
                keeps[tag].append(f"{name}: cannot order {tag} by {rule.order_by}; kept")
                continue
            tags.append(tag)
            if best is None or key > best:
                best = key
        if best is not None:
            ranked_tags[image_id] = tags
            ranked.append((best, verdict.image.created, max(tags), image_id))
    ranked.sort(reverse=True)
    for rank, (_, _, _, image_id) in enumerate(ranked, start=1):
        tags = ranked_tags[image_id]
        if rank <= keep_last:
            reason = f"{name}: rank {rank} <= keep_last {keep_last} in group {label}"
            for tag in tags:
                keeps[tag].append(reason)
            continue
        age = verdicts[image_id].age
        if keep_within is not None and (age is None or age < keep_within):
            # An image with no age signal at all is not known to be old: keep it.
            shown = "unknown" if age is None else format_duration(age)
            reason = (
                f"{name}: age {shown} < keep_within {format_duration(keep_within)} in group {label}"
            )
            for tag in tags:
                keeps[tag].append(reason)
        else:
            expired = (name, f"{name}: rank {rank} > keep_last {keep_last} in group {label}")
            for tag in tags:
                expires[tag].append(expired)


def _sort_key(rule: Rule, tag: str, match: re.Match[str], verdict: _Verdict) -> Any:
    """The value `order_by` sorts on (greater is newer), or None if it cannot be parsed."""
    kind, image = rule.order_by.kind, verdict.image
    value = match.group(rule.order_by.group) if rule.order_by.group else None
    if kind == "semver":
        return _semver_key(value) if value else None
    if kind == "numeric":
        try:
            return int(value) if value else None
        except ValueError:
            return None
    if kind == "natural":
        name = split_ref(tag)[1]
        return tuple(
            (0, int(c), "") if c.isdigit() else (1, 0, c) for c in _NATURAL_CHUNK.findall(name)
        )
    if kind == "created":
        return image.created
    if kind == "tagged":
        return image.last_tag_time or image.created
    if kind == "first_seen":
        return verdict.first_seen or image.created
    return verdict.last_used or _OLDEST


@functools.lru_cache(maxsize=65536)  # the same versions recur across repositories
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
            v.keep_reasons.append("dangling (dangling.action: keep)")
            continue
        since = state.first_seen_dangling.get(image.id)
        # Dangling since before the store existed: the image's own age stands in.
        dangling_for = now - since if since else v.age
        grace = format_duration(config.dangling.min_age)
        if dangling_for is not None and dangling_for < config.dangling.min_age:
            v.keep_reasons.append(
                f"dangling for {format_duration(dangling_for)} < dangling.min_age {grace}"
            )
        else:
            shown = "an unknown time" if dangling_for is None else format_duration(dangling_for)
            v.expire_reasons.append(f"dangling for {shown} >= dangling.min_age {grace}")
            v.remove = True


def _sweep(snapshot: Snapshot, verdicts: dict[str, _Verdict]) -> None:
    """Every ancestor of a kept image is kept: the engine could not delete it anyway."""
    for v in verdicts.values():
        if v.remove:
            continue
        for ancestor in snapshot.ancestors(v.image.id):
            verdicts[ancestor].remove = False
    for v in verdicts.values():
        kept_children = sorted(c for c in snapshot.children(v.image.id) if not verdicts[c].remove)
        v.parent_of = kept_children[0] if kept_children else None


def _guard(snapshot: Snapshot, config: Config, verdicts: dict[str, _Verdict]) -> None:
    """Each repository guard judges the plan as the rules left it, then all refusals apply
    at once: refusing an image of one repository must not change how another repository
    (that image's other name) is judged, or the outcome would hang on the order they are
    visited, and a second cycle could remove what the first refused."""
    safety = config.safety
    by_repository: dict[str, list[_Verdict]] = defaultdict(list)
    for v in verdicts.values():
        for repository in v.image.repositories:
            by_repository[repository].append(v)
    repositories = sorted(by_repository.items())
    refusals: list[tuple[_Verdict, str]] = []
    for repository, members in repositories:
        removing = [v for v in members if v.remove]
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
            for repository, members in repositories
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


def _decide(snapshot: Snapshot, config: Config, v: _Verdict, freed: int) -> Decision:
    image = v.image
    tags = image.tags  # sorted by the engine adapter
    expired = tuple(sorted(v.expired)) if v.expired else ()
    dangling = snapshot.is_dangling(image.id)
    if v.remove:
        reasons = list(v.expire_reasons)
        if not image.tags and snapshot.children(image.id):
            child = sorted(snapshot.children(image.id))[0]
            reasons.append(f"intermediate: goes with its last child {short_id(child)}")
        return Decision(
            image.id,
            tags,
            "remove",
            tuple(reasons),
            bytes=freed,
            implied=_is_implied(snapshot, image),
            dangling=dangling,
            expired=expired,
        )
    reasons = list(v.protections)
    if v.guard:
        reasons.append(v.guard)
    if v.parent_of:
        reasons.append(f"parent of kept image {short_id(v.parent_of)}")
    reasons.extend(v.keep_reasons)
    untag: tuple[str, ...] = ()
    # Untag only where a name stays, the image is not young, and no guard refused it.
    if (
        config.untag_expired
        and v.expired
        and v.kept_tags
        and not v.guard
        and not v.min_age_protected
    ):
        untag = tuple(sorted({tag for tag, _ in v.expired}))
        reasons.extend(f"untag {tag}: expired" for tag in untag)
    # What would have removed it, so a kept image still explains what expired.
    reasons = list(dict.fromkeys([*reasons, *v.expire_reasons]))
    if not reasons:
        reasons.append("kept: nothing expired it")
    protected = bool(v.protections) or v.parent_of is not None
    return Decision(
        image.id,
        tags,
        "keep",
        tuple(reasons),
        untag=untag,
        protected=protected,
        dangling=dangling,
        expired=expired,
    )
