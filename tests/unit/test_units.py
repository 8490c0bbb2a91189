"""Durations and byte counts as users write and read them (gcd/units.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gcd.units import format_bytes, format_duration, parse_duration


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (512, "512B"),
        (999, "999B"),
        (1000, "1.0kB"),
        (940_600_000, "940.6MB"),
        (999_949, "999.9kB"),
        (999_950, "1.0MB"),  # not 1000.0kB
        (999_999_999, "1.0GB"),
        (1_234_000_000, "1.2GB"),
        (5_000_000_000_000_000, "5000.0TB"),
        (-2_500, "-2.5kB"),
    ],
)
def test_bytes_read_as_docker_images_shows_them(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("2w", 1209600), ("1h30m", 5400)],
)
def test_durations_are_written_with_units(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "1.5h", "h", "10 m", "-5m", "1y", "1H"])
def test_a_duration_without_a_known_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (720, "12m"), (273_600, "3d4h"), (273_661, "3d4h"), (-5, "0s")],
)
def test_a_duration_shows_its_two_largest_units(seconds: int, text: str) -> None:
    assert format_duration(timedelta(seconds=seconds)) == text
