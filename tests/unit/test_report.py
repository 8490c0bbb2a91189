"""Rendering: a table row stays one readable line, the JSON document keeps everything."""

from __future__ import annotations

import dataclasses
import json

from gcd import policy, report
from gcd.model import Outcome, Report, Usage
from tests.unit.snapshots import NOW, cfg, iid, image, snapshot, state


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


def _size_line(plan: object, name: str) -> str:
    text = report.explain(plan, iid(name))  # type: ignore[arg-type]
    (line,) = [line for line in text.splitlines() if line.startswith("  size:")]
    return line


def test_explain_says_what_removing_each_image_frees_parents_included() -> None:
    base = ("base", 1_000_000)  # held by lib:1, which stays
    images = [
        image("mid", layers=[base, ("deps", 300_000)]),
        image("q1", ["q:1"], parent="mid", layers=[base, ("deps", 300_000), ("q1", 3)]),
        image("kmid", layers=[base, ("kdeps", 200_000)]),
        image("k1", ["k:1"], parent="kmid", layers=[base, ("kdeps", 200_000), ("k1", 50)]),
        image("lib", ["lib:1"], layers=[base]),
    ]
    config = cfg("unmatched: expire\nprotect: [{ref: 'lib:*'}, {ref: 'k:*'}]\n")
    plan = policy.plan(snapshot(images), config, state(), NOW)
    # Removed: the leaf's row counts its untagged parent (it used to say 3B).
    assert plan.decision(iid("q1")).bytes == 300_003
    assert plan.decision(iid("mid")).bytes == 0
    assert plan.reclaimable_bytes == 300_003
    assert _size_line(plan, "q1") == (
        f"  size:     1.3MB (300.0kB freed by removing it, with its parent image {iid('mid')[7:19]})"
    )
    assert _size_line(plan, "mid") == (
        f"  size:     1.3MB (goes with {iid('q1')[7:19]}, whose row counts it)"
    )
    # Kept: what removing it too would free (it used to say 0B).
    assert _size_line(plan, "k1") == (
        f"  size:     1.2MB (removing it would free 200.1kB, with its parent image {iid('kmid')[7:19]})"
    )
    assert _size_line(plan, "lib") == "  size:     1.0MB (removing it would free 0B)"


def test_a_run_puts_planned_reclaimed_accounted_and_measured_bytes_side_by_side() -> None:
    images = [image("old", ["a:1"], layers=[("old", 3_000_000)]), image("new", ["a:2"])]
    plan = policy.plan(snapshot(images), cfg("unmatched: expire\n"), state(), NOW)
    done = {d.image_id: Outcome(d.image_id, "done") for d in plan.decisions}
    before = Usage("/var/lib/docker", 90_000_000, 10_000_000, 1000, 500)
    after = Usage("/var/lib/docker", 86_500_000, 13_500_000, 1000, 490)
    ran = Report(dataclasses.replace(plan, disk=before), False, NOW, done, 3_001_000)
    ran = dataclasses.replace(ran, disk_after=after, accounted_before=9_000_000)
    ran = dataclasses.replace(ran, accounted_after=5_999_000)
    lines = report.to_text(ran).splitlines()
    assert lines[-2] == (
        "bytes freed: 3.0MB planned, 3.0MB reclaimed, 3.0MB by the engine's count, "
        "3.5MB measured on /var/lib/docker"
    )
    summary = json.loads(report.to_json(ran))["summary"]
    assert (summary["freed_accounted_bytes"], summary["freed_measured_bytes"]) == (
        3_001_000,
        3_500_000,
    )
    # An engine that keeps no count (Podman 4), a data root not on this host; a dry run.
    bare = Report(plan, False, NOW, done, 3_001_000)
    assert report.to_text(bare).splitlines()[-2] == (
        "bytes freed: 3.0MB planned, 3.0MB reclaimed, the engine keeps no count, disk not watched"
    )
    summary = json.loads(report.to_json(bare))["summary"]
    assert (summary["freed_accounted_bytes"], summary["freed_measured_bytes"]) == (None, None)
    assert "bytes freed" not in report.to_text(report.planned(plan, NOW))
