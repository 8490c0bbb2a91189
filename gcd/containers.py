"""Which stopped containers go (`containers.remove_exited_after`): pure, as the image planner.

A container that exited long ago pins its image forever: the engine refuses to delete an
image a container uses, in any state, and so does gcd. Removing such containers first frees
those images for the same cycle's rules. Only `exited` containers and `created` ones that
never started are candidates; running, paused, restarting and dead ones never are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from datetime import datetime

from gcd.config import ContainersConfig, Protect
from gcd.model import REMOVABLE_STATES, Container, ContainerDecision, ContainerState, Snapshot
from gcd.units import format_duration


def protection(container: Container, entries: tuple[Protect, ...]) -> str | None:
    """The first `containers.protect` entry that matches, as a reason, or None."""
    for entry in entries:
        if entry.kind == "name" and fnmatch.fnmatchcase(container.name, entry.value):
            return f'containers.protect[{entry.index}] name "{entry.value}"'
        if entry.kind == "label" and entry.labels_match(container.labels):
            return f'containers.protect[{entry.index}] label "{entry.value}"'
    return None


def candidates(snapshot: Snapshot, config: ContainersConfig, now: datetime) -> tuple[str, ...]:
    """The stopped, unprotected containers created at least `remove_exited_after` ago: only
    their finish times (an inspect each) can make them go. A container finishes after it is
    created, so a younger one cannot."""
    after = config.remove_exited_after
    if after is None:
        return ()
    return tuple(
        c.id
        for c in snapshot.containers
        if c.state in REMOVABLE_STATES
        and protection(c, config.protect) is None
        and now - c.created >= after
    )


def plan(
    snapshot: Snapshot,
    config: ContainersConfig,
    stopped: Mapping[str, ContainerState],
    now: datetime,
) -> tuple[ContainerDecision, ...]:
    """A decision for every stopped container (none when the option is off). `stopped`
    holds what an inspect of each candidate showed: its state and when it finished."""
    after = config.remove_exited_after
    if after is None:
        return ()
    limit = f"containers.remove_exited_after {format_duration(after)}"
    decisions = []
    for c in sorted(snapshot.containers, key=lambda c: (c.name, c.id)):
        if c.state not in REMOVABLE_STATES:
            continue
        seen = stopped.get(c.id)
        state = c.state if seen is None else seen.state
        protected = protection(c, config.protect)
        age = now - c.created
        since = None
        if protected is not None:
            action, reason = "keep", f"protected by {protected}"
        elif seen is None and age >= after:
            action, reason = "keep", "gone when gcd looked closer"  # the inspect missed it
        elif seen is None and c.state == "created":
            action = "keep"
            reason = f"created {format_duration(age)} ago, never started < {limit}"
        elif seen is None:
            action, reason = "keep", f"exited, created {format_duration(age)} ago < {limit}"
        elif seen.state not in REMOVABLE_STATES:
            action, reason = "keep", f"{seen.state} when gcd looked closer"
        else:
            if seen.finished is None:
                what, since = f"created {format_duration(age)} ago, never started", c.created
            else:
                age = now - seen.finished
                what, since = f"exited {format_duration(age)} ago", seen.finished
            action = "remove" if age >= after else "keep"
            reason = f"{what} {'>=' if age >= after else '<'} {limit}"
        decisions.append(
            ContainerDecision(c.id, c.name, c.image_id, state, action, reason, since)  # type: ignore[arg-type]
        )
    return tuple(decisions)
