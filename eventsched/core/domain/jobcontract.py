"""The job contract: what every role enqueues to have an event's attempt run.

::

    ScheduledJob(key=job_key(event_id, n), function=EXECUTE_FUNCTION,
                 scheduled=<due time, epoch s>, kwargs={"event_id": "<uuid>"} for the first
                 attempt, {"event_id": "<uuid>", "attempt": n} for retry n >= 2,
                 timeout=saq_timeout(settings))

Key scheme: the first attempt's key is the event id; retry ``n`` is ``"<event id>#<n>"``.
SAQ still holds a job's key while that job runs, so a retry enqueued from inside the running
job needs a key of its own; and a re-enqueue of the same attempt (the reconciler) uses the
same key, which SAQ skips while that job is pending. The consumer, the reconciler and
``dlq replay`` enqueue with these functions; the executor registers
:data:`EXECUTE_FUNCTION` and reads the same kwargs.
"""

from __future__ import annotations

import math
from typing import Any, Final

from eventsched.core.jobqueue import ScheduledJob
from eventsched.core.runtime.settings import Settings

#: The name the executor registers its job function under.
EXECUTE_FUNCTION: Final = "execute_event"
#: SAQ's own job timeout is the handler timeout plus this much room for the claim and the
#: outcome write, so the executor's timeout (a recorded, retried failure) always fires first.
SAQ_TIMEOUT_MARGIN: Final = 30


def job_key(event_id: str, attempt: int) -> str:
    """SAQ job key of an event's attempt: the event id for the first, ``<id>#<n>`` after."""
    return event_id if attempt <= 1 else f"{event_id}#{attempt}"


def saq_timeout(settings: Settings) -> int:
    """SAQ job timeout (whole seconds) for executor jobs: ``job_timeout`` plus a margin."""
    return math.ceil(settings.executor.job_timeout) + SAQ_TIMEOUT_MARGIN


def make_job(event_id: str, attempt: int, scheduled: float, timeout: int) -> ScheduledJob:
    """The SAQ job that runs ``attempt`` of an event at ``scheduled`` (epoch seconds)."""
    kwargs: dict[str, Any] = {"event_id": event_id}
    if attempt > 1:
        kwargs["attempt"] = attempt
    return ScheduledJob(
        key=job_key(event_id, attempt),
        function=EXECUTE_FUNCTION,
        scheduled=scheduled,
        kwargs=kwargs,
        timeout=timeout,
    )
