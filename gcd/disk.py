"""The watched filesystem (`disk`): one `statvfs`, and whether it, or the engine's own bytes,
are under pressure, and how much pressure must free. Pure but for `measure`."""

from __future__ import annotations

import os

from gcd.config import DiskConfig
from gcd.errors import GcdError
from gcd.model import Pressure, Usage
from gcd.units import format_bytes

# An engine over `budget` is freed down to this share of it.
BUDGET_LOW = 0.9


def measure(path: str) -> Usage:
    try:
        st = os.statvfs(path)
    except OSError as e:
        raise GcdError(f"cannot measure disk.path {path}: {e.strerror or e}") from None
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return Usage(path, used, st.f_bavail * st.f_frsize, st.f_files, st.f_files - st.f_ffree)


def pressure(usage: Usage, config: DiskConfig, engine_bytes: int) -> Pressure | None:
    """The pressure on `usage` (and on the engine's `engine_bytes` against the budget), or
    None when every measure is below its high mark."""
    over: list[str] = []
    to_free = inodes = 0
    if usage.bytes_ratio >= config.high:
        over.append(f"used {usage.bytes_ratio:.0%} >= high {config.high:.0%}")
        size = usage.used_bytes + usage.avail_bytes
        to_free = max(0, usage.used_bytes - int(config.low * size))
    if usage.inodes_ratio >= config.inodes_high:
        over.append(f"inodes used {usage.inodes_ratio:.0%} >= inodes_high {config.inodes_high:.0%}")
        inodes = max(0, usage.used_inodes - int(config.inodes_low * usage.total_inodes))
    if config.budget is not None and engine_bytes > config.budget:
        over.append(f"engine {format_bytes(engine_bytes)} > budget {format_bytes(config.budget)}")
        to_free = max(to_free, engine_bytes - int(BUDGET_LOW * config.budget))
    if not over:
        return None
    found = Pressure(usage, tuple(over), to_free, inodes)
    return Pressure(usage, tuple(over), to_free, inodes, bytes_needed(found))


def bytes_needed(pressure: Pressure) -> int:
    """The bytes pressure must free: its own, or as many as free the inodes it must free
    at this filesystem's bytes per inode so far (the engine does not say how many files a
    layer holds, so inodes are predicted from bytes)."""
    usage = pressure.usage
    if not pressure.inodes_to_free or not usage.used_inodes:
        return pressure.bytes_to_free
    per_inode = usage.used_bytes / usage.used_inodes
    return max(pressure.bytes_to_free, int(pressure.inodes_to_free * per_inode))
