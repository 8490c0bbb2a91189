"""The planner, table-driven over "How gcd decides" (docs/configuration.md): each row a
snapshot, a config, the verdicts."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from gcd import policy
from gcd.model import Container, EngineInfo, Image, Snapshot, StateView
from tests.unit.snapshots import NOW, cfg, container, iid, image, snapshot, state

D = timedelta(days=1)
H = timedelta(hours=1)

NUMBERED = r"""
rules:
  - name: ci
    match: {tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 2
"""


@dataclass
class Case:
    id: str
    config: str
    images: list[Image]
    expect: dict[str, tuple[str, list[str]]]
    containers: list[Container] = field(default_factory=list)
    state: StateView = field(default_factory=state)
    untag: dict[str, list[str]] = field(default_factory=dict)


CASES = [
    Case(
        "defaults: dangling images past 24h go, tagged images stay",
        "",
        [image("old-dangling"), image("young-dangling", age=D), image("tagged", ["app:1"])],
        {
            "old-dangling": (
                "remove",
                ["dangling since before gcd's records began, age 4w2d >= dangling.min_age 1d"],
            ),
            "young-dangling": (
                "remove",
                ["dangling since before gcd's records began, age 1d >= dangling.min_age 1d"],
            ),
            "tagged": ("keep", ["no rule matches app:1 (unmatched: keep)"]),
        },
    ),
    Case(
        "numeric order, keep_last counts distinct images, not tags",
        NUMBERED,
        [image("a", ["app:9"]), image("b", ["app:10", "app:10.0"]), image("c", ["app:11"])],
        {
            "c": ("keep", ["ci: rank 1 <= keep_last 2 in group repository=app"]),
            "b": (
                "keep",
                [
                    "ci: rank 2 <= keep_last 2 in group repository=app",
                    "no rule matches app:10.0 (unmatched: keep)",
                ],
            ),
            "a": ("remove", ["ci: rank 3 > keep_last 2 in group repository=app"]),
        },
    ),
    Case(
        "groups are per repository by default",
        NUMBERED.replace("keep_last: 2", "keep_last: 1"),
        [image("a1", ["a:1"]), image("a2", ["a:2"]), image("b1", ["b:1"])],
        {
            "a1": ("remove", ["ci: rank 2 > keep_last 1 in group repository=a"]),
            "a2": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=a"]),
            "b1": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=b"]),
        },
    ),
    Case(
        "ties go to the later created image, then to the greater tag name",
        "rules:\n  - {name: c, order_by: created, keep_last: 1}\n",
        [
            image("x", ["r:a"], age=2 * D),
            image("y", ["r:b"], age=2 * D),
            image("z", ["s:a"], age=3 * D),
            image("w", ["s:b"], age=4 * D),
        ],
        {
            "y": ("keep", ["c: rank 1 <= keep_last 1 in group repository=r"]),
            "x": ("remove", ["c: rank 2 > keep_last 1 in group repository=r"]),
            "z": ("keep", ["c: rank 1 <= keep_last 1 in group repository=s"]),
            "w": ("remove", ["c: rank 2 > keep_last 1 in group repository=s"]),
        },
    ),
    Case(
        "equal keys from tag names: the later created image ranks first, then the greater tag",
        NUMBERED.replace("keep_last: 2", "keep_last: 1"),
        [
            image("old", ["app:7"], age=3 * D),
            image("new", ["app:07"], age=2 * D),
            image("b7", ["b:7"], age=2 * D),
            image("b07", ["b:07"], age=2 * D),
        ],
        {
            "new": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
            "old": ("remove", ["ci: rank 2 > keep_last 1 in group repository=app"]),
            "b7": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=b"]),
            "b07": ("remove", ["ci: rank 2 > keep_last 1 in group repository=b"]),
        },
    ),
    Case(
        "keep_within keeps young images past keep_last",
        NUMBERED.replace("keep_last: 2", "keep_last: 1\n    keep_within: 3d"),
        [
            image("a", ["app:1"], age=2 * D),
            image("b", ["app:2"], age=5 * D),
            image("c", ["app:3"], age=D),
        ],
        {
            "c": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
            "a": ("keep", ["ci: age 2d < keep_within 3d in group repository=app"]),
            "b": ("remove", ["ci: rank 2 > keep_last 1 in group repository=app"]),
        },
    ),
    Case(
        "keep_within: an image with no age signal (a 1970 build, no tag time) counts as old",
        NUMBERED.replace("keep_last: 2", "keep_last: 1\n    keep_within: 3d"),
        [
            image("repro", ["app:1"], age=NOW - NOW.replace(year=1970)),
            image("c", ["app:3"], age=D),
        ],
        {
            "c": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
            "repro": ("remove", ["ci: rank 2 > keep_last 1 in group repository=app"]),
        },
    ),
    Case(
        "exclude_tag leaves a tag to unmatched; unmatched: expire removes it",
        NUMBERED.replace("'(?P<n>\\d+)'}", "'(?P<n>\\d+)', exclude_tag: '0'}")
        + "unmatched: expire\n",
        [image("zero", ["app:0"]), image("one", ["app:1"]), image("latest", ["app:latest"])],
        {
            "zero": ("remove", ["no rule matches app:0 (unmatched: expire)"]),
            "one": ("keep", ["ci: rank 1 <= keep_last 2 in group repository=app"]),
            "latest": ("remove", ["no rule matches app:latest (unmatched: expire)"]),
        },
    ),
    Case(
        "keeps are a union: one rule keeping a tag beats another expiring it",
        NUMBERED.replace("keep_last: 2", "keep_last: 1")
        + "  - {name: everything, order_by: natural, keep_last: 5}\n",
        [image("a", ["app:1"]), image("b", ["app:2"])],
        {
            "a": ("keep", ["everything: rank 2 <= keep_last 5 in group repository=app"]),
            "b": (
                "keep",
                [
                    "ci: rank 1 <= keep_last 1 in group repository=app",
                    "everything: rank 1 <= keep_last 5 in group repository=app",
                ],
            ),
        },
    ),
    Case(
        "an unparseable sort key keeps the tag",
        "rules:\n  - name: rel\n    match: {tag: '(?P<v>.+)'}\n    order_by: semver(v)\n    keep_last: 1\n",
        [image("a", ["lib:1.0"]), image("b", ["lib:v1.1"]), image("c", ["lib:nightly"])],
        {
            "b": ("keep", ["rel: rank 1 <= keep_last 1 in group repository=lib"]),
            "a": ("remove", ["rel: rank 2 > keep_last 1 in group repository=lib"]),
            "c": ("keep", ["rel: cannot order lib:nightly by semver(v); kept"]),
        },
    ),
    Case(
        "containers in any state protect their image and its ancestors",
        "unmatched: expire\n",
        [
            image("base"),
            image("mid", parent="base"),
            image("app", ["app:1"], parent="mid"),
            image("exited", ["tool:1"]),
        ],
        {
            "app": (
                "keep",
                ["in use by container web (running)", "no rule matches app:1 (unmatched: expire)"],
            ),
            "mid": (
                "keep",
                [
                    f"parent of in-use image {iid('app')[7:19]} (container web)",
                    f"parent of kept image {iid('app')[7:19]}",
                ],
            ),
            "base": (
                "keep",
                [
                    f"parent of in-use image {iid('app')[7:19]} (container web)",
                    f"parent of kept image {iid('mid')[7:19]}",
                ],
            ),
            "exited": (
                "keep",
                ["in use by container job (exited)", "no rule matches tool:1 (unmatched: expire)"],
            ),
        },
        containers=[container("web", "app"), container("job", "exited", "exited")],
    ),
    Case(
        "min_age protects by the youngest of created, last tag time and first_seen",
        "unmatched: expire\n",
        [
            image("new", ["a:1"], age=10 * timedelta(minutes=1)),
            image("retagged", ["b:1"], tagged_age=timedelta(minutes=5)),
            image("pulled", ["c:1"], age=300 * D),
            image("old", ["d:1"]),
        ],
        {
            "new": (
                "keep",
                [
                    "younger than safety.min_age 1h (age 10m)",
                    "no rule matches a:1 (unmatched: expire)",
                ],
            ),
            "retagged": (
                "keep",
                [
                    "younger than safety.min_age 1h (age 5m)",
                    "no rule matches b:1 (unmatched: expire)",
                ],
            ),
            "pulled": (
                "keep",
                [
                    "younger than safety.min_age 1h (age 2m)",
                    "no rule matches c:1 (unmatched: expire)",
                ],
            ),
            "old": ("remove", ["no rule matches d:1 (unmatched: expire)"]),
        },
        state=state(first_seen={"pulled": timedelta(minutes=2)}),
    ),
    Case(
        "a time in the future is no age signal, and says so; a clock a little ahead is now",
        "unmatched: expire\n",
        [
            image("far", ["f:1"], age=NOW - NOW.replace(year=9999, month=12, day=31)),
            image("tagfar", ["t:1"], tagged_age=-timedelta(days=400)),
            image("ahead", ["a:1"], age=-timedelta(minutes=2)),
        ],
        {
            "far": (
                "remove",
                [
                    "no rule matches f:1 (unmatched: expire)",
                    "created 9999-12-31T12:00:00Z: in the future, not taken as its age or rank",
                ],
            ),
            "tagfar": (
                "remove",
                [
                    "no rule matches t:1 (unmatched: expire)",
                    "tagged 2028-01-01T12:00:00Z: in the future, not taken as its age or rank",
                ],
            ),
            "ahead": (
                "keep",
                [
                    "younger than safety.min_age 1h (age 0s)",
                    "no rule matches a:1 (unmatched: expire)",
                ],
            ),
        },
        state=state(first_seen={"far": 30 * D, "tagfar": 30 * D, "ahead": 30 * D}),
    ),
    Case(
        "order_by created: a created in the future ranks as when gcd first saw the image",
        "rules:\n  - {name: c, keep_last: 1}\n",
        [
            image("future", ["c:future"], age=-400 * D),
            image("recent", ["c:recent"], age=D),
        ],
        {
            "future": (
                "remove",
                [
                    "c: rank 2 > keep_last 1 in group repository=c",
                    "created 2028-01-01T12:00:00Z: in the future, not taken as its age or rank",
                ],
            ),
            "recent": ("keep", ["c: rank 1 <= keep_last 1 in group repository=c"]),
        },
        state=state(first_seen={"future": 10 * D, "recent": D}),
    ),
    Case(
        "created before 2000 (reproducible builds) is no age signal",
        "unmatched: expire\n",
        [image("repro", ["r:1"], age=NOW - NOW.replace(year=1970, month=1, day=1, hour=0))],
        {"repro": ("remove", ["no rule matches r:1 (unmatched: expire)"])},
    ),
    Case(
        "protect entries: ref glob, tag regex, label key and key=value, id prefix",
        f"""unmatched: expire
protect:
  - ref: "base/*"
  - tag: "stable|lts"
  - label: "keep"
  - label: "tier=gold"
  - id: "{iid("by-id")[7:15]}"
""",
        [
            image("glob", ["base/os:1"]),
            image("tag", ["app:lts"]),
            image("label", ["l:1"], labels={"keep": ""}),
            image("kv", ["k:1"], labels={"tier": "gold"}),
            image("kv-other", ["k:2"], labels={"tier": "silver"}),
            image("by-id", ["i:1"]),
        ],
        {
            "glob": (
                "keep",
                [
                    'protect[0] ref "base/*" matches base/os:1',
                    "no rule matches base/os:1 (unmatched: expire)",
                ],
            ),
            "tag": (
                "keep",
                [
                    'protect[1] tag "stable|lts" matches app:lts',
                    "no rule matches app:lts (unmatched: expire)",
                ],
            ),
            "label": (
                "keep",
                [
                    'protect[2] label "keep" matches the image\'s labels',
                    "no rule matches l:1 (unmatched: expire)",
                ],
            ),
            "kv": (
                "keep",
                [
                    'protect[3] label "tier=gold" matches the image\'s labels',
                    "no rule matches k:1 (unmatched: expire)",
                ],
            ),
            "kv-other": ("remove", ["no rule matches k:2 (unmatched: expire)"]),
            "by-id": (
                "keep",
                [
                    f'protect[4] id "{iid("by-id")[7:15]}" matches the image ID',
                    "no rule matches i:1 (unmatched: expire)",
                ],
            ),
        },
    ),
    Case(
        "an expired image's own intermediates go with it; shared ones stay",
        NUMBERED.replace("keep_last: 2", "keep_last: 1"),
        [
            image("shared"),
            image("own1", parent="shared"),
            image("v1", ["app:1"], parent="own1"),
            image("own2", parent="shared"),
            image("v2", ["app:2"], parent="own2"),
        ],
        {
            "v1": ("remove", ["ci: rank 2 > keep_last 1 in group repository=app"]),
            "own1": ("remove", [f"intermediate: goes with its last child {iid('v1')[7:19]}"]),
            "shared": ("keep", [f"parent of kept image {iid('own2')[7:19]}"]),
            "own2": ("keep", [f"parent of kept image {iid('v2')[7:19]}"]),
            "v2": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
        },
    ),
    Case(
        "an expired tagged parent of a kept image is kept",
        NUMBERED.replace("keep_last: 2", "keep_last: 1"),
        [
            image("base", ["base:1"]),
            image("base2", ["base:2"]),
            image("app", ["app:1"], parent="base"),
        ],
        {
            "base": (
                "keep",
                [
                    f"parent of kept image {iid('app')[7:19]}",
                    "ci: rank 2 > keep_last 1 in group repository=base",
                ],
            ),
            "base2": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=base"]),
            "app": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
        },
    ),
    Case(
        "dangling grace counts from first seen dangling; pre-existing ones use their age",
        "",
        [image("recent", age=10 * D), image("long", age=10 * D), image("before-store", age=10 * D)],
        {
            "recent": ("keep", ["dangling for 2h < dangling.min_age 1d"]),
            "long": ("remove", ["dangling for 2d >= dangling.min_age 1d"]),
            "before-store": (
                "remove",
                ["dangling since before gcd's records began, age 1w3d >= dangling.min_age 1d"],
            ),
        },
        state=state(dangling_since={"recent": 2 * H, "long": 2 * D}),
    ),
    Case(
        "dangling.action: keep",
        "dangling: {action: keep}\n",
        [image("d")],
        {"d": ("keep", ["dangling (dangling.action: keep)"])},
    ),
    Case(
        "a digest-only image is dangling and removed directly",
        "",
        [image("pulled", digests=["repo@sha256:" + "a" * 64])],
        {
            "pulled": (
                "remove",
                ["dangling since before gcd's records began, age 4w2d >= dangling.min_age 1d"],
            )
        },
    ),
    Case(
        "guard max_removal_fraction refuses a repository's plan",
        "safety: {min_age: 0s, max_removal_fraction: 0.5, keep_one_per_repository: false}\n"
        + NUMBERED.replace("keep_last: 2", "keep_last: 1"),
        [
            image("a", ["app:1"]),
            image("b", ["app:2"]),
            image("c", ["app:3"]),
            image("x", ["lib:1"]),
            image("y", ["lib:2"]),
        ],
        {
            "a": (
                "keep",
                [
                    "guard safety.max_removal_fraction: would remove 2 of 3 tagged images of app (67% > 50%)",
                    "ci: rank 3 > keep_last 1 in group repository=app",
                ],
            ),
            "b": (
                "keep",
                [
                    "guard safety.max_removal_fraction: would remove 2 of 3 tagged images of app (67% > 50%)",
                    "ci: rank 2 > keep_last 1 in group repository=app",
                ],
            ),
            "c": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
            "x": ("remove", ["ci: rank 2 > keep_last 1 in group repository=lib"]),
            "y": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=lib"]),
        },
    ),
    Case(
        # x's two names rank once in the group that spans repositories: counted twice, x would
        # take two of the three places and y would be removed.
        "group_by [] ranks an image with names in several repositories once",
        "safety: {min_age: 0s, max_removal_fraction: 1.0}\n"
        "rules: [{name: ci, match: {tag: '(?P<n>\\d+)'}, group_by: [], order_by: numeric(n), keep_last: 2}]\n",
        [image("x", ["app:5", "lib:5"]), image("y", ["app:4"]), image("z", ["app:3"])],
        {
            "x": ("keep", ["ci: rank 1 <= keep_last 2 in group (all)"]),
            "y": ("keep", ["ci: rank 2 <= keep_last 2 in group (all)"]),
            "z": ("remove", ["ci: rank 3 > keep_last 2 in group (all)"]),
        },
    ),
    Case(
        "group_by a named group spans repositories: an image ranks once in each of its groups",
        "safety: {min_age: 0s, max_removal_fraction: 1.0}\n"
        "rules: [{name: ci, match: {tag: '(?P<b>[a-z]+)-(?P<n>\\d+)'}, group_by: [b], order_by: numeric(n), keep_last: 3}]\n",
        [
            image("x", ["app:main-5"]),
            image("y", ["app:dev-3"]),
            image("z", ["app:main-4", "lib:main-4"]),
            image("w", ["app:main-3"]),
            image("v", ["app:main-2"]),
        ],
        {
            "z": ("keep", ["ci: rank 2 <= keep_last 3 in group b=main"]),
            "w": ("keep", ["ci: rank 3 <= keep_last 3 in group b=main"]),
            "v": ("remove", ["ci: rank 4 > keep_last 3 in group b=main"]),
        },
    ),
    Case(
        # Refusing x for `a` must not lower `b`'s share: judged after x's refusal, b would
        # remove 1 of 3 and y would go, in an order-dependent plan a second cycle undoes.
        "guard max_removal_fraction judges every repository on the same plan",
        "safety: {min_age: 0s, max_removal_fraction: 0.5, keep_one_per_repository: false}\n"
        "unmatched: expire\n"
        "rules: [{name: ci, match: {repository: b, tag: '(?P<n>\\d+)'}, order_by: numeric(n), keep_last: 1}]\n",
        [image("x", ["a:1", "b:1"]), image("y", ["b:2"]), image("z", ["b:3"])],
        {
            "x": (
                "keep",
                [
                    "guard safety.max_removal_fraction: would remove 1 of 1 tagged images of a (100% > 50%)",
                    "no rule matches a:1 (unmatched: expire)",
                    "ci: rank 3 > keep_last 1 in group repository=b",
                ],
            ),
            "y": (
                "keep",
                [
                    "guard safety.max_removal_fraction: would remove 2 of 3 tagged images of b (67% > 50%)",
                    "ci: rank 2 > keep_last 1 in group repository=b",
                ],
            ),
            "z": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=b"]),
        },
    ),
    Case(
        "guard keep_one_per_repository keeps the newest tagged image of a repository",
        "safety: {min_age: 0s, max_removal_fraction: 1.0}\nunmatched: expire\n",
        [image("old", ["app:a"], age=3 * D), image("new", ["app:b"], age=2 * D)],
        {
            "old": ("remove", ["no rule matches app:a (unmatched: expire)"]),
            "new": (
                "keep",
                [
                    "guard safety.keep_one_per_repository: last tagged image of app",
                    "no rule matches app:b (unmatched: expire)",
                ],
            ),
        },
    ),
    Case(
        "guard max_removals_per_run removes the oldest first",
        "safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false, max_removals_per_run: 2}\n",
        [image("d1", age=5 * D), image("d2", age=9 * D), image("d3", age=7 * D)],
        {
            "d2": (
                "remove",
                ["dangling since before gcd's records began, age 1w2d >= dangling.min_age 1d"],
            ),
            "d3": (
                "remove",
                ["dangling since before gcd's records began, age 1w >= dangling.min_age 1d"],
            ),
            "d1": (
                "keep",
                [
                    "guard safety.max_removals_per_run: 2 removals reached; older images go first",
                    "dangling since before gcd's records began, age 5d >= dangling.min_age 1d",
                ],
            ),
        },
    ),
    Case(
        "untag_expired untags expired tags of an image kept by another tag",
        NUMBERED.replace("keep_last: 2", "keep_last: 1") + "untag_expired: true\n",
        [image("a", ["app:1", "app:stable"]), image("b", ["app:2"]), image("c", ["app:0"])],
        {
            "a": (
                "keep",
                [
                    "no rule matches app:stable (unmatched: keep)",
                    "untag app:1: expired",
                    "ci: rank 2 > keep_last 1 in group repository=app",
                ],
            ),
            "b": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
            "c": ("remove", ["ci: rank 3 > keep_last 1 in group repository=app"]),
        },
        untag={"a": ["app:1"]},
    ),
    Case(
        "untag_expired never strips the last tag, nor touches a young image",
        NUMBERED.replace("keep_last: 2", "keep_last: 1") + "untag_expired: true\n",
        [
            image("used", ["app:1"]),
            image("young", ["app:2", "app:keep"], age=timedelta(minutes=5)),
            image("top", ["app:3"]),
        ],
        {
            "used": (
                "keep",
                [
                    "in use by container c (exited)",
                    "ci: rank 3 > keep_last 1 in group repository=app",
                ],
            ),
            "young": (
                "keep",
                [
                    "younger than safety.min_age 1h (age 5m)",
                    "no rule matches app:keep (unmatched: keep)",
                    "ci: rank 2 > keep_last 1 in group repository=app",
                ],
            ),
            "top": ("keep", ["ci: rank 1 <= keep_last 1 in group repository=app"]),
        },
        containers=[container("c", "used", "exited")],
    ),
    Case(
        "order_by last_used ranks by observed use, unused images last",
        "rules:\n  - {name: lru, order_by: last_used, keep_last: 1}\n",
        [image("a", ["t:a"]), image("b", ["t:b"]), image("c", ["t:c"])],
        {
            "b": ("keep", ["lru: rank 1 <= keep_last 1 in group repository=t"]),
            "a": ("remove", ["lru: rank 2 > keep_last 1 in group repository=t"]),
            "c": ("remove", ["lru: rank 3 > keep_last 1 in group repository=t"]),
        },
        state=state(last_used={"a": 3 * D, "b": D}),
    ),
    Case(
        "order_by tagged ranks by last tag time",
        "rules:\n  - {name: t, order_by: tagged, keep_last: 1}\n",
        [
            image("a", ["t:a"], age=2 * D, tagged_age=D),
            image("b", ["t:b"], age=D, tagged_age=D + H),
        ],
        {
            "a": ("keep", ["t: rank 1 <= keep_last 1 in group repository=t"]),
            "b": ("remove", ["t: rank 2 > keep_last 1 in group repository=t"]),
        },
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_planner(case: Case) -> None:
    plan = policy.plan(snapshot(case.images, case.containers), cfg(case.config), case.state, NOW)
    got = {name: plan.decision(iid(name)) for name in case.expect}
    assert {n: (d.action, list(d.reasons)) for n, d in got.items()} == case.expect
    assert {n: list(d.untag) for n, d in got.items() if d.untag} == case.untag
    assert len(plan.decisions) == len(case.images)


def test_bytes_count_each_layer_once() -> None:
    base = [("busybox", 2_000_000), ("deps", 500_000)]
    images = [
        image("a", ["app:1"], layers=[*base, ("a", 10)]),
        image("b", ["app:2"], layers=[*base, ("b", 20)]),
        image("c", ["app:3"], layers=[*base, ("c", 40)]),
        image("other", ["lib:1"], layers=[("busybox", 2_000_000), ("lib", 7)]),
    ]
    plan = policy.plan(
        snapshot(images), cfg("unmatched: expire\nprotect: [{ref: 'lib:*'}]\n"), state(), NOW
    )
    # a, b, c go: their own layers and "deps" are freed; busybox stays with lib:1.
    assert plan.reclaimable_bytes == 500_000 + 70
    assert sum(d.bytes for d in plan.decisions) == plan.reclaimable_bytes
    assert plan.decision(iid("other")).bytes == 0


def test_intermediates_are_implied_and_digest_holders_are_not() -> None:
    images = [
        image("mid"),
        image("leaf", ["app:1"], parent="mid"),
        image("pinned", digests=["r@sha256:" + "b" * 64]),
        image("top", parent="pinned"),
    ]
    plan = policy.plan(snapshot(images), cfg("unmatched: expire\n"), state(), NOW)
    assert plan.decision(iid("mid")).implied
    assert not plan.decision(iid("leaf")).implied
    assert not plan.decision(iid("pinned")).implied  # its digest reference must be deleted
    assert plan.decision(iid("top")).action == "remove"


def test_a_backtracking_pattern_costs_microseconds_not_hours() -> None:
    # Python's re needs about 2**40 steps for `(a+)+` against 40 a's and "-x" (a valid tag):
    # the cycle froze for hours, and /metrics with it. RE2 is linear in the tag.
    tag = "a" * 40 + "-x"
    images = [
        image("victim", [f"app:{tag}"]),
        image("newer", [f"app:a{tag}"], age=timedelta(days=1)),
        image("other", ["app:1"]),
    ]
    config = cfg(
        "protect: [{tag: '(a+)+'}]\n"
        "rules:\n  - {name: r, match: {tag: '(x+x+)+y|(a|aa)+-x'}, keep_last: 1}\n"
    )

    def too_slow(signum: int, frame: object) -> None:
        raise TimeoutError("the planner backtracked")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(30)
    try:
        plan = policy.plan(snapshot(images), config, state(), NOW)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert plan.decision(iid("victim")).action == "remove"
    assert plan.decision(iid("newer")).action == "keep"
    assert plan.decision(iid("other")).action == "keep"


def test_on_podman_a_policy_written_with_short_names_matches_full_ones() -> None:
    images = [
        image("old", ["localhost/app:1"]),
        image("new", ["localhost/app:2"], age=D),
        image("demo", ["docker.io/library/demo:1.0"]),
        image("team", ["docker.io/team/tool:1"]),
    ]
    config = cfg(
        "unmatched: keep\nprotect: [{ref: 'demo:*'}]\n"
        "rules:\n  - {name: r, match: {repository: 'app|demo|team/tool'}, keep_last: 1}\n"
    )
    podman = Snapshot(
        EngineInfo("unix:///podman.sock", "5.4.2", "1.41", "podman", "overlay"), tuple(images), ()
    )
    plan = policy.plan(podman, config, state(), NOW)
    assert plan.decision(iid("old")).action == "remove"
    assert plan.decision(iid("old")).reasons == ("r: rank 2 > keep_last 1 in group repository=app",)
    assert plan.decision(iid("demo")).reasons[0] == (
        'protect[0] ref "demo:*" matches docker.io/library/demo:1.0'
    )
    assert podman.resolve("demo:1.0") is podman.image(iid("demo"))
    assert podman.resolve("team/tool:1") is podman.image(iid("team"))
    # `docker tag` through Podman's API names the same repository docker.io/library/app:
    # one group with the loaded localhost/app, an image with both names counted once.
    tagged = [
        *images,
        image("tagged", ["docker.io/library/app:3", "localhost/app:3"], age=D // 2),
    ]
    podman = Snapshot(podman.engine, tuple(tagged), ())
    plan = policy.plan(podman, config, state(), NOW)
    assert [plan.decision(iid(i)).action for i in ("tagged", "new", "old")] == [
        "keep",
        "remove",
        "remove",
    ]
    assert plan.decision(iid("tagged")).reasons == (
        "r: rank 1 <= keep_last 1 in group repository=app",
    )
    assert plan.decision(iid("new")).reasons == ("r: rank 2 > keep_last 1 in group repository=app",)
    # The repository guards see one repository too: the last build named the other way is
    # not the last of its repository.
    config = cfg(
        "safety: {keep_one_per_repository: true, max_removal_fraction: 1.0}\n"
        "rules:\n  - {name: r, match: {repository: app}, keep_last: 1}\n"
    )
    guarded = Snapshot(
        podman.engine,
        (
            image("old", ["docker.io/library/app:1"]),
            image("new", ["localhost/app:2"], age=D // 2),
        ),
        (),
    )
    plan = policy.plan(guarded, config, state(), NOW)
    assert plan.decision(iid("old")).action == "remove"
    assert plan.decision(iid("new")).action == "keep"
    # On Docker, localhost/app is another registry's repository: no match.
    docker = snapshot(images)
    plan = policy.plan(docker, config, state(), NOW)
    assert plan.decision(iid("old")).action == "keep"
    assert docker.resolve("demo:1.0") is None
