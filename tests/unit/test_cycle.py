"""cycle.py: what a reload's comparison of two configurations does with the state store."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest

from gcd import cycle, policy
from gcd.errors import LockBusy
from gcd.state import Store
from tests.unit.fakeengine import FakeEngine
from tests.unit.snapshots import NOW, cfg, iid, state

KEEP_ONE = (
    "rules:\n  - {name: ci, match: {tag: '(?P<n>\\d+)'}, order_by: numeric(n), keep_last: 1}\n"
)
KEEP_TWO = KEEP_ONE.replace("keep_last: 1", "keep_last: 2")
OLD = "safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false}\n"


def engine() -> FakeEngine:
    fake = FakeEngine()
    for n in (1, 2, 3):
        fake.add(iid(f"app{n}"), f"app:{n}")
    return fake


def test_a_reload_compares_the_old_and_new_plans_on_one_snapshot(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    change = cycle.compare(cfg(OLD + KEEP_ONE), cfg(OLD + KEEP_TWO), engine(), store, NOW)
    assert (change.newly_removed, change.newly_kept, change.removals) == (0, 1, 1)
    store.close()


def test_a_reload_does_not_record_while_another_cycle_holds_the_lock(tmp_path: Path) -> None:
    # A `gcd run` from a shell holds the cycle lock: the daemon's comparison records nothing
    # behind its back (it would write the state store under a running cycle), and says so.
    holder, store = Store(str(tmp_path)), Store(str(tmp_path))
    with holder.lock(0), pytest.raises(LockBusy, match="another gcd cycle holds"):
        cycle.compare(cfg(KEEP_ONE), cfg(KEEP_TWO), engine(), store, NOW, lock_wait=0.05)
    holder.close()
    store.close()
    assert Store(str(tmp_path)).new  # no cycle recorded
    # Without the other cycle, the same comparison records what it saw, as a cycle does.
    store = Store(str(tmp_path))
    cycle.compare(cfg(KEEP_ONE), cfg(KEEP_TWO), engine(), store, NOW)
    store.close()
    assert not Store(str(tmp_path)).new


def test_planning_pauses_the_cyclic_collector_and_gives_it_back_as_it_found_it() -> None:
    # The planner itself is pure; the cycle pauses the collector around it (cycle.plan).
    seen: list[bool] = []
    real = policy.plan

    def plan(*args: object) -> object:
        seen.append(gc.isenabled())
        return real(*args)  # type: ignore[arg-type]

    snap, _ = engine().snapshot({})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(policy, "plan", plan)
        assert gc.isenabled()
        cycle.plan(snap, cfg(KEEP_ONE), state(), NOW)
        assert gc.isenabled()
        gc.disable()
        try:
            cycle.plan(snap, cfg(KEEP_ONE), state(), NOW)
            assert not gc.isenabled()  # a caller's choice stands
        finally:
            gc.enable()
    assert seen == [False, False]


def test_the_engines_byte_count_before_removals_is_read_as_the_snapshot_is_taken(
    tmp_path: Path,
) -> None:
    # On the containerd store /system/df takes a second for a few hundred images: read
    # after the plan, it held every removal back by that long.
    fake = engine()
    asked = threading.Event()
    counts = iter((9_000_000, 6_000_000))
    during: list[bool] = []

    def accounted() -> int | None:
        asked.set()
        return next(counts)

    real = fake.snapshot

    def snapshot(*args: Any) -> Any:
        during.append(asked.wait(5))  # the count is asked for while the snapshot is taken
        return real(*args)

    fake.accounted = accounted  # type: ignore[method-assign]
    fake.snapshot = snapshot  # type: ignore[method-assign,assignment]
    store = Store(str(tmp_path))
    report = cycle.run(cfg(OLD + KEEP_ONE), fake, store, NOW)
    store.close()
    assert during == [True]
    assert sorted(report.removed()) == [iid("app1"), iid("app2")]
    assert (report.accounted_before, report.accounted_after) == (9_000_000, 6_000_000)
