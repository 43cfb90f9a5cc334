"""FHIR date, dateTime and instant values as [low, high] UTC instant ranges.

A value covers the whole interval its precision implies: ``2024`` is
``[2024-01-01T00:00:00.000000Z, 2024-12-31T23:59:59.999999Z]``. Ranges are strings
in one fixed format so that they compare correctly as text in every store.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta, timezone

_DATE_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
#: A UTC instant to the microsecond: the store's own format, which is its own range.
_STORE_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TICK = timedelta(microseconds=1)


def fmt(moment: datetime) -> str:
    """Format an aware datetime as the store's instant string (four-digit year)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def now() -> str:
    """The current instant in the store's format."""
    return fmt(datetime.now(UTC))


def to_http_date(instant: str) -> str:
    """An HTTP-date (RFC 9110) for a store instant, as used by ``Last-Modified``.

    Built from the fixed store format by hand: ``strptime`` was a visible share of a
    read's CPU, and ``%a``/``%b`` would follow the process locale, which HTTP must not."""
    day = datetime(int(instant[0:4]), int(instant[5:7]), int(instant[8:10]))
    return (
        f"{_DAYS[day.weekday()]}, {instant[8:10]} {_MONTHS[day.month - 1]} {instant[0:4]} "
        f"{instant[11:19]} GMT"
    )


def to_fhir_instant(instant: str) -> str:
    """A FHIR ``instant`` (millisecond precision) for a store instant."""
    return instant[:23] + "Z"


def date_range(value: str) -> tuple[str, str]:
    """The [low, high] instants covered by a FHIR date/dateTime/instant string.

    Raises ValueError for anything that is not one. A time without zone is taken as
    UTC (FHIR leaves it to the server).
    """
    if _STORE_INSTANT.fullmatch(value):
        try:
            datetime.fromisoformat(value)  # a real date and time (not a leap second)
            return value, value
        except ValueError:
            pass
    m = _DATE_RE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"not a FHIR date/dateTime: {value!r}")
    year = int(m["y"])
    if m["m"] is None:
        low = datetime(year, 1, 1, tzinfo=UTC)
        return fmt(low), fmt(datetime(year + 1, 1, 1, tzinfo=UTC) - _TICK)
    month = int(m["m"])
    if m["d"] is None:
        last = calendar.monthrange(year, month)[1]
        low = datetime(year, month, 1, tzinfo=UTC)
        return fmt(low), fmt(low + timedelta(days=last) - _TICK)
    day = int(m["d"])
    if m["H"] is None:
        low = datetime(year, month, day, tzinfo=UTC)
        return fmt(low), fmt(low + timedelta(days=1) - _TICK)
    tz = UTC
    if m["tz"] and m["tz"] != "Z":
        sign = 1 if m["tz"][0] == "+" else -1
        hours, minutes = int(m["tz"][1:3]), int(m["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    if m["S"] is None:
        low = datetime(year, month, day, int(m["H"]), int(m["M"]), tzinfo=tz)
        return fmt(low), fmt(low + timedelta(minutes=1) - _TICK)
    second = int(m["S"])
    if second == 60:  # a leap second: FHIR allows it, datetime does not
        second = 59
    frac = m["f"] or ""
    low = datetime(
        year, month, day, int(m["H"]), int(m["M"]), second, int((frac + "000000")[:6]), tzinfo=tz
    )
    if len(frac) >= 6:
        return fmt(low), fmt(low)
    span = timedelta(seconds=1) / (10 ** len(frac))
    return fmt(low), fmt(low + span - _TICK)
