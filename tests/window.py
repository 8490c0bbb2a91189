"""Measure the windows the Engine API leaves open: the time from gcd's re-read of what an image
or a tag is to the DELETE that acts on it, on a private engine (no proxy).

    sudo .venv/bin/python -m tests.window [--images 300]

- by ID: the re-read of an image (GET /images/{id}/json, or the image list where the engine
  deletes parents under children) answered to its DELETE sent. A removal by ID is atomic in
  the engine; the window only matters if, inside it, the image's own tags all move away and it
  gets a new one (gcd then reports the removal as unplanned).
- by name: the re-read of a tag's target answered to the DELETE of that tag sent (the other
  tags of a multi-tag image). A rebuild that takes the tag inside it loses the tag (gcd puts
  it back) or, if the tag was its only one, the image (gcd reports it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

import docker

from gcd import config as gcd_config
from gcd import cycle
from gcd.engine import DockerEngine
from gcd.model import Deletion, Recheck
from gcd.state import Store
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load

POLICY = r"""
version: 1
safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false, max_removals_per_run: 100000}
rules:
  - {name: all, match: {tag: '(?P<n>\d+)'}, order_by: numeric(n), keep_last: 1}
"""


class Timed(DockerEngine):
    """Notes when each re-read was sent and answered, and each DELETE sent and answered.
    The engine read its state somewhere inside the first pair and checks the DELETE
    somewhere inside the second: the window lies between the two bounds printed."""

    def __init__(self, url: str) -> None:
        super().__init__(url, 60)
        self.read: dict[str, tuple[int, int]] = {}
        self.windows: dict[str, list[tuple[float, float]]] = {"by ID": [], "by name": []}

    def recheck(self, image_id: str, since: int | None = None) -> Recheck | None:
        sent = time.time_ns()
        answer = super().recheck(image_id, since)
        # On a listing store the list may have begun a little later, or earlier (a shared
        # one under way at the call): from when it began.
        began = answer.read_ns if answer is not None and answer.read_ns else sent
        self.read[image_id] = (began, time.time_ns())
        return answer

    def target(self, ref: str) -> str | None:
        sent = time.time_ns()
        answer = super().target(ref)
        self.read[ref] = (sent, time.time_ns())
        return answer

    def delete(self, ref: str) -> Deletion:
        deletion = super().delete(ref)
        if ref in self.read:
            kind = "by ID" if ref.startswith("sha256:") else "by name"
            read_sent, read_answered = self.read[ref]
            low = (deletion.sent_ns - read_answered) / 1e6
            high = (deletion.answered_ns - read_sent) / 1e6
            self.windows[kind].append((low, high))
        return deletion


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.window", description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    when = datetime(2026, 1, 1, tzinfo=UTC)
    with PrivateEngine() as engine:
        client = docker.APIClient(base_url=engine.url, version="auto", timeout=120)
        half = args.images // 2
        specs = [Spec([f"one:{n}"], [Layer(f"one-{n}", 100)], when) for n in range(half)]
        specs += [
            Spec([f"two:{n}", f"alias:{n}"], [Layer(f"two-{n}", 100)], when)
            for n in range(args.images - half)
        ]
        load(client, specs)
        timed = Timed(engine.url)
        store = Store(f"{engine.root}/state")
        cfg = gcd_config.parse(POLICY, "window.yaml")
        report = cycle.run(cfg, timed, store, cycle.utcnow())
        print(
            f"{len(report.removed())} images removed on Docker {report.plan.snapshot.engine.server_version}"
        )
        for kind, pairs in timed.windows.items():
            if not pairs:
                print(f"window {kind}: no delete measured")
                continue
            lows, highs = sorted(p[0] for p in pairs), sorted(p[1] for p in pairs)
            p99 = min(len(pairs) - 1, int(len(pairs) * 0.99))
            print(
                f"window {kind} over {len(pairs)} deletes: at least {statistics.median(lows):.3f}"
                f" ms, at most {statistics.median(highs):.3f} ms (median); at most "
                f"{highs[p99]:.3f} ms (p99), {highs[-1]:.3f} ms (max)"
            )
        store.close()
        timed.close()
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
