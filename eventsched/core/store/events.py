"""The SQL of the ingest path and of ``eventsched status``, all parametrized.

The consumer records a whole Kafka batch with ONE statement: the columns travel as arrays
and ``unnest`` turns them back into rows, so the cost per event is a few array elements,
not a statement, a round trip or a parse. The idempotency keys live in ``event_keys`` (not
partitioned, so unique across the whole time-partitioned log, docs/retention.md): ``ON
CONFLICT (idempotency_key) DO NOTHING`` on it absorbs redelivery, and only the events whose
key row was new are inserted; ``RETURNING`` tells which keys were new, and the day partition
each went into (the executor's claim takes it from the job as a hint, see
:mod:`eventsched.core.domain.jobcontract`). Keys that already existed are
then looked up (one more statement, only when there are any) to learn their id, status
and due time, and whether the stored event has the same content as the message.

Error translation (the consumer decides what to retry from the type alone):

* :class:`RowsRejected` - PostgreSQL refused the data itself (``DataError``,
  ``IntegrityError`` other than the idempotency key, e.g. an id that exists under another
  key). Retrying the same rows cannot help; the consumer narrows the batch down to the culprits.
* :class:`~eventsched.core.runtime.errors.DependencyError` (``postgres``) - anything else: the
  server is down (translated by :class:`Database`), a deadlock or serialization failure, a
  cancelled statement, a missing table. Retrying later can help; no row is to blame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final, NamedTuple, TypeVar
from uuid import UUID

import msgspec
import psycopg
import psycopg.waiting
import trio_asyncio  # noqa: F401  # imported for its side effect, see below
from psycopg import AsyncConnection

from eventsched.core.domain.event import Event
from eventsched.core.runtime.errors import DependencyError, EventschedError
from eventsched.core.store.pool import Database

T = TypeVar("T")


# `%b`: arrays travel in binary; psycopg's text dumping of the same lists costs about ten
# times more client CPU (docs/design-notes.md, "Binary arrays for the insert").
_INSERT_SQL: Final = """
WITH t AS (
    SELECT *
    FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::bool[],
                %b::text[], %b::int[], %b::bigint[], %b::timestamptz[], %b::text[])
         AS t(id, key, type, payload, execute_at, late, topic, part, off, created_at, tp)
),
k AS (
    INSERT INTO event_keys (idempotency_key, id, retain_from)
    SELECT key, id, now() FROM t
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING idempotency_key
)
INSERT INTO events (id, idempotency_key, type, payload, execute_at, late,
                    kafka_topic, kafka_partition, kafka_offset, created_at, traceparent,
                    retain_from)
SELECT t.id, t.key, t.type, t.payload::jsonb, t.execute_at, t.late, t.topic, t.part, t.off,
       t.created_at, t.tp, now()
FROM t JOIN k ON k.idempotency_key = t.key
RETURNING idempotency_key, (retain_from AT TIME ZONE 'UTC')::date
"""

# `same`: the stored event is the one in the message (a redelivery), not another event
# that happens to reuse the key. jsonb equality ignores key order and whitespace.
_LOOKUP_SQL: Final = """
SELECT e.idempotency_key, e.id, e.status, e.execute_at,
       (e.id = t.id AND e.type = t.type AND e.execute_at = t.execute_at
        AND e.payload = t.payload::jsonb) AS same,
       (e.retain_from AT TIME ZONE 'UTC')::date
FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::text[], %b::timestamptz[])
     AS t(key, id, type, payload, execute_at)
CROSS JOIN LATERAL (
    SELECT e.* FROM event_keys k JOIN events e ON e.id = k.id AND e.retain_from = k.retain_from
    WHERE k.idempotency_key = t.key
) e
"""

# Exact counts of the statuses that have a partial index (index-only scans); `succeeded`
# has none on purpose (see sql/000001), so it is total minus the others, where the total
# is count(*) on a small table and the planner's estimate on a big one (kept per partition:
# `events` is partitioned, docs/retention.md).
_STATUS_COUNTS_SQL: Final = """
SELECT (SELECT count(*) FROM events WHERE status = 'scheduled'),
       (SELECT count(*) FROM events WHERE status = 'running'),
       (SELECT count(*) FROM events WHERE status = 'retrying'),
       (SELECT count(*) FROM events WHERE status = 'dead'),
       (SELECT count(*) FROM events WHERE status = 'cancelled'),
       (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
          FROM pg_partition_tree('events') p JOIN pg_class c ON c.oid = p.relid
         WHERE p.isleaf)
"""
_TOTAL_SQL: Final = "SELECT count(*) FROM events"
# Below this many (estimated) rows the exact count(*) is cheap enough for a status command.
EXACT_COUNT_LIMIT: Final = 1_000_000

_OLDEST_OVERDUE_SQL: Final = """
SELECT id, execute_at, extract(epoch FROM now() - execute_at)::float8
FROM events
WHERE status = 'scheduled' AND execute_at < now()
ORDER BY execute_at
LIMIT 1
"""

_JSON: Final = msgspec.json.Encoder()


class RowsRejected(EventschedError):
    """PostgreSQL rejected the data of the statement (not the server's state)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"postgres rejected the rows: {problem}")


class IngestRow(NamedTuple):
    """A decoded event and where it was read from (a NamedTuple: one per message, built
    three times faster than a frozen dataclass)."""

    event: Event
    topic: str
    partition: int
    offset: int
    #: The message's valid W3C ``traceparent`` header (core.runtime.tracing), if any.
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event that already existed when a message with its idempotency key arrived."""

    idempotency_key: str
    id: UUID
    status: str
    execute_at: datetime
    #: The stored event equals the message's (id, type, payload, due time): a redelivery.
    same: bool
    #: The UTC day of the event's partition (its ``retain_from``), for its job's hint.
    day: date | None = None


def _columns(rows: Sequence[IngestRow]) -> list[list[Any]]:
    events = [row.event for row in rows]
    return [
        [e.id for e in events],
        [e.idempotency_key for e in events],
        [e.type for e in events],
        [_JSON.encode(e.payload).decode() for e in events],
        [e.execute_at for e in events],
        [e.late for e in events],
        [row.topic for row in rows],
        [row.partition for row in rows],
        [row.offset for row in rows],
        [e.created_at for e in events],
        [row.traceparent for row in rows],
    ]


async def insert_events(db: Database, rows: Sequence[IngestRow]) -> dict[str, date]:
    """Insert ``rows`` in one statement, skipping existing idempotency keys; return the keys
    that were inserted, each with the UTC day of the partition it went into (the day of the
    statement's ``now()``). The keys of ``rows`` must be distinct.

    Raises RowsRejected (some row's data is refused) or DependencyError (retry later).
    """
    if not rows:
        return {}
    params = _columns(rows)

    async def run(conn: AsyncConnection[Any]) -> dict[str, date]:
        cur = await conn.execute(_INSERT_SQL, params)
        return dict(await cur.fetchall())

    return await _translated(db, run)


async def lookup_existing(db: Database, rows: Sequence[IngestRow]) -> dict[str, StoredEvent]:
    """The stored events under the idempotency keys of ``rows``, compared with the rows."""
    if not rows:
        return {}
    events = [row.event for row in rows]
    params = [
        [e.idempotency_key for e in events],
        [e.id for e in events],
        [e.type for e in events],
        [_JSON.encode(e.payload).decode() for e in events],
        [e.execute_at for e in events],
    ]

    async def run(conn: AsyncConnection[Any]) -> dict[str, StoredEvent]:
        cur = await conn.execute(_LOOKUP_SQL, params)
        return {
            key: StoredEvent(key, event_id, status, execute_at, bool(same), day)
            for key, event_id, status, execute_at, same, day in await cur.fetchall()
        }

    return await _translated(db, run)


async def check_schema(db: Database) -> None:
    """Raise DependencyError unless the events and event_keys tables exist (migrations
    applied, 000008 included)."""

    async def run(conn: AsyncConnection[Any]) -> None:
        await conn.execute("SELECT 1 FROM events LIMIT 0")
        await conn.execute("SELECT 1 FROM event_keys LIMIT 0")  # sql/000008

    await _translated(db, run)


@dataclass(frozen=True, slots=True)
class StatusCounts:
    counts: dict[str, int]
    #: ``succeeded`` is derived from the planner's row estimate (a big table).
    estimated: bool


async def status_counts(db: Database) -> StatusCounts:
    """Events per status; exact unless the table is big (then ``succeeded`` is estimated)."""

    async def run(conn: AsyncConnection[Any]) -> StatusCounts:
        cur = await conn.execute(_STATUS_COUNTS_SQL)
        row = await cur.fetchone()
        assert row is not None  # a SELECT of scalars always returns one row
        scheduled, running, retrying, dead, cancelled, estimate = (int(v or 0) for v in row)
        estimated = estimate >= EXACT_COUNT_LIMIT
        if estimated:
            total = estimate
        else:
            cur = await conn.execute(_TOTAL_SQL)
            total_row = await cur.fetchone()
            total = int(total_row[0]) if total_row else 0
        others = scheduled + running + retrying + dead + cancelled
        counts = {
            "scheduled": scheduled,
            "running": running,
            "retrying": retrying,
            "succeeded": max(0, total - others),
            "dead": dead,
            "cancelled": cancelled,
        }
        return StatusCounts(counts, estimated)

    return await _translated(db, run)


@dataclass(frozen=True, slots=True)
class Overdue:
    id: UUID
    execute_at: datetime
    overdue_seconds: float


async def oldest_overdue(db: Database) -> Overdue | None:
    """The scheduled event whose due time passed longest ago, if any."""
    row = await _translated(db, _fetch_oldest_overdue)
    return None if row is None else Overdue(row[0], row[1], float(row[2]))


async def _fetch_oldest_overdue(conn: AsyncConnection[Any]) -> tuple[Any, ...] | None:
    cur = await conn.execute(_OLDEST_OVERDUE_SQL)
    return await cur.fetchone()


async def _translated(db: Database, fn: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
    try:
        result: T = await db.run(fn)
    except (psycopg.DataError, psycopg.IntegrityError) as err:
        raise RowsRejected(_describe(err)) from err
    except psycopg.Error as err:
        # Deadlock, serialization failure, statement timeout, missing table: nothing to do
        # with one row, so the whole dependency is "not usable now".
        raise DependencyError("postgres", _describe(err)) from err
    return result


def _describe(err: psycopg.Error) -> str:
    diag = getattr(err, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    lines = str(err).strip().splitlines()
    text = primary or (lines[0] if lines else type(err).__name__)
    return f"{type(err).__name__}: {text}" + (f" ({detail})" if detail else "")
