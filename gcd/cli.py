"""gcd's command line: main(argv) -> exit code. Plans and reports go to stdout, logs to stderr."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

from gcd import __version__, config, cycle, report
from gcd.errors import ConfigError, EngineUnavailable, GcdError, UsageError
from gcd.model import Plan, Report
from gcd.state import Store

log = logging.getLogger("gcd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcd",
        description="Garbage collector for the local image cache of a Docker engine.",
    )
    parser.add_argument("--version", action="version", version=f"gcd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", metavar="PATH", help="default: $GCD_CONFIG, else /etc/gcd/config.yaml"
        )

    def with_output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("text", "json"), default="text")

    p = sub.add_parser("run", help="one cycle: snapshot, plan, remove, report")
    with_config(p)
    p.add_argument("--dry-run", action="store_true", help="plan and report only; remove nothing")
    with_output(p)
    p = sub.add_parser("plan", help="same as run --dry-run")
    with_config(p)
    with_output(p)
    p = sub.add_parser("explain", help="why each image is kept or removed")
    with_config(p)
    p.add_argument("refs", nargs="+", metavar="REF_OR_ID")
    p = sub.add_parser("check-config", help='validate a configuration; print errors or "ok"')
    p.add_argument("path", nargs="?", metavar="PATH")
    p = sub.add_parser("daemon", help="run cycles on the configured schedule (systemd Type=notify)")
    with_config(p)
    return parser


class _JournalFormatter(logging.Formatter):
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


def _under_journald() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode when stderr is connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{stat.st_dev}:{stat.st_ino}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _under_journald():
        handler.setFormatter(_JournalFormatter("%(message)s"))
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("gcd: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "check-config":
            if config.config_path(args.path) is None:
                raise UsageError(
                    f"no configuration to check: name a file, set $GCD_CONFIG, or create "
                    f"{config.DEFAULT_PATH}"
                )
            for warning in config.load(args.path).warnings:
                print(warning, file=sys.stderr)
            print("ok")
            return 0
        cfg = config.load(args.config)
        for warning in cfg.warnings:
            log.warning("%s", warning)
        if args.command == "explain":
            return _explain(cfg, args.refs)
        if args.command == "daemon":
            from gcd.daemon import Daemon  # APScheduler is loaded for the daemon only

            return Daemon(cfg, config.config_path(args.config)).run()
        if args.command == "plan" or args.dry_run:
            return _plan(cfg, args.output)
        return _run(cfg, args.output)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return e.exit_code
    except GcdError as e:
        print(f"gcd: {e}", file=sys.stderr)
        return e.exit_code


def _dry_plan(cfg: config.Config) -> Plan:
    """Snapshot and plan once, removing nothing (plan, run --dry-run, explain): the state
    store is read when it exists, never created or written."""
    store = Store(cfg.state_dir, writable=False)
    engine = cycle.connect(cfg)
    try:
        plan = cycle.prepare(cfg, engine, store, cycle.utcnow())
    finally:
        engine.close()
        store.close()
    if store.cycle_problem:
        log.warning("%s; images it cannot vouch for count as first seen now", store.cycle_problem)
    return plan


def _plan(cfg: config.Config, output: str) -> int:
    plan = _dry_plan(cfg)
    rendered = report.planned(plan, plan.now)
    print(report.to_json(rendered) if output == "json" else report.to_text(rendered), end="")
    return 0


def _run(cfg: config.Config, output: str) -> int:
    now = cycle.utcnow()
    store = Store(cfg.state_dir)
    engine = cycle.connect(cfg)
    stop = threading.Event()
    started = time.monotonic()

    def on_signal(signum: int, _frame: object) -> None:
        log.warning("%s received: stopping after the current removal", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = cycle.run(cfg, engine, store, now, stop.is_set)
    except EngineUnavailable:
        _write_textfile(cfg, None, time.monotonic() - started)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.close()
        store.close()
    _write_textfile(cfg, result, time.monotonic() - started)
    print(report.to_json(result) if output == "json" else report.to_text(result), end="")
    if result.state_problem:
        print(f"gcd: {result.state_problem}; {cycle.STATE_PROBLEM_EFFECT}", file=sys.stderr)
    lost = next((o for o in result.outcomes.values() if o.code == "engine_down" and o.error), None)
    if lost is not None:
        # The rest of the plan was skipped unsent: the engine, not a removal, failed.
        print(
            f"gcd: {lost.error}; stopped after {len(result.removed())} removals",
            file=sys.stderr,
        )
        return EngineUnavailable.exit_code
    return 1 if result.count("failed") or result.unplanned() or result.state_problem else 0


def _write_textfile(cfg: config.Config, result: Report | None, duration: float) -> None:
    """metrics.textfile: this run's metrics for node_exporter (engine_up 0 if it failed)."""
    if not cfg.metrics.textfile:
        return
    from gcd.metrics import Metrics  # prometheus-client only when a textfile is wanted

    metrics = Metrics()
    if result is None:
        metrics.engine_up.set(0)
        metrics.cycle_ended("error", duration, time.time())
    else:
        metrics.record(result, duration, time.time())
    try:
        metrics.write_textfile(cfg.metrics.textfile)
    except GcdError as e:
        log.error("%s", e)


def _explain(cfg: config.Config, refs: list[str]) -> int:
    plan = _dry_plan(cfg)
    missing = []
    for ref in refs:
        image = plan.snapshot.resolve(ref)
        if image is None:
            missing.append(ref)
            continue
        print(f"{ref}: " + report.explain(plan, image.id), end="")
    if missing:
        raise UsageError(
            f"no image matches {', '.join(missing)} in the engine at {plan.snapshot.engine.url}"
        )
    return 0
