"""The SQLite state store: what it records per cycle and how it survives damage."""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from gcd import policy
from gcd.errors import StateError
from gcd.model import ImageFacts, Outcome, Regret, Report
from gcd.state import FILENAME, Store, UsageLog
from tests.unit.snapshots import NOW, cfg, container, iid, image, snapshot, state

LATER = NOW + timedelta(hours=1)


def test_first_cycle_of_a_new_store_gives_no_first_seen_later_images_get_one(
    tmp_path: Path,
) -> None:
    store = Store(str(tmp_path))
    assert store.new
    view = store.observe(snapshot([image("old", ["a:1"]), image("dangling")]), {}, NOW)
    assert view.new_store
    assert view.first_seen == {} and view.first_seen_dangling == {}
    store.close()

    store = Store(str(tmp_path))
    assert not store.new
    view = store.observe(
        snapshot([image("old", ["a:1"]), image("dangling"), image("pulled", ["b:1"])]), {}, LATER
    )
    assert not view.new_store
    assert view.first_seen == {iid("pulled"): LATER}
    # Already dangling on the first cycle: no time recorded, its age stands in.
    assert view.first_seen_dangling == {}


def test_dangling_time_starts_when_an_image_becomes_dangling_and_clears_when_tagged(
    tmp_path: Path,
) -> None:
    store = Store(str(tmp_path))
    store.observe(snapshot([image("x", ["a:1"])]), {}, NOW)
    assert store.observe(snapshot([image("x")]), {}, LATER).first_seen_dangling == {iid("x"): LATER}
    assert store.observe(
        snapshot([image("x")]), {}, LATER + timedelta(hours=5)
    ).first_seen_dangling == {iid("x"): LATER}
    assert store.observe(snapshot([image("x", ["a:2"])]), {}, LATER).first_seen_dangling == {}


def test_last_used_is_now_for_running_containers_and_creation_time_otherwise(
    tmp_path: Path,
) -> None:
    store = Store(str(tmp_path))
    snap = snapshot(
        [image("r", ["a:1"]), image("e", ["a:2"])],
        [container("run", "r"), container("done", "e", "exited")],
    )
    view = store.observe(snap, {}, NOW)
    assert view.last_used == {iid("r"): NOW, iid("e"): NOW - timedelta(hours=1)}


def test_facts_and_observations_survive_a_reopen_and_vanished_images_are_forgotten(
    tmp_path: Path,
) -> None:
    created = NOW.replace(microsecond=123_456)  # full precision survives the store
    facts = ImageFacts(("a:1",), ("sha256:l1", "sha256:l2"), (10, 20), NOW, created)
    store = Store(str(tmp_path))
    store.observe(snapshot([image("x", ["a:1"]), image("y")]), {iid("x"): facts}, NOW)
    store.observe(snapshot([image("x", ["a:1"]), image("y"), image("z")]), {}, LATER)
    store.close()
    store = Store(str(tmp_path))
    assert store.facts() == {iid("x"): facts}
    view = store.observe(snapshot([image("x", ["a:1"])]), {}, LATER)
    assert view.first_seen == {}  # z is gone and forgotten
    store.close()
    assert Store(str(tmp_path)).observe(snapshot([image("z")]), {}, LATER).first_seen == {
        iid("z"): LATER
    }


def test_an_unreadable_store_is_moved_aside_loudly_and_its_images_count_as_first_seen_now(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILENAME).write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR):
        store = Store(str(tmp_path))
    # Not a new store: a new one would let every image count as old at once.
    assert not store.new
    (aside,) = [p for p in tmp_path.iterdir() if ".unreadable-" in p.name]
    assert f"state store {tmp_path / FILENAME} is unreadable (file is not a database): " in (
        caplog.text
    )
    view = store.observe(snapshot([image("x")]), {}, NOW)
    assert view.first_seen == {iid("x"): NOW} and not view.new_store
    assert store.cycle_problem == (
        f"the state store {tmp_path / FILENAME} was unreadable (file is not a database); "
        f"moved to {aside}"
    )
    store.close()
    again = Store(str(tmp_path))
    assert again.observe(snapshot([image("x")]), {}, LATER).first_seen == {iid("x"): NOW}
    assert again.cycle_problem is None


def test_a_state_dir_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError) as caught:
        Store(str(blocker / "state"))
    assert str(caught.value) == (
        f"state_dir {blocker}/state is not writable: Not a directory; "
        "give the gcd user write access or set state_dir in the configuration"
    )
    assert Store(str(blocker / "state"), writable=False).new  # a dry run plans as on a new host


def test_an_emptied_store_lost_its_memory_and_is_not_a_new_one(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.observe(snapshot([image("x")]), {}, NOW)
    store.close()
    (tmp_path / FILENAME).write_bytes(b"")  # truncated (a full disk, a careless cleanup)
    for name in (f"{FILENAME}-wal", f"{FILENAME}-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    for writable in (False, True):
        store = Store(str(tmp_path), writable=writable)
        view = store.observe(snapshot([image("x"), image("y")]), {}, LATER)
        assert not view.new_store
        assert view.first_seen == {iid("x"): LATER, iid("y"): LATER}
        assert store.cycle_problem is not None and "empt" in store.cycle_problem
        store.close()
    store = Store(str(tmp_path))
    assert store.observe(snapshot([image("x")]), {}, LATER).first_seen == {iid("x"): LATER}
    assert store.cycle_problem is None


def test_impossible_values_are_dropped_reported_and_rewritten(tmp_path: Path) -> None:
    import sqlite3

    facts = ImageFacts(("a:1",), ("sha256:l1",), (10,), None)
    store = Store(str(tmp_path))
    store.observe(
        snapshot([image(n, ["a:1"]) for n in ("ok", "text", "huge", "past", "sizes")]),
        {iid(n): facts for n in ("ok", "sizes")},
        NOW,
    )
    store.close()
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("UPDATE images SET first_seen = 'abc' WHERE id = ?", (iid("text"),))
    db.execute("UPDATE images SET first_seen = 1e300 WHERE id = ?", (iid("huge"),))
    db.execute("UPDATE images SET last_used = -5 WHERE id = ?", (iid("past"),))
    db.execute("UPDATE images SET layer_sizes = '1 x' WHERE id = ?", (iid("sizes"),))
    db.commit()
    db.close()
    store = Store(str(tmp_path))
    assert store.facts() == {iid("ok"): facts}
    names = ("ok", "text", "huge", "past", "sizes")
    view = store.observe(snapshot([image(n, ["a:1"]) for n in names]), {}, LATER)
    assert view.first_seen == {iid(n): LATER for n in ("text", "huge", "past", "sizes")}
    assert store.cycle_problem == (
        f"the state store {tmp_path / FILENAME} held 4 record(s) that gcd did not write as "
        "they are; those images count as first seen now"
    )
    store.close()
    store = Store(str(tmp_path))
    store.observe(snapshot([image(n, ["a:1"]) for n in names]), {}, LATER)
    assert store.cycle_problem is None


def test_a_time_after_now_counts_as_now(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.observe(snapshot([]), {}, NOW)
    store.observe(snapshot([image("x")]), {}, NOW + timedelta(days=3650))  # a clock gone wrong
    view = store.observe(snapshot([image("x")]), {}, NOW)
    assert view.first_seen == {iid("x"): NOW}


def test_a_foreign_wal_is_not_trusted_and_a_stale_one_is_replayed(tmp_path: Path) -> None:
    import shutil

    ours, other, stale = tmp_path / "ours", tmp_path / "other", tmp_path / "stale"
    store = Store(str(ours))
    store.observe(snapshot([]), {}, NOW)
    store.observe(snapshot([image("x")]), {}, NOW)
    store.close()  # checkpointed: no WAL left
    writer = Store(str(other))
    writer.observe(snapshot([]), {}, NOW)
    writer.observe(snapshot([image("x"), image("y")]), {}, LATER - timedelta(minutes=30))
    # Copied while the writer is open: its WAL holds the rows it committed last.
    shutil.copy(other / f"{FILENAME}-wal", ours / f"{FILENAME}-wal")
    stale.mkdir()
    for suffix in ("", "-wal", ".key"):
        shutil.copy(other / f"{FILENAME}{suffix}", stale / f"{FILENAME}{suffix}")
    writer.close()

    store = Store(str(ours))
    view = store.observe(snapshot([image("x"), image("y")]), {}, LATER)
    # SQLite applies another store's WAL to this file; its rows' seals do not hold here.
    assert view.first_seen[iid("y")] == LATER
    assert store.cycle_problem is not None and "did not write as they are" in store.cycle_problem
    assert not [p for p in ours.iterdir() if ".unreadable-" in p.name]
    store.close()
    store = Store(str(ours))
    store.observe(snapshot([image("x"), image("y")]), {}, LATER)
    assert store.cycle_problem is None

    # A WAL a killed gcd left behind is its own: replayed, nothing lost.
    store = Store(str(stale))
    view = store.observe(snapshot([image("y")]), {}, LATER)
    assert view.first_seen == {iid("y"): LATER - timedelta(minutes=30)}
    assert store.cycle_problem is None


def test_the_store_and_its_lock_are_gcds_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(str(state))
    store.observe(snapshot([image("x")]), {}, NOW)
    (state / "gcd.lock").touch()
    os.chmod(state / "gcd.lock", 0o644)  # left by an older gcd
    with store.lock(1):
        pass
    modes = {p.name: p.stat().st_mode & 0o777 for p in [state, *state.iterdir()]}
    assert modes == {
        "state": 0o700,
        FILENAME: 0o600,
        f"{FILENAME}.key": 0o600,
        "gcd.lock": 0o600,
    } | {n: 0o600 for n in modes if n.startswith(f"{FILENAME}-")}


def test_read_only_store_plans_from_the_file_but_writes_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.observe(snapshot([image("x")]), {}, NOW)
    store.close()
    before = (tmp_path / FILENAME).stat().st_mtime_ns, os.path.getsize(tmp_path / FILENAME)
    ro = Store(str(tmp_path), writable=False)
    assert not ro.new
    view = ro.observe(snapshot([image("x"), image("new")]), {}, LATER)
    assert view.first_seen == {iid("new"): LATER}
    ro.close()
    assert (
        (tmp_path / FILENAME).stat().st_mtime_ns,
        os.path.getsize(tmp_path / FILENAME),
    ) == before
    assert Store(str(tmp_path)).observe(
        snapshot([image("x"), image("new")]), {}, LATER
    ).first_seen == {iid("new"): LATER}


def test_the_cycle_lock_is_exclusive_bounded_and_stoppable(tmp_path: Path) -> None:
    import fcntl

    from gcd.errors import LockBusy, Stopped

    store = Store(str(tmp_path))
    with open(tmp_path / "gcd.lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another gcd process's cycle
        with pytest.raises(LockBusy) as caught, store.lock(0.3):
            pass
        assert str(caught.value) == (
            f"another gcd cycle holds {tmp_path}/gcd.lock (waited 0.3s); try again when it has finished"
        )
        with pytest.raises(Stopped), store.lock(30, stop=lambda: True):
            pass
    with store.lock(0.3):
        pass  # free again once the other holder is gone


def test_released_rows_are_read_back_on_the_next_use(tmp_path: Path) -> None:
    facts = ImageFacts(("a:1",), ("sha256:l1",), (10,), None)
    store = Store(str(tmp_path))
    store.observe(snapshot([image("x", ["a:1"])]), {iid("x"): facts}, NOW)
    store.observe(snapshot([image("x", ["a:1"]), image("y")]), {}, LATER)
    store.release()
    # Read back from the file, not kept: what another process recorded meanwhile shows.
    later, last = LATER + timedelta(hours=1), LATER + timedelta(hours=2)
    other = Store(str(tmp_path))
    other.observe(snapshot([image("x", ["a:1"]), image("y"), image("z")]), {}, later)
    other.close()
    assert store.facts() == {iid("x"): facts}
    view = store.observe(snapshot([image("x", ["a:1"]), image("y"), image("z")]), {}, last)
    assert view.first_seen == {iid("y"): LATER, iid("z"): later}


def test_a_store_whose_first_cycle_never_came_is_still_new_not_lost(tmp_path: Path) -> None:
    Store(str(tmp_path)).close()  # the run failed before it observed anything
    store = Store(str(tmp_path))
    assert store.new and store.problem is None
    view = store.observe(snapshot([image("x")]), {}, NOW)
    assert view.new_store and store.cycle_problem is None


def test_a_removed_tag_that_comes_back_within_the_window_is_one_regret(tmp_path: Path) -> None:

    before = snapshot([image("old", ["app:1", "app:x"]), image("new", ["app:2"]), image("d")])
    config = cfg("unmatched: expire\nrules:\n  - {name: ci, match: {tag: '\\d+'}, keep_last: 1}\n")
    plan = policy.plan(before, config, state(), NOW)
    assert plan.decision(iid("old")).action == "remove"
    outcomes = {d.image_id: Outcome(d.image_id, "done") for d in plan.decisions}
    store = Store(str(tmp_path))
    store.observe(before, {}, NOW)
    store.record_removed(Report(plan, False, NOW, outcomes), NOW)
    store.close()

    store = Store(str(tmp_path))
    later = NOW + timedelta(hours=2)
    back = snapshot([image("rebuilt", ["app:1"]), image("new", ["app:2"])])
    store.observe(back, {}, later)
    assert store.regrets(back, timedelta(hours=24), later) == (Regret("app:1", "ci", NOW, later),)
    assert store.regrets(back, timedelta(hours=24), later) == ()  # counted once
    # app:x (unmatched: expire) comes back after the window: no regret, and forgotten.
    again = snapshot([image("other", ["app:x"])])
    store.observe(again, {}, NOW + timedelta(days=2))
    assert store.regrets(again, timedelta(hours=24), NOW + timedelta(days=2)) == ()
    assert store.regrets(again, timedelta(days=30), NOW + timedelta(days=2)) == ()
    # A dry run's read-only store neither counts nor forgets.
    assert Store(str(tmp_path), writable=False).regrets(back, timedelta(days=1), later) == ()


def test_uses_the_event_follower_recorded_count_at_the_next_snapshot(tmp_path: Path) -> None:
    images = snapshot([image("a", ["app:1"]), image("b", ["app:2"])])
    store = Store(str(tmp_path))
    store.observe(images, {}, NOW)
    usage = UsageLog(str(tmp_path))
    used = NOW + timedelta(minutes=5)
    usage.record(iid("a"), used.timestamp())
    usage.record(iid("a"), (NOW - timedelta(days=1)).timestamp())  # an older one: no change
    usage.record(iid("gone"), used.timestamp())
    usage.record(iid("b"), (NOW + timedelta(days=9)).timestamp())  # cannot be true yet
    later = NOW + timedelta(minutes=10)
    assert store.observe(images, {}, later).last_used == {iid("a"): used}
    # A dry run's read-only store sees them too.
    assert Store(str(tmp_path), writable=False).observe(images, {}, later).last_used == {
        iid("a"): used
    }
    # The use of an image no snapshot showed is dropped once a snapshot has passed it.
    rows = sqlite3.connect(tmp_path / FILENAME).execute("SELECT image_id FROM usage").fetchall()
    assert sorted(r[0] for r in rows) == sorted([iid("a"), iid("b")])
    usage.close()
    store.close()


def test_arrivals_the_follower_recorded_give_first_seen_and_tag_times(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.observe(snapshot([image("a", ["app:1"])]), {}, NOW)
    usage = UsageLog(str(tmp_path))
    loaded, tagged = NOW + timedelta(minutes=2), NOW + timedelta(minutes=7)
    usage.arrived(iid("b"), (loaded + timedelta(seconds=30)).timestamp())
    usage.arrived(iid("b"), loaded.timestamp())  # an earlier one: its first arrival
    usage.arrived(iid("a"), tagged.timestamp())  # a tag onto an image seen before
    usage.arrived(iid("gone"), loaded.timestamp())
    usage.arrived(iid("c"), (NOW + timedelta(days=9)).timestamp())  # cannot be true yet
    images = snapshot([image("a", ["app:1"]), image("b", ["app:2"]), image("c", ["app:3"])])
    later = NOW + timedelta(minutes=10)
    view = store.observe(images, {}, later)
    # b arrived before the snapshot saw it; c has no arrival it can trust: seen now (a was
    # there at the new store's first cycle: no first_seen).
    assert view.first_seen == {iid("b"): loaded, iid("c"): later}
    assert view.tagged == {iid("a"): tagged, iid("b"): loaded + timedelta(seconds=30)}
    assert Store(str(tmp_path), writable=False).observe(images, {}, later).tagged == view.tagged
    # An arrival of an image no snapshot showed is dropped once a snapshot has passed it.
    rows = sqlite3.connect(tmp_path / FILENAME).execute("SELECT image_id FROM arrivals")
    assert sorted(r[0] for r in rows) == sorted([iid("a"), iid("b"), iid("c")])
    usage.close()
    store.close()


def test_a_tag_time_from_events_makes_an_image_young_and_ranks_it() -> None:
    """Podman records no tag time: the follower's is the one signal that an old image was
    just tagged."""
    old = image("old", ["app:1"], age=timedelta(days=300))
    older = image("older", ["app:2"], age=timedelta(days=400))
    body = (
        "safety: {min_age: 1h, max_removal_fraction: 1.0}\n"
        "rules:\n  - {name: r, order_by: tagged, keep_last: 1}\n"
    )
    config = cfg(body)
    view = state(tagged={"older": timedelta(minutes=5)})
    plan = policy.plan(snapshot([old, older]), config, view, NOW)
    assert any("younger than safety.min_age" in r for r in plan.decision(iid("older")).reasons)
    assert plan.decision(iid("old")).action == "remove"
    # Without the guard, the rule alone: the image tagged last is the newest.
    plan = policy.plan(snapshot([old, older]), cfg(body.replace("1h", "0s")), view, NOW)
    assert [d.action for d in (plan.decision(iid("older")), plan.decision(iid("old")))] == [
        "keep",
        "remove",
    ]
