"""The job contract: what every role enqueues to have an event's attempt run.

::

    ScheduledJob(key=job_key(event_id, n), function=EXECUTE_FUNCTION,
                 scheduled=<due time, epoch s>, kwargs={"event_id": "<uuid>"} for the first
                 attempt, {"event_id": "<uuid>", "attempt": n} for retry n >= 2,
                 plus {"traceparent": "00-..."} when the event belongs to a trace,
                 plus {"day": "YYYY-MM-DD"} when the enqueuer knows the event's partition,
                 timeout=saq_timeout(settings), size=<payload bytes> when known)

Attempts are numbered from :data:`FIRST_ATTEMPT` (1). The first attempt's job carries no
``attempt`` kwarg; :func:`attempt_of` reads the kwarg back (absent: the first attempt), and
:func:`is_first_attempt` is the one test for "the first attempt".

Key scheme: the first attempt's key is the event id; retry ``n`` is ``"<event id>#<n>"``.
SAQ still holds a job's key while that job runs, so a retry enqueued from inside the running
job needs a key of its own; and a re-enqueue of the same attempt (the reconciler) uses the
same key, which SAQ skips while that job is pending. The consumer, the reconciler and
``dlq replay`` enqueue with these functions; the executor registers
:data:`EXECUTE_FUNCTION` and reads the same kwargs.

The ``day`` kwarg is a hint, never needed: the UTC day of the event's ``retain_from`` (the
day partition of ``events`` that holds it, docs/retention.md) as the enqueuer read it with
the event (the consumer's insert, the claim of the attempt before, the reconciler's and the
commands' reads). The executor's claim names that partition without looking the event's key
up first (:mod:`eventsched.core.store.executions`, above ``_PARTITIONS_SQL``); a job without
it (enqueued before the kwarg existed, or by a path that does not know the day) is looked
up, and a stale one (retention moved the event to a newer partition since) finds nothing
and is looked up then, so a hint costs at most a round trip. :func:`day_of` reads it back
(anything but a ``YYYY-MM-DD`` date counts as absent). An executor older than the kwarg
fails a job that carries it (its job function takes no ``day``): upgrade the executors
before, or together with, the roles that enqueue. From this version on the job function
ignores kwargs it does not know, so a kwarg added later must be an optional hint too (the
rule for changing this contract), and later upgrades can go in any order.

``size`` is a hint too, but not a kwarg: the payload's size in bytes as its enqueuer saw it,
kept in the SAQ job's ``meta`` (:attr:`~eventsched.core.jobqueue.ScheduledJob.size`), where
the executor's dispatcher reads it before the job function runs: its payload budget
(``executor.inflight_bytes``) reserves that much for the job until the claim brings the
payload, instead of the largest message (``consumer.max_message_bytes``). A job without it
reserves the largest; an executor older than it ignores it.

Due times, one name each: an event's due time is ``execute_at`` (a UTC datetime at the
edges: the wire format, the ``events`` column, the handler's event); an attempt's due time
is ``scheduled_for`` (the ``event_attempts`` column: ``execute_at`` for the first attempt,
``next_attempt_at`` for a retry); in the queue a job's due time is SAQ's ``scheduled``.
Where a due time is a number (SAQ's ``scheduled``, the executor's claims and outcomes:
``Claimed.scheduled_for``, ``NotDue.scheduled_for``, ``Outcome.next_attempt_at``) it is
float epoch seconds (``datetime.timestamp()``).
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any, Final

from eventsched.core.jobqueue import ScheduledJob
from eventsched.core.runtime.settings import Settings

#: The name the executor registers its job function under.
EXECUTE_FUNCTION: Final = "execute_event"
#: SAQ's own job timeout is the handler timeout plus this much room for the claim and the
#: outcome write, so the executor's timeout (a recorded, retried failure) always fires first.
SAQ_TIMEOUT_MARGIN: Final = 30
#: The number of an event's first attempt (its job has no ``attempt`` kwarg).
FIRST_ATTEMPT: Final = 1


def is_first_attempt(attempt: int) -> bool:
    """Whether ``attempt`` is the first attempt (numbers below it count as the first)."""
    return attempt <= FIRST_ATTEMPT


def attempt_of(kwarg: int | None) -> int:
    """The attempt a job runs, from its ``attempt`` kwarg: :data:`FIRST_ATTEMPT` when the
    kwarg is absent (None) or names the first attempt."""
    return FIRST_ATTEMPT if kwarg is None or is_first_attempt(kwarg) else kwarg


def day_of(kwarg: object) -> date | None:
    """The partition day a job's ``day`` kwarg names; None when absent or not a date
    (a hint: the claim then looks the day up)."""
    if not isinstance(kwarg, str):
        return None
    try:
        return date.fromisoformat(kwarg)
    except ValueError:
        return None


def job_key(event_id: str, attempt: int) -> str:
    """SAQ job key of an event's attempt: the event id for the first, ``<id>#<n>`` after."""
    return event_id if is_first_attempt(attempt) else f"{event_id}#{attempt}"


def saq_timeout(settings: Settings) -> int:
    """SAQ job timeout (whole seconds) for executor jobs: the longest handler timeout
    (``executor.job_timeout`` or a type's ``timeout``) plus a margin."""
    longest = max(
        [settings.executor.job_timeout, *(t.timeout for t in settings.types.values() if t.timeout)]
    )
    return math.ceil(longest) + SAQ_TIMEOUT_MARGIN


def make_job(
    event_id: str,
    attempt: int,
    scheduled: float,
    timeout: int,
    *,
    lane: str = "",
    traceparent: str | None = None,
    day: date | None = None,
    size: int | None = None,
) -> ScheduledJob:
    """The SAQ job that runs ``attempt`` of an event at ``scheduled`` (epoch seconds);
    ``lane``: the event's queue lane (its type, when the type has limits or a priority of
    its own: :mod:`eventsched.core.domain.policies`), marked for the event at enqueue;
    ``traceparent``: the W3C trace context the attempt's span is a child of; ``day``: the
    UTC day of the event's partition, if known (the claim's hint, see the module); ``size``:
    the payload's size in bytes, if known (the executor's payload budget reserves that much
    for the job instead of the largest message, see the module)."""
    kwargs: dict[str, Any] = {"event_id": event_id}
    if not is_first_attempt(attempt):
        kwargs["attempt"] = attempt
    if traceparent is not None:
        kwargs["traceparent"] = traceparent
    if day is not None:
        kwargs["day"] = day.isoformat()
    return ScheduledJob(
        key=job_key(event_id, attempt),
        function=EXECUTE_FUNCTION,
        scheduled=scheduled,
        kwargs=kwargs,
        timeout=timeout,
        lane=lane,
        size=size,
    )
