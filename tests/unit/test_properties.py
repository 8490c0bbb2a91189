"""The properties "How gcd decides" (docs/configuration.md) requires of the planner, checked
with hypothesis."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gcd import policy
from gcd.config import Config
from gcd.model import Snapshot, StateView, split_ref
from tests.unit import reference_planner
from tests.unit.snapshots import NOW, cfg, container, iid, image, snapshot, state

REPOS = ("a", "b", "reg.example/c")
TAG_NAMES = (
    "1",
    "2",
    "3",
    "10",
    "v1.2",
    "1.10",
    "latest",
    "stable",
    "main-1",
    "main-2",
    "dev-7",
    "x",
)
RULE_POOL = (
    "{name: nums, match: {tag: '(?P<n>\\d+)'}, order_by: numeric(n), keep_last: %d}",
    "{name: branches, match: {tag: '(?P<b>[a-z]+)-(?P<n>\\d+)'}, group_by: [repository, b], order_by: numeric(n), keep_last: %d}",
    "{name: rel, match: {tag: '(?P<v>v?[0-9.]+)'}, order_by: semver(v), keep_last: %d, keep_within: 20d}",
    "{name: everything, order_by: created, keep_last: %d}",
    "{name: nat, match: {repository: 'a|b'}, order_by: natural, keep_last: %d}",
    "{name: recent, match: {repository: '.*/.*'}, order_by: tagged, keep_last: %d, keep_within: 3d}",
    # Groups that span repositories: one image may rank in them under several names.
    "{name: across, match: {tag: '(?P<b>[a-z]+)-(?P<n>\\d+)'}, group_by: [b], order_by: numeric(n), keep_last: %d}",
    "{name: all, match: {tag: '\\d+'}, group_by: [], order_by: natural, keep_last: %d}",
)
PROTECT_POOL = (
    "{ref: 'reg.example/*'}",
    "{tag: 'stable'}",
    "{label: keep}",
    "{label: keep=1}",
    f"{{id: '{iid('i1')[7:15]}'}}",  # a prefix of i1's ID
    f"{{id: '{iid('i2')}'}}",
)
STATES = ("created", "running", "exited", "paused", "dead")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Snapshot, StateView]:
    count = draw(st.integers(1, 9))
    free = [f"{r}:{t}" for r in REPOS for t in TAG_NAMES]
    images = []
    for i in range(count):
        parent = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None
        tags = draw(st.lists(st.sampled_from(free), max_size=3, unique=True)) if free else []
        free = [t for t in free if t not in tags]
        images.append(
            image(
                f"i{i}",
                tags,
                parent=f"i{parent}" if parent is not None else None,
                age=timedelta(hours=draw(st.integers(0, 24 * 60))),
                tagged_age=draw(
                    st.one_of(st.none(), st.integers(0, 24 * 60).map(lambda h: timedelta(hours=h)))
                ),
                labels={"keep": "1"} if draw(st.booleans()) and draw(st.booleans()) else {},
                layers=[("base", 100), (f"own{i}", 10)],
            )
        )
    used = draw(st.lists(st.tuples(st.integers(0, count - 1), st.sampled_from(STATES)), max_size=2))
    containers = [container(f"c{n}", f"i{i}", s) for n, (i, s) in enumerate(used)]
    hours = st.integers(0, 24 * 60).map(lambda h: timedelta(hours=h))
    names = [f"i{i}" for i in range(count)]
    view = state(
        new_store=False,
        first_seen=draw(st.dictionaries(st.sampled_from(names), hours, max_size=3)),
        dangling_since=draw(st.dictionaries(st.sampled_from(names), hours, max_size=3)),
        last_used=draw(st.dictionaries(st.sampled_from(names), hours, max_size=3)),
    )
    return snapshot(images, containers), view


@st.composite
def configs(draw: st.DrawFn, guards: bool = True, capped: bool = True) -> Config:
    """`capped`: max_removals_per_run drawn low too (a capped image goes in a later cycle)."""
    rules = draw(st.lists(st.sampled_from(RULE_POOL), max_size=4, unique=True))
    protect = draw(st.lists(st.sampled_from(PROTECT_POOL), max_size=2, unique=True))
    body = [
        f"safety: {{min_age: {draw(st.sampled_from(['0s', '1h', '2d']))}, "
        f"max_removals_per_run: {draw(st.sampled_from([1, 2, 3, 500])) if capped else 500}, "
        + (
            f"max_removal_fraction: {draw(st.sampled_from([0.3, 0.5, 1.0]))}, keep_one_per_repository: {str(draw(st.booleans())).lower()}}}"
            if guards
            else "max_removal_fraction: 1.0, keep_one_per_repository: false}"
        ),
        f"dangling: {{min_age: {draw(st.sampled_from(['0s', '1d', '10d']))}}}",
        f"unmatched: {draw(st.sampled_from(['keep', 'expire']))}",
        f"untag_expired: {str(draw(st.booleans())).lower()}",
    ]
    if rules:
        body.append("rules:")
        body += ["  - " + r % draw(st.integers(1, 3)) for r in rules]
    if protect:
        body.append("protect:")
        body += [f"  - {p}" for p in protect]
    return cfg("\n".join(body) + "\n")


def verdicts(snap: Snapshot, config: Config, view: StateView) -> dict[str, str]:
    return {d.image_id: d.action for d in policy.plan(snap, config, view, NOW).decisions}


@settings(max_examples=300, deadline=None)
@given(worlds(), configs())
def test_protected_images_are_never_removed(
    world: tuple[Snapshot, StateView], config: Config
) -> None:
    snap, view = world
    protected: set[str] = set()
    for c in snap.containers:
        protected |= {c.image_id, *snap.ancestors(c.image_id)}
    for img in snap.images:
        age = policy.image_age(img, view, NOW)
        if age is not None and age < config.safety.min_age:
            protected.add(img.id)
        if any(reference_planner.protected_by(entry, img, False) for entry in config.protect):
            protected.add(img.id)
    plan = policy.plan(snap, config, view, NOW)
    for d in plan.decisions:
        if d.image_id in protected:
            assert d.action == "keep", d
            assert d.protected
        if d.action == "keep":  # a parent of any kept image is protected too
            for ancestor in snap.ancestors(d.image_id):
                assert plan.decision(ancestor).action == "keep"
                assert plan.decision(ancestor).protected


@settings(max_examples=300, deadline=None)
@given(worlds(), configs(), st.randoms(use_true_random=False))
def test_rule_order_changes_nothing(world: tuple[Snapshot, StateView], config: Config, rnd) -> None:  # type: ignore[no-untyped-def]
    snap, view = world
    shuffled = list(config.rules)
    rnd.shuffle(shuffled)
    a = policy.plan(snap, config, view, NOW)
    b = policy.plan(snap, dataclasses.replace(config, rules=tuple(shuffled)), view, NOW)
    # Not only the same decisions: the same reasons, in the same order.
    assert a.decisions == b.decisions
    assert a.reclaimable_bytes == b.reclaimable_bytes


@settings(max_examples=300, deadline=None)
@given(worlds(), configs(), st.randoms(use_true_random=False))
def test_the_order_the_engine_lists_images_in_changes_nothing(
    world: tuple[Snapshot, StateView], config: Config, rnd: random.Random
) -> None:
    snap, view = world
    shuffled = list(snap.images)
    rnd.shuffle(shuffled)
    a = policy.plan(snap, config, view, NOW)
    b = policy.plan(Snapshot(snap.engine, tuple(shuffled), snap.containers), config, view, NOW)
    assert a.decisions == b.decisions
    assert a.reclaimable_bytes == b.reclaimable_bytes


def _matched(config: Config, tag: str) -> bool:
    repository, name = split_ref(tag)
    return any(
        r.repository.fullmatch(repository)
        and r.tag.fullmatch(name)
        and not (r.exclude_tag and r.exclude_tag.fullmatch(name))
        for r in config.rules
    )


def _loosen(config: Config, how: int, extra: str) -> Config:
    """Add a rule, add a protection, raise a keep_last, or raise a keep_within."""
    if how == 0:
        rule = cfg(f"rules:\n  - {extra % 2}\n").rules[0]
        rule = dataclasses.replace(rule, name="added")
        return dataclasses.replace(config, rules=(*config.rules, rule))
    if how == 1:
        return dataclasses.replace(
            config,
            protect=(
                *config.protect,
                *cfg(f"protect: [{PROTECT_POOL[1]}, {PROTECT_POOL[2]}]\n").protect,
            ),
        )
    raised = []
    for r in config.rules:
        if how == 2:
            raised.append(dataclasses.replace(r, keep_last=r.keep_last + 1))
        else:
            raised.append(
                dataclasses.replace(
                    r, keep_within=(r.keep_within or timedelta(0)) + timedelta(days=5)
                )
            )
    return dataclasses.replace(config, rules=tuple(raised))


@settings(max_examples=400, deadline=None)
@given(worlds(), configs(guards=False, capped=False), st.integers(0, 3), st.sampled_from(RULE_POOL))
def test_loosening_the_policy_never_turns_a_keep_into_a_remove(
    world: tuple[Snapshot, StateView], config: Config, how: int, extra: str
) -> None:
    snap, view = world
    before = verdicts(snap, config, view)
    after = verdicts(snap, _loosen(config, how, extra), view)

    def settled(image_id: str) -> bool:
        """Its tags, and its descendants' tags, were already matched by some rule."""
        family = [image_id, *(i.id for i in snap.images if image_id in snap.ancestors(i.id))]
        return all(_matched(config, t) for f in family for t in snap.image(f).tags)

    for image_id, decision in before.items():
        if decision == "keep" and settled(image_id):
            assert after[image_id] == "keep", snap.image(image_id)


@settings(max_examples=300, deadline=None)
@given(worlds(), configs(capped=False))
def test_a_second_plan_after_a_completed_run_removes_nothing(
    world: tuple[Snapshot, StateView], config: Config
) -> None:
    snap, view = world
    plan = policy.plan(snap, config, view, NOW)
    removed = {d.image_id for d in plan.removals()}
    untagged = {t for d in plan.decisions for t in d.untag}
    remaining = [
        dataclasses.replace(i, tags=tuple(t for t in i.tags if t not in untagged))
        for i in snap.images
        if i.id not in removed
    ]
    after = Snapshot(snap.engine, tuple(remaining), snap.containers)
    again = policy.plan(after, config, view, NOW)
    assert again.removals() == ()
    assert all(not d.untag for d in again.decisions)


_IDENT = st.one_of(
    st.integers(0, 30).map(str), st.sampled_from(["alpha", "beta", "rc", "a1", "x-y"])
)
_VERSIONS = st.builds(
    lambda major, minor, patch, pre: (
        f"{major}.{minor}.{patch}" + (f"-{'.'.join(pre)}" if pre else "")
    ),
    st.integers(0, 3),
    st.integers(0, 12),
    st.integers(0, 12),
    st.lists(_IDENT, max_size=3),
)


@settings(max_examples=500, deadline=None)
@given(_VERSIONS, _VERSIONS)
def test_semver_sort_keys_follow_semver_precedence(a: str, b: str) -> None:
    import semver

    expected = semver.Version.parse(a).compare(b)
    ka, kb = policy._semver_key(a), policy._semver_key(b)
    assert ka is not None and kb is not None
    assert (ka > kb) - (ka < kb) == expected


@settings(max_examples=500, deadline=None)
@given(worlds(), configs())
def test_the_planner_agrees_with_the_reference_planner(
    world: tuple[Snapshot, StateView], config: Config
) -> None:
    # gcd's planner is tuned for 100,000 images; tests/unit/reference_planner.py is the
    # slow one written straight from the docs. Same decisions, same untags, same reasons.
    snap, view = world
    expected = reference_planner.plan(snap, config, view, NOW)
    for d in policy.plan(snap, config, view, NOW).decisions:
        want = expected[d.image_id]
        assert (d.action, d.reasons, d.untag) == (want.action, want.reasons, want.untag), d.image_id


@settings(max_examples=300, deadline=None)
@given(worlds(), configs())
def test_no_cycle_removes_more_than_max_removals_per_run_and_the_oldest_go_first(
    world: tuple[Snapshot, StateView], config: Config
) -> None:
    snap, view = world
    plan = policy.plan(snap, config, view, NOW)
    cap = config.safety.max_removals_per_run
    direct = [d for d in plan.decisions if d.action == "remove" and not d.implied]
    assert len(direct) <= cap
    capped = [d for d in plan.decisions if any("max_removals_per_run" in r for r in d.reasons)]
    if capped and direct:
        # (Fewer than the cap may go, none even: a capped image keeps its parents.)
        def age(image_id: str) -> timedelta:
            found = policy.image_age(snap.image(image_id), view, NOW)
            return timedelta.max if found is None else found  # no signal counts as oldest

        assert min(age(d.image_id) for d in direct) >= max(age(d.image_id) for d in capped)


@settings(max_examples=300, deadline=None)
@given(worlds(), configs())
def test_keep_one_per_repository_keeps_a_tagged_image_of_every_repository(
    world: tuple[Snapshot, StateView], config: Config
) -> None:
    snap, view = world
    config = dataclasses.replace(
        config, safety=dataclasses.replace(config.safety, keep_one_per_repository=True)
    )
    plan = policy.plan(snap, config, view, NOW)
    repositories = {split_ref(t)[0] for img in snap.images for t in img.tags}
    kept = {split_ref(t)[0] for d in plan.decisions if d.action == "keep" for t in d.tags}
    assert repositories <= kept
