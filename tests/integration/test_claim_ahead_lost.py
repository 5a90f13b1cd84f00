"""Jobs taken ahead of their due time by an executor that dies: nothing is stranded.

A job whose score says "now" for an event due seconds later is refused by the executor's
PostgreSQL claim (it is beyond the claim-ahead window) and goes back to the queue at its due
time, so an executor killed (kill -9) before the due time leaves it pending: the next one runs
it once, on time. A job taken but never answered (its claim's answer lost) goes back on the
reconciler's second look.

Real child processes (the executor role), real PostgreSQL and Redis; the handler writes each
invocation to a journal file, which is what the test counts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from eventsched.core.domain.jobcontract import make_job, saq_timeout
from tests.support.clients import status_counts
from tests.support.exec_handlers import read_journal
from tests.support.execution import (
    executor_env,
    insert_events,
    new_events,
    queue_client,
    saq_score,
)
from tests.support.proc import AppProcess
from tests.support.servers import Names

GRACE = 1.0
INTERVAL = 0.5
# Time for the surviving executor's pass itself on a loaded machine (two cores, shared).
SLACK = 2.0


async def _enqueue_taken_early(url: str, queue: str, event_id: str, due: float) -> None:
    """Enqueue the event's job for ``due``, then make its score say "now": the executor takes
    it at once, seconds before its due time (as an operator's ZADD or a restore would)."""
    import trio_asyncio

    async with trio_asyncio.open_loop(), queue_client(url, queue) as jobs:
        assert await jobs.enqueue_many([make_job(event_id, 1, due, 60)]) == 1
    client = redis.Redis.from_url(url)
    try:
        client.zadd(f"saq:{queue}:incomplete", {f"saq:job:{queue}:{event_id}": time.time()})
        client.publish(f"saq:{queue}:wakeup", "0")
    finally:
        client.close()


def _job(url: str, queue: str, event_id: str) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    try:
        raw = client.get(f"saq:job:{queue}:{event_id}")
    finally:
        client.close()
    return json.loads(raw) if raw else {}


def _wait(check: object, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_job_taken_far_ahead_goes_back_so_a_killed_executor_strands_nothing(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal")
    env = executor_env(
        names,
        database,
        redis_url,
        kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT="tests.support.exec_handlers:journal",
        EVENTSCHED_RECONCILER__INTERVAL=f"{INTERVAL}s",
        EVENTSCHED_RECONCILER__GRACE=f"{GRACE}s",
        EVENTSCHED_RECONCILER__STALE_AFTER="4s",
        TEST_HANDLER_JOURNAL=journal,
    )
    first = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        first.wait_event("role_ready", timeout=30)
        due = time.time() + 5.0
        (event,) = new_events(1, due=due)
        insert_events(database, [event])
        trio.run(_enqueue_taken_early, redis_url, names.queue, event.id, event.execute_at)
        # The first executor took the job, and its claim sent it back to wait for the due time.
        first.wait_event("job_came_early", timeout=5)

        def back_at_due_time() -> bool:
            score = saq_score(redis_url, names.queue, event.id)
            return score is not None and abs(score - event.execute_at) < 1e-3

        _wait(back_at_due_time, 5)
    finally:
        first.kill()  # kill -9 before the due time
    assert time.time() < event.execute_at, "too slow: the job was due before the kill"
    assert status_counts(database) == {"scheduled": 1}  # the claim changed nothing

    second = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        second.wait_event("role_ready", timeout=30)
        _wait(lambda: status_counts(database) == {"succeeded": 1},
              limit=event.execute_at + SLACK + 10 - time.time())  # fmt: skip
    finally:
        second.stop()
    runs = [line for line in read_journal(journal) if line["what"] == "start"]
    assert len(runs) == 1, runs
    assert runs[0]["pid"] != first.proc.pid
    late = float(runs[0]["t"]) - event.execute_at  # type: ignore[arg-type]
    assert 0 <= late <= SLACK, late


@pytest.mark.usefixtures("executor_state")
async def test_the_owner_of_a_job_is_forgotten_once_it_leaves_active(
    make_settings: Any, database: str, redis_url: str
) -> None:
    """Every way out of `active` (finish, retry, put back) clears the job's owner entry."""
    from tests.support.execution import all_finished, running_executor
    from tests.support.waiting import wait_until

    settings = make_settings(
        executor={"concurrency": 8, "max_retries": 3,
                  "retry_backoff": {"base": "10ms", "max": "50ms", "jitter": 0}},
        handlers={"default": "tests.support.exec_handlers:flaky"},
        reconciler={"enabled": False},
    )  # fmt: skip
    events = new_events(20, due=time.time() + 0.2)
    early = new_events(1, due=time.time() + 3600)
    await trio.to_thread.run_sync(insert_events, database, events + early)
    owners = f"saq:{settings.redis.queue}:owners"
    async with running_executor(settings) as harness:
        await harness.enqueue(events)
        timeout = saq_timeout(settings)
        await harness.jobs.enqueue_many([make_job(early[0].id, 1, time.time(), timeout)])
        await wait_until(all_finished(database, len(events)))
        client = redis.Redis.from_url(redis_url)
        try:
            await wait_until(lambda: client.hlen(owners) == 0, limit=5)
        finally:
            client.close()


@pytest.mark.usefixtures("executor_state")
async def test_a_job_whose_claim_answer_was_lost_is_given_back(
    make_settings: Any, database: str, redis_url: str
) -> None:
    """The claim script ran but its answer was lost (the connection was cut during the
    call): the job sits in `active`, QUEUED, taken by a worker that is alive but never got
    it. It goes back to `queued` on the reconciler's second look and runs once."""
    from tests.support import exec_handlers
    from tests.support.execution import all_finished, running_executor
    from tests.support.waiting import wait_until

    settings = make_settings(
        executor={"concurrency": 4},
        handlers={"default": "tests.support.exec_handlers:ok"},
        reconciler={"interval": "300ms", "grace": "300ms", "stale_after": "4s"},
    )
    (event,) = new_events(1, due=time.time() - 2)
    await trio.to_thread.run_sync(insert_events, database, [event])
    queue = settings.redis.queue
    async with running_executor(settings) as harness:
        owner = harness.executor.worker_id
        client = redis.Redis.from_url(redis_url)
        try:
            await wait_until(lambda: client.exists(f"saq:{queue}:worker_info:{owner}") == 1)
            job_id = f"saq:job:{queue}:{event.id}"
            record = {"function": "execute_event", "kwargs": {"event_id": event.id},
                      "queue": queue, "key": event.id, "status": "queued", "timeout": 60,
                      "scheduled": event.execute_at}  # fmt: skip
            with client.pipeline(transaction=True) as pipe:
                pipe.set(job_id, json.dumps(record))
                pipe.zadd(f"saq:{queue}:incomplete", {job_id: 0})
                pipe.rpush(f"saq:{queue}:active", job_id)
                pipe.hset(f"saq:{queue}:owners", job_id, owner)
                pipe.execute()
            await wait_until(all_finished(database, 1), limit=10)
        finally:
            client.close()
    calls = exec_handlers.CALLS
    assert calls == [(event.id, 1)]
