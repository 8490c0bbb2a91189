"""What `build_cache` would prune from BuildKit's cache: pure, for the plan and dry runs.

BuildKit itself decides, entry by entry, when gcd asks it to prune (`POST /build/prune`):
this is the estimate a dry run shows, in BuildKit's order. First every unused entry not used
for `unused_for`; then, while the cache holds more than `keep_storage`, the least recently
used unused entries. An entry in use (a build running now) is never removed.
"""

from __future__ import annotations

from datetime import datetime

from gcd.config import BuildCacheConfig
from gcd.model import BuildCacheEntry, BuildCachePlan


def plan(
    entries: tuple[BuildCacheEntry, ...] | None, config: BuildCacheConfig, now: datetime
) -> BuildCachePlan | None:
    """None when `build_cache` is not set; `available` False when the engine has no cache."""
    if not config.enabled:
        return None
    unused_for = None if config.unused_for is None else int(config.unused_for.total_seconds())
    if entries is None:
        return BuildCachePlan(0, 0, config.keep_storage, unused_for, available=False)
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
    return BuildCachePlan(
        len(entries),
        total,
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
    carry out, and the bytes it adds."""
    base = plan(entries, config, now) if config.enabled else None
    if entries is None:
        return base, 0
    planned = 0 if base is None else base.unused[1] + base.over[1]
    idle = sum(e.size for e in entries if not e.in_use)
    extra = min(still, max(0, idle - planned))
    if extra <= 0:
        return base, 0
    total = sum(e.size for e in entries)
    keep = max(0, total - planned - extra)
    if config.keep_storage is not None:
        keep = min(keep, config.keep_storage)
    squeezed = plan(entries, BuildCacheConfig(keep, config.unused_for), now)
    assert squeezed is not None
    added = squeezed.unused[1] + squeezed.over[1] - planned
    return squeezed, max(0, added)
