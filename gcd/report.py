"""Render a Report as a table a person reads, or as the JSON report (docs/operations.md,
"Output of `gcd run` / `gcd plan`")."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from gcd import __version__, policy
from gcd.model import ContainerDecision, ContainerOutcome, Decision, Outcome, Plan, Report, short_id
from gcd.units import format_bytes, format_duration

_COLUMNS = ("IMAGE", "TAGS", "DECISION", "SIZE", "REASON")
# A kept container's outcome, as a kept image's: planned in a dry run, else done.
_KEPT = {True: ContainerOutcome("planned"), False: ContainerOutcome("done")}


def planned(plan: Plan, started_at: datetime) -> Report:
    """The report of a dry run: every outcome is `planned`."""
    outcomes = {d.image_id: Outcome(d.image_id, "planned") for d in plan.decisions}
    stopped = {c.container_id: ContainerOutcome("planned") for c in plan.container_removals()}
    return Report(plan, True, started_at, outcomes, 0, container_outcomes=stopped)


def summary(report: Report) -> dict[str, int | None]:
    plan = report.plan
    snap = plan.snapshot
    return {
        "images": len(snap.images),
        "tags": sum(len(i.tags) for i in snap.images),
        "containers": len(snap.containers),
        "remove": sum(1 for d in plan.decisions if d.action == "remove"),
        "untag": sum(len(d.untag) for d in plan.decisions),
        "keep": sum(1 for d in plan.decisions if d.action == "keep"),
        "skipped": report.count("skipped"),
        "failed": report.count("failed"),
        "unplanned": len(report.unplanned()),
        "tags_restored": len(report.restored()),
        "reclaimable_bytes": plan.reclaimable_bytes,
        "reclaimed_bytes": report.reclaimed_bytes,
        "containers_to_remove": len(plan.container_removals()),
        "containers_removed": report.containers_removed(),
        # Side by side with reclaimed_bytes (gcd's count): the engine's own and statvfs's.
        "freed_accounted_bytes": report.freed_accounted(),
        "freed_measured_bytes": _measured(report),
    }


def _measured(report: Report) -> int | None:
    """The watched filesystem's drop over a run; None in a dry run or where not watched."""
    if report.dry_run or report.plan.disk is None or report.disk_after is None:
        return None
    return report.freed_measured()


def to_json(report: Report) -> str:
    plan = report.plan
    engine = plan.snapshot.engine
    document: dict[str, Any] = {
        "version": f"gcd {__version__}",
        "dry_run": report.dry_run,
        "started_at": _iso(report.started_at),
        "engine": {
            "url": engine.url,
            "server_version": engine.server_version,
            "api_version": engine.api_version,
            "kind": engine.kind,
            "store": engine.store,
        },
        "summary": summary(report),
        "decisions": [_decision(report, d) for d in _ordered(plan)],
        "containers": [_container(report, c) for c in plan.containers],
        "build_cache": _build_cache(report),
        "disk": _disk(report),
        "regrets": [
            {
                "tag": r.tag,
                "rule": r.rule,
                "removed_at": _iso(r.removed_at),
                "seen_at": _iso(r.seen_at),
            }
            for r in report.regrets
        ],
    }
    return json.dumps(document, indent=2)


def _disk(report: Report) -> dict[str, Any] | None:
    usage, pressure = report.plan.disk, report.plan.pressure
    if usage is None:
        return None
    return {
        "path": usage.path,
        "used_ratio": round(usage.bytes_ratio, 4),
        "inodes_used_ratio": round(usage.inodes_ratio, 4),
        "available_bytes": usage.avail_bytes,
        "pressure": None if pressure is None else list(pressure.over),
        "to_free_bytes": 0 if pressure is None else pressure.needed,
        "short_bytes": report.short_of_low(),
        "freed_measured_bytes": None if report.dry_run else report.freed_measured(),
    }


def _build_cache(report: Report) -> dict[str, Any] | None:
    cache = report.plan.build_cache
    if cache is None:
        return None
    o = report.build_cache
    return {
        "available": cache.available,
        "entries": cache.entries,
        "bytes": cache.bytes,
        "planned_entries": cache.planned()[0],
        "planned_bytes": cache.planned()[1],
        "outcome": "planned" if report.dry_run or o is None else o.status,
        "pruned_entries": 0 if o is None else o.entries,
        "reclaimed_bytes": 0 if o is None else o.reclaimed,
        "error": None if o is None else o.error,
    }


def pressure_line(report: Report) -> str | None:
    """One line when the watched filesystem was under pressure: what it had to free, what
    the plan frees, and (after a run) what statvfs saw go."""
    plan = report.plan
    if plan.pressure is None or plan.disk is None:
        return None
    text = (
        f"{plan.pressure.reason} on {plan.disk.path}: to free {format_bytes(plan.pressure.needed)}"
    )
    short = report.short_of_low()
    text += f", planned {format_bytes(report.planned_to_free())}"
    if short:
        text += f" ({format_bytes(short)} short: the rest is protected or not gcd's)"
    if not report.dry_run and report.disk_after is not None:
        text += f"; freed {format_bytes(report.freed_measured())} (measured)"
    return text


def bytes_line(report: Report) -> str | None:
    """After a run that removed images: the bytes freed as predicted, as gcd counts what it
    removed, as the engine counts its store, and as the filesystem measures."""
    if report.dry_run or not report.removed():
        return None
    accounted = report.freed_accounted()
    measured = _measured(report)
    return (
        f"bytes freed: {format_bytes(report.plan.reclaimable_bytes)} planned, "
        f"{format_bytes(report.reclaimed_bytes)} reclaimed, "
        + (
            "the engine keeps no count"
            if accounted is None
            else f"{format_bytes(accounted)} by the engine's count"
        )
        + (
            ", disk not watched"
            if measured is None or report.plan.disk is None
            else f", {format_bytes(measured)} measured on {report.plan.disk.path}"
        )
    )


def build_cache_line(report: Report) -> str | None:
    """One line on BuildKit's cache, when `build_cache` is set."""
    cache = report.plan.build_cache
    if cache is None:
        return None
    if not cache.available:
        return "build cache: this engine keeps none (Podman); build_cache has nothing to prune"
    text = f"build cache: {cache.entries} entries, {format_bytes(cache.bytes)}; "
    o = report.build_cache
    if not report.dry_run and o is not None and o.status == "done":
        return text + f"pruned {o.entries} entries, {format_bytes(o.reclaimed)}"
    if not report.dry_run and o is not None:
        return text + f"prune {o.status}" + (f": {o.error}" if o.error else "")
    parts = []
    if cache.unused[0]:
        parts.append(
            f"{cache.unused[0]} unused for {format_duration(timedelta(seconds=cache.unused_for or 0))} or more"
        )
    if cache.over[0]:
        parts.append(f"{cache.over[0]} over keep_storage {format_bytes(cache.keep_storage or 0)}")
    if cache.pressed[0]:
        parts.append(f"{cache.pressed[0]} least recently used, for disk pressure")
    if not parts:
        return text + "nothing to prune"
    entries, size = cache.planned()[0], format_bytes(cache.planned()[1])
    return text + f"would prune {entries} entries, {size} ({', '.join(parts)})"


def _container(report: Report, c: ContainerDecision) -> dict[str, Any]:
    o = report.container_outcomes.get(c.container_id, _KEPT[report.dry_run])
    reasons = [c.reason] + ([f"{o.status}: {o.reason}"] if o.reason else [])
    return {
        "container_id": c.container_id,
        "name": c.name,
        "image_id": c.image_id,
        "state": c.state,
        "decision": c.action,
        "reasons": reasons,
        "outcome": o.status,
        "error": o.error,
    }


def _decision(report: Report, d: Decision) -> dict[str, Any]:
    o = report.outcome(d.image_id)
    reasons = list(d.reasons)
    if o.reason:
        reasons.append(f"{o.status}: {o.reason}")
    return {
        "image_id": d.image_id,
        "tags": list(d.tags),
        "decision": d.action,
        "untag": list(d.untag),
        "reasons": reasons,
        "bytes": d.bytes,
        "size": report.plan.snapshot.image(d.image_id).size,
        "outcome": o.status,
        "error": o.error,
        # The references the engine said went, exactly (a skipped image may have lost some).
        "untagged": list(o.untagged),
        "restored": list(o.restored),
    }


def to_text(report: Report) -> str:
    """The engine it ran on, one row an image (removals first), then a summary line."""
    plan = report.plan
    rows: list[tuple[str, ...]] = [
        _COLUMNS if report.dry_run else (*_COLUMNS[:3], "OUTCOME", *_COLUMNS[3:])
    ]
    for d in _ordered(plan):
        o = report.outcome(d.image_id)
        decision = "untag" if d.action == "keep" and d.untag else d.action
        reason = d.reasons[0] if d.reasons else ""
        if len(d.reasons) > 1:
            reason += f" (+{len(d.reasons) - 1} more)"
        if o.reason or o.error:
            reason = f"{o.reason or o.error}; planned: {reason}"
        tags = tag_cell(d.tags)
        size = format_bytes(plan.snapshot.image(d.image_id).size)
        row = (short_id(d.image_id), tags, decision, size, reason)
        # A kept image with nothing to do has no outcome worth a word in the table.
        shown = "-" if d.action == "keep" and not d.untag and o.status == "done" else o.status
        rows.append(row if report.dry_run else (*row[:3], shown, *row[3:]))
    lines = [f"engine: {plan.snapshot.engine}", *_aligned(rows)]
    if plan.containers:
        lines += ["", *_aligned(_container_rows(report))]
    lines.append("")
    for extra in (build_cache_line(report), pressure_line(report), bytes_line(report)):
        if extra is not None:
            lines.append(extra)
    lines.append(summary_line(report))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _container_rows(report: Report) -> list[tuple[str, ...]]:
    """One row a stopped container, removals first."""
    columns = ("CONTAINER", "NAME", "STATE", "DECISION", "REASON")
    rows: list[tuple[str, ...]] = [
        columns if report.dry_run else (*columns[:4], "OUTCOME", columns[4])
    ]
    for c in sorted(report.plan.containers, key=lambda c: (c.action != "remove", c.name)):
        o = report.container_outcomes.get(c.container_id, _KEPT[report.dry_run])
        reason = c.reason
        if o.reason or o.error:
            reason = f"{o.reason or o.error}; planned: {reason}"
        row = (short_id(c.container_id), c.name, c.state, c.action, reason)
        shown = "-" if c.action == "keep" else o.status
        rows.append(row if report.dry_run else (*row[:4], shown, row[4]))
    return rows


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell; the last one (the reason) runs on."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]


def tag_cell(tags: tuple[str, ...], shown: int = 2) -> str:
    """`app:1, app:2 … (+9,998)`: a table row stays readable however many tags an image
    has (the JSON document lists them all)."""
    if not tags:
        return "<none>"
    if len(tags) <= shown + 1:
        return ", ".join(tags)
    return f"{', '.join(tags[:shown])} … (+{len(tags) - shown:,})"


def summary_line(report: Report) -> str:
    s = summary(report)
    counts = f"{s['images']} images, {s['remove']} to remove, {s['untag']} tags to untag, {s['keep']} kept"
    if report.plan.containers and report.dry_run:
        counts += f"; stopped containers to remove: {s['containers_to_remove']}"
    elif report.plan.containers:
        counts += f"; stopped containers removed: {s['containers_removed']} of {s['containers_to_remove']}"
    if report.dry_run:
        return f"plan: {counts}; {format_bytes(report.plan.reclaimable_bytes)} reclaimable (dry run: nothing removed)"
    return (
        f"run: {counts}; removed {len(report.removed())}, skipped {s['skipped']}, failed {s['failed']}; "
        f"reclaimed {format_bytes(report.reclaimed_bytes)} of {format_bytes(report.plan.reclaimable_bytes)} planned"
        + (f"; UNPLANNED removals {s['unplanned']}" if s["unplanned"] else "")
        + (f"; tags put back {s['tags_restored']}" if s["tags_restored"] else "")
    )


def explain(plan: Plan, image_id: str) -> str:
    """Every reason behind one image's decision, for `gcd explain`."""
    d = plan.decision(image_id)
    image = plan.snapshot.image(image_id)
    lines = [
        f"{image.id}",
        f"  tags:     {', '.join(d.tags) or '<none>'}",
        f"  created:  {_iso(image.created)}",
        f"  size:     {format_bytes(image.size)} ({_freed_text(plan, d)})",
        f"  decision: {d.action}" + (f" (untag {', '.join(d.untag)})" if d.untag else ""),
        "  reasons:",
        *(f"    - {r}" for r in d.reasons),
    ]
    return "\n".join(lines) + "\n"


def _freed_text(plan: Plan, d: Decision) -> str:
    """What removing the image frees, parents that go with it included: what the plan counts
    in its row or, for a kept image, what removing it too would add to the plan."""
    snapshot = plan.snapshot
    if d.action == "remove":
        owner = policy.intermediate_owner(snapshot, d.image_id)
        if owner is not None and owner != d.image_id:
            return f"goes with {short_id(owner)}, whose row counts it"
        parents = policy.parents_going_with(snapshot, d.image_id, plan)
        return f"{format_bytes(d.bytes)} freed by removing it{_with(parents)}"
    removed = {r.image_id for r in plan.removals()}
    parents = policy.parents_going_with(snapshot, d.image_id, plan)
    before = sum(snapshot.freed_bytes(removed).values())
    extra = sum(snapshot.freed_bytes(removed | {d.image_id, *parents}).values()) - before
    return f"removing it would free {format_bytes(extra)}{_with(parents)}"


def _with(parents: list[str]) -> str:
    if not parents:
        return ""
    plural = "s" if len(parents) > 1 else ""
    return f", with its parent image{plural} {', '.join(short_id(p) for p in parents)}"


def _ordered(plan: Plan) -> list[Decision]:
    return sorted(
        plan.decisions, key=lambda d: (d.action != "remove", d.tags == (), d.tags, d.image_id)
    )


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
