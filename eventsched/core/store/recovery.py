"""The reconciler's SQL: candidates, takeover of stale attempts, dead events, status gauges.

* :func:`candidates` / :func:`still_waiting` - events the reconciler may have to enqueue
  again (overdue, retry overdue, stale running, or every pending one after Redis lost its
  data), paged by keyset;
* :func:`take_over` - the CAS ``running -> retrying | dead`` for an attempt whose lease
  expired;
* :func:`dead_events` / :func:`unpublished_dead` / :func:`mark_published` - dead events
  whose DLQ message is not acknowledged yet, and recording the acknowledgement (the
  executor's DLQ publisher and the reconciler's republishing share them);
* :func:`status_counts` - events by status for the gauges.

Everything runs on the trio side (:class:`Database`). Transitions are compare-and-set like
the executor's (:mod:`eventsched.core.store.executions`, whose :class:`DeadEvent` and
:data:`STATUSES` this module uses), and :func:`take_over` locks its ``events`` rows
``ORDER BY id`` first, the lock order of every multi-row writer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final

from eventsched.core.domain.event import STATUSES
from eventsched.core.store.executions import DeadEvent
from eventsched.core.store.pool import Database

_EPOCH: Final = datetime(1, 1, 1, tzinfo=UTC)
_NIL: Final = uuid.UUID(int=0)


# -- candidates and takeover -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """An event the reconciler may have to enqueue again."""

    event_id: str
    attempts: int
    at: datetime  # the ordering column: execute_at, next_attempt_at or updated_at
    #: The event's trace (``events.traceparent``): its re-enqueued job joins it.
    traceparent: str | None = None
    #: The UTC day of the event's partition (``retain_from``): its job's hint for the claim.
    day: date | None = None
    #: The event's type: its job joins the type's lane (limits and priority) when it has one;
    #: after Redis lost its data the lane mark is gone with the jobs, and only this restores it.
    type: str | None = None
    #: The payload's size as JSON text (bytes): its job's hint for the executor's payload
    #: budget, which otherwise reserves the largest message for it.
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Keyset position for paging through candidates."""

    at: datetime = _EPOCH
    event_id: str = str(_NIL)


# Each query is served by its partial index (see sql/000001_init.up.sql). Columns in the
# order of Candidate's fields; the third is the one each query orders by.
_WITH: Final = """traceparent, (retain_from AT TIME ZONE 'UTC')::date, type,
               octet_length(payload::text)"""
_OVERDUE_SQL: Final = {
    "overdue": f"""
        SELECT id::text, attempts, execute_at, {_WITH} FROM events
        WHERE status = 'scheduled' AND execute_at < now() - make_interval(secs => %(age)s)
          AND (execute_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY execute_at, id LIMIT %(limit)s""",
    "retry_overdue": f"""
        SELECT id::text, attempts, next_attempt_at, {_WITH} FROM events
        WHERE status = 'retrying' AND next_attempt_at < now() - make_interval(secs => %(age)s)
          AND (next_attempt_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY next_attempt_at, id LIMIT %(limit)s""",
    # Restoring after Redis lost its data: every pending event, whatever its due time.
    "restore_scheduled": f"""
        SELECT id::text, attempts, execute_at, {_WITH} FROM events
        WHERE status = 'scheduled'
          AND (execute_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY execute_at, id LIMIT %(limit)s""",
    "restore_retrying": f"""
        SELECT id::text, attempts, next_attempt_at, {_WITH} FROM events
        WHERE status = 'retrying'
          AND (next_attempt_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY next_attempt_at, id LIMIT %(limit)s""",
    "stale_running": f"""
        SELECT id::text, attempts, updated_at, {_WITH} FROM events
        WHERE status = 'running' AND updated_at < now() - make_interval(secs => %(age)s)
          AND (updated_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY updated_at, id LIMIT %(limit)s""",
}


async def candidates(
    db: Database, reason: str, *, age: float, limit: int, after: Cursor = Cursor()
) -> list[Candidate]:
    """One page of events needing the reconciler, oldest first.

    ``reason``: ``overdue`` (scheduled, due more than ``age`` s ago), ``retry_overdue``
    (retrying, next attempt due more than ``age`` s ago), ``stale_running`` (running, no
    heartbeat for ``age`` s), or ``restore_scheduled`` / ``restore_retrying`` (every
    scheduled / retrying event, soonest due first; ``age`` is not used).
    """
    rows = await db.fetchall(
        _OVERDUE_SQL[reason],
        {"age": age, "at": after.at, "id": after.event_id, "limit": limit},
    )
    return [Candidate(*row) for row in rows]


_STILL_SQL: Final = {
    "overdue": "SELECT id::text FROM events WHERE id = ANY(%(ids)s::uuid[]) AND status = 'scheduled'",
    "retry_overdue": """
        SELECT e.id::text FROM events e
        JOIN unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS r(id, attempts) ON r.id = e.id
        WHERE e.status = 'retrying' AND e.attempts = r.attempts""",
}
_STILL_SQL["restore_scheduled"] = _STILL_SQL["overdue"]
_STILL_SQL["restore_retrying"] = _STILL_SQL["retry_overdue"]


async def still_waiting(db: Database, reason: str, found: Sequence[Candidate]) -> set[str]:
    """Ids of ``found`` (from :func:`candidates`) still in that state now.

    The reconciler reads PostgreSQL, then asks Redis which jobs are pending; a job that
    finished in between is no longer pending yet was a candidate. Its claim changed the
    status before SAQ saw it finish, so reading the status again after asking Redis
    filters such jobs out (instead of enqueuing a duplicate that the claim would skip).
    """
    if not found:
        return set()
    rows = await db.fetchall(
        _STILL_SQL[reason],
        {"ids": [c.event_id for c in found], "attempts": [c.attempts for c in found]},
    )
    return {event_id for (event_id,) in rows}


_TAKE_OVER_SQL: Final = """
WITH req AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(seen)s::timestamptz[])
        AS r(id, attempt, seen)
),
locked AS (
    SELECT e.id FROM events e JOIN req r ON r.id = e.id
    WHERE e.status = 'running' AND e.attempts = r.attempt AND e.updated_at = r.seen
      AND e.updated_at < now() - make_interval(secs => %(stale)s)
    ORDER BY e.id
    FOR UPDATE OF e
),
done AS (
    UPDATE events e
    SET status = CASE WHEN e.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN e.attempts - e.attempt_base >= %(max)s THEN 'dead'
                      ELSE 'retrying' END,
        next_attempt_at = CASE WHEN e.cancel_requested_at IS NOT NULL
                                 OR e.attempts - e.attempt_base >= %(max)s
                               THEN e.next_attempt_at ELSE now() END,
        finished_at = CASE WHEN e.cancel_requested_at IS NOT NULL
                             OR e.attempts - e.attempt_base >= %(max)s THEN now() END,
        dead_reason = CASE WHEN e.cancel_requested_at IS NULL
                            AND e.attempts - e.attempt_base >= %(max)s
                           THEN 'retries_exhausted' END,
        last_error = %(error)s,
        updated_at = now()
    FROM locked l
    WHERE e.id = l.id
    RETURNING e.id, e.status, e.attempts, extract(epoch FROM e.next_attempt_at)::float8 AS next_at,
              (e.retain_from AT TIME ZONE 'UTC')::date AS day
),
logged AS (
    UPDATE event_attempts a
    SET outcome = CASE d.status WHEN 'dead' THEN 'dead' WHEN 'cancelled' THEN 'cancelled'
                                ELSE 'retried' END,
        error = %(error)s,
        finished_at = now()
    FROM done d
    WHERE a.event_id = d.id AND a.attempt = d.attempts AND a.outcome IS NULL
)
SELECT id::text, status, attempts, next_at, day FROM done
"""


@dataclass(frozen=True, slots=True)
class TakenOver:
    """A stale running attempt given up: the event now waits for attempt ``attempts + 1``
    at ``next_attempt_at`` (``retrying``), or is ``dead``, or ``cancelled`` (a cancel command
    came while the attempt ran: no retry)."""

    event_id: str
    status: str
    attempts: int
    next_attempt_at: float | None
    day: date | None = None  # the UTC day of the event's partition: its retry job's hint


async def take_over(
    db: Database,
    stale: Sequence[Candidate],
    *,
    stale_after: float,
    max_attempts: int,
    error: str,
) -> list[TakenOver]:
    """CAS ``running -> retrying`` (``dead`` when no attempt is left, ``cancelled`` when a
    cancel was requested) for attempts that
    are still running with no heartbeat for ``stale_after`` s and whose ``updated_at`` is
    still the one the caller saw (``Candidate.at``: no lease renewal since); their attempt
    rows get outcome ``retried``/``dead`` with ``error``. Events that moved on, or whose
    lease was renewed meanwhile, are left alone."""
    if not stale:
        return []
    rows = await db.fetchall(
        _TAKE_OVER_SQL,
        {
            "ids": [c.event_id for c in stale],
            "attempts": [c.attempts for c in stale],
            "seen": [c.at for c in stale],
            "stale": stale_after,
            "max": max_attempts,
            "error": error,
        },
    )
    return [TakenOver(*row) for row in rows]


# -- dead events ----------------------------------------------------------------------------

# Columns of a dead event, as DeadEvent wants them (prefix e.).
_DEAD_COLUMNS: Final = (
    "e.id::text, e.idempotency_key, e.type, e.payload, e.execute_at, e.created_at, e.attempts,"
    " coalesce(e.last_error, ''), coalesce(e.dead_reason, 'retries_exhausted'), e.finished_at,"
    " e.kafka_topic, e.kafka_partition, e.kafka_offset"
)


def _dead_event(row: Sequence[Any]) -> DeadEvent:
    return DeadEvent(
        event_id=row[0],
        idempotency_key=row[1],
        type=row[2],
        payload=row[3],
        execute_at=row[4],
        created_at=row[5],
        attempts=row[6],
        error=row[7],
        reason=row[8],
        finished_at=row[9],
        kafka_topic=row[10],
        kafka_partition=row[11],
        kafka_offset=row[12],
    )


_UNPUBLISHED_SQL: Final = f"""
SELECT {_DEAD_COLUMNS} FROM events e
WHERE e.status = 'dead' AND e.dlq_published_at IS NULL
  AND e.finished_at < now() - make_interval(secs => %(age)s)
ORDER BY e.finished_at LIMIT %(limit)s
"""


_DEAD_SQL: Final = f"""
SELECT {_DEAD_COLUMNS} FROM events e
WHERE e.id = ANY(%(ids)s::uuid[]) AND e.status = 'dead' AND e.dlq_published_at IS NULL
"""


async def dead_events(db: Database, event_ids: Sequence[str]) -> list[DeadEvent]:
    """These events, if they are dead and their DLQ message is not acknowledged yet."""
    if not event_ids:
        return []
    rows = await db.fetchall(_DEAD_SQL, {"ids": list(event_ids)})
    return [_dead_event(row) for row in rows]


async def unpublished_dead(db: Database, *, age: float, limit: int) -> list[DeadEvent]:
    """Dead events whose DLQ message is not acknowledged, dead for more than ``age`` s."""
    rows = await db.fetchall(_UNPUBLISHED_SQL, {"age": age, "limit": limit})
    return [_dead_event(row) for row in rows]


async def mark_published(db: Database, event_ids: Sequence[str]) -> int:
    """Record that the DLQ acknowledged these dead events."""
    if not event_ids:
        return 0
    return await db.execute(
        "UPDATE events SET dlq_published_at = now()"
        " WHERE id = ANY(%(ids)s::uuid[]) AND status = 'dead' AND dlq_published_at IS NULL",
        {"ids": sorted(event_ids)},
    )


# -- gauges ----------------------------------------------------------------------------------

#: The gauges count at most this many events of a status; above it they report PostgreSQL's
#: estimate, never less than this. An exact count visits every entry of the status's partial
#: index (and the heap, for rows not vacuumed yet): ~170 ms of backend CPU per million
#: scheduled events, paid every ``reconciler.gauge_interval``; on a shared host each count
#: showed as a lateness spike (bench.memory, 1,000,000 pending).
GAUGE_EXACT_LIMIT: Final = 10_000

# One round trip: the partial-index statuses are index-only scans that stop after `limit`
# entries; `succeeded` has no index (nearly every row), so it is counted only on a small table
# and is otherwise the live-tuple count (kept by the statistics system) minus the others.
# `events` is partitioned (docs/retention.md): the statistics are kept per partition.
_COUNTS_SQL: Final = """
SELECT (SELECT count(*) FROM (SELECT FROM events WHERE status = 'scheduled' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'running' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'retrying' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'dead' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'cancelled' LIMIT %(limit)s) s),
       (SELECT sum(s.n_live_tup) FROM pg_partition_tree('events') p
        JOIN pg_stat_user_tables s ON s.relid = p.relid WHERE p.isleaf)
"""
_INDEXED_STATUSES: Final = ("scheduled", "running", "retrying", "dead", "cancelled")


async def status_counts(db: Database, *, limit: int = GAUGE_EXACT_LIMIT) -> dict[str, int]:
    """Events by status for the gauges: exact up to ``limit`` per status, above it the
    planner's row estimate (as fresh as the last ANALYZE; at least ``limit``). ``succeeded``
    is exact on a table of fewer than ``limit`` live rows, else the live-tuple count minus
    the other statuses. ``eventsched status`` counts exactly instead (eventstore)."""
    row = await db.fetchone(_COUNTS_SQL, {"limit": limit})
    assert row is not None  # a SELECT without FROM returns one row
    n = len(_INDEXED_STATUSES)
    counts = dict(zip(_INDEXED_STATUSES, (int(v or 0) for v in row[:n]), strict=True))
    for status, count in counts.items():
        if count >= limit:
            counts[status] = max(limit, await _estimated_rows(db, status))
    live = int(row[n] or 0)
    if live < limit:
        exact = await db.fetchone("SELECT count(*) FROM events WHERE status = 'succeeded'")
        counts["succeeded"] = int(exact[0]) if exact else 0
    else:
        counts["succeeded"] = max(0, live - sum(counts.values()))
    return counts


async def _estimated_rows(db: Database, status: str) -> int:
    assert status in STATUSES  # a literal below: EXPLAIN takes no parameters
    row = await db.fetchone(f"EXPLAIN (FORMAT JSON) SELECT FROM events WHERE status = '{status}'")
    assert row is not None  # EXPLAIN returns its plan
    plan = row[0][0]["Plan"]
    parts = plan.get("Plans") if plan["Node Type"] == "Append" else None
    if not parts:
        return int(plan["Plan Rows"])
    # `events` is partitioned: the planner estimates at least one row for every partition,
    # the empty ones too (today's and the week ahead); those known to be empty count none.
    names = [part.get("Relation Name") for part in parts]
    empty = {
        name
        for (name,) in await db.fetchall(
            "SELECT relname FROM pg_class WHERE relname = ANY(%s) AND reltuples = 0", (names,)
        )
    }
    return sum(int(p["Plan Rows"]) for p in parts if p.get("Relation Name") not in empty)
