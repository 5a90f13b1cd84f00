"""Changing pending jobs: remove them, or put one at a new due time (asyncio side).

Used for commands on events (a cancelled event's job is removed; a rescheduled or retried
one's is moved or added). Each change is one Lua script (:data:`~.scripts.REMOVE_LUA`,
:data:`~.scripts.PLACE_LUA`), atomic in Redis: a job is changed only while no worker has
taken it; a job already taken (claimed ahead of its due time, or running) is left to the
executor's claim, whose compare-and-set in PostgreSQL refuses a cancelled event and puts
back one that is not due yet. Depends on :mod:`.scripts`, :mod:`.jobs` and :mod:`.store`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from saq.job import ABORT_ID_PREFIX
from saq.utils import now

from eventsched.core.jobqueue.jobs import ScheduledJob, job_payload
from eventsched.core.jobqueue.limits import event_of
from eventsched.core.jobqueue.scripts import PLACE_LUA, REMOVE_LUA
from eventsched.core.jobqueue.store import OnTimeQueue


@dataclass(slots=True)
class Removed:
    """What :func:`remove_jobs` did, by job key (keys not pending are in neither list)."""

    removed: list[str] = field(default_factory=list)
    #: Taken by a worker (claimed ahead or running): left to the claim.
    taken: list[str] = field(default_factory=list)


async def remove_jobs(queue: OnTimeQueue, keys: Sequence[str]) -> Removed:
    """Remove the pending, untaken jobs of these keys, with their records (one script)."""
    if not keys:
        return Removed()
    removed, taken = await queue.redis.eval(
        REMOVE_LUA,
        2 + len(keys),
        queue._incomplete,
        queue._queued,
        *(queue.job_id(key) for key in keys),
        queue.lane_keys.lanes,
        queue.job_id(""),
        queue.lane_keys.prefix,
        *keys,
    )
    return Removed([k.decode() for k in removed], [k.decode() for k in taken])


async def place_job(queue: OnTimeQueue, job: ScheduledJob) -> str:
    """Have ``job`` pending at ``job.scheduled``: move it there if it is pending and not
    taken, add it if it is not pending. Returns ``moved``, ``added``, ``taken`` (a worker
    has it: left alone) or ``aborting``."""
    payload = queue._dump(job_payload(job, queue.name, queue.ttl, now()))
    result = await queue.redis.eval(
        PLACE_LUA,
        4,
        queue._incomplete,
        queue._queued,
        queue.job_id(job.key),
        ABORT_ID_PREFIX + job.key,
        repr(time.time()),
        queue.wakeup_channel,
        payload,
        repr(float(job.scheduled)),
        queue.lane_keys.lanes,
        queue.job_id(""),
        queue.lane_keys.prefix,
        event_of(job.key),
        job.lane,
    )
    return result.decode() if isinstance(result, bytes) else str(result)
