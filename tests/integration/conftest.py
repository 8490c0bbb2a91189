"""A private dockerd for the whole session; every test starts from an empty engine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from gcd.model import familiar
from gcd.units import format_bytes
from tests.dockerd import PrivateEngine

# When the fixture images were built: long ago, so that only the rules decide.
WHEN = datetime(2026, 3, 1, tzinfo=UTC)
# No protection by age, no fraction guard: the tests' policies then say all that is kept.
NO_AGE_GUARDS = "safety: {min_age: 0s, max_removal_fraction: 1.0}\ndangling: {min_age: 0s}\n"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def dockerd() -> Iterator[PrivateEngine]:
    if os.geteuid() != 0:
        pytest.fail("integration tests start a private dockerd and need root")
    engine = PrivateEngine(tls=True)  # Docker: also tcp:// with TLS (engine.tcp_url)
    engine.start()
    try:
        yield engine
    finally:
        engine.cleanup()


@pytest.fixture
def client(dockerd: PrivateEngine) -> Iterator[docker.APIClient]:
    api = docker.APIClient(base_url=dockerd.url, version="auto", timeout=60)
    try:
        _wipe(api)
    except requests.exceptions.RequestException as e:
        # Every later test would wait for it too, a minute a request: stop the session.
        pytest.exit(
            f"the private engine at {dockerd.url} stopped answering ({e}); "
            f"its log ends:\n{dockerd.log_tail()}",
            returncode=1,
        )
    yield api
    api.close()


def _wipe(api: docker.APIClient) -> None:
    """Test set-up only: gcd itself never forces."""
    for c in api.containers(all=True):
        api.remove_container(c["Id"], force=True)
    for _ in range(5):
        images = api.images(all=True)
        if not images:
            return
        for image in images:
            # A parent goes with its children; whatever is left is retried next round.
            with contextlib.suppress(docker.errors.APIError):
                api.remove_image(image["Id"], force=True)


@dataclass
class Gcd:
    """Runs the real `gcd` command line against the private engine."""

    url: str
    tmp: Path
    full_names: bool = False  # Podman: its names are made short in what gcd prints

    def config(self, body: str = "") -> Path:
        text = f"version: 1\nengine:\n  url: {self.url}\nstate_dir: {self.tmp / 'state'}\n"
        path = self.tmp / "config.yaml"
        path.write_text(text + textwrap.dedent(body))
        return path

    def __call__(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gcd", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )
        if self.full_names and "--output" not in args:
            result.stdout = short_names(result.stdout)
            result.stderr = _FULL_NAME.sub("", result.stderr)
        return result

    def json(self, *args: str) -> dict[str, Any]:
        """The JSON report. On Podman its names are made short, as the tests write them
        (`localhost/app:1` is `app:1`): what the tests check is the same on every engine.
        tests/unit/test_policy.py checks Podman's names as gcd shows them."""
        result = self(*args, "--output", "json")
        assert result.returncode == 0, result.stderr
        document: dict[str, Any] = json.loads(result.stdout)
        if document["engine"]["kind"] == "podman":
            document = json.loads(_FULL_NAME.sub("", result.stdout))
        return document


def short(text: str) -> str:
    """A name, or a text of names, with Podman's prefixes off (`localhost/app:1` is
    `app:1`); Docker's names are short already."""
    return _FULL_NAME.sub("", text)


def short_refs(refs: tuple[tuple[str, ...], tuple[str, ...]] | None) -> object:
    """DockerEngine.current()'s answer with short, sorted names."""
    if refs is None:
        return None
    return tuple(sorted(map(short, refs[0]))), tuple(sorted(map(short, refs[1])))


def report_of(out: str) -> dict[str, Any]:
    """A JSON report gcd printed, with Podman's names made short (as Gcd.json does)."""
    document: dict[str, Any] = json.loads(_FULL_NAME.sub("", out))
    return document


def short_names(text: str) -> str:
    """gcd's text output with Podman's `localhost/app:1` written `app:1`, as the tests write
    it, and its tables aligned again as gcd aligns them (two spaces between columns; the
    last one unpadded). The alignment itself is checked word for word on Docker."""
    out: list[str] = []
    table: list[list[str]] = []
    for line in _FULL_NAME.sub("", text).split("\n"):
        if line.startswith("IMAGE ") and not table:
            table.append(re.split(r" {2,}", line))
            continue
        if table and line:
            table.append(re.split(r" {2,}", line, maxsplit=len(table[0]) - 1))
            continue
        if table:
            last = len(table[0]) - 1
            widths = [max(len(r[i]) for r in table if len(r) > i) for i in range(last)]
            for row in table:
                cells = [c.ljust(w) for c, w in zip(row[:last], widths, strict=False)]
                out.append("  ".join([*cells, *row[last:]]).rstrip())
            table = []
        out.append(line)
    return "\n".join(out)


def engine_line(api: docker.APIClient, url: str) -> str:
    """What gcd's header says of the engine, from the engine's own answers."""
    version, info = api.version(), api.info()
    podman = any("podman" in c.get("Name", "").lower() for c in version.get("Components") or ())
    containerd = any("containerd.snapshotter" in str(v) for _, v in info.get("DriverStatus") or ())
    store = "containerd image store" if containerd else info["Driver"]
    name = "Podman" if podman else "Docker"
    return f"{name} {version['Version']} (API {version['ApiVersion']}, {store}) at {url}"


@pytest.fixture
def gcd(dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path) -> Gcd:
    return Gcd(dockerd.url, tmp_path, full_names=podman(client))


def listed(api: docker.APIClient) -> list[dict[str, Any]]:
    """Every image. The containerd store answers 404 while an image is being deleted:
    asked again, as gcd does."""
    for _ in range(20):
        try:
            return api.images(all=True)  # type: ignore[no-any-return]
        except docker.errors.NotFound:
            time.sleep(0.2)
    return api.images(all=True)  # type: ignore[no-any-return]


def size_cell(api: docker.APIClient, image_id: str) -> str:
    """An image's SIZE as gcd and `docker images` show it: the list's size, which on the
    containerd store counts the compressed content too (about twice the layers)."""
    (size,) = [i["Size"] for i in listed(api) if i["Id"] == image_id]
    return format_bytes(size)


def store_bytes(engine: PrivateEngine, api: docker.APIClient) -> int:
    """The engine's own count of its image store's bytes: `/system/df`'s LayersSize on
    Docker (from 28.2 on the containerd store, its content blobs too); on Podman, what its
    store records (each layer's diff size, each image's config, manifests and signatures),
    which Podman 5 reports as LayersSize and Podman 4 does not (it answers 0)."""
    if not podman(api):
        return int(api.df()["LayersSize"])
    storage = Path(engine.root, "storage")
    layers = json.loads((storage / "overlay-layers/layers.json").read_text() or "[]")
    images = json.loads((storage / "overlay-images/images.json").read_text() or "[]")
    return sum(int(layer.get("diff-size") or 0) for layer in layers) + sum(
        sum((image.get("big-data-sizes") or {}).values()) for image in images
    )


def counts_content(api: docker.APIClient) -> bool:
    """Docker 28.2 (API 1.50) on, on the containerd store: LayersSize counts the content
    store's packed blobs too."""
    if podman(api) or "containerd" not in str(api.info().get("DriverStatus")):
        return False
    version = api.version()["ApiVersion"]
    return tuple(int(n) for n in version.split(".")) >= (1, 50)


_PODMAN: dict[str, bool] = {}
_FULL_NAME = re.compile(r"(?<![\w./-])(?:localhost/|docker\.io/library/|docker\.io/)")


def podman(api: docker.APIClient) -> bool:
    if api.base_url not in _PODMAN:
        components = api.version().get("Components") or ()
        _PODMAN[api.base_url] = any("podman" in c.get("Name", "").lower() for c in components)
    return _PODMAN[api.base_url]


def tags_now(api: docker.APIClient) -> dict[str, str]:
    """tag -> image ID, as the engine holds them now; Podman's `localhost/app:1` is
    `app:1` here, as the tests write it."""
    short = familiar if podman(api) else (lambda tag: tag)
    return {
        short(t): full_id(i["Id"])
        for i in listed(api)
        for t in i.get("RepoTags") or ()
        if t != "<none>:<none>"
    }


def full_id(image_id: str) -> str:
    """An ID as Docker writes it (Podman leaves `sha256:` off); "" stays ""."""
    return image_id if ":" in image_id or not image_id else f"sha256:{image_id}"


def ids_now(api: docker.APIClient) -> set[str]:
    return {full_id(i["Id"]) for i in listed(api)}


@pytest.fixture
def daemons() -> Iterator[list[Any]]:
    """`gcd daemon` processes a test started (tests/integration/test_daemon.Daemon): killed
    at the end if the test left them running."""
    started: list[Any] = []
    yield started
    for d in started:
        if d.process.poll() is None:
            d.process.kill()
            d.process.wait()
