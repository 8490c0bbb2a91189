"""Durations and byte counts, as users write and read them."""

from __future__ import annotations

import re
from datetime import timedelta

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:\d+[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """Parse `90s`, `15m`, `2h`, `7d`, `2w` (or a sum such as `1h30m`); raise ValueError."""
    if not _DURATION.fullmatch(text):
        raise ValueError(text)
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in _PART.findall(text)))


_SIZE_UNITS = {
    "": 1, "B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
SIZE_PATTERN = r"^([0-9]+(\.[0-9]+)?) ?(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$"
_SIZE = re.compile(SIZE_PATTERN)
# No disk holds more (and a float of more loses bytes).
MAX_SIZE = 2**60


def parse_size(text: str) -> int:
    """`10GB` (decimal, as `docker images` prints), `512MiB` (binary), `1.5TB`, `4096` (bytes),
    as a whole number of bytes; raise ValueError."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(text)
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(3) or ""])
    if value > MAX_SIZE:
        raise ValueError(text)
    return value


def format_duration(delta: timedelta) -> str:
    """The largest two units of a duration: `3d4h`, `12m`, `45s`, `0s`."""
    seconds = max(0, int(delta.total_seconds()))
    parts = []
    for unit in ("w", "d", "h", "m", "s"):
        n, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts[:2]) or "0s"


def format_bytes(n: int) -> str:
    """Decimal units as `docker images` shows them: 940.6MB, 1.2GB, 512B."""
    if abs(n) < 1000:
        return f"{n}B"
    value = n / 1000
    for unit in ("kB", "MB", "GB"):
        # Judged as printed: 999,950 bytes is 1.0MB, not 1000.0kB.
        if abs(round(value, 1)) < 1000:
            return f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}TB"
