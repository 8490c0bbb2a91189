"""The executor's every outcome path, on an in-memory engine with Docker's removal rules.

The same paths run against a real dockerd in tests/integration (test_races, test_faults);
here each one is forced deterministically, including the windows a real engine rarely hits.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import pytest

from gcd import executor, policy
from gcd.errors import EngineError, EngineUnavailable, NotFoundError
from gcd.metrics import Metrics
from gcd.model import Deletion, Plan, Report, short_id
from tests.unit.fakeengine import FakeEngine
from tests.unit.snapshots import NOW, cfg, iid, state

POLICY = """
rules:
  - name: ci
    match: {tag: '(?P<n>\\d+)'}
    order_by: numeric(n)
    keep_last: 1
"""
OLD, NEW, OTHER = iid("old"), iid("new"), iid("other")


def plan_of(engine: FakeEngine, body: str = POLICY) -> Plan:
    snapshot, _ = engine.snapshot({})
    return policy.plan(snapshot, cfg(body), state(), NOW)


def execute(engine: FakeEngine, plan: Plan, stop: Callable[[], bool] = lambda: False) -> Report:
    return executor.execute(plan, engine, NOW, stop=stop, workers=1)


def world(*old_tags: str) -> FakeEngine:
    """`old` with `old_tags` (expired), `new` with app:99999 (kept by keep_last 1)."""
    engine = FakeEngine()
    engine.add(OLD, *old_tags)
    engine.add(NEW, "app:99999")
    return engine


def deletes(engine: FakeEngine) -> list[str]:
    return [target for method, target in engine.requests if method == "DELETE"]


def test_a_single_tag_image_goes_by_id_only() -> None:
    engine = world("app:1")
    report = execute(engine, plan_of(engine))
    assert report.outcome(OLD).status == "done"
    assert report.outcome(OLD).untagged == ("app:1",)
    assert deletes(engine) == [OLD]
    assert OLD not in engine.images


def test_a_multi_tag_image_loses_all_but_one_tag_by_name_then_goes_by_id() -> None:
    engine = world("app:1", "app:2", "app:3", "app@sha256:" + "a" * 64)
    report = execute(engine, plan_of(engine))
    # app:3, the greatest, goes with the ID (with the digest of its repository).
    assert deletes(engine) == ["app:1", "app:2", OLD]
    assert report.outcome(OLD).status == "done"
    assert sorted(report.outcome(OLD).untagged) == ["app:1", "app:2", "app:3"]


def test_an_untag_the_engine_answered_but_did_not_make_is_not_reported() -> None:
    # Podman 4.3 answers `Untagged` to concurrent untags of one image and keeps some tags.
    engine = world("app:1", "app:2", "app:3")
    plan = plan_of(engine)
    original = engine.delete

    def losing(ref: str) -> Deletion:
        answer = original(ref)
        if ref == "app:1":
            engine.tag(OLD, "app:1")
        return answer

    engine.delete = losing  # type: ignore[method-assign]
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert outcome.untagged == ("app:2",)
    assert (outcome.status, outcome.code) == ("skipped", "conflict")  # two tags: refused
    assert sorted(engine.images[OLD].refs) == ["app:1", "app:3"]


@pytest.mark.parametrize("concurrent", [True, False])
def test_an_engine_that_loses_concurrent_untags_is_untagged_one_at_a_time(
    concurrent: bool,
) -> None:
    engine = FakeEngine(concurrent_untags=concurrent)
    engine.add(OLD, *(f"app:{n}" for n in range(1, 21)))
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    in_flight, most = [0], [0]
    lock = threading.Lock()
    original = engine.delete

    def counted(ref: str) -> Deletion:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.005)
        try:
            return original(ref)
        finally:
            with lock:
                in_flight[0] -= 1

    engine.delete = counted  # type: ignore[method-assign]
    report = executor.execute(plan, engine, NOW, workers=1)
    assert report.outcome(OLD).status == "done"
    assert most[0] == (executor.TAG_WORKERS if concurrent else 1)


def test_a_rebuild_caught_between_the_reread_and_the_delete_is_untouched() -> None:
    engine = world("app:1")
    plan = plan_of(engine)

    def rebuild(method: str, target: str) -> None:
        if (method, target) == ("DELETE", OLD):
            engine.load(OTHER, "app:1")  # CI rebuilt app:1 inside gcd's window

    engine.before = rebuild
    report = execute(engine, plan)
    assert report.outcome(OLD).status == "done"
    assert engine.refs["app:1"] == OTHER and OTHER in engine.images
    assert report.unplanned() == ()


def test_an_image_tagged_while_the_containerd_store_deletes_it_is_reported_kept() -> None:
    engine = world("app:1")
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")
    engine.amid_delete = lambda image_id: engine.tag(image_id, "app:stable")
    report = execute(engine, plan)
    assert sorted(engine.images[OLD].refs) == ["app:stable"]
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code) == ("skipped", "tag_changed")
    assert outcome.reason == (
        "tagged app:stable during its removal; the engine answered that it deleted the "
        "image but kept it with that tag"
    )
    assert outcome.untagged == ("app:1",)
    assert not report.removed() and report.unplanned() == ()


def test_a_tag_the_containerd_store_deleted_with_the_image_is_reported_from_its_events() -> None:
    # Docker 26's containerd store, in the race suite's long run: a promotion tagged the
    # image while the engine deleted it by ID, and the image went with app:stable. The
    # answer names app:1 only: the engine's events show the tag, and gcd says what happened.
    engine = world("app:1")
    engine.loses_amid_tags = True
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")
    engine.amid_delete = lambda image_id: engine.tag(image_id, "app:stable")
    report = execute(engine, plan)
    assert OLD not in engine.images and "app:stable" not in engine.refs
    outcome = report.outcome(OLD)
    assert report.unplanned() == (OLD,)
    assert outcome.error == (
        "it was tagged app:stable during its removal, and the engine deleted it with that tag"
    )
    assert outcome.untagged == ("app:1",)


@pytest.mark.parametrize("lagging_reads", [0, 1, 2])
def test_a_tag_made_during_a_delete_is_found_in_a_log_that_lags_the_answer(
    lagging_reads: int,
) -> None:
    # Podman 4.3, in the race suite's long run: app:stable tagged 5 ms into a DELETE by ID
    # went with the image, the answer naming app:6 only; Podman logs its events a moment
    # after it answers, so the log is read until it shows the image's `delete`.
    engine = world("app:1")
    engine.loses_amid_tags = True
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")
    engine.amid_delete = lambda image_id: engine.tag(image_id, "app:stable")
    engine.lagging_reads = lagging_reads
    engine.lagging_images = {OLD}
    report = execute(engine, plan)
    assert report.unplanned() == (OLD,)
    assert report.outcome(OLD).error == (
        "it was tagged app:stable during its removal, and the engine deleted it with that tag"
    )
    assert engine.requests.count(("GET", "events")) == lagging_reads + 1


def test_where_the_log_does_not_lag_one_read_after_a_delete_by_id_serves() -> None:
    # dockerd logs before it answers: no wait for an event a skewed clock may place outside
    # the window (a remote engine), one read per delete.
    engine = world("app:1")
    engine.loses_amid_tags = True
    engine.lags = False
    engine.lagging_reads = 1
    engine.lagging_images = {OLD}
    execute(engine, plan_of(engine))
    assert engine.requests.count(("GET", "events")) == 1


def _builds_deleted_by_id(count: int) -> tuple[FakeEngine, list[str]]:
    """`count` expired builds on an engine whose deletes by ID are checked by its events, and
    the newest build, kept."""
    engine = FakeEngine()
    engine.loses_amid_tags = True
    builds = [iid(f"build{n}") for n in range(1, count + 1)]
    for n, image_id in enumerate(builds, 1):
        engine.add(image_id, f"app:{n}")
    engine.add(NEW, "app:99999")
    return engine, builds


def test_one_events_read_serves_the_deletes_by_id_answered_before_it() -> None:
    # One read per DELETE by ID was a third of a run's requests on dockerd's classic store:
    # the events are read on a thread of their own, for every removal answered meanwhile,
    # and a tag made during one removal is still told from the others'.
    engine, builds = _builds_deleted_by_id(20)
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")
    promoted = iid("build7")
    engine.amid_delete = lambda image_id: (
        engine.tag(image_id, "app:stable") if image_id == promoted else None
    )
    report = executor.execute(plan, engine, NOW, workers=8)
    assert all(report.outcome(i).status == "done" for i in builds)
    assert report.unplanned() == (promoted,)
    assert report.outcome(promoted).error == (
        "it was tagged app:stable during its removal, and the engine deleted it with that tag"
    )
    assert 1 <= engine.requests.count(("GET", "events")) <= 4  # 20, one per removal, before


def test_a_tag_made_outside_a_removals_own_window_is_not_laid_to_it() -> None:
    # One read spans many removals' windows: each image is judged by the events of its own
    # (a tag it had and lost before its re-read is not one the engine deleted it with).
    engine = FakeEngine()
    engine.lags = False
    first, second = iid("first"), iid("second")
    engine.add(first, "app:1")
    engine.add(second, "app:2")
    engine.add(NEW, "app:99999")
    run = executor._Run(plan_of(engine), engine, lambda: False)
    decisions = {d.image_id: d for d in run.plan.decisions}
    before = engine._now()
    engine.tag(second, "app:stable")  # a promotion that moved on before the re-read
    engine.tag(NEW, "app:stable")
    time.sleep(0.01)  # beyond the events' slack (2 ms)
    checked = engine._now()
    engine.delete(first)
    engine.delete(second)
    answered = engine._now()
    run.amid.add(decisions[first], before, answered)
    run.amid.add(decisions[second], checked, answered)
    assert run.amid.finish() == {}
    assert engine.requests.count(("GET", "events")) == 1


def test_an_engine_lost_while_reading_the_events_of_deletes_is_said_once_and_stops_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, builds = _builds_deleted_by_id(5)
    engine.fail[("GET", "events")] = EngineUnavailable(LOST)
    report = executor.execute(plan_of(engine), engine, NOW, workers=1)
    # The images are gone all the same: the report says so, and what gcd could not check.
    assert all(report.outcome(i).status == "done" for i in builds)
    assert engine.requests.count(("GET", "events")) == 1
    warnings = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert warnings and warnings[0].startswith(
        "cannot read the engine's events to check that no tag came during the removal of "
    )


def test_a_fault_of_gcd_s_own_in_the_events_check_is_said_and_the_report_still_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The checker runs on a thread of its own: an error there that is not the engine's (a
    # bug) must not end it in silence, leaving the later deletes unchecked and unsaid.
    engine, builds = _builds_deleted_by_id(3)
    engine.fail[("GET", "events")] = RuntimeError("boom")
    report = executor.execute(plan_of(engine), engine, NOW, workers=1)
    assert all(report.outcome(i).status == "done" for i in builds)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == len({r.getMessage() for r in errors}) >= 1
    assert all(
        r.getMessage().startswith("cannot check that no tag came during the removal of ")
        and r.exc_info is not None
        for r in errors
    )
    checked = " ".join(r.getMessage() for r in errors)
    assert all(short_id(i) in checked for i in builds)


def test_a_stop_as_the_containerd_store_deletes_still_reports_the_removal() -> None:
    # The events read after the DELETE come after the stop: the image is gone all the same.
    engine = world("app:1")
    engine.loses_amid_tags = True
    stopping = threading.Event()
    engine.amid_delete = lambda image_id: stopping.set()
    report = execute(engine, plan_of(engine), stop=stopping.is_set)
    assert OLD not in engine.images
    assert report.outcome(OLD).status == "done"


def test_events_are_read_after_a_delete_by_id_only_where_the_engine_loses_tags() -> None:
    for loses in (False, True):
        engine = world("app:1")
        engine.loses_amid_tags = loses
        report = execute(engine, plan_of(engine))
        assert report.outcome(OLD).status == "done" and report.unplanned() == ()
        assert (("GET", "events") in engine.requests) is loses


def test_a_tag_made_after_a_shared_list_began_is_found_in_the_events() -> None:
    # Docker 28's containerd store: the first removals share the image list under way when
    # they ask, which began before their call. A promotion tagged the image after the list
    # began (the list does not show it) and the engine deleted it with that tag: the events
    # are read from when the list began, not from the call.
    engine = world("app:1")
    engine.guards_children = False
    engine.loses_amid_tags = True
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")
    began = engine.shared_list_began = engine._now()
    time.sleep(0.02)  # the list under way: longer ago than the events' slack (2 ms)

    def promoted(image_id: str) -> None:
        engine.tag(image_id, "app:stable")
        late = engine.log.pop()  # made after the list began, before the re-check asked
        engine.log.append(dataclasses.replace(late, time_ns=began + 1))

    engine.amid_delete = promoted
    report = execute(engine, plan)
    assert report.unplanned() == (OLD,)
    assert report.outcome(OLD).error == (
        "it was tagged app:stable during its removal, and the engine deleted it with that tag"
    )


def test_only_the_first_removals_may_share_a_list_begun_before_they_asked() -> None:
    # The first re-check of an action that follows no request of gcd's own gives `since`; a
    # parent's follows its children's removals and an image's second follows its own untags,
    # so each of those reads anew.
    engine = FakeEngine(guards_children=False)
    base, leaf, multi = iid("base"), iid("leaf"), iid("multi")
    engine.add(base)
    engine.add(leaf, "app:1", parent=base)
    engine.add(multi, "app:2", "app:3")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    assert {d.image_id for d in plan.removals()} == {base, leaf, multi}
    report = executor.execute(plan, engine, NOW, workers=8)
    assert sorted(report.removed()) == sorted([base, leaf, multi])
    given: dict[str, list[bool]] = {}
    for image_id, since in engine.rechecks:
        given.setdefault(image_id, []).append(since is not None)
    assert given == {leaf: [True], multi: [True, False], base: [False]}


def test_a_tag_gcd_took_by_name_and_made_again_mid_delete_is_reported_kept() -> None:
    engine = world("app:1", "app:2")
    plan = plan_of(engine)
    engine.amid_delete = lambda image_id: engine.tag(image_id, "app:1")  # `docker tag` again
    report = execute(engine, plan)
    assert engine.images[OLD].refs == ["app:1"]
    outcome = report.outcome(OLD)
    assert (outcome.code, outcome.reason) == (
        "tag_changed",
        "tagged app:1 during its removal; the engine answered that it deleted the image but "
        "kept it with that tag",
    )


def test_an_image_given_a_child_mid_delete_on_the_containerd_store_is_reported_kept() -> None:
    engine = FakeEngine(guards_children=False)
    engine.add(OLD, "app:1")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    engine.amid_delete = lambda image_id: engine.add(OTHER, parent=image_id)
    report = execute(engine, plan)
    assert engine.images[OLD].refs == []
    outcome = report.outcome(OLD)
    assert (outcome.code, outcome.reason) == (
        "child_kept",
        f"it has a child image {OTHER[7:19]} now; the engine answered that it deleted the "
        "image but kept it, untagged",
    )


def test_a_tag_moved_mid_removal_onto_an_image_with_no_other_tag_is_an_unplanned_removal() -> None:
    engine = world("app:1", "app:2")
    plan = plan_of(engine)

    def rebuild(method: str, target: str) -> None:
        if (method, target) == ("DELETE", "app:1"):
            engine.load(OTHER, "app:1")  # after gcd re-read app:1, before its DELETE

    engine.before = rebuild
    report = execute(engine, plan)
    # The engine deleted OTHER (its only tag went): gcd cannot undo that, so it says so.
    assert OTHER not in engine.images
    assert report.unplanned() == (OTHER,)
    outcome = report.outcome(OLD)
    assert outcome.error == (
        f"the engine also deleted {OTHER[7:19]}, which the plan did not remove "
        "(a tag moved to it during the removal)"
    )
    assert "app:1" not in outcome.untagged
    metrics = Metrics()
    metrics.record(report, 1.0, 0.0)
    assert metrics.registry.get_sample_value("gcd_unplanned_removals_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "gcd_cycles_total", {"result": "failure", "trigger": "schedule"}
        )
        == 1
    )


def taken_from_other(
    amid: Callable[[FakeEngine], object] = lambda engine: None, *more: tuple[str, str]
) -> tuple[FakeEngine, Report]:
    """app:1 moves to OTHER (which carries keep:1, protected) between gcd's re-read of
    app:1 and its DELETE; `amid` runs right after the move. `more`: images to add first,
    by (ID, tag)."""
    engine = world("app:1", "app:2")
    engine.add(OTHER, "keep:1")
    for image_id, tag in more:
        engine.add(image_id, tag)
    plan = plan_of(engine, POLICY + "protect: [{ref: 'keep:*'}]\n")

    def retag(method: str, target: str) -> None:
        if (method, target) == ("DELETE", "app:1"):
            engine.tag(OTHER, "app:1")
            amid(engine)

    engine.before = retag
    return engine, execute(engine, plan)


def test_a_tag_taken_from_another_image_mid_removal_is_put_back() -> None:
    engine, report = taken_from_other()
    assert sorted(engine.images[OTHER].refs) == ["app:1", "keep:1"]
    assert report.restored() == (f"app:1 on {OTHER[7:19]}",)
    assert report.unplanned() == ()
    metrics = Metrics()
    metrics.record(report, 1.0, 0.0)
    assert metrics.registry.get_sample_value("gcd_tags_restored_total") == 1


def test_a_tag_taken_from_another_image_is_put_back_when_its_tag_event_comes_late() -> None:
    # The containerd store logs a `tag` event when the tagging ends, which may be after
    # gcd's DELETE was answered: the image that lost the tag is then the one whose untag
    # the log shows, since gcd's image shows none.
    engine, report = taken_from_other(lambda engine: engine.log.pop())  # after gcd's window
    assert sorted(engine.images[OTHER].refs) == ["app:1", "keep:1"]
    assert report.restored() == (f"app:1 on {OTHER[7:19]}",)
    assert "app:1" not in report.outcome(OLD).untagged


@pytest.mark.parametrize("lagging_reads", [1, 3])
def test_an_event_log_that_lags_is_read_again_until_it_shows_the_untag(
    lagging_reads: int,
) -> None:
    # Podman's log showed no untag gcd had just made in 201 of 1,653 untags by name (the race
    # suite's long run): gcd then could not tell which image lost the tag.
    def lag(engine: FakeEngine) -> None:
        engine.lagging_reads = lagging_reads

    engine, report = taken_from_other(lag)
    assert sorted(engine.images[OTHER].refs) == ["app:1", "keep:1"]
    assert report.restored() == (f"app:1 on {OTHER[7:19]}",)
    assert engine.requests.count(("GET", "events")) == lagging_reads + 1


def test_a_tag_podman_4_lost_as_gcd_untagged_another_name_is_put_back() -> None:
    # The matrix's podman4 row: a promotion tagged the image while gcd untagged app:1;
    # Podman 4 rewrote the names without app:stable, no event said so, and gcd then
    # deleted the image by ID as it found it.
    engine = FakeEngine(concurrent_untags=False)
    engine.add(OLD, "app:1", "app:2")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")

    def promote_and_lose(method: str, target: str) -> None:
        if (method, target) == ("DELETE", "app:1"):
            engine.tag(OLD, "app:stable")
            engine.images[OLD].refs.remove("app:stable")  # the engine's lost update
            del engine.refs["app:stable"]

    engine.before = promote_and_lose
    report = execute(engine, plan)
    assert sorted(engine.images[OLD].refs) == ["app:2", "app:stable"]
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code) == ("skipped", "tag_changed")
    assert outcome.reason == (
        "gained tag app:stable during its removal, which the engine lost as gcd untagged "
        "another name; put back"
    )
    assert report.restored() == (f"app:stable on {OLD[7:19]}",)
    assert outcome.untagged == ("app:1",)


def test_a_tag_made_and_removed_by_others_during_the_untags_is_not_put_back() -> None:
    engine = FakeEngine(concurrent_untags=False)
    engine.add(OLD, "app:1", "app:2")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)

    def tag_and_untag(method: str, target: str) -> None:
        if (method, target) == ("DELETE", "app:1"):
            engine.tag(OLD, "try:1")
            engine.images[OLD].refs.remove("try:1")
            del engine.refs["try:1"]
            engine._event("untag", OLD, "try:1")  # someone's `docker rmi try:1`

    engine.before = tag_and_untag
    report = execute(engine, plan)
    assert OLD not in engine.images and "try:1" not in engine.refs
    assert report.outcome(OLD).status == "done"


def test_a_stop_while_the_log_is_read_again_still_reports_the_tags_that_went() -> None:
    # SIGTERM on Podman 4, whose log never shows an untag at once: the tags gcd had deleted
    # went unreported (`untagged` empty), as if the image had kept them.
    engine = world("app:1", "app:2")
    stopping = threading.Event()

    def stop_amid(method: str, target: str) -> None:
        if (method, target) == ("DELETE", "app:1"):
            engine.lagging_reads = 1
            stopping.set()

    engine.before = stop_amid
    report = execute(engine, plan_of(engine), stop=stopping.is_set)
    assert "app:1" not in engine.refs
    assert report.outcome(OLD).untagged == ("app:1",)


def test_another_removal_s_untag_in_the_same_moments_does_not_stop_the_reading_again() -> None:
    # 64 removals at once on Podman: the log shows another planned image's untag in the
    # moments of this DELETE before it shows this one's.
    sibling = iid("sibling")

    def lag(engine: FakeEngine) -> None:
        engine._event("untag", sibling, "app:3")  # the sibling's, at the same moment
        engine.lagging_reads, engine.lagging_images = 2, {OTHER, OLD}

    _, report = taken_from_other(lag, (sibling, "app:3"))
    assert report.plan.decision(sibling).action == "remove"
    assert report.restored() == (f"app:1 on {OTHER[7:19]}",)


def test_a_container_created_after_the_plan_skips_a_single_tag_image() -> None:
    engine = world("app:1")
    plan = plan_of(engine)
    engine.run("late", OLD)
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code, outcome.reason) == (
        "skipped",
        "in_use",
        "now used by container late (created)",
    )
    assert outcome.untagged == () and engine.refs["app:1"] == OLD


def test_a_container_created_mid_removal_leaves_a_partial_untag_reported_exactly() -> None:
    engine = world("app:1", "app:2", "app:3")
    plan = plan_of(engine)

    def late(method: str, target: str) -> None:
        if (method, target) == ("DELETE", "app:2"):
            engine.run("late", OLD)

    engine.before = late
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.reason) == ("skipped", "now used by container late (created)")
    assert outcome.untagged == ("app:1", "app:2")
    assert sorted(engine.images[OLD].refs) == ["app:3"]
    metrics = Metrics()
    metrics.record(report, 1.0, 0.0)
    assert metrics.registry.get_sample_value("gcd_tags_removed_total", {"rule": "ci"}) == 2


def test_already_gone_is_a_skip_not_a_failure() -> None:
    engine = world("app:1")
    plan = plan_of(engine)
    engine.delete(OLD)
    report = execute(engine, plan)
    assert (report.outcome(OLD).status, report.outcome(OLD).reason) == ("skipped", "already gone")
    assert report.count("failed") == 0


def test_a_404_on_the_delete_itself_is_already_gone() -> None:
    engine = world("app:1")
    plan = plan_of(engine)
    engine.fail[("DELETE", OLD)] = NotFoundError("No such image")
    report = execute(engine, plan)
    assert (report.outcome(OLD).code, report.outcome(OLD).reason) == ("gone", "already gone")


def test_a_child_image_that_appeared_is_named_by_the_engines_refusal() -> None:
    engine = world("app:1")
    plan = plan_of(engine)
    engine.add(OTHER, "child:1", parent=OLD)
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert outcome.code == "conflict"
    assert outcome.reason == (
        f"engine refused: conflict: unable to delete {OLD[7:19]} (cannot be forced) - "
        "image has dependent child images"
    )


def test_where_the_engine_deletes_parents_under_children_gcd_checks_them_itself() -> None:
    # The containerd store and Podman delete an image that has children: a legacy build
    # FROM app:1 that started after the plan would lose its base.
    engine = FakeEngine(guards_children=False)
    engine.add(OLD, "app:1")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    engine.add(OTHER, parent=OLD)
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code) == ("skipped", "child_kept")
    assert outcome.reason == f"it has a child image {OTHER[7:19]} now"
    assert OLD in engine.images and deletes(engine) == []
    # Without children, the same engine deletes as before.
    engine.delete(OTHER)
    report = execute(engine, plan_of(engine))
    assert report.outcome(OLD).status == "done"


def test_where_the_engine_deletes_parents_under_children_one_image_list_is_the_reread() -> None:
    # Podman 4.3, race suite: app:6 re-read alone on its image (an inspect); while the
    # removal then waited for an image list (the children check), alias:6 came onto the image
    # and app:6 moved on. The engine reads names once when a DELETE by ID arrives: it deleted
    # the image, alias:6 with it. There the list is now the re-read itself: tags, children
    # and what the engine would prune, in one read, and no inspect before it.
    engine = FakeEngine(guards_children=False)
    engine.add(OLD, "app:1")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    engine.requests.clear()
    report = execute(engine, plan)
    assert report.outcome(OLD).status == "done"
    assert [r for r in engine.requests if r[1] != "events"] == [
        ("GET", f"list:{OLD}"),
        ("DELETE", OLD),
    ]

    engine = FakeEngine(guards_children=False)
    engine.add(OLD, "app:1")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)

    def retag(method: str, target: str) -> None:
        if (method, target) == ("GET", f"list:{OLD}"):
            engine.tag(OLD, "alias:1")
            engine.tag(NEW, "app:1")

    engine.before = retag
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code) == ("skipped", "tag_changed")
    assert outcome.reason == "gained tag alias:1 since the plan"
    assert engine.images[OLD].refs == ["alias:1"] and deletes(engine) == []


def test_an_error_on_the_reread_fails_that_image_only() -> None:
    # Podman 5.4.2 answered 500 "normalizing name" to an inspect of an image being pruned:
    # that aborted the whole run.
    engine = world("app:1")
    engine.add(OTHER, "lib:1")
    engine.fail[("GET", OLD)] = EngineError("the Docker engine answered: normalizing name")
    report = execute(engine, plan_of(engine, POLICY + "unmatched: expire\n"))
    assert report.outcome(OLD).status == "failed"
    assert report.outcome(OTHER).status == "done"


def test_an_engine_error_fails_that_image_only() -> None:
    engine = world("app:1", "app:2")
    engine.add(OTHER, "lib:1")
    engine.add(iid("lib2"), "lib:2")
    engine.fail[("DELETE", OTHER)] = EngineError("the Docker engine answered: boom")
    report = execute(engine, plan_of(engine))
    assert report.outcome(OTHER).status == "failed"
    assert report.outcome(OTHER).error == "the Docker engine answered: boom"
    assert report.outcome(OLD).status == "done"


def test_an_engine_lost_mid_run_stops_the_cycle() -> None:
    engine = FakeEngine()
    for n in range(1, 6):
        engine.add(iid(f"i{n}"), f"app:{n}")
    plan = plan_of(engine)
    engine.fail[("DELETE", iid("i2"))] = EngineUnavailable("cannot reach the Docker engine")
    report = execute(engine, plan)
    sent = deletes(engine)
    assert sent[-1] == iid("i2")  # nothing is sent after the engine is lost
    assert report.outcome(iid("i2")).status == "failed"
    assert report.outcome(iid("i2")).code == "engine_down"
    after = [i for i in (iid(f"i{n}") for n in range(1, 5)) if i not in sent]
    assert after and all(report.outcome(i).code == "engine_down" for i in after)
    assert all(report.outcome(i).status == "done" for i in sent[:-1])


LOST = "cannot reach the Docker engine at u: no answer within 3s (engine.timeout)"


@pytest.mark.parametrize("sent", [True, False], ids=["got", "never-left-gcd"])
def test_a_delete_the_engine_got_but_never_answered_may_still_be_carried_out(sent: bool) -> None:
    # Docker 26's containerd store, busy, answered none of 256 DELETEs within a 3s timeout
    # (CI, 2026-12-06), then deleted the images: "failed" alone would say they stayed.
    engine = world("app:1")
    engine.down = True  # nor does it answer a ping: lost
    engine.fail[("DELETE", OLD)] = EngineUnavailable(LOST, sent=sent)
    outcome = execute(engine, plan_of(engine)).outcome(OLD)
    assert (outcome.status, outcome.code) == ("failed", "engine_down")
    assert outcome.error == (
        f"{LOST}; the engine got the DELETE of {short_id(OLD)} and may carry it out all the same"
        if sent
        else LOST
    )


def test_a_busy_engine_that_never_answers_a_delete_fails_that_removal_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine answers a ping: busy, not lost. The other removals go on, the run ends with
    # exit 1 (a failed removal), not 3, and the image is read again until the waits end.
    engine = FakeEngine()
    for n in range(1, 6):
        engine.add(iid(f"i{n}"), f"app:{n}")
    plan = plan_of(engine)
    engine.fail[("DELETE", iid("i2"))] = EngineUnavailable(LOST, sent=True)
    engine.timeout = 0.3  # gcd waits one more engine.timeout in all, 0.1 s then 0.2 s
    monkeypatch.setattr(executor, "SETTLE_FIRST_WAIT", 0.1)
    report = execute(engine, plan)
    outcome = report.outcome(iid("i2"))
    assert (outcome.status, outcome.code) == ("failed", "unanswered")
    assert outcome.error == (
        f"{LOST}; the engine got the DELETE of {short_id(iid('i2'))} and may carry it out all "
        "the same"
    )
    assert [report.outcome(iid(f"i{n}")).status for n in (1, 3, 4)] == ["done"] * 3
    assert ("GET", "_ping") in engine.requests
    # Read again after 0.1 and 0.2 s more (0.3 s in all), besides the re-read before the DELETE.
    assert engine.requests.count(("GET", iid("i2"))) == 1 + 2


def test_gcd_waits_one_more_engine_timeout_for_an_unanswered_delete_doubling_each_wait() -> None:
    assert list(executor._settle_waits(60.0)) == [0.5, 1, 2, 4, 8, 16, 28.5]
    assert list(executor._settle_waits(1.0)) == [0.5, 0.5]
    assert list(executor._settle_waits(0.0)) == []


def test_a_delete_a_busy_engine_carried_out_without_answering_is_reported_done() -> None:
    engine = world("app:1", "app:2")
    engine.late.add(OLD)
    outcome = execute(engine, plan_of(engine)).outcome(OLD)
    assert OLD not in engine.images
    assert (outcome.status, outcome.reason, outcome.error) == (
        "done",
        "the engine answered late: gone after engine.timeout",
        None,
    )
    assert outcome.untagged == ("app:1",)  # by name, answered; app:2 went with the ID


def test_an_error_while_waiting_for_an_unanswered_delete_does_not_end_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Podman answers 500 ("normalizing name") to an inspect of an image it is removing.
    engine = world("app:1")
    engine.timeout = 0.15  # reads after 0.05 s and 0.1 s more
    monkeypatch.setattr(executor, "SETTLE_FIRST_WAIT", 0.05)
    engine.fail[("DELETE", OLD)] = EngineUnavailable(LOST, sent=True)
    reads = []

    def busy(method: str, target: str) -> None:
        if (method, target) != ("GET", OLD):
            return
        reads.append(1)
        if len(reads) == 2:  # the first read of the wait
            del engine.fail[("DELETE", OLD)]
            engine.delete(OLD)  # the engine gets to it
            raise EngineError("the Docker engine answered: normalizing name for image")

    engine.before = busy
    outcome = execute(engine, plan_of(engine)).outcome(OLD)
    assert (outcome.status, outcome.reason) == (
        "done",
        "the engine answered late: gone after engine.timeout",
    )


def test_a_tag_made_during_a_delete_the_engine_answered_late_is_reported() -> None:
    # No answer lists what went: the engine's events show the tag made during the DELETE.
    engine = world("app:1")
    engine.loses_amid_tags = True
    engine.late.add(OLD)
    plan = plan_of(engine, POLICY + "protect: [{tag: stable}]\n")
    engine.amid_delete = lambda image_id: engine.tag(image_id, "app:stable")
    report = execute(engine, plan)
    assert OLD not in engine.images
    assert report.unplanned() == (OLD,)
    assert report.outcome(OLD).error == (
        "it was tagged app:stable during its removal, and the engine deleted it with that tag"
    )


def test_a_stop_while_waiting_for_an_unanswered_delete_fails_it_at_once() -> None:
    engine = world("app:1")
    engine.fail[("DELETE", OLD)] = EngineUnavailable(LOST, sent=True)
    engine.timeout = 60.0
    stopping = threading.Event()
    engine.before = lambda m, t: stopping.set() if t == "_ping" else None
    started = time.monotonic()
    outcome = execute(engine, plan_of(engine), stop=stopping.is_set).outcome(OLD)
    assert time.monotonic() - started < 1  # no wait at all
    assert (outcome.status, outcome.code) == ("failed", "unanswered")


def test_an_untag_a_busy_engine_never_answered_fails_that_image_only() -> None:
    engine = world("app:1", "app:2", "app:3")
    engine.fail[("DELETE", "app:1")] = EngineUnavailable(LOST, sent=True)
    report = execute(engine, plan_of(engine))
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code) == ("failed", "unanswered")
    assert outcome.error == (
        f"{LOST}; the engine got the DELETE of app:1 and may carry it out all the same"
    )
    assert outcome.untagged == ("app:2",)
    assert report.outcome(NEW).status == "done"


@pytest.mark.parametrize("allowed", [1, 2, 5, 40])
def test_a_stop_is_honoured_between_any_two_requests(allowed: int) -> None:
    tags = [f"app:{n}" for n in range(1, 101)]
    engine = world(*tags)
    plan = plan_of(engine)
    sent: list[int] = []
    engine.before = lambda m, t: sent.append(1)
    report = execute(engine, plan, stop=lambda: len(sent) >= allowed)
    outcome = report.outcome(OLD)
    assert outcome.code == "stopped"
    # Exactly what went is reported, and nothing after the stop was sent.
    gone = sorted(set(tags) - set(engine.images[OLD].refs))
    assert sorted(outcome.untagged) == gone
    assert len(engine.requests) <= allowed + executor.TAG_WORKERS
    expected = "cycle stopped before this action" if not gone else None
    assert outcome.reason == expected or outcome.reason == (
        f"cycle stopped after untagging {', '.join(sorted(gone)[:3])}"
        + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
    )


def test_thousands_of_tags_go_a_few_at_a_time_and_every_one_is_reported() -> None:
    tags = [f"app:{n}" for n in range(1, 1001)]
    engine = world(*tags)
    report = execute(engine, plan_of(engine))
    assert report.outcome(OLD).status == "done"
    assert sorted(report.outcome(OLD).untagged) == sorted(tags)
    # Each chunk's tags are checked against the event log once.
    assert sum(1 for _, t in engine.requests if t == "events") == -(-999 // executor.TAG_CHUNK)


def test_an_untag_action_never_takes_the_last_tag() -> None:
    engine = FakeEngine()
    engine.add(OLD, "app:1", "stable:1")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine, POLICY + "untag_expired: true\nprotect: [{ref: 'stable:*'}]\n")
    assert plan.decision(OLD).untag == ("app:1",)
    engine.images[OLD].refs.remove("stable:1")
    del engine.refs["stable:1"]
    report = execute(engine, plan)
    assert report.outcome(OLD).code == "no_tag_left"
    assert engine.refs["app:1"] == OLD


def test_an_implied_parent_kept_by_the_engine_says_why_only_when_true() -> None:
    engine = FakeEngine()
    engine.add(iid("base"))
    engine.add(OLD, "app:1", parent=iid("base"))
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    assert plan.decision(iid("base")).implied
    report = execute(engine, plan)
    assert report.outcome(iid("base")).status == "done"  # removed after its child
    assert iid("base") not in engine.images

    engine = FakeEngine()
    engine.add(iid("base"))
    engine.add(OLD, "app:1", parent=iid("base"))
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    engine.run("late", OLD)
    report = execute(engine, plan)
    assert report.outcome(iid("base")).reason == (
        f"its child image {OLD[7:19]} was not removed, so it stays"
    )
    assert iid("base") in engine.images


def test_a_planned_parent_pruned_with_its_child_is_removed_and_said_so() -> None:
    # Podman before 5 ignores noprune: the parent goes with the child. The plan removed it
    # anyway: its own action finds it gone, and it counts as removed, with the cause.
    engine = FakeEngine(guards_children=False, prunes_parents=True)
    engine.add(iid("base"))
    engine.add(OLD, "app:1", parent=iid("base"))
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    assert plan.decision(iid("base")).action == "remove"
    report = execute(engine, plan)
    assert deletes(engine) == [OLD]
    assert report.unplanned() == ()
    assert report.outcome(OLD).error is None
    base = report.outcome(iid("base"))
    assert (base.status, base.reason) == (
        "done",
        f"the engine deleted it with its child {OLD[7:19]}",
    )
    assert sorted(report.removed()) == sorted([OLD, iid("base")])


def test_an_image_gone_without_gcd_is_still_skipped_as_gone_where_parents_are_pruned() -> None:
    engine = FakeEngine(guards_children=False, prunes_parents=True)
    engine.add(OLD, "app:1")
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    engine.delete(OLD)  # someone else
    report = execute(engine, plan)
    assert (report.outcome(OLD).status, report.outcome(OLD).code) == ("skipped", "gone")


def test_a_parent_the_plan_kept_is_never_pruned_with_a_child() -> None:
    # Kept at plan time because a container used it; the container is gone by the time its
    # child is removed. The engine would prune it: gcd asks it not to.
    engine = FakeEngine()
    engine.add(iid("base"))
    engine.add(OLD, "app:1", parent=iid("base"))
    engine.add(NEW, "app:99999")
    engine.run("job", iid("base"))
    plan = plan_of(engine)
    assert plan.decision(iid("base")).action == "keep"
    del engine.containers["job"]
    report = execute(engine, plan)
    assert report.outcome(OLD).status == "done"
    assert iid("base") in engine.images
    assert report.unplanned() == ()


def test_a_child_whose_removal_would_prune_a_kept_parent_stays() -> None:
    # The same, on an engine that prunes dangling parents whatever gcd asks (Podman before
    # 5): removing the child would take the kept parent with it, so the child stays.
    engine = FakeEngine(guards_children=False, prunes_parents=True)
    engine.add(iid("base"))
    engine.add(OLD, "app:1", parent=iid("base"))
    engine.add(NEW, "app:99999")
    engine.run("job", iid("base"))
    plan = plan_of(engine)
    assert plan.decision(iid("base")).action == "keep"
    del engine.containers["job"]
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert (outcome.status, outcome.code, outcome.reason) == (
        "skipped",
        "parent_kept",
        f"the engine would delete its untagged parent {iid('base')[7:19]} with it, which the "
        "plan keeps",
    )
    assert deletes(engine) == []
    assert iid("base") in engine.images and OLD in engine.images
    assert report.unplanned() == ()


def test_a_kept_parent_with_another_child_does_not_stop_a_removal() -> None:
    engine = FakeEngine(guards_children=False, prunes_parents=True)
    engine.add(iid("base"))
    engine.add(OLD, "app:1", parent=iid("base"))
    engine.add(NEW, "app:99999", parent=iid("base"))
    plan = plan_of(engine)
    assert plan.decision(iid("base")).action == "keep"
    report = execute(engine, plan)
    assert report.outcome(OLD).status == "done"
    assert iid("base") in engine.images


def test_an_image_tagged_anew_while_its_own_tag_moved_away_is_reported_if_deleted() -> None:
    # The one window of a removal by ID: both changes land between the re-read and the
    # DELETE. The engine deletes the image with its new tag; gcd cannot prevent it (no
    # compare-and-swap in the API) but says so: an error, counted as unplanned.
    engine = world("app:1")
    plan = plan_of(engine)

    def promote_and_rebuild(method: str, target: str) -> None:
        if (method, target) == ("DELETE", OLD):
            engine.tag(OLD, "app:stable")
            engine.load(OTHER, "app:1")

    engine.before = promote_and_rebuild
    report = execute(engine, plan)
    outcome = report.outcome(OLD)
    assert report.unplanned() == (OLD,)
    assert outcome.error == (
        "it was tagged app:stable during its removal, and the engine deleted it with that tag"
    )
    assert outcome.untagged == ("app:stable",)


@pytest.mark.parametrize("guards_children", [True, False])
def test_siblings_go_at_once_and_their_planned_parent_after_the_last_of_them(
    guards_children: bool,
) -> None:
    # The legacy builder's intermediates: every build's chain hangs under one base image.
    # One thread for the whole tree made a cycle on the containerd store take minutes.
    engine = FakeEngine(guards_children=guards_children)
    base, middle = iid("base"), iid("middle")
    engine.add(base)
    engine.add(middle, parent=base)
    leaves = [iid(f"leaf{i}") for i in range(6)]
    for i, leaf in enumerate(leaves):
        engine.add(leaf, f"app:{i}", parent=middle if i % 2 else base)
    engine.add(NEW, "app:99999")
    plan = plan_of(engine)
    assert {d.image_id for d in plan.removals()} == {base, middle, *leaves}
    lock = threading.Lock()
    running: set[str] = set()
    during: dict[str, set[str]] = {}  # each delete: what else was being deleted meanwhile
    ended: list[str] = []

    def slow_delete(method: str, target: str) -> None:
        if method != "DELETE":
            return
        with lock:
            running.add(target)
            during[target] = set(running)
        time.sleep(0.05)
        with lock:
            running.discard(target)
            during[target] |= running
            ended.append(target)

    engine.before = slow_delete
    report = executor.execute(plan, engine, NOW, workers=8)
    assert sorted(report.removed()) == sorted([base, middle, *leaves])
    assert max(len(others) for others in during.values()) > 2  # siblings at once
    children = {base: [middle, *leaves[::2]], middle: leaves[1::2]}
    for parent, kids in children.items():
        assert ended.index(parent) > max(ended.index(k) for k in kids)
        assert during[parent] & set(kids) == set()  # not while any child was being deleted


def test_after_an_unanswered_delete_a_busy_engine_gets_fewer_deletes_at_once() -> None:
    # The containerd store answers the DELETEs in flight together: fewer at once, sooner each.
    engine = FakeEngine()
    for n in range(1, 101):
        engine.add(iid(f"i{n:03d}"), f"app:{n}")
    plan = plan_of(engine)
    first = min(d.image_id for d in plan.removals())
    engine.fail[("DELETE", first)] = EngineUnavailable(LOST, sent=True)
    lock = threading.Lock()
    pinged: list[int] = []
    spans: list[tuple[int, int]] = []

    def slow_delete(method: str, target: str) -> None:
        if target == "_ping":
            pinged.append(time.monotonic_ns())
        if method != "DELETE" or target == first:
            return
        began = time.monotonic_ns()
        time.sleep(0.01)
        with lock:
            spans.append((began, time.monotonic_ns()))

    engine.before = slow_delete
    report = executor.execute(plan, engine, NOW, workers=32)
    assert report.outcome(first).code == "unanswered"
    assert len(report.removed()) == 98  # all but the unanswered one (app:100 is kept)
    after = [s for s in spans if s[0] > pinged[0]]
    assert after, "no DELETE went after the ping"
    most = max(sum(1 for b, e in after if b <= t < e) for t, _ in after)
    assert 1 < most <= executor.SLOW_DELETES
