"""How a message of many jobs sends its retries back (worker.messages.retry_messages)."""

from __future__ import annotations

import pytest

from medq.core.errors import NoCapacity
from worker.messages import retry_messages
from worker.runner import RetryLater


def _later(countdown_s: float, own_message: bool = False) -> RetryLater:
    return RetryLater(countdown_s, NoCapacity("no capacity"), own_message=own_message)


@pytest.mark.parametrize(
    ("retries", "messages"),
    [
        # jobs put back for want of capacity, all told 2 s: one message, not three that each hold a pool thread
        ({"a": _later(2.0), "b": _later(2.0), "c": _later(2.0)}, [(["a", "b", "c"], 2.0)]),
        # countdowns ending within the same second go together, with the latest (none runs sooner than told)
        ({"a": _later(1.2), "b": _later(1.9), "c": _later(4.5)}, [(["a", "b"], 1.9), (["c"], 4.5)]),
        # a suspect that must run alone goes on its own, even at the same countdown as others
        ({"a": _later(0.0, own_message=True), "b": _later(0.0), "c": _later(0.0, own_message=True)},
         [(["a"], 0.0), (["c"], 0.0), (["b"], 0.0)]),
        ({}, []),
    ],
)
def test_retries_of_a_message_go_back_together_unless_they_must_run_alone(
    retries: dict[str, RetryLater], messages: list[tuple[list[str], float]]
) -> None:
    assert retry_messages(list(retries.items())) == messages

