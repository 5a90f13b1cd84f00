"""Job-queue adapter: SAQ on Redis, with jobs started on time (milliseconds) and never early.

Stock SAQ moves due jobs from the ``incomplete`` zset to the ``queued`` list once a second
(its schedule script takes a ``SETEX`` lock of whole seconds), and each worker slot then
pays ``BLMOVE`` + ``GET`` + ``SET`` + ``PUBLISH`` + ``MULTI`` + ``PUBLISH`` per job. Under
trio-asyncio every asyncio callback is a trio scheduler pass with an ``epoll`` syscall
(~0.1 ms on the 2-core dev box), so one stock worker managed ~150 jobs/s, up to a second
late. This module keeps SAQ's data model (keys, job JSON, statuses, dedup, sweep, abort,
worker info) and changes how jobs move:

* **On-time claiming.** :class:`OnTimeWorker` runs one *dispatcher* per process instead of a
  1 s timer plus one ``BLMOVE`` per slot. It sleeps until ``claim_ahead`` (10 ms) before the
  earliest score in ``incomplete`` (capped by ``max_wait``; woken early by the pub/sub
  message every enqueue sends), then runs one Lua script that moves every job due by then to
  ``queued`` and moves as many as it has idle slots from ``queued`` to ``active``, returning
  their payloads. A slot that gets a job before its due time sleeps the rest of the way on
  its own clock, so the Redis round trip and the hand-out happen before the due time rather
  than after it, and jobs due within ``claim_ahead`` of each other share one claim.
* **No lock.** A Redis script runs atomically, and a moved job gets score 0, which is
  outside the ``[1, now]`` range every mover scans (SAQ's own marker), so no job can be
  moved twice however many processes run the script; a mover (or its connection) dying
  mid-call loses nothing either: the script ran whole or not at all. SAQ's ``SETEX`` lock
  only throttled its polling; ``min_interval`` does that here, per process, in ms.
* **Few round trips and event-loop callbacks per job.** Slots are long-lived tasks that run
  the function inline under ``asyncio.timeout``; a job's start and successful finish are
  recorded without waiting and ride along with the dispatcher's next claim
  (:class:`_Batcher`); :meth:`OnTimeQueue.enqueue_scheduled` enqueues hundreds of jobs per
  script call.

Clocks: scores are float epoch seconds as written by the enqueuer (``repr`` of a float, so
nothing is rounded); movers compare them with their *local* ``time.time()``, passed to the
script. On one host every clock agrees; across hosts they must be NTP-synchronised, and a
worker whose clock lags the mover's still never starts a job early: it sleeps the rest of
the way before calling the job function (``OnTimeWorker._before_process``).

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
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import signal
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import trio
import trio_asyncio
from redis import asyncio as aioredis
from redis.exceptions import RedisError
from saq.job import ABORT_ID_PREFIX, Job, Status
from saq.queue.redis import RedisQueue
from saq.types import Context, FunctionsType, JobTaskContext, WorkerInfo
from saq.utils import now
from saq.worker import Worker, ensure_coroutine_function

from eventsched.core.config import redact
from eventsched.core.errors import DependencyError, UntestedVersion
from eventsched.core.logging import get_logger

#: The SAQ releases this module was checked against: OnTimeQueue and OnTimeWorker override
#: internals of SAQ's RedisQueue and Worker (Lua scripts, key names, the job hand-out), which
#: any release may change. pyproject.toml pins the same range; :func:`check_saq_version`
#: stops start-up on another, and tests/test_queue.py fails so an upgrade is reviewed here.
TESTED_SAQ_RELEASE: Final = "0.26"
TESTED_SAQ: Final = ">=0.26,<0.27"


def check_saq_version(installed: str | None = None) -> None:
    """Raise :class:`UntestedVersion` unless the installed SAQ is a ``0.26.x`` release."""
    import saq

    version = installed if installed is not None else saq.__version__
    if version.split(".")[:2] != TESTED_SAQ_RELEASE.split("."):
        raise UntestedVersion("saq", version, TESTED_SAQ)


if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from eventsched.core.memory import PayloadBudget

log = get_logger(__name__)
T = TypeVar("T")

# Errors that mean "Redis or the network is the problem".
_REDIS_ERRORS = (RedisError, OSError)

# Enqueue many jobs in one atomic call. KEYS = incomplete, queued, then (job id, abort id)
# per job; ARGV = now, wake-up channel, then (payload, scheduled) per job. Same duplicate
# rule as SAQ's _enqueue (skip a key that is incomplete or being aborted). A job already due
# goes straight to `queued` with score 0 (SAQ only does that for scheduled == 0, and its
# `ARGV[2] == '0'` test misses a float 0.0, which would strand the job). The score is the
# caller's exact decimal string, never a Lua number (tostring would round to 14 digits).
_ENQUEUE_LUA = """
local now = tonumber(ARGV[1])
local added = 0
local earliest = nil
local earliest_arg = nil
for i = 1, (#KEYS - 2) / 2 do
    local id = KEYS[1 + 2 * i]
    local payload = ARGV[1 + 2 * i]
    local scheduled = ARGV[2 + 2 * i]
    if not redis.call('ZSCORE', KEYS[1], id) and redis.call('EXISTS', KEYS[2 + 2 * i]) == 0 then
        redis.call('SET', id, payload)
        local due = tonumber(scheduled)
        if due <= now then
            redis.call('ZADD', KEYS[1], 0, id)
            redis.call('RPUSH', KEYS[2], id)
            due = 0
            scheduled = '0'
        else
            redis.call('ZADD', KEYS[1], scheduled, id)
        end
        if earliest == nil or due < earliest then
            earliest = due
            earliest_arg = scheduled
        end
        added = added + 1
    end
end
if earliest_arg then
    redis.call('PUBLISH', ARGV[2], earliest_arg)
end
return added
"""

# Move due jobs and claim some. KEYS = incomplete, queued, active; ARGV = now, move limit,
# claim limit, wake-up channel, '1' to return the moved ids, and state changes to apply
# first (the _Batcher's JSON, or ''): finishes and start records of earlier jobs ride along
# with the claim instead of costing round trips of their own. Due = score in [1, now];
# moving sets score 0 (SAQ's marker for "queued or active"), which is what makes a second
# move impossible. Claimed ids go queued -> active like SAQ's BLMOVE (LEFT -> RIGHT) and
# their payloads are returned, so a claim costs one round trip however many jobs it
# carries. If moved jobs are left in `queued` (this process had no idle slot), the other
# processes are woken to take them. KEYS[4] (the owners hash) and ARGV[7] (the worker id,
# '' for none) record who took each claimed job, so a job taken by a worker that died before
# it could start it can be told from one that is being run (OnTimeQueue.requeue_orphans).
# Returns {claimed ids, payloads, next score or false,
# queued length, moved count, moved ids}.
_CLAIM_LUA = """
if ARGV[6] ~= '' then
    for _, command in ipairs(cjson.decode(ARGV[6])) do
        redis.call(unpack(command))
    end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], 1, ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
    local members = {}
    for i, id in ipairs(due) do
        members[2 * i - 1] = 0
        members[2 * i] = id
    end
    redis.call('ZADD', KEYS[1], unpack(members))
    redis.call('RPUSH', KEYS[2], unpack(due))
end
local claimed = {}
local payloads = {}
for i = 1, tonumber(ARGV[3]) do
    local id = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT')
    if not id then
        break
    end
    claimed[i] = id
    payloads[i] = redis.call('GET', id)
    if ARGV[7] ~= '' then
        redis.call('HSET', KEYS[4], id, ARGV[7])
    end
end
local backlog = redis.call('LLEN', KEYS[2])
if #due > 0 and backlog > 0 then
    redis.call('PUBLISH', ARGV[4], '0')
end
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], 1, '+inf', 'LIMIT', 0, 1, 'WITHSCORES')
local moved = {}
if ARGV[5] == '1' then
    moved = due
end
return {claimed, payloads, nxt[2] or false, backlog, #due, moved}
"""


# SAQ's sweep script: take the sweep lock (whole seconds, fine for a once-a-minute job) and
# read every active job.
_SWEEP_LUA = """
local id_jobs = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SETEX', KEYS[1], ARGV[1], 1)
    for i, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        id_jobs[i] = {v, redis.call('GET', v)}
    end
end
return id_jobs
"""

# Seconds a claimed job may stay QUEUED in `active` before the sweep believes its worker died.
_CLAIM_GRACE = 5.0

# Give a job taken by a dead worker back. KEYS = active, owners, queued, incomplete, job id;
# ARGV = the dead owner, the job's new record, wake-up channel. Only if the job is still in
# `active` under that owner (it did not finish, nobody requeued it meanwhile).
_REQUEUE_ORPHAN_LUA = """
if redis.call('HGET', KEYS[2], KEYS[5]) ~= ARGV[1] then
    return 0
end
redis.call('HDEL', KEYS[2], KEYS[5])
if redis.call('LREM', KEYS[1], 0, KEYS[5]) == 0 then
    return 0
end
redis.call('SET', KEYS[5], ARGV[2])
redis.call('ZADD', KEYS[4], 0, KEYS[5])
redis.call('RPUSH', KEYS[3], KEYS[5])
redis.call('PUBLISH', ARGV[3], '0')
return 1
"""

# Compare-and-set of the reconciler's epoch marker.
_MARKER_CAS_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

_JSON_ENCODER = msgspec.json.Encoder()
_JSON_DECODER = msgspec.json.Decoder()

_JOB_FIELDS = [(field.name, field.default) for field in dataclasses.fields(Job)]
_JOB_DEFAULTS = dict(_JOB_FIELDS)


def _job_dict(job: Job) -> dict[str, Any]:
    """``Job.to_dict()``, same output, without its per-call ``dataclasses.fields()`` walk and
    helper call per field (it was a quarter of the worker's CPU: twice per job)."""
    out: dict[str, Any] = {}
    for name, default in _JOB_FIELDS:
        value = getattr(job, name)
        try:
            if value == default:
                continue
        except ValueError:  # e.g. an array-like result, as SAQ's _safe_eq allows for
            pass
        if name == "meta" and not value:
            continue
        if name == "queue" and value:
            value = value.name
        out[name] = value
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledJob:
    """One job to enqueue: run ``function(**kwargs)`` at ``scheduled`` (epoch seconds)."""

    key: str  # the event id; SAQ job key, so enqueuing it again while pending is a no-op
    function: str
    scheduled: float  # epoch seconds, sub-millisecond precision is kept
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timeout: int = 60  # seconds before SAQ cancels the job and its sweep calls it stuck


class PutBack(Exception):
    """Raised by a job function that must not run yet: :class:`OnTimeWorker` puts the job
    back into the queue to run at ``at`` (epoch seconds), as if it had not been taken."""

    def __init__(self, at: float) -> None:
        super().__init__(at)
        self.at = at


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one run of the claim script did."""

    jobs: list[Job]
    next_due: float | None  # earliest score still waiting in `incomplete`
    backlog: int  # jobs left in `queued` after claiming
    moved: int  # jobs moved from `incomplete` to `queued` by this call
    moved_ids: list[str]  # their ids, if asked for


@dataclasses.dataclass(slots=True)
class Orphans:
    """What :meth:`OnTimeQueue.requeue_orphans` did."""

    requeued: list[str] = dataclasses.field(default_factory=list)  # keys put back
    # (job id, owner) of jobs taken by a live worker and not started yet: pass them to the
    # next call, which puts back those still so.
    stalled: set[tuple[str, str]] = dataclasses.field(default_factory=set)


class OnTimeQueue(RedisQueue):
    """SAQ's RedisQueue with float-second scheduling, batch enqueue and a lock-free mover.

    Compatible with a stock :class:`saq.Worker` (``schedule()`` moves every due job, to the
    millisecond, without a lock); :class:`OnTimeWorker` additionally replaces the per-slot
    ``BLMOVE`` with its dispatcher. One queue instance serves at most one worker.
    Needs Redis >= 6.2 (``LMOVE``, ``ZMSCORE`` in scripts and calls).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        name: str = "default",
        *,
        ttl: int = 60,
        move_limit: int = 1000,
        enqueue_chunk: int = 500,
        **kwargs: Any,
    ) -> None:
        # msgspec instead of SAQ's json.dumps/json.loads: the same JSON (stock SAQ workers and
        # tools read it), ~10x cheaper to write and ~3x to read; every job is written twice
        # (enqueue, finish) and read once.
        kwargs.setdefault("dump", _JSON_ENCODER.encode)
        kwargs.setdefault("load", _JSON_DECODER.decode)
        super().__init__(redis, name=name, **kwargs)
        self.ttl = ttl  # seconds a finished job's record is kept (SAQ's default is 600)
        self.move_limit = move_limit  # bounds the time one script blocks Redis
        self._enqueue_chunk = enqueue_chunk
        self.wakeup_channel = self.namespace("wakeup")
        # Job id -> id of the worker that took it (set by the claim, cleared when the job
        # leaves `active`); `owner` is the id this queue's worker claims under.
        self._owners = self.namespace("owners")
        self.owner = ""
        self._enqueue_many_script: AsyncScript | None = None
        self._claim_script: AsyncScript | None = None
        self._batcher = _Batcher(redis)
        self._dispatcher: _Dispatcher | None = None

    async def disconnect(self) -> None:
        # SAQ's version PUNSUBSCRIBEs its job-update multiplexer even if it never started,
        # which opens a connection just to close it (and fails when Redis is down).
        if self._pubsub._daemon_task is not None:
            await self._pubsub.close()
        await self._pubsub.pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    def serialize(self, job: Job) -> bytes | str:
        return self._dump(_job_dict(job))

    def _text(self, job: Job) -> str:
        payload = self.serialize(job)
        return payload.decode() if isinstance(payload, bytes) else payload

    # -- enqueue ---------------------------------------------------------------------------

    def make_job(self, job: ScheduledJob) -> Job:
        """The SAQ job for ``job``; SAQ's own retries stay off (eventsched retries in PG)."""
        saq_job = Job(
            function=job.function,
            kwargs=dict(job.kwargs),
            queue=self,
            key=job.key,
            timeout=job.timeout,
            retries=1,  # one attempt: SAQ retries only if retries > attempts
            ttl=self.ttl,
            status=Status.QUEUED,
        )
        # SAQ annotates `scheduled` as int but stores any JSON number untouched; we need
        # the fraction (the due time in milliseconds and below).
        saq_job.scheduled = float(job.scheduled)  # type: ignore[assignment]
        return saq_job

    def _payload(self, job: ScheduledJob, queued_ms: int) -> str | bytes:
        # What `serialize(make_job(job))` produces (Job.to_dict leaves out fields at their
        # defaults), built directly: to_dict walks every dataclass field and was 40% of the
        # enqueue CPU. tests/test_queue.py checks that the two agree.
        payload: dict[str, Any] = {
            "function": job.function,
            "kwargs": dict(job.kwargs),
            "queue": self.name,
        }
        payload["key"] = job.key
        if job.timeout != _JOB_DEFAULTS["timeout"]:
            payload["timeout"] = job.timeout
        if self.ttl != _JOB_DEFAULTS["ttl"]:
            payload["ttl"] = self.ttl
        if job.scheduled:
            payload["scheduled"] = float(job.scheduled)
        payload["queued"] = queued_ms
        payload["status"] = Status.QUEUED.value
        return self._dump(payload)

    async def enqueue_scheduled(self, jobs: Sequence[ScheduledJob]) -> int:
        """Enqueue ``jobs``; return how many were new (a key still incomplete is skipped).

        Bypasses ``register_before_enqueue`` hooks (eventsched registers none).
        """
        queued_ms = now()
        return await self._enqueue_entries(
            [
                (
                    self.job_id(job.key),
                    ABORT_ID_PREFIX + job.key,
                    self._payload(job, queued_ms),
                    job.scheduled,
                )
                for job in jobs
            ]
        )

    async def enqueue_jobs(self, jobs: Sequence[Job]) -> int:
        """Enqueue SAQ jobs (``before_enqueue`` hooks run); return how many were new."""
        queued_ms = now()
        for job in jobs:
            job.queue = self
            job.queued = queued_ms
            job.status = Status.QUEUED
            await self._before_enqueue(job)
        return await self._enqueue_entries(
            [(job.id, job.abort_id, self.serialize(job), job.scheduled) for job in jobs]
        )

    async def _enqueue_entries(self, entries: Sequence[tuple[str, str, str | bytes, float]]) -> int:
        # Chunks of one script call each (a call blocks Redis while it runs), all chunks in
        # one pipeline (one round trip).
        if not entries:
            return 0
        if self._enqueue_many_script is None:
            self._enqueue_many_script = self.redis.register_script(_ENQUEUE_LUA)
        now_arg = repr(time.time())
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(entries), self._enqueue_chunk):
                keys: list[str] = [self._incomplete, self._queued]
                args: list[str | bytes] = [now_arg, self.wakeup_channel]
                for job_id, abort_id, payload, scheduled in entries[
                    start : start + self._enqueue_chunk
                ]:
                    keys += (job_id, abort_id)
                    args += (payload, repr(float(scheduled)))
                await self._enqueue_many_script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return sum(int(r) for r in results)

    async def _enqueue(self, job: Job) -> Job | None:
        # SAQ's single-job path goes through the batch script too: same duplicate rule,
        # float scores, due jobs queued at once, movers woken.
        return job if await self.enqueue_jobs([job]) else None

    # -- moving and claiming -----------------------------------------------------------------

    async def claim(
        self,
        limit: int,
        now: float | None = None,
        *,
        moved_ids: bool = False,
        commands: str = "",
    ) -> ClaimResult:
        """Move jobs due at ``now`` to `queued`, then claim up to ``limit`` into `active`.

        ``commands``: encoded state changes (:meth:`_Batcher.encode`) to apply first.
        """
        if self._claim_script is None:
            self._claim_script = self.redis.register_script(_CLAIM_LUA)
        at = time.time() if now is None else now
        ids, payloads, next_due, backlog, moved, moved_list = await self._claim_script(
            keys=[self._incomplete, self._queued, self._active, self._owners],
            args=[
                repr(at),
                self.move_limit,
                limit,
                self.wakeup_channel,
                int(moved_ids),
                commands,
                self.owner,
            ],
        )
        jobs: list[Job] = []
        for job_id, payload in zip(ids, payloads, strict=True):
            job = self.deserialize(payload)
            if job is None:
                # Its record vanished; the sweep removes the orphan id from `active`.
                log.warning("claimed_job_without_record", job_id=job_id.decode())
                continue
            jobs.append(job)
        return ClaimResult(
            jobs=jobs,
            next_due=None if next_due is None else float(next_due),
            backlog=int(backlog),
            moved=int(moved),
            moved_ids=[job_id.decode() for job_id in moved_list],
        )

    async def schedule(self, lock: int = 1) -> list[str]:
        """Stock-worker hook: move every due job now (``lock`` is ignored, none is needed)."""
        moved: list[str] = []
        while True:
            result = await self.claim(0, moved_ids=True)
            moved += result.moved_ids
            if result.moved < self.move_limit:
                return moved

    async def release(self, jobs: Iterable[Job]) -> None:
        """Put claimed but unstarted jobs back at the head of `queued`, untouched."""
        await self._batcher.run(self._release_commands(jobs))

    def release_nowait(self, jobs: Iterable[Job]) -> None:
        """:meth:`release` with the next batch, without waiting (for the dispatcher)."""
        self._batcher.submit_nowait(self._release_commands(jobs))

    async def put_back(self, job: Job, at: float) -> None:
        """Give a taken job back, untouched, to run at ``at`` (epoch seconds): out of
        `active`, back into `incomplete` with that score (its key stays pending), its record
        QUEUED with ``scheduled = at`` and the attempt it used returned."""
        job.status = Status.QUEUED
        job.attempts = max(0, job.attempts - 1)
        job.started = 0
        job.touched = now()
        job.worker_id = None
        job.scheduled = at  # type: ignore[assignment]  # a float, see make_job
        score = repr(float(at))
        await self._batcher.run(
            [
                ("LREM", self._active, 1, job.id),
                ("HDEL", self._owners, job.id),
                ("LREM", self._queued, 1, job.id),
                ("ZADD", self._incomplete, score, job.id),
                ("SET", job.id, self._text(job)),
                ("PUBLISH", self.wakeup_channel, score),
            ]
        )

    def _release_commands(self, jobs: Iterable[Job]) -> list[Command]:
        commands: list[Command] = []
        for job in jobs:
            commands += [
                ("LREM", self._active, 1, job.id),
                ("HDEL", self._owners, job.id),
                ("LPUSH", self._queued, job.id),
            ]
        commands.append(("PUBLISH", self.wakeup_channel, "0"))
        return commands

    async def dequeue(
        self,
        timeout: float = 0.0,  # noqa: ASYNC109  # signature fixed by saq.Queue.dequeue
        poll_interval: float = 0.0,
    ) -> Job | None:
        if self._dispatcher is None:
            return await super().dequeue(timeout, poll_interval)
        return await self._dispatcher.get(timeout)

    async def listen_wakeups(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(earliest due)`` for every enqueue notification, until cancelled."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.wakeup_channel)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "message":
                    try:
                        due = float(message["data"])
                    except ValueError:
                        continue  # not ours; the wake-up is an optimisation anyway
                    callback(due)
        finally:
            await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]  # redis-py

    # -- state changes, batched ---------------------------------------------------------------

    def mark_active(self, job: Job) -> None:
        """Record that ``job`` started, without waiting: the next batch carries it, ahead of
        the job's finish (batches are applied in order)."""
        job.status = Status.ACTIVE
        self._batcher.submit_nowait(
            [("SET", job.id, self._text(job)), ("PUBLISH", job.id, job.status.value)]
        )

    def complete_nowait(self, job: Job, result: Any) -> None:
        """Finish ``job`` as COMPLETE with the next batch, without waiting for it."""
        self._set_finished(job, Status.COMPLETE, result=result, error=None)
        self._batcher.submit_nowait(self._finish_commands(job))

    async def flush(self) -> None:
        """Wait until every state change submitted so far is in Redis."""
        await self._batcher.drain()

    def _set_finished(self, job: Job, status: Status, *, result: Any, error: str | None) -> None:
        # Queue.finish minus its eager `job.info()` log line, which costs as much CPU as
        # the rest of the bookkeeping.
        job.status = status
        job.result = result
        job.error = error
        job.completed = now()
        if status == Status.COMPLETE:
            job.progress = 1.0
            self.complete += 1
        elif status == Status.FAILED:
            self.failed += 1
        elif status == Status.ABORTED:
            self.aborted += 1

    async def finish(
        self,
        job: Job,
        status: Status,
        *,
        result: Any = None,
        error: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._set_finished(job, status, result=result, error=error)
        await self._finish(job=job, status=status, result=result, error=error, **kwargs)

    async def _update(self, job: Job, status: Status | None = None, **kwargs: Any) -> None:
        if not status:
            stored = await self.job(job.key)
            status = stored.status if stored else None
        job.status = status or job.status
        await self._batcher.run(
            [("SET", job.id, self._text(job)), ("PUBLISH", job.id, job.status.value)]
        )

    async def _finish(
        self, job: Job, status: Status, *, result: Any = None, error: str | None = None
    ) -> None:
        await self._batcher.run(self._finish_commands(job))

    def _finish_commands(self, job: Job) -> list[Command]:
        payload = self._text(job)
        commands: list[Command] = [
            ("LREM", self._active, 1, job.id),
            ("HDEL", self._owners, job.id),
            ("ZREM", self._incomplete, job.id),
        ]
        if job.ttl > 0:
            commands.append(("SETEX", job.id, job.ttl, payload))
        elif job.ttl == 0:
            commands.append(("SET", job.id, payload))
        else:
            commands.append(("DEL", job.id))
        commands.append(("PUBLISH", job.id, job.status.value))
        return commands

    async def _retry(self, job: Job, error: str | None) -> None:
        # SAQ's version re-adds the job to `incomplete` with its old `scheduled` score while
        # also pushing it to `queued`; the next schedule pass sees a due score and pushes it
        # a second time, so a retried scheduled job ran twice. Score 0 = already queued.
        delay = job.next_retry_delay()
        commands: list[Command] = [
            ("LREM", self._active, 1, job.id),
            ("HDEL", self._owners, job.id),
            ("LREM", self._queued, 1, job.id),
        ]
        if delay:
            at = repr(time.time() + delay)
            commands += [
                ("ZADD", self._incomplete, at, job.id),
                ("PUBLISH", self.wakeup_channel, at),
            ]
        else:
            commands += [
                ("ZADD", self._incomplete, 0, job.id),
                ("RPUSH", self._queued, job.id),
                ("PUBLISH", self.wakeup_channel, "0"),
            ]
        commands += [("SET", job.id, self._text(job)), ("PUBLISH", job.id, job.status.value)]
        await self._batcher.run(commands)

    # -- sweeping -------------------------------------------------------------------------------

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        """SAQ's sweep without its race against live workers.

        SAQ sweeps every job in `active` whose status is not ACTIVE, to recover jobs whose
        worker died between taking and starting them. But a job that was claimed a moment
        ago is in `active` with status QUEUED too, until its start record lands (~1 ms;
        with SAQ's BLMOVE + GET + SET the same window exists). At 1,000 jobs/s a sweep would
        hit one or two live jobs each time, mark them aborted and block their key for the
        abort TTL. Here a QUEUED job is swept only if it is still QUEUED, and still in
        `active`, ``_CLAIM_GRACE`` seconds later.
        """
        if self._cleanup_script is None:
            self._cleanup_script = self.redis.register_script(_SWEEP_LUA)
        id_jobs = await self._cleanup_script(
            keys=[self._sweep, self._active], args=[lock], client=self.redis
        )
        swept: list[str] = []
        suspects: list[str] = []
        orphans: list[Job] = []
        for raw_id, payload in id_jobs:
            job_id = raw_id.decode()
            job = self.deserialize(payload)
            if job is None:
                await self._drop_missing(job_id)
                swept.append(job_id)
            elif job.status == Status.QUEUED:
                suspects.append(job_id)
            elif job.status != Status.ACTIVE or job.stuck:
                orphans.append(job)
                swept.append(job_id)
        # Each sweep waits up to `abort` seconds for a live worker to notice: wait for all
        # of them together, or N orphans of a dead worker take N x `abort` to recover
        # (seen in the chaos run: 4 jobs, one every 5 s).
        await asyncio.gather(*(self._sweep_job(job, abort) for job in orphans))
        if suspects:
            await asyncio.sleep(_CLAIM_GRACE)
            orphans = []
            for job_id, payload in zip(suspects, await self.redis.mget(suspects), strict=True):
                job = self.deserialize(payload)
                in_active = await self.redis.lpos(self._active, job_id) is not None
                if job is not None and job.status == Status.QUEUED and in_active:
                    orphans.append(job)
                    swept.append(job_id)
            await asyncio.gather(*(self._sweep_job(job, abort) for job in orphans))
        return swept

    async def _drop_missing(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(self._active, 0, job_id)
            pipe.hdel(self._owners, job_id)
            pipe.zrem(self._incomplete, job_id)
            await pipe.execute()
        log.info("swept_job_without_record", job_id=job_id)

    async def _sweep_job(self, job: Job, abort: float) -> None:
        # SAQ's treatment of a swept job: abort it, give a live worker `abort` seconds to
        # notice, then retry it (if its attempts allow) or finish it as aborted.
        log.info("job_sweeping", job_key=job.key, status=job.status.value)
        await self.abort(job, error=self.swept_error_message)
        try:
            await job.refresh(abort)
        except TimeoutError:
            log.info("swept_job_stop_timeout", job_key=job.key)
        if job.retryable:
            await self.retry(job, error=self.swept_error_message)
        else:
            await self.finish(job, Status.ABORTED, error=self.swept_error_message)

    # -- SAQ methods that call redis-py's deprecated `setex` ----------------------------------

    async def abort(self, job: Job, error: str, ttl: float = 5) -> None:
        # RedisQueue.abort with `set(..., px=)` for `setex`, deprecated in redis-py 8 (its
        # DeprecationWarning is an error under our pytest settings).
        async with self._op_sem:
            async with self.redis.pipeline(transaction=True) as pipe:
                job.status = Status.ABORTING
                job.error = error
                pipe.lrem(self._queued, 0, job.id)
                pipe.zrem(self._incomplete, job.id)
                pipe.hdel(self._owners, job.id)
                pipe.set(job.id, self.serialize(job))
                pipe.set(job.abort_id, error, px=max(1, int(ttl * 1000)))
                pipe.publish(job.id, job.status.value)
                dequeued, *_ = await pipe.execute()
            if dequeued:
                await self.finish(job, Status.ABORTED, error=error)
                await self.redis.delete(job.abort_id)
            else:
                await self.redis.lrem(self._active, 0, job.id)

    async def write_worker_info(self, worker_id: str, info: WorkerInfo, ttl: int) -> None:
        # RedisQueue.write_worker_info with `set(..., ex=)` for the deprecated `setex`.
        current = now()
        key = self.namespace(f"worker_info:{worker_id}")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, json.dumps(info), ex=ttl)
            pipe.zremrangebyscore(self._stats, 0, current)
            pipe.zadd(self._stats, {key: current + ttl * 1000})
            pipe.expire(self._stats, ttl)
            await pipe.execute()

    # -- jobs of workers that are gone -----------------------------------------------------------

    async def requeue_orphans(
        self, keys: Sequence[str], stalled: Collection[tuple[str, str]] = ()
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
        ids = [self.job_id(key) for key in keys]
        owners = await self.redis.hmget(self._owners, ids)
        owned = [
            (key, job_id, o.decode() if isinstance(o, bytes) else str(o))
            for key, job_id, o in zip(keys, ids, owners, strict=True)
            if o
        ]
        if not owned:
            return out
        workers = sorted({owner for _, _, owner in owned})
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker in workers:
                pipe.exists(self.namespace(f"worker_info:{worker}"))
            alive = dict(zip(workers, await pipe.execute(), strict=True))
        records = await self.redis.mget([job_id for _, job_id, _ in owned])
        previous = set(stalled)
        for (key, job_id, owner), payload in zip(owned, records, strict=True):
            job = self.deserialize(payload)
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
            moved = await self.redis.eval(
                _REQUEUE_ORPHAN_LUA,
                5,
                self._active,
                self._owners,
                self._queued,
                self._incomplete,
                job_id,
                owner,
                self._text(job),
                self.wakeup_channel,
            )
            if moved:
                out.requeued.append(key)
                log.warning("taken_job_requeued", job_key=key, worker_id=owner, why=why)
        return out

    # -- cheap inspection ----------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """queued / scheduled (not yet moved, overdue included) / active, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self._queued)
            pipe.llen(self._active)
            pipe.zcount(self._incomplete, 1, "+inf")
            queued, active, scheduled = await pipe.execute()
        return {"queued": int(queued), "scheduled": int(scheduled), "active": int(active)}

    async def pending(self, keys: Sequence[str]) -> list[bool]:
        """For each key: is its job incomplete (scheduled, queued or active)?"""
        if not keys:
            return []
        scores = await self.redis.zmscore(self._incomplete, [self.job_id(k) for k in keys])
        return [score is not None for score in scores]


# Apply a batch of commands atomically. ARGV[1] = JSON list of commands, each a list of
# strings/integers. One EVALSHA with one argument: redis-py's per-argument packing was the
# worker's largest CPU cost when each command word was an argument of its own, and a MULTI
# pipeline is worse still (a reply parsed per command, the connection released through a
# shielded task).
_APPLY_LUA = """
for _, command in ipairs(cjson.decode(ARGV[1])) do
    redis.call(unpack(command))
end
return 1
"""

Command = tuple[str | int, ...]


_Batch = list[tuple[list[Command], "asyncio.Future[None] | None"]]


class _Batcher:
    """Coalesces SAQ's small per-job state changes into few atomic script calls.

    Every job costs a start record and a finish (sometimes a retry), each a few commands.
    Sent one by one, their round trips dominate the worker's CPU: on the dev box a round
    trip is ~0.5 ms of CPU (a loopback ``send`` alone is ~0.25 ms, and under trio-asyncio
    every asyncio callback is a trio scheduler pass with an ``epoll`` syscall). So blocks
    are collected and sent together — by the worker's dispatcher inside its next claim
    (the *carrier*, no extra round trip at all), or by our own flusher when no dispatcher
    runs. Whoever sends holds :attr:`lock` until Redis answered and takes the pending blocks
    only once it holds it, so batches reach Redis in submission order (a job's finish never
    overtakes its start record) and each stays atomic (a script runs whole or not at all).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_APPLY_LUA)
        self._pending: _Batch = []
        self._flusher: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self._carrier: Callable[[], None] | None = None

    async def run(self, commands: list[Command]) -> None:
        """Apply ``commands`` with the next batch and wait for it.

        Never call this from the carrier itself: it would wait for its own next claim.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit(commands, future)
        await future

    def submit_nowait(self, commands: list[Command]) -> None:
        """Apply ``commands`` with the next batch; a failure is logged, not raised.

        No future, so no done-callback either: one event-loop callback less per job.
        """
        self._submit(commands, None)

    def _submit(self, commands: list[Command], future: asyncio.Future[None] | None) -> None:
        self._pending.append((commands, future))
        if len(self._pending) > 1:
            return  # already announced
        if self._carrier is not None:
            self._carrier()
        elif self._flusher is None:
            # The task's first step runs on the next loop turn, after every block submitted
            # in this one has joined the batch.
            self._flusher = asyncio.ensure_future(self._flush_all())

    def attach(self, carrier: Callable[[], None]) -> None:
        """Let ``carrier()`` be called when blocks are waiting; it must then :meth:`take`
        them (holding :attr:`lock`) and :meth:`settle` them, soon."""
        self._carrier = carrier

    def detach(self) -> None:
        """Back to flushing by ourselves (the carrier stopped)."""
        self._carrier = None
        if self._pending and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_all())

    def take(self) -> _Batch:
        """The pending blocks, to send now; call with :attr:`lock` held."""
        batch, self._pending = self._pending, []
        return batch

    @staticmethod
    def encode(batch: _Batch) -> str:
        return _JSON_ENCODER.encode(
            [command for commands, _ in batch for command in commands]
        ).decode()

    @staticmethod
    def settle(batch: _Batch, error: BaseException | None) -> None:
        """Resolve the batch's futures once Redis answered (or failed to)."""
        if error is not None and any(future is None for _, future in batch):
            log.warning("job_state_record_failed", error=redact(str(error)))
        for _, future in batch:
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)

    async def drain(self) -> None:
        """Wait until everything submitted so far has been sent and answered."""
        if self._pending and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_all())
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        async with self.lock:  # a batch the carrier has in flight
            pass

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                async with self.lock:
                    batch = self.take()
                    if not batch:
                        continue
                    try:
                        await self._script(keys=[], args=[self.encode(batch)])
                    except BaseException as err:
                        self.settle(batch, err)
                        if not isinstance(err, Exception):
                            raise
                    else:
                        self.settle(batch, None)
        finally:
            self._flusher = None


class _Dispatcher:
    """Claims due jobs for the worker's idle slots, waking at the next due score.

    Worker slots wait in :meth:`get`; :meth:`run` claims exactly as many jobs as there are
    waiting slots, so no job sits claimed but unstarted, and with a ``budget`` no more than
    it has room for (:class:`~eventsched.core.memory.PayloadBudget`: each job handed out
    holds bytes of it until :meth:`done`). It sleeps until the earliest score
    in `incomplete`, at most ``max_wait`` (a safety net for missed notifications, clock
    steps and enqueues by clients that don't publish), and wakes early when an enqueue
    announces an earlier job, or when a slot or budget frees up while `queued` has a backlog.
    """

    def __init__(
        self,
        queue: OnTimeQueue,
        *,
        max_wait: float,
        min_interval: float,
        claim_ahead: float,
        budget: PayloadBudget | None = None,
    ) -> None:
        self._queue = queue
        self._batcher = queue._batcher
        self._max_wait = max_wait
        self._min_interval = min_interval
        self._ahead = claim_ahead
        self._last_claim = -math.inf
        self._flush_timer: asyncio.TimerHandle | None = None
        self._getters: deque[asyncio.Future[Job | None]] = deque()
        self._wake = asyncio.Event()
        self._target = math.inf  # when the current sleep ends; +inf while claiming
        self._backlog = 0
        self._closed = False
        self._orphans: list[Job] = []
        self._budget = budget
        if budget is not None:
            budget.on_release(self._budget_freed)
            # While the budget is what limits, bytes come free a job at a time; claiming
            # each time would cost a Redis round trip per job. Wait for room for this many.
            self._claim_batch = max(1, budget.limit // budget.unknown // 8)

    def _demand(self) -> int:
        while self._getters and self._getters[0].done():
            self._getters.popleft()
        return sum(1 for g in self._getters if not g.done())

    def _limit(self) -> int:
        """Jobs to claim now: one per waiting slot, as many as the budget has room for."""
        demand = self._demand()
        if self._budget is None or not demand:
            return demand
        return min(demand, self._budget.room())

    def _worth_a_claim(self) -> bool:
        """Room for ``_claim_batch`` jobs, or for every waiting slot (O(1): a stale getter
        at worst costs one claim that takes less). What fits is still claimed every
        ``max_wait`` and at every due time."""
        if self._budget is None:
            return True
        room = self._budget.room()
        return room >= self._claim_batch or 0 < len(self._getters) <= room

    def _budget_freed(self) -> None:
        # Called as every job settles and ends.
        if self._backlog > 0 and self._getters and self._worth_a_claim():
            self._wake.set()

    def done(self, job: Job) -> None:
        """A job handed out has ended (any outcome): its budget bytes are free."""
        if self._budget is not None:
            self._budget.release(job.id)

    async def get(self, wait: float) -> Job | None:
        if self._closed:
            return None
        future: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._getters.append(future)
        if self._backlog > 0 and self._worth_a_claim():
            self._wake.set()
        delivered = False
        try:
            if wait > 0:
                job = await asyncio.wait_for(asyncio.shield(future), wait)
            else:
                job = await future
            delivered = True
            return job
        except TimeoutError:
            return None
        finally:
            if not future.done():
                future.cancel()
            elif not delivered and not future.cancelled() and future.result() is not None:
                # The slot timed out or was cancelled (shutdown) just as a job was handed
                # to it: give the job back rather than strand it in `active`.
                job = future.result()
                assert job is not None  # checked above
                self.done(job)
                if self._closed:
                    self._queue.release_nowait([job])
                else:
                    self._orphans.append(job)
                    self._wake.set()

    def wake_for(self, due: float) -> None:
        """Enqueue notification: wake if ``due`` is to be claimed before the current sleep
        ends."""
        if due - self._ahead < self._target:
            self._wake.set()

    def _hand_out(self, jobs: list[Job]) -> list[Job]:
        """Give each job to a waiting slot; return those no slot is left for."""
        left = deque(jobs)
        while left and self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                job = left.popleft()
                if self._budget is not None:
                    self._budget.reserve(job.id)
                getter.set_result(job)
        return list(left)

    def request_flush(self) -> None:
        """Batcher: state changes are waiting; carry them within ``min_interval``."""
        if self._flush_timer is None and not self._closed:
            self._flush_timer = asyncio.get_running_loop().call_later(
                self._min_interval, self._wake.set
            )

    async def run(self) -> None:
        self._batcher.attach(self.request_flush)
        try:
            await self._run()
        finally:
            self._batcher.detach()

    async def _claim(self) -> ClaimResult:
        async with self._batcher.lock:
            batch = self._batcher.take()
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            self._last_claim = time.time()
            try:
                result = await self._queue.claim(
                    self._limit(),
                    self._last_claim + self._ahead,
                    commands=self._batcher.encode(batch) if batch else "",
                )
            except BaseException as err:
                self._batcher.settle(batch, err)
                raise
            self._batcher.settle(batch, None)
            return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not self._closed:
            self._wake.clear()
            self._target = math.inf
            try:
                result = await self._claim()
            except _REDIS_ERRORS as err:
                log.warning("job_claim_failed", error=redact(str(err)), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:
                # A bug must not silently stop the worker from taking jobs.
                log.exception("job_claim_failed", retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            leftovers = self._hand_out(result.jobs) + self._orphans
            self._orphans = []
            if leftovers:
                # Not `release()`: that would wait for this loop's own next claim.
                self._queue.release_nowait(leftovers)
            self._backlog = result.backlog
            if result.moved >= self._queue.move_limit:
                continue  # more are due than one call moves
            if result.backlog and self._limit() and self._worth_a_claim():
                continue  # jobs wait in `queued` and slots (and budget) are free
            now = time.time()
            delay = self._max_wait
            if result.next_due is not None:
                # At most one claim per `min_interval`: under load, jobs due a moment apart
                # share a claim instead of each paying for a round trip.
                delay = min(
                    delay,
                    max(
                        result.next_due - self._ahead - now,
                        self._last_claim + self._min_interval - now,
                    ),
                )
            if delay <= 0 or self._wake.is_set():
                continue
            self._target = now + delay
            timer = loop.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    def close(self) -> None:
        """Stop claiming (after the claim in flight); idle slots get None; jobs handed to
        slots that vanished go back; state changes are flushed by the batcher itself."""
        self._closed = True
        self._wake.set()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
        self._batcher.detach()
        orphans, self._orphans = self._orphans, []
        if orphans:
            self._queue.release_nowait(orphans)


class OnTimeWorker(Worker[Context]):
    """A SAQ worker that starts each job at its due time, leaves signals alone and drains.

    * ``SIGNALS = []``: SAQ's ``start()`` would call ``loop.add_signal_handler`` for SIGINT
      and SIGTERM, which under trio-asyncio is ``signal.signal`` — replacing trio's handlers.
      The runtime owns signals and calls :meth:`stop_intake` / :meth:`stop` instead.
    * The schedule timer and the per-slot ``BLMOVE`` are replaced by one :class:`_Dispatcher`.
    * ``concurrency`` long-lived slot tasks run jobs one after another (SAQ starts a task per
      job plus one per function call); see :meth:`process` for why.
    * Upkeep loops (sweep, abort, worker info) are cancelled on stop instead of being waited
      for (SAQ's sleep in them would hold ``stop()`` for the whole grace period).

    ``max_wait`` is the dispatcher's longest sleep (s): the delay bound for a job nobody
    announced. ``min_interval`` is the shortest time between two claims (s): under load,
    jobs due a moment apart share one claim. ``claim_ahead`` (s): jobs are claimed this long
    before they are due and wait in their slot (never started early); it hides the claim's
    round trip and ``min_interval`` from the start time while the claim takes less.
    ``payload_budget``: jobs are handed to slots only while it has room (see
    :mod:`eventsched.core.memory`); a job's bytes are released when it ends.
    """

    SIGNALS: list[signal.Signals] = []  # noqa: RUF012  # saq.Worker declares it this way

    def __init__(
        self,
        queue: OnTimeQueue,
        functions: FunctionsType[Context],
        *,
        max_wait: float = 0.1,
        min_interval: float = 0.002,
        claim_ahead: float = 0.01,
        payload_budget: PayloadBudget | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(queue, functions, **kwargs)
        self.queue: OnTimeQueue = queue
        queue.owner = self.id
        self._dispatcher = _Dispatcher(
            queue,
            max_wait=max_wait,
            min_interval=min_interval,
            claim_ahead=claim_ahead,
            budget=payload_budget,
        )
        self._upkeep_tasks: list[asyncio.Task[None]] = []
        self._dispatcher_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._draining = False
        self._idle = asyncio.Event()

    async def upkeep(self) -> list[asyncio.Task[None]]:
        """Called by ``start()`` once: ping Redis, attach the dispatcher, start loops."""
        await self.queue.redis.ping()  # ready means ready: fail start-up if Redis is down
        if self.queue._dispatcher is not None:
            raise RuntimeError(f"queue {self.queue.name!r} already serves a worker")
        self.queue._dispatcher = self._dispatcher
        self._dispatcher_task = asyncio.ensure_future(self._dispatcher.run())
        loops: list[Awaitable[None]] = [
            self._listen_wakeups(),
            self._every(self.timers["abort"], lambda: self.abort(self.timers["abort"])),
            self._every(self.timers["sweep"], lambda: self.queue.sweep(self.timers["sweep"])),
            self._every(
                self.timers["worker_info"],
                lambda: self.worker_info(self.timers["worker_info"] + 1),
            ),
        ]
        if self.cron_jobs:
            loops.append(self._every(self.timers["schedule"], self.schedule))
        self._upkeep_tasks = [asyncio.ensure_future(loop) for loop in loops]
        self._ready.set()
        return [self._dispatcher_task, *self._upkeep_tasks]

    async def _every(self, interval: float, fn: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await fn()
            except Exception:
                log.exception("worker_upkeep_failed", queue=self.queue.name)
            await asyncio.sleep(interval)

    async def _listen_wakeups(self) -> None:
        while True:
            try:
                await self.queue.listen_wakeups(self._dispatcher.wake_for)
            except _REDIS_ERRORS as err:
                # Only latency suffers meanwhile: the dispatcher still wakes every max_wait.
                log.warning("enqueue_notifications_lost", error=redact(str(err)))
                await asyncio.sleep(1.0)

    async def wait_ready(self) -> None:
        """Return once ``start()`` is serving (Redis answered, slots waiting for jobs)."""
        await self._ready.wait()

    # -- slots -----------------------------------------------------------------------------

    def _process(self, previous_task: asyncio.Task[Any] | None = None) -> None:
        # SAQ's start() calls this `concurrency` times: each call starts one slot.
        if self._draining or self.event.is_set():
            return
        slot = asyncio.create_task(self._slot(), name="process")
        self.tasks.add(slot)
        slot.add_done_callback(self._slot_done)

    async def _slot(self) -> None:
        while not self._draining and not self.event.is_set():
            await self.process()

    def _slot_done(self, slot: asyncio.Task[Any]) -> None:
        self.tasks.discard(slot)
        if not self._draining and not self.event.is_set():
            # Not stopping, so something went wrong (Redis failed while recording a failure,
            # a stray cancellation): log it and keep the worker's capacity.
            err = None if slot.cancelled() else slot.exception()
            log.error("worker_slot_ended", error=repr(err))
            self._process()
        if not any(task.get_name() == "process" for task in self.tasks):
            self._idle.set()

    async def process(self) -> bool:
        """Run one job: SAQ's ``Worker.process`` outcomes at a fraction of its loop cost.

        SAQ wraps each job in a task of its own, a second task for the function, a
        ``wait_for(shield(...))`` and awaited status writes: ~25 event-loop callbacks per
        job, each a trio scheduler pass with an ``epoll`` syscall under trio-asyncio
        (~3 ms of CPU per job on the dev box). Here the function runs in the slot's task
        under ``asyncio.timeout``, and the start and a successful finish are recorded
        without waiting (they ride along with the dispatcher's next claim, in order); only
        failures wait. Outcomes are SAQ's: COMPLETE; FAILED on error or timeout (SAQ
        retries only if ``retries`` allows); ABORTED when SAQ's abort marks the job (see
        :meth:`abort`); re-queued when a hard stop cancels it.
        """
        job = await self.queue.dequeue()
        if job is None:
            return False
        task = asyncio.current_task()
        assert task is not None  # called from a slot task
        job.started = job.touched = now()
        job.attempts += 1
        job.worker_id = self.id
        self.queue.mark_active(job)
        context: Context = {**self.context, "job": job}
        task_ctx = JobTaskContext(task=task, aborted=None)
        self.job_task_contexts[job] = task_ctx
        try:
            await self._before_process(context)
            function = ensure_coroutine_function(self.functions[job.function], self.pool)
            async with asyncio.timeout(job.timeout or None):
                result = await function(context, **(job.kwargs or {}))
            if task_ctx["aborted"] is None:
                self.queue.complete_nowait(job, result)
        except PutBack as back:
            await self.queue.put_back(job, back.at)
        except asyncio.CancelledError:
            aborted = task_ctx["aborted"]
            if aborted is None:
                # Hard stop: give the job back (SAQ's `retry("cancelled")` re-queues it).
                await job.retry("cancelled")
                raise
            task.uncancel()  # this cancellation was the abort, handled here
            job.error = aborted
            await self.queue.finish_abort(job)
        except Exception as err:
            context["exception"] = err
            error = traceback.format_exc()
            log.warning("job_failed", job_key=job.key, function=job.function, error=repr(err))
            if job.retryable:
                await job.retry(error)
            else:
                await job.finish(Status.FAILED, error=error)
        finally:
            self._dispatcher.done(job)
            if self.job_task_contexts.get(job) is task_ctx:
                del self.job_task_contexts[job]
            try:
                await self._after_process(context)
            except Exception:
                log.exception("after_process_hook_failed", job_key=job.key)
        return True

    async def abort(self, abort_threshold: float) -> None:
        """Cancel running jobs that SAQ marked aborting (``queue.abort``).

        SAQ's version waits for the job's task to end, but a slot's task outlives its job;
        the slot finishes the job as ABORTED itself (:meth:`process`).
        """
        running = [
            job
            for job, ctx in self.job_task_contexts.items()
            if ctx["aborted"] is None and (job.duration("running") or 0) >= abort_threshold * 1000
        ]
        if not running:
            return
        for stored in await self.queue.jobs(job.key for job in running):
            if stored is None or stored.status not in (Status.ABORTING, Status.ABORTED):
                continue
            task_ctx = self.job_task_contexts.get(stored)
            # No await since the lookup above: the slot is still inside this very job.
            if task_ctx is not None and task_ctx["aborted"] is None:
                task_ctx["aborted"] = stored.error or "abort"
                task_ctx["task"].cancel()

    async def _before_process(self, ctx: Context) -> None:
        job = ctx.get("job")
        if job is not None:
            # Never early, whatever the mover's clock said: the due time is compared with
            # the clock of the process that runs (and records) the job.
            early = float(job.scheduled) - time.time()
            if early > 0:
                await asyncio.sleep(early)
        await super()._before_process(ctx)

    # -- stopping ----------------------------------------------------------------------------

    async def stop_intake(self) -> None:
        """Take no new jobs: idle slots end now; running jobs carry on."""
        self._draining = True
        self._dispatcher.close()
        if not any(task.get_name() == "process" for task in self.tasks):
            self._idle.set()

    async def wait_idle(self) -> None:
        """After :meth:`stop_intake`: return once every running job has finished."""
        await self._idle.wait()
        await self.queue.flush()

    async def stop(self) -> None:
        """Hard stop: running jobs get ``shutdown_grace_period_s`` (default 0), then are
        cancelled and re-queued (``retry("cancelled")``, as in SAQ)."""
        self._draining = True
        self._dispatcher.close()
        if self._dispatcher_task is not None:
            # Let it finish the claim in flight: cancelling it mid-call would leave us not
            # knowing whether the state changes it carried were applied.
            self.tasks.discard(self._dispatcher_task)
            await asyncio.wait([self._dispatcher_task], timeout=5.0)
            self._dispatcher_task.cancel()
            await asyncio.gather(self._dispatcher_task, return_exceptions=True)
        upkeep, self._upkeep_tasks = self._upkeep_tasks, []
        for task in upkeep:
            task.cancel()
            self.tasks.discard(task)
        await asyncio.gather(*upkeep, return_exceptions=True)
        await super().stop()
        await self.queue.flush()
        if self.queue._dispatcher is self._dispatcher:
            self.queue._dispatcher = None


def make_worker(
    queue: OnTimeQueue | JobQueue,
    functions: FunctionsType[Context],
    *,
    concurrency: int,
    **kwargs: Any,
) -> OnTimeWorker:
    """An :class:`OnTimeWorker` on ``queue``; ``kwargs`` go to it and to ``saq.Worker``.

    Functions are called as ``fn(ctx, **kwargs)``; pass ``(name, fn)`` tuples to choose the
    name jobs refer to. A worker runs once (SAQ shuts its thread pool down on stop).
    """
    aio_queue = queue.aio_queue if isinstance(queue, JobQueue) else queue
    return OnTimeWorker(aio_queue, functions, concurrency=concurrency, **kwargs)


def _dependency_error(err: BaseException) -> DependencyError:
    return DependencyError("redis", redact(str(err)) or type(err).__name__)


async def run_worker(
    worker: OnTimeWorker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``worker`` until it is stopped; for ``nursery.start`` (ready once it serves).

    Returns after :func:`drain_worker` (or ``worker.stop()``). Cancelling it is the hard
    stop: SAQ's ``start()`` then runs ``stop()`` — running jobs are cancelled and re-queued.
    Raises :class:`DependencyError` if Redis is unreachable at start.
    """

    async def start() -> None:
        try:
            await trio_asyncio.aio_as_trio(worker.start)()
        except _REDIS_ERRORS as err:
            raise _dependency_error(err) from err

    try:  # the usual start-up failure, raised plainly rather than inside a nursery's group
        await trio_asyncio.aio_as_trio(worker.queue.redis.ping)()
    except _REDIS_ERRORS as err:
        raise _dependency_error(err) from err
    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        await trio_asyncio.aio_as_trio(worker.wait_ready)()
        task_status.started()


async def drain_worker(worker: OnTimeWorker) -> None:
    """Graceful stop: no new jobs, wait for running ones, then stop (``run_worker`` returns).

    Bound it with the runtime's grace deadline; if that expires, cancel ``run_worker``.
    """
    await trio_asyncio.aio_as_trio(worker.stop_intake)()
    await trio_asyncio.aio_as_trio(worker.wait_idle)()
    await trio_asyncio.aio_as_trio(worker.stop)()


class JobQueue:
    """Trio-side adapter of one SAQ queue: connect, enqueue in batches, inspect.

    Build and use it inside ``trio_asyncio.open_loop()``. The Redis key namespace is the
    queue name (``saq:<name>:*``, ``saq:job:<name>:*``).
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        ttl: int = 60,
        connect_timeout: float = 5.0,
        op_timeout: float = 10.0,
        enqueue_chunk: int = 500,
    ) -> None:
        # No socket timeout: redis-py 8 defaults to 5 s, and then sends every command via
        # `wait_for` (an extra task) and reads under a timer — a third of the worker's
        # event-loop callbacks. Trio-side calls are bounded by `op_timeout` instead; dead
        # peers are noticed by TCP keepalive.
        redis = aioredis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=None,
            socket_keepalive=True,
        )
        self._queue = OnTimeQueue(redis, name, ttl=ttl, enqueue_chunk=enqueue_chunk)
        self._op_timeout = op_timeout
        self.name = name

    @property
    def aio_queue(self) -> OnTimeQueue:
        """The asyncio-side SAQ queue (for :func:`make_worker`)."""
        return self._queue

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            with trio.fail_after(self._op_timeout):
                result: T = await trio_asyncio.aio_as_trio(fn)(*args)
        except _REDIS_ERRORS as err:
            raise _dependency_error(err) from err
        except trio.TooSlowError as err:
            raise DependencyError("redis", f"no answer within {self._op_timeout} s") from err
        return result

    async def connect(self) -> None:
        """Bind to the running loop and check that Redis answers."""
        await self._call(self._queue.connect)
        await self.ping()

    async def close(self) -> None:
        """Close the connections (shielded, bounded); a failure is logged, not raised."""
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            try:
                await self._call(self._queue.disconnect)
            except DependencyError as err:
                log.warning("redis_close_failed", error=err.problem)

    async def ping(self) -> None:
        """Raise :class:`DependencyError` unless Redis answers."""
        await self._call(self._queue.redis.ping)

    async def enqueue_many(self, jobs: Sequence[ScheduledJob]) -> int:
        """Enqueue ``jobs``; return how many were new (pending keys are skipped)."""
        return await self._call(self._queue.enqueue_scheduled, jobs)

    async def counts(self) -> dict[str, int]:
        """``queued`` (due, waiting for a slot), ``scheduled`` (not moved yet: not due, or due
        this very moment), ``active`` (claimed or running)."""
        return await self._call(self._queue.counts)

    async def job_exists(self, key: str) -> bool:
        """Is the job with this key pending (scheduled, queued or active)?"""
        return (await self._call(self._queue.pending, [key]))[0]

    async def requeue_orphans(
        self, keys: Sequence[str], stalled: Collection[tuple[str, str]] = ()
    ) -> Orphans:
        """Put back the jobs of these keys that were taken and given up (see
        :meth:`OnTimeQueue.requeue_orphans`)."""
        return await self._call(self._queue.requeue_orphans, list(keys), stalled)

    async def pending_keys(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` whose jobs are pending (one round trip, for reconciling)."""
        flags = await self._call(self._queue.pending, list(keys))
        return {key for key, flag in zip(keys, flags, strict=True) if flag}

    # -- the epoch marker: did Redis lose its data? -------------------------------------------

    @property
    def marker_key(self) -> str:
        return self._queue.namespace("eventsched:epoch")

    async def get_marker(self) -> str | None:
        """The reconciler's marker (see :mod:`eventsched.plugins.reconciler`); None if absent:
        never set, or Redis lost its data since (FLUSHALL, a restart without persistence)."""
        value = await self._call(self._queue.redis.get, self.marker_key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set_marker(self, value: str, *, expect: str | None = None) -> bool:
        """Set the marker; with ``expect``, only if it still holds exactly that (else False:
        Redis lost it meanwhile, or someone else changed it)."""
        if expect is None:
            return bool(await self._call(self._queue.redis.set, self.marker_key, value))
        swapped = await self._call(
            self._queue.redis.eval,
            _MARKER_CAS_LUA,
            1,
            self.marker_key,
            expect,
            value,
        )
        return bool(swapped)
