"""The on-time store: SAQ's RedisQueue with float-second scheduling, batch enqueue, a
lock-free mover and claim, and recovery of jobs taken but given up (asyncio side).

Invariants: a job key is enqueued at most once while incomplete; a moved job gets score 0,
outside every mover's ``[1, now]`` range, so no job is moved twice; state changes go through
the :class:`~eventsched.core.jobqueue.batcher.Batcher` in submission order. The store does
not know the dispatcher: a worker makes it hand out jobs from one (:meth:`serve_from`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from redis import asyncio as aioredis
from redis.exceptions import RedisError
from saq.job import ABORT_ID_PREFIX, Job, Status
from saq.queue.redis import RedisQueue
from saq.types import WorkerInfo
from saq.utils import now

from eventsched.core.jobqueue.batcher import Batcher, Command
from eventsched.core.jobqueue.jobs import (
    SIZE_META,
    JobClaim,
    ScheduledJob,
    job_dict,
    job_payload,
)
from eventsched.core.jobqueue.limits import Lane, LaneKeys, encode_lanes, event_of, release_commands
from eventsched.core.jobqueue.scripts import CLAIM_LUA, ENQUEUE_LUA, SWEEP_LUA
from eventsched.core.runtime.logs import get_logger

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = get_logger(__name__)

# Errors that mean "Redis or the network is the problem".
REDIS_ERRORS = (RedisError, OSError)

#: Hands out a claimed job to a worker slot (None: none within the wait), in place of SAQ's
#: per-slot ``BLMOVE``; a worker's dispatcher, see :meth:`OnTimeQueue.serve_from`.
JobSource = Callable[[float], Awaitable[Job | None]]

# Seconds a claimed job may stay QUEUED in `active` before the sweep believes its worker died.
_CLAIM_GRACE = 5.0

_JSON_ENCODER = msgspec.json.Encoder()
_JSON_DECODER = msgspec.json.Decoder()


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
        self.batcher = Batcher(redis)  # a worker's dispatcher carries its batches in claims
        self._job_source: JobSource | None = None
        # Lanes: per-type limits and priorities (limits.py); set_lanes() configures them.
        self.lane_keys = LaneKeys(self.namespace)
        self._lanes: dict[str, Lane] = {}
        self._lanes_arg = ""
        self._default_priority = 0
        # Job id -> (lane, held reason) of the jobs this process claimed from a lane.
        self._laned: dict[str, tuple[Lane, str]] = {}

    def set_lanes(self, lanes: Sequence[Lane], default_priority: int = 0) -> None:
        """Claim through these lanes (every process of a queue must be given the same).
        Jobs waiting in a lane are handed out by :meth:`claim` only (an OnTimeWorker's
        dispatcher), never by SAQ's own ``BLMOVE``."""
        self._lanes = {lane.name: lane for lane in lanes}
        self._lanes_arg = encode_lanes(lanes)
        self._default_priority = default_priority

    def forget_lanes_nowait(self, event_ids: Sequence[str]) -> None:
        """Drop the lane marks of events that are done (with the next batch)."""
        if event_ids:
            self.batcher.submit_nowait([("HDEL", self.lane_keys.lanes, *event_ids)])

    def held_reason(self, job_id: str) -> str:
        """Why a job this process claimed waited for its start: ``concurrency`` or
        ``rate`` (held by its lane's limit), '' (free to run as soon as it was due)."""
        laned = self._laned.get(job_id)
        return laned[1] if laned else ""

    async def disconnect(self) -> None:
        # SAQ's version PUNSUBSCRIBEs its job-update multiplexer even if it never started,
        # which opens a connection just to close it (and fails when Redis is down).
        if self._pubsub._daemon_task is not None:
            await self._pubsub.close()
        await self._pubsub.pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    def serialize(self, job: Job) -> bytes | str:
        return self._dump(job_dict(job))

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
            meta={} if job.size is None else {SIZE_META: job.size},
        )
        # SAQ annotates `scheduled` as int but stores any JSON number untouched; we need
        # the fraction (the due time in milliseconds and below).
        saq_job.scheduled = float(job.scheduled)  # type: ignore[assignment]
        return saq_job

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
                    self._dump(job_payload(job, self.name, self.ttl, queued_ms)),
                    job.scheduled,
                )
                for job in jobs
            ],
            {event_of(job.key): job.lane for job in jobs if job.lane},
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

    async def _enqueue_entries(
        self,
        entries: Sequence[tuple[str, str, str | bytes, float]],
        lanes: dict[str, str] | None = None,
    ) -> int:
        # Chunks of one script call each (a call blocks Redis while it runs), all chunks in
        # one pipeline (one round trip). The events' lanes go first: a claim between the
        # two sees a marked event with no job yet, never a job without its lane.
        if not entries:
            return 0
        if self._enqueue_many_script is None:
            self._enqueue_many_script = self.redis.register_script(ENQUEUE_LUA)
        now_arg = repr(time.time())
        async with self.redis.pipeline(transaction=False) as pipe:
            if lanes:
                pipe.hset(self.lane_keys.lanes, mapping=lanes)  # type: ignore[arg-type]  # redis-py's mapping type is invariant
            for start in range(0, len(entries), self._enqueue_chunk):
                keys: list[str] = [self._incomplete, self._queued, self.lane_keys.lanes]
                args: list[str | bytes] = [
                    now_arg, self.wakeup_channel, self.job_id(""), self.lane_keys.prefix,
                ]  # fmt: skip
                for job_id, abort_id, payload, scheduled in entries[
                    start : start + self._enqueue_chunk
                ]:
                    keys += (job_id, abort_id)
                    args += (payload, repr(float(scheduled)))
                await self._enqueue_many_script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return sum(int(r) for r in results[1 if lanes else 0 :])

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
    ) -> JobClaim:
        """Move jobs due at ``now`` to `queued`, then claim up to ``limit`` into `active`.

        ``commands``: encoded state changes (:meth:`Batcher.encode`) to apply first.
        """
        if self._claim_script is None:
            self._claim_script = self.redis.register_script(CLAIM_LUA)
        clock = time.time()
        at = clock if now is None else now
        (ids, payloads, next_due, backlog, moved, moved_list, lanes, held, wake) = (
            await self._claim_script(
                keys=[self._incomplete, self._queued, self._active, self._owners,
                      self.lane_keys.lanes],
                args=[
                    repr(at), self.move_limit, limit, self.wakeup_channel, int(moved_ids),
                    commands, self.owner, self._lanes_arg, repr(clock), self.job_id(""),
                    self.lane_keys.prefix, self._default_priority,
                ],
            )
        )  # fmt: skip
        jobs: list[Job] = []
        for job_id, payload, lane, reason in zip(ids, payloads, lanes, held, strict=True):
            job = self.deserialize(payload)
            if job is None:
                # Its record vanished; the sweep removes the orphan id from `active`.
                log.warning("claimed_job_without_record", job_id=job_id.decode())
                continue
            if lane and lane.decode() in self._lanes:
                self._laned[job.id] = (self._lanes[lane.decode()], reason.decode())
            jobs.append(job)
        return JobClaim(
            jobs=jobs,
            next_due=None if next_due is None else float(next_due),
            backlog=int(backlog),
            moved=int(moved),
            moved_ids=[job_id.decode() for job_id in moved_list],
            wake_at=None if wake is None else float(wake),
        )

    def _unlease(self, job: Job) -> list[Command]:
        """The commands that give back the lane lease of a job leaving `active`."""
        laned = self._laned.pop(job.id, None)
        lane = laned[0] if laned else None
        return release_commands(self.lane_keys, lane, job.id, self.wakeup_channel)

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
        await self.batcher.run(self._release_commands(jobs))

    def release_nowait(self, jobs: Iterable[Job]) -> None:
        """:meth:`release` with the next batch, without waiting (for the dispatcher)."""
        self.batcher.submit_nowait(self._release_commands(jobs))

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
        await self.batcher.run(
            [
                *self._unlease(job),
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
                *self._unlease(job),
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
        if self._job_source is None:
            return await super().dequeue(timeout, poll_interval)
        return await self._job_source(timeout)

    def serve_from(self, source: JobSource | None) -> None:
        """Hand out jobs from ``source`` (a worker's dispatcher) instead of SAQ's ``BLMOVE``;
        None goes back to SAQ's. One source at a time: one queue serves at most one worker."""
        if source is not None and self._job_source is not None:
            raise RuntimeError(f"queue {self.name!r} already serves a worker")
        self._job_source = source

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
        self.batcher.submit_nowait(
            [("SET", job.id, self._text(job)), ("PUBLISH", job.id, job.status.value)],
            key=job.id,  # complete_nowait() withdraws it while it waits
        )

    def complete_nowait(self, job: Job, result: Any) -> None:
        """Finish ``job`` as COMPLETE with the next batch, without waiting for it.

        If its start record has not left yet (a job shorter than the dispatcher's
        ``min_interval``: most of them), that record is emptied in place: the finish in the
        same atomic batch overwrites its text anyway, and a job serialization and two Redis
        commands per job are saved. Watchers of the job's channel then see ``complete``
        without ``active`` before it, as a poller between the two states would."""
        self.batcher.withdraw(job.id)
        self._set_finished(job, Status.COMPLETE, result=result, error=None)
        self.batcher.submit_nowait(self._finish_commands(job))

    async def flush(self) -> None:
        """Wait until every state change submitted so far is in Redis."""
        await self.batcher.drain()

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
        await self.batcher.run(
            [("SET", job.id, self._text(job)), ("PUBLISH", job.id, job.status.value)]
        )

    async def _finish(
        self, job: Job, status: Status, *, result: Any = None, error: str | None = None
    ) -> None:
        await self.batcher.run(self._finish_commands(job))

    def _finish_commands(self, job: Job) -> list[Command]:
        payload = self._text(job)
        commands: list[Command] = [
            *self._unlease(job),
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
            *self._unlease(job),
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
        await self.batcher.run(commands)

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
            self._cleanup_script = self.redis.register_script(SWEEP_LUA)
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

    # -- cheap inspection ----------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """queued / scheduled (not yet moved, overdue included) / active, in one round trip;
        with lanes set, also ``lanes``: due jobs waiting in them (for a slot, lease or token)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self._queued)
            pipe.llen(self._active)
            pipe.zcount(self._incomplete, 1, "+inf")
            for lane in self._lanes:
                pipe.zcard(self.lane_keys.ready(lane))
            queued, active, scheduled, *laned = await pipe.execute()
        counts = {"queued": int(queued), "scheduled": int(scheduled), "active": int(active)}
        if self._lanes:
            counts["lanes"] = sum(int(n) for n in laned)
        return counts

    async def pending(self, keys: Sequence[str]) -> list[bool]:
        """For each key: is its job incomplete (scheduled, queued or active)?"""
        if not keys:
            return []
        scores = await self.redis.zmscore(self._incomplete, [self.job_id(k) for k in keys])
        return [score is not None for score in scores]
