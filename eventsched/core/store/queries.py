"""The HTTP API's reads: one event with its attempts, filtered pages, counts, key lookups.

Read-only statements on the shared pool (:class:`~eventsched.core.store.pool.Database`);
every function is a trio coroutine (the pool runs them on the asyncio side through
trio-asyncio) and raises :class:`~eventsched.core.runtime.errors.DependencyError` when
PostgreSQL cannot be reached. Rows come back as frozen dataclasses with aware UTC datetimes.

Pages are keyset pages on ``(execute_at, id)``: a page starts after the last row of the
previous one, so rows are neither repeated nor skipped while others are inserted, and a
deep page costs what the first one does. With ``status = 'scheduled'`` the partial index on
``execute_at`` serves the order; other filters scan ``events`` (there is no index for them:
each index costs every insert, see ``sql/000001_init.up.sql``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from eventsched.core.store.pool import Database

__all__ = [
    "Attempt",
    "CommandEntry",
    "EventKey",
    "EventRow",
    "EventSummary",
    "Overdue",
    "Stats",
    "event_by_key",
    "event_key",
    "event_with_attempts",
    "events_by_keys",
    "list_events",
    "stats",
]

#: At most this many attempts of one event are returned (the newest ones).
MAX_ATTEMPTS = 1000
#: At most this many commands of one event are returned (the newest ones).
MAX_HISTORY = 1000
#: At most this many event types are counted in :func:`stats` (the most frequent ones).
MAX_TYPES = 100


@dataclass(frozen=True, slots=True)
class Attempt:
    attempt: int
    scheduled_for: datetime
    started_at: datetime
    finished_at: datetime | None
    lateness_ms: float
    outcome: str | None
    error: str | None
    worker_id: str


@dataclass(frozen=True, slots=True)
class CommandEntry:
    """One command applied to an event (a row of ``event_commands``)."""

    command_id: uuid.UUID
    op: str
    requested_by: str
    execute_at: datetime | None
    created_at: datetime
    applied_at: datetime
    result: str
    status_before: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class EventRow:
    id: uuid.UUID
    idempotency_key: str
    type: str
    payload: dict[str, Any]
    status: str
    execute_at: datetime
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    late: bool
    created_at: datetime
    recorded_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    dead_reason: str | None
    attempt_log: tuple[Attempt, ...]
    history: tuple[CommandEntry, ...] = ()
    #: The trace the event was published under (32 hex digits of ``events.traceparent``).
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class EventSummary:
    id: uuid.UUID
    idempotency_key: str
    type: str
    status: str
    execute_at: datetime
    attempts: int
    late: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EventKey:
    """What a command needs to know about its target."""

    id: uuid.UUID
    idempotency_key: str
    status: str
    execute_at: datetime


@dataclass(frozen=True, slots=True)
class Overdue:
    id: uuid.UUID
    type: str
    execute_at: datetime
    overdue_seconds: float


@dataclass(frozen=True, slots=True)
class Stats:
    by_status: dict[str, int]
    by_type: dict[str, int]
    total: int
    oldest_overdue: Overdue | None


_EVENT_COLUMNS = (
    "id",
    "idempotency_key",
    "type",
    "payload",
    "status",
    "execute_at",
    "attempts",
    "last_error",
    "next_attempt_at",
    "late",
    "created_at",
    "recorded_at",
    "updated_at",
    "finished_at",
    "dead_reason",
)
# Lookups by id name the event's partition too (`event_keys.retain_from`, an init plan), so
# only that partition is read (docs/retention.md, "Pruning in practice").
_IN_PARTITION = "retain_from = (SELECT k.retain_from FROM event_keys k WHERE k.id = %s)"
_EVENT = f"""
SELECT {", ".join(_EVENT_COLUMNS)}, substr(traceparent, 4, 32) AS trace_id
FROM events WHERE id = %s AND {_IN_PARTITION}
"""
_ATTEMPTS = """
SELECT attempt, scheduled_for, started_at, finished_at, lateness_ms, outcome, error, worker_id
FROM (SELECT * FROM event_attempts
      WHERE event_id = %s
        AND event_retain_from = (SELECT k.retain_from FROM event_keys k WHERE k.id = %s)
      ORDER BY attempt DESC LIMIT %s) newest
ORDER BY attempt
"""

# event_commands_event_id_idx (event_id, applied_at) serves it; newest first, then reversed.
_HISTORY = """
SELECT command_id, op, requested_by, execute_at, created_at, applied_at, result,
       status_before, detail
FROM (SELECT * FROM event_commands WHERE event_id = %s
      ORDER BY applied_at DESC LIMIT %s) AS newest
ORDER BY applied_at
"""


async def event_with_attempts(db: Database, event_id: uuid.UUID) -> EventRow | None:
    """The event, its newest :data:`MAX_ATTEMPTS` attempts and :data:`MAX_HISTORY` applied
    commands (oldest first), or None."""

    async def fn(conn: AsyncConnection[Any]) -> EventRow | None:
        cur = await conn.execute(_EVENT, (event_id, event_id))
        row = await cur.fetchone()
        if row is None:
            return None
        cur = await conn.execute(_ATTEMPTS, (event_id, event_id, MAX_ATTEMPTS))
        attempts = tuple(Attempt(*a) for a in await cur.fetchall())
        cur = await conn.execute(_HISTORY, (event_id, MAX_HISTORY))
        history = tuple(CommandEntry(*c) for c in await cur.fetchall())
        return EventRow(
            **dict(zip((*_EVENT_COLUMNS, "trace_id"), row, strict=True)),
            attempt_log=attempts,
            history=history,
        )

    return await db.run(fn)


def filters(*conditions: tuple[str, object]) -> tuple[list[str], list[Any]]:
    """The ``(SQL condition with one %s, value)`` pairs whose value is not None: their
    conditions (to join with AND) and their parameters, in order."""
    kept = [(sql, value) for sql, value in conditions if value is not None]
    return [sql for sql, _ in kept], [value for _, value in kept]


async def list_events(
    db: Database,
    *,
    limit: int,
    status: str | None = None,
    type_: str | None = None,
    due_after: datetime | None = None,
    due_before: datetime | None = None,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[EventSummary]:
    """At most ``limit`` events in ``(execute_at, id)`` order, after the keyset position
    ``after``; ``due_after`` is inclusive, ``due_before`` exclusive."""
    where, params = filters(
        ("status = %s", status),
        ("type = %s", type_),
        ("execute_at >= %s", due_after),
        ("execute_at < %s", due_before),
    )
    if after is not None:
        where.append("(execute_at, id) > (%s, %s)")
        params.extend(after)
    sql = (
        "SELECT id, idempotency_key, type, status, execute_at, attempts, late, created_at,"
        " updated_at FROM events"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY execute_at, id LIMIT %s"
    )
    params.append(limit)
    rows = await db.fetchall(sql, params)
    return [EventSummary(*row) for row in rows]


async def event_key(db: Database, event_id: uuid.UUID) -> EventKey | None:
    """The idempotency key, status and due time of an event, by id."""
    row = await db.fetchone(
        f"SELECT id, idempotency_key, status, execute_at FROM events"
        f" WHERE id = %s AND {_IN_PARTITION}",
        (event_id, event_id),
    )
    return None if row is None else EventKey(*row)


async def events_by_keys(db: Database, keys: Sequence[str]) -> dict[str, EventKey]:
    """The events recorded under any of these idempotency keys, by key (one query)."""
    # The keys are in event_keys (the only unique index on them); each event row is then
    # read from its own partition (a nested loop with id and retain_from as parameters).
    rows = await db.fetchall(
        "SELECT e.id, e.idempotency_key, e.status, e.execute_at"
        " FROM unnest(%s::text[]) AS q(key)"
        " CROSS JOIN LATERAL (SELECT e.* FROM event_keys k JOIN events e"
        "   ON e.id = k.id AND e.retain_from = k.retain_from"
        "   WHERE k.idempotency_key = q.key) e",
        (list(keys),),
    )
    return {row[1]: EventKey(*row) for row in rows}


async def event_by_key(db: Database, idempotency_key: str) -> EventKey | None:
    """The event recorded under an idempotency key, if any."""
    row = await db.fetchone(
        "SELECT e.id, e.idempotency_key, e.status, e.execute_at"
        " FROM event_keys k JOIN events e ON e.id = k.id AND e.retain_from = k.retain_from"
        " WHERE k.idempotency_key = %s",
        (idempotency_key,),
    )
    return None if row is None else EventKey(*row)


_BY_STATUS = "SELECT status, count(*) FROM events GROUP BY status"
_BY_TYPE = "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY n DESC, type LIMIT %s"
# The partial index on execute_at WHERE status = 'scheduled' answers this with one entry.
_OLDEST_OVERDUE = """
SELECT id, type, execute_at, extract(epoch FROM now() - execute_at)::float8
FROM events WHERE status = 'scheduled' AND execute_at < now()
ORDER BY execute_at LIMIT 1
"""


async def stats(db: Database) -> Stats:
    """Exact counts by status and by type (the :data:`MAX_TYPES` most frequent), and the
    scheduled event longest past its due time. The counts scan ``events``."""

    async def fn(conn: AsyncConnection[Any]) -> Stats:
        async with conn.transaction():  # one snapshot for all three answers
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            by_status = await _pairs(conn, _BY_STATUS, ())
            by_type = await _pairs(conn, _BY_TYPE, (MAX_TYPES,))
            cur = await conn.execute(_OLDEST_OVERDUE)
            oldest = await cur.fetchone()
        return Stats(
            by_status=by_status,
            by_type=by_type,
            total=sum(by_status.values()),
            oldest_overdue=None if oldest is None else Overdue(*oldest),
        )

    return await db.run(fn)


async def _pairs(conn: AsyncConnection[Any], sql: str, params: Sequence[Any]) -> dict[str, int]:
    cur = await conn.execute(sql, params)
    return {str(name): int(count) for name, count in await cur.fetchall()}
