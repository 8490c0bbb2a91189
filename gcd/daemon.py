"""`gcd daemon`: cycles on a schedule under systemd (Type=notify), metrics, reload, signals.

Threads: the main thread owns signals, the scheduler and the systemd watchdog; APScheduler
runs cycles and reloads one at a time on a single worker thread. The watchdog is pinged only
while that worker makes progress, so a wedged daemon is restarted by systemd instead of kept
alive. Jobs never call into the scheduler: its shutdown(wait=True) holds the job store lock
while it waits for the running job, so a job that asked it anything would deadlock the exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sdnotify import SystemdNotifier

from gcd import config as gcd_config
from gcd import cycle, disk, report
from gcd.config import Config
from gcd.engine import DockerEngine
from gcd.errors import ConfigError, EngineUnavailable, GcdError, LockBusy, Stopped
from gcd.events import Follower
from gcd.metrics import Metrics, Server
from gcd.model import Report
from gcd.signals import HELD, Held
from gcd.state import Store
from gcd.units import format_bytes

log = logging.getLogger(__name__)

# Between two watchdog checks when systemd asks for no watchdog: how soon a signal is handled.
IDLE_TICK = 1.0
# How often a metrics.listen that could not be bound is tried again.
METRICS_RETRY = 5.0
# After a pressure cycle that could not free enough, more use by this share of the
# filesystem starts another before the schedule does.
PRESSURE_MARGIN = 0.01
# ... or this long (at least four disk checks) passing: an engine may list an image a moment
# after it says it loaded it (Docker 26's containerd store), so a cycle can miss what came.
STUCK_RETRY = 30.0
# How long one sd_notify message may wait for systemd to take it.
NOTIFY_TIMEOUT = 0.1
# signalled.pop's default: no such signal came (one that came left a frame, or None).
_NONE = object()


def _one_line(text: str) -> str:
    """ASCII without control characters: newlines and the like become spaces."""
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return "".join(c if " " <= c <= "~" else " " for c in ascii_text)


def _release_memory() -> None:
    """Give the memory of a cycle's snapshot and plan back to the system: the daemon then
    idles at its resting size instead of its largest cycle's (glibc keeps freed heap)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def trigger_of(config: Config) -> CronTrigger | IntervalTrigger:
    if config.schedule.cron:
        return CronTrigger.from_crontab(config.schedule.cron, timezone=UTC)
    assert config.schedule.every is not None
    return IntervalTrigger(seconds=config.schedule.every.total_seconds(), timezone=UTC)


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        metrics: Metrics | None = None,
        notifier: Any = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.notifier = notifier or SystemdNotifier()
        sock = getattr(self.notifier, "socket", None)
        if sock is not None:
            # A notification never holds the daemon up: one systemd does not take within a tenth
            # of a second is dropped (sdnotify ignores the error), not waited for.
            sock.settimeout(NOTIFY_TIMEOUT)
        env = os.environ if environ is None else environ
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        owner = env.get("WATCHDOG_PID")
        self.watchdog = usec / 1e6 if usec and (not owner or owner == str(os.getpid())) else 0.0
        self.stopping = threading.Event()
        # The main loop sleeps on this pipe; a byte wakes it. A signal writes its byte from
        # C (signal.set_wakeup_fd), and its handler is `signalled.__setitem__`, C too. A
        # handler runs in the main thread between two bytecodes, maybe while that thread
        # holds a lock: setting an Event there (its lock) once deadlocked the daemon, which
        # then never stopped on SIGTERM. A handler written in Python also runs inside
        # itself when the next signal comes before it returns: one that wrote the byte
        # itself (a few microseconds) was found nested 1,000 deep in a burst of 20,000
        # SIGHUPs (RecursionError, the daemon gone). A C function runs no bytecode, so no
        # handler runs inside it. The main loop takes the signals out (_take_signals).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signalled: dict[int, FrameType | None] = {}
        # SIGHUPs received and reloads carried out: the last SIGHUP always wins (coalesced,
        # never dropped, also while a reload runs).
        self.reloads_wanted = 0
        self.reloads_done = 0
        self.reload_queued = False  # a reload job is added and has not started yet
        self.trigger = trigger_of(config)
        self.new_trigger: CronTrigger | IntervalTrigger | None = None
        self.engine: DockerEngine = cycle.connect(config)
        self.store: Store | None = None
        self.server: Server | None = None
        self.follower: Follower | None = None
        self.engine_bytes = 0  # images and build cache at the last cycle (disk.budget)
        self.started_cycles = 0
        self.arrivals = 0  # images the event follower saw come
        self.stuck_since = 0.0
        self.stuck_at: int | None = None  # used bytes a pressure cycle could not free
        self._bind_retry_at = 0.0  # when to try metrics.listen again; 0: never failed
        self.engine_down_since: datetime | None = None
        self.in_cycle = False
        self.polls = 0
        self._progress_marker: tuple[int, int] = (0, 0)
        self._progress_at = time.monotonic()
        # A BlockingScheduler on a thread of gcd's own: the watchdog asks that thread
        # whether it lives (a BackgroundScheduler keeps its thread private).
        self.scheduler = BlockingScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={
                "coalesce": True,  # missed runs (host asleep, long cycle) become one run
                "max_instances": 1,
                "misfire_grace_time": None,  # a late cycle is still worth running
            },
        )
        self.scheduler_thread = threading.Thread(
            target=self.scheduler.start, name="scheduler", daemon=True
        )

    # --- life cycle --------------------------------------------------------------------------

    def run(self, held: Held | None = None) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code. `held`: the signals that came
        before (a SIGTERM then means no cycle at all, a SIGHUP a reload)."""
        self.store = Store(self.config.state_dir)
        self._serve_metrics()
        self.follower = Follower(
            self.config, self.metrics, self._image_arrived, self._events_resumed
        )
        self.follower.start()
        previous = {s: signal.getsignal(s) for s in HELD}
        previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if held is None:
            held = Held()
        held.take_over(self.signalled.__setitem__)
        self._take_signals()
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self.scheduler.add_job(
            self._cycle,
            self.trigger,
            id="cycle",
            next_run_time=None if self.stopping.is_set() else datetime.now(UTC),
        )
        self.scheduler.add_job(
            self._check_disk,
            IntervalTrigger(seconds=self.config.disk.check_every.total_seconds(), timezone=UTC),
            id="disk",
        )
        log.info("gcd daemon started: %s, engine %s", self._schedule_text(), self.engine.url)
        self.scheduler_thread.start()
        while not self.scheduler.running and self.scheduler_thread.is_alive():
            time.sleep(0.001)  # until it can be shut down: a SIGTERM may come at once
        self._notify("READY=1", f"STATUS=started; first cycle now, then {self._schedule_text()}")
        try:
            self._main_loop()
        finally:
            self._notify("STOPPING=1", "STATUS=stopping")
            log.info("stopping: waiting for the current cycle to stop between two removals")
            if self.scheduler.running:
                self.scheduler.shutdown(wait=True)
            self.scheduler_thread.join()
            self.follower.stop()
            if self.server is not None:
                self.server.close()
            self.engine.close()
            self.store.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(self._wake_r)
            os.close(self._wake_w)
        log.info("gcd daemon stopped")
        return 0

    def _serve_metrics(self) -> None:
        """Bind metrics.listen. A port that is taken does not stop the daemon (under systemd
        that would be a restart loop): it collects anyway, says so once, and tries again
        every METRICS_RETRY seconds; /metrics then shows the failed attempts."""
        listen = self.config.metrics.listen
        if not listen or self.server is not None:
            return
        try:
            self.server = self.metrics.serve(listen)
        except GcdError as e:
            self.metrics.listen_failures.inc()
            if self._bind_retry_at == 0.0:
                log.error("%s; collecting anyway, trying again every %gs", e, METRICS_RETRY)
            self._bind_retry_at = time.monotonic() + METRICS_RETRY
            return
        log.info("serving metrics on http://%s/metrics", listen)

    def _main_loop(self) -> None:
        tick = min(self.watchdog / 2, IDLE_TICK * 5) if self.watchdog else IDLE_TICK
        while not self.stopping.is_set():
            if select.select([self._wake_r], [], [], tick)[0]:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            self._take_signals()
            if self.stopping.is_set():
                break
            if self.reloads_wanted > self.reloads_done and not self.reload_queued:
                # One reload may wait while another runs (it started before the latest
                # SIGHUP): APScheduler would skip a second instance, and drop that SIGHUP.
                self.reload_queued = True
                self.scheduler.add_job(
                    self._reload, id="reload", replace_existing=True, max_instances=2
                )
            if self.server is None and time.monotonic() >= self._bind_retry_at:
                self._serve_metrics()
            if self.new_trigger is not None:  # set by a reload, applied here (see above)
                self.trigger, self.new_trigger = self.new_trigger, None
                self.scheduler.reschedule_job("cycle", trigger=self.trigger)
                log.info("schedule is now %s", self._schedule_text())
            if self.watchdog and self._healthy():
                self._notify("WATCHDOG=1")

    def _take_signals(self) -> None:
        """In the main thread: a SIGHUP asks for a reload (those that came since the last
        look, one: the file is read as it is then), SIGTERM and SIGINT for the end."""
        if self.signalled.pop(signal.SIGHUP, _NONE) is not _NONE:
            self.reloads_wanted += 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            if self.signalled.pop(signum, _NONE) is not _NONE:
                self.stopping.set()

    def wake(self) -> None:
        """Wake the main loop (any thread, or a signal handler)."""
        with contextlib.suppress(OSError):  # a full pipe wakes it all the same
            os.write(self._wake_w, b"\0")

    def _healthy(self) -> bool:
        """The scheduler thread runs, and a running cycle made progress within the watchdog
        time (an engine call or a step between removals)."""
        if not self.scheduler.running or not self.scheduler_thread.is_alive():
            return False
        marker = (self.engine.calls, self.polls)
        now = time.monotonic()
        if marker != self._progress_marker or not self.in_cycle:
            self._progress_marker, self._progress_at = marker, now
        return now - self._progress_at < self.watchdog

    def _poll_stop(self) -> bool:
        self.polls += 1
        return self.stopping.is_set()

    # --- jobs (on the scheduler's single worker) ---------------------------------------------

    def _cycle(self, trigger: str | None = None) -> None:
        """A cycle: the first at start, then on schedule, or for disk pressure."""
        if trigger is None:
            trigger = "schedule" if self.started_cycles else "start"
        self.started_cycles += 1
        try:
            self._run_cycle(trigger)
        finally:
            self._after_job()

    def _reload(self) -> None:
        """Reload until no SIGHUP came in meanwhile: each pass reads the file as it is then,
        so the last SIGHUP's file is the one that runs."""
        self.reload_queued = False  # a SIGHUP from now on needs a pass after this one
        try:
            while self.reloads_done < self.reloads_wanted:
                target = self.reloads_wanted
                self._run_reload()
                self.reloads_done = target
        finally:
            self.wake()  # a SIGHUP after the last pass: the main loop queues another
            self._after_job()

    def _check_disk(self) -> None:
        """Every disk.check_every: one statvfs; over a high mark (or the budget), a cycle now.
        After a cycle that could not get back under the low mark (the rest is protected, or
        not gcd's), only more use (by PRESSURE_MARGIN of the filesystem), a new image, or
        STUCK_RETRY passing starts another: the scheduled cycles still come, and nothing
        loops."""
        try:
            usage = cycle.watched(self.config, self.engine)
        except GcdError as e:  # the engine away (its cycle says so), a disk.path gone
            log.debug("disk check: %s", e)
            return
        if usage is None:
            return
        self.metrics.disk(usage)
        pressure = disk.pressure(usage, self.config.disk, self.engine_bytes)
        if pressure is None:
            self.stuck_at = None
            self.metrics.pressure_active.set(0)
            return
        margin = PRESSURE_MARGIN * (usage.used_bytes + usage.avail_bytes)
        retry = max(STUCK_RETRY, 4 * self.config.disk.check_every.total_seconds())
        if (
            self.stuck_at is not None
            and usage.used_bytes < self.stuck_at + margin
            and time.monotonic() - self.stuck_since < retry
        ):
            return
        log.info("%s on %s: a cycle now", pressure.reason, usage.path)
        self._cycle("pressure")

    def _image_arrived(self) -> None:
        """From the event follower: an image came (a load, pull, tag). A pressure cycle that
        could not free enough may have run before it was all there (its upload still on
        disk, its tags not yet made): the next disk check judges afresh."""
        self.arrivals += 1
        self.stuck_at = None

    def _events_resumed(self) -> None:
        """From the event follower, following again after a gap: a snapshot records what the
        events of the gap would have (containers in use, images that came), on the
        scheduler's worker, between cycles."""
        self.scheduler.add_job(self._observe, id="observe", replace_existing=True)

    def _observe(self) -> None:
        assert self.store is not None
        try:
            snapshot = cycle.observe(self.engine, self.store, cycle.utcnow())
        except GcdError as e:  # LockBusy, the engine away again: the next cycle sees it
            log.info("after the gap in the engine's events, no snapshot: %s", e)
            return
        finally:
            self._after_job()
        log.info(
            "after the gap in the engine's events, a snapshot: %d images, %d containers",
            len(snapshot.images),
            len(snapshot.containers),
        )

    def _after_job(self) -> None:
        """Idle small: drop the store's rows and give a job's memory back to the system."""
        if self.store is not None:
            self.store.release()
        _release_memory()

    def _run_cycle(self, trigger: str) -> None:
        assert self.store is not None
        arrivals = self.arrivals
        self.in_cycle = True
        started = time.monotonic()
        try:
            result = cycle.run(
                self.config, self.engine, self.store, cycle.utcnow(), stop=self._poll_stop
            )
        except EngineUnavailable as e:
            self._engine_lost(e, started, trigger)
            return
        except Stopped as e:
            log.info("cycle %s", e)
            return
        except LockBusy as e:
            log.warning("cycle skipped: %s", e)
            self.metrics.cycle_ended("skipped", time.monotonic() - started, time.time(), trigger)
            return
        except GcdError as e:
            log.error("cycle failed: %s", e)
            self.metrics.cycle_ended("error", time.monotonic() - started, time.time(), trigger)
            self._notify(f"STATUS=last cycle failed: {e}; next {self._next_run()}")
            return
        except Exception:  # a bug must not stop the service: log it, count it, go on
            log.exception("cycle crashed")
            self.metrics.cycle_ended("error", time.monotonic() - started, time.time(), trigger)
            return
        finally:
            self.in_cycle = False
        if self.engine_down_since is not None:
            log.info("the Docker engine at %s answers again", self.engine.url)
            self.engine_down_since = None
        self.metrics.record(result, time.monotonic() - started, time.time(), trigger)
        self._after_pressure(result, arrivals)
        log.info("%s", report.summary_line(result))
        if result.state_problem:
            log.error("%s; %s", result.state_problem, cycle.STATE_PROBLEM_EFFECT)
        self._notify(f"STATUS={self._status(result)}")

    def _after_pressure(self, result: Report, arrivals: int) -> None:
        """What the next disk checks compare with: the engine's bytes (for disk.budget) and,
        if this cycle could not get back under the low mark, the use it started from (unless
        an image came while it ran: `arrivals` is the count when it began)."""
        plan = result.plan
        if self.config.disk.budget is not None:
            every = {i.id for i in plan.snapshot.images}
            stored = sum(plan.snapshot.freed_bytes(every).values())
            self.engine_bytes = stored - result.reclaimed_bytes
            if plan.build_cache is not None:
                self.engine_bytes += plan.build_cache.bytes
        # Measured at its snapshot: what arrived while it removed is growth, and may start
        # another cycle.
        usage = plan.disk
        stuck = usage is not None and result.short_of_low() and self.arrivals == arrivals
        self.stuck_at = usage.used_bytes if stuck and usage is not None else None
        self.stuck_since = time.monotonic()

    def _engine_lost(self, error: EngineUnavailable, started: float, trigger: str) -> None:
        self.metrics.engine_up.set(0)
        self.metrics.cycle_ended("error", time.monotonic() - started, time.time(), trigger)
        if self.engine_down_since is None:
            # Once, not once a cycle: the next cycles retry quietly until it answers again.
            self.engine_down_since = datetime.now(UTC)
            log.error("%s; retrying at every cycle", error)
        else:
            log.debug("engine still unreachable: %s", error)
        since = self.engine_down_since.strftime("%H:%M:%SZ")
        self._notify(f"STATUS=engine unreachable since {since}; next try {self._next_run()}")

    def _run_reload(self) -> None:
        assert self.store is not None
        try:
            new = gcd_config.load(self.config_path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload: %s", problem)
            log.error("reload failed: keeping the configuration that runs now")
            self.metrics.config_reloads.labels("failure").inc()
            return
        old, self.config = self.config, new
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        self.metrics.config_reloads.labels("success").inc()
        log.info("configuration reloaded from %s", self.config_path or "built-in defaults")
        if (old.schedule.every, old.schedule.cron) != (new.schedule.every, new.schedule.cron):
            self.new_trigger = trigger_of(new)
            self.wake()
        if (old.engine_url(), old.engine.timeout) != (new.engine_url(), new.engine.timeout):
            self.engine.close()
            self.engine = cycle.connect(new)
            log.info("engine is now %s", self.engine.url)
            if self.follower is not None:  # it follows the new engine's events
                self.follower.stop()
                self.follower = Follower(
                    new, self.metrics, self._image_arrived, self._events_resumed
                )
                self.follower.start()
        for key, a, b in (
            ("metrics.listen", old.metrics.listen, new.metrics.listen),
            ("state_dir", old.state_dir, new.state_dir),
            ("disk.check_every", old.disk.check_every, new.disk.check_every),
        ):
            if a != b:
                log.warning("reload: %s changed from %r to %r; restart gcd to apply it", key, a, b)
        try:
            change = cycle.compare(old, new, self.engine, self.store, cycle.utcnow())
        except GcdError as e:
            log.warning("reload: cannot compare the old and new plans: %s", e)
            return
        log.info(
            "reload: the new policy removes %d images the old one kept and keeps %d it removed "
            "(%d to remove at the next cycle)",
            change.newly_removed,
            change.newly_kept,
            change.removals,
        )

    # --- text --------------------------------------------------------------------------------

    def _notify(self, *lines: str) -> None:
        # sd_notify wants ASCII, one assignment a line: text from the engine (tags, errors)
        # must not start a line of its own (a "MAINPID=1" in an error message).
        self.notifier.notify("\n".join(_one_line(line) for line in lines))

    def _next_run(self) -> str:
        when = self.trigger.get_next_fire_time(None, datetime.now(UTC))
        return when.astimezone(UTC).strftime("%H:%M:%SZ") if when else "not scheduled"

    def _schedule_text(self) -> str:
        if self.config.schedule.cron:
            return f'cron "{self.config.schedule.cron}" (UTC)'
        every = self.config.schedule.every or timedelta(0)
        return f"every {int(every.total_seconds())}s"

    def _status(self, result: Report) -> str:
        removed = len(result.removed())
        ended = datetime.now(UTC).strftime("%H:%M:%SZ")
        text = (
            f"last cycle {ended}: removed {removed} images, "
            f"{format_bytes(result.reclaimed_bytes)} reclaimed"
        )
        if result.count("skipped") or result.count("failed"):
            text += f", {result.count('skipped')} skipped, {result.count('failed')} failed"
        return f"{text}; next {self._next_run()}"
