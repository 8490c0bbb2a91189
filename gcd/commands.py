"""What each command does, once the command line is parsed (cli.py). Plans and reports go
to stdout, logs to stderr."""

from __future__ import annotations

import logging
import signal
import sys
import time

from gcd import config, cycle, report
from gcd.errors import EngineUnavailable, GcdError, Stopped, UsageError
from gcd.model import ContainerOutcome, Outcome, Plan, Report
from gcd.signals import HELD, Held
from gcd.state import Store

log = logging.getLogger("gcd")


def check_config(path: str | None) -> int:
    if config.config_path(path) is None:
        raise UsageError(
            f"no configuration to check: name a file, set $GCD_CONFIG, or create "
            f"{config.DEFAULT_PATH}"
        )
    for warning in config.load(path).warnings:
        print(warning, file=sys.stderr)
    print("ok")
    return 0


def schema() -> int:
    """The configuration's JSON Schema, from the options' declarations (config.schema)."""
    import json

    print(json.dumps(config.schema(), indent=2))
    return 0


def load(path: str | None) -> config.Config:
    """The configuration a command runs with; its warnings are logged."""
    cfg = config.load(path)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    return cfg


def daemon(path: str | None, held: Held) -> int:
    from gcd.daemon import Daemon  # APScheduler is loaded for the daemon only

    return Daemon(load(path), config.config_path(path)).run(held)


def dry_plan(cfg: config.Config) -> Plan:
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


def plan(cfg: config.Config, output: str) -> int:
    plan = dry_plan(cfg)
    rendered = report.planned(plan, plan.now)
    print(report.to_json(rendered) if output == "json" else report.to_text(rendered), end="")
    return 0


def run(cfg: config.Config, output: str, held: Held) -> int:
    now = cycle.utcnow()
    store = Store(cfg.state_dir)
    engine = cycle.connect(cfg)
    # Appended to by the signal handler, which takes no lock: the next signal may interrupt
    # it, and one waiting for a lock its interrupted self holds never returns.
    received: list[int] = []
    started = time.monotonic()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) == 1:  # said once however many come (Ctrl-C pressed again)
            name = signal.Signals(signum).name
            log.warning("%s received: stopping after the current removal", name)

    # A hangup too: the terminal that started the run went away.
    held.take_over(on_signal)
    try:
        if received:  # it came while gcd started
            raise Stopped("stopped before the cycle began; nothing removed")
        result = cycle.run(cfg, engine, store, now, lambda: bool(received))
        if received:
            # The stop asked for has happened: more of the same (Ctrl-C pressed again, a
            # burst) must not end the process as it reports, nor as Python shuts down (it
            # restores the default handler then, but leaves an ignored signal ignored).
            for s in HELD:
                signal.signal(s, signal.SIG_IGN)
    except EngineUnavailable:
        write_textfile(cfg, None, time.monotonic() - started)
        raise
    finally:
        engine.close()
        store.close()
    write_textfile(cfg, result, time.monotonic() - started)
    print(report.to_json(result) if output == "json" else report.to_text(result), end="")
    if result.state_problem:
        print(f"gcd: {result.state_problem}; {cycle.STATE_PROBLEM_EFFECT}", file=sys.stderr)
    outcomes: list[Outcome | ContainerOutcome] = [
        *result.container_outcomes.values(),
        *result.outcomes.values(),
    ]
    lost = next((o for o in outcomes if o.code == "engine_down" and o.error), None)
    if lost is not None:
        # The rest of the plan was skipped unsent: the engine, not a removal, failed.
        print(
            f"gcd: {lost.error}; stopped after {len(result.removed())} removals",
            file=sys.stderr,
        )
        return EngineUnavailable.exit_code
    return 1 if result.failed() else 0


def write_textfile(cfg: config.Config, result: Report | None, duration: float) -> None:
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


def explain(cfg: config.Config, refs: list[str]) -> int:
    plan = dry_plan(cfg)
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
