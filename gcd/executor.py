"""execute(plan, engine) -> Report: the only place that removes anything.

Never forces. Right before each removal it re-reads the image: a tag that moved is left
alone, an image that a container now uses or that gained a tag is skipped. 409 is a skip,
404 means already gone, anything else fails that image only and the cycle goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from gcd.engine import Engine
from gcd.errors import ConflictError, EngineError, EngineUnavailable, NotFoundError
from gcd.model import Decision, Outcome, Plan, Report

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


def execute(
    plan: Plan, engine: Engine, started_at: datetime, stop: Callable[[], bool] = _never
) -> Report:
    """Carry out a plan; `stop` is polled between two removals (SIGTERM)."""
    snapshot = plan.snapshot
    outcomes: dict[str, Outcome] = {}
    deleted: set[str] = set()
    halted: tuple[str, str] | None = None
    # Children before parents, so no removal meets "image has dependent child images".
    direct = sorted(
        (d for d in plan.removals() if not d.implied),
        key=lambda d: (-snapshot.depth(d.image_id), d.image_id),
    )
    untags = [d for d in plan.decisions if d.decision == "keep" and d.untag]
    for d in [*direct, *untags]:
        if halted is None and stop():
            halted = ("stopped", "cycle stopped before this action")
        if halted is not None:
            outcomes[d.image_id] = _skip(d, *halted)
            continue
        try:
            act = _remove if d.decision == "remove" else _untag
            outcomes[d.image_id] = act(d, engine, deleted)
        except EngineUnavailable as e:
            # Every further call would wait for the same timeout: stop the cycle here.
            outcomes[d.image_id] = Outcome(d.image_id, "failed", error=str(e), code="engine_down")
            halted = ("engine_down", "engine unreachable")
        _log(d, outcomes[d.image_id])
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
    removed = {
        i
        for i, o in outcomes.items()
        if o.outcome == "done" and plan.decision(i).decision == "remove"
    }
    reclaimed = sum(snapshot.freed_bytes(removed).values())
    return Report(plan, False, started_at, outcomes, reclaimed)


def _skip(d: Decision, code: str, reason: str, untagged: Sequence[str] = ()) -> Outcome:
    return Outcome(d.image_id, "skipped", reason=reason, untagged=tuple(untagged), code=code)


def _remove(d: Decision, engine: Engine, deleted: set[str]) -> Outcome:
    now = engine.current(d.image_id)
    if now is None:
        return _skip(d, "gone", "already gone")
    tags, digests = now
    users = engine.users(d.image_id)
    if users:
        c = users[0]
        return _skip(d, "in_use", f"now used by container {c.name} ({c.state})")
    gained = sorted(set(tags) - set(d.tags))
    if gained:
        return _skip(d, "tag_changed", f"gained tag {', '.join(gained)} since the plan")
    # Tags that moved away since the plan are not in `tags` any more: they are left alone.
    refs = [*tags, *digests]
    failure, done = _delete(d, engine, refs or [d.image_id], deleted)
    if failure is not None:
        return failure
    if d.image_id in deleted or engine.current(d.image_id) is None:
        deleted.add(d.image_id)
        return Outcome(d.image_id, "done", untagged=tuple(done))
    return _skip(
        d, "kept_by_engine", "untagged, but the engine kept the image (it has child images)", done
    )


def _untag(d: Decision, engine: Engine, deleted: set[str]) -> Outcome:
    now = engine.current(d.image_id)
    if now is None:
        return _skip(d, "gone", "already gone")
    tags = set(now[0])
    wanted = [t for t in d.untag if t in tags]  # a tag that moved away is not ours to delete
    if not tags - set(wanted):
        return _skip(d, "no_tag_left", "untagging would leave the image without a tag")
    failure, done = _delete(d, engine, wanted, deleted)
    return failure or Outcome(d.image_id, "done", untagged=tuple(done))


def _delete(
    d: Decision, engine: Engine, refs: Sequence[str], deleted: set[str]
) -> tuple[Outcome | None, list[str]]:
    """Delete each reference in turn; the first refusal or error ends it as an outcome."""
    done: list[str] = []
    for ref in refs:
        try:
            deleted.update(engine.delete(ref))
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
