"""Per-type policies: an executor using each type's handler, retries and timeout; limits and
priorities as lanes of the job queue (a real Redis); executor processes sharing the limits
(real PostgreSQL, Redis and broker).

The queue-level tests call the claim script directly (``OnTimeQueue.claim``, as a worker's
dispatcher does) with jobs already due, so each claim's answer is the specification: which
jobs it hands out, which it holds back and why, and when it says to come back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Sequence
from itertools import pairwise
from typing import Any

import pytest
import trio
import trio_asyncio

from eventsched.core.domain.jobcontract import make_job
from eventsched.core.domain.policies import LEASE_MARGIN
from eventsched.core.jobqueue import JobClaim, JobQueue, OnTimeQueue, ScheduledJob
from eventsched.core.jobqueue.limits import Lane
from tests.support.cli import assert_one_line_exit_2, offline
from tests.support.clients import delete_queue_keys, query, status_counts
from tests.support.execution import (
    AttemptRow,
    NewEvent,
    all_finished,
    attempt_rows,
    executor_env,
    insert_events,
    max_overlap,
    new_events,
    queue_client,
    running_executor,
)
from tests.support.metrics import metric_value
from tests.support.proc import AppProcess
from tests.support.servers import Names
from tests.support.waiting import wait_until

HANDLERS = "tests.support.exec_handlers"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EVENTSCHED_TYPES__MAIL__RATE": "-1"},
            "invalid setting types.mail.rate: must not be negative (0: no limit)",
        ),
        (
            {"EVENTSCHED_TYPES__MAIL__HANDLER": "tests.support.nowhere:handler"},
            "invalid plugin types.mail.handler",
        ),
    ],
    ids=["bad-limit", "bad-handler"],
)
def test_a_bad_type_policy_stops_the_executor_with_exit_2(
    env: dict[str, str], message: str
) -> None:
    result = offline("run", "--role", "executor", "--port", "0", **env)
    assert_one_line_exit_2(result, message)


async def test_each_type_runs_with_its_own_handler_retries_and_timeout(
    make_settings: Any, database: str, dlq_topic: Names, executor_state: None
) -> None:
    no_backoff = {"base": "0s", "max": "0s", "jitter": 0}
    settings = make_settings(
        handlers={"default": f"{HANDLERS}:ok"},
        types={
            "strict": {"handler": f"{HANDLERS}:always_fails", "max_retries": 2,
                       "retry_backoff": no_backoff},
            "brief": {"handler": f"{HANDLERS}:slow", "timeout": "300ms", "max_retries": 1},
        },
    )  # fmt: skip
    now = time.time()
    strict = new_events(1, due=now, type="strict")
    brief = new_events(1, due=now, type="brief", sleep=5)
    plain = new_events(1, due=now, type="plain")
    await trio.to_thread.run_sync(insert_events, database, strict + brief + plain)
    async with running_executor(settings) as harness:
        await harness.enqueue(strict + brief + plain)
        await wait_until(all_finished(database, 3), limit=15)
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome, r.error) for r in rows_of(rows, strict)] == [
        (1, "retried", "RuntimeError: always fails"),
        (2, "dead", "RuntimeError: always fails"),  # its own max_retries, not executor's 3
    ]
    assert [(r.attempt, r.outcome, r.error) for r in rows_of(rows, brief)] == [
        (1, "dead", "handler timed out after 0.3s"),  # its own timeout, not 5 minutes
    ]
    assert [(r.outcome, r.error) for r in rows_of(rows, plain)] == [("succeeded", None)]


async def test_an_event_that_ends_leaves_no_lane_mark_behind(
    make_settings: Any, database: str, redis_url: str, names: Names, dlq_topic: Names,
    executor_state: None,
) -> None:  # fmt: skip
    # Succeeded, dead or cancelled, an event of a limited type needs its mark no more (a
    # replay or a retry command marks it again); kept, every dead one stays in Redis.
    settings = make_settings(
        handlers={"default": f"{HANDLERS}:ok"},
        types={"a": {"concurrency": 2, "handler": f"{HANDLERS}:permanent"},
               "b": {"concurrency": 2}},
    )  # fmt: skip
    now = time.time()
    dead, done = new_events(3, due=now, type="a"), new_events(3, due=now, type="b")
    await trio.to_thread.run_sync(insert_events, database, dead + done)
    async with running_executor(settings) as harness:
        await harness.enqueue(dead + done)
        await wait_until(all_finished(database, 6), limit=15)
        marks = harness.jobs.shards[0].aio_queue
        await wait_until_async(lambda: lane_marks(marks), expected={}, limit=5)
    assert await trio.to_thread.run_sync(status_counts, database) == {"dead": 3, "succeeded": 3}


async def test_a_wait_for_a_token_counts_as_held_not_late(
    make_settings: Any, database: str, dlq_topic: Names, executor_state: None
) -> None:
    # Type "r": 4 starts per second, burst 1; 3 due at once: the first starts free, the
    # other two wait 0.25 s and 0.5 s for their tokens.
    settings = make_settings(
        handlers={"default": f"{HANDLERS}:ok"}, types={"r": {"rate": 4, "burst": 1}}
    )
    late_before = metric_value("eventsched_execution_lateness_seconds_count")
    count_before = metric_value("eventsched_execution_held_seconds_count", type="r", reason="rate")
    held_before = metric_value("eventsched_execution_held_seconds_sum", type="r", reason="rate")
    events = new_events(3, due=time.time() + 0.2, type="r")
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        await harness.enqueue(events)
        await wait_until(all_finished(database, 3), limit=10)
    held_count = metric_value("eventsched_execution_held_seconds_count", type="r", reason="rate")
    held_sum = metric_value("eventsched_execution_held_seconds_sum", type="r", reason="rate")
    assert metric_value("eventsched_execution_lateness_seconds_count") - late_before == 1
    assert held_count - count_before == 2
    rows = sorted(await trio.to_thread.run_sync(attempt_rows, database), key=lambda r: r.started_at)
    assert [r.held_by for r in rows] == [None, "rate", "rate"]
    waits = sum(r.started_at - r.scheduled_for for r in rows[1:])
    assert held_sum - held_before == pytest.approx(waits, abs=0.005)
    # One token every 0.25 s. A token is taken when the job is claimed from Redis, dated no
    # earlier than the job's due time (a job claimed ahead starts then); the handler starts
    # after the PostgreSQL claim's round trip, whose time varies (a first claim on a cold
    # connection: tens of ms), so the tokens are 0.25 s apart and the starts about that.
    assert all(r.claimed_at is not None for r in rows)
    taken = [max(r.claimed_at or 0.0, r.scheduled_for) for r in rows]
    gaps = [later - earlier for earlier, later in pairwise(taken)]
    assert min(gaps) >= 0.25 - 0.005, gaps
    starts = [later.started_at - earlier.started_at for earlier, later in pairwise(rows)]
    assert min(starts) >= 0.25 - 0.1, starts


@pytest.fixture
async def jobs(redis_url: str, names: Names) -> AsyncIterator[JobQueue]:
    async with trio_asyncio.open_loop(), queue_client(redis_url, names.queue) as queue:
        yield queue
    delete_queue_keys(redis_url, names.queue)


async def lane_marks(queue: OnTimeQueue) -> dict[bytes, bytes]:
    """The lanes hash: event id -> lane."""
    marks: dict[bytes, bytes] = await trio_asyncio.aio_as_trio(queue.redis.hgetall)(
        queue.lane_keys.lanes
    )
    return {k.decode(): v.decode() for k, v in marks.items()}  # type: ignore[misc]


async def wait_until_async(
    read: Any, *, expected: object, limit: float, interval: float = 0.05
) -> None:
    """Until ``await read()`` equals ``expected`` (at most ``limit`` s)."""
    deadline = trio.current_time() + limit
    while (seen := await read()) != expected:
        assert trio.current_time() < deadline, f"still {seen!r}"
        await trio.sleep(interval)


def due_jobs(
    prefix: str, count: int, lane: str = "", at: float | None = None
) -> list[ScheduledJob]:
    due = time.time() - 1.0 if at is None else at
    return [
        ScheduledJob(key=f"{prefix}{i}", function="f", scheduled=due + i / 1000, lane=lane)
        for i in range(count)
    ]


async def claim(queue: OnTimeQueue, limit: int = 10) -> JobClaim:
    return await trio_asyncio.aio_as_trio(queue.claim)(limit)


def keys(result: JobClaim) -> list[str]:
    return [job.key for job in result.jobs]


async def test_a_full_lane_holds_back_only_its_own_jobs_and_a_finish_frees_a_slot(
    jobs: JobQueue,
) -> None:
    queue = jobs.aio_queue
    queue.set_lanes([Lane("a", concurrency=2, lease=30.0)])
    await jobs.enqueue_many(due_jobs("a", 4, lane="a") + due_jobs("b", 3))
    first = await claim(queue)
    assert sorted(keys(first)) == ["a0", "a1", "b0", "b1", "b2"]  # b is not stuck behind a
    assert [queue.held_reason(job.id) for job in first.jobs] == [""] * 5
    assert first.backlog == 0  # a2, a3 cannot run now: nothing for idle slots to take
    assert keys(await claim(queue)) == []
    a0 = next(job for job in first.jobs if job.key == "a0")
    queue.complete_nowait(a0, None)
    await trio_asyncio.aio_as_trio(queue.flush)()
    freed = await claim(queue)
    assert keys(freed) == ["a2"]  # the oldest due first
    assert queue.held_reason(freed.jobs[0].id) == "concurrency"


async def test_a_rate_lane_starts_one_job_per_token_and_says_when_the_next_is_due(
    jobs: JobQueue,
) -> None:
    queue = jobs.aio_queue
    queue.set_lanes([Lane("r", rate=5.0, burst=1)])
    await jobs.enqueue_many(due_jobs("r", 3, lane="r"))
    first = await claim(queue)
    assert keys(first) == ["r0"]
    assert first.wake_at is not None
    assert first.wake_at - time.time() == pytest.approx(0.2, abs=0.05)
    assert keys(await claim(queue)) == []  # no token yet
    await trio.sleep(max(0.0, first.wake_at - time.time()))
    second = await claim(queue)
    assert keys(second) == ["r1"]
    assert queue.held_reason(second.jobs[0].id) == "rate"


async def test_when_slots_are_scarce_the_higher_priority_starts_first(jobs: JobQueue) -> None:
    queue = jobs.aio_queue
    queue.set_lanes([Lane("low", priority=-1), Lane("high", priority=5)], default_priority=0)
    await jobs.enqueue_many(
        due_jobs("p", 2) + due_jobs("low", 2, lane="low") + due_jobs("high", 2, lane="high")
    )
    assert keys(await claim(queue, 3)) == ["high0", "high1", "p0"]
    rest = await claim(queue, 10)
    assert keys(rest) == ["p1", "low0", "low1"]


async def test_a_lease_of_a_job_that_never_finishes_expires(jobs: JobQueue) -> None:
    queue = jobs.aio_queue
    queue.set_lanes([Lane("a", concurrency=1, lease=0.3)])
    await jobs.enqueue_many(due_jobs("a", 2, lane="a"))
    first = await claim(queue)
    assert keys(first) == ["a0"]  # and its process dies: nobody finishes it
    blocked = await claim(queue)
    assert keys(blocked) == []
    assert blocked.wake_at is not None  # when the lease runs out
    await trio.sleep(max(0.0, blocked.wake_at - time.time()) + 0.01)
    assert keys(await claim(queue)) == ["a1"]


async def test_a_job_waiting_in_its_lane_can_be_removed_and_moved(jobs: JobQueue) -> None:
    queue = jobs.aio_queue
    queue.set_lanes([Lane("a", concurrency=1, lease=30.0)])
    await jobs.enqueue_many(due_jobs("a", 3, lane="a"))
    assert keys(await claim(queue)) == ["a0"]
    removed = await jobs.remove_jobs(["a1"])
    assert (removed.removed, removed.taken) == (["a1"], [])
    later = time.time() + 3600
    moved = await jobs.place_job(ScheduledJob(key="a2", function="f", scheduled=later))
    assert moved == "moved"
    assert await jobs.job_exists("a2")


async def test_a_job_placed_with_a_lane_marks_its_event_and_is_limited(jobs: JobQueue) -> None:
    # What a command (reschedule, retry) places after Redis lost the event's lane mark:
    # the job brings its lane back, as an enqueue does.
    queue = jobs.aio_queue
    queue.set_lanes([Lane("a", concurrency=1, lease=30.0)])
    for placed in due_jobs("a", 3, lane="a"):
        assert await jobs.place_job(placed) == "added"
    assert keys(await claim(queue)) == ["a0"]
    assert keys(await claim(queue)) == []


async def test_removed_jobs_take_their_events_lane_marks_along(jobs: JobQueue) -> None:
    # A cancelled event's jobs are removed; its mark in the lanes hash must go too, or
    # every cancelled event of a limited type would stay in Redis for good.
    queue = jobs.aio_queue
    queue.set_lanes([Lane("a", concurrency=1, lease=30.0)])
    await jobs.enqueue_many(due_jobs("a", 3, lane="a", at=time.time() + 3600))
    assert len(await lane_marks(queue)) == 3
    removed = await jobs.remove_jobs(["a0", "a1"])
    assert sorted(removed.removed) == ["a0", "a1"]
    assert list(await lane_marks(queue)) == ["a2"]


async def test_a_laned_job_given_back_to_queued_is_still_limited(jobs: JobQueue) -> None:
    # A job given back (its slot vanished) returns to `queued`, its lease with it; the
    # claim routes it to its lane again.
    queue = jobs.aio_queue
    queue.set_lanes([Lane("a", concurrency=1, lease=30.0)])
    await jobs.enqueue_many(due_jobs("a", 3, lane="a"))
    first = await claim(queue)
    assert keys(first) == ["a0"]
    await trio_asyncio.aio_as_trio(queue.release)(first.jobs)
    # One job at a time still; the earliest due first (a0 rejoined when it was given back).
    assert keys(await claim(queue)) == ["a1"]
    assert keys(await claim(queue)) == []


# -- executor processes sharing the limits -------------------------------------------------------


def limited_env(
    names: Names, database: str, redis_url: str, kafka: str, **extra: str
) -> dict[str, str]:
    """Two limited types and an unlimited one, the same in every executor process:
    ``a``: 2 in flight, each 0.3 s (enough for overlaps to show: 20 take 3 s at 2 at once);
    ``b``: 5 starts/s, burst 1; ``c``: no limit."""
    return executor_env(
        names, database, redis_url, kafka,
        EVENTSCHED_HANDLERS__DEFAULT=f"{HANDLERS}:slow",
        EVENTSCHED_EXECUTOR__CONCURRENCY="20",
        EVENTSCHED_TYPES__A__CONCURRENCY="2",
        EVENTSCHED_TYPES__B__RATE="5",
        EVENTSCHED_TYPES__B__BURST="1",
        TEST_HANDLER_SLEEP="0",
        **extra,
    )  # fmt: skip


async def enqueue_as_the_consumer(redis_url: str, queue: str, events: Sequence[NewEvent]) -> None:
    """Enqueue first attempts with their lanes (types a and b have one), as the consumer does."""
    async with trio_asyncio.open_loop(), queue_client(redis_url, queue) as jobs:
        await jobs.enqueue_many(
            [
                make_job(e.id, 1, e.execute_at, 60, lane=e.type if e.type in {"a", "b"} else "")
                for e in events
            ]
        )


def rows_of(rows: Sequence[AttemptRow], events: Sequence[NewEvent]) -> list[AttemptRow]:
    ids = {e.id for e in events}
    return [r for r in rows if r.event_id in ids]


async def test_two_executors_keep_the_limits_while_an_unlimited_type_stays_on_time(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, dlq_topic: Names
) -> None:
    env = limited_env(names, database, redis_url, kafka_bootstrap)
    apps = [AppProcess(["run", "--role", "executor", "--port", "0"], env=env) for _ in range(2)]
    try:
        for app in apps:
            app.wait_event("role_ready", timeout=30)
        due = time.time() + 1.0
        a = new_events(20, due=due, type="a", sleep=0.3)
        b = new_events(30, due=due, type="b")
        # c: 30 per second through the 6 s that a and b are saturated (enough for a p99).
        c = new_events(180, due=lambda i: due + i / 30, type="c")
        events = a + b + c
        await trio.to_thread.run_sync(insert_events, database, events)
        await enqueue_as_the_consumer(redis_url, names.queue, events)
        await wait_until(all_finished(database, len(events)), limit=30, interval=0.25)
        for app in apps:
            app.proc.send_signal(signal.SIGTERM)
        assert [app.wait(30) for app in apps] == [0, 0]
    finally:
        for app in apps:
            app.kill()
    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": len(events)}
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert len(rows) == len(events)  # one attempt each
    a_rows, b_rows, c_rows = rows_of(rows, a), rows_of(rows, b), rows_of(rows, c)
    assert (
        max_overlap((r.started_at, r.finished_at or float("inf")) for r in a_rows) == 2
    )  # never more, and the limit was what bounded them
    assert len({r.worker_id for r in a_rows + b_rows + c_rows}) == 2  # both processes served
    # b: start k needs k + 1 tokens, and the bucket (1 at first) gains 5 per second from
    # the due time on, so start k is no earlier than due + k / 5: the 30 are spread over
    # 5.8 s (1 ms for the clock's and the timestamps' rounding).
    starts = sorted(r.started_at for r in b_rows)
    assert [s >= due + k / 5 - 0.001 for k, s in enumerate(starts)] == [True] * 30, starts
    assert starts[-1] - due >= 5.8 - 0.001
    assert all(r.started_at >= r.scheduled_for for r in rows)  # none early
    # c is not held back by a or b: held back, nearly every c due while they are saturated
    # (3-6 s) would wait for a lease or a token. Not p99: a stall of PostgreSQL as a whole
    # (seen here, rarely: every claim of both processes waiting ~0.3 s at once, a few c
    # late together) is not head-of-line blocking, and would fail it.
    late_c = sorted(r.lateness_ms for r in c_rows)
    assert late_c[len(late_c) * 9 // 10] < 50, late_c[-20:]
    # Why each waited: all but the first two of a waited for a lease, all but the first of
    # b for a token (the first of each found the lane free); c was never held.
    held = [(r.started_at, r.held_by) for r in a_rows]
    assert [by for _, by in sorted(held)[2:]] == ["concurrency"] * 18
    assert {r.held_by for r in sorted(b_rows, key=lambda r: r.started_at)[1:]} == {"rate"}
    assert {r.held_by for r in c_rows} == {None}


async def test_a_killed_executors_leases_return_when_they_expire(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, dlq_topic: Names
) -> None:
    # Type a: 2 in flight, timeout 2 s, so a lease lasts 2 s + LEASE_MARGIN.
    env = limited_env(
        names, database, redis_url, kafka_bootstrap, EVENTSCHED_TYPES__A__TIMEOUT="2s"
    )
    first = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    second: AppProcess | None = None
    try:
        first.wait_event("role_ready", timeout=30)
        held = new_events(2, due=time.time(), type="a", sleep=1.9)
        await trio.to_thread.run_sync(insert_events, database, held)
        await enqueue_as_the_consumer(redis_url, names.queue, held)
        await wait_until(lambda: status_counts(database).get("running", 0) == 2)
        first.proc.send_signal(signal.SIGKILL)  # both leases are its, and nobody returns them
        first.wait(10)
        claimed = max(r.started_at for r in await trio.to_thread.run_sync(attempt_rows, database))
        later = new_events(1, due=time.time(), type="a", sleep=0)
        await trio.to_thread.run_sync(insert_events, database, later)
        await enqueue_as_the_consumer(redis_url, names.queue, later)
        second = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
        second.wait_event("role_ready", timeout=30)
        await wait_until(lambda: statuses_of(database, later) == {"succeeded"}, limit=15)
    finally:
        first.kill()
        if second is not None:
            second.kill()
    (row,) = rows_of(await trio.to_thread.run_sync(attempt_rows, database), later)
    lease = 2.0 + LEASE_MARGIN
    # Held while the dead process's leases were live, started as soon as they expired.
    assert claimed + lease - 0.1 <= row.started_at <= claimed + lease + 1.5
    assert row.held_by == "concurrency"


def statuses_of(dsn: str, events: Sequence[NewEvent]) -> set[str]:
    rows = query(
        dsn, "SELECT status FROM events WHERE id = ANY(%s::uuid[])", ([e.id for e in events],)
    )
    return {status for (status,) in rows}


async def test_jobs_waiting_in_lanes_are_counted(jobs: JobQueue) -> None:
    jobs.aio_queue.set_lanes([Lane("a", concurrency=1, lease=30.0)])
    await jobs.enqueue_many(due_jobs("a", 3, lane="a"))
    assert keys(await claim(jobs.aio_queue)) == ["a0"]
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 1, "lanes": 2}
