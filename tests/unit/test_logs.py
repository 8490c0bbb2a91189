"""What gcd's log says, word for word where an operator reads it."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from gcd import logs
from gcd.model import Regret
from tests.unit.snapshots import NOW


def regret(n: int, rule: str) -> Regret:
    return Regret(f"app:{n}", rule, NOW - timedelta(hours=2), NOW)


def test_a_few_regrets_are_named_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    logs.regrets(logging.getLogger("gcd"), [regret(1, "builds"), regret(2, "unmatched")])
    assert caplog.messages == [
        "regret: app:1 is back 2h after gcd removed it (rule builds)",
        "regret: app:2 is back 2h after gcd removed it (rule unmatched)",
    ]


def test_many_regrets_at_once_name_ten_and_sum_up_the_rest_by_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A CI host loading 500 removed builds back at once logged 500 lines.
    caplog.set_level(logging.WARNING)
    found = [regret(n, "builds") for n in range(1, 500)] + [regret(500, "unmatched")]
    logs.regrets(logging.getLogger("gcd"), found)
    assert len(caplog.messages) == logs.REGRETS_NAMED + 1 == 11
    assert caplog.messages[0] == "regret: app:1 is back 2h after gcd removed it (rule builds)"
    assert caplog.messages[-1] == (
        "regret: 490 more tags are back after gcd removed them (rule builds: 489, "
        "rule unmatched: 1)"
    )
