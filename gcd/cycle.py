"""One cycle, shared by `gcd run`, `gcd plan` and the daemon: snapshot, plan, execute."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from gcd import buildcache, containers, disk, executor, logs, policy
from gcd.config import Config
from gcd.engine import DockerEngine, Engine
from gcd.errors import GcdError
from gcd.model import ContainerDecision, Plan, Report, Snapshot, StateView, Usage
from gcd.state import Store
from gcd.units import format_bytes

log = logging.getLogger(__name__)

# What a state store problem means for the cycle it happened in (after the problem itself).
STATE_PROBLEM_EFFECT = (
    "images it could not vouch for counted as first seen now (safety.min_age protected them)"
)
# How long a removing cycle waits for another one (daemon or shell) to finish.
LOCK_WAIT = 60.0
# A reload's comparison of the old and new plans only informs: it waits less.
COMPARE_LOCK_WAIT = 5.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def connect(config: Config) -> DockerEngine:
    return DockerEngine(
        config.engine_url(), config.engine.timeout.total_seconds(), config.engine_tls()
    )


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a plan is made. The planner makes a few
    objects per image and no reference cycles, yet each batch of them sets the collector off,
    and it walks every live object again: on a large store that is most of the planning
    time. Reference counting frees all of it just the same.

    On the way out, what the plan keeps goes straight to the oldest generation (freeze, then
    unfreeze: two list splices), as long-lived data should; left in the youngest, the first
    allocation after would walk all of it. A caller that turned the collector off keeps it
    off."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        gc.enable()


def plan(
    snapshot: Snapshot,
    config: Config,
    state: StateView,
    now: datetime,
    stopped: tuple[ContainerDecision, ...] = (),
    evict: dict[str, str] | None = None,
) -> Plan:
    """policy.plan, with the collector paused."""
    with collector_paused():
        return policy.plan(snapshot, config, state, now, stopped, evict)


def prepare(
    config: Config,
    engine: Engine,
    store: Store,
    now: datetime,
    stop: Callable[[], bool] = lambda: False,
) -> Plan:
    """Snapshot the engine, record what it shows, and plan. Removes nothing."""
    snapshot, learned = engine.snapshot(store.facts(), stop)
    state = store.observe(snapshot, learned, now)
    wanted = containers.candidates(snapshot, config.containers, now)
    stopped = containers.plan(snapshot, config.containers, engine.stopped(wanted), now)
    entries = engine.build_cache() if config.build_cache.enabled else None
    cache = buildcache.plan(entries, config.build_cache, now)
    first = plan(snapshot, config, state, now, stopped)
    usage = watched(config, engine)
    if usage is None:
        return dataclasses.replace(first, build_cache=cache)
    engine_bytes = sum(snapshot.freed_bytes({i.id for i in snapshot.images}).values())
    if cache is not None:
        engine_bytes += cache.bytes
    pressure = disk.pressure(usage, config.disk, engine_bytes)
    result = dataclasses.replace(first, build_cache=cache, disk=usage, pressure=pressure)
    if pressure is None:
        return result
    # What the rules remove anyway, then the build cache, then (evict: lru) kept images.
    still = pressure.needed - first.reclaimable_bytes
    if still > 0:
        if entries is None:
            entries = engine.build_cache()
        cache, freed = buildcache.under_pressure(entries, config.build_cache, now, still)
        still -= freed
        result = dataclasses.replace(result, build_cache=cache)
    if config.disk.evict == "lru" and still > 0:
        keep_one = config.safety.keep_one_per_repository
        evict = policy.evictions(first, state, pressure, still, now, keep_one)
        if evict:
            again = plan(snapshot, config, state, now, stopped, evict)
            result = dataclasses.replace(again, build_cache=cache, disk=usage, pressure=pressure)
    return result


def watched(config: Config, engine: Engine) -> Usage | None:
    """The watched filesystem now (`disk.path`), or None where it cannot be measured (said
    once): an engine on another host with `disk.path: auto`, or a path this user cannot
    read (a docker-group user and the 0710 /var/lib/docker). Disk pressure is then not
    watched; retention goes on."""
    path = config.disk.path
    if path == "auto":
        root = engine.data_root() if config.engine_url().startswith("unix://") else None
        if root is None or not os.path.exists(root):
            logs.once(
                log,
                logging.WARNING,
                f"disk pressure is not watched: the engine's data root ({root or 'unknown'}) "
                "is not on this host; set disk.path",
            )
            return None
        path = root
    try:
        return disk.measure(path)
    except GcdError as e:
        logs.once(
            log,
            logging.WARNING,
            f"disk pressure is not watched: {e}; set disk.path to a path gcd can read",
        )
        return None


def _accounted(engine: Engine) -> int | None:
    """The engine's count of its image store's bytes; None if it keeps none or cannot say
    now (a figure for the report, never a reason to fail the cycle)."""
    try:
        return engine.accounted()
    except GcdError as e:
        log.debug("the engine's byte count is not known: %s", e)
        return None


def _meanwhile(read: Callable[[], int | None]) -> Callable[[], int | None]:
    """`read` begun now on a thread of its own, and a call that waits for its answer.

    The engine's byte count before a cycle's removals is read as its snapshot is taken,
    not after: on the containerd store it takes a second for a few hundred images, and
    the snapshot longer. A daemon thread: a cycle stopped before it asks never waits for
    it (nor does the process, at exit)."""
    answer: list[int | None] = []
    thread = threading.Thread(
        target=lambda: answer.append(read()), name="gcd-accounted", daemon=True
    )
    thread.start()

    def result() -> int | None:
        thread.join()
        return answer[0] if answer else None

    return result


def run(
    config: Config,
    engine: Engine,
    store: Store,
    now: datetime,
    stop: Callable[[], bool] = lambda: False,
    lock_wait: float = LOCK_WAIT,
) -> Report:
    """A whole cycle under the state lock: prepare, then carry the plan out."""
    with store.lock(lock_wait, stop):
        # Asked on this thread first (API version and store), so that a broken engine fails
        # the cycle here, as the snapshot would, and the count's thread never asks first.
        engine.data_root()
        accounted_before = _meanwhile(lambda: _accounted(engine))
        plan = prepare(config, engine, store, now, stop)
        regrets = store.regrets(plan.snapshot, config.regret_window, now)
        before = accounted_before() if plan.removals() else None
        report = executor.execute(plan, engine, now, stop)
        if before is not None:
            report = dataclasses.replace(
                report, accounted_before=before, accounted_after=_accounted(engine)
            )
        if plan.disk is not None:
            with contextlib.suppress(GcdError):  # gone since: no measured bytes, said so
                report = dataclasses.replace(report, disk_after=disk.measure(plan.disk.path))
            if report.short_of_low():
                log.warning(
                    "%s: %s still to free after all gcd may remove (the rest is protected, "
                    "kept by a guard, or not gcd's: other files on %s)",
                    plan.pressure.reason if plan.pressure else "disk pressure",
                    format_bytes(report.short_of_low()),
                    plan.disk.path,
                )
        if config.regret_window:
            store.record_removed(report, now)
    logs.regrets(log, regrets)
    return dataclasses.replace(report, state_problem=store.cycle_problem, regrets=regrets)


def observe(
    engine: Engine, store: Store, now: datetime, lock_wait: float = COMPARE_LOCK_WAIT
) -> Snapshot:
    """Snapshot the engine and record what it shows (first seen, containers in use),
    removing nothing: after a gap in the engine's events, what they would have told. Under
    the cycle lock, as a cycle's snapshot is (LockBusy if a run holds it long)."""
    with store.lock(lock_wait):
        snapshot, learned = engine.snapshot(store.facts())
        store.observe(snapshot, learned, now)
    return snapshot


@dataclass(frozen=True, slots=True)
class PlanChange:
    """How a new configuration's plan differs from the old one's, on the same snapshot."""

    newly_removed: int
    newly_kept: int
    removals: int


def compare(
    old: Config,
    new: Config,
    engine: Engine,
    store: Store,
    now: datetime,
    lock_wait: float = COMPARE_LOCK_WAIT,
) -> PlanChange:
    """Plan the same snapshot under both configurations (a reload says what changes). It
    records what it sees, as a cycle does, so it takes the cycle lock: a `gcd run` from a
    shell may hold it for long, and then the comparison is skipped (LockBusy)."""
    with store.lock(lock_wait):
        snapshot, learned = engine.snapshot(store.facts())
        state = store.observe(snapshot, learned, now)
    before = {d.image_id for d in plan(snapshot, old, state, now).removals()}
    after = {d.image_id for d in plan(snapshot, new, state, now).removals()}
    return PlanChange(len(after - before), len(before - after), len(after))
