"""Configuration: defaults, the v1 grammar, and every error with file, line and key path."""

from __future__ import annotations

import importlib.util
import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from gcd import config
from gcd.config import Config
from gcd.errors import ConfigError
from gcd.transport import Tls

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "config.yaml")
    return list(caught.value.problems)


def test_no_file_means_builtin_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", "/nonexistent/gcd.yaml")
    cfg = config.load(None, environ={})
    assert cfg == Config()
    assert cfg.dangling.action == "remove" and cfg.dangling.min_age == timedelta(hours=24)
    assert cfg.rules == () and cfg.unmatched == "keep"
    assert cfg.engine_url({}) == "unix:///var/run/docker.sock"
    assert cfg.engine_url({"DOCKER_HOST": "tcp://127.0.0.1:2375"}) == "tcp://127.0.0.1:2375"


def test_config_path_precedence(tmp_path: Path) -> None:
    assert config.config_path("/x.yaml", {"GCD_CONFIG": "/y.yaml"}) == "/x.yaml"
    assert config.config_path(None, {"GCD_CONFIG": "/y.yaml"}) == "/y.yaml"


def test_missing_explicit_file_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config.load("/nonexistent/config.yaml", environ={})
    assert caught.value.problems == (
        "/nonexistent/config.yaml: cannot read the configuration: No such file or directory",
    )


def test_example_config_loads_and_documents_every_option() -> None:
    text = (ROOT / "config.example.yaml").read_text()
    cfg = config.parse(text, "config.example.yaml")
    assert [r.name for r in cfg.rules] == ["builds", "branches"]
    assert cfg.engine_url({}) == "unix:///var/run/docker.sock"
    sections = {"version", "engine", "metrics", "safety", "protect", "rules", "match", "dangling"}
    lines = text.splitlines()
    for path in config.option_keys():
        key = path.rpartition(".")[2].removeprefix("[]")
        at = next(
            (n for n, ln in enumerate(lines) if re.match(rf"\s*(#\s*)?(- )?{key}:", ln)), None
        )
        assert at is not None, f"config.example.yaml does not show {path}"
        commented = "#" in lines[at] or lines[at - 1].lstrip().startswith("#")
        assert commented or key in sections, f"{path} has no comment in config.example.yaml"


def test_the_docs_show_every_option_as_it_is_declared() -> None:
    # One source of truth: the tables of docs/configuration.md are the declarations'.
    docs = (ROOT / "docs/configuration.md").read_text()
    for section, table in config.docs_tables().items():
        assert table in docs, f"docs/configuration.md lacks the {section} table:\n{table}"


def test_every_configuration_example_in_the_docs_loads() -> None:
    docs = (ROOT / "docs/configuration.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", docs, re.S)
    assert len(blocks) >= 5
    for n, block in enumerate(blocks, 1):
        text = block if block.startswith("version:") else "version: 1\n" + block
        config.parse(text, f"docs/configuration.md example {n}")  # raises on a bad one


def test_an_unknown_key_lists_the_declared_keys() -> None:
    assert problems("version: 1\nsafety: {min_ag: 1h}\n") == [
        "config.yaml:2: safety.min_ag: unknown key (expected one of: min_age, "
        "max_removals_per_run, max_removal_fraction, keep_one_per_repository)"
    ]


def test_engine_tls_is_read_as_the_docker_cli_reads_it() -> None:
    plain = config.parse("version: 1\nengine: {url: 'tcp://h:2376'}\n", "c.yaml")
    assert plain.engine_tls({}) is None
    assert plain.engine_tls({"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/certs"}) == Tls(
        "/certs/ca.pem", "/certs/cert.pem", "/certs/key.pem", True
    )
    # DOCKER_CERT_PATH alone: encrypted, gcd's certificate sent, the engine's not checked.
    assert plain.engine_tls({"DOCKER_CERT_PATH": "/certs"}) == Tls(
        None, "/certs/cert.pem", "/certs/key.pem", False
    )
    given = config.parse(
        "version: 1\nengine:\n  url: tcp://h:2376\n  tls: {cert_path: /etc/gcd/tls}\n", "c.yaml"
    )
    assert given.engine_tls({"DOCKER_CERT_PATH": "/elsewhere"}) == Tls(
        "/etc/gcd/tls/ca.pem", "/etc/gcd/tls/cert.pem", "/etc/gcd/tls/key.pem", True
    )
    with pytest.raises(ConfigError) as caught:
        config.parse("version: 1\nengine:\n  tls: {verify: maybe, path: x}\n", "c.yaml")
    assert caught.value.problems == (
        "c.yaml:3: engine.tls.path: unknown key (expected one of: cert_path, verify)",
        'c.yaml:3: engine.tls.verify: expected true or false, got "maybe"',
    )


def test_an_ssh_address_without_paramiko_is_refused_with_what_to_do() -> None:
    if importlib.util.find_spec("paramiko") is not None:
        pytest.skip("paramiko is installed here: ssh:// is accepted")
    with pytest.raises(ConfigError) as caught:
        config.parse("version: 1\nengine: {url: 'ssh://ci@build-host'}\n", "c.yaml")
    assert caught.value.problems == (
        "c.yaml:2: engine.url: ssh:// needs paramiko, docker-py's ssh extra (pip install "
        "'docker[ssh]'); or forward the engine's socket (ssh -nNT -L "
        "/run/gcd/docker.sock:/var/run/docker.sock HOST) and set engine.url: "
        "unix:///run/gcd/docker.sock",
    )


def test_full_grammar_is_read() -> None:
    cfg = config.parse(
        r"""
version: 1
engine: {url: "tcp://127.0.0.1:2375", timeout: 90s}
schedule: {cron: "*/5 * * * *"}
metrics: {listen: "", textfile: /tmp/gcd.prom}
state_dir: /tmp/gcd
safety: {min_age: 0s, max_removals_per_run: 7, max_removal_fraction: 1, keep_one_per_repository: false}
protect:
  - ref: "base/*"
  - tag: "stable"
  - label: "keep"
  - id: "sha256:abcd"
rules:
  - name: r
    match: {repository: "a|b", tag: '(?P<branch>\w+)-(?P<n>\d+)', exclude_tag: "tmp-.*"}
    group_by: []
    order_by: numeric(n)
    keep_last: 2
    keep_within: 1w
dangling: {action: keep, min_age: 0s}
unmatched: expire
untag_expired: yes
""",
        "c.yaml",
    )
    assert cfg.source == "c.yaml"
    assert cfg.engine.timeout == timedelta(seconds=90)
    assert cfg.schedule.cron == "*/5 * * * *" and cfg.schedule.every is None
    assert cfg.metrics.listen == "" and cfg.metrics.textfile == "/tmp/gcd.prom"
    assert cfg.safety.min_age == timedelta(0) and cfg.safety.max_removals_per_run == 7
    assert cfg.safety.max_removal_fraction == 1.0 and cfg.safety.keep_one_per_repository is False
    assert [(p.kind, p.value) for p in cfg.protect] == [
        ("ref", "base/*"),
        ("tag", "stable"),
        ("label", "keep"),
        ("id", "sha256:abcd"),
    ]
    (rule,) = cfg.rules
    assert rule.group_by == () and str(rule.order_by) == "numeric(n)"
    assert rule.keep_within == timedelta(weeks=1)
    assert rule.exclude_tag is not None and rule.exclude_tag.pattern == "tmp-.*"
    assert cfg.dangling.action == "keep" and cfg.dangling.min_age == timedelta(0)
    assert cfg.unmatched == "expire" and cfg.untag_expired is True


def test_all_errors_reported_at_once_with_line_and_key_path() -> None:
    text = r"""version: 1
engine:
  urll: x
  timeout: 0s
safety:
  min_age: soon
  max_removal_fraction: 1.5
rules:
  - name: builds
    match: {repository: "demo(", tag: '(?P<version>\d+)'}
    order_by: semver(ver)
    group_by: [repository, branch]
    keep_last: three
  - match: {}
    keep_last: 0
dangling: {action: delete}
protect:
  - ref: x
    tag: y
  - id: zz
"""
    assert problems(text) == [
        "config.yaml:3: engine.urll: unknown key (expected one of: url, timeout, tls)",
        "config.yaml:4: engine.timeout: expected a duration greater than 0s",
        'config.yaml:6: safety.min_age: expected a duration such as 90s, 15m, 2h, 7d, 2w, got "soon"',
        "config.yaml:7: safety.max_removal_fraction: expected a number in (0, 1], got 1.5",
        'config.yaml:10: rules[0].match.repository: invalid regular expression "demo(": missing ): demo( (patterns use RE2 syntax: no backreferences or lookaround)',
        'config.yaml:11: rules[0].order_by: unknown group "ver"; match.tag has no group of that name',
        'config.yaml:12: rules[0].group_by[1]: unknown group "branch"; match.tag has no group of that name (expected one of: repository, version)',
        'config.yaml:13: rules[0].keep_last: expected an integer >= 1, got "three"',
        "config.yaml:14: rules[1].name: required",
        "config.yaml:15: rules[1].keep_last: expected an integer >= 1, got 0",
        'config.yaml:16: dangling.action: expected one of remove | keep, got "delete"',
        "config.yaml:18: protect[0]: expected exactly one of ref, tag, label, id",
        'config.yaml:20: protect[1].id: expected an image ID or a prefix of at least 4 hex digits, got "zz"',
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["config.yaml:1: version: required; write `version: 1` at the top"]),
        ("engine: {}\n", ["config.yaml:1: version: required; write `version: 1` at the top"]),
        (
            "version: 2\n",
            ["config.yaml:1: version: unsupported version 2; this gcd reads version 1"],
        ),
        (
            "version: 1\nrules: [\n",
            [
                "config.yaml:3: invalid YAML: did not find expected node content"
                if config._LOADER is not yaml.SafeLoader  # libyaml's words
                else "config.yaml:3: invalid YAML: expected the node content, but found "
                "'<stream end>'"
            ],
        ),
        ("- 1\n", ["config.yaml:1: expected a mapping, got a list"]),
        ("version: 1\nversion: 1\n", ["config.yaml:2: version: duplicate key"]),
        (
            "version: 1\nunmatched: drop\n",
            ['config.yaml:2: unmatched: expected one of keep | expire, got "drop"'],
        ),
        (
            "version: 1\nuntag_expired: 1\n",
            ["config.yaml:2: untag_expired: expected true or false, got 1"],
        ),
        (
            "version: 1\nschedule: {every: 5m, cron: '* * * * *'}\n",
            ["config.yaml:2: schedule: set one of every or cron, not both"],
        ),
        (
            "version: 1\nschedule: {cron: 'often'}\n",
            [
                'config.yaml:2: schedule.cron: invalid crontab line "often": Wrong number of fields; got 1, expected 5'
            ],
        ),
        (
            "version: 1\nmetrics: {listen: '9782'}\n",
            [
                'config.yaml:2: metrics.listen: expected host:port such as 127.0.0.1:9782, or "" to disable, got "9782"'
            ],
        ),
        (
            "version: 1\nengine: {url: /var/run/docker.sock}\n",
            [
                'config.yaml:2: engine.url: expected unix://, tcp:// or ssh:// address, got "/var/run/docker.sock"'
            ],
        ),
        (
            "version: 1\nsafety: {max_removals_per_run: 0}\n",
            ["config.yaml:2: safety.max_removals_per_run: expected an integer >= 1, got 0"],
        ),
        (
            "version: 1\nrules: {name: x}\n",
            ["config.yaml:2: rules: expected a list, got a mapping"],
        ),
        (
            "version: 1\nrules:\n  - {name: a, keep_last: 1}\n  - {name: a, keep_last: 2}\n",
            ['config.yaml:4: rules[1].name: duplicate rule name "a"'],
        ),
        (
            "version: 1\nrules:\n  - {name: a, keep_last: 1, order_by: semver}\n",
            [
                "config.yaml:3: rules[0].order_by: semver needs a named group of match.tag, e.g. semver(version)"
            ],
        ),
        (
            "version: 1\nrules:\n  - {name: a, keep_last: 1, order_by: newest}\n",
            [
                'config.yaml:3: rules[0].order_by: expected semver(group) | numeric(group) | natural | created | tagged | first_seen | last_used, got "newest"'
            ],
        ),
        (
            "version: 1\nrules:\n  - {name: a, keep_last: 1, order_by: created(x)}\n",
            ['config.yaml:3: rules[0].order_by: created takes no group, got "created(x)"'],
        ),
        (
            "version: 1\nrules:\n  - {name: a, keep_last: 1, keep_within: soon}\n",
            [
                'config.yaml:3: rules[0].keep_within: expected a duration such as 90s, 15m, 2h, 7d, 2w, got "soon"'
            ],
        ),
        (
            "version: 1\nrules:\n  - {name: a b, keep_last: 1}\n",
            ['config.yaml:3: rules[0].name: expected letters, digits, _ . or -, got "a b"'],
        ),
        (
            "version: 1\nrules:\n  - name: a\n",
            ["config.yaml:3: rules[0].keep_last: required (an integer >= 1)"],
        ),
        (
            "version: 1\nprotect:\n  - tag: '('\n",
            [
                'config.yaml:3: protect[0].tag: invalid regular expression "(": missing ): ( (patterns use RE2 syntax: no backreferences or lookaround)'
            ],
        ),
        (
            "version: 1\nprotect:\n  - tag: '(?!tmp-).*'\n",
            [
                'config.yaml:3: protect[0].tag: invalid regular expression "(?!tmp-).*": invalid perl operator: (?! (patterns use RE2 syntax: no backreferences or lookaround)'
            ],
        ),
        (
            "version: 1\nrules:\n  - name: r\n    keep_last: 1\n    match: {tag: '(\\w+)-\\1'}\n",
            [
                'config.yaml:5: rules[0].match.tag: invalid regular expression "(\\\\w+)-\\\\1": invalid escape sequence: \\1 (patterns use RE2 syntax: no backreferences or lookaround)'
            ],
        ),
        (
            "version: 1\nprotect:\n  - label: '=x'\n",
            ['config.yaml:3: protect[0].label: expected key or key=value, got "=x"'],
        ),
    ],
)
def test_each_error_word_for_word(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_the_daemon_schedule_follows_every_or_cron() -> None:
    from datetime import UTC, datetime

    from gcd.daemon import trigger_of

    start = datetime(2026, 11, 27, 10, 7, tzinfo=UTC)
    cron = trigger_of(config.parse("version: 1\nschedule: {cron: '*/15 * * * *'}\n", "c.yaml"))
    assert cron.get_next_fire_time(None, start) == datetime(2026, 11, 27, 10, 15, tzinfo=UTC)
    every = trigger_of(config.parse("version: 1\nschedule: {every: 5m}\n", "c.yaml"))
    assert every.interval.total_seconds() == 300


def test_a_min_age_below_the_floor_is_valid_with_a_warning_that_says_why() -> None:
    cfg = config.parse("version: 1\nsafety:\n  min_age: 2m\n", "config.yaml")
    assert cfg.safety.min_age == timedelta(minutes=2)
    assert cfg.warnings == (
        "config.yaml:3: safety.min_age: warning: 2m is below 10m: between two steps of a "
        "legacy build its newest layer image is untagged and unused, and only its age "
        "protects it (a build fails when gcd removes it); backdate test images instead of "
        "lowering min_age",
    )
    assert config.parse("version: 1\nsafety: {min_age: 10m}\n", "c.yaml").warnings == ()
    assert config.parse("version: 1\n", "c.yaml").warnings == ()


def test_the_demo_teaches_settings_that_draw_no_warning() -> None:
    from tests.demo import CONFIG

    demo = config.parse(CONFIG.format(url="unix:///demo.sock", state="/tmp/demo"), "demo.yaml")
    assert demo.warnings == ()
    assert demo.safety.min_age == config.SafetyConfig().min_age


@pytest.mark.parametrize("listen", ["0.0.0.0:9782", ":9782", "'[::]:9782'"])
def test_metrics_on_every_interface_is_valid_with_a_warning(listen: str) -> None:
    cfg = config.parse(f"version: 1\nmetrics:\n  listen: {listen}\n", "config.yaml")
    shown = listen.strip("'")
    assert cfg.warnings == (
        f'config.yaml:3: metrics.listen: warning: "{shown}" serves /metrics on every '
        "interface, to other hosts too; name an address (127.0.0.1:9782) unless that is meant",
    )
    assert config.parse("version: 1\nmetrics: {listen: '127.0.0.1:9782'}\n", "c").warnings == ()


def _alias_bomb(levels: int) -> str:
    text = 'version: 1\na0: &a0 ["x","x","x","x","x","x","x","x","x","x"]\n'
    for n in range(1, levels + 1):
        text += f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]\n"
    return text + f"protect: *a{levels}\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"version: 1\nsafety: {min_age: \xff\xfe}\n",
            "c.yaml:2: not UTF-8 text (byte 0xff); save the file as UTF-8",
        ),
        (
            b"version: 1\nsafety: {max_removals_per_run: !!int abc}\n",
            "c.yaml:2: safety.max_removals_per_run: expected an integer >= 1, got abc",
        ),
        (
            b"version: 1\nunmatched: !!bool maybe\n",
            "c.yaml:2: unmatched: expected one of keep | expire, got maybe",
        ),
        (
            b"version: 1\n? {min_age: 1h}\n: 1\n",
            "c.yaml:2: a key must be a name, got a mapping",
        ),
        (
            b"version: 1\nsafety: {keep_one_per_repository: !!bool maybe}\n",
            "c.yaml:2: safety.keep_one_per_repository: expected true or false, got maybe",
        ),
        (
            b"version: 1\nsafety: {max_removal_fraction: !!float xyz}\n",
            "c.yaml:2: safety.max_removal_fraction: expected a number in (0, 1], got xyz",
        ),
        (
            b"version: 1\nunmatched: !x:str foo\n",
            "c.yaml:2: unmatched: expected one of keep | expire, got !x:str foo",
        ),
        (
            b"version: 1\nsafety: {max_removals_per_run: " + b"9" * 5000 + b"}\n",
            "c.yaml:2: safety.max_removals_per_run: expected an integer >= 1, got "
            + "9" * 59
            + "… (5,000 characters)",
        ),
        (
            b"version: 1\nsafety: {min_age: 1000000000d}\n",
            'c.yaml:2: safety.min_age: expected a duration up to 3650d, got "1000000000d"',
        ),
        (
            b"version: 1\nschedule: {every: 3000000d}\n",
            'c.yaml:2: schedule.every: expected a duration up to 3650d, got "3000000d"',
        ),
        (
            b"version: 1\nunmatched: keep\x00\n",
            "c.yaml:2: invalid YAML: character U+0000 is not allowed in YAML",
        ),
        (
            _alias_bomb(9).encode(),
            "c.yaml:5: invalid YAML: more than 10000 values once its aliases are expanded",
        ),
    ],
    ids=[
        "not-utf8",
        "int-tag",
        "bool-tag",
        "mapping-as-key",
        "bool-tag-not-a-bool",
        "float-tag",
        "local-tag",
        "5000-digits",
        "min_age-overflow",
        "every-overflow",
        "nul",
        "alias-bomb",
    ],
)
def test_hostile_files_are_one_clear_line_each(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert caught.value.problems == (message.replace("c.yaml", str(path)),)


def test_deep_nesting_and_huge_files_are_refused_with_a_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("version: 1\nprotect: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError) as caught:
        config.load(str(deep))
    (problem,) = caught.value.problems
    assert problem.startswith(f"{deep}:2: invalid YAML: ")
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError) as caught:
        config.load(str(big))
    assert caught.value.problems == (f"{big}:1: the configuration is larger than 1 MB",)
