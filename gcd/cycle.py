"""One cycle, shared by `gcd run`, `gcd plan` and the daemon: snapshot, plan, execute."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from gcd import executor, policy
from gcd.config import Config
from gcd.engine import DockerEngine, Engine
from gcd.model import Plan, Report
from gcd.state import Store


def utcnow() -> datetime:
    return datetime.now(UTC)


def connect(config: Config) -> DockerEngine:
    return DockerEngine(config.engine_url(), config.engine.timeout.total_seconds())


def prepare(config: Config, engine: Engine, store: Store, now: datetime) -> Plan:
    """Snapshot the engine, record what it shows, and plan. Removes nothing."""
    snapshot, learned = engine.snapshot(store.facts())
    state = store.observe(snapshot, learned, now)
    return policy.plan(snapshot, config, state, now)


def run(
    config: Config,
    engine: Engine,
    store: Store,
    now: datetime,
    stop: Callable[[], bool] = lambda: False,
) -> Report:
    """A whole cycle: prepare, then carry the plan out."""
    plan = prepare(config, engine, store, now)
    return executor.execute(plan, engine, now, stop)
