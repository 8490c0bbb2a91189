"""Fuzzing the configuration loader: whatever the bytes, one line per problem, or a config
the daemon can run. CI runs a few hundred cases; the long run (docs/reliability.md):

    GCD_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/unit/test_fuzz_config.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcd import config
from gcd.daemon import trigger_of
from gcd.errors import ConfigError

EXAMPLE = (Path(__file__).parents[2] / "config.example.yaml").read_text()
LINES = EXAMPLE.splitlines(keepends=True)
EXAMPLES = int(os.environ.get("GCD_FUZZ_EXAMPLES", "300"))
PROBLEM = re.compile(r"fuzz\.yaml:\d+: \S")
NASTY = [
    "!!int abc",
    "!!bool maybe",
    "!!float xyz",
    "!x:str foo",
    "!!binary AAAA",
    "~",
    "null",
    "9" * 5000,
    "-1",
    "0",
    "1e400",
    ".nan",
    "1000000000d",
    "3000000d",
    "0s",
    "'(a+)+'",
    "[",
    "]",
    "{",
    "}",
    "&a [*a]",
    "*nope",
    "\x00",
    "\t",
    "\ufeff",
    "\udcff",
    '"\\x00"',
    "[" * 200,
    "{a: " * 100,
    "- - - -",
    "? complex\n: key",
    "|\n  block",
    ">-\n  folded",
    "'unterminated",
    '"unterminated',
    "%YAML 1.1\n---",
    "--- !!set {a, b}",
    "...",
    "0.0.0.0:9782",
    ":0",
    "[::]:70000",
    "*/0 * * * *",
    "60 24 * * *",
    "2w3d",
    "15m30s",
]


def mutate(data: st.DataObject) -> str:
    lines = list(LINES)
    for _ in range(data.draw(st.integers(1, 6))):
        if not lines:
            lines = ["version: 1\n"]
        at = data.draw(st.integers(0, len(lines) - 1))
        kind = data.draw(st.sampled_from(["value", "insert", "delete", "dup", "chars", "indent"]))
        line = lines[at]
        if kind == "value" and ":" in line:
            key, _, _ = line.partition(":")
            value = data.draw(st.sampled_from(NASTY) | st.text(max_size=20))
            lines[at] = f"{key}: {value}\n"
        elif kind == "insert":
            lines.insert(at, data.draw(st.sampled_from(NASTY) | st.text(max_size=40)) + "\n")
        elif kind == "delete":
            del lines[at]
        elif kind == "dup":
            lines.insert(at, line)
        elif kind == "chars":
            cut = data.draw(st.integers(0, len(line)))
            noise = data.draw(st.text(min_size=1, max_size=5))
            lines[at] = line[:cut] + noise + line[cut:]
        else:
            lines[at] = " " * data.draw(st.integers(0, 6)) + line.lstrip()
    return "".join(lines)


@settings(
    max_examples=EXAMPLES,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_a_mutated_configuration_is_a_clear_error_or_a_config_the_daemon_runs(
    data: st.DataObject,
) -> None:
    text = mutate(data)
    try:
        cfg = config.parse(text, "fuzz.yaml")
    except ConfigError as e:
        assert e.problems, text
        for problem in e.problems:
            assert PROBLEM.match(problem), (problem, text)
            assert len(problem) < 400, problem
        return
    trigger_of(cfg)  # the daemon's schedule, as it starts it
    assert cfg.engine.timeout.total_seconds() > 0
