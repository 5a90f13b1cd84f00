"""The trio-side adapter of one job queue: connect, enqueue in batches, inspect, the epoch marker.

:class:`JobQueue` wraps the asyncio-side store once with typed methods; every call is bounded
by ``op_timeout`` and a Redis failure becomes :class:`DependencyError`. Build and use it
inside ``trio_asyncio.open_loop()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import trio
import trio_asyncio
from redis import asyncio as aioredis
from saq.job import Status

from eventsched.core.jobqueue.edits import Removed, place_job, remove_jobs
from eventsched.core.jobqueue.jobs import Orphans, ScheduledJob
from eventsched.core.jobqueue.orphans import requeue_orphans
from eventsched.core.jobqueue.scripts import MARKER_CAS_LUA
from eventsched.core.jobqueue.store import REDIS_ERRORS, OnTimeQueue
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

log = get_logger(__name__)
T = TypeVar("T")


def dependency_error(err: BaseException, dependency: str = "redis") -> DependencyError:
    return DependencyError(dependency, redact(str(err)) or type(err).__name__)


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
        dependency: str = "redis",
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
        #: The name its errors and health checks go by (``redis[i]`` for a shard of several).
        self.dependency = dependency

    @property
    def aio_queue(self) -> OnTimeQueue:
        """The asyncio-side SAQ queue (for :func:`make_worker`)."""
        return self._queue

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            with trio.fail_after(self._op_timeout):
                result: T = await trio_asyncio.aio_as_trio(fn)(*args)
        except REDIS_ERRORS as err:
            raise dependency_error(err, self.dependency) from err
        except trio.TooSlowError as err:
            raise DependencyError(
                self.dependency, f"no answer within {self._op_timeout} s"
            ) from err
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

    async def remove_jobs(self, keys: Sequence[str]) -> Removed:
        """Remove the pending jobs of these keys that no worker has taken, atomically (see
        :func:`~eventsched.core.jobqueue.edits.remove_jobs`)."""
        return await self._call(remove_jobs, self._queue, list(keys))

    async def place_job(self, job: ScheduledJob) -> str:
        """Move the pending job ``job.key`` to ``job.scheduled``, or add it if it is not
        pending, atomically; a job a worker has taken is left alone (``taken``). See
        :func:`~eventsched.core.jobqueue.edits.place_job`."""
        return await self._call(place_job, self._queue, job)

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
        :func:`~eventsched.core.jobqueue.orphans.requeue_orphans`)."""
        return await self._call(requeue_orphans, self._queue, list(keys), stalled)

    async def live_active(self, keys: Sequence[str]) -> set[str]:
        """Of these job keys, those whose SAQ job is active on a worker still alive (its
        worker-info key, refreshed by the worker's upkeep loop, has not expired)."""
        if not keys:
            return set()
        queue = self._queue
        wanted = list(keys)

        async def check() -> set[str]:  # asyncio side
            jobs = await queue.jobs(wanted)
            active = [
                (key, job.worker_id)
                for key, job in zip(wanted, jobs, strict=True)
                if job is not None
                and job.status in (Status.ACTIVE, Status.ABORTING)
                and job.worker_id
            ]
            if not active:
                return set()
            async with queue.redis.pipeline(transaction=False) as pipe:
                for _, worker_id in active:
                    pipe.exists(queue.namespace(f"worker_info:{worker_id}"))
                alive = await pipe.execute()
            return {key for (key, _), up in zip(active, alive, strict=True) if up}

        return await self._call(check)

    async def pending_keys(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` whose jobs are pending (one round trip, for reconciling)."""
        flags = await self._call(self._queue.pending, list(keys))
        return {key for key, flag in zip(keys, flags, strict=True) if flag}

    # -- the epoch marker: did Redis lose its data? -------------------------------------------

    @property
    def marker_key(self) -> str:
        return self._queue.namespace("eventsched:epoch")

    async def get_marker(self) -> str | None:
        """The reconciler's marker (see :mod:`eventsched.plugins.executor.reconciler`); None
        if absent: never set, or Redis lost its data since (FLUSHALL, a restart without
        persistence)."""
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
            MARKER_CAS_LUA,
            1,
            self.marker_key,
            expect,
            value,
        )
        return bool(swapped)
