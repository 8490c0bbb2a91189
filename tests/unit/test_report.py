"""Rendering: a table row stays one readable line, the JSON document keeps everything."""

from __future__ import annotations

import json

from gcd import policy, report
from tests.unit.snapshots import NOW, cfg, image, snapshot, state


def test_an_image_with_ten_thousand_tags_is_one_short_row_and_a_whole_json_entry() -> None:
    tags = [f"app:{n}" for n in range(1, 10_001)]
    plan = policy.plan(snapshot([image("many", tags), image("x", ["b:1"])]), cfg(), state(), NOW)
    rendered = report.planned(plan, NOW)
    rows = report.to_text(rendered).splitlines()
    assert max(len(row) for row in rows) < 200
    (row,) = [r for r in rows if "app:1," in r]
    assert "app:1, app:10 … (+9,998)" in row
    (entry,) = [d for d in json.loads(report.to_json(rendered))["decisions"] if len(d["tags"]) > 1]
    assert len(entry["tags"]) == 10_000


def test_a_few_tags_are_shown_whole() -> None:
    assert report.tag_cell(("a:1", "a:2", "a:3")) == "a:1, a:2, a:3"
    assert report.tag_cell(()) == "<none>"
