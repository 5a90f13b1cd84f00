"""The web console's reads beyond :mod:`.queries` and :mod:`.events`: the last hour's attempts
per minute, the forecast of due events per minute, pending events by type, dead events by
reason.

Read-only statements on the shared pool (trio coroutines; the pool runs them on the asyncio
side through trio-asyncio); DependencyError when PostgreSQL cannot be reached. Each query is
served by an index of ``sql/000001_init.up.sql``: the BRIN index on
``event_attempts.started_at`` (the last hour), the partial indexes on ``execute_at`` of
scheduled events and on ``next_attempt_at`` of retrying ones (the forecast), the partial
index of dead events (by reason), the three partial indexes of scheduled, retrying and
running events (pending by type). None of them reads the succeeded events, nearly all of
the table: the overview refreshes itself every few seconds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from eventsched.core.store.pool import Database

#: The forecast looks at most this many hours ahead.
MAX_FORECAST_HOURS: Final = 48
#: At most this many types are counted by :func:`pending_by_type` (the most frequent).
MAX_TYPES: Final = 100
#: At most this many dead events of one reason are listed.
MAX_DEAD_LISTED: Final = 500


@dataclass(frozen=True, slots=True)
class Minute:
    """Attempts that started in one minute: how many, their outcomes, their lateness."""

    minute: datetime
    attempts: int
    succeeded: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True)
class LastHour:
    minutes: tuple[Minute, ...]
    attempts: int
    succeeded: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True, slots=True)
class Forecast:
    """Events due per minute from now on: ``overdue`` are scheduled and already past due."""

    hours: int
    overdue: int
    minutes: tuple[tuple[datetime, int], ...]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.minutes)


@dataclass(frozen=True, slots=True)
class DeadEvent:
    id: uuid.UUID
    idempotency_key: str
    type: str
    attempts: int
    finished_at: datetime | None
    last_error: str | None


_LAST_HOUR = """
SELECT date_trunc('minute', started_at) AS m, count(*),
       count(*) FILTER (WHERE outcome = 'succeeded'),
       count(*) FILTER (WHERE outcome IN ('retried', 'dead')),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness_ms),
       max(lateness_ms)
FROM event_attempts WHERE started_at >= now() - interval '1 hour'
GROUP BY m ORDER BY m
"""
_HOUR_TOTALS = """
SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded'),
       count(*) FILTER (WHERE outcome IN ('retried', 'dead')),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness_ms),
       max(lateness_ms)
FROM event_attempts WHERE started_at >= now() - interval '1 hour'
"""
# A retrying event is due again at next_attempt_at, a scheduled one at execute_at.
_FORECAST = """
SELECT date_trunc('minute', due) AS m, count(*) FROM (
    SELECT execute_at AS due FROM events
    WHERE status = 'scheduled' AND execute_at >= now() AND execute_at < now() + %(span)s
    UNION ALL
    SELECT next_attempt_at FROM events
    WHERE status = 'retrying' AND next_attempt_at >= now() AND next_attempt_at < now() + %(span)s
) AS due GROUP BY m ORDER BY m
"""
_OVERDUE = "SELECT count(*) FROM events WHERE status = 'scheduled' AND execute_at < now()"
_DEAD_BY_REASON = """
SELECT coalesce(dead_reason, 'unknown'), count(*) FROM events WHERE status = 'dead'
GROUP BY 1 ORDER BY 2 DESC, 1
"""
_UNDELIVERABLE = "SELECT count(*) FROM dlq_undeliverable"
_PENDING_BY_TYPE = """
SELECT type, count(*) AS n FROM events WHERE status IN ('scheduled', 'retrying', 'running')
GROUP BY type ORDER BY n DESC, type LIMIT %s
"""
_DEAD_OF_REASON = """
SELECT id, idempotency_key, type, attempts, finished_at, last_error FROM events
WHERE status = 'dead' AND coalesce(dead_reason, 'unknown') = %s
ORDER BY finished_at, id LIMIT %s
"""


async def last_hour(db: Database) -> LastHour:
    """Attempts started in the last hour, per minute and in all."""

    async def fn(conn: AsyncConnection[Any]) -> LastHour:
        async with conn.transaction():  # one snapshot for both answers
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = await conn.execute(_LAST_HOUR)
            minutes = tuple(
                Minute(m, int(n), int(ok), int(bad), float(p50), float(p99), float(top))
                for m, n, ok, bad, p50, p99, top in await cur.fetchall()
            )
            cur = await conn.execute(_HOUR_TOTALS)
            row = await cur.fetchone()
        assert row is not None  # an aggregate without GROUP BY always returns a row
        n, ok, bad, p50, p99, top = row
        return LastHour(minutes, int(n), int(ok), int(bad), p50, p99, top)

    return await db.run(fn)


async def forecast(db: Database, hours: int) -> Forecast:
    """Events due per minute over the next ``hours`` (1 to :data:`MAX_FORECAST_HOURS`)."""
    if not 1 <= hours <= MAX_FORECAST_HOURS:
        raise ValueError(f"hours must be from 1 to {MAX_FORECAST_HOURS}")

    async def fn(conn: AsyncConnection[Any]) -> Forecast:
        cur = await conn.execute(_FORECAST, {"span": f"{hours} hours"})
        minutes = tuple((m, int(n)) for m, n in await cur.fetchall())
        cur = await conn.execute(_OVERDUE)
        row = await cur.fetchone()
        return Forecast(hours, int(row[0]) if row else 0, minutes)

    return await db.run(fn)


async def dead_by_reason(db: Database) -> tuple[dict[str, int], int]:
    """Dead events per ``dead_reason``, and the DLQ copies the topic refused
    (``dlq_undeliverable``)."""

    async def fn(conn: AsyncConnection[Any]) -> tuple[dict[str, int], int]:
        cur = await conn.execute(_DEAD_BY_REASON)
        reasons = {str(r): int(n) for r, n in await cur.fetchall()}
        cur = await conn.execute(_UNDELIVERABLE)
        row = await cur.fetchone()
        return reasons, int(row[0]) if row else 0

    return await db.run(fn)


async def pending_by_type(db: Database) -> dict[str, int]:
    """Events not finished yet (scheduled, retrying, running) per type, the
    :data:`MAX_TYPES` most frequent types."""
    rows = await db.fetchall(_PENDING_BY_TYPE, (MAX_TYPES,))
    return {str(t): int(n) for t, n in rows}


async def dead_of_reason(db: Database, reason: str, limit: int) -> list[DeadEvent]:
    """The dead events of one reason, oldest death first, at most ``limit``."""
    rows = await db.fetchall(_DEAD_OF_REASON, (reason, min(limit, MAX_DEAD_LISTED)))
    return [DeadEvent(*row) for row in rows]
