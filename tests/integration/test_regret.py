"""Regrets on a real engine: a tag gcd removed that is loaded again within regret_window."""

from __future__ import annotations

import re
from pathlib import Path

import docker

from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load
from tests.integration.conftest import NO_AGE_GUARDS, WHEN, Gcd, report_of, short, tags_now
from tests.integration.test_daemon import Daemon, wait_for

POLICY = (
    NO_AGE_GUARDS
    + """
rules:
  - {name: ci, match: {repository: app}, keep_last: 1}
"""
)


def test_a_removed_tag_loaded_again_is_a_regret_once(
    gcd: Gcd, client: docker.APIClient, tmp_path: Path
) -> None:
    old = Spec(["app:1"], [Layer("app-1")], WHEN)
    load(client, [old, Spec(["app:2"], [Layer("app-2")], WHEN.replace(day=2))])
    textfile = tmp_path / "gcd.prom"
    config = str(gcd.config(POLICY + f"metrics: {{textfile: {textfile}}}\n"))
    first = gcd.json("run", "--config", config)
    assert [
        d["tags"]
        for d in first["decisions"]
        if d["outcome"] == "done" and d["decision"] == "remove"
    ] == [["app:1"]]
    assert first["regrets"] == []

    load(client, [old])  # CI needed it after all
    again = gcd("run", "--config", config, "--output", "json")
    assert again.returncode == 0, again.stderr
    (regret,) = report_of(again.stdout)["regrets"]
    assert (regret["tag"], regret["rule"]) == ("app:1", "ci")
    assert re.search(
        r"WARNING regret: app:1 is back \ds after gcd removed it \(rule ci\)\n", short(again.stderr)
    )
    assert 'gcd_regret_total{rule="ci"} 1.0' in textfile.read_text()

    third = gcd.json("run", "--config", config)
    assert third["regrets"] == []  # counted once; the second run removed it again


def test_the_daemon_counts_a_regret_as_the_tag_comes_back(
    dockerd: PrivateEngine, client: docker.APIClient, tmp_path: Path, daemons: list[Daemon]
) -> None:
    old = Spec(["app:1"], [Layer("app-1")], WHEN)
    load(client, [old, Spec(["app:2"], [Layer("app-2")], WHEN.replace(day=2))])
    d = Daemon(tmp_path, dockerd.url, POLICY)  # its next cycle in an hour
    daemons.append(d)
    wait_for(lambda: d.value("gcd_cycles_total", result="success") == 1, what="first cycle")
    assert "app:1" not in {short(t) for t in tags_now(client)}
    wait_for(lambda: d.value("gcd_events_up") == 1, what="events followed")
    load(client, [old])

    def regrets() -> float:
        try:
            return d.value("gcd_regret_total", rule="ci")
        except KeyError:  # no regret yet: no series
            return 0

    wait_for(lambda: regrets() == 1, what="the regret")
    assert d.value("gcd_cycles_total", result="success") == 1  # no cycle needed for it
    assert re.search(
        r"WARNING regret: app:1 is back \ds after gcd removed it \(rule ci\)\n", short(d.logs())
    )
    assert d.stop() == 0
