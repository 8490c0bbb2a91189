"""The daemon's event follower: each container created or started marks its image used; each
image that arrives (tagged, loaded, pulled, imported) gets its arrival and tag time recorded,
and a tag gcd removed lately that comes back is a regret at once.

Snapshots see only the containers that exist at cycle time, so a `docker run --rm` between
two cycles would leave no trace, and `order_by: last_used` would rank by sampling. The
follower reads the engine's event stream on a thread and a connection of its own and records
each use in the state store (state.UsageLog), which the next cycle merges. After a lost
connection (an engine restart) it follows again from the last event it saw: the engine
replays what it still holds, and the next snapshot covers the containers that exist.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from gcd import logs
from gcd.config import Config
from gcd.engine import DockerEngine, followed
from gcd.errors import EngineError, EngineUnavailable
from gcd.metrics import Metrics
from gcd.model import ContainerUse, ImageEvent
from gcd.state import UsageLog
from gcd.transport import Stream

log = logging.getLogger(__name__)

# Waits between attempts to follow again after a lost connection: growing, then steady.
RETRY_DELAYS = (1.0, 2.0, 5.0)
# Containers whose image is remembered (create tells it; a start follows soon).
REMEMBERED = 1024


class Follower:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        arrived: Callable[[], None] = lambda: None,
        resumed: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = DockerEngine(
            config.engine_url(), config.engine.timeout.total_seconds(), config.engine_tls()
        )
        self.metrics = metrics
        self.usage = UsageLog(config.state_dir)
        self.regret_window = config.regret_window
        self.arrived = arrived  # an image came onto the engine (the daemon's disk watch)
        # Following again after a lost stream: what the engine no longer holds is lost (a
        # restart clears its event buffer); the daemon takes a snapshot.
        self.resumed = resumed
        self.stopping = threading.Event()
        self._stream: Stream | None = None
        self._since: int | None = None  # the last event's time (ns), to follow on from
        self._images: OrderedDict[str, str] = OrderedDict()  # container ID -> image ID
        # Each image's tags as last listed, where a load's event names no image (Podman 4):
        # what a load brought is what the next list has and this one has not.
        self._listed: dict[str, tuple[str, ...]] | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self.recorded = 0  # uses recorded, for tests and logs

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        stream = self._stream
        if stream is not None:
            stream.close()  # ends the read that waits
        self._thread.join(10)
        self.engine.close()
        self.usage.close()

    def _run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                self._stream = self.engine.follow(self._since)
                if self.engine.nameless_loads():
                    self._listed = self.engine.tags_by_image()
                self.metrics.events_up.set(1)
                if failures:
                    log.info("following the engine's events again")
                    self.resumed()
                failures = 0
                self._follow(self._stream)
                if not self.stopping.is_set():
                    raise EngineError("the engine ended its event stream")
            except EngineError as e:  # EngineUnavailable included
                self.metrics.events_up.set(0)
                if self.stopping.is_set():
                    break
                if failures == 0:
                    log.warning("lost the engine's events (%s); following again when it answers", e)
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                self.stopping.wait(delay)
            except Exception:  # a bug must not end the following for good: log, go on
                log.exception("the event follower crashed; following again")
                self.metrics.events_up.set(0)
                self.stopping.wait(RETRY_DELAYS[-1])
        self.metrics.events_up.set(0)

    def _follow(self, stream: Stream) -> None:
        for line in stream.lines():
            event = followed(line)
            if isinstance(event, ImageEvent):
                self._since = event.time_ns
                self._arrived(event)
            elif isinstance(event, ContainerUse):
                self._since = event.time_ns
                self._used(event)

    def _arrived(self, event: ImageEvent) -> None:
        """A name came onto the engine: its image's arrival and tag time are recorded, and it
        is a regret if gcd removed it within regret_window."""
        self.arrived()
        when = event.time_ns / 1e9
        if not event.image_id:  # Podman 4's load
            self._loaded(when)
            return
        image_id = event.image_id
        if self._listed is not None and event.name:
            self._listed[image_id] = (*self._listed.get(image_id, ()), event.name)
        if not image_id.startswith("sha256:"):  # a pull names the reference it pulled
            try:
                image_id = self.engine.target(image_id) or ""
            except EngineUnavailable:
                raise
            except EngineError:
                image_id = ""
        if image_id:
            self.usage.arrived(image_id, when)
        if not self.regret_window:
            return
        if ":" in event.name and not event.name.startswith("sha256:"):
            tags: tuple[str, ...] = (event.name,)
        else:  # a load names only the image: its tags now
            try:
                now = self.engine.current(event.image_id)
            except EngineUnavailable:
                raise
            except EngineError:
                return
            tags = now[0] if now is not None else ()
        self._regrets(tags, when)

    def _loaded(self, when: float) -> None:
        """A load whose event names no image (Podman 4): the images the engine lists now
        that the last list lacked, or that gained a tag since, arrived with it; and every tag
        gcd removed lately that the engine holds again is a regret (a load may bring back an
        image, tags and ID, that the last list still showed)."""
        listed = self.engine.tags_by_image()
        before = self._listed or {}
        for image_id, tags in listed.items():
            if image_id not in before or not set(tags) <= set(before[image_id]):
                self.usage.arrived(image_id, when)
        self._listed = listed
        if self.regret_window:
            self._regrets([t for tags in listed.values() for t in tags], when)

    def _regrets(self, tags: Iterable[str], when: float) -> None:
        """Count and log the tags among `tags` gcd removed within regret_window."""
        found = self.usage.came_back(tags, self.regret_window, datetime.fromtimestamp(when, UTC))
        for r in found:
            self.metrics.regrets.labels(r.rule).inc()
        logs.regrets(log, found)

    def _used(self, use: ContainerUse) -> None:
        """A container created or started: its image was used then."""
        image_id = self._images.get(use.container_id)
        if image_id is None:
            image_id = self.engine.container_image(use.container_id, use.image)
            if image_id is None:
                return
            self._images[use.container_id] = image_id
            while len(self._images) > REMEMBERED:
                self._images.popitem(last=False)
        self.usage.record(image_id, use.time_ns / 1e9)
        self.recorded += 1
