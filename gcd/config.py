"""YAML -> validated Config. Every problem names file, line and key path; all are reported."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal

import yaml

from gcd.errors import ConfigError
from gcd.patterns import ANY, Pattern, PatternError
from gcd.transport import SSH_HELP, Tls
from gcd.units import format_duration, parse_duration

DEFAULT_PATH = "/etc/gcd/config.yaml"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
# Bounds on what a configuration may hold; each is an error naming file and line.
MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_VALUES = 10_000  # values, aliases expanded
MAX_DURATION = timedelta(days=3650)  # ten years: a schedule or an age longer means a typo
_STANDARD = "tag:yaml.org,2002:"
# libyaml's loader where it is installed (ten times faster), with the same line numbers.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A safety.min_age below this draws a warning: a legacy build's newest layer image is
# untagged, childless and unused for a moment between two steps, and only its age protects
# it; ten minutes also cover a slow engine committing a large layer.
MIN_AGE_FLOOR = timedelta(minutes=10)
# Said after RE2's own words when it refuses a pattern (docs/configuration.md, Patterns).
RE2_SYNTAX = "patterns use RE2 syntax: no backreferences or lookaround"
ORDER_KINDS = ("semver", "numeric", "natural", "created", "tagged", "first_seen", "last_used")
_ORDER_WITH_GROUP = ("semver", "numeric")
_ORDER = re.compile(r"(?P<kind>[a-z_]+)(?:\((?P<group>[A-Za-z_][A-Za-z0-9_]*)\))?")
_LISTEN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\s]*):(?P<port>\d{1,5})")
_IMAGE_ID = re.compile(r"(?:sha256:)?[0-9a-f]{4,64}")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """`engine.tls`: for tcp://, in the docker CLI's terms (DOCKER_CERT_PATH and
    DOCKER_TLS_VERIFY, which apply when it is not set)."""

    cert_path: str | None = None  # ca.pem, cert.pem and key.pem; else $DOCKER_CERT_PATH
    verify: bool = True


@dataclass(frozen=True, slots=True)
class EngineConfig:
    url: str | None = None
    timeout: timedelta = timedelta(seconds=60)
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    every: timedelta | None = timedelta(minutes=15)
    cron: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9782"
    textfile: str | None = None


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    min_age: timedelta = timedelta(hours=1)
    max_removals_per_run: int = 500
    max_removal_fraction: float = 0.5
    keep_one_per_repository: bool = True


@dataclass(frozen=True, slots=True)
class Protect:
    """One `protect` entry; `index` is its position, for reasons that name it."""

    index: int
    kind: Literal["ref", "tag", "label", "id"]
    value: str
    regex: Pattern | None = None


@dataclass(frozen=True, slots=True)
class OrderBy:
    kind: str
    group: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}({self.group})" if self.group else self.kind


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


@dataclass(frozen=True, slots=True)
class DanglingConfig:
    action: Literal["remove", "keep"] = "remove"
    min_age: timedelta = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Config:
    source: str | None = None
    engine: EngineConfig = EngineConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    metrics: MetricsConfig = MetricsConfig()
    state_dir: str = "/var/lib/gcd"
    safety: SafetyConfig = SafetyConfig()
    protect: tuple[Protect, ...] = ()
    rules: tuple[Rule, ...] = ()
    dangling: DanglingConfig = DanglingConfig()
    unmatched: Literal["keep", "expire"] = "keep"
    untag_expired: bool = False
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
    checker = _Checker(filename)
    config = checker.config(root)
    if checker.problems:
        # Stable sort: problems on one line keep the order they were found in.
        raise ConfigError([text for _, text in sorted(checker.problems, key=lambda p: p[0])])
    assert config is not None
    warnings = tuple(text for _, text in sorted(checker.warnings, key=lambda p: p[0]))
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
    return _cut(str(getattr(error, "problem", None) or error))


def _cut(text: str, most: int = 60) -> str:
    """A value quoted in a message, cut to `most` characters."""
    return text if len(text) <= most else f"{text[: most - 1]}… ({len(text):,} characters)"


def _ssh_installed() -> bool:
    """Whether docker-py's ssh extra (paramiko) is there, without importing it."""
    import importlib.util

    return importlib.util.find_spec("paramiko") is not None


def _given(value: Any, default: Any) -> Any:
    """The validated value, or the default where there was none (0s and [] are values)."""
    return default if value is None else value


class _Checker:
    """Walks the node tree: values come from nodes so every problem has a line number."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node, path: str, message: str) -> None:
        line = node.start_mark.line + 1
        where = f"{path}: " if path else ""
        self.problems.append((line, f"{self.filename}:{line}: {where}{message}"))

    def warning(self, node: yaml.Node, path: str, message: str) -> None:
        line = node.start_mark.line + 1
        self.warnings.append((line, f"{self.filename}:{line}: {path}: warning: {message}"))

    # --- structure -----------------------------------------------------------------------

    def mapping(
        self, node: yaml.Node, path: str, allowed: tuple[str, ...]
    ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, f"expected a mapping, got {self.describe(node)}")
            return None
        found: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, f"a key must be a name, got {self.describe(key_node)}")
                continue
            key = _cut(str(key_node.value))
            where = f"{path}.{key}" if path else key
            if key in found:
                self.problem(key_node, where, "duplicate key")
            elif key not in allowed:
                self.problem(
                    key_node, where, f"unknown key (expected one of: {', '.join(allowed)})"
                )
            else:
                found[key] = value_node
        return found

    def describe(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if node.tag == f"{_STANDARD}str":
            return _cut(json.dumps(str(node.value)))
        shown = _cut(str(node.value))
        return shown if node.tag.startswith(_STANDARD) else f"{_cut(node.tag, 30)} {shown}"

    def scalar(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def typed(self, node: yaml.Node, path: str, kinds: tuple[str, ...], expected: str) -> Any:
        """The node's value if its YAML type is one of `kinds` (`str`, `int`, ...), else None.
        Only YAML's own types count: `!x:str` is not a string, and `!!int abc` is not an
        integer however it is tagged."""
        kind = node.tag.removeprefix(_STANDARD)
        if isinstance(node, yaml.ScalarNode) and node.tag.startswith(_STANDARD) and kind in kinds:
            try:
                return self.scalar(node)
            except (ValueError, OverflowError, KeyError, TypeError, yaml.YAMLError):
                pass  # `!!int abc`, `!!float xyz`, `!!bool maybe`, an integer of 5,000 digits
        self.problem(node, path, f"expected {expected}, got {self.describe(node)}")
        return None

    def string(self, node: yaml.Node, path: str, nullable: bool = False) -> str | None:
        kinds = ("str", "null") if nullable else ("str",)
        return self.typed(node, path, kinds, "a string or null" if nullable else "a string")  # type: ignore[no-any-return]

    def integer(self, node: yaml.Node, path: str, minimum: int) -> int | None:
        value = self.typed(node, path, ("int",), f"an integer >= {minimum}")
        if value is not None and value < minimum:
            self.problem(node, path, f"expected an integer >= {minimum}, got {value}")
            return None
        return value  # type: ignore[no-any-return]

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        return self.typed(node, path, ("bool",), "true or false")  # type: ignore[no-any-return]

    def duration(self, node: yaml.Node, path: str, positive: bool = False) -> timedelta | None:
        text = self.typed(node, path, ("str", "int"), "a duration such as 90s, 15m, 2h, 7d, 2w")
        if text is None:
            return None
        shown = _cut(json.dumps(str(text)))
        try:
            value = parse_duration(str(text))
        except ValueError:
            self.problem(
                node, path, f"expected a duration such as 90s, 15m, 2h, 7d, 2w, got {shown}"
            )
            return None
        except OverflowError:
            value = None
        if value is None or value > MAX_DURATION:
            self.problem(node, path, f"expected a duration up to {MAX_DURATION.days}d, got {shown}")
            return None
        if positive and not value:
            self.problem(node, path, "expected a duration greater than 0s")
            return None
        return value

    def choice(self, node: yaml.Node, path: str, options: tuple[str, ...]) -> Any:
        value = self.typed(node, path, ("str",), f"one of {' | '.join(options)}")
        if value is not None and value not in options:
            self.problem(
                node, path, f"expected one of {' | '.join(options)}, got {json.dumps(value)}"
            )
            return None
        return value

    def regex(self, node: yaml.Node, path: str) -> Pattern | None:
        text = self.string(node, path)
        if text is None:
            return None
        try:
            return Pattern(text)
        except PatternError as e:
            self.problem(
                node,
                path,
                f"invalid regular expression {_cut(json.dumps(text))}: {e} ({RE2_SYNTAX})",
            )
            return None

    def section(
        self,
        parent: dict[str, yaml.Node],
        key: str,
        allowed: tuple[str, ...],
        read: Callable[[dict[str, yaml.Node]], Any],
        default: Any,
    ) -> Any:
        if key not in parent:
            return default
        found = self.mapping(parent[key], key, allowed)
        return default if found is None else read(found)

    # --- the grammar -----------------------------------------------------------------------

    def config(self, root: yaml.Node) -> Config | None:
        top = self.mapping(
            root,
            "",
            (
                "version",
                "engine",
                "schedule",
                "metrics",
                "state_dir",
                "safety",
                "protect",
                "rules",
                "dangling",
                "unmatched",
                "untag_expired",
            ),
        )
        if top is None:
            return None
        if "version" not in top:
            self.problem(root, "version", "required; write `version: 1` at the top")
        elif self.typed(top["version"], "version", ("int",), "1") not in (1, None):
            self.problem(
                top["version"],
                "version",
                f"unsupported version {top['version'].value}; this gcd reads version 1",
            )
        defaults = Config()
        state_dir = defaults.state_dir
        if "state_dir" in top:
            state_dir = _given(self.string(top["state_dir"], "state_dir"), state_dir)
        unmatched = defaults.unmatched
        if "unmatched" in top:
            unmatched = _given(
                self.choice(top["unmatched"], "unmatched", ("keep", "expire")), unmatched
            )
        untag = defaults.untag_expired
        if "untag_expired" in top:
            value = self.boolean(top["untag_expired"], "untag_expired")
            untag = untag if value is None else value
        return Config(
            engine=self.section(
                top, "engine", ("url", "timeout", "tls"), self.engine, defaults.engine
            ),
            schedule=self.section(
                top, "schedule", ("every", "cron"), self.schedule, defaults.schedule
            ),
            metrics=self.section(
                top, "metrics", ("listen", "textfile"), self.metrics, defaults.metrics
            ),
            state_dir=state_dir,
            safety=self.section(
                top,
                "safety",
                (
                    "min_age",
                    "max_removals_per_run",
                    "max_removal_fraction",
                    "keep_one_per_repository",
                ),
                self.safety,
                defaults.safety,
            ),
            protect=self.protect(top["protect"]) if "protect" in top else (),
            rules=self.rules(top["rules"]) if "rules" in top else (),
            dangling=self.section(
                top, "dangling", ("action", "min_age"), self.dangling, defaults.dangling
            ),
            unmatched=unmatched,
            untag_expired=untag,
        )

    def engine(self, found: dict[str, yaml.Node]) -> EngineConfig:
        url = self.string(found["url"], "engine.url", nullable=True) if "url" in found else None
        if url is not None and not re.match(r"(unix|tcp|http|https|ssh|npipe)://", url):
            self.problem(
                found["url"],
                "engine.url",
                f"expected unix://, tcp:// or ssh:// address, got {json.dumps(url)}",
            )
        if url is not None and url.startswith("ssh://") and not _ssh_installed():
            self.problem(found["url"], "engine.url", SSH_HELP)
        timeout = EngineConfig().timeout
        if "timeout" in found:
            timeout = _given(
                self.duration(found["timeout"], "engine.timeout", positive=True), timeout
            )
        tls = None
        if "tls" in found and found["tls"].tag != f"{_STANDARD}null":
            tls = self.tls(found["tls"])
        return EngineConfig(url=url, timeout=timeout, tls=tls)

    def tls(self, node: yaml.Node) -> TlsConfig | None:
        found = self.mapping(node, "engine.tls", ("cert_path", "verify"))
        if found is None:
            return None
        path = None
        if "cert_path" in found:
            path = self.string(found["cert_path"], "engine.tls.cert_path", nullable=True)
        verify = True
        if "verify" in found:
            verify = _given(self.boolean(found["verify"], "engine.tls.verify"), True)
        return TlsConfig(cert_path=path, verify=verify)

    def schedule(self, found: dict[str, yaml.Node]) -> ScheduleConfig:
        if "every" in found and "cron" in found:
            self.problem(found["cron"], "schedule", "set one of every or cron, not both")
        if "cron" in found:
            cron = self.string(found["cron"], "schedule.cron")
            if cron is not None:
                from apscheduler.triggers.cron import CronTrigger  # only a cron line needs it

                try:
                    CronTrigger.from_crontab(cron, timezone="UTC")
                except ValueError as e:
                    self.problem(
                        found["cron"],
                        "schedule.cron",
                        f"invalid crontab line {json.dumps(cron)}: {e}",
                    )
            return ScheduleConfig(every=None, cron=cron)
        every = ScheduleConfig().every
        if "every" in found:
            every = _given(self.duration(found["every"], "schedule.every", positive=True), every)
        return ScheduleConfig(every=every)

    def metrics(self, found: dict[str, yaml.Node]) -> MetricsConfig:
        listen = MetricsConfig().listen
        if "listen" in found:
            value = self.string(found["listen"], "metrics.listen")
            if value is not None:
                match = _LISTEN.fullmatch(value)
                if value and (match is None or not 0 < int(match["port"]) < 65536):
                    self.problem(
                        found["listen"],
                        "metrics.listen",
                        f'expected host:port such as 127.0.0.1:9782, or "" to disable, got {json.dumps(value)}',
                    )
                else:
                    listen = value
                    if match is not None and match["host"].strip("[]") in ("", "0.0.0.0", "::"):
                        self.warning(
                            found["listen"],
                            "metrics.listen",
                            f"{json.dumps(value)} serves /metrics on every interface, to other "
                            "hosts too; name an address (127.0.0.1:9782) unless that is meant",
                        )
        textfile = None
        if "textfile" in found:
            textfile = self.string(found["textfile"], "metrics.textfile", nullable=True)
        return MetricsConfig(listen=listen, textfile=textfile)

    def safety(self, found: dict[str, yaml.Node]) -> SafetyConfig:
        d = SafetyConfig()
        min_age = d.min_age
        if "min_age" in found:
            min_age = _given(self.duration(found["min_age"], "safety.min_age"), min_age)
            if min_age < MIN_AGE_FLOOR:
                self.warning(
                    found["min_age"],
                    "safety.min_age",
                    f"{format_duration(min_age)} is below {format_duration(MIN_AGE_FLOOR)}: "
                    "between two steps of a legacy build its newest layer image is untagged and "
                    "unused, and only its age protects it (a build fails when gcd removes it); "
                    "backdate test images instead of lowering min_age",
                )
        cap = d.max_removals_per_run
        if "max_removals_per_run" in found:
            cap = _given(
                self.integer(found["max_removals_per_run"], "safety.max_removals_per_run", 1), cap
            )
        fraction = d.max_removal_fraction
        if "max_removal_fraction" in found:
            node = found["max_removal_fraction"]
            value = self.typed(
                node, "safety.max_removal_fraction", ("float", "int"), "a number in (0, 1]"
            )
            if value is not None and not 0 < value <= 1:
                self.problem(
                    node, "safety.max_removal_fraction", f"expected a number in (0, 1], got {value}"
                )
            elif value is not None:
                fraction = float(value)
        keep_one = d.keep_one_per_repository
        if "keep_one_per_repository" in found:
            value = self.boolean(found["keep_one_per_repository"], "safety.keep_one_per_repository")
            keep_one = keep_one if value is None else value
        return SafetyConfig(min_age, cap, fraction, keep_one)

    def protect(self, node: yaml.Node) -> tuple[Protect, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "protect", f"expected a list, got {self.describe(node)}")
            return ()
        entries = []
        for i, item in enumerate(node.value):
            path = f"protect[{i}]"
            found = self.mapping(item, path, ("ref", "tag", "label", "id"))
            if found is None:
                continue
            if len(found) != 1:
                self.problem(item, path, "expected exactly one of ref, tag, label, id")
                continue
            ((kind, value_node),) = found.items()
            value = self.string(value_node, f"{path}.{kind}")
            if value is None:
                continue
            regex = None
            if kind == "tag":
                regex = self.regex(value_node, f"{path}.tag")
                if regex is None:
                    continue
            if kind == "id" and not _IMAGE_ID.fullmatch(value):
                self.problem(
                    value_node,
                    f"{path}.id",
                    f"expected an image ID or a prefix of at least 4 hex digits, got {json.dumps(value)}",
                )
                continue
            if kind == "label" and not value.partition("=")[0]:
                self.problem(
                    value_node,
                    f"{path}.label",
                    f"expected key or key=value, got {json.dumps(value)}",
                )
                continue
            entries.append(Protect(i, kind, value, regex))  # type: ignore[arg-type]
        return tuple(entries)

    def rules(self, node: yaml.Node) -> tuple[Rule, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "rules", f"expected a list, got {self.describe(node)}")
            return ()
        rules: list[Rule] = []
        names: set[str] = set()
        for i, item in enumerate(node.value):
            rule = self.rule(item, f"rules[{i}]")
            if rule is None:
                continue
            if rule.name in names:
                self.problem(
                    item, f"rules[{i}].name", f"duplicate rule name {json.dumps(rule.name)}"
                )
                continue
            names.add(rule.name)
            rules.append(rule)
        return tuple(rules)

    def rule(self, node: yaml.Node, path: str) -> Rule | None:
        found = self.mapping(
            node, path, ("name", "match", "group_by", "order_by", "keep_last", "keep_within")
        )
        if found is None:
            return None
        problems_before = len(self.problems)
        name = self.string(found["name"], f"{path}.name") if "name" in found else None
        if "name" not in found:
            self.problem(node, f"{path}.name", "required")
        elif name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            self.problem(
                found["name"],
                f"{path}.name",
                f"expected letters, digits, _ . or -, got {json.dumps(name)}",
            )
        keep_last = (
            self.integer(found["keep_last"], f"{path}.keep_last", 1)
            if "keep_last" in found
            else None
        )
        if "keep_last" not in found:
            self.problem(node, f"{path}.keep_last", "required (an integer >= 1)")
        keep_within = None
        if "keep_within" in found and not self._is_null(found["keep_within"]):
            keep_within = self.duration(found["keep_within"], f"{path}.keep_within")
        repository, tag, exclude = ANY, ANY, None
        if "match" in found:
            match = self.mapping(
                found["match"], f"{path}.match", ("repository", "tag", "exclude_tag")
            )
            if match is not None:
                if "repository" in match:
                    repository = _given(
                        self.regex(match["repository"], f"{path}.match.repository"), repository
                    )
                if "tag" in match:
                    tag = _given(self.regex(match["tag"], f"{path}.match.tag"), tag)
                if "exclude_tag" in match and not self._is_null(match["exclude_tag"]):
                    exclude = self.regex(match["exclude_tag"], f"{path}.match.exclude_tag")
        groups = set(tag.groupindex)
        group_by: tuple[str, ...] = ("repository",)
        if "group_by" in found:
            group_by = _given(
                self.group_by(found["group_by"], f"{path}.group_by", groups), group_by
            )
        order_by = OrderBy("created")
        if "order_by" in found:
            order_by = _given(
                self.order_by(found["order_by"], f"{path}.order_by", groups), order_by
            )
        if len(self.problems) > problems_before or name is None or keep_last is None:
            return None
        return Rule(name, keep_last, repository, tag, exclude, group_by, order_by, keep_within)

    def group_by(self, node: yaml.Node, path: str, groups: set[str]) -> tuple[str, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(
                node, path, f"expected a list such as [repository], got {self.describe(node)}"
            )
            return None
        names = []
        for j, item in enumerate(node.value):
            value = self.string(item, f"{path}[{j}]")
            if value is None:
                continue
            if value != "repository" and value not in groups:
                known = ", ".join(["repository", *sorted(groups)])
                self.problem(
                    item,
                    f"{path}[{j}]",
                    f"unknown group {json.dumps(value)}; match.tag has no group of that name (expected one of: {known})",
                )
                continue
            names.append(value)
        return tuple(names)

    def order_by(self, node: yaml.Node, path: str, groups: set[str]) -> OrderBy | None:
        text = self.string(node, path)
        if text is None:
            return None
        m = _ORDER.fullmatch(text.replace(" ", ""))
        usage = (
            "semver(group) | numeric(group) | natural | created | tagged | first_seen | last_used"
        )
        if m is None or m["kind"] not in ORDER_KINDS:
            self.problem(node, path, f"expected {usage}, got {json.dumps(text)}")
            return None
        kind, group = m["kind"], m["group"]
        if kind in _ORDER_WITH_GROUP and group is None:
            self.problem(
                node, path, f"{kind} needs a named group of match.tag, e.g. {kind}(version)"
            )
            return None
        if kind not in _ORDER_WITH_GROUP and group is not None:
            self.problem(node, path, f"{kind} takes no group, got {json.dumps(text)}")
            return None
        if group is not None and group not in groups:
            self.problem(
                node,
                path,
                f"unknown group {json.dumps(group)}; match.tag has no group of that name",
            )
            return None
        return OrderBy(kind, group)

    def dangling(self, found: dict[str, yaml.Node]) -> DanglingConfig:
        d = DanglingConfig()
        action = d.action
        if "action" in found:
            action = _given(
                self.choice(found["action"], "dangling.action", ("remove", "keep")), action
            )
        min_age = d.min_age
        if "min_age" in found:
            min_age = _given(self.duration(found["min_age"], "dangling.min_age"), min_age)
        return DanglingConfig(action, min_age)

    @staticmethod
    def _is_null(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")
