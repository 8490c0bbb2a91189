"""The operator's kit against a real Prometheus (Debian's server binary, which tests/setup.sh
takes out of its package): it scrapes a real daemon on a private engine and loads
docs/alerts.yml; every query of docs/grafana-dashboard.json and every alert's expression is
evaluated through its HTTP API and must answer without an error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load
from tests.integration.conftest import WHEN
from tests.integration.test_daemon import Daemon, free_port, promtool, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs/grafana-dashboard.json"
ALERTS = ROOT / "docs/alerts.yml"
# What Grafana puts in for its variables when a person picks "All" and the default range.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "${datasource}": ""}


def prometheus_binary() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "prometheus")
    assert os.access(path, os.X_OK), "the Prometheus server is missing: tests/setup.sh installs it"
    return path


class Prometheus:
    """A Prometheus server on a loopback port with its own storage, scraping one target every
    second and evaluating docs/alerts.yml every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {"job_name": "gcd", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=self.log,
        )

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise  # not ready yet (503): an OSError, which wait_for waits through
            # A query Prometheus cannot parse: in its words.
            raise AssertionError(f"{path} {params}: {e.read().decode()}") from None

    def query(self, expr: str) -> list[Any]:
        """An instant query; its result (a vector or a scalar), after checking it is one."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        assert not answer.get("warnings"), (expr, answer["warnings"])
        return list(answer["data"]["result"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Starts Prometheus servers scraping a target; stops them at the end."""
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path, target))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard, Grafana's variables put
    in as for "All"."""
    document = json.loads(DASHBOARD.read_text())
    found = []
    for panel in document["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            found.append((panel["title"], expr))
    return found


def test_the_dashboard_and_the_alerts_evaluate_against_a_real_prometheus(
    tmp_path: Path,
    dockerd: PrivateEngine,
    client: docker.APIClient,
    daemons: list[Daemon],
    prometheus: Callable[[str], Prometheus],
) -> None:
    load(client, [Spec([f"app:{n}"], [Layer(f"prom-{n}", 10_000)], WHEN) for n in range(1, 4)])
    body = (
        "safety: {min_age: 0s, max_removal_fraction: 1.0}\n"
        "rules:\n  - {name: app, match: {repository: app}, keep_last: 1}\n"
    )
    d = Daemon(tmp_path, dockerd.url, body)
    daemons.append(d)
    wait_for(lambda: d.value("gcd_cycles_total", result="success") >= 1, what="a cycle")
    server = prometheus(f"127.0.0.1:{d.port}")
    target = f"127.0.0.1:{d.port}"

    def scraped() -> bool:
        return [r["value"][1] for r in server.query('up{job="gcd"}')] == ["1"]

    wait_for(scraped, timeout=60, what="Prometheus scraping the daemon")
    # Two scrapes at least, for increase() and rate() over a minute.
    wait_for(lambda: server.query("count_over_time(gcd_engine_up[1m]) >= 3"), 30, "three scrapes")

    # The host variable, as Grafana asks for it.
    values = server.get("/api/v1/label/instance/values", **{"match[]": "gcd_build_info"})
    assert values["data"] == [target]

    queries = dashboard_queries()
    assert len(queries) >= 30
    # Each query answers (an error fails here); which panels have data:
    shown = {title for title, expr in queries if server.query(expr)}
    # What this daemon has done shows: a cycle that removed two images, its store, its host.
    # (Disk series only where the engine's data root is on this host: not for the matrix's
    # engines in their Debian 13 root.)
    must_show = {
        "Hosts: free space, last success, engine",
        "Cycles by result and trigger",
        "Images removed by reason",
        "Bytes freed: gcd's count, the engine's, the disk's",
        "Images by state",
        "Image store, reclaimable, build cache",
        "Engine reachable / events followed (hosts)",
        "Since the last successful cycle (worst host)",
    }
    assert must_show <= shown, must_show - shown
    removed = server.query(
        'sum by (reason) (increase(gcd_images_removed_total{instance=~".*"}[1m]))'
    )
    assert removed and float(removed[0]["value"][1]) >= 0

    # Every alert rule loaded, healthy, and its expression evaluates.
    rules = [
        rule for group in server.get("/api/v1/rules")["data"]["groups"] for rule in group["rules"]
    ]
    names = [r["name"] for r in rules]
    alerts = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert names == [a["alert"] for a in alerts]
    wait_for(
        lambda: all(
            r.get("lastEvaluation", "").startswith("2")
            for r in server.get("/api/v1/rules")["data"]["groups"][0]["rules"]
        ),
        what="every rule evaluated",
    )
    for rule in server.get("/api/v1/rules")["data"]["groups"][0]["rules"]:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule
        server.query(rule["query"])
    # A healthy daemon fires none of them.
    assert server.get("/api/v1/alerts")["data"]["alerts"] == []
    assert d.stop() == 0


def test_every_alert_has_a_promtool_unit_test_and_they_pass() -> None:
    tests = ROOT / "tests/prometheus/alerts_test.yml"
    alerts = {a["alert"] for a in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}
    covered = set(re.findall(r"alertname: (\w+)", tests.read_text()))
    assert covered == alerts
    result = subprocess.run(
        [promtool(), "test", "rules", str(tests)], capture_output=True, text=True, cwd=tests.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
