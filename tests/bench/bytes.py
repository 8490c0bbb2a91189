"""gcd's planned bytes against the drop in the engine's own count, in a few build-host shapes.

    GCD_TEST_ENGINE=docker28-containerd .venv/bin/python -m tests.bench.bytes [WORD ...]

starts a private engine of that kind (tests/engines.py), and for each shape loads or builds
the images, runs `gcd run` and prints the bytes gcd planned beside how much `/system/df`
LayersSize dropped, read once the engine's garbage collection has settled (on the
containerd store a build's leftover snapshots go some time after it). Words given run only
the shapes whose names hold one of them (`compressed`). The figures are in docs/engines.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import docker

from tests.dockerd import PrivateEngine
from tests.images import (
    Layer,
    Spec,
    buildkit_build,
    buildkit_builds_offline,
    busybox_layer,
    legacy_build,
    load,
)
from tests.integration.conftest import Gcd, _wipe

WHEN = datetime(2026, 3, 1, tzinfo=UTC)
GUARDS = "safety: {min_age: 0s, max_removal_fraction: 1.0}\ndangling: {min_age: 0s}\n"
SHARED = Layer("shared", 400_000)
Shape = Callable[[docker.APIClient], None]  # loads or builds images into the engine


def settled(api: docker.APIClient) -> int:
    """LayersSize once two reads a second apart agree."""
    last = int(api.df()["LayersSize"])
    while True:
        time.sleep(1)
        now = int(api.df()["LayersSize"])
        if now == last:
            return now
        last = now


def at(second: int) -> datetime:
    return datetime(2026, 3, 2, 0, second // 60, second % 60, tzinfo=UTC)


def builds(api: docker.APIClient, own: int, count: int) -> None:
    load(
        api,
        [
            Spec([f"app:{n:03d}"], [busybox_layer(), SHARED, Layer(f"app-{n}", own)], at(n))
            for n in range(count)
        ],
    )


def based(api: docker.APIClient) -> None:
    load(api, [Spec(["base:1"], [busybox_layer(), SHARED], WHEN)])
    builds(api, 300_000, 20)


def legacy(api: docker.APIClient) -> None:
    for n in range(5):
        legacy_build(api, [f"app:{n:03d}"], {"a": "same", "b": f"own {n}" * 20000})


def mixed(api: docker.APIClient) -> None:
    """One layer twice in the content store: busybox loaded as it is and built compressed."""
    builds(api, 300_000, 3)
    for n in range(3, 6):
        legacy_build(api, [f"app:{n:03d}"], {"b": f"own {n}" * 50000})


def compressed(shared: list[Layer], own: Callable[[int], Layer], base: bool = False) -> Shape:
    """Three images loaded with gzip-compressed layers, as pulled images' blobs are: layers
    that compress very differently (a binary, a repeated text, random bytes). With `base`,
    an image of the shared layers alone is loaded too (a build host's base image)."""

    def make(api: docker.APIClient) -> None:
        specs = [Spec([f"app:{n:03d}"], [*shared, own(n)], at(n)) for n in range(3)]
        bases = [Spec(["base:1"], shared, WHEN)] if base else []
        load(api, bases + specs, gzipped=True)

    return make


def buildkit(api: docker.APIClient) -> None:
    common = os.urandom(2_000_000)
    for n in range(6):
        buildkit_build(api, f"app:{n:03d}", {"common": common, "own": os.urandom(500_000)})
        time.sleep(1.1)  # an order by creation time


SHAPES: list[tuple[str, Shape, int]] = [
    ("3 loaded images sharing 2.4 MB, 10 kB own (the suite's)", lambda a: builds(a, 10_000, 3), 1),
    ("3 loaded images sharing 2.4 MB, 5 MB own", lambda a: builds(a, 5_000_000, 3), 1),
    ("100 loaded builds sharing 2.4 MB, 1 MB own", lambda a: builds(a, 1_000_000, 100), 10),
    ("a base image, then 20 builds on it, 300 kB own", based, 5),
    ("5 legacy builds (their intermediates go with them)", legacy, 2),
    ("6 BuildKit builds sharing a 2 MB COPY, 500 kB own", buildkit, 2),
    ("3 loaded images and 3 legacy builds with one base layer", mixed, 2),
    (
        "3 compressed: busybox and 400 kB text shared, 1 MB random own",
        compressed([busybox_layer(), SHARED], lambda n: Layer(f"own-{n}", 1_000_000, random=True)),
        1,
    ),
    (
        "3 compressed: 1 MB random shared, 2 MB text own",
        compressed([Layer("rnd", 1_000_000, random=True)], lambda n: Layer(f"own-{n}", 2_000_000)),
        1,
    ),
    (
        "3 compressed, 1 MB random shared, 2 MB text own, their base image loaded too",
        compressed(
            [Layer("rnd", 1_000_000, random=True)], lambda n: Layer(f"mine-{n}", 2_000_000), True
        ),
        1,
    ),
]


def main() -> None:
    engine = PrivateEngine()
    engine.start()
    try:
        api = docker.APIClient(base_url=engine.url, version="auto", timeout=300)
        print(f"{api.version()['Version']}, {api.info()['Driver']}")
        gcd = Gcd(engine.url, Path(tempfile.mkdtemp(prefix="gcd-bytes-")))
        for name, make, keep in SHAPES:
            if sys.argv[1:] and not any(word in name for word in sys.argv[1:]):
                continue
            if make is buildkit and not buildkit_builds_offline(api):
                continue
            _wipe(api)
            make(api)
            before = settled(api)
            rules = f"rules:\n  - {{name: app, match: {{repository: app}}, keep_last: {keep}}}\n"
            run = gcd.json("run", "--config", str(gcd.config(GUARDS + rules)))
            drop = before - settled(api)
            planned = run["summary"]["reclaimable_bytes"]
            removed = sum(d["decision"] == "remove" for d in run["decisions"])
            off = (planned - drop) / drop if drop else 0.0
            print(
                f"{name:<56} {removed:>3} removed  planned {planned:>11,}  "
                f"engine {drop:>11,}  {off:+.2%}",
                flush=True,
            )
    finally:
        engine.cleanup()


if __name__ == "__main__":
    main()
