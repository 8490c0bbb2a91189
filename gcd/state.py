"""gcd's own records in SQLite: first_seen, first_seen_dangling, last_used, inspect facts.

Docker records none of these. The store is a cache of observations: a missing or unreadable
file is recreated (with a warning), never a crash. One transaction per cycle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gcd.errors import LockBusy, StateError, Stopped
from gcd.model import ImageFacts, Regret, Report, Snapshot, StateView

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
    last_tag_time REAL,
    seal TEXT,
    created REAL
);
CREATE TABLE IF NOT EXISTS usage (image_id TEXT PRIMARY KEY, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS arrivals (
    image_id TEXT PRIMARY KEY,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS removed_tags (
    tag TEXT PRIMARY KEY,
    removed_at REAL NOT NULL,
    rule TEXT NOT NULL
);
"""
# The columns a row is written and sealed with, in this order.
_COLUMNS = (
    "id, first_seen, first_seen_dangling, dangling, last_used, fact_tags, layers, layer_sizes,"
    " last_tag_time, created"
)
_RUNNING = frozenset({"running", "restarting", "paused"})
# A recorded use a little ahead of this cycle's clock (the engine's clock, events in flight).
USE_SLACK = 300.0


@dataclass(slots=True)
class _Row:
    first_seen: float | None
    first_seen_dangling: float | None
    dangling: bool
    last_used: float | None
    facts: ImageFacts | None


class Store:
    """The state store of one state_dir. `writable=False` observes in memory only.

    A store that cannot be read, written or trusted never makes gcd forget silently: what it
    cannot vouch for counts as first seen now (so `safety.min_age` protects it again), the
    problem is kept in `problem` for the cycle to report (exit 1, a metric), and the next
    cycle tries again. Only a file SQLite says is not a database, or is corrupt, is moved
    aside, with an error in the log; the new store then starts as one that lost its memory,
    not as a new one.
    """

    def __init__(self, state_dir: str, writable: bool = True) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self.writable = writable
        self._rows: dict[str, _Row] = {}
        self._unsaved: set[str] = set()
        self._gone: set[str] = set()
        self._released = False
        self._observed_at = 0.0
        self._uses: dict[str, float] = {}
        self._stale_uses: list[str] = []
        # Image arrivals the event follower saw (tag, load, pull, import): (first, last).
        self._arrivals: dict[str, tuple[float, float]] = {}
        self._cycles = 0
        self._db: sqlite3.Connection | None = None
        self._key: bytes | None = None
        self._recorded = False  # the file holds a store's record of its cycles
        # Why this store cannot vouch for what it remembers; None when it can. Reported by
        # the next observe() as `cycle_problem`.
        self.problem: str | None = None
        self.cycle_problem: str | None = None
        if writable:
            self._open_writable()
        elif os.path.exists(self.path):
            self._open_readonly()

    # --- opening ---------------------------------------------------------------------------

    def _open_writable(self) -> None:
        existed = os.path.exists(self.path)
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            if not os.path.isdir(self.state_dir):  # a wrong path, not a passing fault
                raise StateError(
                    f"state_dir {self.state_dir} is not writable: {e.strerror}; "
                    "give the gcd user write access or set state_dir in the configuration"
                ) from None
        try:
            # Created by gcd alone (0600): SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            self._lost(
                f"cannot write the state store {self.path}: {e.strerror}; give the gcd user "
                "write access to state_dir or set state_dir in the configuration"
            )
            self._open_readonly()
            return
        try:
            self._db = self._connect(self.path)
            self._load()
        except (sqlite3.DatabaseError, OSError) as e:
            self._close_quietly()
            if isinstance(e, sqlite3.DatabaseError) and _unreadable(e):
                self._set_aside(e)
            else:
                why = e.strerror if isinstance(e, OSError) else e
                self._lost(f"cannot use the state store {self.path}: {why}")
                self._open_readonly()
            return
        if existed and not self._recorded:
            # A file that held a store but holds none now (emptied, truncated): memory lost.
            self._lost(f"the state store {self.path} was empty: its records are lost")
        if not self._recorded or self.problem:
            # From its first moment a store says so (cycles 0): an empty file is then a
            # lost one, never a new one.
            self._persist_cycles()

    def _open_readonly(self) -> None:
        """Read what the file holds without writing anything (not even its WAL index)."""
        if not os.path.exists(self.path):
            return
        self._rows, self._cycles = {}, 0
        try:
            for uri in (f"file:{self.path}?mode=ro", f"file:{self.path}?immutable=1"):
                try:
                    with closing(sqlite3.connect(uri, uri=True)) as db:
                        self._db = db
                        self._load(write=False)
                    break
                except sqlite3.OperationalError:
                    continue  # a read-only folder: the WAL index cannot be made; read as is
        except sqlite3.DatabaseError as e:
            self._lost(f"the state store {self.path} is unreadable ({e})")
            self._rows, self._cycles = {}, 0
        finally:
            self._db = None
        if not self._recorded and self.problem is None:
            self._lost(f"the state store {self.path} holds no records (emptied or truncated)")

    def _set_aside(self, error: sqlite3.DatabaseError) -> None:
        aside = f"{self.path}.unreadable-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm", ".key"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path + suffix, aside + suffix)
            self._db = self._connect(self.path)
            self._load()
        except (OSError, sqlite3.Error) as e:
            self._close_quietly()
            self._lost(
                f"the state store {self.path} is unreadable ({error}) and cannot be replaced: {e}"
            )
            return
        log.error(
            "state store %s is unreadable (%s): moved it to %s; the images present now count "
            "as first seen now",
            self.path,
            error,
            aside,
        )
        self._lost(f"the state store {self.path} was unreadable ({error}); moved to {aside}")
        self._persist_cycles()

    def _lost(self, problem: str) -> None:
        """Memory that cannot be vouched for: everything unknown counts as first seen now."""
        self.problem = problem
        self._cycles = max(self._cycles, 1)  # never planned as a new store again

    def _persist_cycles(self) -> None:
        if self._db is None:
            return
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('cycles', ?)", (str(self._cycles),)
            )
            self._recorded = True
        except sqlite3.Error as e:
            problem = f"cannot write the state store {self.path}: {e}"
            self.problem = f"{self.problem}; {problem}" if self.problem else problem

    def _close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    @contextmanager
    def lock(self, wait: float, stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the cycle lock of this state_dir: one removing cycle at a time per host,
        whether it is the daemon's or a `gcd run` from a shell. Waits up to `wait` seconds."""
        path = os.path.join(self.state_dir, LOCKNAME)
        try:
            # 0600: a descriptor another user could open would let that user hold the lock.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)  # made by an older gcd
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)  # a read-only state_dir: flock works on it
            except OSError as e:
                # No lock to share: the engine's own checks and gcd's re-reads still hold.
                log.warning("cannot take the cycle lock %s: %s", path, e.strerror)
                yield
                return
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

    def _load(self, write: bool = True) -> None:
        """Read the whole store. A row is used only if its seal holds and its values can be
        true (numbers, from 1970 to 2100, layer sizes that match). Anything else (another
        store's WAL applied to this file, an edit, a bad disk) is dropped: that image then
        counts as first seen now and is inspected again, and the cycle reports it."""
        assert self._db is not None
        db = self._db
        columns = {r[1] for r in db.execute("PRAGMA table_info(images)")}
        for column, kind in (("seal", "TEXT"), ("created", "REAL")):  # a store of gcd < 0.3
            if column not in columns and write:
                db.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")
                columns.add(column)
        self._key, legacy = self._read_key(write)
        rows: dict[str, _Row] = {}
        bad = 0
        row = db.execute("SELECT value FROM meta WHERE key = 'cycles'").fetchone()
        try:
            self._recorded = row is not None
            cycles = int(row[0]) if row else 0
        except (TypeError, ValueError):
            cycles, bad = 1, bad + 1
        wanted = _COLUMNS.replace(", created", ", created" if "created" in columns else ", NULL")
        seal = "seal" if "seal" in columns else "NULL"
        for r in db.execute(f"SELECT {wanted}, {seal} FROM images"):
            sealed = legacy or (self._key is not None and r[10] == _seal(self._key, r[:10]))
            parsed = _row(r) if sealed else None
            if parsed is None:
                bad += 1
            else:
                rows[r[0]] = parsed
        self._rows, self._cycles = rows, max(cycles, 0)
        self._uses = self._read_uses()
        self._arrivals = self._read_arrivals()
        if legacy:
            self._unsaved.update(rows)  # sealed at the next write
        if bad:
            self._lost(
                f"the state store {self.path} held {bad} record(s) that gcd did not write as "
                "they are; those images count as first seen now"
            )

    def _read_key(self, write: bool) -> tuple[bytes | None, bool]:
        """The key rows are sealed with, and whether the store predates seals (its rows are
        then taken as they are, once). A store opened for writing without a key gets one."""
        path = f"{self.path}.key"
        try:
            with open(path) as f:
                return bytes.fromhex(f.read().strip()), False
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            return None, False  # unreadable: no row can be vouched for
        legacy = not self._has_seals()
        if not write:
            return None, legacy
        key = os.urandom(16)
        fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        os.replace(f"{path}.tmp", path)
        return key, legacy

    def _has_seals(self) -> bool:
        assert self._db is not None
        try:
            return (
                self._db.execute("SELECT 1 FROM images WHERE seal IS NOT NULL LIMIT 1").fetchone()
                is not None
            )
        except sqlite3.OperationalError:
            return False  # no seal column: a store of gcd < 0.3

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
        if self._db is not None and not self._unsaved and not self._gone:
            self._rows = {}
            self._released = True

    def _reload(self) -> None:
        if self._released and self._db is not None:
            self._released = False
            self._load()

    def observe(
        self, snapshot: Snapshot, learned: dict[str, ImageFacts], now: datetime
    ) -> StateView:
        """Record what this snapshot shows (in one transaction) and return the view to plan
        with. `cycle_problem` says afterwards what this store could not vouch for or record
        in this cycle (None when all went well)."""
        if self.writable and self._db is None and self.problem is None:
            self._open_writable()  # a store that failed in an earlier cycle is tried again
        self._reload()
        new_store = self.new
        stamp = now.timestamp()
        self._observed_at = stamp
        used = self._usage(stamp)
        # Uses of images this snapshot does not hold (run and removed between two cycles),
        # recorded before it: dropped with this cycle's write.
        self._stale_uses = [i for i, t in used.items() if i not in snapshot and t < stamp]
        for c in snapshot.containers:
            when = stamp if c.state in _RUNNING else c.created.timestamp()
            used[c.image_id] = max(when, used.get(c.image_id, when))
        arrivals = self._recent_arrivals(stamp)
        self._stale_uses += [i for i in arrivals if i not in snapshot]
        changed: list[str] = []
        for image in snapshot.images:
            row = self._rows.get(image.id)
            dangling = snapshot.is_dangling(image.id)
            if row is None:
                seen = None if new_store else stamp
                if image.id in arrivals:  # the follower saw it come: that is when
                    seen = min(arrivals[image.id][0], stamp)
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
        self.cycle_problem, self.problem = self.problem, None
        if self.writable:
            self._unsaved.update(changed)
            self._gone.update(gone)
            self._unsaved -= self._gone
            if self._db is None:
                self.cycle_problem = (
                    self.cycle_problem or f"cannot write the state store {self.path}"
                )
            else:
                self._write()
        return StateView(
            new_store=new_store,
            first_seen=_times(self._rows, "first_seen", stamp),
            first_seen_dangling=_times(self._rows, "first_seen_dangling", stamp),
            last_used=_times(self._rows, "last_used", stamp),
            tagged={
                i: datetime.fromtimestamp(min(last, stamp), UTC)
                for i, (_, last) in arrivals.items()
                if i in snapshot
            },
        )

    def _usage(self, now: float) -> dict[str, float]:
        """Last uses the daemon's event follower recorded (UsageLog): containers created or
        started between two snapshots, `docker run --rm` ones included; read again now
        (the follower writes while the daemon idles), or as loaded by a read-only store. A
        time that cannot be true (before 1970, after now) is ignored."""
        uses = self._read_uses() if self._db is not None else self._uses
        return {i: t for i, t in uses.items() if 0 < t <= now + USE_SLACK}

    def _recent_arrivals(self, now: float) -> dict[str, tuple[float, float]]:
        """Image arrivals the daemon's event follower recorded (UsageLog.arrived), read
        again now; times that cannot be true are ignored."""
        arrivals = self._read_arrivals() if self._db is not None else self._arrivals
        return {i: a for i, a in arrivals.items() if 0 < a[0] <= a[1] <= now + USE_SLACK}

    def _read_arrivals(self) -> dict[str, tuple[float, float]]:
        rows = self._follower_rows("SELECT image_id, first_at, last_at FROM arrivals")
        return {
            str(i): (float(f), float(t))
            for i, f, t in rows
            if isinstance(f, float | int) and isinstance(t, float | int)
        }

    def _read_uses(self) -> dict[str, float]:
        rows = self._follower_rows("SELECT image_id, last_used FROM usage")
        return {str(i): float(t) for i, t in rows if isinstance(t, float | int)}

    def _follower_rows(self, query: str) -> list[tuple[object, ...]]:
        """Rows of a table the event follower writes; none from a store of an older gcd
        (opened read-only, it lacks the table)."""
        assert self._db is not None
        try:
            return list(self._db.execute(query).fetchall())
        except sqlite3.Error as e:
            log.debug("nothing recorded by the event follower in %s: %s", self.path, e)
            return []

    def regrets(self, snapshot: Snapshot, window: timedelta, now: datetime) -> tuple[Regret, ...]:
        """The tags gcd removed within `window` that this snapshot shows again; each is
        reported once. Records older than the window are dropped. A store that cannot be
        read or written for this only loses regrets (said in the log), never a removal's
        safety: nothing here decides what is kept."""
        if self._db is None or not self.writable:
            return ()
        stamp, oldest = now.timestamp(), (now - window).timestamp()
        present = {t for image in snapshot.images for t in image.tags}
        found: list[Regret] = []
        with self._regret_records("read") as db:
            rows = db.execute("SELECT tag, removed_at, rule FROM removed_tags").fetchall()
            for tag, removed_at, rule in rows:
                if not isinstance(removed_at, float | int) or not oldest <= removed_at <= stamp:
                    db.execute("DELETE FROM removed_tags WHERE tag = ?", (tag,))
                elif tag in present:
                    when = datetime.fromtimestamp(removed_at, UTC)
                    found.append(Regret(str(tag), str(rule), when, now))
                    db.execute("DELETE FROM removed_tags WHERE tag = ?", (tag,))
        return tuple(sorted(found))

    @contextmanager
    def _regret_records(self, verb: str) -> Iterator[sqlite3.Connection]:
        """One transaction on the removed tags. Failing, it only loses regrets (said)."""
        assert self._db is not None
        try:
            self._db.execute("BEGIN")
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            log.warning(
                "cannot %s the removed tags in %s (regrets go uncounted): %s", verb, self.path, e
            )

    def record_removed(self, report: Report, now: datetime) -> None:
        """Remember the tags of the images this cycle removed, for regrets."""
        if self._db is None or not self.writable:
            return
        removed = report.removed()
        rows = [
            (tag, now.timestamp(), dict(d.expired).get(tag, "unmatched"))
            for d in report.plan.decisions
            if d.image_id in removed
            for tag in d.tags
        ]
        if rows:
            with self._regret_records("record") as db:
                db.executemany("INSERT OR REPLACE INTO removed_tags VALUES (?, ?, ?)", rows)

    def _write(self) -> None:
        """Write what changed since the last write that succeeded, in one transaction. A
        failure (a full disk, no inodes, a read-only file) keeps it for the next cycle."""
        assert self._db is not None
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(
                f"INSERT OR REPLACE INTO images ({_COLUMNS}, seal)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [self._values(i) for i in sorted(self._unsaved) if i in self._rows],
            )
            db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in sorted(self._gone)])
            # A use recorded after this snapshot may be an image it does not show yet: kept.
            db.executemany(
                "DELETE FROM usage WHERE image_id = ? AND last_used < ?",
                [(i, self._observed_at) for i in sorted(self._gone | set(self._stale_uses))],
            )
            db.executemany(
                "DELETE FROM arrivals WHERE image_id = ? AND last_at < ?",
                [(i, self._observed_at) for i in sorted(self._gone | set(self._stale_uses))],
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('cycles', ?)", (str(self._cycles),))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            problem = f"cannot write the state store {self.path}: {e}"
            self.cycle_problem = (
                f"{self.cycle_problem}; {problem}" if self.cycle_problem else problem
            )
            return
        self._unsaved.clear()
        self._gone.clear()

    def _values(self, image_id: str) -> tuple[object, ...]:
        r = self._rows[image_id]
        f = r.facts
        values = (
            image_id,
            r.first_seen,
            r.first_seen_dangling,
            int(r.dangling),
            r.last_used,
            None if f is None else " ".join(f.tags),
            None if f is None else " ".join(f.layers),
            None if f is None else " ".join(str(s) for s in f.layer_sizes),
            None if f is None or f.last_tag_time is None else f.last_tag_time.timestamp(),
            None if f is None or f.created is None else f.created.timestamp(),
        )
        return (*values, None if self._key is None else _seal(self._key, values))


# Times a record may hold: from 1970 to 2100 (anything else was not written by gcd).
_LATEST = 4102444800.0


def _stamp(value: object) -> float | None:
    """A recorded time, or raise ValueError when it cannot be one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(value)
    if not (0 <= value <= _LATEST):  # NaN fails too
        raise ValueError(value)
    return float(value)


def _seal(key: bytes, values: tuple[object, ...]) -> str:
    """A keyed hash of a row's values as SQLite stores and returns them."""
    return hashlib.blake2b(repr(values).encode(), key=key, digest_size=16).hexdigest()


def _row(r: tuple[object, ...]) -> _Row | None:
    """One images row as recorded, or None when any value in it cannot be one gcd wrote."""
    try:
        if not isinstance(r[0], str) or not r[0]:
            return None
        facts = None
        if r[5] is not None:
            layers = tuple(sys.intern(layer) for layer in _split(_text(r[6])))
            sizes = tuple(int(s) for s in _split(_text(r[7])))
            if len(sizes) != len(layers) or any(s < 0 for s in sizes):
                return None
            last_tag, created = _stamp(r[8]), _stamp(r[9])
            facts = ImageFacts(
                tuple(_split(_text(r[5]))),
                # Most layers are shared bases: one string per layer, not one per image.
                layers,
                sizes,
                None if last_tag is None else datetime.fromtimestamp(last_tag, UTC),
                None if created is None else datetime.fromtimestamp(created, UTC),
            )
        return _Row(_stamp(r[1]), _stamp(r[2]), bool(r[3]), _stamp(r[4]), facts)
    except (TypeError, ValueError, OverflowError):
        return None


def _text(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(value)
    return value


def _unreadable(error: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is not a database, or a corrupt one: nothing in it can be used.
    Anything else (a full disk, a read-only file, a lock, an I/O error) is not the file's
    fault, and the file is left where it is."""
    name = getattr(error, "sqlite_errorname", "")
    return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or name.startswith("SQLITE_CORRUPT_")


def _split(text: str | None) -> Iterator[str]:
    return iter(text.split()) if text else iter(())


def _times(rows: dict[str, _Row], column: str, now: float) -> dict[str, datetime]:
    """One column as times; a time after now was not observed yet, so it counts as now."""
    out = {}
    for image_id, row in rows.items():
        value = getattr(row, column)
        if value is not None:
            out[image_id] = datetime.fromtimestamp(min(value, now), UTC)
    return out


class UsageLog:
    """The daemon's event follower's records, on a connection of its own: the last uses it
    sees (the cycle's Store merges them at its next snapshot), and the removed tags it sees
    come back (regrets, counted at once). A write that fails (a full disk) is said once and
    the use is lost: the next snapshot still sees containers that exist."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILENAME)
        self._db: sqlite3.Connection | None = None
        self._failing = False

    def record(self, image_id: str, when: float) -> None:
        """A container of this image was created or started at `when`."""
        self._write(
            "INSERT INTO usage VALUES (?, ?) ON CONFLICT(image_id) DO UPDATE"
            " SET last_used = max(last_used, excluded.last_used)",
            (image_id, when),
        )

    def _write(self, statement: str, values: tuple[object, ...]) -> None:
        try:
            if self._db is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._db = Store._connect(self.path)
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(statement, values)
        except (sqlite3.Error, OSError) as e:
            if not self._failing:
                log.warning(
                    "cannot record an event in %s (the next cycle sees it late): %s", self.path, e
                )
            self._failing = True
            self.close()
            return
        if self._failing:
            log.info("recording events in %s again", self.path)
        self._failing = False

    def arrived(self, image_id: str, when: float) -> None:
        """An image came onto the engine, or a tag onto it (tag, load, pull, import): its
        first arrival is when gcd first saw it, its last one its tag time (Podman records
        none)."""
        self._write(
            "INSERT INTO arrivals VALUES (?, ?, ?) ON CONFLICT(image_id) DO UPDATE"
            " SET first_at = min(first_at, excluded.first_at),"
            " last_at = max(last_at, excluded.last_at)",
            (image_id, when, when),
        )

    def came_back(self, tags: Iterable[str], window: timedelta, now: datetime) -> list[Regret]:
        """The tags among `tags` gcd removed within `window`: each a regret, counted here
        once (its record goes, so the next cycle does not count it again)."""
        found: list[Regret] = []
        try:
            if self._db is None:
                self._db = Store._connect(self.path)
            oldest = (now - window).timestamp()
            for tag in sorted(set(tags)):
                row = self._db.execute(
                    "SELECT removed_at, rule FROM removed_tags WHERE tag = ?", (tag,)
                ).fetchone()
                if row is None or not isinstance(row[0], float | int):
                    continue
                self._db.execute("DELETE FROM removed_tags WHERE tag = ?", (tag,))
                if oldest <= row[0] <= now.timestamp():
                    found.append(Regret(tag, str(row[1]), datetime.fromtimestamp(row[0], UTC), now))
        except (sqlite3.Error, OSError) as e:
            log.debug("cannot read the removed tags in %s: %s", self.path, e)
        return found

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
