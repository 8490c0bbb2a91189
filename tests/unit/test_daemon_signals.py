"""How the daemon takes signals: stored by a handler written in C, acted on by its main loop."""

from __future__ import annotations

import os
import signal

from gcd.config import Config
from gcd.daemon import Daemon


def test_signals_are_stored_by_a_c_handler_and_taken_by_the_main_loop() -> None:
    # A handler written in Python runs again inside itself when the next signal comes
    # before it returns; in a burst of SIGHUPs the daemon's once went 1,000 deep and died
    # (RecursionError). A C function runs no bytecode, so nothing runs inside it.
    daemon = Daemon(Config(), None, environ={})
    handler = daemon.signalled.__setitem__
    assert not hasattr(handler, "__code__")
    daemon.signalled[signal.SIGHUP] = None  # one held before the daemon took over
    daemon._take_signals()
    assert (daemon.reloads_wanted, daemon.stopping.is_set()) == (1, False)
    daemon._take_signals()
    assert daemon.reloads_wanted == 1  # taken once
    previous = {s: signal.signal(s, handler) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        for _ in range(3):  # come before the main loop looks: one reload, of the file then
            os.kill(os.getpid(), signal.SIGHUP)
        daemon._take_signals()
        assert (daemon.reloads_wanted, daemon.stopping.is_set()) == (2, False)
        os.kill(os.getpid(), signal.SIGTERM)
        daemon._take_signals()
        assert daemon.stopping.is_set()
    finally:
        for s, former in previous.items():
            signal.signal(s, former)
