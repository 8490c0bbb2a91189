"""`gcd schema`: the configuration's JSON Schema, made from the options' declarations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gcd import cli, config
from gcd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def valid(document: Any) -> bool:
    return jsonschema.Draft202012Validator(config.schema()).is_valid(document)


def test_gcd_schema_prints_it_and_the_repository_ships_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed == config.schema()
    # config.example.yaml's yaml-language-server line points editors at this file.
    assert json.loads((ROOT / "docs/config.schema.json").read_text()) == printed, (
        "docs/config.schema.json is stale: .venv/bin/gcd schema > docs/config.schema.json"
    )
    example = (ROOT / "config.example.yaml").read_text()
    assert "# yaml-language-server: $schema=./docs/config.schema.json" in example.splitlines()


def test_the_example_config_is_valid() -> None:
    assert valid(yaml.safe_load((ROOT / "config.example.yaml").read_text()))


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nunmatchd: keep\n",  # an unknown key
        "version: 1\nsafety: {min_ag: 1h}\n",
        "version: 1\nrules: [{name: a, keep_last: 1, match: {tags: x}}]\n",
        "version: 1\nprotect: [{ref: a, tag: b}]\n",  # exactly one key
        "version: 1\nprotect: [{digest: a}]\n",
        "version: 2\n",
        "engine: {url: 'unix:///x'}\n",  # no version
        "version: 1\nsafety: {max_removals_per_run: three}\n",  # types
        "version: 1\nsafety: {max_removals_per_run: 0}\n",
        "version: 1\nsafety: {max_removal_fraction: 1.5}\n",
        "version: 1\nsafety: {keep_one_per_repository: 'yes'}\n",
        "version: 1\nengine: {timeout: 30}\n",
        "version: 1\nengine: {timeout: 0s}\n",
        "version: 1\nschedule: {every: 1y}\n",
        "version: 1\nunmatched: drop\n",
        "version: 1\ndangling: {action: delete}\n",
        "version: 1\nrules: [{name: a}]\n",  # keep_last required
        "version: 1\nrules: [{keep_last: 1}]\n",  # name required
        "version: 1\nrules: [{name: 'a b', keep_last: 1}]\n",
        "version: 1\nrules: [{name: a, keep_last: 1, order_by: newest}]\n",
        "version: 1\nrules: [{name: a, keep_last: 1, group_by: repository}]\n",
        "version: 1\nrules: {name: a}\n",
        "version: 1\nstate_dir: 5\n",
        "version: 1\nmetrics: {listen: 9782}\n",
        "version: 1\nengine: {url: '/var/run/docker.sock'}\n",
    ],
)
def test_the_schema_rejects_what_check_config_rejects_for_types_and_keys(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(text, "c.yaml")
    assert not valid(yaml.safe_load(text))


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\n",
        "version: 1\nengine: {url: null, tls: null}\nmetrics: {textfile: null, listen: ''}\n",
        "version: 1\nengine: {tls: {cert_path: /etc/gcd/tls, verify: false}}\n",
        "version: 1\nschedule: {cron: '*/5 * * * *'}\n",
        "version: 1\nsafety: {min_age: 1h30m, max_removal_fraction: 1}\n",
        "version: 1\nrules: [{name: b-1.x, keep_last: 2, keep_within: null, "
        "order_by: 'semver(v)', match: {tag: '(?P<v>.*)', exclude_tag: null}, group_by: []}]\n",
        "version: 1\nprotect: [{id: 'sha256:9f2c'}, {label: a=b}]\n",
    ],
)
def test_the_schema_accepts_what_check_config_accepts(text: str) -> None:
    config.parse(text, "c.yaml")
    assert valid(yaml.safe_load(text))
