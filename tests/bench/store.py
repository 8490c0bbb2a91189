"""A realistic build-host image store, generated offline into an engine with `docker load`.

N images over 100 repositories: numbered CI builds (`build-<n>`), semver
releases on some builds, branch builds (`<branch>-<n>`), a `latest` per repository, about 5%
dangling images; every image shares one of three base stacks (busybox + runtime layers) and
adds a small layer of its own. Containers: `containers` of them, a fifth running.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import docker

from tests.images import Layer, Spec, busybox_layer, load

BASES = [
    [busybox_layer(), Layer(f"runtime-{b}", 200_000), Layer(f"deps-{b}", 100_000)] for b in range(3)
]


@dataclass
class Store:
    specs: list[Spec]
    expired: list[str]  # tags the benchmark policy expires (for the removal benchmark)


def generate(n: int, seed: int = 7, now: datetime | None = None) -> list[Spec]:
    rnd = random.Random(seed)
    now = now or datetime.now(UTC)
    repos = 100  # fixed, so generate(n) is a prefix of generate(m) for m > n (but `latest`)
    specs: list[Spec] = []
    for i in range(n):
        repo = f"registry.example.com/team{i % repos % 7}/svc{i % repos}"
        build = i // repos + 1
        created = now - timedelta(days=400) + timedelta(minutes=5 * i)  # 100,000 images: 347 days
        kind = rnd.random()
        if kind < 0.05:
            tags: list[str] = []  # dangling
        elif kind < 0.60:
            tags = [f"{repo}:build-{build}"]
        elif kind < 0.80:
            tags = [f"{repo}:build-{build}", f"{repo}:1.{build // 10}.{build % 10}"]
        else:
            tags = [f"{repo}:{rnd.choice(['main', 'dev', 'feat-x', 'fix-y'])}-{build}"]
        layers = [*BASES[i % 3], Layer(f"app-{i}", 1000)]
        specs.append(Spec(tags, layers, created, labels={"org.example.build": str(i)}))
    # `latest` on the newest tagged build of each repository
    newest: dict[str, Spec] = {}
    for spec in specs:
        if spec.tags:
            newest[spec.tags[0].rpartition(":")[0]] = spec
    for repo, spec in newest.items():
        spec.tags = [*spec.tags, f"{repo}:latest"]
    return specs


def populate(
    client: docker.APIClient,
    n: int,
    containers: int = 0,
    skip: int = 0,
    now: datetime | None = None,
    batch: int = 500,
) -> list[str]:
    """Load images skip..n of a generated store; create `containers` containers on random
    tagged images, a fifth of them running."""
    specs = generate(n, now=now)
    ids: list[str] = []
    for start in range(skip, len(specs), batch):
        ids += load(client, specs[start : start + batch])
    rnd = random.Random(11 + skip)
    none = client.create_host_config(network_mode="none")
    tagged = [s for s in specs if s.tags]
    for c in range(containers):
        spec = rnd.choice(tagged)
        running = c % 5 == 0
        command = ["/bin/busybox", "sleep", "86400"] if running else ["/bin/busybox", "true"]
        container = client.create_container(spec.tags[0], command, host_config=none)
        if running:
            client.start(container)
    return ids
