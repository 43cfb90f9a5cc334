"""FHIR dates as [low, high] instant ranges in the store's text format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from hie.fhir.search.dates import date_range, fmt, now


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2024", "2024-01-01T00:00:00.000000Z", "2024-12-31T23:59:59.999999Z"),
        ("2024-02", "2024-02-01T00:00:00.000000Z", "2024-02-29T23:59:59.999999Z"),
        ("2024-02-03", "2024-02-03T00:00:00.000000Z", "2024-02-03T23:59:59.999999Z"),
        ("2024-02-03T04:05", "2024-02-03T04:05:00.000000Z", "2024-02-03T04:05:59.999999Z"),
        ("2024-02-03T04:05:06Z", "2024-02-03T04:05:06.000000Z", "2024-02-03T04:05:06.999999Z"),
        ("2024-02-03T04:05:06.7Z", "2024-02-03T04:05:06.700000Z", "2024-02-03T04:05:06.799999Z"),
        ("2024-02-03T12:05:06+08:00", "2024-02-03T04:05:06.000000Z", "2024-02-03T04:05:06.999999Z"),
        # the store's own format is its own range
        (
            "2024-02-03T04:05:06.123456Z",
            "2024-02-03T04:05:06.123456Z",
            "2024-02-03T04:05:06.123456Z",
        ),
        # a leap second, which FHIR allows and datetime does not
        (
            "2016-12-31T23:59:60.000000Z",
            "2016-12-31T23:59:59.000000Z",
            "2016-12-31T23:59:59.000000Z",
        ),
        ("0001-01-01", "0001-01-01T00:00:00.000000Z", "0001-01-01T23:59:59.999999Z"),
    ],
)
def test_date_range(value, low, high):
    assert date_range(value) == (low, high)


@pytest.mark.parametrize(
    "value", ["2024-13-01T00:00:00.000000Z", "2024-02-30T00:00:00.000000Z", "2024-1-1", "x", ""]
)
def test_invalid_dates_are_refused(value):
    with pytest.raises(ValueError):
        date_range(value)


def test_fmt_keeps_four_digit_years_and_utc():
    """Instants compare as text only if every year has four digits."""
    assert fmt(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000000Z"
    assert fmt(datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) < fmt(
        datetime(1000, 1, 1, tzinfo=UTC)
    )
    east = timezone(timedelta(hours=8))
    assert fmt(datetime(2024, 2, 3, 12, 0, 0, 5, tzinfo=east)) == "2024-02-03T04:00:00.000005Z"
    stamp = now()
    assert date_range(stamp) == (stamp, stamp)
