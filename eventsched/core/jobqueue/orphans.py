"""Jobs of workers that are gone: put back the jobs taken but given up (asyncio side).

Used by the reconciler (through :class:`~eventsched.core.jobqueue.adapter.JobQueue`) for
events PostgreSQL says were never claimed. Depends on :mod:`.scripts`, :mod:`.jobs` and
:mod:`.store`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from saq.job import Status
from saq.utils import now

from eventsched.core.jobqueue.jobs import Orphans
from eventsched.core.jobqueue.scripts import REQUEUE_ORPHAN_LUA
from eventsched.core.jobqueue.store import OnTimeQueue
from eventsched.core.runtime.logs import get_logger

log = get_logger(__name__)


async def requeue_orphans(
    queue: OnTimeQueue, keys: Sequence[str], stalled: Collection[tuple[str, str]] = ()
) -> Orphans:
    """Of these (pending) job keys, put back into `queued` every job taken but given up:

    * taken by a worker that is gone (its SAQ worker-info key expired) before it
      finished the job: claimed ahead of its due time and waiting in a slot, or started;
    * taken and never started, by a worker that is alive: its record was still QUEUED
      on the previous call too (``stalled``: what that call returned as
      :attr:`Orphans.stalled`) under the same owner — the claim's answer was lost on
      its way (a connection cut during the call), so no slot ever got the job. A live
      worker hands a job to a slot and records its start within milliseconds.

    Only for jobs whose event PostgreSQL says was never claimed (the reconciler's
    ``overdue`` / ``retry_overdue`` candidates, due more than ``grace`` ago): the job is
    handed out again as if it had not been taken (its record QUEUED, its attempt
    returned). If the owner still runs it after all (paused, or its start record was
    lost), the PostgreSQL claim lets one of the two run it.
    """
    out = Orphans()
    if not keys:
        return out
    ids = [queue.job_id(key) for key in keys]
    owners = await queue.redis.hmget(queue._owners, ids)
    owned = [
        (key, job_id, o.decode() if isinstance(o, bytes) else str(o))
        for key, job_id, o in zip(keys, ids, owners, strict=True)
        if o
    ]
    if not owned:
        return out
    workers = sorted({owner for _, _, owner in owned})
    async with queue.redis.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.exists(queue.namespace(f"worker_info:{worker}"))
        alive = dict(zip(workers, await pipe.execute(), strict=True))
    records = await queue.redis.mget([job_id for _, job_id, _ in owned])
    previous = set(stalled)
    for (key, job_id, owner), payload in zip(owned, records, strict=True):
        job = queue.deserialize(payload)
        if job is None:
            continue
        if alive[owner]:
            if job.status != Status.QUEUED:
                continue
            if (job_id, owner) not in previous:
                out.stalled.add((job_id, owner))
                continue
            why = "taken_never_started"
        else:
            why = "worker_lost"
        if job.status == Status.ACTIVE:
            job.attempts = max(0, job.attempts - 1)  # the start that never got anywhere
        job.status = Status.QUEUED
        job.started = 0
        job.worker_id = None
        job.touched = now()
        moved = await queue.redis.eval(
            REQUEUE_ORPHAN_LUA,
            5,
            queue._active,
            queue._owners,
            queue._queued,
            queue._incomplete,
            job_id,
            owner,
            queue._text(job),
            queue.wakeup_channel,
        )
        if moved:
            out.requeued.append(key)
            log.warning("taken_job_requeued", job_key=key, worker_id=owner, why=why)
    return out
