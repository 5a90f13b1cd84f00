"""The claim checks the due time: a job that comes too early (its Redis score or its
``scheduled`` was changed by an operator, a bug, a restore) runs nothing and goes back to
the queue at the event's due time. Real PostgreSQL and Redis; the handler records calls.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import trio

from eventsched.core.domain.jobcontract import make_job, saq_timeout
from eventsched.core.store import executions
from eventsched.core.store.executions import Claimed, ClaimRequest, NotDue
from tests.support import exec_handlers
from tests.support.execution import (
    attempt_rows,
    insert_events,
    new_events,
    running_executor,
    saq_score,
    statuses,
)
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until

pytestmark = pytest.mark.usefixtures("executor_state")

YEAR_AHEAD = 364 * 86400.0


def test_the_claim_refuses_an_event_that_is_not_due(database: str) -> None:
    now = time.time()
    early, retry, due = new_events(3, due=now + 60)
    insert_events(database, [early, due])
    insert_events(database, [retry], status="retrying", attempts=1,
                  next_attempt_at=datetime.fromtimestamp(now + 30, UTC))  # fmt: skip
    with psycopg.connect(database, autocommit=True) as conn:
        requests = [
            ClaimRequest(early.id, 0, now),
            ClaimRequest(retry.id, 2, now),
            ClaimRequest(due.id, 0, due.execute_at),  # the worker's clock says it is due
        ]
        refused, refused_retry, won = executions.claim_batch(
            conn, requests, worker_id="w1", ahead=0.01
        )
    assert refused == NotDue(early.id, "test.event", pytest.approx(early.execute_at))
    assert refused_retry == NotDue(retry.id, "test.event", pytest.approx(now + 30, abs=1e-3))
    assert isinstance(won, Claimed) and won.attempt == 1
    assert statuses(database) == {early.id: "scheduled", retry.id: "retrying", due.id: "running"}
    assert [(r.event_id, r.attempt) for r in attempt_rows(database)] == [(due.id, 1)]


async def test_a_job_due_now_for_an_event_due_in_a_year_runs_nothing_and_goes_back(
    make_settings: Any, database: str
) -> None:
    settings = make_settings(
        executor={"concurrency": 4},
        handlers={"default": "tests.support.exec_handlers:ok"},
        reconciler={"enabled": False},
    )
    (event,) = new_events(1, due=time.time() + YEAR_AHEAD)
    await trio.to_thread.run_sync(insert_events, database, [event])
    before = metric_value("eventsched_claims_not_due_total")
    async with running_executor(settings) as harness:
        # The job's score says "now" (an operator's ZADD, a restore with the wrong time).
        job = make_job(event.id, 1, time.time(), saq_timeout(settings))
        assert await harness.jobs.enqueue_many([job]) == 1

        def settled() -> bool:
            score = saq_score(settings.redis.url, settings.redis.queue, event.id)
            return bool(exec_handlers.CALLS) or (score is not None and score > time.time() + 60)

        await wait_until(settled, limit=10)
        assert exec_handlers.CALLS == []
        score = saq_score(settings.redis.url, settings.redis.queue, event.id)
        assert score == pytest.approx(event.execute_at, abs=1e-3)
        # Put back once, not claimed over and over.
        await trio.sleep(0.5)
        assert metric_value("eventsched_claims_not_due_total") == before + 1
    assert exec_handlers.CALLS == []
    assert await trio.to_thread.run_sync(statuses, database) == {event.id: "scheduled"}
    assert await trio.to_thread.run_sync(attempt_rows, database) == []
