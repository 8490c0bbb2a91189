"""YAML -> validated Config. Every problem names file, line and key path; all are reported.

Each option is declared once, on its section's dataclass (gcd/options.py): its default, its
kind, and the words docs/configuration.md shows. The reading below is generic; what is
particular to one option (an engine address, a crontab line, a rule's groups) is a kind or a
section check of its own here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal

import yaml

from gcd.errors import ConfigError
from gcd.options import (
    Boolean,
    Choice,
    Duration,
    Fraction,
    Integer,
    Percent,
    Reader,
    Regex,
    Section,
    Size,
    Text,
    cut,
    declared,
    option,
    rows,
    table,
)
from gcd.patterns import ANY, Pattern
from gcd.transport import SSH_HELP, Tls
from gcd.units import format_duration

DEFAULT_PATH = "/etc/gcd/config.yaml"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
# Bounds on what a configuration may hold; each is an error naming file and line.
MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_VALUES = 10_000  # values, aliases expanded
# libyaml's loader where it is installed (ten times faster), with the same line numbers.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A safety.min_age below this draws a warning: a legacy build's newest layer image is
# untagged, childless and unused for a moment between two steps, and only its age protects
# it; ten minutes also cover a slow engine committing a large layer.
MIN_AGE_FLOOR = timedelta(minutes=10)
ORDER_KINDS = ("semver", "numeric", "natural", "created", "tagged", "first_seen", "last_used")
_ORDER_WITH_GROUP = ("semver", "numeric")
_ORDER_USAGE = (
    "semver(group) | numeric(group) | natural | created | tagged | first_seen | last_used"
)
_ORDER = re.compile(r"(?P<kind>[a-z_]+)(?:\((?P<group>[A-Za-z_][A-Za-z0-9_]*)\))?")
_LISTEN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\s]*):(?P<port>\d{1,5})")
_IMAGE_ID = re.compile(r"(?:sha256:)?[0-9a-f]{4,64}")
_RULE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ENGINE_SCHEME = re.compile(r"(unix|tcp|http|https|ssh|npipe)://")


# --- kinds particular to one option ----------------------------------------------------------


@dataclass(frozen=True)
class _Version:
    def read(self, r: Reader, node: yaml.Node, path: str) -> int | None:
        value = r.typed(node, path, ("int",), "1")
        if value not in (1, None):
            r.problem(node, path, f"unsupported version {node.value}; this gcd reads version 1")
        return 1 if value == 1 else None

    def schema(self) -> dict[str, Any]:
        return {"const": 1}


@dataclass(frozen=True)
class _EngineUrl:
    def read(self, r: Reader, node: yaml.Node, path: str) -> str | None:
        url = r.string(node, path, nullable=True)
        if url is not None and not _ENGINE_SCHEME.match(url):
            r.problem(
                node, path, f"expected unix://, tcp:// or ssh:// address, got {json.dumps(url)}"
            )
        if url is not None and url.startswith("ssh://") and not _ssh_installed():
            r.problem(node, path, SSH_HELP)
        return url

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"], "pattern": "^(unix|tcp|http|https|ssh|npipe)://"}


@dataclass(frozen=True)
class _Cron:
    def read(self, r: Reader, node: yaml.Node, path: str) -> str | None:
        cron = r.string(node, path)
        if cron is None:
            return None
        from apscheduler.triggers.cron import CronTrigger  # only a cron line needs it

        try:
            CronTrigger.from_crontab(cron, timezone="UTC")
        except ValueError as e:
            r.problem(node, path, f"invalid crontab line {json.dumps(cron)}: {e}")
        return cron

    def schema(self) -> dict[str, Any]:
        return {"type": "string"}


@dataclass(frozen=True)
class _Listen:
    def read(self, r: Reader, node: yaml.Node, path: str) -> str | None:
        value = r.string(node, path)
        if value is None:
            return None
        match = _LISTEN.fullmatch(value)
        if value and (match is None or not 0 < int(match["port"]) < 65536):
            r.problem(
                node,
                path,
                f'expected host:port such as 127.0.0.1:9782, or "" to disable, got {json.dumps(value)}',
            )
            return None
        if match is not None and match["host"].strip("[]") in ("", "0.0.0.0", "::"):
            r.warning(
                node,
                path,
                f"{json.dumps(value)} serves /metrics on every interface, to other hosts too; "
                "name an address (127.0.0.1:9782) unless that is meant",
            )
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": r"^$|^(\[[0-9A-Fa-f:.]+\]|[^:\s]*):[0-9]{1,5}$"}


@dataclass(frozen=True)
class _List:
    """A list of values of one kind (group_by: names of groups, checked by the rule)."""

    item: Any

    def read(self, r: Reader, node: yaml.Node, path: str) -> tuple[Any, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            r.problem(node, path, f"expected a list such as [repository], got {r.describe(node)}")
            return None
        values = (self.item.read(r, item, f"{path}[{j}]") for j, item in enumerate(node.value))
        return tuple(v for v in values if v is not None)

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.item.schema()}


@dataclass(frozen=True, slots=True)
class OrderBy:
    kind: str
    group: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}({self.group})" if self.group else self.kind


@dataclass(frozen=True)
class _OrderBy:
    """`order_by`: its form; whether the group exists is the rule's check."""

    def read(self, r: Reader, node: yaml.Node, path: str) -> OrderBy | None:
        text = r.string(node, path)
        if text is None:
            return None
        m = _ORDER.fullmatch(text.replace(" ", ""))
        if m is None or m["kind"] not in ORDER_KINDS:
            r.problem(node, path, f"expected {_ORDER_USAGE}, got {json.dumps(text)}")
            return None
        kind, group = m["kind"], m["group"]
        if kind in _ORDER_WITH_GROUP and group is None:
            r.problem(node, path, f"{kind} needs a named group of match.tag, e.g. {kind}(version)")
            return None
        if kind not in _ORDER_WITH_GROUP and group is not None:
            r.problem(node, path, f"{kind} takes no group, got {json.dumps(text)}")
            return None
        return OrderBy(kind, group)

    def schema(self) -> dict[str, Any]:
        kinds = "|".join(k for k in ORDER_KINDS if k not in _ORDER_WITH_GROUP)
        with_group = "|".join(_ORDER_WITH_GROUP)
        pattern = rf"^\s*(({kinds})|({with_group})\s*\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\))\s*$"
        return {"type": "string", "pattern": pattern}


@dataclass(frozen=True)
class _RuleName:
    def read(self, r: Reader, node: yaml.Node, path: str) -> str | None:
        name = r.string(node, path)
        if name is not None and not _RULE_NAME.fullmatch(name):
            r.problem(node, path, f"expected letters, digits, _ . or -, got {json.dumps(name)}")
            return None
        return name

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"}


# --- the sections ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """`engine.tls`: for tcp://, in the docker CLI's terms (DOCKER_CERT_PATH and
    DOCKER_TLS_VERIFY, which apply when it is not set)."""

    cert_path: str | None = option(
        None,
        Text(nullable=True),
        "`$DOCKER_CERT_PATH`, else `~/.docker`",
        "The folder of `ca.pem`, `cert.pem` and `key.pem`.",
    )
    verify: bool = option(
        True,
        Boolean(),
        "`true`",
        "Check the engine's certificate against `ca.pem` and its name or IP address. `false` "
        "still encrypts and still sends gcd's certificate, but trusts any engine: only for a "
        "test bench.",
    )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    url: str | None = option(
        None,
        _EngineUrl(),
        "`$DOCKER_HOST`, else `unix:///var/run/docker.sock`",
        "Engine API address: `unix:///path`, `tcp://host:port` (TLS below) or `ssh://user@host` "
        "(below).",
    )
    timeout: timedelta = option(
        timedelta(seconds=60),
        Duration(positive=True),
        "`60s`",
        "Time limit for each API call. An engine that hangs fails the cycle instead of stalling "
        "it. On the containerd store gcd sends up to 256 deletes at once and the engine answers "
        "them together, so each can take as long as the batch (4 s on Docker 26 on a quiet "
        "machine, 8 s on a busy one): keep it at 30s or more there.",
    )
    tls: TlsConfig | None = option(
        None,
        Section(TlsConfig, nullable=True),
        "`null`: `DOCKER_TLS_VERIFY` and `DOCKER_CERT_PATH`",
        "TLS for a `tcp://` engine (below).",
    )


def _one_schedule(r: Reader, found: dict[str, yaml.Node], values: dict[str, Any]) -> None:
    if "every" in found and "cron" in found:
        r.problem(found["cron"], "schedule", "set one of every or cron, not both")
    if "cron" in found:
        values["every"] = None


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    every: timedelta | None = option(
        timedelta(minutes=15), Duration(positive=True), "`15m`", "Run a cycle this often."
    )
    cron: str | None = option(
        None, _Cron(), "none", 'A crontab line (`"*/15 * * * *"`), evaluated in UTC.'
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = option(
        "127.0.0.1:9782",
        _Listen(),
        "`127.0.0.1:9782`",
        "Daemon: serve `/metrics` at this `host:port` (`[::1]:9782` for IPv6; `:9782`, "
        "`0.0.0.0:9782` or `[::]:9782` mean every interface, and draw a warning: other hosts can "
        'read it then); `""` disables.',
    )
    textfile: str | None = option(
        None,
        Text(nullable=True),
        "`null`",
        "`gcd run`: also write metrics to this file for node_exporter's textfile collector "
        "(atomically, mode `0644` whatever the umask, so node_exporter can read it; the "
        "directory must exist).",
    )


def _min_age_floor(r: Reader, found: dict[str, yaml.Node], values: dict[str, Any]) -> None:
    if "min_age" in values and values["min_age"] < MIN_AGE_FLOOR:
        r.warning(
            found["min_age"],
            "safety.min_age",
            f"{format_duration(values['min_age'])} is below {format_duration(MIN_AGE_FLOOR)}: "
            "between two steps of a legacy build its newest layer image is untagged and "
            "unused, and only its age protects it (a build fails when gcd removes it); "
            "backdate test images instead of lowering min_age",
        )


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    min_age: timedelta = option(
        timedelta(hours=1),
        Duration(),
        "`1h`",
        "Nothing younger is ever removed or untagged. Age is defined below. Below `10m`, "
        "`check-config`, `gcd run` and the daemon warn (see below).",
    )
    max_removals_per_run: int = option(
        500,
        Integer(1),
        "`500`",
        "At most this many images are removed in one cycle; the oldest go first. Untagged "
        "parents removed right after their last child (intermediates) do not count.",
    )
    max_removal_fraction: float = option(
        0.5,
        Fraction(),
        "`0.5`",
        "Per repository: if the plan would remove more than this share of the repository's "
        "tagged images, none of that repository's images are removed in this cycle. `1.0` "
        "disables the guard.",
    )
    keep_one_per_repository: bool = option(
        True,
        Boolean(),
        "`true`",
        "Never remove the last tagged image of a repository: the newest one (by creation time) "
        "is kept.",
    )


@dataclass(frozen=True, slots=True)
class Protect:
    """One `protect` entry; `index` is its position, for reasons that name it."""

    index: int
    kind: Literal["ref", "tag", "label", "id", "name"]
    value: str
    regex: Pattern | None = None

    def labels_match(self, labels: Mapping[str, str]) -> bool:
        """A `label` entry: `key` (any value) or `key=value` among `labels`."""
        key, has_value, value = self.value.partition("=")
        return key in labels and (not has_value or labels[key] == value)


@dataclass(frozen=True)
class _ProtectEntry:
    """The keys of a `protect` entry (exactly one of them), for reading and for the docs."""

    ref: str | None = option(
        None,
        Text(),
        '`ref: "registry.example.com/base/*"`',
        "a glob (`*`, `?`, `[...]`) on any of the image's `repository:tag` references",
    )
    tag: Pattern | None = option(
        None,
        Regex(),
        '`tag: "(stable\\|testing\\|latest)"`',
        "a regular expression that fully matches the tag part of any reference",
    )
    label: str | None = option(
        None,
        Text(),
        '`label: "org.example.keep=true"`',
        "an image label: `key` (any value) or `key=value`",
    )
    id: str | None = option(
        None,
        Text(),
        '`id: "sha256:9f2c0e1d"`',
        "the image ID or a prefix of it (at least 4 hex digits; an ambiguous prefix protects "
        "every image it matches)",
    )


@dataclass(frozen=True)
class _ContainerProtectEntry:
    """The keys of a `containers.protect` entry (exactly one of them)."""

    name: str | None = option(
        None,
        Text(),
        '`name: "keep-*"`',
        "a glob (`*`, `?`, `[...]`) on the container's name",
    )
    label: str | None = option(
        None,
        Text(),
        '`label: "org.example.keep"`',
        "a container label: `key` (any value) or `key=value`",
    )


@dataclass(frozen=True)
class _ProtectList:
    """A list of protect entries, each with exactly one of the keys of `entry`."""

    entry: type = _ProtectEntry

    def read(self, r: Reader, node: yaml.Node, path: str) -> tuple[Protect, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            r.problem(node, path, f"expected a list, got {r.describe(node)}")
            return None
        kinds = tuple(f.name for f in declared(self.entry))
        entries = []
        for i, item in enumerate(node.value):
            at = f"{path}[{i}]"
            found = r.mapping(item, at, kinds)
            if found is None:
                continue
            if len(found) != 1:
                r.problem(item, at, f"expected exactly one of {', '.join(kinds)}")
                continue
            ((kind, value_node),) = found.items()
            value = r.string(value_node, f"{at}.{kind}")
            if value is None:
                continue
            regex = None
            if kind == "tag":
                regex = r.regex(value_node, f"{at}.tag")
                if regex is None:
                    continue
            if kind == "id" and not _IMAGE_ID.fullmatch(value):
                r.problem(
                    value_node,
                    f"{at}.id",
                    f"expected an image ID or a prefix of at least 4 hex digits, got {json.dumps(value)}",
                )
                continue
            if kind == "label" and not value.partition("=")[0]:
                r.problem(
                    value_node, f"{at}.label", f"expected key or key=value, got {json.dumps(value)}"
                )
                continue
            entries.append(Protect(i, kind, value, regex))  # type: ignore[arg-type]
        return tuple(entries)

    def schema(self) -> dict[str, Any]:
        one_of = [
            {
                "type": "object",
                "properties": {f.name: {"description": f.option.meaning, **f.option.kind.schema()}},
                "required": [f.name],
                "additionalProperties": False,
            }
            for f in declared(self.entry)
        ]
        return {"type": "array", "items": {"oneOf": one_of}}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    keep_last: int
    repository: Pattern = ANY
    tag: Pattern = ANY
    exclude_tag: Pattern | None = None
    group_by: tuple[str, ...] = ("repository",)
    order_by: OrderBy = OrderBy("created")
    keep_within: timedelta | None = None


@dataclass(frozen=True)
class _Match:
    repository: Pattern = option(
        ANY,
        Regex(),
        '`".*"`',
        "Regex, full match on the repository (`registry.example.com/team/app`).",
    )
    tag: Pattern = option(
        ANY,
        Regex(),
        '`".*"`',
        "Regex, full match on the tag. Named groups (`(?P<version>...)`) can be used by "
        "`group_by` and `order_by`.",
    )
    exclude_tag: Pattern | None = option(
        None,
        Regex(nullable=True),
        "none",
        "Regex; tags it fully matches are not matched by this rule.",
    )


def _rule_groups(r: Reader, found: dict[str, yaml.Node], values: dict[str, Any]) -> None:
    """group_by and order_by name groups of match.tag (those that exist)."""
    match = values.get("match")
    groups = set(match.tag.groupindex) if match is not None else set()
    if "group_by" in values:
        known = ", ".join(["repository", *sorted(groups)])
        kept = []
        for j, item in enumerate(found["group_by"].value):
            name = item.value if isinstance(item, yaml.ScalarNode) else None
            if name not in values["group_by"]:
                continue  # not a string: said
            if name != "repository" and name not in groups:
                r.problem(
                    item,
                    f"{_RULE_AT}.group_by[{j}]",
                    f"unknown group {json.dumps(name)}; match.tag has no group of that name (expected one of: {known})",
                )
                continue
            kept.append(name)
        values["group_by"] = tuple(kept)
    order = values.get("order_by")
    if order is not None and order.group is not None and order.group not in groups:
        r.problem(
            found["order_by"],
            f"{_RULE_AT}.order_by",
            f"unknown group {json.dumps(order.group)}; match.tag has no group of that name",
        )
        del values["order_by"]


_RULE_AT = "{rule}"  # replaced by the rule's path (rules[i]) in its messages


@dataclass(frozen=True)
class _RuleKeys:
    """A rule as written (`match` nested); `_RuleList` makes the `Rule` of it."""

    name: str | None = option(
        None,
        _RuleName(),
        "required",
        "Unique; names the rule in reasons and metrics. Letters, digits, `_ . -`.",
        required="required",
    )
    match: _Match = option(_Match(), Section(_Match), "", "Which tags the rule looks at (below).")
    group_by: tuple[str, ...] = option(
        ("repository",),
        _List(Text()),
        "`[repository]`",
        "Ranking is done separately in each group: `repository` and/or named groups of "
        "`match.tag`. `[]` ranks all matched tags together.",
    )
    order_by: OrderBy = option(
        OrderBy("created"),
        _OrderBy(),
        "`created`",
        "How images in a group are ranked, newest first (below).",
    )
    keep_last: int | None = option(
        None,
        Integer(1),
        "required",
        "Keep the top N images of each group (>= 1). Counts distinct images, not tags.",
        required="required (an integer >= 1)",
    )
    keep_within: timedelta | None = option(
        None,
        Duration(nullable=True),
        "none",
        "Also keep every image whose age is below this. An image with no age signal at all "
        "(created before 2000, no tag time, present before gcd's records began) counts as old "
        "here too.",
    )


@dataclass(frozen=True)
class _RuleList:
    def read(self, r: Reader, node: yaml.Node, path: str) -> tuple[Rule, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            r.problem(node, path, f"expected a list, got {r.describe(node)}")
            return None
        rules: list[Rule] = []
        names: set[str] = set()
        for i, item in enumerate(node.value):
            at = f"{path}[{i}]"
            before = len(r.problems)
            section = Section(_RuleKeys, check=_rule_groups)
            keys = section.read(r, item, at)
            # The section check speaks of "{rule}": its path is known here.
            r.problems[before:] = [
                (n, text.replace(_RULE_AT, at)) for n, text in r.problems[before:]
            ]
            if keys is None or len(r.problems) > before:
                continue
            if keys.name in names:
                r.problem(item, f"{at}.name", f"duplicate rule name {json.dumps(keys.name)}")
                continue
            names.add(keys.name)
            m = keys.match
            rules.append(
                Rule(
                    keys.name,
                    keys.keep_last,
                    m.repository,
                    m.tag,
                    m.exclude_tag,
                    keys.group_by,
                    keys.order_by,
                    keys.keep_within,
                )
            )
        return tuple(rules)

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": Section(_RuleKeys).schema()}


@dataclass(frozen=True, slots=True)
class DanglingConfig:
    action: Literal["remove", "keep"] = option(
        "remove",
        Choice(("remove", "keep")),
        "`remove`",
        "`remove` dangling images after the grace period, or `keep` them.",
    )
    min_age: timedelta = option(
        timedelta(hours=24),
        Duration(),
        "`24h`",
        "Grace period, counted from when gcd first saw the image dangling. Images that were "
        "already dangling on the first cycle of a new state store use their age instead, and "
        "the reason says so: `dangling since before gcd's records began, age 5w5d >= "
        "dangling.min_age 1d`.",
    )


def _low_below_high(r: Reader, found: dict[str, yaml.Node], values: dict[str, Any]) -> None:
    defaults = DiskConfig()
    for low, high in (("low", "high"), ("inodes_low", "inodes_high")):
        a, b = values.get(low, getattr(defaults, low)), values.get(high, getattr(defaults, high))
        if a >= b:
            node = found.get(low) or found.get(high)
            assert node is not None  # one of them was set, or the defaults would hold
            r.problem(node, f"disk.{low}", f"expected below disk.{high} ({b:.0%}), got {a:.0%}")


@dataclass(frozen=True, slots=True)
class DiskConfig:
    path: str = option(
        "auto",
        Text(),
        "`auto`",
        "The filesystem to watch: `auto` is the engine's data root (`/info` `DockerRootDir`); "
        "or a path on it.",
    )
    high: float = option(
        0.85, Percent(), "`85%`", "Used share of the filesystem's bytes that starts pressure."
    )
    low: float = option(0.75, Percent(), "`75%`", "Used share that pressure frees down to.")
    inodes_high: float = option(
        0.90, Percent(), "`90%`", "Used share of the filesystem's inodes that starts pressure."
    )
    inodes_low: float = option(
        0.80, Percent(), "`80%`", "Used share of inodes that pressure frees down to."
    )
    budget: int | None = option(
        None,
        Size(),
        "none",
        "A cap on the engine's own bytes (images and build cache), e.g. `60GB`: over it is "
        "pressure too, freed down to 90 % of it.",
    )
    check_every: timedelta = option(
        timedelta(seconds=15),
        Duration(positive=True),
        "`15s`",
        "Daemon: measure the filesystem this often (one `statvfs`); `gcd run` measures once.",
    )
    evict: Literal["lru", "none"] = option(
        "lru",
        Choice(("lru", "none")),
        "`lru`",
        "What pressure may take beyond retention: `lru`, images the rules keep, least "
        "recently used first (never protected ones); `none`, nothing more.",
    )


@dataclass(frozen=True, slots=True)
class BuildCacheConfig:
    keep_storage: int | None = option(
        None,
        Size(),
        "none",
        "Keep at most this much BuildKit build cache (`10GB`, `512MiB`): each cycle removes "
        "unused entries, least recently used first, until the cache fits.",
    )
    unused_for: timedelta | None = option(
        None,
        Duration(nullable=True),
        "none",
        "Each cycle, remove cache entries unused this long (`72h`).",
    )

    @property
    def enabled(self) -> bool:
        return self.keep_storage is not None or self.unused_for is not None


@dataclass(frozen=True, slots=True)
class ContainersConfig:
    remove_exited_after: timedelta | None = option(
        None,
        Duration(nullable=True),
        "none",
        "Remove containers that exited this long ago (by their finish time), or were created "
        "this long ago and never started (`7d`). Never running, paused or restarting ones, "
        "and never a volume. `null`: gcd removes no container.",
    )
    protect: tuple[Protect, ...] = option(
        (),
        _ProtectList(_ContainerProtectEntry),
        "`[]`",
        "Containers that are never removed (below).",
    )


@dataclass(frozen=True, slots=True)
class Config:
    version: int = option(
        1, _Version(), "required", "Always `1`.", required="required; write `version: 1` at the top"
    )
    engine: EngineConfig = option(
        EngineConfig(), Section(EngineConfig), "", "Where the Docker engine is (below)."
    )
    schedule: ScheduleConfig = option(
        ScheduleConfig(),
        Section(ScheduleConfig, check=_one_schedule),
        "",
        "When the daemon runs a cycle (below).",
    )
    metrics: MetricsConfig = option(
        MetricsConfig(), Section(MetricsConfig), "", "Metrics endpoint and textfile (below)."
    )
    state_dir: str = option(
        "/var/lib/gcd",
        Text(),
        "`/var/lib/gcd`",
        "Directory of gcd's own records (`state.db`, SQLite).",
    )
    safety: SafetyConfig = option(
        SafetyConfig(),
        Section(SafetyConfig, check=_min_age_floor),
        "",
        "Guards that apply whatever the rules say (below).",
    )
    protect: tuple[Protect, ...] = option(
        (), _ProtectList(), "`[]`", "Images that are never removed (below)."
    )
    rules: tuple[Rule, ...] = option(
        (), _RuleList(), "`[]`", "Retention rules, one per tag taxonomy (below)."
    )
    dangling: DanglingConfig = option(
        DanglingConfig(), Section(DanglingConfig), "", "What happens to dangling images (below)."
    )
    unmatched: Literal["keep", "expire"] = option(
        "keep",
        Choice(("keep", "expire")),
        "`keep`",
        "Tags that no rule matches: `keep` them, or let them `expire`.",
    )
    untag_expired: bool = option(
        False,
        Boolean(),
        "`false`",
        "Untag expired tags that sit on an image kept for another reason.",
    )
    disk: DiskConfig = option(
        DiskConfig(),
        Section(DiskConfig, check=_low_below_high),
        "",
        "Disk pressure: when a full filesystem starts a cycle, and what it frees (below).",
    )
    regret_window: timedelta = option(
        timedelta(hours=24),
        Duration(),
        "`24h`",
        "A tag of an image gcd removed that comes back within this (built, pulled, loaded or "
        "tagged again) is a regret: counted in `gcd_regret_total{rule}` and logged with what "
        "removed it. `0s`: none are tracked.",
    )
    build_cache: BuildCacheConfig = option(
        BuildCacheConfig(),
        Section(BuildCacheConfig),
        "",
        "BuildKit's build cache, pruned each cycle (below).",
    )
    containers: ContainersConfig = option(
        ContainersConfig(),
        Section(ContainersConfig),
        "",
        "Stopped containers gcd removes, which frees the images they pin (below).",
    )
    source: str | None = None
    # Settings that are valid but risky, each as file:line: key: warning: why.
    warnings: tuple[str, ...] = ()

    def engine_url(self, environ: Mapping[str, str] = os.environ) -> str:
        """`engine.url`, else `$DOCKER_HOST`, else the default socket."""
        return self.engine.url or environ.get("DOCKER_HOST") or DEFAULT_SOCKET

    def engine_tls(self, environ: Mapping[str, str] = os.environ) -> Tls | None:
        """TLS for a tcp:// engine: `engine.tls`, else DOCKER_TLS_VERIFY/DOCKER_CERT_PATH."""
        tls = self.engine.tls
        if tls is None:
            return Tls.from_environment(environ)
        path = tls.cert_path or environ.get("DOCKER_CERT_PATH") or os.path.expanduser("~/.docker")
        return Tls.from_cert_path(path, tls.verify)


def schema() -> dict[str, Any]:
    """The configuration's JSON Schema (`gcd schema`), from the declarations above."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gcd configuration",
        **Section(Config).schema(),
    }


def config_path(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The file to read: --config, else $GCD_CONFIG, else the default path if it exists."""
    if explicit:
        return explicit
    if environ.get("GCD_CONFIG"):
        return environ["GCD_CONFIG"]
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the configuration; built-in defaults when no file is configured."""
    path = config_path(explicit, environ)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration: {e.strerror}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            [f"{path}:1: the configuration is larger than {MAX_FILE_BYTES // 1_000_000} MB"]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            [f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"]
        ) from None
    return parse(text, path)


def parse(text: str, filename: str) -> Config:
    """Validate a YAML document; raise ConfigError listing every problem."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: not text YAML can read
        line = text[: e.start].count("\n") + 1
        raise ConfigError([f"{filename}:{line}: not UTF-8 text; save the file as UTF-8"]) from None
    try:
        _check_shape(text, filename)
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError([f"{filename}:{_line(e, text)}: invalid YAML: {_problem(e)}"]) from None
    if root is None:
        raise ConfigError([f"{filename}:1: version: required; write `version: 1` at the top"])
    reader = Reader(filename)
    config = Section(Config).read(reader, root, "")
    if reader.problems:
        # Stable sort: problems on one line keep the order they were found in.
        raise ConfigError([text for _, text in sorted(reader.problems, key=lambda p: p[0])])
    assert isinstance(config, Config)
    warnings = tuple(text for _, text in sorted(reader.warnings, key=lambda p: p[0]))
    return replace(config, source=filename, warnings=warnings)


def _check_shape(text: str, filename: str) -> None:
    """Refuse, before anything is built, a document nested deeper than MAX_DEPTH or whose
    aliases expand to more than MAX_VALUES values (an alias bomb of a few hundred bytes can
    stand for billions). One pass over the parser's events: no recursion, no expansion."""
    sizes: dict[str, int] = {}
    stack: list[list[Any]] = [[0, None]]  # [values so far, anchor] per open collection
    for event in yaml.parse(text, Loader=_LOADER):
        line = event.start_mark.line + 1 if event.start_mark else 1
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([0, event.anchor])
            if len(stack) - 1 > MAX_DEPTH:
                raise ConfigError(
                    [f"{filename}:{line}: invalid YAML: nested deeper than {MAX_DEPTH} levels"]
                )
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            size, anchor = stack.pop()
            size += 1
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
        elif isinstance(event, yaml.AliasEvent):
            size, anchor = sizes.get(event.anchor or "", 1), None
        else:
            continue
        if anchor:
            sizes[anchor] = size
        stack[-1][0] += size
        if stack[-1][0] > MAX_VALUES:
            raise ConfigError(
                [
                    f"{filename}:{line}: invalid YAML: more than {MAX_VALUES} values once its "
                    "aliases are expanded"
                ]
            )


def _line(error: yaml.YAMLError, text: str) -> int:
    """The 1-based line of a YAML error; a reader error (a NUL, a control character) has
    only a character position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(error, "position", None)
    if isinstance(position, int):
        return text[:position].count("\n") + 1
    return 1


def _problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.reader.ReaderError):
        code = error.character if isinstance(error.character, int) else ord(error.character)
        return f"character U+{code:04X} is not allowed in YAML"
    return cut(str(getattr(error, "problem", None) or error))


def _ssh_installed() -> bool:
    """Whether docker-py's ssh extra (paramiko) is there, without importing it."""
    import importlib.util

    return importlib.util.find_spec("paramiko") is not None


def docs_tables() -> dict[str, str]:
    """The option tables of docs/configuration.md, by the section they describe."""
    rule_rows = []
    for key, o in rows(_RuleKeys):
        if key == "match":
            rule_rows += rows(_Match, "match.")
        else:
            rule_rows.append((key, o))

    def entries(cls: type) -> str:
        lines = ["| entry | matches |", "|---|---|"]
        return "\n".join(lines + [f"| {o.default} | {o.meaning} |" for _, o in rows(cls)])

    return {
        "top": table(rows(Config)),
        "engine": table(rows(EngineConfig)),
        "engine.tls": table(rows(TlsConfig)),
        "schedule": table(rows(ScheduleConfig)),
        "metrics": table(rows(MetricsConfig)),
        "safety": table(rows(SafetyConfig)),
        "protect": entries(_ProtectEntry),
        "rules": table(rule_rows),
        "dangling": table(rows(DanglingConfig)),
        "containers": table(rows(ContainersConfig)),
        "build_cache": table(rows(BuildCacheConfig)),
        "disk": table(rows(DiskConfig)),
        "containers.protect": entries(_ContainerProtectEntry),
    }


def option_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key the configuration takes, as a path: `engine.tls.verify`, `rules[].match.tag`."""
    keys = []
    for f in declared(cls):
        path = prefix + f.name
        keys.append(path)
        kind = f.option.kind
        if isinstance(kind, Section):
            keys += option_keys(kind.cls, f"{path}.")
        elif isinstance(kind, _ProtectList):
            keys += option_keys(kind.entry, f"{path}[].")
        elif isinstance(kind, _RuleList):
            keys += option_keys(_RuleKeys, f"{path}[].")
    return keys
