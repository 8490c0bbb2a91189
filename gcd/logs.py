"""Logging to stderr: timestamps on a terminal, syslog priorities under journald."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from gcd.units import format_duration

if TYPE_CHECKING:
    from gcd.model import Regret

# Regrets named one line each at a time; the rest are summed up in one line by rule (a CI
# host that loads 500 removed builds back at once would log 500 lines). The JSON report
# lists them all and gcd_regret_total counts them all.
REGRETS_NAMED = 10
# What this process has said once (a condition that lasts is said once, not each cycle).
_SAID: set[str] = set()


class JournalFormatter(logging.Formatter):
    """Under journald: a syslog priority prefix (<6>...) instead of a timestamp and level,
    so `journalctl -p warning` works and lines carry one timestamp, the journal's."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode when stderr is connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{stat.st_dev}:{stat.st_ino}"


def setup(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def once(log: logging.Logger, level: int, text: str) -> None:
    """Log `text` the first time this process says it."""
    if text not in _SAID:
        _SAID.add(text)
        log.log(level, "%s", text)


def regrets(log: logging.Logger, found: Sequence[Regret]) -> None:
    """Log regrets: the first REGRETS_NAMED each on its line, then how many more by rule."""
    for r in found[:REGRETS_NAMED]:
        log.warning(
            "regret: %s is back %s after gcd removed it (rule %s)",
            r.tag,
            format_duration(r.seen_at - r.removed_at),
            r.rule,
        )
    rest = Counter(r.rule for r in found[REGRETS_NAMED:])
    if rest:
        log.warning(
            "regret: %d more tags are back after gcd removed them (%s)",
            rest.total(),
            ", ".join(f"rule {rule}: {n}" for rule, n in sorted(rest.items())),
        )
