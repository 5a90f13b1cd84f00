"""The executor's SQL: claims, outcomes, heartbeats, reconciler queries and status counts.

PostgreSQL is the source of truth for an event's state. Every transition here is a
compare-and-set ``UPDATE ... WHERE status ... AND attempts = ...``, so a job delivered twice,
a stale worker or a reconciler race changes nothing. All statements are parametrized.

Two kinds of callers:

* **Job functions** (asyncio side, one per running SAQ job) claim an event and record its
  outcome through a :class:`GroupCommit`: requests of concurrently running jobs are sent
  as one statement per round trip on a dedicated connection. Nothing waits for a timer:
  while one batch is in flight the next one fills up, so under load batches grow and at
  low load a request goes out at once (PostgreSQL's own group commit idea). A job's future
  resolves only once its statement has committed, so the guarantees are those of one
  statement per job: the claim is durable before the handler runs, the outcome before the
  SAQ job is acknowledged.
* **Trio-side tasks** (heartbeat, reconciler, dead-letter publisher) use :class:`Database`.

Lock order: every multi-row writer locks its ``events`` rows ``ORDER BY id`` first (and
touches ``event_attempts`` rows only of events it holds), so concurrent batches from
several executors queue behind each other instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

import psycopg
import trio

from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import redact
from eventsched.core.store.pool import Database

log = get_logger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

#: Statuses of an event (the CHECK constraint of ``events.status``).
STATUSES: Final = ("scheduled", "running", "retrying", "succeeded", "dead")
#: Why an event went dead; the ``dlq-reason`` header and a metrics label.
DEAD_REASONS: Final = ("retries_exhausted", "permanent_error", "no_handler")

_EPOCH: Final = datetime(1, 1, 1, tzinfo=UTC)
# Batches travel as one JSON parameter (json_to_recordset): psycopg adapts a Python list
# to a PostgreSQL array element by element in Python, which cost more than the rest of a
# job's bookkeeping; one json.dumps in C does not.
_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_NIL: Final = uuid.UUID(int=0)


# -- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """A job asks to run an attempt of an event."""

    event_id: str
    # 0: the first delivery (the event must be `scheduled`); n >= 2: retry n (the event must
    # be `retrying` after n - 1 attempts).
    attempt: int
    started: float  # epoch seconds, the worker's clock when the job started


@dataclass(frozen=True, slots=True)
class Claimed:
    """The claim won: the event is `running` with this attempt, and its attempt row exists."""

    event_id: str
    attempt: int
    type: str
    payload: dict[str, Any]
    execute_at: float  # epoch seconds
    scheduled_for: float  # when this attempt was due (execute_at, or next_attempt_at)
    # Attempts made before the current budget began (0; after a dlq replay, the attempts
    # of the run that went dead): max_retries counts from here.
    base: int = 0
    # time.monotonic() no later than the claim's updated_at (the start of the attempt's
    # lease): when the claiming statement was sent (for a re-sent claim recognised as done,
    # when this one was sent minus the age of the first one's updated_at).
    sent: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class NotClaimed:
    """The claim lost: the event is not in the state the job expected (a duplicate job)."""

    event_id: str
    type: str | None  # None: there is no such event
    status: str | None
    attempts: int | None


@dataclass(frozen=True, slots=True)
class NotDue:
    """The claim was refused: the event is in the state the job expected, but not due yet
    (its job came early: a changed Redis score or ``scheduled``). Nothing changed; the job
    belongs back in the queue at ``scheduled_for``."""

    event_id: str
    type: str
    scheduled_for: float  # epoch seconds: execute_at, or next_attempt_at for a retry


ClaimResult = Claimed | NotClaimed | NotDue

# A claim is refused while the attempt's due time is later than `greatest(now(), started) +
# ahead`: early by PostgreSQL's clock AND by the worker's, beyond the claim-ahead window.
# Either clock saying "due" is enough, so clock skew between hosts cannot make a due job
# bounce between queue and claim. The last column carries the due time of a refused claim
# (the event is in the requested state, just early); a claim lost to a concurrent one reads
# the pre-lock snapshot there, hence the repeated due test.
#
# The third branch recognises our own earlier claim of the same request (same worker, same
# start time): it committed but the answer was lost with the connection. Re-sending a claim
# after a connection error is therefore safe. `lateness_ms` uses the exact float start time.
#
# `e.id = ANY(ARRAY(SELECT id FROM req))` repeats the join condition as an index condition
# (an init plan): the planner guesses 100 rows for json_to_recordset whatever the batch
# holds, and on a table of a few thousand rows (a fresh install, any test or benchmark)
# that guess made it hash-join against a scan of every scheduled event: 1.77 -> 0.76 ms of
# PostgreSQL CPU per claim + finish pair at batch 1 (bench.pg_statements). Finish does the
# same; tests/integration/test_executor.py checks both plans.
#
# The status tests are join clauses (`e.status = CASE WHEN r.attempt ... END`) on purpose.
# Written with constants (`r.attempt = 0 AND e.status = 'scheduled' OR ...`), the planner
# derives `e.status IN ('scheduled', 'retrying')` as a restriction of `events`, which the
# partial indexes' predicates match, and ANDs a bitmap of every entry of those indexes (dead
# ones included) into the primary-key lookup whenever their statistics look small: in the
# 1,000/s lateness run that read ~7,000 index entries of scheduled events per claimed
# event and ~3,200 of running ones per outcome. Finish does the same for `running`.
_CLAIM_SQL: Final = """
WITH req AS (
    SELECT * FROM json_to_recordset(%(req)s::json) AS r(id uuid, attempt int, started float8)
),
locked AS (
    SELECT e.id, r.started,
           CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN e.execute_at
                ELSE e.next_attempt_at END AS scheduled_for
    FROM events e JOIN req r ON r.id = e.id
    WHERE e.id = ANY(ARRAY(SELECT id FROM req))
      AND e.status = CASE WHEN r.attempt = 0 THEN 'scheduled' ELSE 'retrying' END
      AND (r.attempt = 0 OR (r.attempt > 0 AND e.attempts = r.attempt - 1))
      AND CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN e.execute_at
               ELSE e.next_attempt_at END
          <= greatest(now(), to_timestamp(r.started)) + make_interval(secs => %(ahead)s)
    ORDER BY e.id
    FOR UPDATE OF e
),
claimed AS (
    UPDATE events e
    SET status = 'running', attempts = e.attempts + 1, updated_at = now()
    FROM locked l
    WHERE e.id = l.id
    RETURNING e.id, e.attempts, e.type, e.payload, e.execute_at, l.scheduled_for, l.started,
              e.attempt_base
),
logged AS (
    INSERT INTO event_attempts
        (event_id, attempt, scheduled_for, started_at, lateness_ms, worker_id)
    SELECT c.id, c.attempts, c.scheduled_for, to_timestamp(c.started),
           (c.started - extract(epoch FROM c.scheduled_for)::float8) * 1000, %(worker)s
    FROM claimed c
)
SELECT c.id::text, true, c.attempts, c.type, c.payload,
       extract(epoch FROM c.execute_at)::float8, extract(epoch FROM c.scheduled_for)::float8,
       'running', c.attempt_base, NULL::float8, 0::float8
FROM claimed c
UNION ALL
SELECT r.id::text, a.id IS NOT NULL, e.attempts, e.type,
       CASE WHEN a.id IS NOT NULL THEN e.payload END,
       extract(epoch FROM e.execute_at)::float8, extract(epoch FROM a.scheduled_for)::float8,
       e.status, e.attempt_base,
       CASE WHEN a.id IS NULL
             AND e.status = CASE WHEN r.attempt = 0 THEN 'scheduled' ELSE 'retrying' END
             AND (r.attempt = 0 OR e.attempts = r.attempt - 1)
             AND CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN e.execute_at
                      ELSE e.next_attempt_at END
                 > greatest(now(), to_timestamp(r.started)) + make_interval(secs => %(ahead)s)
            THEN extract(epoch FROM CASE WHEN e.status = 'scheduled' AND e.attempts = 0
                                         THEN e.execute_at
                                         ELSE e.next_attempt_at END)::float8
       END,
       greatest(0, extract(epoch FROM now() - e.updated_at))::float8
FROM req r
LEFT JOIN events e ON e.id = r.id AND e.id = ANY(ARRAY(SELECT id FROM req))
LEFT JOIN event_attempts a
    ON a.event_id = r.id AND a.event_id = ANY(ARRAY(SELECT id FROM req))
   AND a.attempt = e.attempts AND e.status = 'running'
   AND a.worker_id = %(worker)s AND a.started_at = to_timestamp(r.started)
WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.id = r.id)
"""


def claim_batch(
    conn: psycopg.Connection[Any],
    requests: Sequence[ClaimRequest],
    *,
    worker_id: str,
    ahead: float = 0.0,
) -> list[ClaimResult]:
    """Claim events for running (one statement); results in request order.

    An event not due yet by both PostgreSQL's clock and the request's ``started``, beyond
    ``ahead`` seconds, is refused (:class:`NotDue`). Requests must name distinct events
    (:class:`GroupCommit` callers dedupe).
    """
    req = _dumps([{"id": r.event_id, "attempt": r.attempt, "started": r.started} for r in requests])
    sent = time.monotonic()
    cur = conn.execute(_CLAIM_SQL, {"req": req, "worker": worker_id, "ahead": ahead})
    by_id: dict[str, ClaimResult] = {}
    for (
        event_id,
        won,
        attempts,
        type_,
        payload,
        execute_at,
        scheduled_for,
        status,
        base,
        due_at,
        lease_age,
    ) in cur.fetchall():
        if won:
            by_id[event_id] = Claimed(
                event_id,
                attempts,
                type_,
                payload,
                execute_at,
                scheduled_for,
                base,
                sent - lease_age,
            )
        elif due_at is not None:
            by_id[event_id] = NotDue(event_id, type_, due_at)
        else:
            by_id[event_id] = NotClaimed(event_id, type_, status, attempts)
    return [by_id[r.event_id] for r in requests]


# -- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended; ``status`` is the event's next status."""

    event_id: str
    attempt: int
    status: str  # succeeded | retrying | dead
    error: str | None
    finished: float  # epoch seconds
    next_attempt_at: float | None = None  # retrying only
    dead_reason: str | None = None  # dead only
    label: str = ""  # the event type as a metrics label (not stored)


@dataclass(frozen=True, slots=True)
class DeadEvent:
    """A dead event with what its DLQ message needs."""

    event_id: str
    idempotency_key: str
    type: str
    payload: dict[str, Any]
    execute_at: datetime
    created_at: datetime
    attempts: int
    error: str
    reason: str
    finished_at: datetime
    kafka_topic: str | None
    kafka_partition: int | None
    kafka_offset: int | None


# Columns of a dead event, as DeadEvent wants them (prefix e.).
_DEAD_COLUMNS: Final = (
    "e.id::text, e.idempotency_key, e.type, e.payload, e.execute_at, e.created_at, e.attempts,"
    " coalesce(e.last_error, ''), coalesce(e.dead_reason, 'retries_exhausted'), e.finished_at,"
    " e.kafka_topic, e.kafka_partition, e.kafka_offset"
)

# The last branch makes a re-sent outcome (after a lost answer) idempotent: the event is
# already in the requested state with this attempt count.
_FINISH_SQL: Final = """
WITH req AS (
    SELECT * FROM json_to_recordset(%(req)s::json)
        AS r(id uuid, attempt int, status text, error text, finished float8, next_at float8,
             reason text)
),
locked AS (
    SELECT e.id, r.status, r.error, r.finished, r.next_at, r.reason
    FROM events e JOIN req r ON r.id = e.id
    WHERE e.id = ANY(ARRAY(SELECT id FROM req))
      AND e.status = CASE WHEN r.attempt > 0 THEN 'running' END AND e.attempts = r.attempt
    ORDER BY e.id
    FOR UPDATE OF e
),
done AS (
    UPDATE events e
    SET status = l.status,
        last_error = coalesce(l.error, e.last_error),
        next_attempt_at = CASE WHEN l.status = 'retrying' THEN to_timestamp(l.next_at)
                               ELSE e.next_attempt_at END,
        finished_at = CASE WHEN l.status <> 'retrying' THEN to_timestamp(l.finished) END,
        dead_reason = l.reason,
        updated_at = now()
    FROM locked l
    WHERE e.id = l.id
    RETURNING e.id, e.attempts, l.status, l.error, l.finished
),
logged AS (
    UPDATE event_attempts a
    SET finished_at = to_timestamp(d.finished),
        outcome = CASE d.status WHEN 'succeeded' THEN 'succeeded'
                                WHEN 'retrying' THEN 'retried' ELSE 'dead' END,
        error = d.error
    FROM done d
    WHERE a.event_id = d.id AND a.attempt = d.attempts AND a.outcome IS NULL
)
SELECT d.id::text FROM done d
UNION ALL
SELECT r.id::text
FROM req r JOIN events e
    ON e.id = r.id AND e.id = ANY(ARRAY(SELECT id FROM req))
   AND e.status = r.status AND e.attempts = r.attempt
WHERE NOT EXISTS (SELECT 1 FROM done d WHERE d.id = r.id)
"""


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


def finish_batch(conn: psycopg.Connection[Any], outcomes: Sequence[Outcome]) -> list[bool]:
    """Record outcomes (one statement): event status + the attempt row. Per request, in
    order: True if recorded, False if the event was no longer this attempt's."""
    req = _dumps(
        [
            {
                "id": o.event_id,
                "attempt": o.attempt,
                "status": o.status,
                "error": o.error,
                "finished": o.finished,
                "next_at": o.next_attempt_at,
                "reason": o.dead_reason,
            }
            for o in outcomes
        ]
    )
    cur = conn.execute(_FINISH_SQL, {"req": req})
    recorded = {event_id for (event_id,) in cur.fetchall()}
    return [o.event_id in recorded for o in outcomes]


# -- heartbeats ------------------------------------------------------------------------------

_HEARTBEAT_SQL: Final = """
UPDATE events e SET updated_at = now()
FROM (
    SELECT e2.id FROM events e2
    JOIN unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS r(id, attempt) ON r.id = e2.id
    WHERE e2.status = 'running' AND e2.attempts = r.attempt
    ORDER BY e2.id
    FOR UPDATE OF e2
) l
WHERE e.id = l.id
RETURNING e.id::text
"""


async def heartbeat(db: Database, running: Sequence[tuple[str, int]]) -> set[str]:
    """Renew the lease of these attempts: touch ``updated_at`` of events still running them
    (the reconciler takes an attempt over only once ``updated_at`` is older than
    ``stale_after``). Returns the ids of the events renewed; an attempt not among them is
    no longer running (finished, or taken over)."""
    if not running:
        return set()
    rows = await db.fetchall(
        _HEARTBEAT_SQL,
        {"ids": [event_id for event_id, _ in running], "attempts": [a for _, a in running]},
    )
    return {event_id for (event_id,) in rows}


# -- reconciler --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """An event the reconciler may have to enqueue again."""

    event_id: str
    attempts: int
    at: datetime  # the ordering column: execute_at, next_attempt_at or updated_at


@dataclass(frozen=True, slots=True)
class Cursor:
    """Keyset position for paging through candidates."""

    at: datetime = _EPOCH
    event_id: str = str(_NIL)


# Each query is served by its partial index (see sql/000001_init.up.sql).
_OVERDUE_SQL: Final = {
    "overdue": """
        SELECT id::text, attempts, execute_at FROM events
        WHERE status = 'scheduled' AND execute_at < now() - make_interval(secs => %(age)s)
          AND (execute_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY execute_at, id LIMIT %(limit)s""",
    "retry_overdue": """
        SELECT id::text, attempts, next_attempt_at FROM events
        WHERE status = 'retrying' AND next_attempt_at < now() - make_interval(secs => %(age)s)
          AND (next_attempt_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY next_attempt_at, id LIMIT %(limit)s""",
    # Restoring after Redis lost its data: every pending event, whatever its due time.
    "restore_scheduled": """
        SELECT id::text, attempts, execute_at FROM events
        WHERE status = 'scheduled'
          AND (execute_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY execute_at, id LIMIT %(limit)s""",
    "restore_retrying": """
        SELECT id::text, attempts, next_attempt_at FROM events
        WHERE status = 'retrying'
          AND (next_attempt_at, id) > (%(at)s, %(id)s::uuid)
        ORDER BY next_attempt_at, id LIMIT %(limit)s""",
    "stale_running": """
        SELECT id::text, attempts, updated_at FROM events
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
    return [Candidate(event_id, attempts, at) for event_id, attempts, at in rows]


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
    SET status = CASE WHEN e.attempts - e.attempt_base >= %(max)s THEN 'dead' ELSE 'retrying' END,
        next_attempt_at = CASE WHEN e.attempts - e.attempt_base >= %(max)s THEN e.next_attempt_at
                               ELSE now() END,
        finished_at = CASE WHEN e.attempts - e.attempt_base >= %(max)s THEN now() END,
        dead_reason = CASE WHEN e.attempts - e.attempt_base >= %(max)s
                           THEN 'retries_exhausted' END,
        last_error = %(error)s,
        updated_at = now()
    FROM locked l
    WHERE e.id = l.id
    RETURNING e.id, e.status, e.attempts, extract(epoch FROM e.next_attempt_at)::float8 AS next_at
),
logged AS (
    UPDATE event_attempts a
    SET outcome = CASE WHEN d.status = 'dead' THEN 'dead' ELSE 'retried' END,
        error = %(error)s,
        finished_at = now()
    FROM done d
    WHERE a.event_id = d.id AND a.attempt = d.attempts AND a.outcome IS NULL
)
SELECT id::text, status, attempts, next_at FROM done
"""


@dataclass(frozen=True, slots=True)
class TakenOver:
    """A stale running attempt given up: the event now waits for attempt ``attempts + 1``
    at ``next_attempt_at`` (``retrying``), or is ``dead``."""

    event_id: str
    status: str
    attempts: int
    next_attempt_at: float | None


async def take_over(
    db: Database,
    stale: Sequence[Candidate],
    *,
    stale_after: float,
    max_attempts: int,
    error: str,
) -> list[TakenOver]:
    """CAS ``running -> retrying`` (or ``dead`` when no attempt is left) for attempts that
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
_COUNTS_SQL: Final = """
SELECT (SELECT count(*) FROM (SELECT FROM events WHERE status = 'scheduled' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'running' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'retrying' LIMIT %(limit)s) s),
       (SELECT count(*) FROM (SELECT FROM events WHERE status = 'dead' LIMIT %(limit)s) s),
       (SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'events'::regclass)
"""
_INDEXED_STATUSES: Final = ("scheduled", "running", "retrying", "dead")


async def status_counts(db: Database, *, limit: int = GAUGE_EXACT_LIMIT) -> dict[str, int]:
    """Events by status for the gauges: exact up to ``limit`` per status, above it the
    planner's row estimate (as fresh as the last ANALYZE; at least ``limit``). ``succeeded``
    is exact on a table of fewer than ``limit`` live rows, else the live-tuple count minus
    the other statuses. ``eventsched status`` counts exactly instead (eventstore)."""
    row = await db.fetchone(_COUNTS_SQL, {"limit": limit})
    assert row is not None  # a SELECT without FROM returns one row
    counts = dict(zip(_INDEXED_STATUSES, (int(v or 0) for v in row[:4]), strict=True))
    for status, count in counts.items():
        if count >= limit:
            counts[status] = max(limit, await _estimated_rows(db, status))
    live = int(row[4] or 0)
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
    return int(plan["Plan Rows"])


async def check_schema(db: Database) -> None:
    """Raise :class:`DependencyError` unless the executor's columns exist (migrations ran)."""
    try:
        await db.fetchone(
            "SELECT id, dead_reason, dlq_published_at, attempt_base FROM events LIMIT 0"
        )
        await db.fetchone("SELECT event_id, attempt, worker_id FROM event_attempts LIMIT 0")
    except psycopg.errors.UndefinedTable as err:
        raise DependencyError(
            "postgres", f"schema missing, run `eventsched migrate up`: {err}"
        ) from err
    except psycopg.errors.UndefinedColumn as err:
        raise DependencyError(
            "postgres", f"schema outdated, run `eventsched migrate up`: {err}"
        ) from err


# -- group commit ---------------------------------------------------------------------------------

BatchFn = Callable[[psycopg.Connection[Any], Sequence[Req]], Sequence[Res]]
AfterBatch = Callable[[Sequence[Req], Sequence[Res]], None]


@dataclass(slots=True)
class _Item(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res] | None  # None: submitted without waiting (write-behind)
    since: float  # time.monotonic() of submission


class GroupCommit(Generic[Req, Res]):
    """Runs requests of many concurrent jobs as one statement per round trip.

    Jobs (asyncio side) queue requests; a dedicated thread with a blocking connection of
    its own takes every pending request, runs ``batch_fn`` once, and hands the results back
    to the event loop in ONE callback, which resolves the requests' futures and calls
    ``after_batch`` — only after the statement committed. While a batch is in flight the
    next one collects; there is no timer, so batches grow with load and a lone request goes
    out at once.

    Why a thread and not psycopg's async connection: under trio-asyncio every asyncio
    callback is a trio scheduler pass (~0.1 ms on the 2-core dev box), and an async
    statement takes several (send, wait readable, read, wake the caller); at 1,000 jobs/s
    they queued behind the jobs' own callbacks and a 2 ms statement took 14 ms, holding
    worker slots and making every job start late. The thread's blocking round trip costs
    the loop one callback per batch (blocking clients live in threads: STYLE.md rule 5).

    Two ways in:

    * :meth:`submit` returns a future (the claim: the handler must not run before it);
    * :meth:`submit_nowait` does not wait (outcomes, write-behind): the request stays queued
      across connection failures and is re-sent until it commits or is older than
      ``patience`` seconds (then it is logged and dropped; the reconciler recovers the
      event). A waiting job costs one more wake-up through the loop.

    If a statement fails for a reason other than the connection (one bad request), the batch
    is retried one request at a time so only that request fails; deadlocks and
    serialization failures (the statement rolled back) are retried. When the connection
    breaks or cannot be opened, waiting requests fail with :class:`DependencyError`
    (whether their batch committed is unknown; callers re-submit, and the SQL above
    recognises a re-sent claim or outcome as done), and the thread reconnects with backoff.
    """

    def __init__(
        self,
        name: str,
        batch_fn: BatchFn[Req, Res],
        *,
        key: Callable[[Req], str],
        max_batch: int,
        after_batch: AfterBatch[Req, Res] | None = None,
        patience: float = 60.0,
        min_interval: float = 0.0,
    ) -> None:
        self.name = name
        # Shortest time between two statements: 0 for claims (a job waits for its claim);
        # a few ms for write-behind outcomes, where nobody waits and fewer, bigger batches
        # cost less CPU.
        self._min_interval = min_interval
        self._batch_fn = batch_fn
        self._key = key
        self._max_batch = max_batch
        self._after_batch = after_batch
        self._patience = patience
        self._cond = threading.Condition()
        self._pending: list[_Item[Req, Res]] = []  # guarded by _cond
        self._in_flight = 0  # taken by the thread, not yet delivered on the loop
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.problem: str | None = None  # the connection's last failure, None when fine
        self.batches = 0  # statements sent (for tests and benchmarks)
        self.requests = 0

    # -- asyncio side ----------------------------------------------------------------------------

    def submit(self, request: Req) -> asyncio.Future[Res]:
        """Queue ``request``; the future resolves once its statement committed."""
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._add(_Item(request, future, time.monotonic()))
        return future

    def submit_nowait(self, request: Req) -> None:
        """Queue ``request`` without waiting for it (see the class docstring)."""
        self._add(_Item(request, None, time.monotonic()))

    def _add(self, item: _Item[Req, Res]) -> None:
        with self._cond:
            self._pending.append(item)
            if len(self._pending) == 1:
                self._cond.notify()

    @property
    def backlog(self) -> int:
        """Requests pending or in flight."""
        return len(self._pending) + self._in_flight

    @property
    def idle(self) -> bool:
        return self.backlog == 0

    def close(self) -> None:
        """Serve what is pending, then let the thread end."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def _deliver(
        self, batch: list[_Item[Req, Res]], results: Sequence[Res | BaseException]
    ) -> None:
        # On the loop: one callback per batch, whatever its size.
        done_requests: list[Req] = []
        done_results: list[Res] = []
        try:
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(result)
                    continue
                if item.future is not None and not item.future.done():
                    item.future.set_result(result)
                done_requests.append(item.request)
                done_results.append(result)
            if done_requests and self._after_batch is not None:
                try:
                    self._after_batch(done_requests, done_results)
                except Exception:
                    log.exception("after_batch_failed", store=self.name)
        finally:
            with self._cond:
                self._in_flight -= len(batch)

    # -- trio side -------------------------------------------------------------------------------

    async def run(self, dsn: str, connect_timeout: float = 5.0) -> None:
        """Serve on a dedicated thread until :meth:`close`d and drained (call inside
        ``trio_asyncio.open_loop``)."""
        self._loop = asyncio.get_event_loop()
        limiter = trio.CapacityLimiter(1)  # its own: never a slot of the shared pool
        await trio.to_thread.run_sync(
            self._thread_main, dsn, connect_timeout, limiter=limiter, abandon_on_cancel=True
        )

    # -- the thread --------------------------------------------------------------------------------

    def _thread_main(self, dsn: str, connect_timeout: float) -> None:
        conn: psycopg.Connection[Any] | None = None
        backoff = 0.1
        next_batch = 0.0
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._closing:
                        self._cond.wait()
                    if not self._pending:
                        return  # closing and drained
                    wait = next_batch - time.monotonic()
                    if wait > 0 and not self._closing:
                        self._cond.wait(wait)  # close() cuts it short
                next_batch = time.monotonic() + self._min_interval
                if conn is None or conn.closed:
                    try:
                        conn = psycopg.connect(
                            dsn,
                            autocommit=True,
                            connect_timeout=max(1, int(connect_timeout)),
                            application_name=f"eventsched-executor-{self.name}",
                        )
                        self.problem = None
                        backoff = 0.1
                    except psycopg.Error as err:
                        self._connection_failed(err)
                        with self._cond:
                            self._cond.wait(backoff)  # close() cuts it short
                            if self._closing:
                                return
                        backoff = min(backoff * 2, 5.0)
                        continue
                batch = self._take()
                if batch:
                    self._run_batch(conn, batch)
                # Not kept while waiting: its futures hold their results (a claim's payload).
                del batch
        finally:
            if conn is not None:
                conn.close()

    def _take(self) -> list[_Item[Req, Res]]:
        # A request whose job gave up (cancelled future) is dropped; one request per event
        # per statement (a second one for the same event waits for the next batch).
        batch: list[_Item[Req, Res]] = []
        later: list[_Item[Req, Res]] = []
        seen: set[str] = set()
        with self._cond:
            for item in self._pending:
                if item.future is not None and item.future.done():
                    continue
                key = self._key(item.request)
                if key in seen or len(batch) >= self._max_batch:
                    later.append(item)
                else:
                    seen.add(key)
                    batch.append(item)
            self._pending = later
            self._in_flight += len(batch)
        return batch

    def _run_batch(self, conn: psycopg.Connection[Any], batch: list[_Item[Req, Res]]) -> None:
        results: list[Res | BaseException]
        try:
            results = list(self._execute(conn, [item.request for item in batch]))
        except psycopg.Error as err:
            if conn.broken or conn.closed or isinstance(err, psycopg.InterfaceError):
                conn.close()
                self._requeue_and_fail(batch, err)
                return
            if len(batch) == 1:
                if batch[0].future is None:
                    log.error("write_failed", store=self.name, request=repr(batch[0].request),
                              error=redact(str(err)))  # fmt: skip
                results = [err]
            else:
                log.warning("group_commit_batch_failed", batch=self.name,
                            size=len(batch), error=redact(str(err)))  # fmt: skip
                for item in batch:  # each is delivered (and counted out) on its own
                    self._run_batch(conn, [item])
                return
        self._to_loop(batch, results)

    def _execute(self, conn: psycopg.Connection[Any], requests: list[Req]) -> Sequence[Res]:
        for attempt in range(3):
            try:
                self.batches += 1
                self.requests += len(requests)
                return self._batch_fn(conn, requests)
            except psycopg.errors.TransactionRollback:
                # Deadlock or serialization failure: the statement rolled back whole.
                if attempt == 2:
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _connection_failed(self, err: BaseException) -> None:
        self.problem = redact(str(err)) or type(err).__name__
        log.warning("store_connection_failed", store=self.name, error=self.problem)
        # Waiting requests fail now (their jobs retry or give up); write-behind ones wait.
        now = time.monotonic()
        failed: list[_Item[Req, Res]] = []
        with self._cond:
            kept: list[_Item[Req, Res]] = []
            for item in self._pending:
                if item.future is not None:
                    failed.append(item)
                elif now - item.since < self._patience:
                    kept.append(item)
                else:
                    log.error("write_dropped", store=self.name, request=repr(item.request),
                              error=self.problem, note="the reconciler recovers the event")  # fmt: skip
            self._pending = kept
            self._in_flight += len(failed)
        if failed:
            error = DependencyError("postgres", self.problem)
            self._to_loop(failed, [error] * len(failed))

    def _requeue_and_fail(self, batch: list[_Item[Req, Res]], err: BaseException) -> None:
        waiting = [item for item in batch if item.future is not None]
        with self._cond:
            self._pending[:0] = [item for item in batch if item.future is None]
            self._in_flight -= len(batch) - len(waiting)
        self._connection_failed(err)
        if waiting:
            error = DependencyError("postgres", redact(str(err)) or type(err).__name__)
            self._to_loop(waiting, [error] * len(waiting))

    def _to_loop(
        self, batch: list[_Item[Req, Res]], results: Sequence[Res | BaseException]
    ) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody waits any more
            loop.call_soon_threadsafe(self._deliver, batch, results)
