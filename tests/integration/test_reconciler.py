"""Specification of the reconciler: what PostgreSQL says should run is put back into Redis.

Covers Redis losing everything (FLUSHALL of a dedicated embedded Redis), retries and
attempts whose jobs vanished, a worker killed mid-job (a real child process, kill -9),
dead events whose DLQ message was lost, leader election and the status gauges.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
import trio

from eventsched.core.domain.jobcontract import make_job
from eventsched.core.runtime.settings import Settings
from eventsched.core.store.leader import LeaderLock, lock_key
from eventsched.plugins.executor.reconciler import Reconciler
from tests.support import exec_handlers
from tests.support.clients import query, read_topic, status_counts
from tests.support.eventkeys import EVENT_RETAIN_FROM
from tests.support.execution import (
    NewEvent,
    all_finished,
    attempt_rows,
    executor_env,
    flush_redis,
    insert_events,
    max_overlap,
    new_events,
    running_executor,
)
from tests.support.metrics import metric_value as sample
from tests.support.proc import AppProcess
from tests.support.servers import Names
from tests.support.waiting import wait_until

HANDLERS = "tests.support.exec_handlers"
RECONCILE_FAST = {"interval": "300ms", "grace": "300ms", "stale_after": "1s"}


pytestmark = pytest.mark.usefixtures("executor_state")


def reconciling_settings(make_settings: Any, handler: str = "ok", **sections: Any) -> Settings:
    return make_settings(  # type: ignore[no-any-return]
        executor={"concurrency": 50, "max_retries": 3, **sections.pop("executor", {})},
        handlers={"default": f"{HANDLERS}:{handler}"},
        reconciler={**RECONCILE_FAST, **sections.pop("reconciler", {})},
        **sections,
    )


def add_attempt(dsn: str, event: NewEvent, attempt: int, ago: float, outcome: str | None) -> None:
    query(
        dsn,
        "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at, finished_at,"
        " lateness_ms, outcome, worker_id, event_retain_from) VALUES (%s, %s,"
        " now() - make_interval(secs => %s), now() - make_interval(secs => %s),"
        " CASE WHEN %s::text IS NULL THEN NULL ELSE now() END, 0, %s, 'gone-worker',"
        f" {EVENT_RETAIN_FROM}) RETURNING id",
        (event.id, attempt, ago, ago, outcome, outcome, event.id),
    )


# -- Redis lost everything ---------------------------------------------------------------------


def marker(url: str, queue: str) -> str | None:
    client = redis.Redis.from_url(url)
    try:
        value = client.get(f"saq:{queue}:eventsched:epoch")
    finally:
        client.close()
    return None if value is None else value.decode()


async def test_flushall_restores_every_pending_event_before_it_is_due_and_each_runs_once(
    make_settings: Any, database: str, own_redis: str, names: Names
) -> None:
    settings = reconciling_settings(make_settings, redis={"url": own_redis})
    now = time.time()
    # 500 due in 2.5-3.5 s and 20 retrying events (attempt 2 due in 3 s), none of them in
    # Redis when it is flushed.
    events = new_events(500, due=lambda i: now + 2.5 + i / 500)
    retrying = new_events(20, due=now - 30)

    def setup() -> None:
        insert_events(database, events)
        insert_events(database, retrying, status="retrying", attempts=1,
                      next_attempt_at=_ts(now + 3))  # fmt: skip
        for event in retrying:
            add_attempt(database, event, 1, 20, "retried")

    await trio.to_thread.run_sync(setup)
    restored = sample("eventsched_reconciler_requeued_total", reason="redis_lost")
    overdue = sample("eventsched_reconciler_requeued_total", reason="overdue")
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 500
        # The leader's first pass leaves its marker; a flush after that is noticed.
        await wait_until(lambda: marker(own_redis, names.queue) == "ok", limit=5)
        await trio.to_thread.run_sync(flush_redis, own_redis)
        assert (await harness.jobs.counts())["scheduled"] == 0
        await wait_until(all_finished(database, 520), limit=20)
        assert await trio.to_thread.run_sync(marker, own_redis, names.queue) == "ok"

    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 520}
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert len(rows) == 540  # 500 first attempts, 20 x (retried attempt 1 + attempt 2)
    assert sorted(exec_handlers.PER_EVENT.values()) == [1] * 520
    assert sample("eventsched_reconciler_requeued_total", reason="redis_lost") == restored + 520
    assert sample("eventsched_reconciler_requeued_total", reason="overdue") == overdue
    # Restored before they were due (within a pass of the flush): on time, never early,
    # not grace (0.3 s) late as the overdue path would have them.
    lateness = [r.started_at - r.scheduled_for for r in rows if r.outcome == "succeeded"]
    assert min(lateness) >= 0
    assert max(lateness) < 0.3


async def test_restored_events_of_a_limited_type_keep_its_limit(
    make_settings: Any, database: str, own_redis: str, names: Names
) -> None:
    # Redis lost the jobs and the events' lane marks with them: the restored jobs must be
    # marked again, or a type limited to one at a time would run all at once.
    settings = reconciling_settings(
        make_settings, "slow", redis={"url": own_redis}, types={"a": {"concurrency": 1}}
    )
    events = new_events(6, due=time.time() + 2.5, type="a", sleep=0.2)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 6
        await wait_until(lambda: marker(own_redis, names.queue) == "ok", limit=5)
        await trio.to_thread.run_sync(flush_redis, own_redis)
        await wait_until(all_finished(database, 6), limit=20)

    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 6}
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert len(rows) == 6
    assert max_overlap((r.started_at, r.finished_at or float("inf")) for r in rows) == 1
    assert sorted(r.held_by or "" for r in rows) == [""] + ["concurrency"] * 5


async def test_restored_jobs_carry_their_payloads_size(
    make_settings: Any, database: str, own_redis: str, names: Names
) -> None:
    # The executor's payload budget reserves a job's recorded size; a job without one is
    # counted as the largest message (1 MB), which held a restore's drain to 64 jobs whose
    # claims were in flight. The restore reads the size with the event.
    settings = reconciling_settings(make_settings, redis={"url": own_redis})
    events = new_events(5, due=time.time() + 600, text="x" * 300)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 5
        await wait_until(lambda: marker(own_redis, names.queue) == "ok", limit=5)
        await trio.to_thread.run_sync(flush_redis, own_redis)
        await wait_until(lambda: marker(own_redis, names.queue) == "ok", limit=10)
        assert (await harness.jobs.counts())["scheduled"] == 5

    client = redis.Redis.from_url(own_redis)
    try:
        records = [json.loads(client.get(f"saq:job:{names.queue}:{e.id}")) for e in events]
    finally:
        client.close()
    # PostgreSQL's text of the jsonb: the same bytes as Python's json.dumps for these.
    assert [r.get("meta", {}).get("size") for r in records] == [
        len(json.dumps(e.payload).encode()) for e in events
    ]


async def test_a_restore_spans_passes_and_starts_over_when_redis_is_lost_again(
    make_settings: Any, database: str, own_redis: str, names: Names, monkeypatch: Any
) -> None:
    """Pages are bounded per pass: a big restore continues over several passes (the marker
    says so meanwhile), and a second loss during it starts it over."""
    monkeypatch.setattr("eventsched.plugins.executor.reconciler.MAX_PAGES", 1)
    settings = reconciling_settings(
        make_settings, redis={"url": own_redis}, reconciler={"batch": 50, "interval": "1h"}
    )
    events = new_events(120, due=time.time() + 600)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        reconciler = harness.executor.reconciler
        assert isinstance(reconciler, Reconciler)
        await wait_until(lambda: marker(own_redis, names.queue) == "ok", limit=5)
        await trio.to_thread.run_sync(flush_redis, own_redis)
        assert (await reconciler.reconcile_once())["redis_lost"] == 50
        first = await trio.to_thread.run_sync(marker, own_redis, names.queue)
        assert first is not None and first.startswith("restoring:")
        await trio.to_thread.run_sync(flush_redis, own_redis)  # lost again, half done
        assert (await reconciler.reconcile_once())["redis_lost"] == 50  # from the start
        second = await trio.to_thread.run_sync(marker, own_redis, names.queue)
        assert second is not None and second.startswith("restoring:") and second != first
        assert (await reconciler.reconcile_once())["redis_lost"] == 50
        assert (await reconciler.reconcile_once())["redis_lost"] == 20
        # Scheduled events done; the retrying ones (none) take the next pass's page.
        assert (await trio.to_thread.run_sync(marker, own_redis, names.queue)) == second
        assert (await reconciler.reconcile_once())["redis_lost"] == 0
        assert await trio.to_thread.run_sync(marker, own_redis, names.queue) == "ok"
        assert (await reconciler.reconcile_once())["redis_lost"] == 0
        assert (await harness.jobs.counts())["scheduled"] == 120


async def test_jobs_missing_without_a_redis_loss_come_back_grace_after_their_due_time(
    make_settings: Any, database: str, own_redis: str
) -> None:
    """Enqueues lost between PostgreSQL and Redis (a consumer crash) leave no trace in
    Redis: the overdue path re-enqueues them once overdue by the grace."""
    settings = reconciling_settings(make_settings, redis={"url": own_redis})
    events = new_events(100, due=time.time() + 1.0)
    await trio.to_thread.run_sync(insert_events, database, events)  # never enqueued
    overdue = sample("eventsched_reconciler_requeued_total", reason="overdue")
    async with running_executor(settings):
        await wait_until(all_finished(database, 100), limit=20)
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert len(rows) == 100 and sorted(exec_handlers.PER_EVENT.values()) == [1] * 100
    assert sample("eventsched_reconciler_requeued_total", reason="overdue") == overdue + 100
    assert min(r.started_at - r.scheduled_for for r in rows) >= 0.3


# -- lost retries and lost workers --------------------------------------------------------------


async def test_lost_retries_and_stale_attempts_are_recovered_with_the_key_scheme(
    make_settings: Any, database: str, dlq_topic: Names, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = reconciling_settings(make_settings)
    now = time.time()
    retrying, stale, last, busy = (new_events(1, due=now - 30)[0] for _ in range(4))

    def setup() -> None:
        insert_events(database, [retrying], status="retrying", attempts=1,
                      next_attempt_at=_ts(now - 2))  # fmt: skip
        insert_events(database, [stale, busy], status="running", attempts=1,
                      updated_at=_ts(now - 10))  # fmt: skip
        insert_events(database, [last], status="running", attempts=3, updated_at=_ts(now - 10))
        add_attempt(database, retrying, 1, 20, "retried")
        for ev, attempt in ((stale, 1), (busy, 1), (last, 3)):
            add_attempt(database, ev, attempt, 10, None)

    await trio.to_thread.run_sync(setup)
    # `busy` has no heartbeat either, but its SAQ job is active on a worker that is alive.
    await trio.to_thread.run_sync(_fake_active_job, redis_url, settings.redis.queue, busy.id)

    async with running_executor(settings) as harness:
        await wait_until(lambda: status_counts(database).get("succeeded", 0) == 2)
        await wait_until(all_finished(database, 3))
        await wait_until(
            lambda: bool(query(database, "SELECT 1 FROM events WHERE dlq_published_at IS NOT NULL"))
        )
        assert isinstance(harness.executor.reconciler, Reconciler)
        assert harness.executor.reconciler.passes >= 1

    rows = {
        (r.event_id, r.attempt): r for r in await trio.to_thread.run_sync(attempt_rows, database)
    }
    assert rows[(retrying.id, 2)].outcome == "succeeded"
    assert rows[(retrying.id, 2)].scheduled_for == pytest.approx(now - 2, abs=0.01)
    assert rows[(stale.id, 1)].outcome == "retried"
    assert rows[(stale.id, 1)].error == "worker lost: no heartbeat for 1s"
    assert rows[(stale.id, 2)].outcome == "succeeded"
    assert rows[(last.id, 3)].outcome == "dead"
    assert (last.id, 4) not in rows
    assert rows[(busy.id, 1)].outcome is None  # left alone
    assert exec_handlers.CALLS.count((retrying.id, 2)) == 1
    assert exec_handlers.CALLS.count((stale.id, 2)) == 1
    assert busy.id not in exec_handlers.PER_EVENT

    status = dict(
        await trio.to_thread.run_sync(query, database, "SELECT id::text, status FROM events")
    )
    assert status == {retrying.id: "succeeded", stale.id: "succeeded", last.id: "dead",
                      busy.id: "running"}  # fmt: skip
    (message,) = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, dlq_topic.dlq_topic)
    headers = message.headers
    assert (headers["event-id"], headers["dlq-reason"], headers["attempts"]) == (
        last.id.encode(),
        b"retries_exhausted",
        b"3",
    )
    assert headers["dlq-error"] == b"worker lost: no heartbeat for 1s"


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _fake_active_job(url: str, queue: str, event_id: str) -> None:
    """Make the first attempt's SAQ job look active on a live worker ("alive-worker")."""
    client = redis.Redis.from_url(url)
    try:
        job_id = f"saq:job:{queue}:{event_id}"
        payload = {
            "function": "execute_event",
            "kwargs": {"event_id": event_id},
            "queue": queue,
            "key": event_id,
            "status": "active",
            "worker_id": "alive-worker",
            "started": int(time.time() * 1000),
            "touched": int(time.time() * 1000),
            "timeout": 600,
        }
        client.set(job_id, json.dumps(payload))
        client.zadd(f"saq:{queue}:incomplete", {job_id: 0})
        client.rpush(f"saq:{queue}:active", job_id)
        client.set(f"saq:{queue}:worker_info:alive-worker", "{}", ex=60)
    finally:
        client.close()


def test_kill_9_mid_job_then_restart_completes_the_event_once(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, dlq_topic: Names
) -> None:
    env = executor_env(
        names,
        database,
        redis_url,
        kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT=f"{HANDLERS}:slow",
        EVENTSCHED_RECONCILER__INTERVAL="300ms",
        EVENTSCHED_RECONCILER__GRACE="300ms",
        EVENTSCHED_RECONCILER__STALE_AFTER="1s",
    )
    (event,) = new_events(1, due=time.time(), sleep=1.5)
    insert_events(database, [event])

    first = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        first.wait_event("role_ready", timeout=30)
        trio.run(_enqueue, redis_url, names.queue, [event])
        _wait_sync(lambda: status_counts(database) == {"running": 1})
    finally:
        first.kill()  # SIGKILL mid-handler: no drain, no outcome, no unlock
    assert status_counts(database) == {"running": 1}

    second = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        second.wait_event("role_ready", timeout=30)
        _wait_sync(lambda: status_counts(database) == {"succeeded": 1}, limit=20)
        taken = second.wait_event("stale_attempt_taken_over", timeout=1)
        assert taken["event_id"] == event.id
    finally:
        second.stop()
    rows = attempt_rows(database)
    assert [(r.attempt, r.outcome, r.error) for r in rows] == [
        (1, "retried", "worker lost: no heartbeat for 1s"),
        (2, "succeeded", None),
    ]
    assert rows[0].worker_id != rows[1].worker_id


async def _enqueue(url: str, queue: str, events: list[NewEvent]) -> None:
    import trio_asyncio

    from tests.support.execution import queue_client

    async with trio_asyncio.open_loop(), queue_client(url, queue) as jobs:
        await jobs.enqueue_many([make_job(e.id, 1, e.execute_at, 60) for e in events])


def _wait_sync(check: Any, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


# -- dead letters --------------------------------------------------------------------------------


async def test_a_dead_event_whose_dlq_message_was_lost_is_published_again(
    make_settings: Any, database: str, dlq_topic: Names, kafka_bootstrap: str
) -> None:
    settings = reconciling_settings(make_settings)
    (event,) = new_events(1, due=time.time() - 60, type="payment.processed")

    def setup() -> None:
        insert_events(
            database, [event], status="dead", attempts=3, last_error="boom",
            dead_reason="permanent_error", finished_at=_ts(time.time() - 5),
            kafka_topic="events", kafka_partition=2, kafka_offset=41,
        )  # fmt: skip

    await trio.to_thread.run_sync(setup)
    async with running_executor(settings):
        await wait_until(
            lambda: bool(query(database, "SELECT 1 FROM events WHERE dlq_published_at IS NOT NULL"))
        )
    (message,) = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, dlq_topic.dlq_topic)
    headers = message.headers
    assert headers["dlq-reason"] == b"permanent_error"
    assert headers["dlq-error"] == b"boom"
    assert (headers["source-topic"], headers["source-partition"], headers["source-offset"]) == (
        b"events",
        b"2",
        b"41",
    )
    assert json.loads(message.value)["id"] == event.id


# -- leadership and gauges --------------------------------------------------------------------------


async def test_one_reconciler_leads_at_a_time(database: str) -> None:
    import trio_asyncio

    key = lock_key("some-queue")
    async with trio_asyncio.open_loop():
        first, second = LeaderLock(database, key), LeaderLock(database, key)
        assert await first.acquire()
        assert not await second.acquire()
        assert await first.still_held()
        await first.release()
        assert not await first.still_held()
        assert await second.acquire()
        # The lock lives with the session: a leader whose connection dies loses it.
        backend = await second._query("SELECT pg_backend_pid()")
        await trio.to_thread.run_sync(
            query, database, "SELECT pg_terminate_backend(%s)", (backend,)
        )
        assert not await second.still_held()
        assert await first.acquire()
        await first.release()
    assert lock_key("some-queue") != lock_key("other-queue")


async def test_the_leader_publishes_status_queue_and_oldest_overdue_gauges(
    make_settings: Any, database: str
) -> None:
    settings = reconciling_settings(
        make_settings, reconciler={"gauge_interval": "200ms", "grace": "1h"}
    )
    now = time.time()

    def setup() -> None:
        insert_events(database, new_events(3, due=now + 3600))
        # Overdue by two minutes and not in Redis (grace 1h: the reconciler leaves it).
        insert_events(database, new_events(1, due=now - 120))
        insert_events(database, new_events(2, due=now - 60), status="succeeded")
        insert_events(database, new_events(1, due=now - 60), status="dead",
                      finished_at=_ts(now), dlq_published_at=_ts(now))  # fmt: skip

    await trio.to_thread.run_sync(setup)
    async with running_executor(settings) as harness:
        await harness.enqueue(new_events(4, due=now + 3600))
        with trio.fail_after(10):
            while (  # noqa: ASYNC110
                sample("eventsched_queue_jobs", state="scheduled") != 4
                or sample("eventsched_oldest_overdue_seconds") == 0
            ):
                await trio.sleep(0.05)
        assert {s: sample("eventsched_events", status=s) for s in
                ("scheduled", "running", "retrying", "succeeded", "dead")} == {
            "scheduled": 4, "running": 0, "retrying": 0, "succeeded": 2, "dead": 1,
        }  # fmt: skip
        assert 120 <= sample("eventsched_oldest_overdue_seconds") < 180


async def test_gauge_counts_stop_at_the_limit_and_read_the_estimate_above_it(
    database: str,
) -> None:
    # Counting a million scheduled events cost PostgreSQL ~170 ms of CPU every gauge
    # interval; above the limit the gauge reads the planner's estimate instead.
    import trio_asyncio

    from eventsched.core.store import recovery
    from eventsched.core.store.pool import Database

    now = time.time()

    def analyze() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("ANALYZE events")

    def setup() -> None:
        insert_events(database, new_events(40, due=now - 60), status="succeeded")
        insert_events(database, new_events(3, due=now - 60), status="dead",
                      finished_at=_ts(now), dlq_published_at=_ts(now))  # fmt: skip
        analyze()  # the statistics see no scheduled event ...
        query(database, "UPDATE events SET status = 'scheduled' WHERE id IN"
                        " (SELECT id FROM events WHERE status = 'succeeded' LIMIT 20)"
                        " RETURNING id")  # fmt: skip

    async def counts(limit: int = recovery.GAUGE_EXACT_LIMIT) -> dict[str, int]:
        db = await Database.open(database)
        try:
            return await recovery.status_counts(db, limit=limit)
        finally:
            await db.close()

    await trio.to_thread.run_sync(setup)
    indexed = ("scheduled", "running", "retrying", "dead")
    async with trio_asyncio.open_loop():
        exact = await counts()
        stale = await counts(limit=10)
        await trio.to_thread.run_sync(analyze)  # ... now they see 20
        fresh = await counts(limit=10)
    assert exact == {
        "scheduled": 20, "running": 0, "retrying": 0, "dead": 3, "cancelled": 0, "succeeded": 20,
    }  # fmt: skip
    # scheduled: counting stops at 10 and the estimate (~1) is lower, so the limit is the
    # answer; dead: 3, below the limit, exact.
    assert {s: stale[s] for s in indexed} == {
        "scheduled": 10, "running": 0, "retrying": 0, "dead": 3,
    }  # fmt: skip
    assert {s: fresh[s] for s in indexed} == {
        "scheduled": 20, "running": 0, "retrying": 0, "dead": 3,
    }  # fmt: skip
    assert fresh["succeeded"] == 20  # 43 live rows minus the others
