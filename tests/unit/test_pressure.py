"""Disk pressure: when a measure is over its mark, how much must go, and which kept images go
first (least recently used), never a protected one.

On a real engine and a real filesystem: tests/integration/test_pressure.py."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from gcd import cycle, disk, policy
from gcd.model import Usage
from tests.unit.fakeengine import FakeEngine
from tests.unit.snapshots import NOW, cfg, container, iid, image, snapshot, state

GB = 10**9


def test_pressure_is_over_a_high_mark_and_frees_down_to_the_low_one() -> None:
    config = cfg("disk: {high: 85%, low: 75%, inodes_high: 90%, inodes_low: 80%}\n").disk
    calm = Usage("/d", 80 * GB, 20 * GB, 1000, 100)
    assert disk.pressure(calm, config, 0) is None
    full = Usage("/d", 90 * GB, 10 * GB, 1000, 100)
    p = disk.pressure(full, config, 0)
    assert p is not None
    assert p.reason == "disk pressure: used 90% >= high 85%"
    assert (p.bytes_to_free, p.inodes_to_free, p.needed) == (15 * GB, 0, 15 * GB)
    # Inodes: at this filesystem's bytes per inode (90 MB here), 50 inodes are 4.5 GB.
    inodes = Usage("/d", 45 * GB, 55 * GB, 1000, 950)
    p = disk.pressure(inodes, config, 0)
    assert p is not None and p.over == ("inodes used 95% >= inodes_high 90%",)
    assert (p.bytes_to_free, p.inodes_to_free) == (0, 150)
    assert p.needed == int(150 * 45 * GB / 950)


def test_a_budget_is_pressure_too_freed_down_to_nine_tenths_of_it() -> None:
    config = cfg("disk: {budget: 10GB}\n").disk
    p = disk.pressure(Usage("/d", 20 * GB, 80 * GB, 1000, 10), config, 12 * GB)
    assert p is not None and p.over == ("engine 12.0GB > budget 10.0GB",)
    assert p.needed == 3 * GB


POLICY = "safety: {min_age: 1h, max_removal_fraction: 0.5}\nrules:\n  - {name: all, keep_last: 5}\n"


def test_pressure_takes_kept_images_least_recently_used_first_and_stops_on_target() -> None:
    images = [
        image("used-long-ago", ["app:1"], layers=[("l1", 3 * GB)]),
        image("never-used-old", ["app:2"], age=timedelta(days=60), layers=[("l2", 3 * GB)]),
        image("used-now", ["app:3"], layers=[("l3", 3 * GB)]),
        image("busy", ["app:4"], layers=[("l4", 3 * GB)]),
        image("young", ["app:5"], age=timedelta(minutes=5), layers=[("l5", 3 * GB)]),
        image("other", ["tool:1"], layers=[("l6", 3 * GB)]),
    ]
    snap = snapshot(images, [container("web", "busy")])
    used = state(last_used={"used-long-ago": timedelta(days=90), "used-now": timedelta(0),
                            "other": timedelta(days=100)})  # fmt: skip
    config = cfg(POLICY)
    first = policy.plan(snap, config, used, NOW)
    assert first.removals() == ()
    usage = Usage("/d", 95 * GB, 5 * GB, 1000, 10)
    pressure = disk.pressure(usage, config.disk, 0)
    assert pressure is not None
    # 20 GB to free: tool:1 is the last of its repository; busy and young are protected.
    chosen = policy.evictions(first, used, pressure, 5 * GB, NOW, keep_one=True)
    assert chosen == {
        iid("used-long-ago"): "disk pressure: used 95% >= high 85%; least recently used "
        "(last used 12w6d ago)",
        iid("never-used-old"): "disk pressure: used 95% >= high 85%; least recently used "
        "(never seen in use, age 8w4d)",
    }
    everything = policy.evictions(first, used, pressure, 100 * GB, NOW, keep_one=True)
    assert set(everything) == {iid("used-long-ago"), iid("never-used-old"), iid("used-now")}
    assert iid("other") in policy.evictions(first, used, pressure, 100 * GB, NOW, keep_one=False)
    # The plan removes them with that reason, and max_removal_fraction (50 %) does not
    # hold pressure back: three of five app images go.
    final = policy.plan(snap, config, used, NOW, evict=everything)
    assert {d.image_id for d in final.removals()} == set(everything)
    gone = final.decision(iid("used-now"))
    assert gone.evicted and gone.reasons == (everything[iid("used-now")],)
    assert gone.expired == (("app:3", "disk pressure"),)
    assert final.decision(iid("busy")).action == "keep"


def test_a_parent_whose_child_stays_is_never_taken() -> None:
    images = [
        image("base", ["base:1"], layers=[("b", GB)]),
        image("app", ["app:1"], parent="base", layers=[("b", GB), ("a", GB)]),
    ]
    snap = snapshot(images)
    used = state(last_used={"base": timedelta(days=30), "app": timedelta(days=1)})
    config = cfg(POLICY)
    pressure = disk.pressure(Usage("/d", 95 * GB, 5 * GB, 10, 1), config.disk, 0)
    assert pressure is not None
    first = policy.plan(snap, config, used, NOW)
    # base is the least recently used, but app builds on it: app goes first, then base.
    chosen = policy.evictions(first, used, pressure, 10 * GB, NOW, keep_one=False)
    assert list(chosen) == [iid("app"), iid("base")]
    # Enough once app is gone (its own layer): base stays.
    assert list(policy.evictions(first, used, pressure, GB, NOW, keep_one=False)) == [iid("app")]


def test_a_filesystem_gcd_cannot_measure_is_said_once_and_retention_goes_on(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    engine = FakeEngine()
    engine.add(iid("a"), "app:1")
    missing = tmp_path / "nowhere"
    config = cfg(f"disk: {{path: {missing}}}\n")
    with caplog.at_level(logging.WARNING):
        assert cycle.watched(config, engine) is None
        assert cycle.watched(config, engine) is None
    said = [r.getMessage() for r in caplog.records if "not watched" in r.getMessage()]
    assert said == [
        f"disk pressure is not watched: cannot measure disk.path {missing}: No such file or "
        "directory; set disk.path to a path gcd can read"
    ]
