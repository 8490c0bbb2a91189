"""Retention rules on a real engine: orders, groups, tags kept and expired, containers."""

from __future__ import annotations

from datetime import UTC, datetime

import docker
import pytest

from gcd.model import short_id
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, busybox_layer, legacy_build, load
from tests.integration.conftest import WHEN, Gcd, ids_now, store_bytes, tags_now

SAME_TIME = WHEN
NO_GUARDS = """
safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false}
dangling: {min_age: 0s}
"""


def builds(repository: str, tags: list[str], created: datetime = SAME_TIME) -> list[Spec]:
    """One image per tag, all created at the same second so only the tag can order them."""
    return [
        Spec([f"{repository}:{t}"], [Layer("base", 50_000), Layer(f"{repository}-{t}")], created)
        for t in tags
    ]


def decisions_of(plan: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {t: d for d in plan["decisions"] for t in d["tags"]}


def test_numbered_builds_keep_the_highest_numbers_not_the_lexically_last(
    gcd: Gcd, client: docker.APIClient
) -> None:
    load(client, builds("app", ["build-9", "build-10", "build-11"]))
    config = gcd.config(
        NO_GUARDS
        + r"""
rules:
  - name: ci
    match: {tag: 'build-(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 2
"""
    )
    run = gcd.json("run", "--config", str(config))
    by_tag = decisions_of(run)
    assert by_tag["app:build-9"]["decision"] == "remove"
    assert by_tag["app:build-9"]["reasons"] == ["ci: rank 3 > keep_last 2 in group repository=app"]
    assert by_tag["app:build-11"]["reasons"] == [
        "ci: rank 1 <= keep_last 2 in group repository=app"
    ]
    assert by_tag["app:build-10"]["reasons"] == [
        "ci: rank 2 <= keep_last 2 in group repository=app"
    ]
    assert sorted(tags_now(client)) == ["app:build-10", "app:build-11"]


def test_natural_order_sorts_numbers_inside_tags(gcd: Gcd, client: docker.APIClient) -> None:
    load(client, builds("app", ["r9", "r10", "r100"]))
    config = gcd.config(
        NO_GUARDS
        + """
rules:
  - {name: nat, order_by: natural, keep_last: 1}
"""
    )
    gcd.json("run", "--config", str(config))
    assert sorted(tags_now(client)) == ["app:r100"]


def test_semver_precedence_with_leniency_and_unparseable_tags_kept(
    gcd: Gcd, client: docker.APIClient
) -> None:
    load(client, builds("lib", ["1.2.0", "1.10.0", "1.9", "2.0.0-rc.1", "v2.0", "1.x"]))
    config = gcd.config(
        NO_GUARDS
        + r"""
rules:
  - name: releases
    match: {tag: '(?P<version>v?[0-9x][0-9a-z.\-]*)'}
    order_by: semver(version)
    keep_last: 2
"""
    )
    run = gcd.json("run", "--config", str(config))
    by_tag = decisions_of(run)
    assert by_tag["lib:v2.0"]["reasons"] == [
        "releases: rank 1 <= keep_last 2 in group repository=lib"
    ]
    assert by_tag["lib:2.0.0-rc.1"]["reasons"] == [
        "releases: rank 2 <= keep_last 2 in group repository=lib"
    ]
    assert by_tag["lib:1.10.0"]["reasons"] == [
        "releases: rank 3 > keep_last 2 in group repository=lib"
    ]
    assert by_tag["lib:1.9"]["reasons"] == [
        "releases: rank 4 > keep_last 2 in group repository=lib"
    ]
    assert by_tag["lib:1.x"]["reasons"] == [
        "releases: cannot order lib:1.x by semver(version); kept"
    ]
    assert sorted(tags_now(client)) == ["lib:1.x", "lib:2.0.0-rc.1", "lib:v2.0"]


def test_branch_builds_are_ranked_per_branch(gcd: Gcd, client: docker.APIClient) -> None:
    load(client, builds("svc", ["main-17", "main-18", "main-19", "feat-login-3", "feat-login-4"]))
    config = gcd.config(
        NO_GUARDS
        + r"""
rules:
  - name: branches
    match: {tag: '(?P<branch>.+)-(?P<n>\d+)'}
    group_by: [repository, branch]
    order_by: numeric(n)
    keep_last: 1
"""
    )
    run = gcd.json("run", "--config", str(config))
    by_tag = decisions_of(run)
    assert by_tag["svc:main-18"]["reasons"] == [
        "branches: rank 2 > keep_last 1 in group repository=svc, branch=main"
    ]
    assert by_tag["svc:feat-login-3"]["reasons"] == [
        "branches: rank 2 > keep_last 1 in group repository=svc, branch=feat-login"
    ]
    assert sorted(tags_now(client)) == ["svc:feat-login-4", "svc:main-19"]


def test_an_image_with_one_kept_and_one_expired_tag_is_kept_and_untagged_on_request(
    gcd: Gcd, client: docker.APIClient
) -> None:
    old, _, _ = load(client, builds("web", ["1", "2", "3"]))
    client.tag(old, "web", "stable")  # release alias on the oldest build
    rules = (
        NO_GUARDS
        + r"""
rules:
  - name: ci
    match: {tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 2
"""
    )
    kept = decisions_of(gcd.json("run", "--config", str(gcd.config(rules))))["web:1"]
    assert kept["decision"] == "keep"
    assert kept["untag"] == []
    assert kept["reasons"] == [
        "no rule matches web:stable (unmatched: keep)",
        "ci: rank 3 > keep_last 2 in group repository=web",
    ]
    assert tags_now(client)["web:1"] == old

    untagged = decisions_of(
        gcd.json("run", "--config", str(gcd.config(rules + "untag_expired: true\n")))
    )
    assert untagged["web:1"]["untag"] == ["web:1"]
    assert untagged["web:1"]["outcome"] == "done"
    assert "web:1" not in tags_now(client)
    assert tags_now(client)["web:stable"] == old


def test_images_used_by_stopped_and_running_containers_and_their_parents_are_kept(
    gcd: Gcd, client: docker.APIClient
) -> None:
    stopped_image = legacy_build(client, ["tool:1"], {"f": "stopped"})
    running_image = legacy_build(client, ["tool:2"], {"f": "running"})
    legacy_build(client, ["tool:3"], {"f": "newest"})
    none = client.create_host_config(network_mode="none")
    stopped = client.create_container(
        stopped_image, ["/bin/busybox", "true"], host_config=none, name="stopped"
    )
    client.start(stopped)
    client.wait(stopped)
    running = client.create_container(
        running_image, ["/bin/busybox", "sleep", "600"], host_config=none, name="running"
    )
    client.start(running)
    config = gcd.config(
        NO_GUARDS
        + """
rules:
  - {name: all, keep_last: 1}
"""
    )
    run = gcd.json("run", "--config", str(config))
    by_id = {d["image_id"]: d for d in run["decisions"]}
    assert by_id[stopped_image]["decision"] == "keep"
    assert by_id[stopped_image]["reasons"][0] == "in use by container stopped (exited)"
    assert by_id[running_image]["reasons"][0] == "in use by container running (running)"
    parent = client.inspect_image(running_image)["Parent"]
    parent = parent if parent.startswith("sha256:") else f"sha256:{parent}"  # Podman's is bare
    assert by_id[parent]["decision"] == "keep"
    assert (
        by_id[parent]["reasons"][0]
        == f"parent of in-use image {short_id(running_image)} (container running)"
    )
    assert {stopped_image, running_image, parent} <= ids_now(client)
    assert sorted(tags_now(client)) == ["tool:1", "tool:2", "tool:3"]
    client.remove_container(running, force=True)


def test_dangling_images_wait_for_their_grace_then_go(gcd: Gcd, client: docker.APIClient) -> None:
    (old,) = load(client, [Spec([], [Layer("old-dangling")], datetime(2025, 1, 1, tzinfo=UTC))])
    config = gcd.config("safety: {min_age: 0s}\n")  # dangling.min_age keeps its default, 24h
    first = {d["image_id"]: d for d in gcd.json("run", "--config", str(config))["decisions"]}
    # On the store's first cycle the image's age (since created) stands in for time dangling.
    assert first[old]["decision"] == "remove"
    assert old not in ids_now(client)

    (young,) = load(client, [Spec([], [Layer("new-dangling")], datetime(2025, 1, 1, tzinfo=UTC))])
    second = {d["image_id"]: d for d in gcd.json("run", "--config", str(config))["decisions"]}
    # Appeared after the store was created: the grace counts from when gcd first saw it.
    assert second[young]["decision"] == "keep"
    assert second[young]["reasons"] == ["dangling for 0s < dangling.min_age 1d"]
    assert young in ids_now(client)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "compressed"])
def test_shared_layers_are_counted_once_in_reclaimed_bytes(
    gcd: Gcd, client: docker.APIClient, dockerd: PrivateEngine, packed: bool
) -> None:
    # compressed: layers packed as pulled images' are, the shared one incompressible and the
    # images' own not, loaded without their base. On Docker 28.2's containerd store, which
    # counts the packed blobs, their split cannot be told from the API (docs/engines.md).
    shared = Layer("shared-base", 400_000, random=packed)
    load(
        client,
        [
            Spec(
                [f"big:{n}"],
                [busybox_layer(), shared, Layer(f"own-{n}", 10_000)],
                SAME_TIME,
                note=str(n),
            )
            for n in (1, 2, 3)
        ],
        gzipped=packed,
    )
    load(client, [Spec(["keeper:1"], [busybox_layer(), Layer("keeper", 1000)], SAME_TIME)])
    before = store_bytes(dockerd, client)
    counted = int(client.df()["LayersSize"])  # the engine's own count, as gcd reads it
    config = gcd.config(
        NO_GUARDS
        + """
rules:
  - {name: gone, match: {repository: big}, keep_last: 1}
  - {name: keeper, match: {repository: keeper}, keep_last: 1}
unmatched: expire
"""
    )
    run = gcd.json("run", "--config", str(config))
    removed = [d for d in run["decisions"] if d["decision"] == "remove"]
    assert len(removed) == 2
    after = store_bytes(dockerd, client)
    # Each removed image held its own 10 kB layer; the shared base stays with big:3.
    reclaimed = run["summary"]["reclaimed_bytes"]
    assert run["summary"]["reclaimable_bytes"] == reclaimed
    assert reclaimed == before - after
    assert sum(d["size"] for d in removed) > 10 * reclaimed
    # The report puts the engine's own count beside it: the same drop (Podman 4 keeps no
    # count).
    accounted = run["summary"]["freed_accounted_bytes"]
    if counted == 0:
        assert accounted is None
    else:
        assert accounted == counted - int(client.df()["LayersSize"])
        if counted == before:  # where LayersSize is what store_bytes counts
            assert reclaimed == accounted


def test_expired_parent_and_child_are_removed_children_first_without_conflicts(
    gcd: Gcd, client: docker.APIClient
) -> None:
    base = legacy_build(client, ["base:1"], {"f": "base"})
    app = legacy_build(client, ["app:1"], {"g": "app"}, base="base:1")
    run = gcd.json("run", "--config", str(gcd.config(NO_GUARDS + "unmatched: expire\n")))
    by_id = {d["image_id"]: d for d in run["decisions"]}
    assert (by_id[base]["outcome"], by_id[app]["outcome"]) == ("done", "done")
    assert run["summary"]["skipped"] == run["summary"]["failed"] == 0
    assert ids_now(client) == set()


def test_siblings_sharing_an_intermediate_parent_both_go_and_the_parent_with_them(
    gcd: Gcd, client: docker.APIClient
) -> None:
    parent = legacy_build(client, [], {"shared": "base"})
    client.tag(parent, "tmp", "base")  # a name to build FROM, removed again below
    children = [
        legacy_build(client, [f"kid:{n}"], {"own": str(n)}, base="tmp:base") for n in range(6)
    ]
    client.remove_image("tmp:base")
    if parent not in ids_now(client):
        pytest.skip("this engine (Podman) deletes an image with its last name, children or not")
    run = gcd.json("run", "--config", str(gcd.config(NO_GUARDS + "unmatched: expire\n")))
    by_id = {d["image_id"]: d for d in run["decisions"]}
    assert [by_id[c]["outcome"] for c in children] == ["done"] * 6
    assert by_id[parent]["decision"] == "remove"
    assert by_id[parent]["outcome"] == "done"
    assert ids_now(client) == set()


def test_order_by_created_ranks_two_builds_of_one_second_by_their_full_precision(
    gcd: Gcd, client: docker.APIClient
) -> None:
    second = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    # The newer build has the smaller tag name: were `created` whole seconds (the list
    # API's), the two would tie and the greater tag name, the older build, would stay.
    older, newer = load(
        client,
        [
            Spec(["app:b"], [Layer("b")], second.replace(microsecond=100_000)),
            Spec(["app:a"], [Layer("a")], second.replace(microsecond=900_000)),
        ],
    )
    policy = """
    safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false}
    rules:
      - {name: by-age, match: {repository: app}, order_by: created, keep_last: 1}
    """
    decisions = {
        d["image_id"]: d for d in gcd.json("plan", "--config", str(gcd.config(policy)))["decisions"]
    }
    assert decisions[newer]["decision"] == "keep"
    assert decisions[older]["decision"] == "remove"
    assert decisions[older]["reasons"] == ["by-age: rank 2 > keep_last 1 in group repository=app"]


def test_an_image_dated_in_the_future_is_not_young_forever(
    gcd: Gcd, client: docker.APIClient
) -> None:
    (future,) = load(client, [Spec(["far:1"], [Layer("far")], datetime(9999, 12, 31, tzinfo=UTC))])
    config = str(gcd.config("safety: {min_age: 1h}\nunmatched: expire\n"))
    assert gcd("run", "--config", config).returncode == 0  # first seen now: min_age holds
    decisions = {d["image_id"]: d for d in gcd.json("plan", "--config", config)["decisions"]}
    reasons = decisions[future]["reasons"]
    assert reasons[0].startswith("younger than safety.min_age 1h (age ")  # since gcd saw it
    assert reasons[-1] == (
        "created 9999-12-31T00:00:00Z: in the future, not taken as its age or rank"
    )
