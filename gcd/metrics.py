"""Prometheus metrics in one place: an own registry, record(report) after each cycle,
an HTTP endpoint for the daemon, a node_exporter textfile for one-shot runs."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    write_to_textfile,
)

from gcd import __version__
from gcd.errors import GcdError
from gcd.model import Report, Usage

CYCLE_RESULTS = ("success", "failure", "error", "skipped")
# What started a cycle: the daemon's first, its schedule (and every `gcd run`), disk
# pressure, or a reload (none yet: a reload only compares plans).
CYCLE_TRIGGERS = ("start", "schedule", "pressure", "reload")
REMOVAL_REASONS = ("expired", "dangling", "intermediate", "pressure")
SKIP_REASONS = (
    "gone",
    "in_use",
    "tag_changed",
    "conflict",
    "child_kept",
    "parent_kept",
    "no_tag_left",
    "stopped",
    "engine_down",
)
FAILURE_CODES = ("unplanned",)
IMAGE_STATES = ("keep", "remove", "protected", "dangling")
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
_LISTEN = re.compile(r"\[?(?P<host>[^\[\]]*?)\]?:(?P<port>\d+)")
# /metrics serves this many connections at once, each given this long to send its request:
# one thread per connection without a bound made 2,000 idle connections 2,000 threads
# (+55 MB) and, under a process limit, "can't start new thread" tracebacks. A connection
# beyond the bound is closed at once and counted. Prometheus scrapes one at a time.
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0

log = logging.getLogger(__name__)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # a silent client times out; its thread ends

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not news."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True
    request_queue_size = 128  # accepted, then served or refused: not left to the kernel

    def __init__(
        self, family: socket.AddressFamily, address: tuple[str, int], refused: Any
    ) -> None:
        self.address_family = family
        self.refused = refused
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused.inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread to be had (a process limit): as if full
            self._slots.release()
            self.refused.inc()
            self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer: one debug line, not a traceback on stderr."""
        log.debug("metrics: a connection from %s failed", client_address, exc_info=True)


@dataclass
class Server:
    """A running /metrics endpoint."""

    httpd: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.cycles = Counter(
            "gcd_cycles",
            "Cycles run, by result: success; failure (some removals failed); "
            "error (the cycle could not run, e.g. engine unreachable); skipped (another cycle held the lock); "
            "by trigger: start, schedule, pressure, reload.",
            ["result", "trigger"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            "gcd_cycle_duration_seconds",
            "Wall time of a cycle, snapshot to report.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.last_cycle = Gauge(
            "gcd_last_cycle_timestamp_seconds",
            "Unix time the last cycle ended, whatever its result.",
            registry=r,
        )
        self.last_success = Gauge(
            "gcd_last_success_timestamp_seconds",
            "Unix time the last cycle ended with result success.",
            registry=r,
        )
        self.images_removed = Counter(
            "gcd_images_removed",
            "Images removed, by why: expired (every tag expired), dangling, "
            "intermediate (deleted by the engine with its last child), pressure (disk "
            "pressure took an image the rules keep).",
            ["reason"],
            registry=r,
        )
        self.tags_removed = Counter(
            "gcd_tags_removed",
            "Tags removed (with their image, or untagged), by the rule that expired "
            'them; rule="unmatched" for tags no rule matched.',
            ["rule"],
            registry=r,
        )
        self.bytes_reclaimed = Counter(
            "gcd_bytes_reclaimed",
            "Bytes freed by removals, every shared layer counted once.",
            registry=r,
        )
        self.removals_skipped = Counter(
            "gcd_removals_skipped",
            "Planned removals not carried out, by why: " + ", ".join(SKIP_REASONS) + ".",
            ["reason"],
            registry=r,
        )
        self.removal_failures = Counter(
            "gcd_removal_failures",
            "Removals the engine failed with an error other than 409 or 404.",
            registry=r,
        )
        self.unplanned_removals = Counter(
            "gcd_unplanned_removals",
            "Images the engine deleted during a removal that the plan did not remove "
            "(a tag moved to them mid-removal). Each is an error to look into.",
            registry=r,
        )
        self.tags_restored = Counter(
            "gcd_tags_restored",
            "Tags gcd took from an image the plan did not name (the tag moved there "
            "mid-removal) and put back on it.",
            registry=r,
        )
        self.containers_removed = Counter(
            "gcd_containers_removed",
            "Stopped containers removed (containers.remove_exited_after).",
            registry=r,
        )
        self.disk_used = Gauge(
            "gcd_disk_used_ratio",
            "Used share of the watched filesystem (disk.path) at the last measure, by resource: "
            "bytes (as df counts them) or inodes.",
            ["resource"],
            registry=r,
        )
        self.disk_free = Gauge(
            "gcd_disk_free_bytes",
            "Bytes available on the watched filesystem at the last measure.",
            registry=r,
        )
        self.pressure_active = Gauge(
            "gcd_pressure_active",
            "1 while the last measure was over a high mark (or the budget) and the last "
            "cycle could not plan its way back under the low mark, or has not run yet; else 0.",
            registry=r,
        )
        self.freed_measured = Counter(
            "gcd_bytes_freed_measured",
            "How much the watched filesystem's used bytes dropped over each cycle's "
            "removals (statvfs before and after).",
            registry=r,
        )
        self.freed_accounted = Counter(
            "gcd_bytes_freed_accounted",
            "How much the engine's own count of its image store (/system/df LayersSize) "
            "dropped over each cycle's removals.",
            registry=r,
        )
        self.events_up = Gauge(
            "gcd_events_up",
            "1 while the daemon follows the engine's event stream (container uses), else 0.",
            registry=r,
        )
        self.regrets = Counter(
            "gcd_regret",
            "Tags of images gcd removed that came back within regret_window, by the rule "
            "that expired them.",
            ["rule"],
            registry=r,
        )
        self.build_cache_bytes = Gauge(
            "gcd_build_cache_bytes",
            "Bytes of BuildKit's build cache after the last cycle (build_cache set).",
            registry=r,
        )
        self.build_cache_reclaimed = Counter(
            "gcd_build_cache_reclaimed_bytes",
            "Bytes the engine freed pruning the build cache (build_cache).",
            registry=r,
        )
        self.state_errors = Counter(
            "gcd_state_errors",
            "Cycles whose state store could not be read, trusted or written (a full disk, a "
            "read-only state_dir, a damaged file). Such a cycle counts every image it cannot "
            "vouch for as first seen now, so min_age protects it.",
            registry=r,
        )
        self.images = Gauge(
            "gcd_images",
            "Images in the last plan, by state: keep, remove, protected (a subset of keep), "
            "dangling (untagged without children).",
            ["state"],
            registry=r,
        )
        self.store_bytes = Gauge(
            "gcd_image_store_bytes",
            "Bytes of all image layers in the engine at the last snapshot, each layer once.",
            registry=r,
        )
        self.reclaimable = Gauge(
            "gcd_reclaimable_bytes", "Bytes the last plan would free, each layer once.", registry=r
        )
        self.engine_up = Gauge(
            "gcd_engine_up",
            "1 if the last attempt to talk to the engine succeeded, else 0.",
            registry=r,
        )
        self.listen_failures = Counter(
            "gcd_metrics_listen_failures",
            "Attempts to bind metrics.listen that failed (the port was taken); the daemon "
            "collects anyway and tries again every 5 s.",
            registry=r,
        )
        self.connections_refused = Counter(
            "gcd_metrics_connections_refused",
            f"Connections to /metrics closed unanswered: {MAX_CONNECTIONS} were open already.",
            registry=r,
        )
        self.config_reloads = Counter(
            "gcd_config_reloads",
            "Configuration reloads (SIGHUP), by result: success, failure.",
            ["result"],
            registry=r,
        )
        self.build_info = Gauge(
            "gcd_build_info",
            "Always 1; the labels say which gcd runs, and on which engine (kind: docker, "
            "podman; store: overlay2, containerd, overlay...) once a cycle has read it.",
            ["version", "kind", "store"],
            registry=r,
        )
        self.build_info.labels(__version__, "", "").set(1)
        # Every label value exists from the start, so rate() and absent() behave.
        for result in CYCLE_RESULTS:
            for trigger in CYCLE_TRIGGERS:
                self.cycles.labels(result, trigger)
        for reason in REMOVAL_REASONS:
            self.images_removed.labels(reason)
        for reason in SKIP_REASONS:
            self.removals_skipped.labels(reason)
        for state in IMAGE_STATES:
            self.images.labels(state)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def record(
        self, report: Report, duration: float, ended: float, trigger: str = "schedule"
    ) -> None:
        """Count one completed cycle (a dry run only sets the plan gauges)."""
        plan = report.plan
        snapshot = plan.snapshot
        engine = snapshot.engine
        self.build_info.clear()
        self.build_info.labels(__version__, engine.kind, engine.store).set(1)
        lost = any(o.code == "engine_down" for o in report.outcomes.values()) or any(
            o.code == "engine_down" for o in report.container_outcomes.values()
        )
        self.engine_up.set(0 if lost else 1)
        self.images.labels("keep").set(sum(1 for d in plan.decisions if d.action == "keep"))
        self.images.labels("remove").set(sum(1 for d in plan.decisions if d.action == "remove"))
        self.images.labels("protected").set(sum(1 for d in plan.decisions if d.protected))
        self.images.labels("dangling").set(sum(1 for d in plan.decisions if d.dangling))
        self.store_bytes.set(sum(snapshot.freed_bytes({i.id for i in snapshot.images}).values()))
        self.reclaimable.set(plan.reclaimable_bytes)
        self.disk(report.disk_after or plan.disk)
        self.pressure_active.set(1 if plan.pressure is not None and report.short_of_low() else 0)
        cache, pruned = plan.build_cache, report.build_cache
        if cache is not None and cache.available:
            freed = pruned.reclaimed if pruned is not None and not report.dry_run else 0
            self.build_cache_bytes.set(max(0, cache.bytes - freed))
        if report.dry_run:
            return
        for d in plan.decisions:
            o = report.outcome(d.image_id)
            if o.status == "skipped" and o.code:
                self.removals_skipped.labels(o.code).inc()
            elif o.status == "failed" and o.code not in FAILURE_CODES:
                self.removal_failures.inc()
            rule_of: dict[str, str] = {}
            for tag, rule in d.expired:
                rule_of.setdefault(tag, rule)
            # Exactly the tags that went, also from an image only partly untagged.
            for tag in o.untagged:
                self.tags_removed.labels(rule_of.get(tag, "unmatched")).inc()
            if o.status == "done" and d.action == "remove":
                reason = (
                    "pressure"
                    if d.evicted
                    else "expired"
                    if d.tags
                    else ("intermediate" if snapshot.children(d.image_id) else "dangling")
                )
                self.images_removed.labels(reason).inc()
        if report.state_problem:
            self.state_errors.inc()
        self.unplanned_removals.inc(len(report.unplanned()))
        self.tags_restored.inc(len(report.restored()))
        self.bytes_reclaimed.inc(report.reclaimed_bytes)
        self.containers_removed.inc(report.containers_removed())
        self.freed_measured.inc(report.freed_measured())
        self.freed_accounted.inc(report.freed_accounted() or 0)
        for regret in report.regrets:
            self.regrets.labels(regret.rule).inc()
        if report.build_cache is not None:
            self.build_cache_reclaimed.inc(report.build_cache.reclaimed)
        failed = report.failed()
        result = "failure" if failed else "success"
        self.cycle_ended(result, duration, ended, trigger)

    def disk(self, usage: Usage | None) -> None:
        """The watched filesystem's gauges, from a measure (a cycle's or the daemon's)."""
        if usage is not None:
            self.disk_used.labels("bytes").set(usage.bytes_ratio)
            self.disk_used.labels("inodes").set(usage.inodes_ratio)
            self.disk_free.set(usage.avail_bytes)

    def cycle_ended(
        self, result: str, duration: float, ended: float, trigger: str = "schedule"
    ) -> None:
        self.cycles.labels(result, trigger).inc()
        self.cycle_duration.observe(duration)
        self.last_cycle.set(ended)
        if result == "success":
            self.last_success.set(ended)

    def serve(self, listen: str) -> Server:
        """Serve /metrics on `host:port` (the config's metrics.listen)."""
        match = _LISTEN.fullmatch(listen)
        if match is None:
            raise GcdError(f"metrics.listen {listen!r} is not host:port")
        host, port = match["host"] or "0.0.0.0", int(match["port"])
        try:
            family, _, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            bound = (str(address[0]), int(address[1]))
            httpd = _BoundedServer(family, bound, self.connections_refused)
        except OSError as e:
            raise GcdError(f"cannot serve metrics on {listen}: {e.strerror}") from None
        httpd.set_app(make_wsgi_app(self.registry))
        thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
        thread.start()
        return Server(httpd, thread)

    def write_textfile(self, path: str) -> None:
        """Write every metric to `path` atomically (a temporary file renamed over it)."""
        try:
            write_to_textfile(path, self.registry)
            # node_exporter runs as another user: readable by all, whatever gcd's umask
            # (the systemd units set 0077).
            os.chmod(path, 0o644)
        except OSError as e:
            raise GcdError(f"cannot write metrics.textfile {path}: {e.strerror}") from None
