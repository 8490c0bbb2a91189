"""`build_cache` on a real engine, with real BuildKit builds: a dry run estimates and prunes
nothing, a run prunes what the engine can, and the bytes agree with `docker system df`."""

from __future__ import annotations

import docker
import pytest

from tests.images import buildkit_build, buildkit_builds_offline
from tests.integration.conftest import NO_AGE_GUARDS, Gcd, podman


def cache_now(client: docker.APIClient) -> tuple[int, int]:
    """(entries, bytes) of BuildKit's cache as the engine lists it."""
    entries = client.df().get("BuildCache") or []
    return len(entries), sum(e["Size"] for e in entries)


def builds(client: docker.APIClient, n: int = 3) -> None:
    for i in range(n):
        buildkit_build(client, f"bk:{i}", {"own": f"build {i}".encode(), "big": bytes(100_000 + i)})


def test_a_dry_run_estimates_and_a_run_prunes_the_build_cache(
    gcd: Gcd, client: docker.APIClient
) -> None:
    if podman(client):
        pytest.skip("Podman keeps no BuildKit cache: see the next test")
    if not buildkit_builds_offline(client):
        pytest.skip("no offline BuildKit build on Docker 26 (tests/images.buildkit_build)")
    builds(client)
    before = cache_now(client)
    assert before[0] >= 3, before

    recent = gcd.config(NO_AGE_GUARDS + "build_cache: {unused_for: 1h}\n")
    run = gcd.json("run", "--config", str(recent))
    assert run["build_cache"]["pruned_entries"] == 0  # all of it was used a moment ago
    assert cache_now(client) == before

    everything = str(gcd.config(NO_AGE_GUARDS + "build_cache: {keep_storage: 0}\n"))
    plan = gcd.json("plan", "--config", everything)
    assert plan["build_cache"] == {
        "available": True, "entries": before[0], "bytes": before[1],
        "planned_entries": before[0], "planned_bytes": before[1], "outcome": "planned",
        "pruned_entries": 0, "reclaimed_bytes": 0, "error": None,
    }  # fmt: skip
    assert cache_now(client) == before

    run = gcd.json("run", "--config", everything)
    after = cache_now(client)
    assert after[1] < before[1] / 10, (before, after)
    assert run["build_cache"]["outcome"] == "done"
    assert run["build_cache"]["pruned_entries"] == before[0] - after[0]
    # What the engine says it freed is what its own listing lost, within 1 %.
    freed = before[1] - after[1]
    assert abs(run["build_cache"]["reclaimed_bytes"] - freed) <= freed / 100, (run, freed)

    builds(client)
    again = cache_now(client)
    result = gcd("run", "--config", everything)
    assert result.returncode == 0, result.stderr
    pruned = again[0] - cache_now(client)[0]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("build cache: "))
    assert line.startswith(f"build cache: {again[0]} entries, ")
    assert f"; pruned {pruned} entries, " in line
    assert f"INFO pruned the build cache: {pruned} entries, " in result.stderr


def test_podman_says_it_keeps_no_build_cache(gcd: Gcd, client: docker.APIClient) -> None:
    if not podman(client):
        pytest.skip("Docker keeps a BuildKit cache: see the test above")
    config = gcd.config(NO_AGE_GUARDS + "build_cache: {keep_storage: 0}\n")
    result = gcd("run", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (
        "\nbuild cache: this engine keeps none (Podman); build_cache has nothing to prune\n"
        in result.stdout
    )
