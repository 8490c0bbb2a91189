"""The world changes between plan and execute: the executor re-checks and never forces."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import docker

from gcd import config as gcd_config
from gcd import cycle, executor
from gcd.engine import DockerEngine
from gcd.model import Plan, short_id
from gcd.state import Store
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, busybox_layer, legacy_build, load
from tests.integration.conftest import ids_now, short, tags_now

POLICY = r"""
version: 1
safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false}
dangling: {min_age: 0s}
rules:
  - name: ci
    match: {tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 1
"""
WHEN = datetime(2026, 3, 1, tzinfo=UTC)


def prepare(dockerd: PrivateEngine, tmp_path: Path) -> tuple[Plan, DockerEngine]:
    cfg = gcd_config.parse(POLICY, "test.yaml")
    engine = DockerEngine(dockerd.url, 30)
    plan = cycle.prepare(cfg, engine, Store(str(tmp_path / "state")), cycle.utcnow())
    return plan, engine


def two_builds(client: docker.APIClient) -> tuple[str, str]:
    old, new = load(
        client, [Spec([f"app:{n}"], [busybox_layer(), Layer(f"app-{n}")], WHEN) for n in (1, 2)]
    )
    return old, new


def late_container(client: docker.APIClient, image: str) -> None:
    """A container created after the plan was made: `late`, never started."""
    none = client.create_host_config(network_mode="none")
    client.create_container(image, ["/bin/busybox", "true"], name="late", host_config=none)


def test_container_created_between_plan_and_execute_skips_the_image(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    old, _ = two_builds(client)
    plan, engine = prepare(dockerd, tmp_path)
    assert plan.decision(old).action == "remove"
    late_container(client, old)
    report = executor.execute(plan, engine, plan.now)
    outcome = report.outcome(old)
    assert (outcome.status, outcome.reason) == ("skipped", "now used by container late (created)")
    assert tags_now(client)["app:1"] == old


def test_tag_moved_between_plan_and_execute_stays_on_its_new_image(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    old, _ = two_builds(client)
    plan, engine = prepare(dockerd, tmp_path)
    (moved_to,) = load(client, [Spec(["app:1"], [busybox_layer(), Layer("app-1-rebuilt")], WHEN)])
    report = executor.execute(plan, engine, plan.now)
    # app:1 now names another image: gcd must not delete it. The old image lost its only
    # expired tag to the move and is removed by ID, as planned.
    assert tags_now(client)["app:1"] == moved_to
    # Docker 26's containerd store drops an image with its last name when the name moves
    # (gcd finds it gone); 28's keeps it, untagged, and gcd removes it as planned.
    outcome = report.outcome(old)
    if plan.snapshot.engine.store == "containerd" and outcome.status == "skipped":
        assert outcome.code == "gone", outcome
    else:
        assert outcome.status == "done", outcome
    assert old not in ids_now(client)


def test_image_that_gained_a_tag_is_skipped(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    old, _ = two_builds(client)
    plan, engine = prepare(dockerd, tmp_path)
    client.tag(old, "app", "hotfix")
    report = executor.execute(plan, engine, plan.now)
    assert short(report.outcome(old).reason or "") == "gained tag app:hotfix since the plan"
    assert tags_now(client)["app:1"] == old


def test_engine_conflict_is_a_skip_with_the_engines_reason(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    # A dangling image that gets a child between plan and execute: dockerd on overlay2
    # answers 409; where the engine would delete it anyway, gcd reads the children itself.
    parent = legacy_build(client, [], {"f": "dangling parent"})
    plan, engine = prepare(dockerd, tmp_path)
    assert plan.decision(parent).action == "remove"
    child = legacy_build(client, ["child:1"], {"g": "child"}, base=parent)
    report = executor.execute(plan, engine, plan.now)
    outcome = report.outcome(parent)
    assert outcome.status == "skipped"
    info = plan.snapshot.engine
    if info.kind == "docker" and info.store != "containerd":
        assert outcome.reason is not None and outcome.reason.startswith(
            "engine refused: conflict: unable to delete"
        )
        assert "image has dependent child images" in outcome.reason
    else:
        # The child named is the build's first step, the image whose parent it is.
        bare = parent.removeprefix("sha256:")  # Podman lists IDs without it
        firsts = [
            i["Id"].removeprefix("sha256:")[:12]
            for i in client.images(all=True)
            if i["ParentId"].removeprefix("sha256:") == bare
        ]
        assert (outcome.code, outcome.reason) == (
            "child_kept",
            f"it has a child image {firsts[0]} now",
        )
    assert report.count("failed") == 0
    assert {parent, child} <= ids_now(client)


def test_a_parent_kept_for_a_container_gone_since_the_plan_outlives_its_child(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    # The build step under app:1 (its parent, untagged, with no other child) is kept
    # because a container uses it; the container goes before app:1 is removed. gcd asks
    # every engine not to prune parents; Podman before 5 prunes them anyway, so there gcd
    # leaves app:1 in place instead.
    old = legacy_build(client, ["app:1"], {"f": "old"})
    legacy_build(client, ["app:2"], {"f": "new"})
    parent = str(client.inspect_image(old)["Parent"])
    parent = parent if parent.startswith("sha256:") else f"sha256:{parent}"
    none = client.create_host_config(network_mode="none")
    job = client.create_container(parent, ["/bin/busybox", "true"], name="job", host_config=none)
    plan, engine = prepare(dockerd, tmp_path)
    assert plan.decision(old).action == "remove"
    assert plan.decision(parent).action == "keep"
    client.remove_container(job)
    report = executor.execute(plan, engine, plan.now)
    outcome = report.outcome(old)
    info = plan.snapshot.engine
    if info.kind == "podman" and int(info.server_version.split(".")[0]) < 5:
        assert (outcome.status, outcome.code, outcome.reason) == (
            "skipped",
            "parent_kept",
            f"the engine would delete its untagged parent {short_id(parent)} with it, which the "
            "plan keeps",
        )
        assert old in ids_now(client)
    else:
        assert outcome.status == "done", outcome
    assert parent in ids_now(client)
    assert report.unplanned() == () and report.count("failed") == 0


def test_image_removed_by_someone_else_is_already_gone(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    old, _ = two_builds(client)
    plan, engine = prepare(dockerd, tmp_path)
    client.remove_image("app:1")
    report = executor.execute(plan, engine, plan.now)
    assert (report.outcome(old).status, report.outcome(old).reason) == ("skipped", "already gone")


def test_stop_between_removals_leaves_the_rest_untouched(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    ids = load(client, [Spec([f"app:{n}"], [Layer(f"app-{n}")], WHEN) for n in range(1, 7)])
    plan, engine = prepare(dockerd, tmp_path)
    assert len(plan.removals()) == 5
    # The stop is polled before every request: a removal by ID is a re-read (which, where
    # the engine would delete a parent under its children, is the image list) and a DELETE.
    calls = iter([False] * 2 * 2)
    report = executor.execute(plan, engine, plan.now, stop=lambda: next(calls, True), workers=1)
    done = [
        i for i in ids if report.outcome(i).status == "done" and plan.decision(i).action == "remove"
    ]
    stopped = [i for i in ids if report.outcome(i).reason == "cycle stopped before this action"]
    assert (len(done), len(stopped)) == (2, 3)
    assert set(stopped) <= ids_now(client)
    assert not set(done) & ids_now(client)


def test_container_created_on_a_multi_tag_image_leaves_every_tag_in_place(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    old, _ = two_builds(client)
    client.tag(old, "app", "0")  # two expired tags: untagging one by one would lose the first
    plan, engine = prepare(dockerd, tmp_path)
    assert tuple(sorted(map(short, plan.decision(old).tags))) == ("app:0", "app:1")
    late_container(client, old)
    report = executor.execute(plan, engine, plan.now)
    assert (report.outcome(old).status, report.outcome(old).reason) == (
        "skipped",
        "now used by container late (created)",
    )
    assert tags_now(client)["app:0"] == tags_now(client)["app:1"] == old
