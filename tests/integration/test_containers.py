"""`containers.remove_exited_after` on a real engine: stopped containers go first, never a
running or protected one, and the images they pinned follow the rules in the same cycle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import docker

from gcd.model import short_id
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, busybox_layer, load
from tests.integration.conftest import NO_AGE_GUARDS, Gcd, ids_now, tags_now
from tests.proxy import FaultProxy, Hold

WHEN = datetime(2026, 3, 1, tzinfo=UTC)
POLICY = (
    NO_AGE_GUARDS
    + """
containers:
  remove_exited_after: 1s
  protect:
    - name: "keep-*"
rules:
  - {name: all, keep_last: 1}
"""
)


def tools(client: docker.APIClient) -> dict[str, str]:
    """tool:1 .. tool:4, each with busybox; tag -> image ID. tool:4 is the newest."""
    specs = [
        Spec([f"tool:{n}"], [busybox_layer(), Layer(f"tool-{n}")], WHEN.replace(day=n))
        for n in range(1, 5)
    ]
    return dict(zip((s.tags[0] for s in specs), load(client, specs), strict=True))


# Exits on its first run; runs on when started again.
ONCE_THEN_RUN = "test -f /ran && exec sleep 600; touch /ran"


def container(client: docker.APIClient, image: str, name: str, command: str | None) -> str:
    """A container called `name`: `command` None: created, never started; "sleep 600":
    left running; any other shell command: run to its end."""
    none = client.create_host_config(network_mode="none")
    argv = ["/bin/busybox", "sh", "-c", command or "true"]
    created = client.create_container(image, argv, host_config=none, name=name)["Id"]
    if command is not None:
        client.start(created)
        if command != "sleep 600":
            client.wait(created)
    return str(created)


def names_now(client: docker.APIClient) -> set[str]:
    return {c["Names"][0].lstrip("/") for c in client.containers(all=True)}


def test_stopped_containers_past_the_age_go_first_and_free_their_images(
    gcd: Gcd, client: docker.APIClient
) -> None:
    ids = tools(client)
    container(client, "tool:1", "old-job", "true")
    container(client, "tool:2", "keep-job", "true")
    container(client, "tool:3", "never-started", None)
    container(client, "tool:4", "server", "sleep 600")
    time.sleep(1.2)  # past remove_exited_after
    config = str(gcd.config(POLICY))

    plan = gcd.json("plan", "--config", config)
    decided = {c["name"]: c for c in plan["containers"]}
    assert sorted(decided) == ["keep-job", "never-started", "old-job"]  # not the running one
    assert decided["keep-job"]["reasons"] == ['protected by containers.protect[0] name "keep-*"']
    assert re.fullmatch(
        r"exited \ds ago >= containers.remove_exited_after 1s", decided["old-job"]["reasons"][0]
    )
    assert re.fullmatch(
        r"created \ds ago, never started >= containers.remove_exited_after 1s",
        decided["never-started"]["reasons"][0],
    )
    assert [(c["decision"], c["outcome"]) for c in plan["containers"]] == [
        ("keep", "planned"), ("remove", "planned"), ("remove", "planned"),
    ]  # fmt: skip
    assert names_now(client) == {"old-job", "keep-job", "never-started", "server"}

    run = gcd.json("run", "--config", config)
    assert run["summary"]["containers_removed"] == 2
    assert names_now(client) == {"keep-job", "server"}
    by_tag = {d["tags"][0]: d for d in run["decisions"]}
    assert by_tag["tool:1"]["outcome"] == by_tag["tool:3"]["outcome"] == "done"
    assert by_tag["tool:2"]["reasons"][0] == "in use by container keep-job (exited)"
    assert sorted(tags_now(client)) == ["tool:2", "tool:4"]
    assert {ids["tool:2"], ids["tool:4"]} <= ids_now(client)

    text = gcd("plan", "--config", config).stdout
    assert "\nCONTAINER     NAME      STATE   DECISION  REASON\n" in text
    assert text.endswith(
        "kept; stopped containers to remove: 0; 0B reclaimable (dry run: nothing removed)\n"
    )
    client.remove_container("server", force=True)


def test_a_container_started_in_gcds_window_stays_and_keeps_its_image(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path
) -> None:
    ids = tools(client)
    job = container(client, "tool:1", "job", ONCE_THEN_RUN)
    time.sleep(1.2)
    with FaultProxy(dockerd.socket, tmp_path / "proxy.sock") as proxy:
        hold = Hold()
        proxy.rule("DELETE", r"/containers/", hold, times=1)
        config = Gcd(proxy.url, tmp_path).config(POLICY)
        run = subprocess.Popen(
            [sys.executable, "-m", "gcd", "run", "--config", str(config), "--output", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert hold.arrived.wait(60), "gcd sent no DELETE for the container"
        # After gcd's last inspect of it, before its DELETE reaches the engine.
        client.start(job)
        hold.release.set()
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    report = json.loads(out)
    (decided,) = report["containers"]
    assert decided["outcome"] == "skipped"
    assert decided["reasons"][1].startswith("skipped: the engine refused: ")
    assert f"WARNING skipped container job ({short_id(job)}): the engine refused: " in err
    tool1 = next(d for d in report["decisions"] if d["image_id"] == ids["tool:1"])
    assert tool1["outcome"] == "skipped"
    assert ids["tool:1"] in ids_now(client) and "job" in names_now(client)
    client.remove_container(job, force=True)
