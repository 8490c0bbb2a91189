"""The SQLite state store: what it records per cycle and how it survives damage."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest

from gcd.errors import StateError
from gcd.model import ImageFacts
from gcd.state import FILENAME, Store
from tests.unit.snapshots import NOW, container, iid, image, snapshot

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
    facts = ImageFacts(("a:1",), ("sha256:l1", "sha256:l2"), (10, 20), NOW)
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


def test_an_unreadable_store_is_moved_aside_and_recreated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILENAME).write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING):
        store = Store(str(tmp_path))
    assert store.new
    assert "is unreadable" in caplog.text and "starting a new one" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if ".unreadable-" in p.name]
    store.observe(snapshot([image("x")]), {}, NOW)
    store.close()
    assert not Store(str(tmp_path)).new


def test_an_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError) as caught:
        Store(str(blocker / "state"))
    assert str(caught.value) == (
        f"state_dir {blocker}/state is not writable: Not a directory; "
        "give the gcd user write access or set state_dir in the configuration"
    )


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
    assert store._rows == {}
    assert store.facts() == {iid("x"): facts}
    view = store.observe(snapshot([image("x", ["a:1"]), image("y")]), {}, LATER)
    assert view.first_seen == {iid("y"): LATER}
