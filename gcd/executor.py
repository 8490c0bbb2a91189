"""execute(plan, engine) -> Report: the only place that removes anything.

Never forces. Right before each removal it re-reads the image: a tag that moved is left
alone, an image that a container now uses or that gained a tag is skipped. 409 is a skip,
404 means already gone, anything else fails that image only and the cycle goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from gcd.engine import Engine
from gcd.errors import ConflictError, EngineError, EngineUnavailable, NotFoundError
from gcd.model import Decision, Outcome, Plan, Report

log = logging.getLogger(__name__)

# Removals in flight at once. The engine deletes concurrently; more threads than this only
# queue in it (measured: 8 parallel deletes run at twice the sequential rate, 4 at 1.8x).
REMOVE_WORKERS = 8


def _never() -> bool:
    return False


def execute(
    plan: Plan,
    engine: Engine,
    started_at: datetime,
    stop: Callable[[], bool] = _never,
    workers: int = REMOVE_WORKERS,
) -> Report:
    """Carry out a plan; `stop` is polled between two removals (SIGTERM).

    Independent removals run on `workers` threads (the engine deletes concurrently and is
    the limit). Removals whose images share a planned-removal ancestor form one group, done
    in one thread children first: the engine prunes a parent along with its last child, and
    two siblings deleted at once could each leave that work to the other.
    """
    snapshot = plan.snapshot
    outcomes: dict[str, Outcome] = {}
    deleted: set[str] = set()
    lock = threading.Lock()
    halted: list[tuple[str, str]] = []

    def run_group(group: list[Decision]) -> None:
        for d in group:
            with lock:
                if not halted and stop():
                    halted.append(("stopped", "cycle stopped before this action"))
                reason = halted[0] if halted else None
            if reason is not None:
                outcome = _skip(d, *reason)
            else:
                try:
                    act = _remove if d.decision == "remove" else _untag
                    outcome = act(d, engine, deleted, lock)
                except EngineUnavailable as e:
                    # Every further call would wait for the same timeout: stop the cycle.
                    outcome = Outcome(d.image_id, "failed", error=str(e), code="engine_down")
                    with lock:
                        halted.append(("engine_down", "engine unreachable"))
                _log(d, outcome)
            with lock:
                outcomes[d.image_id] = outcome

    groups = _groups(plan)
    if len(groups) <= 1 or workers <= 1:
        for group in groups:
            run_group(group)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(groups))) as pool:
            for future in [pool.submit(run_group, g) for g in groups]:
                future.result()
    for d in plan.decisions:
        if d.image_id in outcomes:
            continue
        if d.implied and d.image_id not in deleted:
            outcomes[d.image_id] = _skip(
                d, "kept_by_engine", "a child image was not removed, so the engine kept this parent"
            )
            _log(d, outcomes[d.image_id])
        else:
            outcomes[d.image_id] = Outcome(d.image_id, "done")
    report = Report(plan, False, started_at, outcomes)
    reclaimed = sum(snapshot.freed_bytes(report.removed()).values())
    return dataclasses.replace(report, reclaimed_bytes=reclaimed)


def _groups(plan: Plan) -> list[list[Decision]]:
    """The actions, in groups that are safe to run at the same time; each group ordered
    children first. Largest groups first, so the pool finishes together."""
    snapshot = plan.snapshot
    removing = {d.image_id for d in plan.removals()}
    parent_of: dict[str, str] = {}

    def root(image_id: str) -> str:
        while parent_of.get(image_id, image_id) != image_id:
            image_id = parent_of[image_id]
        return image_id

    actions = [
        d
        for d in plan.decisions
        if (d.decision == "remove" and not d.implied) or (d.decision == "keep" and d.untag)
    ]
    for d in actions:
        if d.decision != "remove":
            continue
        for ancestor in snapshot.ancestors(d.image_id):
            if ancestor not in removing:
                break  # a kept ancestor stays; nothing above it is pruned by this removal
            a, b = root(d.image_id), root(ancestor)
            if a != b:
                parent_of[a] = b
    grouped: dict[str, list[Decision]] = {}
    for d in actions:
        grouped.setdefault(root(d.image_id), []).append(d)
    groups = [
        sorted(g, key=lambda d: (-snapshot.depth(d.image_id), d.image_id)) for g in grouped.values()
    ]
    return sorted(groups, key=lambda g: (-len(g), g[0].image_id))


def _skip(d: Decision, code: str, reason: str, untagged: Sequence[str] = ()) -> Outcome:
    return Outcome(d.image_id, "skipped", reason=reason, untagged=tuple(untagged), code=code)


def _remove(d: Decision, engine: Engine, deleted: set[str], lock: threading.Lock) -> Outcome:
    now = engine.current(d.image_id)
    if now is None:
        return _skip(d, "gone", "already gone")
    tags, digests = now
    gained = sorted(set(tags) - set(d.tags))
    if gained:
        return _skip(d, "tag_changed", f"gained tag {', '.join(gained)} since the plan")
    # Tags that moved away since the plan are not in `tags` any more: they are left alone.
    refs = [*tags, *digests] or [d.image_id]
    # Deleting an image's last reference is refused by the engine itself (409) while any
    # container uses it. Deleting several one by one is not: the first would go before the
    # last is refused, so then the containers are checked first.
    if len(refs) > 1:
        in_use = _in_use(d, engine)
        if in_use is not None:
            return in_use
    failure, done = _delete(d, engine, refs, deleted, lock)
    if failure is not None:
        if failure.code == "conflict":
            return _in_use(d, engine) or failure
        return failure
    with lock:
        gone = d.image_id in deleted
    if gone or engine.current(d.image_id) is None:
        with lock:
            deleted.add(d.image_id)
        return Outcome(d.image_id, "done", untagged=tuple(done))
    return _skip(
        d, "kept_by_engine", "untagged, but the engine kept the image (it has child images)", done
    )


def _in_use(d: Decision, engine: Engine) -> Outcome | None:
    users = engine.users(d.image_id)
    if not users:
        return None
    c = users[0]
    return _skip(d, "in_use", f"now used by container {c.name} ({c.state})")


def _untag(d: Decision, engine: Engine, deleted: set[str], lock: threading.Lock) -> Outcome:
    now = engine.current(d.image_id)
    if now is None:
        return _skip(d, "gone", "already gone")
    tags = set(now[0])
    wanted = [t for t in d.untag if t in tags]  # a tag that moved away is not ours to delete
    if not tags - set(wanted):
        return _skip(d, "no_tag_left", "untagging would leave the image without a tag")
    failure, done = _delete(d, engine, wanted, deleted, lock)
    return failure or Outcome(d.image_id, "done", untagged=tuple(done))


def _delete(
    d: Decision, engine: Engine, refs: Sequence[str], deleted: set[str], lock: threading.Lock
) -> tuple[Outcome | None, list[str]]:
    """Delete each reference in turn; the first refusal or error ends it as an outcome."""
    done: list[str] = []
    for ref in refs:
        try:
            gone = engine.delete(ref)
            with lock:
                deleted.update(gone)
        except NotFoundError:
            continue
        except ConflictError as e:
            return _skip(d, "conflict", f"engine refused: {e}", done), done
        except EngineUnavailable:
            raise
        except EngineError as e:
            return Outcome(d.image_id, "failed", error=str(e), untagged=tuple(done)), done
        if ref != d.image_id:
            done.append(ref)
    return None, done


def _log(d: Decision, o: Outcome) -> None:
    what = f"{d.image_id[7:19]} {','.join(d.tags) or '<untagged>'}"
    if o.outcome == "done" and d.decision == "remove":
        log.info("removed %s", what)
    elif o.outcome == "done":
        log.info("untagged %s on kept image %s", ",".join(o.untagged), what)
    elif o.outcome == "skipped":
        log.warning("skipped %s: %s", what, o.reason)
    else:
        log.error("failed %s: %s", what, o.error)
