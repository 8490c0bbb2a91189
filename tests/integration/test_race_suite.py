"""The race suite, CI-sized: 100 interleavings of gcd's cycles with a busy build host.

The long run is one command: `sudo .venv/bin/python -m tests.race --rounds 1000` (see
tests/race.py and docs/reliability.md).
"""

from __future__ import annotations

import os
import random

import docker

from tests import race
from tests.dockerd import PrivateEngine


def test_no_cycle_removes_what_it_must_keep_while_the_host_builds(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    seed = int(os.environ.get("GCD_RACE_SEED") or random.randrange(1 << 30))
    lines: list[str] = []
    figures = race.run(dockerd, 100, seed, out=lines.append)
    summary = f"seed {seed} (GCD_RACE_SEED={seed} replays it): {figures.line()}"
    assert figures.wrong == [], "\n".join([summary, *lines, *figures.wrong])
    # The suite did race: gcd removed images while the actors kept the engine busy.
    assert figures.removed > 50, summary
    assert figures.actions["loads"] > 50 and figures.actions["containers"] > 50, summary
