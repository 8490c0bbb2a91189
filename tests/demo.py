"""gcd's demo on a throwaway engine: sample build-host images, `gcd plan`, `gcd run`, `gcd plan`.

Run through tests/demo (which installs what is missing). The private engine is stopped and
its files removed at the end, whatever happens.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker

from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, busybox_layer, load

CONFIG = r"""
version: 1
engine: {{url: "{url}"}}
state_dir: {state}
safety:
  max_removal_fraction: 1.0   # demo only: a first cycle cleans a long backlog at once
protect:
  - tag: "stable|latest"
rules:
  - name: ci-builds
    match: {{repository: app, tag: 'build-(?P<n>\d+)'}}
    order_by: numeric(n)
    keep_last: 3
  - name: releases
    match: {{repository: 'lib|demo', tag: '(?P<v>v?\d+(\.\d+)*(-[0-9A-Za-z.]+)?)'}}
    order_by: semver(v)
    keep_last: 2
  - name: branches
    match: {{repository: svc, tag: '(?P<branch>.+)-(?P<n>\d+)'}}
    group_by: [repository, branch]
    order_by: numeric(n)
    keep_last: 1
"""


def populate(client: docker.APIClient) -> None:
    """A build host's week, backdated: every sample image was built days ago, so gcd's
    default min_age (1h) and dangling grace (24h) apply as they would on a real host."""
    now = datetime.now(UTC)
    base = [busybox_layer(), Layer("python-runtime", 3_000_000)]
    # The seed's story: demo:1.0 = latest, then 1.1, then 1.1 rebuilt with latest moved:
    # the first 1.1 is left dangling.
    for tags, rakefile, days in (
        (["demo:latest", "demo:1.0"], "v1", 10),
        (["demo:1.1"], "v2", 6),
        (["demo:1.1", "demo:latest"], "v3", 2),
    ):
        load(
            client, [Spec(tags, [*base, Layer(f"Rakefile-{rakefile}")], now - timedelta(days=days))]
        )
    specs = [
        Spec([f"app:build-{n}"], [*base, Layer(f"app-{n}", 800_000)], now - timedelta(days=13 - n))
        for n in range(1, 13)
    ]
    specs += [
        Spec([f"lib:{v}"], [*base, Layer(f"lib-{v}", 500_000)], now - timedelta(days=30 - i))
        for i, v in enumerate(["1.2.0", "1.9.0", "1.10.0", "2.0.0-rc.1", "2.0.0"])
    ]
    specs += [
        Spec([f"svc:{b}"], [*base, Layer(f"svc-{b}", 300_000)], now - timedelta(hours=50 - i))
        for i, b in enumerate(["main-40", "main-41", "main-42", "feat-login-1", "feat-login-2"])
    ]
    specs.append(Spec([], [*base, Layer("forgotten", 1_000_000)], now - timedelta(days=40)))
    load(client, specs)
    client.tag("lib:1.10.0", "lib", "stable")
    none = client.create_host_config(network_mode="none")
    container = client.create_container(
        "app:build-3", ["/bin/busybox", "sleep", "3600"], name="long-running-job", host_config=none
    )
    client.start(container)


def gcd(*args: str) -> None:
    print(f"\n$ gcd {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "gcd", *args], check=False)


def main() -> int:
    # SIGTERM too ends in the `with` blocks below, so the private engine is always cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="gcd-demo-") as tmp, PrivateEngine() as engine:
        print(f"private engine at {engine.url} (stopped and removed at the end)")
        client = docker.APIClient(base_url=engine.url, version="auto", timeout=120)
        populate(client)
        config = Path(tmp) / "config.yaml"
        config.write_text(CONFIG.format(url=engine.url, state=Path(tmp) / "state"))
        print("\nconfiguration:\n" + textwrap.indent(config.read_text().strip(), "  "))
        gcd("plan", "--config", str(config))
        gcd("run", "--config", str(config))
        gcd("plan", "--config", str(config))
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
