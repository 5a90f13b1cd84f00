"""The SQL of commands on events: cancel, reschedule, retry (migration 000005).

The consumer applies a batch's commands with :func:`apply_commands`: one transaction, one
statement per command, in the order given (log order). Each statement is a compare-and-set
on the event's status in the ``UPDATE``'s ``WHERE`` clause, under the same row lock as the
executor's claim and outcome (``SELECT ... FOR UPDATE`` of the event first), and records the
command in ``event_commands`` with ``ON CONFLICT (command_id) DO NOTHING``: a command seen
before (a redelivery) changes nothing and is reported as a repeat.

Transitions (``result`` in ``event_commands``):

* cancel: ``scheduled | retrying -> cancelled`` (``applied``); ``running``: only
  ``cancel_requested_at`` is set (``cancel_requested``: the attempt finishes, a failure ends
  the event ``cancelled`` instead of retrying, see :mod:`~eventsched.core.store.executions`);
  ``succeeded | dead | cancelled``: ``not_applicable``.
* reschedule: ``scheduled | retrying`` get the new due time (``execute_at`` of an event not
  yet attempted, else ``next_attempt_at``, as the claim reads it); otherwise ``refused``.
* retry: ``dead | cancelled -> scheduled`` due at the given time (now when absent), with a
  fresh attempt budget (``attempt_base = attempts``, as ``dlq replay``); otherwise ``refused``.
* no such event (or one the caller hides, see :class:`CommandRow`): ``unknown_event``.

Every statement returns the event's state after it (also for a repeat), so the caller can
bring Redis in line with PostgreSQL whether or not this call applied the command: making
Redis match is idempotent, which makes the whole step safe to retry. Trio side
(:class:`Database`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection

from eventsched.core.domain.commands import Command
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.store.events import RowsRejected
from eventsched.core.store.pool import Database

#: Values of ``event_commands.result`` (and of the metrics label, with ``repeated``).
RESULTS: Final = ("applied", "cancel_requested", "not_applicable", "refused", "unknown_event")
#: Result label of a command that was applied before (same command_id): nothing changed.
REPEATED: Final = "repeated"

# The parts every command statement shares. `fresh`: the command was not applied before.
# `target`: the event, locked (the lock order of every writer: one events row per statement
# here); by id when the command names one (and then its key must match, if named too), else
# by idempotency key. `hide` makes the event invisible (an event the same batch inserts only
# after the command, in log order). The UPDATE (`changed`) is op-specific; `logged` records
# the command; the final SELECT returns one row whatever happened.
_HEAD: Final = """
WITH fresh AS (
    SELECT NOT EXISTS (SELECT 1 FROM event_commands WHERE command_id = %(cid)s) AS ok
),
target AS (
    SELECT e.id, e.status, e.attempts,
           CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN e.execute_at
                ELSE e.next_attempt_at END AS due,
           e.traceparent, (e.retain_from AT TIME ZONE 'UTC')::date AS day, e.type,
           octet_length(e.payload::text) AS size
    FROM events e
    WHERE e.id = coalesce(%(event_id)s::uuid,
                          (SELECT k.id FROM event_keys k WHERE k.idempotency_key = %(key)s::text))
      AND e.retain_from = (
          SELECT k.retain_from FROM event_keys k
          WHERE k.id = coalesce(%(event_id)s::uuid,
                                (SELECT k.id FROM event_keys k
                                 WHERE k.idempotency_key = %(key)s::text)))
      AND (%(key)s::text IS NULL OR e.idempotency_key = %(key)s::text)
      AND NOT %(hide)s::bool
    FOR UPDATE OF e
),
"""
_TAIL: Final = """
logged AS (
    INSERT INTO event_commands
        (command_id, op, event_id, idempotency_key, execute_at, requested_by, created_at,
         result, status_before, detail, kafka_topic, kafka_partition, kafka_offset)
    SELECT %(cid)s, %(op)s, t.id, %(key)s::text, %(at)s::timestamptz, %(by)s, %(created)s,
           CASE WHEN t.id IS NULL THEN 'unknown_event'
                WHEN c.id IS NULL THEN %(miss)s::text
                WHEN %(op)s = 'cancel' AND t.status = 'running' THEN 'cancel_requested'
                ELSE 'applied' END,
           t.status,
           CASE WHEN t.id IS NULL THEN 'no such event'
                WHEN c.id IS NULL THEN %(op)s::text || ' does not apply to a ' || t.status || ' event'
                ELSE '' END,
           %(topic)s, %(partition)s, %(offset)s
    FROM fresh f LEFT JOIN target t ON true LEFT JOIN changed c ON true
    WHERE f.ok
    ON CONFLICT (command_id) DO NOTHING
    RETURNING result, applied_at
)
SELECT f.ok AND l.result IS NOT NULL, t.id::text, t.status,
       coalesce(c.status, t.status), coalesce(c.attempts, t.attempts),
       extract(epoch FROM coalesce(c.due, t.due))::float8,
       coalesce(l.result, (SELECT p.result FROM event_commands p WHERE p.command_id = %(cid)s)),
       coalesce(l.applied_at, clock_timestamp()), t.traceparent, t.day, t.type, t.size
FROM fresh f
LEFT JOIN target t ON true
LEFT JOIN changed c ON true
LEFT JOIN logged l ON true
"""

_CHANGED: Final = {
    # A running event keeps its status and updated_at (its lease); only the request is set.
    "cancel": """
changed AS (
    UPDATE events e
    SET status = CASE WHEN e.status = 'running' THEN e.status ELSE 'cancelled' END,
        finished_at = CASE WHEN e.status = 'running' THEN e.finished_at
                           ELSE clock_timestamp() END,
        cancel_requested_at = coalesce(e.cancel_requested_at, clock_timestamp()),
        updated_at = CASE WHEN e.status = 'running' THEN e.updated_at ELSE now() END
    FROM target t, fresh f
    WHERE e.id = t.id AND f.ok AND e.status IN ('scheduled', 'retrying', 'running')
    RETURNING e.id, e.status, e.attempts, NULL::timestamptz AS due
),""",
    # The due time the claim reads: execute_at before the first attempt, else next_attempt_at.
    "reschedule": """
changed AS (
    UPDATE events e
    SET execute_at = CASE WHEN e.status = 'scheduled' AND e.attempts = 0 THEN %(at)s::timestamptz
                          ELSE e.execute_at END,
        next_attempt_at = CASE WHEN e.status = 'scheduled' AND e.attempts = 0
                               THEN e.next_attempt_at ELSE %(at)s::timestamptz END,
        updated_at = now()
    FROM target t, fresh f
    WHERE e.id = t.id AND f.ok AND e.status IN ('scheduled', 'retrying')
    RETURNING e.id, e.status, e.attempts, %(at)s::timestamptz AS due
),""",
    # As dlq replay (core.store.replay), from dead or cancelled; an event never attempted
    # keeps the first attempt's due column (execute_at), as the claim reads it.
    "retry": """
changed AS (
    UPDATE events e
    SET status = 'scheduled', attempt_base = e.attempts,
        execute_at = CASE WHEN e.attempts = 0 THEN coalesce(%(at)s::timestamptz, now()) ELSE e.execute_at END,
        next_attempt_at = CASE WHEN e.attempts = 0 THEN e.next_attempt_at
                               ELSE coalesce(%(at)s::timestamptz, now()) END,
        finished_at = NULL, dead_reason = NULL, dlq_published_at = NULL,
        cancel_requested_at = NULL, updated_at = now()
    FROM target t, fresh f
    WHERE e.id = t.id AND f.ok AND e.status IN ('dead', 'cancelled')
    RETURNING e.id, e.status, e.attempts, coalesce(%(at)s::timestamptz, now()) AS due
),""",
}
_SQL: Final = {op: _HEAD + changed + _TAIL for op, changed in _CHANGED.items()}
# The result of a command whose CAS found the event in another status.
_MISS: Final = {"cancel": "not_applicable", "reschedule": "refused", "retry": "refused"}


@dataclass(frozen=True, slots=True)
class CommandRow:
    """A command to apply, with where it was read from. ``hide``: treat the target as not
    existing (the same batch inserts it after the command)."""

    command: Command
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    hide: bool = False


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying a command did, and the event's state after it."""

    command: Command
    #: False: the command was applied before (a repeat: nothing changed now); ``result`` is
    #: that earlier application's.
    fresh: bool
    result: str
    event_id: str | None  # None: unknown event
    status_before: str | None
    status: str | None  # the event's status now
    attempts: int
    due: float | None  # epoch s: when the event's next attempt is due (scheduled/retrying)
    applied_at: datetime
    #: The event's trace (``events.traceparent``): the job the command places joins it.
    traceparent: str | None = None
    #: The UTC day of the event's partition (``retain_from``): that job's hint for the claim.
    day: date | None = None
    #: The event's type: that job joins the type's lane (limits, priority) if it has one.
    type: str | None = None
    #: The event's payload size as JSON text: that job's hint for the payload budget.
    size: int | None = None


def _params(row: CommandRow) -> dict[str, Any]:
    c = row.command
    return {
        "cid": c.command_id,
        "op": c.op,
        "event_id": c.event_id,
        "key": c.idempotency_key,
        "hide": row.hide,
        "at": c.execute_at,
        "by": c.requested_by,
        "created": c.created_at,
        "miss": _MISS[c.op],
        "topic": row.topic,
        "partition": row.partition,
        "offset": row.offset,
    }


async def _apply_one(conn: AsyncConnection[Any], row: CommandRow) -> Applied:
    cur = await conn.execute(_SQL[row.command.op], _params(row))
    found = await cur.fetchone()
    assert found is not None  # the final SELECT reads `fresh`, which has one row
    (fresh, event_id, before, status, attempts, due, result, applied_at, traceparent, day,
     type_, size) = found  # fmt: skip
    return Applied(
        command=row.command,
        fresh=bool(fresh),
        result=result or "unknown_event",
        event_id=event_id,
        status_before=before,
        status=status,
        attempts=int(attempts or 0),
        due=due,
        applied_at=applied_at,
        traceparent=traceparent,
        day=day,
        type=type_,
        size=size,
    )


async def apply_commands(db: Database, rows: Sequence[CommandRow]) -> list[Applied]:
    """Apply ``rows`` in order, in one transaction; one :class:`Applied` per row.

    Raises :class:`RowsRejected` when PostgreSQL refuses a command's data (nothing is
    applied; apply the rows one at a time to find it) or :class:`DependencyError`.
    """
    if not rows:
        return []

    async def run(conn: AsyncConnection[Any]) -> list[Applied]:
        async with conn.transaction():
            return [await _apply_one(conn, row) for row in rows]

    try:
        return await db.run(run)
    except (psycopg.DataError, psycopg.IntegrityError) as err:
        raise RowsRejected(f"{type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
    except psycopg.Error as err:
        raise DependencyError("postgres", f"{type(err).__name__}: {err}") from err


async def history(db: Database, event_id: str | uuid.UUID) -> list[dict[str, Any]]:
    """The commands applied to an event, oldest first (for tools and tests)."""
    rows = await db.fetchall(
        "SELECT command_id::text, op, result, status_before, execute_at, requested_by,"
        " detail, applied_at FROM event_commands WHERE event_id = %(id)s ORDER BY applied_at",
        {"id": str(event_id)},
    )
    names = ("command_id", "op", "result", "status_before", "execute_at", "requested_by")
    return [dict(zip((*names, "detail", "applied_at"), row, strict=True)) for row in rows]


async def check_schema(db: Database) -> None:
    """Raise :class:`DependencyError` unless ``event_commands`` exists (migration 000005)."""
    try:
        await db.fetchone("SELECT command_id, result FROM event_commands LIMIT 0")
    except psycopg.errors.UndefinedTable as err:
        raise DependencyError(
            "postgres", f"schema outdated, run `eventsched migrate up`: {err}"
        ) from err
