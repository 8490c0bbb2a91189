"""Signals held from the command line's first line until a command takes them over.

Loading gcd (docker-py, PyYAML, APScheduler) takes about 0.15 s. Under Python's own handling a
SIGTERM or SIGHUP in that time killed the process (rc -15 or 129; under systemd a reload
right after a start did that), and a SIGINT raised wherever the import was. Held, each waits
for the command that knows what it means: the daemon stops or reloads, `gcd run` stops before
its first removal. Commands that take none get them back as if they had just come.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Collection
from types import FrameType
from typing import Any

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

Handler = Callable[[int, FrameType | None], Any]


class Held:
    """Installed first; `take_over` hands signals to a command, `release` gives them back."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {s: signal.signal(s, self._hold) for s in HELD}

    def _hold(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    def take_over(self, handler: Handler, signals: Collection[int] = HELD) -> None:
        """From now on `handler` gets `signals`, those that came already first, in order;
        the others go back to their former handlers (see release)."""
        for held in HELD:
            signal.signal(held, handler if held in signals else self.previous[held])
        received, self.received = self.received, []
        for signum in received:
            if signum in signals:
                handler(signum, None)
            else:
                signal.raise_signal(signum)

    def release(self) -> None:
        """Every signal back to its former handler; one that came meanwhile is raised again
        (SIGINT: KeyboardInterrupt; SIGTERM, SIGHUP: the process ends as it would have)."""
        self.take_over(lambda _s, _f: None, ())
