"""What `build_cache` would prune from BuildKit's cache: pure, for the plan and dry runs.

BuildKit itself decides, entry by entry, when gcd asks it to prune (`POST /build/prune`):
this is the estimate a dry run shows. First every unused entry not used for `unused_for`;
then, while the cache holds more than `keep_storage`, unused entries, here least recently
used first (BuildKit ranks them by how recently and how often they were used, so it may
pick others of about the same bytes); under disk pressure, strictly the least recently used
(asked for by time, see under_pressure). An entry in use (a build running now) is never
removed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from gcd.config import BuildCacheConfig
from gcd.model import BuildCacheEntry, BuildCachePlan


def _chosen(
    entries: tuple[BuildCacheEntry, ...], config: BuildCacheConfig, now: datetime
) -> tuple[list[BuildCacheEntry], list[BuildCacheEntry]]:
    """The entries `build_cache` would prune: for being unused long, then for the size."""
    total = sum(e.size for e in entries)
    idle = sorted((e for e in entries if not e.in_use), key=lambda e: (e.last_used, e.id))
    old = (
        []
        if config.unused_for is None
        else [e for e in idle if now - e.last_used >= config.unused_for]
    )
    left = total - sum(e.size for e in old)
    over = []
    if config.keep_storage is not None:
        gone = {e.id for e in old}
        for e in idle:
            if left <= config.keep_storage:
                break
            if e.id not in gone:
                over.append(e)
                left -= e.size
    return old, over


def plan(
    entries: tuple[BuildCacheEntry, ...] | None, config: BuildCacheConfig, now: datetime
) -> BuildCachePlan | None:
    """None when `build_cache` is not set; `available` False when the engine has no cache."""
    if not config.enabled:
        return None
    unused_for = None if config.unused_for is None else int(config.unused_for.total_seconds())
    if entries is None:
        return BuildCachePlan(0, 0, config.keep_storage, unused_for, available=False)
    old, over = _chosen(entries, config, now)
    return BuildCachePlan(
        len(entries),
        sum(e.size for e in entries),
        config.keep_storage,
        unused_for,
        (len(old), sum(e.size for e in old)),
        (len(over), sum(e.size for e in over)),
    )


def under_pressure(
    entries: tuple[BuildCacheEntry, ...] | None,
    config: BuildCacheConfig,
    now: datetime,
    still: int,
) -> tuple[BuildCachePlan | None, int]:
    """Disk pressure's second step: beyond what `build_cache` prunes, the least recently
    used unused entries until `still` more bytes go (or the cache has no more). The plan to
    carry out, and the bytes it adds.

    The engine is asked for them by time, not by size: every unused entry last used before
    the whole second after the last one needed (`until`). Asked for a size, BuildKit ranks entries by how
    recently *and how often* they were used, and would take a build's context (used twice)
    after a newer build's steps (used once)."""
    base = plan(entries, config, now) if config.enabled else None
    if entries is None:
        return base, 0
    old, over = _chosen(entries, config, now)
    gone = {e.id for e in (*old, *over)}
    idle = sorted((e for e in entries if not e.in_use), key=lambda e: (e.last_used, e.id))
    freed = 0
    until = None
    for e in idle:
        if freed >= still:
            break
        if e.id not in gone:
            until = e.last_used
            freed += e.size
    if until is None:
        return base, 0
    # The cut-off is the next whole second: Docker 28 cuts at whole seconds (asked for
    # "unused for 3.8 s" it takes "since 4 s ago"), and one build's entries are
    # milliseconds apart. Whatever was last used before it goes, and is planned as gone.
    until = until.replace(microsecond=0) + timedelta(seconds=1)
    pressed = [e for e in idle if e.last_used < until and e.id not in gone]
    added = sum(e.size for e in pressed)
    if base is None:
        base = BuildCachePlan(len(entries), sum(e.size for e in entries), None, None)
    return base._replace(until=until, pressed=(len(pressed), added)), added
