"""gcd's own records in SQLite: first_seen, first_seen_dangling, last_used, inspect facts.

Docker records none of these. The store is a cache of observations: a missing or unreadable
file is recreated (with a warning), never a crash. One transaction per cycle.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from gcd.errors import LockBusy, StateError, Stopped
from gcd.model import ImageFacts, Snapshot, StateView

log = logging.getLogger(__name__)

FILENAME = "state.db"
LOCKNAME = "gcd.lock"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    first_seen REAL,
    first_seen_dangling REAL,
    dangling INTEGER NOT NULL DEFAULT 0,
    last_used REAL,
    fact_tags TEXT,
    layers TEXT,
    layer_sizes TEXT,
    last_tag_time REAL
);
"""
_RUNNING = frozenset({"running", "restarting", "paused"})


@dataclass(slots=True)
class _Row:
    first_seen: float | None
    first_seen_dangling: float | None
    dangling: bool
    last_used: float | None
    facts: ImageFacts | None


class Store:
    """The state store of one state_dir. `writable=False` observes in memory only."""

    def __init__(self, state_dir: str, writable: bool = True) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self.writable = writable
        self._rows: dict[str, _Row] = {}
        self._released = False
        self._cycles = 0
        self._db: sqlite3.Connection | None = None
        if writable:
            self._open_writable(state_dir)
        elif os.path.exists(self.path):
            self._open_readonly()

    def _open_writable(self, state_dir: str) -> None:
        try:
            os.makedirs(state_dir, exist_ok=True)
            probe = os.path.join(state_dir, ".gcd-write-test")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as e:
            raise StateError(
                f"state_dir {state_dir} is not writable: {e.strerror}; "
                "give the gcd user write access or set state_dir in the configuration"
            ) from None
        try:
            self._db = self._connect(self.path)
            self._load()
        except sqlite3.DatabaseError as e:
            aside = f"{self.path}.unreadable-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
            log.warning(
                "state store %s is unreadable (%s); moved it to %s and starting a new one",
                self.path,
                e,
                aside,
            )
            if self._db is not None:
                self._db.close()
            os.replace(self.path, aside)
            self._rows, self._cycles = {}, 0
            self._db = self._connect(self.path)
            self._load()

    def _open_readonly(self) -> None:
        try:
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
                self._db = db
                self._load()
        except sqlite3.DatabaseError as e:
            log.warning(
                "state store %s is unreadable (%s); planning as on a new store", self.path, e
            )
            self._rows, self._cycles = {}, 0
        finally:
            self._db = None

    @contextmanager
    def lock(self, wait: float, stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the cycle lock of this state_dir: one removing cycle at a time per host,
        whether it is the daemon's or a `gcd run` from a shell. Waits up to `wait` seconds."""
        path = os.path.join(self.state_dir, LOCKNAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if stop():
                        raise Stopped("stopped while waiting for the state lock") from None
                    if time.monotonic() >= deadline:
                        raise LockBusy(
                            f"another gcd cycle holds {path} (waited {wait:g}s); "
                            "try again when it has finished"
                        ) from None
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        # The daemon opens the store on its main thread and uses it on the scheduler's single
        # worker; uses never overlap, so sqlite3's same-thread check is lifted.
        db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        return db

    def _load(self) -> None:
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE key = 'cycles'").fetchone()
        self._cycles = int(row[0]) if row else 0
        for r in self._db.execute(
            "SELECT id, first_seen, first_seen_dangling, dangling, last_used, fact_tags, layers,"
            " layer_sizes, last_tag_time FROM images"
        ):
            facts = None
            if r[5] is not None:
                facts = ImageFacts(
                    tuple(_split(r[5])),
                    # Most layers are shared bases: one string per layer, not one per image.
                    tuple(sys.intern(layer) for layer in _split(r[6])),
                    tuple(int(s) for s in _split(r[7])),
                    _time(r[8]),
                )
            self._rows[r[0]] = _Row(r[1], r[2], bool(r[3]), r[4], facts)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def new(self) -> bool:
        """True until a first cycle has been recorded."""
        return self._cycles == 0

    def facts(self) -> dict[str, ImageFacts]:
        self._reload()
        return {i: r.facts for i, r in self._rows.items() if r.facts is not None}

    def release(self) -> None:
        """Forget the rows until the next use: the daemon idles without a copy of the store
        (all of it is in the file; reading it back costs tens of milliseconds a cycle)."""
        if self._db is not None:
            self._rows = {}
            self._released = True

    def _reload(self) -> None:
        if self._released and self._db is not None:
            self._released = False
            self._load()

    def observe(
        self, snapshot: Snapshot, learned: dict[str, ImageFacts], now: datetime
    ) -> StateView:
        """Record what this snapshot shows (in one transaction) and return the view to plan with."""
        self._reload()
        new_store = self.new
        stamp = now.timestamp()
        used: dict[str, float] = {}
        for c in snapshot.containers:
            when = stamp if c.state in _RUNNING else c.created.timestamp()
            used[c.image_id] = max(when, used.get(c.image_id, when))
        changed: list[str] = []
        for image in snapshot.images:
            row = self._rows.get(image.id)
            dangling = snapshot.is_dangling(image.id)
            if row is None:
                seen = None if new_store else stamp
                row = _Row(seen, seen if dangling else None, dangling, None, None)
                self._rows[image.id] = row
                changed.append(image.id)
            elif dangling != row.dangling:
                row.dangling = dangling
                row.first_seen_dangling = stamp if dangling else None
                changed.append(image.id)
            if image.id in used and (row.last_used or 0) < used[image.id]:
                row.last_used = used[image.id]
                changed.append(image.id)
            if image.id in learned:
                row.facts = learned[image.id]
                changed.append(image.id)
        gone = [i for i in self._rows if i not in snapshot]
        for image_id in gone:
            del self._rows[image_id]
        self._cycles += 1
        if self._db is not None:
            self._write(sorted(set(changed)), gone)
        return StateView(
            new_store=new_store,
            first_seen=_times(self._rows, "first_seen"),
            first_seen_dangling=_times(self._rows, "first_seen_dangling"),
            last_used=_times(self._rows, "last_used"),
        )

    def _write(self, changed: list[str], gone: list[str]) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [self._values(i) for i in changed],
            )
            db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in gone])
            db.execute("INSERT OR REPLACE INTO meta VALUES ('cycles', ?)", (str(self._cycles),))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            db.execute("ROLLBACK")
            raise StateError(f"cannot write the state store {self.path}: {e}") from None

    def _values(self, image_id: str) -> tuple[object, ...]:
        r = self._rows[image_id]
        f = r.facts
        return (
            image_id,
            r.first_seen,
            r.first_seen_dangling,
            int(r.dangling),
            r.last_used,
            None if f is None else " ".join(f.tags),
            None if f is None else " ".join(f.layers),
            None if f is None else " ".join(str(s) for s in f.layer_sizes),
            None if f is None or f.last_tag_time is None else f.last_tag_time.timestamp(),
        )


def _split(text: str | None) -> Iterator[str]:
    return iter(text.split()) if text else iter(())


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _times(rows: dict[str, _Row], column: str) -> dict[str, datetime]:
    out = {}
    for image_id, row in rows.items():
        value = getattr(row, column)
        if value is not None:
            out[image_id] = datetime.fromtimestamp(value, UTC)
    return out
