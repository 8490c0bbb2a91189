"""The seed document's story on a real engine: builds, moved tags, dangling, intermediates."""

from __future__ import annotations

import docker

from gcd.model import short_id
from tests.images import legacy_build
from tests.integration.conftest import NO_AGE_GUARDS, Gcd, full_id, ids_now, tags_now

POLICY = (
    NO_AGE_GUARDS
    + r"""
rules:
  - name: builds
    match: {repository: demo, tag: '(?P<version>\d+(\.\d+)*)'}
    order_by: semver(version)
    keep_last: 1
"""
)


def test_seed_story_end_to_end(gcd: Gcd, client: docker.APIClient) -> None:
    # docker build -t demo; docker tag demo:latest demo:1.0 (and demo:1, a second name)
    v1 = legacy_build(client, ["demo:latest", "demo:1.0", "demo:1"], {"Rakefile": "v1"})
    # docker build -t demo:1.1 .  (latest still points at v1)
    v2 = legacy_build(client, ["demo:1.1"], {"Rakefile": "v2"})
    # rebuild with -t demo:1.1 -t demo:latest: the first 1.1 dangles, latest moves
    v3 = legacy_build(client, ["demo:1.1", "demo:latest"], {"Rakefile": "v3"})
    assert tags_now(client) == {"demo:1.1": v3, "demo:latest": v3, "demo:1.0": v1, "demo:1": v1}
    # Podman lists IDs without `sha256:`.
    chain = {full_id(i["Id"]): full_id(i["ParentId"]) for i in client.images(all=True)}
    copy_busybox = chain[chain[v1]]  # FROM scratch, COPY busybox: shared by every build
    assert chain[chain[v2]] == copy_busybox == chain[chain[v3]]
    own_parent = {v: chain[v] for v in (v1, v2, v3)}  # COPY Rakefile: one per build

    config = gcd.config(POLICY)
    plan = gcd.json("plan", "--config", str(config))
    decisions = {d["image_id"]: d for d in plan["decisions"]}
    assert decisions[v1]["decision"] == "remove"
    assert decisions[v1]["reasons"] == ["builds: rank 2 > keep_last 1 in group repository=demo"]
    assert decisions[v2]["decision"] == "remove"
    # Already dangling on the store's first cycle: its age stands in for time dangling.
    (reason,) = decisions[v2]["reasons"]
    assert reason.startswith("dangling since before gcd's records began, age ")
    assert reason.endswith(" >= dangling.min_age 0s")
    assert decisions[v3]["decision"] == "keep"
    assert "builds: rank 1 <= keep_last 1 in group repository=demo" in decisions[v3]["reasons"]
    assert "no rule matches demo:latest (unmatched: keep)" in decisions[v3]["reasons"]
    assert decisions[copy_busybox]["decision"] == "keep"
    assert f"parent of kept image {short_id(own_parent[v3])}" in decisions[copy_busybox]["reasons"]
    for v in (v1, v2):
        assert decisions[own_parent[v]]["decision"] == "remove"
        assert decisions[own_parent[v]]["reasons"] == [
            f"intermediate: goes with its last child {short_id(v)}"
        ]
    assert plan["summary"]["remove"] == 4
    assert plan["summary"]["reclaimable_bytes"] > 0

    before = ids_now(client)
    result = gcd("run", "--config", str(config), "--output", "json")
    assert result.returncode == 0, result.stderr
    report = __import__("json").loads(result.stdout)
    outcomes = {d["image_id"]: d["outcome"] for d in report["decisions"]}
    assert (
        outcomes[v1]
        == outcomes[v2]
        == outcomes[own_parent[v1]]
        == outcomes[own_parent[v2]]
        == "done"
    )
    assert outcomes[v3] == "done"  # kept: nothing to do
    # demo:1.0 and demo:1 were untagged one by one; the last untag deleted v1 and its own parent
    assert ids_now(client) == before - {v1, v2, own_parent[v1], own_parent[v2]}
    assert tags_now(client) == {"demo:1.1": v3, "demo:latest": v3}
    assert report["summary"]["reclaimed_bytes"] == report["summary"]["reclaimable_bytes"]

    second = gcd.json("run", "--config", str(config))
    assert second["summary"]["remove"] == 0
    assert ids_now(client) == before - {v1, v2, own_parent[v1], own_parent[v2]}
