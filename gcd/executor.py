"""execute(plan, engine) -> Report: the only place that removes anything.

Never forces. The Engine API has no compare-and-swap for tags, so the order of requests is
the safety (docs/architecture.md, Removing safely):

- an image's last (or only) reference goes with `DELETE /images/<image ID>`: the engine then
  deletes exactly that image, or refuses (409); a tag that moved to another image meanwhile
  is never touched;
- the other tags of a multi-tag image go by name, each right after a re-read of what it
  names; then the engine's own event log says which image really lost it. A tag taken from
  an image gcd did not plan (it moved there in between) is put back on that image; an image
  the engine deleted that the plan did not remove is reported as an error.

Right before each image it re-reads it: a tag that moved away is left alone, an image that
gained a tag or that a container now uses is skipped. 409 is a skip, 404 means already
gone, anything else fails that image only and the cycle goes on. A stop request (SIGTERM)
is honoured between any two requests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from gcd.engine import Engine
from gcd.errors import ConflictError, EngineError, EngineUnavailable, NotFoundError
from gcd.model import (
    REMOVABLE_STATES,
    BuildCacheOutcome,
    BuildCachePlan,
    ContainerDecision,
    ContainerOutcome,
    Decision,
    Deletion,
    ImageEvent,
    Outcome,
    OutcomeKind,
    Plan,
    Report,
    short_id,
    split_ref,
)
from gcd.units import format_bytes

log = logging.getLogger(__name__)

# Untags of one image's tags in flight at once (an image can carry thousands of tags).
TAG_WORKERS = 4
# Tags untagged between two reads of the event log: the engine replays only its last 256
# events, and every tag of a chunk must still be among them when gcd checks who lost it.
TAG_CHUNK = 64
# Slack around a request's send and answer times when matching the engine's events to it.
EVENT_SLACK_NS = 2_000_000
# Waits before reading the engine's events again when they do not show an untag gcd made
# (the log lags the answer, as Podman's does): 1.5 s in all, then gcd says it cannot tell.
EVENT_LAG_WAITS = (0.1, 0.2, 0.4, 0.8)
# The engine's events after DELETEs by ID (_AmidChecks) are read at most this often, one
# read for every removal answered meanwhile: about 50 ms of a busy engine's events, far
# fewer than the 256 it replays.
AMID_BATCH_WAIT = 0.05
# The first wait for an image whose DELETE the engine got but did not answer within
# engine.timeout while it still answers a ping (busy, not lost); each next one is twice as
# long, until one more engine.timeout has passed in all (_settle_waits).
SETTLE_FIRST_WAIT = 0.5
# DELETEs in flight at once for the rest of a run once one went unanswered that way.
SLOW_DELETES = 8


def _settle_waits(timeout: float) -> Iterator[float]:
    """0.5 s, 1 s, 2 s, ... summing to `timeout` (the last one cut short)."""
    left, wait = timeout, SETTLE_FIRST_WAIT
    while left > 0:
        yield min(wait, left)
        left -= wait
        wait *= 2


def _never() -> bool:
    return False


class _Halt(Exception):
    """Raised between two requests when the cycle must not send another one."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _Refused(Exception):
    """The engine refused a step (409); the image is skipped as it stands."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unanswered(Exception):
    """A DELETE the engine got and did not answer in time, though it answers a ping: it is
    busy, not lost, and may carry the DELETE out all the same. That action fails (exit 1);
    the others go on."""

    def __init__(self, message: str, sent_ns: int) -> None:
        super().__init__(message)
        self.message = message
        self.sent_ns = sent_ns


class _Run:
    """What the actions of one execute() call share."""

    def __init__(self, plan: Plan, engine: Engine, stop: Callable[[], bool]) -> None:
        self.plan = plan
        self.engine = engine
        self._stop = stop
        self.lock = threading.Lock()
        # Every ID the engine said it deleted -> the image whose removal deleted it.
        self.deleted: dict[str, str] = {}
        self.halted: str | None = None  # "stopped" or "engine_down"
        # Set once the engine let a DELETE go unanswered while it answers pings: from then
        # on at most SLOW_DELETES are in flight at once (it answers them together).
        self.slow = threading.Event()
        self.slow_gate = threading.Semaphore(SLOW_DELETES)
        removing = {d.image_id for d in plan.decisions if d.action == "remove"}
        # Images gcd itself changes in this run: their untag events are gcd's own.
        self.acting = frozenset(removing | {d.image_id for d in plan.decisions if d.untag})
        self.amid = _AmidChecks(self)

    def check(self) -> None:
        """Before every request: raise _Halt when the cycle must stop sending requests."""
        with self.lock:
            if self.halted is None and self._stop():
                self.halted = "stopped"
            if self.halted is not None:
                raise _Halt(self.halted)

    def engine_lost(self) -> None:
        with self.lock:
            self.halted = "engine_down"


def execute(
    plan: Plan,
    engine: Engine,
    started_at: datetime,
    stop: Callable[[], bool] = _never,
    workers: int | None = None,
) -> Report:
    """Carry out a plan; `stop` is polled before every request (SIGTERM).

    Removals run on `workers` threads (by default as many as suit the engine: it deletes
    concurrently and is the limit), children first: a planned parent waits until the
    removals of all its planned children have ended, then goes on the thread that ended
    the last of them. Siblings go at once: the legacy builder's intermediates of many
    builds are one tree under their base image, and one thread for the whole tree took
    minutes a cycle on the containerd store, where every removal re-reads the image list.
    """
    run = _Run(plan, engine, stop)
    # Stopped containers first: the images they pinned are planned to go after them.
    container_outcomes = {
        c.container_id: _remove_container(run, c) for c in plan.container_removals()
    }
    outcomes: dict[str, Outcome] = {}

    order = _Order(plan)
    # The first actions follow no request of their own: their re-checks may share a list
    # begun from now on. A parent's follows its children's removals, so it reads anew.
    begun = time.monotonic_ns()

    def run_from(d: Decision | None) -> None:
        since: int | None = begun
        while d is not None:
            outcome = _Action(run, d, since).carry_out()
            _log(d, outcome)
            with run.lock:
                outcomes[d.image_id] = outcome
                d = order.ended(d.image_id)
            since = None

    if workers is None:
        workers = engine.removal_workers()
    try:
        if len(order.first) <= 1 or workers <= 1:
            for d in order.first:
                run_from(d)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(order.first))) as pool:
                for future in [pool.submit(run_from, d) for d in order.first]:
                    future.result()
    finally:
        gained = run.amid.finish()
    for image_id, tags in gained.items():
        outcomes[image_id] = _deleted_with(plan.decision(image_id), outcomes[image_id], tags)
    for d in plan.decisions:
        if d.image_id in outcomes:
            continue
        cause = next((i for i, o in outcomes.items() if d.image_id in o.unplanned), None)
        if cause is None:
            outcomes[d.image_id] = Outcome(d.image_id, "done")  # kept, nothing to do
            continue
        outcomes[d.image_id] = Outcome(
            d.image_id,
            "failed",
            error=f"deleted by the engine while gcd removed {short_id(cause)}, although the "
            "plan kept it",
            code="unplanned",
        )
        _log(d, outcomes[d.image_id])
    report = Report(
        plan,
        False,
        started_at,
        outcomes,
        container_outcomes=container_outcomes,
        build_cache=_prune_build_cache(run, plan.build_cache),
    )
    reclaimed = sum(plan.snapshot.freed_bytes(report.removed()).values())
    return dataclasses.replace(report, reclaimed_bytes=reclaimed)


def _prune_build_cache(run: _Run, cache: BuildCachePlan | None) -> BuildCacheOutcome | None:
    """Last, BuildKit's cache (`build_cache`): the engine removes only unused entries."""
    if cache is None or not cache.available:
        return None
    try:
        run.check()
        pruned = run.engine.prune_build_cache(cache.keep_storage, cache.unused_for, cache.until)
    except _Halt:
        return BuildCacheOutcome("skipped")
    except EngineUnavailable as e:
        run.engine_lost()
        return BuildCacheOutcome("failed", error=str(e))
    except EngineError as e:
        log.error("failed to prune the build cache: %s", e)
        return BuildCacheOutcome("failed", error=str(e))
    log.info(
        "pruned the build cache: %d entries, %s",
        len(pruned.deleted),
        format_bytes(pruned.reclaimed),
    )
    return BuildCacheOutcome("done", len(pruned.deleted), pruned.reclaimed)


def _remove_container(run: _Run, c: ContainerDecision) -> ContainerOutcome:
    """Remove one stopped container the plan names, unless an inspect right before shows it
    ran again (another finish time) or runs now; the engine refuses a running one itself."""
    try:
        run.check()
        now = run.engine.stopped([c.container_id]).get(c.container_id)
        if now is None:
            outcome = ContainerOutcome("skipped", "already gone", code="gone")
        elif now.state not in REMOVABLE_STATES:
            outcome = ContainerOutcome("skipped", f"{now.state} now", code="changed")
        elif now.finished is not None and now.finished != c.since:
            outcome = ContainerOutcome("skipped", "it ran again since the plan", code="changed")
        else:
            run.check()
            run.engine.remove_container(c.container_id)
            outcome = ContainerOutcome("done")
    except _Halt as e:
        if e.code == "engine_down":
            outcome = ContainerOutcome("skipped", "engine unreachable", code="engine_down")
        else:
            outcome = ContainerOutcome(
                "skipped", "cycle stopped before this action", code="stopped"
            )
    except ConflictError as e:
        outcome = ContainerOutcome("skipped", f"the engine refused: {e}", code="conflict")
    except NotFoundError:
        outcome = ContainerOutcome("skipped", "already gone", code="gone")
    except EngineUnavailable as e:
        run.engine_lost()
        outcome = ContainerOutcome("failed", error=str(e), code="engine_down")
    except EngineError as e:
        outcome = ContainerOutcome("failed", error=str(e))
    what = f"container {c.name} ({short_id(c.container_id)})"
    if outcome.status == "done":
        log.info("removed %s: %s", what, c.reason)
    elif outcome.status == "skipped":
        log.warning("skipped %s: %s", what, outcome.reason)
    else:
        log.error("failed %s: %s", what, outcome.error)
    return outcome


class _Order:
    """Children first: the actions that may start at once (`first`: deepest images first,
    so the longest chains start early), and for each planned removal the planned parent that
    waits for it. Not thread-safe: `ended` is called under the run's lock."""

    def __init__(self, plan: Plan) -> None:
        snapshot = plan.snapshot
        removing = {d.image_id for d in plan.removals()}
        actions = {d.image_id: d for d in plan.decisions if d.action == "remove" or d.untag}
        self._actions = actions
        self._parent: dict[str, str] = {}
        self._waiting: Counter[str] = Counter()  # a parent's planned children not yet ended
        for image_id, d in actions.items():
            # A kept parent stays (nothing waits for it); a removed one waits for its child.
            parent = next(snapshot.ancestors(image_id), None)
            if d.action == "remove" and parent in removing:
                self._parent[image_id] = parent
                self._waiting[parent] += 1
        self.first = sorted(
            (d for i, d in actions.items() if not self._waiting[i]),
            key=lambda d: (-snapshot.depth(d.image_id), d.image_id),
        )

    def ended(self, image_id: str) -> Decision | None:
        """The action that may start now that this one ended: its parent, after the last
        of its planned children."""
        parent = self._parent.get(image_id)
        if parent is None:
            return None
        self._waiting[parent] -= 1
        return None if self._waiting[parent] else self._actions[parent]


@dataclass(frozen=True, eq=False)  # told apart by identity: cheap to drop once settled
class _Amid:
    """One DELETE by ID to match to the engine's events: its image, and its window (from
    the re-read before it to its answer, with slack) on the engine's clock."""

    d: Decision
    since_ns: int
    until_ns: int


class _AmidChecks:
    """Whether a tag came to an image while the engine deleted it by ID, unsaid in the
    answer (Engine.loses_tags_amid_delete): the engine's events tell. They are read on a
    thread of their own, one read for every DELETE answered before it began, from the
    earliest of their windows, so the removals go on meanwhile (one read per removal was
    a third of the requests of a run on dockerd's classic store). Where the log lags the
    answer (Podman), an image whose `delete` the events do not show yet is read again,
    for up to EVENT_LAG_WAITS in all. No stop is honoured: the images are gone, and the
    report must say so. `finish` waits for every check and gives the tags found."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._late_ns = int(sum(EVENT_LAG_WAITS) * 1e9) if run.engine.logs_late() else 0
        self._changed = threading.Condition()
        self._pending: list[_Amid] = []
        self._finishing = False
        self._finished = threading.Event()  # cuts the wait for more removals short
        self._lost: EngineUnavailable | None = None
        self._thread: threading.Thread | None = None
        self._gained: dict[str, list[str]] = {}

    def add(self, d: Decision, checked_ns: int, answered_ns: int) -> None:
        check = _Amid(d, checked_ns - EVENT_SLACK_NS, answered_ns + EVENT_SLACK_NS)
        with self._changed:
            self._pending.append(check)
            if self._thread is None:
                self._thread = threading.Thread(target=self._reads, name="gcd-amid", daemon=True)
                self._thread.start()
            self._changed.notify()

    def finish(self) -> dict[str, list[str]]:
        """Once every removal has ended: the tags each deleted image was found to gain."""
        with self._changed:
            self._finishing = True
            self._changed.notify()
            thread = self._thread
        self._finished.set()
        if thread is not None:
            thread.join()
        return self._gained

    def _reads(self) -> None:
        waiting = False  # the last read left checks whose `delete` the log lacked
        while True:
            with self._changed:
                while not self._pending and not self._finishing:
                    self._changed.wait()
                if not self._pending:
                    return
                finishing = self._finishing
            if waiting:
                time.sleep(AMID_BATCH_WAIT)  # for the log to catch up
            elif not finishing:
                self._finished.wait(AMID_BATCH_WAIT)  # more removals end meanwhile
            with self._changed:
                batch = list(self._pending)
            try:
                done = self._read(batch)
            except Exception:  # a bug: said, and the removals' report still comes
                log.exception(
                    "cannot check that no tag came during the removal of %s",
                    _names([short_id(c.d.image_id) for c in batch]),
                )
                done = list(batch)
            waiting = len(done) < len(batch)
            with self._changed:
                self._pending = [c for c in self._pending if c not in done]

    def _read(self, batch: Sequence[_Amid]) -> list[_Amid]:
        """One read of the events for `batch`; the checks it settled."""
        began = time.time_ns()
        error: EngineError | None = self._lost
        if error is None:
            try:
                events = self._run.engine.events(
                    min(c.since_ns for c in batch), began + EVENT_SLACK_NS
                )
            except EngineUnavailable as e:
                self._lost = error = e  # every further read would wait as long
                self._run.engine_lost()
            except EngineError as e:
                error = e
        if error is not None:
            log.warning(
                "cannot read the engine's events to check that no tag came during the "
                "removal of %s: %s",
                _names([short_id(c.d.image_id) for c in batch]),
                error,
            )
            return list(batch)
        done = []
        for c in batch:
            image_id = c.d.image_id
            mine = [e for e in events if c.since_ns <= e.time_ns <= c.until_ns]
            logged = any(e.action == "delete" and e.image_id == image_id for e in mine)
            if self._late_ns and not logged and began < c.until_ns + self._late_ns:
                continue  # the log lags the answer: read again
            gained = _tagged(mine, image_id, c.d.tags)
            if gained:
                self._gained[image_id] = sorted(gained)
            done.append(c)
        return done


def _tagged_during(gained: Sequence[str]) -> str:
    return (
        f"it was tagged {', '.join(gained)} during its removal, and the engine deleted it "
        "with that tag"
    )


def _deleted_with(d: Decision, outcome: Outcome, gained: Sequence[str]) -> Outcome:
    """A removal found afterwards (_AmidChecks) to have taken a tag made during it."""
    problem = _tagged_during(gained)
    log.error("%s: %s", _what(d), problem)
    return dataclasses.replace(
        outcome,
        error="; ".join(p for p in (outcome.error, problem) if p),
        unplanned=tuple(sorted({*outcome.unplanned, d.image_id})),
    )


def _names(tags: Sequence[str], shown: int = 3) -> str:
    """`a:1, a:2, a:3 and 997 more`: a reason stays one short line however many tags."""
    ordered = sorted(tags)
    text = ", ".join(ordered[:shown])
    return f"{text} and {len(ordered) - shown} more" if len(ordered) > shown else text


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_name(tags: Sequence[str], digests: Sequence[str]) -> tuple[list[str], list[str]]:
    """The references to delete by name before the image goes by ID: (tags, digests).

    The engine deletes an image by ID only while it has at most one tag and every digest
    reference is of that tag's repository; the tag kept for the ID is the greatest."""
    if tags:
        keep = max(tags)
        repository = split_ref(keep)[0]
        others = [t for t in tags if t != keep]
    else:
        others = []
        repository = min(digests).partition("@")[0] if digests else ""
    return others, [r for r in digests if r.partition("@")[0] != repository]


class _Action:
    """One planned action on one image: its requests, and what they did."""

    def __init__(self, run: _Run, d: Decision, since: int | None = None) -> None:
        self.run = run
        self.d = d
        self.since = since  # for the first re-check (Engine.recheck)
        self.engine = run.engine
        self.untagged: list[str] = []
        self.restored: list[str] = []
        self.unplanned: dict[str, str] = {}  # image ID -> how it came to be deleted
        self.problems: list[str] = []
        # The engine's events read while this image's tags went by name, and from when.
        self.seen: list[ImageEvent] = []
        self.untags_from_ns: int | None = None

    def carry_out(self) -> Outcome:
        try:
            if self.d.action == "remove":
                return self._remove()
            return self._untag()
        except _Halt as e:
            if e.code == "engine_down":
                return self._outcome("skipped", "engine unreachable", "engine_down")
            if self.untagged:
                reason = f"cycle stopped after untagging {_names(self.untagged)}"
            else:
                reason = "cycle stopped before this action"
            return self._outcome("skipped", reason, "stopped")
        except _Refused as e:
            return self._outcome("skipped", e.reason, "conflict")
        except _Unanswered as e:
            return self._outcome("failed", code="unanswered", error=e.message)
        except EngineUnavailable as e:
            # Every further call would wait for the same timeout: stop the cycle.
            self.run.engine_lost()
            return self._outcome("failed", code="engine_down", error=str(e))
        except EngineError as e:
            return self._outcome("failed", error=str(e))

    def _outcome(
        self,
        status: OutcomeKind,
        reason: str | None = None,
        code: str | None = None,
        error: str | None = None,
    ) -> Outcome:
        problems = list(self.problems)
        for image_id, cause in sorted(self.unplanned.items()):
            if image_id != self.d.image_id:
                problems.append(
                    f"the engine also deleted {short_id(image_id)}, which the plan did not "
                    f"remove{cause}"
                )
        if error:
            problems.insert(0, error)
        return Outcome(
            self.d.image_id,
            status,
            reason=reason,
            error="; ".join(problems) or None,
            untagged=tuple(self.untagged),
            code=code,
            unplanned=tuple(sorted(self.unplanned)),
            restored=tuple(self.restored),
        )

    # --- the two actions ----------------------------------------------------------------

    def _remove(self) -> Outcome:
        d, engine = self.d, self.engine
        if d.implied:
            # A parent goes after its children (they come first in its group); one that
            # stayed keeps it, and the engine would refuse anyway.
            snapshot = self.run.plan.snapshot
            with self.run.lock:
                staying = sorted(
                    c for c in snapshot.children(d.image_id) if c not in self.run.deleted
                )
            if staying:
                return self._outcome(
                    "skipped",
                    f"its child image {short_id(staying[0])} was not removed, so it stays",
                    "child_kept",
                )
        self.run.check()
        checked = time.time_ns()
        now = engine.recheck(d.image_id, self.since)
        if now is None:
            return self._gone()
        checked = min(checked, now.read_ns or checked)
        changed = self._tag_changed(now.tags)
        if changed is not None:
            return changed
        # Tags that moved away since the plan are not in `now` any more: they are left alone.
        by_name_tags, by_name_digests = _by_name(now.tags, now.digests)
        if by_name_tags or by_name_digests:
            # Deleting references one by one is not refused for an image a container uses
            # (only its last reference is): check the containers first.
            in_use = self._users()
            if in_use is not None:
                return self._outcome("skipped", in_use, "in_use")
            for ref in by_name_digests:  # content addressed: a digest never moves
                self.run.check()
                self._note(self._delete(ref))
            self._untag_verified(by_name_tags)
            self.run.check()
            checked = time.time_ns()
            now = engine.recheck(d.image_id)
            if now is None:
                return self._outcome("skipped", "already gone", "gone")
            checked = min(checked, now.read_ns or checked)
            still = set(self.untagged) & set(now.tags)
            if still:
                # Answered `Untagged`, yet on the image (made again meanwhile, or an untag
                # the engine lost): the report names only the tags that went.
                log.warning(
                    "%s: the engine answered that it untagged %s, which the image still has",
                    short_id(d.image_id),
                    _names(sorted(still)),
                )
                self.untagged = [t for t in self.untagged if t not in still]
            changed = self._tag_changed(now.tags) or self._tag_lost(now.tags)
            if changed is not None:
                return changed
        if now.children:
            # The containerd store and Podman delete a parent under its children.
            return self._outcome(
                "skipped",
                f"it has a child image {short_id(now.children[0])} now",
                "child_kept",
            )
        plan = self.run.plan
        kept = [
            p for p in now.pruned if p not in plan.snapshot or plan.decision(p).action != "remove"
        ]
        if kept:
            # Podman before 5 deletes a parent left dangling with its child, noprune or not.
            return self._outcome(
                "skipped",
                f"the engine would delete its untagged parent {short_id(kept[0])} with it, "
                "which the plan keeps",
                "parent_kept",
            )
        self.run.check()
        try:
            deletion = self._delete(d.image_id)
        except _Refused as e:
            in_use = self._users()
            return self._outcome("skipped", in_use or e.reason, "in_use" if in_use else "conflict")
        except _Unanswered as e:
            return self._settle(checked, e)
        if deletion is None:
            return self._gone()
        self._note(deletion)
        if deletion.survived is not None:
            return self._survived(deletion.survived)
        # The one window of a removal by ID: after the re-read, the image's own tags moved
        # away and it was given a new one (the engine refuses two). Said, never silent.
        gained = sorted(t for t in deletion.untagged if "@" not in t and t not in d.tags)
        if d.image_id in deletion.deleted:
            if gained:
                self.unplanned[d.image_id] = ""
                self.problems.append(_tagged_during(gained))
            elif engine.loses_tags_amid_delete():
                # The answer may not name a tag made meanwhile: the events tell, read for
                # many removals at once while the next ones go on; the report says it.
                self.run.amid.add(d, checked, deletion.answered_ns)
        return self._outcome("done")

    def _settle(self, checked_ns: int, unanswered: _Unanswered) -> Outcome:
        """The engine got this image's DELETE by ID and did not answer in time, but answers
        a ping: wait up to one more engine.timeout for the image to go. Gone: removed, and
        the engine's events say whether a tag came during the removal (no answer lists what
        went). Still there (or a stop): failed, the engine may yet carry it out; the next
        cycle sees."""
        image_id = self.d.image_id
        for wait in _settle_waits(self.engine.timeout):
            try:
                self.run.check()
            except _Halt:
                break
            time.sleep(wait)
            try:
                if self.engine.current(image_id) is not None:
                    continue
            except EngineUnavailable:
                break
            except EngineError:
                continue  # Podman answers 500 to an inspect of an image it is removing
            with self.run.lock:
                self.run.deleted.setdefault(image_id, image_id)
            self.run.amid.add(self.d, checked_ns, time.time_ns())
            log.warning(
                "%s: the engine deleted it after gcd stopped waiting for its answer "
                "(engine.timeout)",
                short_id(image_id),
            )
            return self._outcome("done", "the engine answered late: gone after engine.timeout")
        return self._outcome("failed", code="unanswered", error=unanswered.message)

    def _tag_lost(self, tags: Sequence[str]) -> Outcome | None:
        """A tag the events show put on this image while gcd untagged it by name, which the
        image lacks now although no event shows it leaving: Podman 4 rewrites an image's
        names whole, so an untag loses a tag made at the same moment. It is put back (when
        no image has it now) and the image stays; else None."""
        if self.untags_from_ns is None or self.engine.concurrent_untags():
            return None
        made = _tagged(self.seen, self.d.image_id, (*tags, *self.d.tags))
        if not made:
            return None
        # No stop is honoured until the tag is back: the engine lost it in gcd's untags.
        # Read again up to now: an untag or a move of that tag since is someone's own doing.
        later = self.engine.events(self.untags_from_ns, time.time_ns() + EVENT_SLACK_NS)
        for e in later:
            if e.action in ("untag", "delete") and e.name in made:
                made.discard(e.name)
        lost = sorted(t for t in made if self.engine.target(t) is None)
        if not lost:
            return None
        for tag in lost:
            self.engine.tag(self.d.image_id, tag)
            log.warning(
                "%s: the engine lost %s as gcd untagged another name: put it back",
                short_id(self.d.image_id),
                tag,
            )
            self.restored.append(f"{tag} on {short_id(self.d.image_id)}")
        return self._outcome(
            "skipped",
            f"gained tag {', '.join(lost)} during its removal, which the engine lost as gcd "
            "untagged another name; put back",
            "tag_changed",
        )

    def _tag_changed(self, tags: Sequence[str]) -> Outcome | None:
        """Skipped if the image carries a tag the plan did not see on it; else None."""
        gained = sorted(set(tags) - set(self.d.tags))
        if not gained:
            return None
        return self._outcome(
            "skipped", f"gained tag {', '.join(gained)} since the plan", "tag_changed"
        )

    def _gone(self) -> Outcome:
        """The image is not there: deleted with a child gcd removed (an engine that prunes
        parents, Podman before 5), or by someone else."""
        with self.run.lock:
            by = self.run.deleted.get(self.d.image_id)
        if by is not None and by != self.d.image_id:
            return self._outcome("done", f"the engine deleted it with its child {short_id(by)}")
        return self._outcome("skipped", "already gone", "gone")

    def _survived(self, refs: Sequence[str]) -> Outcome:
        """The engine answered `Deleted`, yet the image is there (the containerd store)."""
        # A tag made while the engine deleted (one gcd had untagged by name may be back).
        tags = sorted(t for t in refs if "@" not in t)
        if tags:
            return self._outcome(
                "skipped",
                f"tagged {', '.join(tags)} during its removal; the engine answered that it "
                "deleted the image but kept it with that tag",
                "tag_changed",
            )
        self.run.check()
        now = self.engine.recheck(self.d.image_id)
        children = now.children if now is not None else ()
        if children:
            return self._outcome(
                "skipped",
                f"it has a child image {short_id(children[0])} now; the engine answered "
                "that it deleted the image but kept it, untagged",
                "child_kept",
            )
        return self._outcome(
            "skipped",
            "the engine answered that it deleted the image but kept it, untagged",
            "conflict",
        )

    def _untag(self) -> Outcome:
        d = self.d
        self.run.check()
        now = self.engine.current(d.image_id)
        if now is None:
            return self._outcome("skipped", "already gone", "gone")
        tags = set(now[0])
        wanted = [t for t in d.untag if t in tags]  # a tag that moved away is not ours
        if not tags - set(wanted):
            return self._outcome(
                "skipped", "untagging would leave the image without a tag", "no_tag_left"
            )
        self._untag_verified(wanted)
        return self._outcome("done")

    # --- requests -----------------------------------------------------------------------

    def _users(self) -> str | None:
        self.run.check()
        users = self.engine.users(self.d.image_id)
        if not users:
            return None
        return f"now used by container {users[0].name} ({users[0].state})"

    def _delete(self, ref: str) -> Deletion | None:
        """One DELETE; None when the reference is already gone."""
        sent_ns = time.time_ns()
        try:
            if self.run.slow.is_set():
                with self.run.slow_gate:
                    deletion = self.engine.delete(ref)
            else:
                deletion = self.engine.delete(ref)
        except NotFoundError:
            return None
        except ConflictError as e:
            raise _Refused(f"engine refused: {e}") from None
        except EngineUnavailable as e:
            if not e.sent:
                raise
            # A slow engine carries out a DELETE it got after gcd stopped waiting: the
            # report cannot say "not removed", nor what went with it (the next cycle sees).
            what = short_id(ref) if ref == self.d.image_id else ref
            message = f"{e}; the engine got the DELETE of {what} and may carry it out all the same"
            if self.engine.alive():
                with self.run.lock:
                    first = not self.run.slow.is_set()
                    self.run.slow.set()
                if first:
                    log.warning(
                        "the engine answers slowly: at most %d DELETEs at once for the rest "
                        "of this cycle",
                        SLOW_DELETES,
                    )
                raise _Unanswered(message, sent_ns) from None
            raise EngineUnavailable(message, sent=True) from None
        with self.run.lock:
            for deleted in deletion.deleted:
                self.run.deleted.setdefault(deleted, self.d.image_id)
        return deletion

    def _note(self, deletion: Deletion | None, victims: frozenset[str] = frozenset()) -> None:
        """Record what a DELETE removed: its tags, and any image outside the plan."""
        if deletion is None:
            return
        snapshot = self.run.plan.snapshot
        self.untagged.extend(ref for ref in deletion.untagged if "@" not in ref)
        for deleted in deletion.deleted:
            if deleted == self.d.image_id:
                continue
            # The answer lists layers too: an image is one the snapshot or the events know.
            # With noprune, nothing but the image itself should go: anything else is said.
            if deleted in victims:
                self.unplanned[deleted] = " (a tag moved to it during the removal)"
            elif deleted in snapshot and self.run.plan.decision(deleted).action != "remove":
                self.unplanned[deleted] = ""
            # A parent the plan removes anyway, pruned with its child by an engine that
            # ignores noprune (Podman before 5): its own action finds it gone, and done.

    def _untag_verified(self, tags: Sequence[str]) -> None:
        """Delete tags of this image by name, then find in the engine's event log which
        image each one really left. A few at a time; a stop is honoured between any two."""
        for chunk in _chunks(sorted(tags), TAG_CHUNK):
            done: list[_Untag] = []
            failure: BaseException | None = None

            def one(tag: str) -> _Untag | None:
                self.run.check()
                checked = time.time_ns()
                if self.engine.target(tag) != self.d.image_id:
                    return None  # it names another image now: not ours to delete
                self.run.check()
                deletion = self._delete(tag)
                return None if deletion is None else _Untag(tag, checked, deletion)

            if len(chunk) == 1:
                try:
                    found = one(chunk[0])
                    done.extend([found] if found else [])
                except Exception as e:
                    failure = e
            else:
                workers = TAG_WORKERS if self.engine.concurrent_untags() else 1
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    for future in [pool.submit(one, t) for t in chunk]:
                        try:
                            found = future.result()
                        except Exception as e:
                            failure = failure or e
                            continue
                        if found is not None:
                            done.append(found)
            if done:
                self._verify(done)
            if failure is not None:
                raise failure

    def _verify(self, done: list[_Untag]) -> None:
        """Which image lost each tag. The engine logs an `untag` event for the image that lost
        a tag, between the DELETE's send and its answer. Another image can have lost it only
        if the tag moved to it after gcd's re-read: then that image was also tagged, loaded,
        pulled or imported in between (a `tag` event names the tag; the others name none)."""
        image_id = self.d.image_id
        since = min(u.checked_ns for u in done) - EVENT_SLACK_NS
        until = max(u.deletion.answered_ns for u in done) + EVENT_SLACK_NS
        events = self.engine.events(since, until)
        if self.untags_from_ns is None:
            self.untags_from_ns = since

        def placed(u: _Untag) -> bool:
            """The events show an image losing the tag: this one, or one gcd does not act on
            (other removals' untags may fall in the same moments)."""
            lost = _lost(u, events)
            return image_id in lost or bool(lost - self.run.acting)

        for wait in EVENT_LAG_WAITS:
            if all(placed(u) for u in done):
                break
            # An untag the log does not show yet: Podman writes its events a moment after
            # it answers (none of them read at once, all of them 0.1 s later). No stop is
            # honoured here: the tags are gone, and the report must say where from.
            time.sleep(wait)
            events = self.engine.events(since, until)
        self.seen.extend(events)
        for u in done:
            answered = u.deletion.answered_ns
            lost = _lost(u, events)
            gained = {
                e.image_id
                for e in events
                if ((e.action == "tag" and e.name == u.tag) or e.action in _ARRIVALS)
                and u.checked_ns - EVENT_SLACK_NS <= e.time_ns <= answered + EVENT_SLACK_NS
            }
            victims = (lost & gained) - self.run.acting
            if not victims and image_id not in lost:
                # This image did not lose the tag, so another did, though no event shows it
                # arriving there (the containerd store logs a tag when the tagging ends).
                victims = lost - self.run.acting
            if not victims:
                if image_id not in lost:
                    log.warning(
                        "the engine's events do not show %s leaving %s (its event log may "
                        "have moved on); counted as untagged there",
                        u.tag,
                        short_id(image_id),
                    )
                self._note(u.deletion)
                continue
            # The tag had moved to another image between the re-read and the DELETE.
            self._note(dataclasses.replace(u.deletion, untagged=()), frozenset(victims))
            survivors = sorted(v for v in victims if v not in u.deletion.deleted)
            if len(victims) == 1 and survivors:
                self._restore(u.tag, survivors[0])
            elif survivors:
                self.problems.append(
                    f"{u.tag} may have been taken from "
                    + " or ".join(short_id(v) for v in survivors)
                    + "; not put back (more than one image lost a tag at that moment)"
                )

    def _restore(self, tag: str, victim: str) -> None:
        """Put a tag gcd took by mistake back on the image it was taken from."""
        self.run.check()
        if self.engine.target(tag) is not None:
            self.problems.append(
                f"{tag} was taken from {short_id(victim)}; it names another image now"
            )
            return
        try:
            self.engine.tag(victim, tag)
        except NotFoundError:
            self.problems.append(f"{tag} was taken from {short_id(victim)}, which is gone now")
            return
        log.warning("%s had moved to %s during its removal: put it back", tag, short_id(victim))
        self.restored.append(f"{tag} on {short_id(victim)}")


@dataclass(frozen=True, slots=True)
class _Untag:
    """One tag deleted by name: when gcd re-read what it named, and the engine's answer."""

    tag: str
    checked_ns: int
    deletion: Deletion


def _lost(u: _Untag, events: Sequence[ImageEvent]) -> set[str]:
    """The images the events show losing a tag while the engine handled this untag's DELETE."""
    sent, answered = u.deletion.sent_ns, u.deletion.answered_ns
    return {
        e.image_id
        for e in events
        if e.action in ("untag", "delete")
        and sent - EVENT_SLACK_NS <= e.time_ns <= answered + EVENT_SLACK_NS
    }


def _tagged(events: Sequence[ImageEvent], image_id: str, known: Sequence[str]) -> set[str]:
    """The tags the events show put on this image, other than those in `known`."""
    return {
        e.name
        for e in events
        if e.action == "tag" and e.image_id == image_id and e.name and e.name not in known
    }


# Image events by which an image can get a tag without a `tag` event naming it.
_ARRIVALS = frozenset({"load", "pull", "import", "commit"})


def _what(d: Decision) -> str:
    return f"{short_id(d.image_id)} {_names(d.tags) if d.tags else '<untagged>'}"


def _log(d: Decision, o: Outcome) -> None:
    what = _what(d)
    if o.status == "done" and d.action == "remove":
        log.info("removed %s", what)
    elif o.status == "done":
        log.info("untagged %s on kept image %s", _names(o.untagged), what)
    elif o.status == "skipped":
        log.warning("skipped %s: %s", what, o.reason)
    else:
        log.error("failed %s: %s", what, o.error)
    if o.status != "failed" and o.error:
        log.error("%s: %s", what, o.error)
