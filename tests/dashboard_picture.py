"""Draws docs/dashboard.svg: the panels of docs/grafana-dashboard.json, laid out as the JSON
lays them out, with what a real Prometheus answered to their queries while it scraped a real
daemon cleaning a private engine for a few minutes (builds arriving, cycles every 5 s, a
removed tag loaded again). No Grafana runs here (it is not packaged for Debian): this is a
plain drawing of the same queries, not a screenshot.

Run as root from a checkout: `.venv/bin/python -m tests.dashboard_picture` (about 3 minutes).
"""

from __future__ import annotations

import html
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

from gcd.units import format_bytes
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load
from tests.integration.test_daemon import Daemon, wait_for
from tests.integration.test_prometheus import DASHBOARD, GRAFANA_VARIABLES, Prometheus

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs/dashboard.svg"
SECONDS = 150
WIDTH, UNIT = 1200, 28  # the SVG's width; pixels per grid row
COLORS = ("#3274d9", "#56a64b", "#e0b400", "#e02f44", "#8f3bb8", "#fa6400")


def activity(client: docker.APIClient, seconds: float) -> None:
    """CI builds arriving every 3 s; now and then a removed tag loaded again (a regret)."""
    started, n = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        n += 1
        load(client, [Spec([f"app:build-{n}"], [Layer(f"pic-{n}", 300_000 * (1 + n % 4))])])
        if n % 10 == 0:
            load(client, [Spec([f"app:build-{n - 8}"], [Layer(f"pic-{n - 8}", 300_000)])])
        time.sleep(3)


def series(
    server: Prometheus, expr: str, start: float, end: float
) -> list[tuple[dict[str, str], list[Any]]]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    answer = server.get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step="2")
    return [(r["metric"], r["values"]) for r in answer["data"]["result"]]


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def _values(values: list[Any]) -> list[float]:
    return [float(v) for _, v in values if v != "NaN"]


def _formatted(value: float, unit: str | None) -> str:
    if unit == "bytes":
        return format_bytes(int(value))
    if unit == "percentunit":
        return f"{value:.1%}"
    if unit == "s":
        return f"{value:.0f} s"
    return f"{value:,.3g}"


def draw(panels: list[dict[str, Any]], data: dict[int, list[Any]], start: float, end: float) -> str:
    cell = WIDTH / 24
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * UNIT + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="#111217"/>',
    ]
    for p in panels:
        g = p["gridPos"]
        x, y, w, h = g["x"] * cell + 3, g["y"] * UNIT + 3, g["w"] * cell - 6, g["h"] * UNIT - 6
        title = html.escape(p["title"])
        if p["type"] == "row":
            out.append(
                f'<text x="{x + 4}" y="{y + 18}" fill="#ccccdc" font-size="14">{title}</text>'
            )
            continue
        out.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>'
        )
        out.append(
            f'<text x="{x + 8}" y="{y + 16}" fill="#ccccdc" font-weight="bold">{title}</text>'
        )
        lines = data.get(p["id"], [])
        if p["type"] == "stat":
            values = [float(v[-1][1]) for _, _, _, v in lines if v]
            shown = ", ".join(f"{v:,.0f}" for v in values) or "no data"
            out.append(
                f'<text x="{x + w / 2}" y="{y + h / 2 + 14}" fill="#73bf69" font-size="30" '
                f'text-anchor="middle">{html.escape(shown)}</text>'
            )
        elif p["type"] == "table":
            # One line a column of the host's row, named as the panel's transformations do.
            names: dict[str, str] = {}
            for step in p.get("transformations", ()):
                names.update(step.get("options", {}).get("renameByName", {}))
            units = {
                o["matcher"]["options"]: o["properties"][0]["value"]
                for o in p.get("fieldConfig", {}).get("overrides", ())
            }
            row_y = y + 36
            for _, ref, labels, values in lines:
                if not values:
                    continue
                value = float(values[-1][1])
                column = names.get(f"Value #{ref}")
                if column is None:  # gcd_build_info: its labels are the columns
                    text = ", ".join(
                        f"{k} {labels.get(k, '')}" for k in ("version", "kind", "store")
                    )
                else:
                    text = f"{column}: {_formatted(value, units.get(column))}"
                text = f"{labels.get('instance', '')}  {text}"
                out.append(
                    f'<text x="{x + 8}" y="{row_y}" fill="#ccccdc">{html.escape(text)}</text>'
                )
                row_y += 15
        else:
            top, bottom, left, right = y + 26, y + h - 8 - 13 * min(len(lines), 3), x + 8, x + w - 8
            # The busiest series first: those are drawn and named (a panel's zero series,
            # e.g. every result of every trigger, would crowd out the one that moves).
            lines = sorted(lines, key=lambda line: -max(_values(line[3]) or [0.0]))
            points = [v for *_, values in lines for v in _values(values)]
            peak = max([*points, 1e-9])
            for n, (label, _, _, values) in enumerate(lines[:6]):
                path = " ".join(
                    f"{left + (float(t) - start) / (end - start) * (right - left):.1f},"
                    f"{bottom - float(v) / peak * (bottom - top):.1f}"
                    for t, v in values
                    if v != "NaN"
                )
                color = COLORS[n % len(COLORS)]
                out.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>'
                )
                if n < 3:
                    out.append(
                        f'<text x="{left + 12}" y="{bottom + 12 + 13 * n}" fill="{color}">'
                        f"{html.escape(label)}</text>"
                    )
            if not lines:
                out.append(
                    f'<text x="{x + w / 2}" y="{y + h / 2}" fill="#8e8e8e" text-anchor="middle">no data</text>'
                )
            out.append(
                f'<text x="{right}" y="{top + 2}" fill="#8e8e8e" text-anchor="end">'
                f"{peak:,.3g}</text>"
                if peak > 1e-6
                else f'<text x="{right}" y="{top + 2}" fill="#8e8e8e" text-anchor="end">0</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    document = json.loads(DASHBOARD.read_text())
    with tempfile.TemporaryDirectory(prefix="gcd-picture-") as tmp, PrivateEngine() as engine:
        client = docker.APIClient(base_url=engine.url, version="auto", timeout=120)
        body = (
            "safety: {min_age: 0s, max_removal_fraction: 1.0}\n"
            "rules:\n  - {name: builds, match: {repository: app}, keep_last: 4}\n"
        )
        daemon = Daemon(Path(tmp), engine.url, body, every="5s")
        server = Prometheus(Path(tmp), f"127.0.0.1:{daemon.port}")
        try:
            wait_for(lambda: server.query('up{job="gcd"}'), 60, "the first scrape")
            start = time.time()
            activity(client, SECONDS)
            end = time.time()
            data: dict[int, list[Any]] = {}
            for p in document["panels"]:
                for target in p.get("targets", ()):
                    for labels, values in series(server, target["expr"], start, end):
                        label = legend(target.get("legendFormat", ""), labels)
                        entry = (label, target["refId"], labels, values)
                        data.setdefault(p["id"], []).append(entry)
        finally:
            server.stop()
            daemon.stop()
    OUT.write_text(draw(document["panels"], data, start, end))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
