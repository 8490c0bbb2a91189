"""`build_cache`: the estimate a dry run shows, the prune a run asks for, the report lines.

On a real engine with real BuildKit builds: tests/integration/test_build_cache.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import pytest

from gcd import buildcache, executor, policy, report
from gcd.config import BuildCacheConfig, parse
from gcd.errors import ConfigError, EngineError
from gcd.metrics import Metrics
from gcd.model import BuildCacheEntry, Plan, Pruned
from gcd.units import parse_size
from tests.unit.fakeengine import FakeEngine
from tests.unit.snapshots import NOW, cfg, state

CACHE = (
    BuildCacheEntry("old-a", 300, False, NOW - timedelta(days=5)),
    BuildCacheEntry("old-b", 200, False, NOW - timedelta(days=4)),
    BuildCacheEntry("mid", 400, False, NOW - timedelta(hours=10)),
    BuildCacheEntry("busy", 5000, True, NOW - timedelta(days=9)),  # a build uses it now
    BuildCacheEntry("new", 100, False, NOW - timedelta(minutes=5)),
)


def settings(body: str) -> BuildCacheConfig:
    return cfg("build_cache: " + body + "\n").build_cache


@pytest.mark.parametrize(
    ("body", "unused", "over"),
    [
        ("{unused_for: 3d}", (2, 500), (0, 0)),
        # 6000 bytes in all: least recently used first, never the busy one.
        ("{keep_storage: 5500}", (0, 0), (2, 500)),
        ("{keep_storage: 0}", (0, 0), (4, 1000)),
        ("{keep_storage: 1MB}", (0, 0), (0, 0)),
        # Independent limits: the old ones for their age, then more for the size.
        ("{unused_for: 3d, keep_storage: 5200}", (2, 500), (1, 400)),
    ],
)
def test_the_estimate_follows_buildkits_order(
    body: str, unused: tuple[int, int], over: tuple[int, int]
) -> None:
    estimate = buildcache.plan(CACHE, settings(body), NOW)
    assert estimate is not None
    assert (estimate.entries, estimate.bytes) == (5, 6000)
    assert (estimate.unused, estimate.over) == (unused, over)


def test_off_unless_set_and_unavailable_on_an_engine_without_a_cache() -> None:
    assert buildcache.plan(CACHE, cfg().build_cache, NOW) is None
    none = buildcache.plan(None, settings("{unused_for: 1h}"), NOW)
    assert none is not None and not none.available


def plan_with_cache(engine: FakeEngine, body: str) -> Plan:
    snapshot, _ = engine.snapshot({})
    config = cfg("build_cache: " + body + "\n")
    estimate = buildcache.plan(engine.build_cache(), config.build_cache, NOW)
    return dataclasses.replace(policy.plan(snapshot, config, state(), NOW), build_cache=estimate)


def test_a_run_prunes_after_the_images_and_reports_what_the_engine_freed() -> None:
    engine = FakeEngine()
    engine.cache = CACHE
    engine.pruned = Pruned(("old-a", "old-b"), 512)
    plan = plan_with_cache(engine, "{unused_for: 3d, keep_storage: 5200}")
    dry = report.planned(plan, NOW)
    assert report.build_cache_line(dry) == (
        "build cache: 5 entries, 6.0kB; would prune 3 entries, 900B "
        "(2 unused for 3d or more, 1 over keep_storage 5.2kB)"
    )
    assert json.loads(report.to_json(dry))["build_cache"] == {
        "available": True, "entries": 5, "bytes": 6000, "planned_entries": 3,
        "planned_bytes": 900, "outcome": "planned", "pruned_entries": 0, "reclaimed_bytes": 0,
        "error": None,
    }  # fmt: skip
    engine.requests.clear()
    done = executor.execute(plan, engine, NOW, workers=1)
    assert engine.requests == [("POST", "/build/prune keep_storage=5200 unused_for=259200")]
    assert report.build_cache_line(done) == "build cache: 5 entries, 6.0kB; pruned 2 entries, 512B"
    assert "\nbuild cache: 5 entries, 6.0kB; pruned 2 entries, 512B\nrun: " in report.to_text(done)
    metrics = Metrics()
    metrics.record(done, 1.0, 0.0)
    assert metrics.registry.get_sample_value("gcd_build_cache_reclaimed_bytes_total") == 512
    assert metrics.registry.get_sample_value("gcd_build_cache_bytes") == 6000 - 512
    assert not done.failed()


def test_a_failed_prune_fails_the_cycle_after_the_images() -> None:
    engine = FakeEngine()
    engine.cache = CACHE
    engine.fail[("POST", "/build/prune keep_storage=None unused_for=3600")] = EngineError("boom")
    done = executor.execute(plan_with_cache(engine, "{unused_for: 1h}"), engine, NOW, workers=1)
    assert report.build_cache_line(done) == "build cache: 5 entries, 6.0kB; prune failed: boom"
    assert done.failed()


def test_nothing_to_prune_and_no_cache_are_said_plainly() -> None:
    engine = FakeEngine()
    engine.cache = CACHE
    dry = report.planned(plan_with_cache(engine, "{keep_storage: 1GB}"), NOW)
    assert report.build_cache_line(dry) == "build cache: 5 entries, 6.0kB; nothing to prune"
    engine.cache = None
    plan = plan_with_cache(engine, "{keep_storage: 1GB}")
    assert report.build_cache_line(report.planned(plan, NOW)) == (
        "build cache: this engine keeps none (Podman); build_cache has nothing to prune"
    )
    engine.requests.clear()
    executor.execute(plan, engine, NOW, workers=1)
    assert not [r for r in engine.requests if r[0] == "POST"]
    assert report.build_cache_line(report.planned(plan_with_cache(engine, "{}"), NOW)) is None


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("10GB", 10**10), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20),
     ("2TiB", 2 * 2**40), ("7kB", 7000), ("0", 0)],
)  # fmt: skip
def test_sizes_read_as_docker_prints_them_or_in_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10XB", 'got "10XB"'),
        ("-1", 'got "-1"'),
        ("[1]", "got a list"),
        ("99999999TiB", 'got "99999999TiB"'),
    ],
)
def test_bad_sizes_are_named_by_line_and_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(f"version: 1\nbuild_cache:\n  keep_storage: {value}\n", "x.yaml")
    assert str(e.value).splitlines() == [
        "x.yaml:3: build_cache.keep_storage: expected a size such as 500MB, 10GB, 2GiB or a "
        f"number of bytes, {message}"
    ]


def test_pressure_asks_for_the_least_recently_used_by_time_and_plans_what_goes_with_them() -> None:
    # Beyond `build_cache` (here: keep_storage 5550 takes old-a and old-b), pressure wants
    # 300 bytes more: `mid` has them. The cut-off is the next whole second: an entry used
    # 10 ms after it (the same build) goes with it; `new` and the busy one stay.
    same_build = BuildCacheEntry(
        "mid-step", 50, False, NOW - timedelta(hours=10) + timedelta(milliseconds=10)
    )
    entries = (*CACHE, same_build)
    cache, added = buildcache.under_pressure(entries, settings("{keep_storage: 5550}"), NOW, 300)
    assert cache is not None
    assert cache.until == NOW - timedelta(hours=10) + timedelta(seconds=1)
    assert (cache.over, cache.pressed, added) == ((2, 500), (2, 450), 450)
    assert cache.planned() == (4, 950)
    # Without `build_cache`, pressure alone: strictly the least recently used, by time.
    cache, added = buildcache.under_pressure(entries, BuildCacheConfig(), NOW, 400)
    assert cache is not None and (cache.keep_storage, cache.unused_for) == (None, None)
    assert (cache.pressed, added) == ((2, 500), 500)  # old-a, old-b: 500 >= 400
    assert cache.until == NOW - timedelta(days=4) + timedelta(seconds=1)
    # Nothing more to take: no cut-off, nothing added.
    assert buildcache.under_pressure(entries, BuildCacheConfig(), NOW, 0) == (None, 0)
    # What a dry run says of it, and what a run asks the engine for.
    cache, _ = buildcache.under_pressure(entries, settings("{keep_storage: 5550}"), NOW, 300)
    assert cache is not None and cache.until is not None
    engine = FakeEngine()
    engine.cache = entries
    plan = dataclasses.replace(plan_with_cache(engine, "{keep_storage: 5550}"), build_cache=cache)
    assert report.build_cache_line(report.planned(plan, NOW)) == (
        "build cache: 6 entries, 6.0kB; would prune 4 entries, 950B "
        "(2 over keep_storage 5.5kB, 2 least recently used, for disk pressure)"
    )
    engine.requests.clear()
    executor.execute(plan, engine, NOW, workers=1)
    assert engine.requests == [
        ("POST", f"/build/prune keep_storage=5550 unused_for=None until={cache.until.isoformat()}")
    ]
