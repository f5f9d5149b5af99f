import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.gen.retry_after import parse_retry_after

# 2015-10-21T07:28:00Z, the RFC 9110 example date.
NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # absent / empty
        (None, None),
        ("", None),
        ("   ", None),
        # delay-seconds
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        (" 30 ", 30.0),
        ("007", 7.0),
        ("1.5", 1.5),
        (b"45", 45.0),
        # not a delay
        ("-5", None),
        ("+5", None),
        ("1e3", None),
        ("abc", None),
        ("5 seconds", None),
        ("1" * 40, None),
        ("nan", None),
        ("inf", None),
        # HTTP-date: IMF-fixdate, RFC 850, asctime; relative to NOW
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
        ("Wednesday, 21-Oct-15 07:29:00 GMT", 60.0),
        ("Wed Oct 21 07:28:30 2015", 30.0),
        ("Wed, 21 Oct 2015 07:28:10 -0000", 10.0),
        ("Wed, 21 Oct 2015 09:28:10 +0200", 10.0),
        (b"Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
        # dates in the past: the wait is over, never negative
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        # broken dates
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
        ("Wed, 21 Foo 2015 07:28:00 GMT", None),
        ("Wed, 21 Oct 2015", None),
        ("\x00\xff", None),
    ],
)
def test_parse_retry_after(value: str | bytes | None, expected: float | None) -> None:
    result = parse_retry_after(value, now=NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_http_date_uses_the_clock_by_default() -> None:
    from email.utils import format_datetime

    future = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 300, tz=UTC)
    result = parse_retry_after(format_datetime(future, usegmt=True))
    assert result is not None
    assert 290 <= result <= 301


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60)))
def test_never_raises_and_never_negative(value: str | bytes) -> None:
    result = parse_retry_after(value, now=NOW)
    assert result is None or (math.isfinite(result) and result >= 0)
