"""Helpers for the execution tests: events straight into PostgreSQL, jobs straight into
SAQ, an executor role in this process, and what came out (rows, DLQ messages).

Blocking helpers (psycopg, confluent-kafka, redis) are plain functions; async tests call
them with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
import trio
import trio_asyncio

from eventsched.core.domain.event import uuid7
from eventsched.core.domain.jobcontract import make_job, saq_timeout
from eventsched.core.domain.policies import Policies
from eventsched.core.jobqueue import JobQueue, ShardedQueue
from eventsched.core.kafka import KafkaProducer
from eventsched.core.runtime.contracts import Resources, RoleContext
from eventsched.core.runtime.health import Health
from eventsched.core.runtime.settings import Settings, require_redis
from eventsched.core.store.pool import Database
from eventsched.plugins.executor import Executor
from tests.support.clients import delete_queue_keys, query, status_counts
from tests.support.eventkeys import REGISTER_KEYS
from tests.support.servers import Names


@dataclass(frozen=True)
class NewEvent:
    id: str
    type: str
    payload: dict[str, Any]
    execute_at: float  # epoch seconds (ms precision)


def new_events(
    count: int, *, due: float | Callable[[int], float], type: str = "test.event", **payload: Any
) -> list[NewEvent]:
    """``count`` events due at ``due`` (epoch s, or a function of the index)."""
    events = []
    for i in range(count):
        at = due(i) if callable(due) else due
        events.append(NewEvent(str(uuid7()), type, {"n": i, **payload}, round(at, 3)))
    return events


def insert_events(dsn: str, events: Sequence[NewEvent], **columns: Any) -> None:
    """Insert events as the consumer would (``scheduled``); ``columns`` override (e.g.
    status, attempts, next_attempt_at, updated_at) for every row."""
    names = ["id", "idempotency_key", "type", "payload", "execute_at", "created_at", *columns]
    rows = [
        (
            e.id,
            e.id,
            e.type,
            json.dumps(e.payload),
            datetime.fromtimestamp(e.execute_at, UTC),
            datetime.now(UTC),
            *columns.values(),
        )
        for e in events
    ]
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY events ({', '.join(names)}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REGISTER_KEYS)


def statuses(dsn: str) -> dict[str, str]:
    return {str(i): s for i, s in query(dsn, "SELECT id, status FROM events")}


@dataclass(frozen=True)
class AttemptRow:
    event_id: str
    attempt: int
    scheduled_for: float
    started_at: float
    finished_at: float | None
    lateness_ms: float
    outcome: str | None
    error: str | None
    worker_id: str
    held_by: str | None  # the limit of its type that held it back (migration 000007)
    claimed_at: float | None  # when the attempt was claimed (migration 000009)


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals (start, end) that hold one instant: the most attempts running at
    once (an end and a start at the same instant do not overlap)."""
    edges = sorted(edge for start, end in intervals for edge in ((start, 1), (end, -1)))
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def attempt_rows(dsn: str) -> list[AttemptRow]:
    rows = query(
        dsn,
        "SELECT event_id::text, attempt, extract(epoch FROM scheduled_for)::float8,"
        " extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8,"
        " lateness_ms, outcome, error, worker_id, held_by,"
        " extract(epoch FROM claimed_at)::float8 FROM event_attempts"
        " ORDER BY event_id, attempt",
    )
    return [AttemptRow(*row) for row in rows]


def all_finished(dsn: str, count: int) -> Callable[[], bool]:
    """A check: ``count`` events are succeeded or dead."""

    def check() -> bool:
        counts = status_counts(dsn)
        return counts.get("succeeded", 0) + counts.get("dead", 0) >= count

    return check


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


def saq_score(url: str, queue: str, key: str) -> float | None:
    """The score of a job key in the queue's ``incomplete`` zset (None: not pending)."""
    client = redis.Redis.from_url(url)
    try:
        score = client.zscore(f"saq:{queue}:incomplete", f"saq:job:{queue}:{key}")
        return None if score is None else float(score)
    finally:
        client.close()


def saq_job(url: str, queue: str, key: str) -> dict[str, Any] | None:
    """The stored record of the job ``key`` (its kwargs, scheduled time...), None if none."""
    client = redis.Redis.from_url(url)
    try:
        record = client.get(f"saq:job:{queue}:{key}")
        return None if record is None else dict(json.loads(record))
    finally:
        client.close()


@dataclass
class Harness:
    """An executor role running in this test's process, with its adapters."""

    settings: Settings
    db: Database
    jobs: ShardedQueue
    producer: KafkaProducer
    executor: Executor
    stopping: trio.Event

    async def enqueue(self, events: Sequence[NewEvent]) -> int:
        """Enqueue the first attempt of each event, as the consumer does (marking the
        events of types with a lane)."""
        timeout = saq_timeout(self.settings)
        lane_of = Policies(self.settings).lane_of
        return await self.jobs.enqueue_many(
            [make_job(e.id, 1, e.execute_at, timeout, lane=lane_of(e.type)) for e in events]
        )


@asynccontextmanager
async def queue_client(url: str, queue: str) -> AsyncIterator[JobQueue]:
    """A connected JobQueue (enter inside ``trio_asyncio.open_loop()``)."""
    jobs = JobQueue(url, queue)
    await jobs.connect()
    try:
        yield jobs
    finally:
        await jobs.close()


@asynccontextmanager
async def open_job_queue(redis_url: str, prefix: str) -> AsyncIterator[JobQueue]:
    """A connected :func:`queue_client` of the test's own (``<prefix>-<random>``) on a
    trio-asyncio loop of its own; its keys are removed afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    async with trio_asyncio.open_loop():
        try:
            async with queue_client(redis_url, name) as queue:
                yield queue
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(delete_queue_keys, redis_url, name)


@asynccontextmanager
async def sharded_client(settings: Settings) -> AsyncIterator[ShardedQueue]:
    """A connected ShardedQueue on the shards of ``settings`` (inside ``open_loop()``)."""
    jobs = ShardedQueue(require_redis(settings), settings.redis.queue)
    await jobs.connect()
    try:
        yield jobs
    finally:
        await jobs.close()


@asynccontextmanager
async def running_executor(settings: Settings, *, loop: bool = True) -> AsyncIterator[Harness]:
    """Run the executor role here until the block ends, then stop it gracefully."""
    if loop:
        async with trio_asyncio.open_loop(), running_executor(settings, loop=False) as harness:
            yield harness
        return
    db = await Database.open(settings.postgres.dsn, max_size=4)
    try:
        async with (
            sharded_client(settings) as jobs,
            KafkaProducer.open(
                {"bootstrap.servers": settings.kafka.bootstrap_servers}, flush_timeout=5.0
            ) as producer,
        ):
            stopping = trio.Event()
            ctx = RoleContext(
                "executor", settings, Resources(db, jobs, producer), Health(), stopping
            )
            executor = Executor(ctx)
            async with trio.open_nursery() as nursery:
                with trio.fail_after(15):
                    await nursery.start(executor.run)
                harness = Harness(settings, db, jobs, producer, executor, stopping)
                try:
                    yield harness
                finally:
                    stopping.set()
                    nursery.cancel_scope.deadline = trio.current_time() + settings.shutdown.grace
    finally:
        await db.close()


def executor_env(
    names: Names, database: str, redis_url: str, kafka: str, **extra: str
) -> dict[str, str]:
    """Environment of a child ``eventsched run --role executor`` for this test."""
    return {
        "EVENTSCHED_ENV": "test",
        "EVENTSCHED_POSTGRES__DSN": database,
        "EVENTSCHED_REDIS__URL": redis_url,
        "EVENTSCHED_REDIS__QUEUE": names.queue,
        "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": kafka,
        "EVENTSCHED_KAFKA__TOPIC": names.topic,
        "EVENTSCHED_KAFKA__DLQ_TOPIC": names.dlq_topic,
        **extra,
    }
