"""The configuration's options, each declared once.

A section of the configuration is a frozen dataclass; each of its option fields is made by
`option()`, which carries the field's default together with its kind (the YAML type it takes
and its bounds) and the words the docs show. From those declarations come the validation
(`Section.read`, whose messages name file, line and key path), the keys a mapping allows, the
defaults, the JSON Schema (`gcd schema`) and the option tables of docs/configuration.md.

`Reader` holds the primitives the kinds share: it walks YAML's node tree rather than loaded
values, so every problem has a line number.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import yaml

from gcd.patterns import Pattern, PatternError
from gcd.units import SIZE_PATTERN, parse_duration, parse_size

STANDARD = "tag:yaml.org,2002:"
MAX_DURATION = timedelta(days=3650)  # ten years: a schedule or an age longer means a typo
# Said after RE2's own words when it refuses a pattern (docs/configuration.md, Patterns).
RE2_SYNTAX = "patterns use RE2 syntax: no backreferences or lookaround"
DURATION_PATTERN = "^([0-9]+[smhdw])+$"


def cut(text: str, most: int = 60) -> str:
    """A value quoted in a message, cut to `most` characters."""
    return text if len(text) <= most else f"{text[: most - 1]}… ({len(text):,} characters)"


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == f"{STANDARD}null"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Reader:
    """Typed values out of YAML nodes; each problem and warning is kept with its line."""

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
            key = cut(str(key_node.value))
            where = join(path, key)
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
        if node.tag == f"{STANDARD}str":
            return cut(json.dumps(str(node.value)))
        shown = cut(str(node.value))
        return shown if node.tag.startswith(STANDARD) else f"{cut(node.tag, 30)} {shown}"

    def typed(self, node: yaml.Node, path: str, kinds: tuple[str, ...], expected: str) -> Any:
        """The node's value if its YAML type is one of `kinds` (`str`, `int`, ...), else None.
        Only YAML's own types count: `!x:str` is not a string, and `!!int abc` is not an
        integer however it is tagged."""
        kind = node.tag.removeprefix(STANDARD)
        if isinstance(node, yaml.ScalarNode) and node.tag.startswith(STANDARD) and kind in kinds:
            try:
                return self._constructor.construct_object(node, deep=True)
            except (ValueError, OverflowError, KeyError, TypeError, yaml.YAMLError):
                pass  # `!!int abc`, `!!float xyz`, `!!bool maybe`, an integer of 5,000 digits
        self.problem(node, path, f"expected {expected}, got {self.describe(node)}")
        return None

    def string(self, node: yaml.Node, path: str, nullable: bool = False) -> str | None:
        kinds = ("str", "null") if nullable else ("str",)
        value = self.typed(node, path, kinds, "a string or null" if nullable else "a string")
        return None if value is None else str(value)

    def integer(self, node: yaml.Node, path: str, minimum: int) -> int | None:
        value = self.typed(node, path, ("int",), f"an integer >= {minimum}")
        if value is not None and value < minimum:
            self.problem(node, path, f"expected an integer >= {minimum}, got {value}")
            return None
        return None if value is None else int(value)

    def duration(self, node: yaml.Node, path: str, positive: bool = False) -> timedelta | None:
        text = self.typed(node, path, ("str", "int"), "a duration such as 90s, 15m, 2h, 7d, 2w")
        if text is None:
            return None
        shown = cut(json.dumps(str(text)))
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

    def size(self, node: yaml.Node, path: str) -> int | None:
        expected = "a size such as 500MB, 10GB, 2GiB or a number of bytes"
        value = self.typed(node, path, ("str", "int"), expected)
        if value is None:
            return None
        try:
            return parse_size(str(value))
        except ValueError:
            self.problem(node, path, f"expected {expected}, got {cut(json.dumps(str(value)))}")
            return None

    def choice(self, node: yaml.Node, path: str, options: tuple[str, ...]) -> str | None:
        value = self.typed(node, path, ("str",), f"one of {' | '.join(options)}")
        if value is not None and value not in options:
            self.problem(
                node, path, f"expected one of {' | '.join(options)}, got {json.dumps(value)}"
            )
            return None
        return value  # type: ignore[no-any-return]

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
                f"invalid regular expression {cut(json.dumps(text))}: {e} ({RE2_SYNTAX})",
            )
            return None


# --- kinds: the YAML value an option takes ------------------------------------------------


class Kind(Protocol):
    def read(self, r: Reader, node: yaml.Node, path: str) -> Any:
        """The value, or None after saying what is wrong (the default then stands)."""

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the value."""


@dataclass(frozen=True)
class Text:
    nullable: bool = False

    def read(self, r: Reader, node: yaml.Node, path: str) -> str | None:
        return r.string(node, path, self.nullable)

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"] if self.nullable else "string"}


@dataclass(frozen=True)
class Integer:
    minimum: int

    def read(self, r: Reader, node: yaml.Node, path: str) -> int | None:
        return r.integer(node, path, self.minimum)

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.minimum}


@dataclass(frozen=True)
class Fraction:
    """A number in (0, 1]."""

    def read(self, r: Reader, node: yaml.Node, path: str) -> float | None:
        value = r.typed(node, path, ("float", "int"), "a number in (0, 1]")
        if value is not None and not 0 < value <= 1:
            r.problem(node, path, f"expected a number in (0, 1], got {value}")
            return None
        return None if value is None else float(value)

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": 0, "maximum": 1}


@dataclass(frozen=True)
class Boolean:
    def read(self, r: Reader, node: yaml.Node, path: str) -> bool | None:
        return r.typed(node, path, ("bool",), "true or false")  # type: ignore[no-any-return]

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Duration:
    positive: bool = False
    nullable: bool = False  # null: none (an optional duration)

    def read(self, r: Reader, node: yaml.Node, path: str) -> timedelta | None:
        if self.nullable and is_null(node):
            return None
        return r.duration(node, path, self.positive)

    def schema(self) -> dict[str, Any]:
        text: dict[str, Any] = {"type": "string", "pattern": DURATION_PATTERN}
        if self.positive:
            text["not"] = {"pattern": "^(0+[smhdw])+$"}
        return {"anyOf": [text, {"type": "null"}]} if self.nullable else text


@dataclass(frozen=True)
class Size:
    """Bytes: `10GB`, `512MiB`, `4096`; null for none."""

    def read(self, r: Reader, node: yaml.Node, path: str) -> int | None:
        return None if is_null(node) else r.size(node, path)

    def schema(self) -> dict[str, Any]:
        sizes = {"type": "string", "pattern": SIZE_PATTERN}
        return {"anyOf": [sizes, {"type": "integer", "minimum": 0}, {"type": "null"}]}


@dataclass(frozen=True)
class Percent:
    """A share: `85%`, or a number in (0, 1]."""

    def read(self, r: Reader, node: yaml.Node, path: str) -> float | None:
        expected = "a percentage such as 85% (or a number in (0, 1])"
        value = r.typed(node, path, ("str", "float", "int"), expected)
        if value is None:
            return None
        text = str(value).strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            r.problem(node, path, f"expected {expected}, got {cut(json.dumps(text))}")
            return None
        return share

    def schema(self) -> dict[str, Any]:
        percent = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?%$"}
        return {"anyOf": [percent, {"type": "number", "exclusiveMinimum": 0, "maximum": 1}]}


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def read(self, r: Reader, node: yaml.Node, path: str) -> str | None:
        return r.choice(node, path, self.options)

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.options)}


@dataclass(frozen=True)
class Regex:
    nullable: bool = False  # null: none

    def read(self, r: Reader, node: yaml.Node, path: str) -> Pattern | None:
        if self.nullable and is_null(node):
            return None
        return r.regex(node, path)

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"] if self.nullable else "string", "format": "regex"}


@dataclass(frozen=True)
class Section:
    """A mapping read into the dataclass `cls`, whose option fields say what it holds. A key
    left out, or one whose value is wrong (said), keeps its default. `check` sees the keys
    found and the values read, for what spans two keys."""

    cls: type
    nullable: bool = False  # null: none
    check: Callable[[Reader, dict[str, yaml.Node], dict[str, Any]], None] | None = None

    def read(self, r: Reader, node: yaml.Node, path: str) -> Any:
        if self.nullable and is_null(node):
            return None
        fields = list(declared(self.cls))
        found = r.mapping(node, path, tuple(f.name for f in fields))
        if found is None:
            return None
        values: dict[str, Any] = {}
        for f in fields:
            where = join(path, f.name)
            if f.name not in found:
                if f.option.required:
                    r.problem(node, where, f.option.required)
                continue
            value = f.option.kind.read(r, found[f.name], where)
            if value is not None:
                values[f.name] = value
        if self.check is not None:
            self.check(r, found, values)
        return self.cls(**values)

    def schema(self) -> dict[str, Any]:
        fields = list(declared(self.cls))
        body: dict[str, Any] = {
            "type": "object",
            "properties": {
                f.name: {"description": f.option.meaning, **f.option.kind.schema()} for f in fields
            },
            "additionalProperties": False,
        }
        required = [f.name for f in fields if f.option.required]
        if required:
            body["required"] = required
        return {"anyOf": [body, {"type": "null"}]} if self.nullable else body


# --- declaring options ------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """What a configuration key takes, and how the docs show it."""

    kind: Kind
    default: str  # as the docs show it ("" for a section: its own table says)
    meaning: str
    required: str | None = None  # the message when it is left out; None: optional


@dataclass(frozen=True)
class Declared:
    name: str
    default: Any
    option: Option


def option(default: Any, kind: Kind, shown: str, meaning: str, required: str | None = None) -> Any:
    """A dataclass field that is a configuration key: its default, and what `Option` says."""
    return dataclasses.field(
        default=default, metadata={"option": Option(kind, shown, meaning, required)}
    )


def declared(cls: type) -> Iterator[Declared]:
    """The option fields of a section's dataclass, in the order they are declared."""
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            yield Declared(f.name, f.default, f.metadata["option"])


def table(rows: list[tuple[str, Option]]) -> str:
    """An option table of docs/configuration.md."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, o in rows:
        default = f" {o.default} " if o.default else " "  # a section: its own table says
        lines.append(f"| `{key}` |{default}| {o.meaning} |")
    return "\n".join(lines)


def rows(cls: type, prefix: str = "") -> list[tuple[str, Option]]:
    return [(prefix + f.name, f.option) for f in declared(cls)]
