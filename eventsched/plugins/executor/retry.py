"""The executor's retry policy: how long to wait after a failed attempt, and what an
attempt's outcome is. Pure functions (no I/O), called on the asyncio side by the job
function and by tests.

Statuses and attempts: ``max_retries`` attempts in all (per budget: ``eventsched dlq replay``
sets a dead event back to ``scheduled`` with a fresh budget, its attempts counting on from
where they were; see :func:`decide`). A failure with attempts left ->
``retrying`` with ``next_attempt_at = now + backoff(n)`` (``base * factor**(n-1)``, capped
at ``max``, times ``1 ± jitter``); a failure of the last attempt -> ``dead``
(``retries_exhausted``); :class:`~eventsched.core.runtime.contracts.PermanentError` ->
``dead`` (``permanent_error``); no handler for the type and no default -> ``dead``
(``no_handler``). An attempt interrupted by shutdown or lost with its worker counts as an
attempt too (so a handler that kills its worker cannot loop forever).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from eventsched.core.runtime.sections import RetryBackoffSettings
from eventsched.core.store.executions import Outcome


def retry_delay(attempt: int, backoff: RetryBackoffSettings, rng: random.Random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): exponential, jittered by
    ``± jitter`` (a fraction), never above ``max``."""
    delay = min(float(backoff.max), float(backoff.base) * backoff.factor ** (attempt - 1))
    if backoff.jitter:
        delay *= 1.0 + backoff.jitter * rng.uniform(-1.0, 1.0)
    return max(0.0, min(float(backoff.max), delay))


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed."""

    error: str
    permanent: bool = False
    reason: str = "permanent_error"  # the dead reason if permanent


def decide(
    event_id: str,
    attempt: int,
    failure: Failure | None,
    *,
    max_attempts: int,
    now: float,
    delay: Callable[[int], float],
    label: str = "",
    base: int = 0,
    started: float | None = None,
    day: date | None = None,
    size: int | None = None,
) -> Outcome:
    """The outcome of an attempt: succeeded, retrying after ``delay(n)``, or dead.

    ``n = attempt - base`` is the attempt's place in the current budget: ``base`` is the
    number of attempts made before it began (0; after a dlq replay re-ran a dead event, the
    attempts of the run that went dead), so a re-run gets ``max_attempts`` attempts of its
    own while attempt numbers keep counting. ``started``: when the handler was invoked
    (epoch seconds; None if it never was), recorded with the outcome; ``day``: the event's
    partition day as the claim found it (``Claimed.day``), carried to the outcome;
    ``size``: the payload's JSON size, carried to the outcome for a retry's job.
    """
    n = attempt - base
    if failure is None:
        return Outcome(
            event_id, attempt, "succeeded", None, now, label=label, started=started, day=day,
            size=size,
        )  # fmt: skip
    if failure.permanent:
        return Outcome(
            event_id, attempt, "dead", failure.error, now, dead_reason=failure.reason,
            label=label, started=started, day=day, size=size,
        )  # fmt: skip
    if n >= max_attempts:
        return Outcome(
            event_id, attempt, "dead", failure.error, now, dead_reason="retries_exhausted",
            label=label, started=started, day=day, size=size,
        )  # fmt: skip
    return Outcome(
        event_id, attempt, "retrying", failure.error, now, next_attempt_at=now + delay(n),
        label=label, started=started, day=day, size=size,
    )  # fmt: skip
