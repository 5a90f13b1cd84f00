"""The job queue: SAQ on Redis, with jobs started on time (milliseconds) and never early.

Stock SAQ moves due jobs from the ``incomplete`` zset to the ``queued`` list once a second
(its schedule script takes a ``SETEX`` lock of whole seconds), and each worker slot then
pays ``BLMOVE`` + ``GET`` + ``SET`` + ``PUBLISH`` + ``MULTI`` + ``PUBLISH`` per job; under
trio-asyncio every asyncio callback is a trio scheduler pass with an ``epoll`` syscall, so
a stock worker is both slow and up to a second late (the figures are in docs/design-notes.md,
"Why the job queue is not stock SAQ"). This package keeps SAQ's data model (keys, job JSON,
statuses, dedup, sweep, abort, worker info) and changes how jobs move:

* **On-time claiming.** :class:`OnTimeWorker` runs one *dispatcher* per process instead of a
  1 s timer plus one ``BLMOVE`` per slot. It sleeps until ``claim_ahead`` (10 ms by default;
  the executor's is 40 ms) before the
  earliest score in ``incomplete`` (capped by ``max_wait``; woken early by the pub/sub
  message every enqueue sends), then runs one Lua script that moves every job due by then to
  ``queued`` and moves as many as it has idle slots from ``queued`` to ``active``, returning
  their payloads (a burst opens with a claim of a few jobs, the rest follow at once: see
  :data:`~eventsched.core.jobqueue.dispatcher.OPENING_CLAIM`). A slot that gets a job before its due time sleeps the rest of the way on
  its own clock, so the Redis round trip and the hand-out happen before the due time rather
  than after it, and jobs due within ``claim_ahead`` of each other share one claim.
* **No lock.** A Redis script runs atomically, and a moved job gets score 0, which is
  outside the ``[1, now]`` range every mover scans (SAQ's own marker), so no job can be
  moved twice however many processes run the script; a mover (or its connection) dying
  mid-call loses nothing either: the script ran whole or not at all. SAQ's ``SETEX`` lock
  only throttled its polling; ``min_interval`` does that here, per process, in ms.
* **Per-type limits in the same claim.** A job whose event type has a lane
  (:mod:`.limits`: a concurrency limit, a rate limit or a priority of its own, across all
  processes) waits, once due, in its lane instead of ``queued``; the claim script serves
  lanes and ``queued`` by priority, each lane only while it has a free lease (concurrency)
  and a token (rate), in the same atomic call. A lane that is full is skipped, so it holds
  back no other work; a lease that frees wakes every dispatcher, a lease of a dead process
  expires, and a claim that finds no token says when the next one is due. A job waiting in
  a lane has score 0 like a queued one, so it cannot be moved twice either; it is never
  claimed before it is due, and it stays in Redis until a claim takes it.
* **Few round trips and event-loop callbacks per job.** Slots are long-lived tasks that run
  the function inline under ``asyncio.timeout``; a job's start and successful finish are
  recorded without waiting and ride along with the dispatcher's next claim
  (:class:`Batcher`); :meth:`OnTimeQueue.enqueue_scheduled` enqueues hundreds of jobs per
  script call.

Clocks: scores are float epoch seconds as written by the enqueuer (``repr`` of a float, so
nothing is rounded); movers compare them with their *local* ``time.time()``, passed to the
script. On one host every clock agrees; across hosts they must be NTP-synchronised, and a
worker whose clock lags the mover's still never starts a job early: it sleeps the rest of
the way (:func:`wait_until`, on its own clock) before calling the job function
(``OnTimeWorker._before_process``), or the job function does (``function_waits``: the
executor claims the attempt in PostgreSQL first, then waits).

Re-enqueueing: a job key is deduplicated only while it is *incomplete* (scheduled, queued or
active) — SAQ's own rule. Once finished, the same key can be enqueued again at once (the
stored result with its ``ttl`` does not block it); the executor guards re-execution with a
PostgreSQL compare-and-set.

Trio side: :class:`JobQueue` wraps the asyncio side once with typed methods, and
:func:`run_worker` / :func:`drain_worker` drive a worker's life cycle from trio::

    async with trio_asyncio.open_loop():
        jobs = JobQueue(url, name)
        await jobs.connect()
        worker = make_worker(jobs, [("execute", execute)], concurrency=20)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, worker)
            ...                                    # first SIGTERM:
            with trio.move_on_after(grace):
                await drain_worker(worker)         # no new jobs; running ones finish
            nursery.cancel_scope.cancel()          # leftovers are cancelled and re-queued
        await jobs.close()

Modules, each depending only on those listed before it: :mod:`.scripts` (the Lua scripts and
their key/argument contracts, the SAQ version guard), :mod:`.jobs` (the records passed
around), :mod:`.timing` (waiting for a due time, never early), :mod:`.budget` (the in-flight payload budget and heap trimming), :mod:`.batcher`
(ordered, atomic state changes), :mod:`.limits` (lanes: per-type limits and priorities,
their keys), :mod:`.store` (:class:`OnTimeQueue`, the on-time store), :mod:`.edits`
(removing pending jobs, moving one to a new due time: commands on events),
:mod:`.orphans` (putting back jobs taken by workers that are gone), :mod:`.adapter` (:class:`JobQueue`, trio side), :mod:`.shards` (:class:`ShardedQueue`: the queue
over several Redis servers, an event's jobs on the shard its id hashes to), :mod:`.dispatcher` (claims for a worker's
slots; it depends on the store, never the reverse) and :mod:`.worker` (:class:`OnTimeWorker`
and its trio-side life cycle; it wires the dispatcher into the store). The package may import
SAQ, redis, trio, trio-asyncio, msgspec and ``eventsched.core`` modules outside it (config,
errors, logging), never ``eventsched.plugins``.
"""

from eventsched.core.jobqueue.adapter import JobQueue
from eventsched.core.jobqueue.budget import PayloadBudget, payload_bytes, trim_heap
from eventsched.core.jobqueue.edits import Removed
from eventsched.core.jobqueue.jobs import JobClaim, Orphans, PutBack, ScheduledJob
from eventsched.core.jobqueue.scripts import TESTED_SAQ, TESTED_SAQ_RELEASE, check_saq_version
from eventsched.core.jobqueue.shards import PartlyEnqueued, ShardedQueue, shard_of
from eventsched.core.jobqueue.store import REDIS_ERRORS, OnTimeQueue
from eventsched.core.jobqueue.timing import wait_until
from eventsched.core.jobqueue.worker import (
    JobContext,
    OnTimeWorker,
    drain_worker,
    make_worker,
    run_worker,
)

__all__ = [
    "REDIS_ERRORS",
    "TESTED_SAQ",
    "TESTED_SAQ_RELEASE",
    "JobClaim",
    "JobContext",
    "JobQueue",
    "OnTimeQueue",
    "OnTimeWorker",
    "Orphans",
    "PartlyEnqueued",
    "PayloadBudget",
    "PutBack",
    "Removed",
    "ScheduledJob",
    "ShardedQueue",
    "check_saq_version",
    "drain_worker",
    "make_worker",
    "payload_bytes",
    "run_worker",
    "shard_of",
    "trim_heap",
    "wait_until",
]
