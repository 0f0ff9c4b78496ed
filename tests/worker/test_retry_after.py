"""``Retry-After`` in both of its forms (RFC 9110): delay-seconds and an HTTP-date."""

from __future__ import annotations

import httpx
import pytest

from medq.core.errors import RateLimited
from worker.llm.client import _retry_after_s, error_for_status

NOW_S = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
NOW_DATE = "Tue, 14 Nov 2023 22:13:20 GMT"


@pytest.mark.parametrize(
    ("headers", "expected_s"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the finer one wins
        ({"retry-after": "Tue, 14 Nov 2023 22:13:50 GMT"}, 30.0),  # IMF-fixdate
        ({"retry-after": "Tuesday, 14-Nov-23 22:14:20 GMT"}, 60.0),  # obsolete RFC 850 form
        ({"retry-after": "Tue Nov 14 22:13:25 2023"}, 5.0),  # obsolete asctime form, GMT
        ({"retry-after": "Tue, 14 Nov 2023 22:13:00 GMT"}, 0.0),  # already past: now, not negative
        ({"retry-after": "-4"}, 0.0),
        # the server's own Date is the reference, whatever the worker's clock says
        ({"retry-after": "Tue, 14 Nov 2023 23:00:10 GMT", "date": "Tue, 14 Nov 2023 23:00:00 GMT"}, 10.0),
        ({"retry-after": "Tue, 14 Nov 2023 22:13:30 GMT", "date": "not a date"}, 10.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "x"}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected_s: float | None) -> None:
    assert _retry_after_s(headers, now_s=NOW_S) == expected_s


def test_a_429_with_a_date_waits_until_then() -> None:
    # httpx's headers as the SDK hands them over: case-insensitive
    headers = httpx.Headers({"Retry-After": "Tue, 14 Nov 2023 22:15:20 GMT", "Date": NOW_DATE})
    err = error_for_status(429, headers, {"error": {"message": "slow down"}}, "http://llm:8000/v1")
    assert isinstance(err, RateLimited) and err.retry_after_s == 120.0
