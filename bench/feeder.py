"""Feeds events to eventsched's executor the way the consumer does, without Kafka.

For each event: a row in PostgreSQL ``events`` (status ``scheduled``, the consumer's
columns) and then the executor's SAQ job (:func:`eventsched.core.domain.jobcontract.make_job`: key =
event id, scheduled = due time, day = the insert's partition day, as the consumer's) through :class:`eventsched.core.jobqueue.OnTimeQueue`, the
consumer's own enqueue path. Runs on plain asyncio in its own process, so its CPU is not
mixed with the harness's or the executor's.

Modes::

    steady   --rate R --duration D --delay-min A --delay-max B   R events/s, due now+U(A, B)
    preload  --count N --due T                                   N events all due at epoch T
    backlog  --count N --delay-min A --delay-max B               N events due far out (bulk)

The due offsets come from ``random.Random(seed)``: event i gets the i-th draw, so the stock
SAQ feeder (``bench.stock_saq feed``) with the same seed produces the same due offsets.
``--redis`` takes one URL, or several separated by commas: the Redis shards (``redis.shards``),
each job enqueued on the shard of its event id (:func:`eventsched.core.jobqueue.shards.shard_of`),
as the consumer's sharded enqueue does. Writes a JSON summary to ``--result``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from redis import asyncio as aioredis

from eventsched.core.domain.event import uuid7
from eventsched.core.domain.jobcontract import make_job
from eventsched.core.jobqueue import OnTimeQueue, ScheduledJob
from eventsched.core.jobqueue.shards import shard_of

EVENT_TYPE = "bench.event"
#: SAQ timeout of the executor's jobs with default settings (job_timeout 5 min + 30 s).
JOB_TIMEOUT = 330
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COLUMNS = "id, idempotency_key, type, payload, execute_at, created_at"

Row = tuple[str, str, str, str, datetime, datetime]
#: A job waiting for its event's partition day (``day=``), known once the row is inserted.
JobOf = Callable[..., ScheduledJob]


def _row(
    due_ms: int, n: int, created: datetime, type_: str = EVENT_TYPE, lane: str = ""
) -> tuple[Row, JobOf]:
    """A new event due at ``due_ms`` (epoch ms, exact in both PostgreSQL and the job);
    ``lane``: its type's queue lane when the type has limits (as the consumer marks it)."""
    event_id = str(uuid7())
    due = _EPOCH + timedelta(milliseconds=due_ms)
    payload = json.dumps({"n": n})
    row: Row = (event_id, event_id, type_, payload, due, created)
    # The payload's size too, as the consumer's jobs carry it (the executor's budget hint).
    return row, functools.partial(
        make_job, event_id, 1, due_ms / 1000, JOB_TIMEOUT, lane=lane, size=len(payload.encode())
    )


async def _insert(conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> date:
    """Insert ``rows``; the UTC day of their partition (the jobs' ``day``, as the consumer's
    insert returns it)."""
    # The key table the consumer's insert fills too (sql/000008): the executor finds an
    # event's partition there. One transaction, so both rows get its now() as retain_from.
    async with conn.transaction():
        async with (
            conn.cursor() as cur,
            cur.copy(f"COPY events ({_COLUMNS}) FROM STDIN") as copy,
        ):
            for row in rows:
                await copy.write_row(row)
        cur = await conn.execute(
            "WITH k AS (INSERT INTO event_keys (idempotency_key, id, retain_from)"
            " SELECT k, i, now() FROM unnest(%s::text[], %s::uuid[]) AS t(k, i))"
            " SELECT (now() AT TIME ZONE 'UTC')::date",
            ([row[1] for row in rows], [row[0] for row in rows]),
        )
        found = await cur.fetchone()
    assert found is not None  # a SELECT without FROM returns one row
    day: date = found[0]
    return day


class Shards:
    """The queue on each Redis of ``--redis``; a job goes to its event's shard."""

    def __init__(self, urls: Sequence[str], name: str) -> None:
        self.queues = [
            OnTimeQueue(aioredis.from_url(url, socket_timeout=None), name, enqueue_chunk=500)
            for url in urls
        ]

    async def connect(self) -> None:
        for queue in self.queues:
            await queue.connect()

    async def disconnect(self) -> None:
        for queue in self.queues:
            await queue.disconnect()

    async def enqueue_scheduled(self, jobs: Sequence[ScheduledJob]) -> int:
        if len(self.queues) == 1:
            return await self.queues[0].enqueue_scheduled(jobs)
        groups: dict[int, list[ScheduledJob]] = {}
        for job in jobs:
            groups.setdefault(shard_of(job.key, len(self.queues)), []).append(job)
        added = await asyncio.gather(
            *(self.queues[i].enqueue_scheduled(group) for i, group in groups.items())
        )
        return sum(added)


async def _connect(args: argparse.Namespace) -> tuple[psycopg.AsyncConnection[Any], Shards]:
    conn = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    queue = Shards([u for u in args.redis.split(",") if u], args.queue)
    await queue.connect()
    return conn, queue


async def _close(conn: psycopg.AsyncConnection[Any], queue: Shards) -> None:
    await conn.close()
    await queue.disconnect()


async def steady(args: argparse.Namespace) -> dict[str, Any]:
    """``rate`` events per second for ``duration`` s, each due now + U(delay_min, delay_max)."""
    conn, queue = await _connect(args)
    rng = random.Random(args.seed)
    sent = 0
    lead_min = float("inf")  # smallest (due - enqueued) seen: events must arrive before due
    busy = 0.0
    origin = time.time()
    end = origin + args.duration
    while True:
        now = time.time()
        if now >= end:
            break
        due_count = int((now - origin) * args.rate) - sent
        if due_count > 0:
            began = time.perf_counter()
            created = datetime.now(UTC)
            batch = [
                _row(
                    round((now + rng.uniform(args.delay_min, args.delay_max)) * 1000),
                    sent + i,
                    created,
                    args.type,
                    args.lane,
                )
                for i in range(due_count)
            ]
            day = await _insert(conn, [r for r, _ in batch])
            jobs = [j(day=day) for _, j in batch]
            await queue.enqueue_scheduled(jobs)
            done = time.time()
            lead_min = min(lead_min, min(j.scheduled for j in jobs) - done)
            busy += time.perf_counter() - began
            sent += due_count
        await asyncio.sleep(args.tick)
    elapsed = time.time() - origin
    await _close(conn, queue)
    return {
        "mode": "steady",
        "sent": sent,
        "elapsed_s": round(elapsed, 3),
        "achieved_rate": round(sent / elapsed, 1),
        "started_at": origin,
        "min_lead_s": round(lead_min, 3),
        "busy_share": round(busy / elapsed, 3),
    }


async def preload(args: argparse.Namespace) -> dict[str, Any]:
    """``count`` events all due at epoch ``due``: rows first, then the jobs."""
    conn, queue = await _connect(args)
    began = time.time()
    created = datetime.now(UTC)
    due_ms = round(args.due * 1000)
    jobs: list[ScheduledJob] = []
    for start in range(0, args.count, 50_000):
        batch = [_row(due_ms, n, created) for n in range(start, min(args.count, start + 50_000))]
        day = await _insert(conn, [r for r, _ in batch])
        jobs += [j(day=day) for _, j in batch]
    rows_done = time.time()
    added = 0
    for start in range(0, len(jobs), 5000):
        added += await queue.enqueue_scheduled(jobs[start : start + 5000])
    done = time.time()
    await _close(conn, queue)
    return {
        "mode": "preload",
        "count": args.count,
        "enqueued": added,
        "due": args.due,
        "rows_s": round(rows_done - began, 3),
        "enqueue_s": round(done - rows_done, 3),
        "finished_at": done,
        "lead_left_s": round(args.due - done, 3),
    }


async def backlog(args: argparse.Namespace) -> dict[str, Any]:
    """``count`` events due far out (now + U(delay_min, delay_max)), bulk-loaded."""
    conn, queue = await _connect(args)
    rng = random.Random(args.seed)
    began = time.time()
    added = 0
    chunk = 50_000
    for start in range(0, args.count, chunk):
        created = datetime.now(UTC)
        now = time.time()
        batch = [
            _row(
                round((now + rng.uniform(args.delay_min, args.delay_max)) * 1000),
                n,
                created,
                args.type,
                args.lane,
            )
            for n in range(start, min(args.count, start + chunk))
        ]
        day = await _insert(conn, [r for r, _ in batch])
        jobs = [j(day=day) for _, j in batch]
        for i in range(0, len(jobs), 5000):
            added += await queue.enqueue_scheduled(jobs[i : i + 5000])
    done = time.time()
    await _close(conn, queue)
    return {
        "mode": "backlog",
        "count": args.count,
        "enqueued": added,
        "load_s": round(done - began, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("mode", choices=["steady", "preload", "backlog"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--redis", required=True, help="URL, or the shards' URLs, comma-separated")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--delay-min", type=float, default=2.0)
    parser.add_argument("--delay-max", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--due", type=float, default=0.0, help="epoch seconds (preload)")
    parser.add_argument("--seed", type=int, default=6)
    # 100 ms: the consumer's batch_timeout, so PostgreSQL sees as many commits as it would
    # from the consumer (each commit is an fsync with the dev stack's settings).
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--type", default=EVENT_TYPE, help="event type (steady, backlog)")
    parser.add_argument("--lane", default="", help="the type's lane if it has limits")
    args = parser.parse_args()
    run = {"steady": steady, "preload": preload, "backlog": backlog}[args.mode]
    result = asyncio.run(run(args))
    result["cpu_s"] = round(time.process_time(), 3)
    args.result.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
