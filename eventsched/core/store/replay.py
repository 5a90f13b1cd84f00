"""A dead event runs again: the SQL behind ``eventsched dlq replay``'s re-runs.

``dlq replay`` re-runs the dead event of an executor's letter with :func:`rerun_dead`; when
that does not apply (or in a dry run) it reads :func:`event_state` to say why. Trio side (the
:class:`Database` methods); the caller handles the job in Redis.
"""

from __future__ import annotations

from datetime import date
from typing import Final, NamedTuple

from eventsched.core.store.pool import Database

# A dead event runs again: compare-and-set `dead` -> `scheduled` for the death this letter
# reported (same attempt count), due now (next_attempt_at: the claim takes a re-run's due
# time from there; execute_at stays the event's own), with a fresh budget from attempt_base.
# last_error is kept: it is the error of the most recent failed attempt until the next one.
# The DLQ bookkeeping is cleared so that another death is published again.
_RERUN_SQL: Final = """
UPDATE events
SET status = 'scheduled', attempt_base = attempts, next_attempt_at = now(),
    finished_at = NULL, dead_reason = NULL, dlq_published_at = NULL, updated_at = now()
WHERE id = %(id)s AND status = 'dead' AND (%(attempts)s::int IS NULL OR attempts = %(attempts)s)
RETURNING extract(epoch FROM next_attempt_at)::float8, (retain_from AT TIME ZONE 'UTC')::date,
          type, octet_length(payload::text)
"""
_STATE_SQL: Final = "SELECT status, attempts FROM events WHERE id = %(id)s"


class Rerun(NamedTuple):
    """What the re-run's job needs: its due time (epoch seconds), the UTC day of the event's
    partition (the claim's hint), the event's type (its lane, if the type has one) and its
    payload's size as JSON text (the payload budget's hint)."""

    due: float
    day: date
    type: str
    size: int


async def rerun_dead(db: Database, event_id: str, attempts: int | None) -> Rerun | None:
    """Set the event back from ``dead`` to ``scheduled``, due now, with a fresh attempt
    budget, if it is dead from the death that reported ``attempts`` (any death when None).

    Returns what its job needs, or None when the event is unknown, not dead, or died again
    since (see :func:`event_state`).
    """
    row = await db.fetchone(_RERUN_SQL, {"id": event_id, "attempts": attempts})
    if row is None:
        return None
    return Rerun(*row)


async def event_state(db: Database, event_id: str) -> tuple[str, int] | None:
    """The event's status and attempts so far, or None when it is unknown."""
    row = await db.fetchone(_STATE_SQL, {"id": event_id})
    if row is None:
        return None
    return row[0], row[1]
