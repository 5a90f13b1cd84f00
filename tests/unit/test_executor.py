"""The executor's pure rules: job keys and kwargs, SAQ's timeout, retry delays, the outcome
decision (the runs are in tests/integration/test_executor.py).
"""

from __future__ import annotations

import random
from datetime import date

import pytest

from eventsched.core.domain.jobcontract import (
    EXECUTE_FUNCTION,
    FIRST_ATTEMPT,
    attempt_of,
    day_of,
    job_key,
    make_job,
)
from eventsched.core.runtime.sections import RetryBackoffSettings
from eventsched.core.store.executions import Outcome
from eventsched.plugins.executor.retry import Failure, decide, retry_delay


def test_job_keys_and_kwargs_follow_the_documented_scheme() -> None:
    first = make_job("e1", 1, 12.5, 60)
    assert (first.key, first.function, first.kwargs, first.scheduled) == (
        "e1",
        EXECUTE_FUNCTION,
        {"event_id": "e1"},
        12.5,
    )
    retry = make_job("e1", 3, 13.0, 60)
    assert (retry.key, retry.kwargs) == ("e1#3", {"event_id": "e1", "attempt": 3})
    assert job_key("e1", 2) == "e1#2"


def test_the_partition_day_is_an_optional_hint_read_back_or_ignored() -> None:
    hinted = make_job("e1", 2, 13.0, 60, day=date(2026, 12, 4))
    assert hinted.kwargs == {"event_id": "e1", "attempt": 2, "day": "2026-12-04"}
    assert day_of(hinted.kwargs.get("day")) == date(2026, 12, 4)
    # Absent (a job enqueued before the kwarg) or not a date: no hint, the claim looks up.
    assert [day_of(v) for v in (None, "", "2026-13-01", "x' OR true", 20261204)] == [None] * 5


def test_the_first_attempt_has_one_meaning_in_kwargs_keys_and_readers() -> None:
    first = make_job("e1", FIRST_ATTEMPT, 12.5, 60)
    assert FIRST_ATTEMPT == 1 and "attempt" not in first.kwargs and first.key == "e1"
    assert attempt_of(first.kwargs.get("attempt")) == FIRST_ATTEMPT
    assert [attempt_of(n) for n in (None, 0, 1, 2, 5)] == [1, 1, 1, 2, 5]


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]
)
def test_retry_delay_is_exponential_and_capped(attempt: int, expected: float) -> None:
    backoff = RetryBackoffSettings(base=1.0, factor=2.0, max=10.0, jitter=0.0)  # type: ignore[arg-type]
    assert retry_delay(attempt, backoff, random.Random(1)) == expected


def test_retry_delay_jitter_stays_within_its_fraction_and_the_cap() -> None:
    backoff = RetryBackoffSettings(base=1.0, factor=2.0, max=3.0, jitter=0.2)  # type: ignore[arg-type]
    rng = random.Random(7)
    firsts = [retry_delay(1, backoff, rng) for _ in range(500)]
    assert 0.8 <= min(firsts) < 0.85 and 1.15 < max(firsts) <= 1.2
    assert max(retry_delay(3, backoff, rng) for _ in range(500)) <= 3.0


@pytest.mark.parametrize(
    ("attempt", "failure", "status", "reason"),
    [
        (1, None, "succeeded", None),
        (1, Failure("boom"), "retrying", None),
        (2, Failure("boom"), "retrying", None),
        (3, Failure("boom"), "dead", "retries_exhausted"),
        (1, Failure("bad", permanent=True), "dead", "permanent_error"),
        (1, Failure("none", permanent=True, reason="no_handler"), "dead", "no_handler"),
    ],
)
def test_decide(attempt: int, failure: Failure | None, status: str, reason: str | None) -> None:
    outcome = decide("e", attempt, failure, max_attempts=3, now=100.0, delay=lambda n: n * 10.0)
    assert (outcome.status, outcome.dead_reason) == (status, reason)
    assert outcome.next_attempt_at == (100.0 + attempt * 10.0 if status == "retrying" else None)
    assert outcome == Outcome("e", attempt, status, None if failure is None else failure.error,
                              100.0, outcome.next_attempt_at, reason)  # fmt: skip
    # The claim's partition day rides along to the outcome (whatever the outcome).
    day = date(2026, 12, 4)
    carried = decide("e", attempt, failure, max_attempts=3, now=100.0, delay=lambda n: 0.0, day=day)
    assert carried.day == day


def test_wait_until_returns_at_the_due_time_never_before() -> None:
    """The slot's wait for the due time, on the wall clock (a real asyncio loop: the loop's
    timers round to milliseconds, the last stretch is spun through)."""
    import asyncio
    import time

    from eventsched.core.jobqueue import wait_until

    async def waits() -> list[float]:
        rng = random.Random(3)
        late = []
        for _ in range(40):
            due = time.time() + rng.uniform(-0.001, 0.004)
            await wait_until(due)
            late.append(time.time() - due)
        return late

    late = asyncio.run(waits())
    assert min(late) >= 0
    assert sorted(late)[len(late) // 2] < 0.05  # loosely: a shared machine
