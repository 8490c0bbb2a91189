"""The race suite: gcd's cycles against a busy build host, judged by the engine's own log.

Actors rebuild and retag images (loads, legacy builds, BuildKit builds), promote builds to
`app:stable` (protected), and create and remove containers, all the time, straight on the
engine. gcd runs one cycle after another through the fault proxy, which holds each of its
requests for a random moment so that the actors land inside gcd's windows. After every cycle
(one interleaving) an oracle reads the engine's event log for the cycle's time and checks
every image the engine deleted or untagged:

- a deleted image was planned for removal by that cycle's plan (not kept, not unknown);
- it was not in use (no container of it existed at that moment, by the actors' own log);
- it did not carry `app:stable` at that moment (by the engine's tag events);
- an image untagged was one gcd acted on, or one gcd itself reported (a tag put back, or
  an unplanned removal: the one racy step, a multi-tag image's other tags).

Run it long: `sudo .venv/bin/python -m tests.race --rounds 1000` (a private engine of its
own); the seed is printed, and `--seed` replays the random choices (timing still varies).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker

from gcd import config as gcd_config
from gcd import cycle
from gcd.engine import DockerEngine
from gcd.model import ImageEvent, Report, familiar, short_id
from gcd.state import Store
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, busybox_layer, legacy_build, load
from tests.proxy import Delay, FaultProxy

POLICY = r"""
version: 1
safety: {min_age: 0s, max_removal_fraction: 1.0, keep_one_per_repository: false}
dangling: {min_age: 0s}
protect:
  - tag: stable
rules:
  - name: builds
    match: {repository: app, tag: '(?P<n>\d+)'}
    order_by: numeric(n)
    keep_last: 2
unmatched: expire
"""
STABLE = "app:stable"
DOCKER_CLI = "/usr/bin/docker"  # Debian's docker.io client builds with BuildKit by itself
# Loads the containerd store fails by itself: a delete's content collection takes what a
# load is unpacking (reproduced with plain deletes, no gcd); two loads naming one tag at
# once (the two loaders: `image "docker.io/library/app:3": already exists`).
_ENGINE_LOAD_RACES = ("failed to unpack loaded image", '": already exists')
_ID = re.compile(r"(sha256:)?[0-9a-f]{64}")


@dataclass
class Figures:
    rounds: int = 0
    removed: int = 0
    untagged_by_name: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    detected_unplanned: int = 0
    restored: int = 0
    delete_events_kept: int = 0  # `delete` events of images still there after the cycle
    untag_deletes: int = 0  # Podman's `delete` events that name a tag: an untag's echo
    # Podman: images deleted while a container's removal was under way (see Oracle._deleted).
    users_leaving: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        acts = ", ".join(f"{k} {v}" for k, v in sorted(self.actions.items()))
        return (
            f"{self.rounds} interleavings; {self.removed} images removed, "
            f"{self.untagged_by_name} tags untagged by name; skipped: {skipped}; "
            f"failed {self.failed}; unplanned removals reported {self.detected_unplanned}; "
            f"tags put back {self.restored}; delete events of images still there "
            f"{self.delete_events_kept}; Podman's delete events of untags {self.untag_deletes}; "
            f"deleted while their last container was being removed {self.users_leaving}; "
            f"wrong removals {len(self.wrong)}; actors: {acts}"
        )


@dataclass
class _Use:
    container: str
    image_id: str
    created_ns: int  # the container existed from here
    removed_ns: int | None = None  # until here (the remove request started)


class Actors:
    """Threads that keep the engine busy the way CI jobs do."""

    def __init__(self, url: str, seed: int, pace: float = 0.05) -> None:
        self.url = url
        self.seed = seed
        self.pace = pace  # the longest wait between two actions of one actor, seconds
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.uses: list[_Use] = []
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._tmp = tempfile.mkdtemp(prefix="gcd-race-")

    def start(self) -> None:
        actors: list[Callable[[docker.APIClient, random.Random], None]] = [
            self.loader,
            self.loader,
            self.promoter,
            self.runner,
            self.runner,
            self.legacy_builder,
        ]
        if self._buildkit_works():
            actors.append(self.buildkit_builder)
        else:  # Debian 13's client needs docker-buildx for BuildKit: the suite goes without
            self.counts["buildkit unavailable"] = 1
        for n, actor in enumerate(actors):
            thread = threading.Thread(target=self._loop, args=(actor, n), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _buildkit_works(self) -> bool:
        if not os.path.exists(DOCKER_CLI):
            return False
        client = docker.APIClient(base_url=self.url, version="auto", timeout=120)
        try:
            self.buildkit_builder(client, random.Random(self.seed))
            return True
        except subprocess.SubprocessError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(60)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _loop(self, actor: Callable[[docker.APIClient, random.Random], None], n: int) -> None:
        client = docker.APIClient(base_url=self.url, version="auto", timeout=120)
        rng = random.Random(self.seed * 100 + n)
        while not self.stopping.is_set():
            try:
                actor(client, rng)
            except docker.errors.APIError as e:
                # A race lost against gcd (the image just went): CI would retry.
                with self.lock:
                    self.counts[f"{actor.__name__} refused"] += 1
                del e
            except Exception as e:
                with self.lock:
                    self.errors.append(f"{actor.__name__}: {type(e).__name__}: {e}")
            self.stopping.wait(rng.uniform(0.0, self.pace))

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def loader(self, client: docker.APIClient, rng: random.Random) -> None:
        """`docker load` of a rebuild: the tag moves to a new image (sometimes two tags)."""
        n = rng.randint(1, 8)
        tags = [f"app:{n}"] + ([f"alias:{n}"] if rng.random() < 0.4 else [])
        note = f"{self.seed}-{rng.random()}"
        load(client, [Spec(tags, [busybox_layer(), Layer(f"build-{note}")], note=note)])
        self._count("loads")

    def promoter(self, client: docker.APIClient, rng: random.Random) -> None:
        """`docker tag app:N app:stable`, and `docker tag app:N alias:N` (multi-tag images)."""
        n = rng.randint(1, 8)
        if rng.random() < 0.3:
            client.tag(f"app:{n}", "app", "stable")
            self._count("promotions")
        else:
            client.tag(f"app:{n}", "alias", str(n))
            self._count("aliases")

    def runner(self, client: docker.APIClient, rng: random.Random) -> None:
        """`docker create` of a build (by tag or by ID), kept a moment, then removed."""
        images = client.images(all=True)
        if not images:
            return
        image = rng.choice(images)
        ref = rng.choice(
            [*(t for t in image.get("RepoTags") or () if "<none>" not in t), image["Id"]]
        )
        none = client.create_host_config(network_mode="none")
        created = client.create_container(ref, ["/bin/busybox", "true"], host_config=none)
        image_id = client.inspect_container(created["Id"])["Image"]
        use = _Use(created["Id"][:12], image_id, time.time_ns())
        with self.lock:
            self.uses.append(use)
        self._count("containers")
        self.stopping.wait(rng.uniform(0.0, 0.3))
        use.removed_ns = time.time_ns()
        client.remove_container(created["Id"], force=True)

    def legacy_builder(self, client: docker.APIClient, rng: random.Random) -> None:
        """`DOCKER_BUILDKIT=0 docker build -t legacy:K`: intermediate parents, tags moving."""
        k = rng.randint(1, 3)
        legacy_build(client, [f"legacy:{k}"], {"step": f"{self.seed}-{rng.random()}"})
        self._count("legacy builds")

    def buildkit_builder(self, client: docker.APIClient, rng: random.Random) -> None:
        """`DOCKER_BUILDKIT=1 docker build -t bk:K` through the docker CLI."""
        context = Path(self._tmp) / f"bk-{rng.random()}"
        context.mkdir()
        (context / "f").write_text(f"{self.seed}-{rng.random()}")
        (context / "Dockerfile").write_text("FROM scratch\nCOPY f /f\n")
        k = rng.randint(1, 3)
        subprocess.run(
            [DOCKER_CLI, "build", "-q", "--network", "none", "-t", f"bk:{k}", str(context)],
            env={**os.environ, "DOCKER_HOST": self.url, "DOCKER_BUILDKIT": "1"},
            check=True,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(context, ignore_errors=True)
        self._count("buildkit builds")

    def user(self, image_id: str, at_ns: int) -> _Use | None:
        """A container of the actors' that existed at `at_ns` and was made from this image."""
        with self.lock:
            return next(
                (
                    u
                    for u in self.uses
                    if u.image_id == image_id
                    and u.created_ns < at_ns
                    and (u.removed_ns is None or u.removed_ns > at_ns)
                ),
                None,
            )


class Oracle:
    """Judges each cycle by the engine's events; keeps who holds `app:stable`."""

    def __init__(self, actors: Actors, proxy: FaultProxy, direct: DockerEngine) -> None:
        self.actors = actors
        self.proxy = proxy
        self.direct = direct
        self.stable: str | None = None

    def _sent(self, at_ns: int) -> int:
        """When the engine got the DELETE that deleted an image at `at_ns`: the earliest of
        the DELETEs in flight then. dockerd checks for containers when a DELETE arrives, but
        does not lock image removal against a `docker create` already under way; a
        container made after that moment is the engine's own race, not a removal gcd
        could have seen."""
        return min((s for s, _ in self._in_flight(at_ns)), default=at_ns)

    def _answered(self, at_ns: int) -> int:
        """When the DELETEs in flight at `at_ns` were answered: by then the image was gone."""
        return max((a for _, a in self._in_flight(at_ns)), default=at_ns)

    def _listed(self, started_ns: int) -> int:
        """When the snapshot's image list was sent (the cycle's first)."""
        with self.proxy._lock:
            return min(
                (
                    s
                    for m, p, s, _ in self.proxy.forwarded
                    if m == "GET" and "/images/json?" in p and s >= started_ns
                ),
                default=started_ns,
            )

    def _in_flight(self, at_ns: int) -> list[tuple[int, int]]:
        with self.proxy._lock:
            return [
                (s, a) for m, _, s, a in self.proxy.forwarded if m == "DELETE" and s <= at_ns <= a
            ]

    def judge(
        self, report: Report, events: tuple[ImageEvent, ...], figures: Figures, started_ns: int
    ) -> None:
        plan = report.plan
        # Who holds app:stable, as the cycle's own image list saw it; then by the events
        # after that list was sent. (An event missed between two windows, one the engine
        # published late, would otherwise leave an old holder here for good.)
        listed_ns = self._listed(started_ns)
        self.stable = next(
            (i.id for i in plan.snapshot.images if STABLE in map(familiar, i.tags)), None
        )
        acting = {d.image_id for d in plan.decisions if d.action == "remove" or d.untag}
        unplanned = set(report.unplanned())
        # What gcd said: tags put back, and tags it took but could not put back (the tag
        # had moved on again); each names the image by its short ID.
        restored = " ".join(report.restored()) + " ".join(
            o.error for o in report.outcomes.values() if o.error
        )
        for e in sorted(events, key=lambda e: e.time_ns):
            if e.action == "tag" and familiar(e.name or "") == STABLE and e.time_ns > listed_ns:
                self.stable = e.image_id
            elif e.action == "delete" and _ID.fullmatch(e.name or e.image_id):
                self._deleted(e, report, unplanned, figures)
            elif e.action == "delete":
                # Podman says `delete`, naming the tag, with each untag by name: the image
                # stays (its deletion's own event names its ID).
                figures.untag_deletes += 1
            elif (
                e.action == "untag"
                and e.image_id not in acting
                and e.image_id not in unplanned
                and short_id(e.image_id) not in restored
            ):
                figures.wrong.append(
                    f"{short_id(e.image_id)} was untagged but gcd planned nothing for it "
                    "and reported nothing"
                )

    def _deleted(
        self, e: ImageEvent, report: Report, unplanned: set[str], figures: Figures
    ) -> None:
        image = short_id(e.image_id)
        if self.direct.current(e.image_id) is not None:
            # The containerd store says `delete` for an image deleted by ID that a tag made
            # meanwhile kept (it deletes only the names it read first): nothing was lost.
            figures.delete_events_kept += 1
            return
        if e.image_id in unplanned:
            figures.detected_unplanned += 1  # reported by gcd: an error, never silent
            return
        if e.image_id not in report.plan.snapshot:
            figures.wrong.append(f"{image} was deleted but was not in the plan")
            return
        if report.plan.decision(e.image_id).action != "remove":
            figures.wrong.append(f"{image} was deleted although the plan kept it")
        if self.stable == e.image_id:
            figures.wrong.append(f"{image} was deleted while it carried {STABLE}")
        sent = self._sent(e.time_ns)
        user = self.actors.user(e.image_id, sent)
        # The engine looks for containers somewhere between the DELETE's arrival and the
        # deletion: dockerd once its handler runs (on a busy host, tens of ms after the
        # request came; a container leaves its store when its removal is nearly done), and
        # stamps `delete` after the deletion; Podman once it holds its store's lock, and
        # stamps `delete` when the removal begins, before that look (libimage's
        # removeRecursive defers the event with time.Now() taken on entry), so there the
        # bound is the answer. A container whose removal began before that bound may have
        # been gone when the engine looked; one whose removal began later was there.
        looked_by = (
            self._answered(e.time_ns) if report.plan.snapshot.engine.kind == "podman" else e.time_ns
        )
        if user is not None and user.removed_ns is not None and user.removed_ns < looked_by:
            figures.users_leaving += 1
            user = None
        if user is not None:
            outcome = report.outcomes.get(e.image_id)
            left = (
                f"its removal began {(user.removed_ns - sent) / 1e6:.1f} ms after"
                if user.removed_ns is not None
                else "never removed"
            )
            figures.wrong.append(
                f"{image} was deleted while a container used it (container {user.container} "
                f"made {(sent - user.created_ns) / 1e6:.1f} ms before the proxy sent the DELETE "
                f"on, {left}; the image deleted {(e.time_ns - sent) / 1e6:.1f} ms after; "
                f"gcd's outcome: {outcome})"
            )

    def forensics(self, report: Report, events: tuple[ImageEvent, ...], since_ns: int) -> list[str]:
        """What a wrong finding is judged from, for the log: the images gcd acted on, its
        requests and the engine's events of the cycle, in order, in ms since the window's
        start."""
        lines = []
        snapshot = report.plan.snapshot
        for d in report.plan.decisions:
            o = report.outcomes.get(d.image_id)
            parent = snapshot.image(d.image_id).parent if d.image_id in snapshot else None
            lines.append(
                f"plan {short_id(d.image_id)} {d.action} untag={list(d.untag)} "
                f"tags={list(snapshot.image(d.image_id).tags) if d.image_id in snapshot else '?'} "
                f"parent={short_id(parent) if parent else '-'}: "
                f"{o.status if o else '-'} {o.code or '' if o else ''} {o.untagged if o else ''}"
            )
        with self.proxy._lock:
            requests = [
                (s, f"{m} {p} (answered +{(a - s) / 1e6:.1f} ms)")
                for m, p, s, a in self.proxy.forwarded
                if s > since_ns
            ]
        timeline = requests + [
            (e.time_ns, f"event {e.action} {short_id(e.image_id)} {e.name}") for e in events
        ]
        lines += [f"{(t - since_ns) / 1e6:9.1f} {what}" for t, what in sorted(timeline)]
        return lines


def _widen(proxy: FaultProxy, rng: random.Random, most: float) -> None:
    """Hold gcd's requests a random moment: each round widens other windows."""
    proxy.clear()
    for method, path in (
        ("DELETE", r"/images/"),
        ("GET", r"/images/[^/]+/json"),
        ("GET", r"/containers/json\?.*filters"),
        ("GET", r"/events"),
        ("GET", r"/images/json"),
    ):
        if rng.random() < 0.7:
            proxy.rule(method, path, Delay(0.0, rng.uniform(0.0, most)))


def run(
    engine: PrivateEngine,
    rounds: int,
    seed: int,
    out: Callable[[str], None] = print,
    pace: float | None = None,
) -> Figures:
    """`rounds` cycles with actors running; returns the figures (wrong removals listed)."""
    cfg = gcd_config.parse(POLICY, "race.yaml")
    rng = random.Random(seed)
    figures = Figures()
    work = Path(tempfile.mkdtemp(prefix="gcd-race-state-"))
    direct = DockerEngine(engine.url, 60)
    # The containerd store deletes about 20 times slower, and slower as it grows (each
    # delete walks every image): at the classic store's pace the actors outrun its deletes
    # (about 100 images more a minute, measured). At 20 times slower (up to 1 s between
    # two actions) the store stays small (36 images mid-run) and gcd removes ~700 images
    # in 100 interleavings.
    # Podman too: 3,600 images after 15 minutes at the classic pace, a list taking 72 s.
    if pace is None:
        info = direct.snapshot({})[0].engine
        pace = 1.0 if info.store == "containerd" or info.kind == "podman" else 0.05
    out(f"actors wait up to {pace:g} s between two actions")
    actors = Actors(engine.url, seed, pace=pace)
    with FaultProxy(engine.socket, work / "proxy.sock", seed=seed) as proxy:
        oracle = Oracle(actors, proxy, direct)
        gcd_engine = DockerEngine(proxy.url, 60)
        store = Store(str(work / "state"))
        actors.start()
        try:
            judged = time.time_ns()  # events up to here belong to earlier cycles
            for n in range(rounds):
                _widen(proxy, rng, most=0.04)
                started = time.time_ns()
                report = cycle.run(cfg, gcd_engine, store, cycle.utcnow())
                until = time.time_ns()
                # An event is stamped before the engine publishes it: read the log a moment
                # later, or one stamped just before `until` could be missed for good.
                time.sleep(0.05)
                known = len(figures.wrong)
                events = direct.events(judged + 1, until)
                oracle.judge(report, events, figures, started)
                for wrong in figures.wrong[known:]:
                    out(f"interleaving {n + 1}: WRONG: {wrong}")
                if len(figures.wrong) > known or report.unplanned():
                    for line in oracle.forensics(report, events, judged):
                        out(f"  {line}")
                judged = until
                time.sleep(rng.uniform(0.0, 0.2))  # the actors change the world meanwhile
                figures.rounds += 1
                figures.removed += len(report.removed())
                figures.untagged_by_name += sum(
                    len(o.untagged) for o in report.outcomes.values() if len(o.untagged) > 1
                )
                figures.failed += report.count("failed")
                figures.failures.extend(
                    f"{short_id(i)}: {o.error}"
                    for i, o in report.outcomes.items()
                    if o.error and o.code != "unplanned"
                )
                figures.restored += len(report.restored())
                for o in report.outcomes.values():
                    if o.status == "skipped" and o.code:
                        figures.skipped[o.code] += 1
                if (n + 1) % 100 == 0:
                    out(f"after {n + 1}: {figures.line()}")
        finally:
            actors.stop()
            store.close()
            gcd_engine.close()
            direct.close()
            shutil.rmtree(work, ignore_errors=True)
    figures.actions = actors.counts
    # With min_age 0s gcd may remove a legacy build's newest layer image between two steps
    # (check-config warns of it); the build then fails, as the actors count. Anything else
    # an actor meets is a finding.
    broken = [
        e
        for e in actors.errors
        if e.startswith("legacy_builder: ")
        and any(
            why in e
            for why in (
                "unknown parent image ID",
                "unable to find image",
                "failed to get digest",
                "No such image",
                # The containerd store: the previous step's snapshot went with its image, or
                # a COPY step found that image gone (moby's performCopy).
                "parent snapshot",
                "failed to get destination image",
                # Podman: the previous step's image, or an image its cache lookup was reading.
                "image not known",
                "layer not known",
            )
        )
    ]
    figures.actions["legacy builds broken by min_age 0s"] += len(broken)
    # The containerd store fails a load now and then (_ENGINE_LOAD_RACES; about 1 in 370
    # with plain deletes and no gcd, docs/engines.md). The engine's, not gcd's.
    unpack = [
        e
        for e in actors.errors
        if e.startswith("loader: ") and any(race in e for race in _ENGINE_LOAD_RACES)
    ]
    figures.actions["loads failed by the containerd store's own races"] += len(unpack)
    figures.wrong.extend(
        f"actor failed: {e}" for e in actors.errors if e not in broken and e not in unpack
    )
    return figures


@contextlib.contextmanager
def private_engine() -> Iterator[PrivateEngine]:
    with PrivateEngine() as engine:
        yield engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.race", description=__doc__)
    parser.add_argument("--rounds", type=int, default=1000, help="interleavings (gcd cycles)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        help="longest wait between two actions of an actor, seconds (default: 0.05; 1 on "
        "the containerd store and Podman)",
    )
    args = parser.parse_args(argv)
    # SIGTERM too ends in the `with` block below, so the private engine is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"race suite: seed {seed}, {args.rounds} interleavings", flush=True)
    started = time.monotonic()
    with private_engine() as engine:
        figures = run(engine, args.rounds, seed, out=lambda s: print(s, flush=True), pace=args.pace)
    print(f"{figures.line()}; {time.monotonic() - started:.0f}s; seed {seed}")
    for failure in figures.failures:
        print(f"reported: {failure}")
    for wrong in figures.wrong:
        print(f"WRONG: {wrong}")
    return 1 if figures.wrong else 0


if __name__ == "__main__":
    sys.exit(main())
