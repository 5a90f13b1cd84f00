"""The executor's SQL: claims, outcomes, lease renewal (heartbeats) and the schema check.

PostgreSQL is the source of truth for an event's state. Every transition here is a
compare-and-set ``UPDATE ... WHERE status ... AND attempts = ...``, so a job delivered twice,
a stale worker or a reconciler race changes nothing. All statements are parametrized.

Two kinds of callers:

* :func:`claim_batch` and :func:`finish_batch` run on a group-commit thread
  (:class:`~eventsched.core.store.groupcommit.GroupCommit`, a blocking connection of its
  own): the requests of concurrently running jobs (asyncio side, one per running SAQ job) go
  out as one statement per round trip. A job's future resolves only once its statement has
  committed, so the guarantees are those of one statement per job: the claim is durable
  before the handler runs, the outcome before the SAQ job is acknowledged. Both recognise a
  re-sent request (after a lost answer) as done, so a request may be sent again.
* :func:`heartbeat` and :func:`check_schema` run on the trio side (:class:`Database`).

The reconciler's queries, the dead events' DLQ bookkeeping and the status gauges are in
:mod:`eventsched.core.store.recovery`.

Lock order: every multi-row writer locks its ``events`` rows ``ORDER BY id`` first (and
touches ``event_attempts`` rows only of events it holds), so concurrent batches from
several executors queue behind each other instead of deadlocking.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

import psycopg

from eventsched.core.domain.retention import DAY
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.store.pool import Database

#: What :func:`finish_outcomes` answers for an outcome that was not this attempt's any more.
DISCARDED: Final = ""
#: Why an event went dead; the ``dlq-reason`` header and a metrics label.
DEAD_REASONS: Final = ("retries_exhausted", "permanent_error", "no_handler")

# Batches travel as one JSON parameter (json_to_recordset): psycopg adapts a Python list
# to a PostgreSQL array element by element in Python, which cost more than the rest of a
# job's bookkeeping; one json.dumps in C does not.
_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# -- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """A job asks to run an attempt of an event."""

    event_id: str
    # 0: the first delivery (the event must be `scheduled`); n >= 2: retry n (the event must
    # be `retrying` after n - 1 attempts).
    attempt: int
    # Epoch seconds, the worker's clock when the job asked for the claim (at most the
    # claim-ahead window before the due time; event_attempts.claimed_at).
    claimed: float
    # The limit of the event type that held the job back after its due time ("concurrency"
    # or "rate"), or None: it was free to run (event_attempts.held_by).
    held_by: str | None = None
    # The UTC day of the event's partition (its retain_from) as whoever made the job knew
    # it (the job's ``day`` kwarg): a hint that spares the key lookup (see _PARTITIONS_SQL);
    # None: look it up. A stale one (retention moved the event since) costs a second try.
    day: date | None = None


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
    # The UTC day of the event's partition when it was claimed: its outcome and its retry's
    # job carry it, so neither looks the event's key up again.
    day: date | None = None


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

# A claim is refused while the attempt's due time is later than `greatest(now(), claimed) +
# ahead`: early by PostgreSQL's clock AND by the worker's, beyond the claim-ahead window.
# Either clock saying "due" is enough, so clock skew between hosts cannot make a due job
# bounce between queue and claim. The last column carries the due time of a refused claim
# (the event is in the requested state, just early); a claim lost to a concurrent one reads
# the pre-lock snapshot there, hence the repeated due test.
#
# The third branch recognises our own earlier claim of the same request (same worker, same
# claim time): it committed but the answer was lost with the connection. Re-sending a claim
# after a connection error is therefore safe. The attempt row's `started_at` and
# `lateness_ms` hold the claim's values until the outcome statement writes the handler's
# start (:func:`finish_outcomes`): the claim adds no statement of its own for them.
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
    SELECT * FROM json_to_recordset(%(req)s::json)
        AS r(id uuid, attempt int, claimed float8, held_by text)
),
locked AS (
    SELECT e.id, r.claimed, r.held_by,
           CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN e.execute_at
                ELSE e.next_attempt_at END AS scheduled_for
    FROM events e JOIN req r ON r.id = e.id
    WHERE e.id = ANY(ARRAY(SELECT id FROM req)) AND __IN_DAYS_E__
      AND e.status = CASE WHEN r.attempt = 0 THEN 'scheduled' ELSE 'retrying' END
      AND (r.attempt = 0 OR (r.attempt > 0 AND e.attempts = r.attempt - 1))
      AND CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN e.execute_at
               ELSE e.next_attempt_at END
          <= greatest(now(), to_timestamp(r.claimed)) + make_interval(secs => %(ahead)s)
    ORDER BY e.id
    FOR UPDATE OF e
),
claimed AS (
    UPDATE events e
    SET status = 'running', attempts = e.attempts + 1, updated_at = now()
    FROM locked l
    WHERE e.id = l.id AND __IN_DAYS_E__
    RETURNING e.id, e.attempts, e.type, e.payload, e.execute_at, l.scheduled_for, l.claimed,
              e.attempt_base, l.held_by, e.retain_from
),
logged AS (
    INSERT INTO event_attempts
        (event_id, attempt, scheduled_for, claimed_at, started_at, lateness_ms, worker_id,
         held_by, event_retain_from)
    SELECT c.id, c.attempts, c.scheduled_for, to_timestamp(c.claimed), to_timestamp(c.claimed),
           (c.claimed - extract(epoch FROM c.scheduled_for)::float8) * 1000, %(worker)s,
           c.held_by, c.retain_from
    FROM claimed c
)
SELECT c.id::text, true, c.attempts, c.type, c.payload,
       extract(epoch FROM c.execute_at)::float8, extract(epoch FROM c.scheduled_for)::float8,
       'running', c.attempt_base, NULL::float8, 0::float8,
       (c.retain_from AT TIME ZONE 'UTC')::date
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
                 > greatest(now(), to_timestamp(r.claimed)) + make_interval(secs => %(ahead)s)
            THEN extract(epoch FROM CASE WHEN e.status = 'scheduled' AND e.attempts = 0
                                         THEN e.execute_at
                                         ELSE e.next_attempt_at END)::float8
       END,
       greatest(0, extract(epoch FROM now() - e.updated_at))::float8,
       (e.retain_from AT TIME ZONE 'UTC')::date
FROM req r
LEFT JOIN events e
    ON e.id = r.id AND e.id = ANY(ARRAY(SELECT id FROM req)) AND __IN_DAYS_E__
LEFT JOIN event_attempts a
    ON a.event_id = r.id AND a.event_id = ANY(ARRAY(SELECT id FROM req))
   AND __IN_DAYS_A__
   AND a.attempt = e.attempts AND e.status = 'running'
   AND a.worker_id = %(worker)s AND a.claimed_at = to_timestamp(r.claimed)
WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.id = r.id)
"""


def _claim_once(
    conn: psycopg.Connection[Any],
    requests: Sequence[ClaimRequest],
    worker_id: str,
    ahead: float,
    days: tuple[date, ...],
) -> dict[str, ClaimResult]:
    req = _dumps(
        [
            {"id": r.event_id, "attempt": r.attempt, "claimed": r.claimed, "held_by": r.held_by}
            for r in requests
        ]
    )
    sent = time.monotonic()
    cur = conn.execute(
        _in_days(_CLAIM_SQL, days), {"req": req, "worker": worker_id, "ahead": ahead}
    )
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
        day,
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
                day,
            )
        elif due_at is not None:
            by_id[event_id] = NotDue(event_id, type_, due_at)
        else:
            by_id[event_id] = NotClaimed(event_id, type_, status, attempts)
    return by_id


def _nowhere(result: ClaimResult) -> bool:
    return isinstance(result, NotClaimed) and result.type is None


def claim_batch(
    conn: psycopg.Connection[Any],
    requests: Sequence[ClaimRequest],
    *,
    worker_id: str,
    ahead: float = 0.0,
) -> list[ClaimResult]:
    """Claim events for running (one statement); results in request order.

    An event not due yet by both PostgreSQL's clock and the request's ``claimed``, beyond
    ``ahead`` seconds, is refused (:class:`NotDue`). Requests must name distinct events
    (the group commit's ``key`` dedupes them).
    """
    days = _days(conn, requests)
    by_id = _claim_once(conn, requests, worker_id, ahead, days)
    # An event that retention moved to a newer partition after its day was learned (a
    # stale hint, or a hop right after _partitions read its key: docs/retention.md,
    # "Retiring a day") is not in the days named: the events found nowhere are claimed
    # again if their keys now name a day that was not named.
    gone = [r for r in requests if _nowhere(by_id[r.event_id])]
    if gone and not set(again := _partitions(conn, [r.event_id for r in gone])) <= set(days):
        by_id.update(_claim_once(conn, gone, worker_id, ahead, again))
    return [by_id[r.event_id] for r in requests]


# -- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended; ``status`` is the event's next status."""

    event_id: str
    attempt: int
    # succeeded | retrying | dead; a failure (retrying or dead) of an attempt whose event got a
    # cancel request while it ran is recorded as cancelled instead (see finish_outcomes)
    status: str
    error: str | None
    finished: float  # epoch seconds
    next_attempt_at: float | None = None  # retrying only
    dead_reason: str | None = None  # dead only
    label: str = ""  # the event type as a metrics label (not stored)
    # Epoch seconds, when the handler was invoked (event_attempts.started_at and lateness_ms);
    # None: it never was (the row keeps the claim's values).
    started: float | None = None
    # The UTC day of the event's partition as its claim found it (Claimed.day); None: look
    # it up. Stale if retention moved the event while it ran: then it is looked up again.
    day: date | None = None
    # The payload's JSON size in bytes, if known (not stored): a retry's job carries it for
    # the executors' payload budget (see jobcontract.make_job).
    size: int | None = None


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


# The outcome also carries when the handler was invoked: the attempt row's `started_at` and
# `lateness_ms` (written by the claim with the claim's values) become the handler's, in the
# statement that is written anyway.
#
# A cancel command that reached the event while this attempt ran (cancel_requested_at) turns a
# failure (retrying or dead) into `cancelled`: no retry follows and nothing goes to the DLQ;
# a success stays a success. The last branch makes a re-sent outcome (after a lost answer)
# idempotent: the event is already in the requested state (or cancelled from it) with this
# attempt count.
_FINISH_SQL: Final = """
WITH req AS (
    SELECT * FROM json_to_recordset(%(req)s::json)
        AS r(id uuid, attempt int, status text, error text, finished float8, next_at float8,
             reason text, started float8)
),
locked AS (
    SELECT e.id, r.status, r.error, r.finished, r.next_at, r.reason, r.started
    FROM events e JOIN req r ON r.id = e.id
    WHERE e.id = ANY(ARRAY(SELECT id FROM req)) AND __IN_DAYS_E__
      AND e.status = CASE WHEN r.attempt > 0 THEN 'running' END AND e.attempts = r.attempt
    ORDER BY e.id
    FOR UPDATE OF e
),
done AS (
    UPDATE events e
    SET status = CASE WHEN l.status <> 'succeeded' AND e.cancel_requested_at IS NOT NULL
                      THEN 'cancelled' ELSE l.status END,
        last_error = coalesce(l.error, e.last_error),
        next_attempt_at = CASE WHEN l.status = 'retrying' AND e.cancel_requested_at IS NULL
                               THEN to_timestamp(l.next_at) ELSE e.next_attempt_at END,
        finished_at = CASE WHEN l.status <> 'retrying' OR e.cancel_requested_at IS NOT NULL
                           THEN to_timestamp(l.finished) END,
        dead_reason = CASE WHEN e.cancel_requested_at IS NULL THEN l.reason END,
        updated_at = now()
    FROM locked l
    WHERE e.id = l.id AND __IN_DAYS_E__
    RETURNING e.id, e.attempts, e.status, l.error, l.finished, l.started
),
logged AS (
    UPDATE event_attempts a
    SET finished_at = to_timestamp(d.finished),
        outcome = CASE d.status WHEN 'succeeded' THEN 'succeeded' WHEN 'retrying' THEN 'retried'
                                WHEN 'cancelled' THEN 'cancelled' ELSE 'dead' END,
        error = d.error,
        started_at = coalesce(to_timestamp(d.started), a.started_at),
        lateness_ms = coalesce(
            (d.started - extract(epoch FROM a.scheduled_for)::float8) * 1000, a.lateness_ms
        )
    FROM done d
    WHERE a.event_id = d.id AND a.attempt = d.attempts AND a.outcome IS NULL
      AND __IN_DAYS_A__
)
SELECT d.id::text, d.status FROM done d
UNION ALL
SELECT r.id::text, e.status
FROM req r JOIN events e
    ON e.id = r.id AND e.id = ANY(ARRAY(SELECT id FROM req)) AND __IN_DAYS_E__
   AND e.attempts = r.attempt
   AND (e.status = r.status
        OR (e.status = 'cancelled' AND r.status IN ('retrying', 'dead')
            AND e.cancel_requested_at IS NOT NULL))
WHERE NOT EXISTS (SELECT 1 FROM done d WHERE d.id = r.id)
"""


def finish_batch(conn: psycopg.Connection[Any], outcomes: Sequence[Outcome]) -> list[bool]:
    """Record outcomes (one statement): event status + the attempt row. Per request, in
    order: True if recorded, False if the event was no longer this attempt's."""
    return [bool(status) for status in finish_outcomes(conn, outcomes)]


def finish_outcomes(conn: psycopg.Connection[Any], outcomes: Sequence[Outcome]) -> list[str]:
    """:func:`finish_batch`, telling per request the status recorded: the outcome's, or
    ``cancelled`` for a failure after a cancel request; ``""`` (:data:`DISCARDED`) if the
    event was no longer this attempt's."""
    days = _days(conn, outcomes)
    recorded = _finish_once(conn, outcomes, days)
    # As for claims: an event moved to a newer partition meanwhile is looked for again.
    missed = [o for o in outcomes if o.event_id not in recorded]
    if missed and not set(again := _partitions(conn, [o.event_id for o in missed])) <= set(days):
        recorded.update(_finish_once(conn, missed, again))
    return [recorded.get(o.event_id, DISCARDED) for o in outcomes]


def _finish_once(
    conn: psycopg.Connection[Any], outcomes: Sequence[Outcome], days: tuple[date, ...]
) -> dict[str, str]:
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
                "started": o.started,
            }
            for o in outcomes
        ]
    )
    cur = conn.execute(_in_days(_FINISH_SQL, days), {"req": req})
    return dict(cur.fetchall())


# -- partitions -----------------------------------------------------------------------------

# `events` and `event_attempts` are partitioned by `retain_from`, one partition per UTC day
# (docs/retention.md). A claim or an outcome names the days of its events' partitions as
# constants in its text (`__IN_DAYS_E__`: `(e.retain_from >= '<day>' AND e.retain_from <
# '<next day>') OR ...`). With constants the planner prunes at plan time, so it plans, locks
# and opens only those partitions, and the text is the same for every batch of the same
# days (nearly always today's alone), so psycopg prepares it and PostgreSQL keeps a generic
# plan for it, as for the unpartitioned table. Each alternative measured worse with 49
# partitions (bench.partitioned_hotpath, bench/RESULTS.md): naming no partition planned and
# probed all of them; the days as an array parameter prune only in a custom plan (planning
# every time), and a generic plan of it locks and initialises every partition.
#
# The days come with the requests where they can (`_days`): a job carries its event's day
# as a hint (the `day` kwarg of the job contract, from whoever enqueued it: the consumer's
# insert, the claim of the attempt before, the reconciler's and the commands' reads of the
# event), a claim returns the day it found (`Claimed.day`) and the outcome carries it on.
# Only requests without one are looked up in `event_keys` (not partitioned: one
# primary-key probe per id), one statement and round trip more per batch that has any. A
# day that is wrong or stale (retention hopped the event to today's partition since) finds
# nothing; the events found nowhere are then looked up and sent once more, as after a hop
# between the lookup and the statement, so a hint can cost a round trip, never a claim or
# an outcome.
_PARTITIONS_SQL: Final = "SELECT DISTINCT retain_from FROM event_keys WHERE id = ANY(%s::uuid[])"


def _days(
    conn: psycopg.Connection[Any], requests: Sequence[ClaimRequest | Outcome]
) -> tuple[date, ...]:
    """The days to name for ``requests``: those they carry, and those of the events of
    requests without one (looked up; no statement if every request carries its day)."""
    days = {r.day for r in requests if r.day is not None}
    unknown = [r.event_id for r in requests if r.day is None]
    if unknown:
        days.update(_partitions(conn, unknown))
    return tuple(sorted(days))


def _partitions(conn: psycopg.Connection[Any], event_ids: Sequence[str]) -> tuple[date, ...]:
    rows = conn.execute(_PARTITIONS_SQL, (list(event_ids),)).fetchall()
    return tuple(sorted({retain_from.astimezone(UTC).date() for (retain_from,) in rows}))


@functools.lru_cache(maxsize=256)
def _in_days(statement: str, days: tuple[date, ...]) -> str:
    """``statement`` with its ``__IN_DAYS_E__``/``__IN_DAYS_A__`` replaced by the ranges of
    these days' partitions (``false`` for none: no event exists)."""

    def ranges(column: str) -> str:
        if not days:
            return "false"
        return (
            "("
            + " OR ".join(
                f"({column} >= '{day.isoformat()} 00:00:00+00'"
                f" AND {column} < '{(day + DAY).isoformat()} 00:00:00+00')"
                for day in days
            )
            + ")"
        )

    return statement.replace("__IN_DAYS_E__", ranges("e.retain_from")).replace(
        "__IN_DAYS_A__", ranges("a.event_retain_from")
    )


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


# -- schema ---------------------------------------------------------------------------------


async def check_schema(db: Database) -> None:
    """Raise :class:`DependencyError` unless the executor's columns exist (migrations ran)."""
    try:
        await db.fetchone(
            "SELECT id, dead_reason, dlq_published_at, attempt_base, cancel_requested_at,"
            " retain_from FROM events LIMIT 0"
        )
        await db.fetchone(
            "SELECT event_id, attempt, worker_id, held_by, claimed_at, event_retain_from"
            " FROM event_attempts LIMIT 0"
        )
        await db.fetchone("SELECT id, retain_from FROM event_keys LIMIT 0")
    except psycopg.errors.UndefinedTable as err:
        raise DependencyError(
            "postgres", f"schema missing, run `eventsched migrate up`: {err}"
        ) from err
    except psycopg.errors.UndefinedColumn as err:
        raise DependencyError(
            "postgres", f"schema outdated, run `eventsched migrate up`: {err}"
        ) from err
