"""Stopped containers past `containers.remove_exited_after`: the plan, the executor, the report.

On a real engine: tests/integration/test_retention.py (containers)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from gcd import containers, executor, policy, report
from gcd.config import parse
from gcd.errors import ConfigError
from gcd.model import Container, ContainerState, Plan, Snapshot
from tests.unit.fakeengine import FakeEngine
from tests.unit.snapshots import NOW, cfg, iid, image, snapshot, state

POLICY = """
containers:
  remove_exited_after: 3d
  protect:
    - name: "keep-*"
    - label: "com.example.keep=yes"
rules:
  - {name: ci, keep_last: 1}
"""


def stopped_container(
    name: str,
    image_name: str,
    state: str = "exited",
    created: timedelta = timedelta(days=10),
    labels: dict[str, str] | None = None,
) -> Container:
    return Container(
        f"c-{name}", name, iid(image_name), image_name, state, NOW - created, labels or {}
    )


def planned(snap: Snapshot, seen: dict[str, ContainerState], body: str = POLICY) -> Plan:
    config = cfg(body)
    decided = containers.plan(snap, config.containers, seen, NOW)
    return policy.plan(snap, config, state(), NOW, decided)


def reasons(plan: Plan) -> dict[str, tuple[str, str]]:
    return {c.name: (c.action, c.reason) for c in plan.containers}


def test_each_stopped_container_gets_a_decision_with_its_reason() -> None:
    snap = snapshot(
        [image("a", ["app:1"]), image("b", ["app:2"]), image("c", ["app:3"])],
        [
            stopped_container("old-job", "a"),
            stopped_container("recent-job", "a"),
            stopped_container("young-job", "a", created=timedelta(hours=5)),
            stopped_container("never-started", "b", state="created", created=timedelta(days=4)),
            stopped_container("keep-db", "b"),
            stopped_container("labelled", "b", labels={"com.example.keep": "yes"}),
            stopped_container("other-label", "b", labels={"com.example.keep": "no"}),
            stopped_container("server", "c", state="running"),
            stopped_container("frozen", "c", state="paused"),
        ],
    )
    # Only what could be old enough and is not protected is inspected.
    assert containers.candidates(snap, cfg(POLICY).containers, NOW) == (
        "c-old-job", "c-recent-job", "c-never-started", "c-other-label",
    )  # fmt: skip
    seen = {
        "c-old-job": ContainerState("exited", NOW - timedelta(days=4, hours=2)),
        "c-recent-job": ContainerState("exited", NOW - timedelta(hours=1)),
        "c-never-started": ContainerState("created", None),
        "c-other-label": ContainerState("running", None),  # started since the list
    }
    assert reasons(planned(snap, seen)) == {
        "keep-db": ("keep", 'protected by containers.protect[0] name "keep-*"'),
        "labelled": ("keep", 'protected by containers.protect[1] label "com.example.keep=yes"'),
        "never-started": (
            "remove", "created 4d ago, never started >= containers.remove_exited_after 3d",
        ),
        "old-job": ("remove", "exited 4d2h ago >= containers.remove_exited_after 3d"),
        "other-label": ("keep", "running when gcd looked closer"),
        "recent-job": ("keep", "exited 1h ago < containers.remove_exited_after 3d"),
        "young-job": ("keep", "exited, created 5h ago < containers.remove_exited_after 3d"),
    }  # fmt: skip


def test_an_image_pinned_only_by_containers_that_go_follows_the_rules() -> None:
    snap = snapshot(
        [image("a", ["app:1"], age=timedelta(days=20)), image("b", ["app:2"], age=timedelta(days=9)),
         image("c", ["app:3"])],
        [stopped_container("job-1", "a"), stopped_container("job-2", "b"),
         stopped_container("job-3", "b", created=timedelta(hours=2))],
    )  # fmt: skip
    seen = {"c-job-1": ContainerState("exited", NOW - timedelta(days=5)),
            "c-job-2": ContainerState("exited", NOW - timedelta(days=5))}  # fmt: skip
    plan = planned(snap, seen)
    assert plan.decision(iid("a")).action == "remove"  # its one container goes
    assert plan.decision(iid("b")).reasons[0] == "in use by container job-3 (exited)"
    # Off: no container decision, and every image a container uses is kept.
    off = planned(snap, seen, "rules:\n  - {name: ci, keep_last: 1}\n")
    assert off.containers == ()
    assert off.decision(iid("a")).reasons[0] == "in use by container job-1 (exited)"


def fake_world() -> tuple[FakeEngine, Plan]:
    engine = FakeEngine()
    engine.add(iid("old"), "app:1")
    engine.add(iid("new"), "app:2")
    finished = NOW - timedelta(days=5)
    engine.run("job", iid("old"), "exited", finished)
    snap, _ = engine.snapshot({})
    seen = engine.stopped(containers.candidates(snap, cfg(POLICY).containers, NOW))
    engine.requests.clear()
    return engine, planned(snap, seen)


def test_the_container_goes_first_then_the_image_it_pinned() -> None:
    engine, plan = fake_world()
    result = executor.execute(plan, engine, NOW, workers=1)
    assert result.container_outcomes["c-job"].status == "done"
    assert result.outcome(iid("old")).status == "done"
    deletes = [t for m, t in engine.requests if m == "DELETE"]
    assert deletes == ["c-job", iid("old")]
    assert result.containers_removed() == 1 and not result.failed()


@pytest.mark.parametrize(
    ("change", "reason", "code"),
    [
        (lambda e: e.run("job", iid("old"), "running"), "running now", "changed"),
        (
            lambda e: e.run("job", iid("old"), "exited", NOW - timedelta(minutes=1)),
            "it ran again since the plan",
            "changed",
        ),
        (lambda e: e.containers.pop("job"), "already gone", "gone"),
    ],
)
def test_a_container_that_changed_since_the_plan_is_skipped(
    change: object, reason: str, code: str
) -> None:
    engine, plan = fake_world()
    change(engine)  # type: ignore[operator]
    result = executor.execute(plan, engine, NOW, workers=1)
    assert result.container_outcomes["c-job"] == ("skipped", reason, None, code)
    if code == "changed":  # still there: the engine refuses its image, gcd skips it
        assert result.outcome(iid("old")).status == "skipped"
        assert iid("old") in engine.images
    assert not result.failed()


def test_a_refused_container_removal_is_skipped_with_the_engines_words() -> None:
    engine, plan = fake_world()
    engine.before = lambda method, target: (
        engine.run("job", iid("old"), "running")
        if (method, target) == ("DELETE", "c-job")
        else None
    )
    result = executor.execute(plan, engine, NOW, workers=1)
    assert result.container_outcomes["c-job"] == (
        "skipped", "the engine refused: cannot remove container job: it is running", None, "conflict",
    )  # fmt: skip
    assert iid("old") in engine.images


def test_the_report_lists_containers_after_the_images() -> None:
    engine, plan = fake_world()
    dry = report.planned(plan, NOW)
    text = report.to_text(dry)
    assert "\n\nCONTAINER  NAME  STATE   DECISION  REASON\n" in text
    assert (
        "\nc-job      job   exited  remove    exited 5d ago >= containers.remove_exited_after 3d\n"
        in text
    )
    assert text.endswith(
        "plan: 2 images, 1 to remove, 0 tags to untag, 1 kept; stopped containers to remove: 1; "
        "1.0kB reclaimable (dry run: nothing removed)\n"
    )
    document = json.loads(report.to_json(dry))
    assert document["containers"] == [
        {"container_id": "c-job", "name": "job", "image_id": iid("old"), "state": "exited",
         "decision": "remove", "reasons": ["exited 5d ago >= containers.remove_exited_after 3d"],
         "outcome": "planned", "error": None}
    ]  # fmt: skip
    assert document["summary"]["containers_to_remove"] == 1
    done = executor.execute(plan, engine, NOW, workers=1)
    assert report.to_text(done).endswith(
        "run: 2 images, 1 to remove, 0 tags to untag, 1 kept; stopped containers removed: 1 of 1; "
        "removed 1, skipped 0, failed 0; reclaimed 1.0kB of 1.0kB planned\n"
    )
    # Without the option the report is as it always was.
    assert "CONTAINER" not in report.to_text(report.planned(plan_without(engine), NOW))


def plan_without(engine: FakeEngine) -> Plan:
    snap, _ = engine.snapshot({})
    return policy.plan(snap, cfg("rules:\n  - {name: ci, keep_last: 1}\n"), state(), NOW)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "containers:\n  protect:\n    - {name: a, label: b}\n",
            "x.yaml:4: containers.protect[0]: expected exactly one of name, label",
        ),
        (
            "containers:\n  protect:\n    - {ref: a}\n",
            "x.yaml:4: containers.protect[0].ref: unknown key (expected one of: name, label)",
        ),
        (
            "containers:\n  remove_exited_after: soon\n",
            'x.yaml:3: containers.remove_exited_after: expected a duration such as 90s, 15m, 2h, 7d, 2w, got "soon"',
        ),
        (
            "containers:\n  protect:\n    - label: '=x'\n",
            'x.yaml:4: containers.protect[0].label: expected key or key=value, got "=x"',
        ),
    ],
)
def test_bad_container_settings_are_named_by_line_and_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse("version: 1\n" + body, "x.yaml")
    assert message in str(e.value).splitlines()
