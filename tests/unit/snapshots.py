"""In-memory snapshots for planner unit tests (the planner is pure: no engine needed)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from gcd import config as gcd_config
from gcd.config import Config
from gcd.model import Container, EngineInfo, Image, Snapshot, StateView

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
ENGINE = EngineInfo("unix:///test.sock", "26.1.5", "1.45")


def iid(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def image(
    name: str,
    tags: Sequence[str] = (),
    *,
    parent: str | None = None,
    age: timedelta = timedelta(days=30),
    tagged_age: timedelta | None = None,
    labels: dict[str, str] | None = None,
    digests: Sequence[str] = (),
    layers: Sequence[tuple[str, int]] | None = None,
) -> Image:
    """An image called `name` (its ID derives from it), created `age` ago."""
    own = layers if layers is not None else [(f"layer-{name}", 1000)]
    return Image(
        id=iid(name),
        tags=tuple(sorted(tags)),
        digests=tuple(digests),
        parent=iid(parent) if parent else None,
        created=NOW - age,
        size=sum(s for _, s in own),
        labels=labels or {},
        last_tag_time=NOW - tagged_age if tagged_age is not None else None,
        layers=tuple(lay for lay, _ in own),
        layer_sizes=tuple(s for _, s in own),
    )


def container(name: str, image_name: str, state: str = "running") -> Container:
    return Container(iid(name), name, iid(image_name), image_name, state, NOW - timedelta(hours=1))


def snapshot(images: Sequence[Image], containers: Sequence[Container] = ()) -> Snapshot:
    return Snapshot(ENGINE, tuple(images), tuple(containers))


def cfg(body: str = "") -> Config:
    """A config with guards off unless `body` sets them (tests set what they test)."""
    base = "version: 1\nsafety: {min_age: 1h, max_removal_fraction: 1.0, keep_one_per_repository: false}\n"
    if "safety:" in body:
        base = "version: 1\n"
    return gcd_config.parse(base + body, "test.yaml")


def state(
    new_store: bool = False,
    first_seen: dict[str, timedelta] | None = None,
    dangling_since: dict[str, timedelta] | None = None,
    last_used: dict[str, timedelta] | None = None,
    tagged: dict[str, timedelta] | None = None,
) -> StateView:
    """A state view; times are given as `name: how long ago`."""

    def times(d: dict[str, timedelta] | None) -> dict[str, datetime]:
        return {iid(k): NOW - v for k, v in (d or {}).items()}

    return StateView(
        new_store, times(first_seen), times(dangling_since), times(last_used), times(tagged)
    )
