"""Shards: the job queue spread over several Redis servers, an event's jobs on one of them.

An event's jobs (every attempt's: keys ``<id>`` and ``<id>#<n>``) live on the shard
:func:`shard_of` its id picks: a jump consistent hash (Lamping and Veach, "A Fast, Minimal
Memory, Consistent Hash Algorithm", 2014) of the first 8 bytes, big-endian, of the id's
BLAKE2b digest (``digest_size=8``) of its UTF-8 bytes. Both steps are defined bit for bit,
so every process, host and Python version agrees (Python's ``hash()`` of a string is salted
per process); ``tests/unit/test_shards.py`` pins known values. A jump hash moves as few keys
as possible when a shard is added: going from ``n`` to ``n + 1`` shards, about ``1/(n+1)``
of the ids get a new home, all of them the new shard, and no id moves between old shards.

:class:`ShardedQueue` is the trio-side face of all shards with the :class:`JobQueue` calls
the roles use: an enqueue or an edit goes to the event's shard; a lookup by key
(:meth:`~ShardedQueue.pending_keys`, :meth:`~ShardedQueue.live_active`,
:meth:`~ShardedQueue.requeue_orphans`) asks every shard, so a job that still sits on the
shard an older shard list gave it is found too. Every process connects to every shard; an
executor *serves* (claims from) all of them or the subset ``executor.shards`` names.

Limits (:mod:`.limits`) are enforced by each shard's claim script with that shard's keys (a
Lua script touches only keys of the Redis it runs on), so a type's global limit is divided:
shard ``i`` of ``n`` gets :func:`lane_share` of it (concurrency ``c // n``, one more for the
first ``c % n`` shards; ``rate / n``; the burst split like the concurrency). The shares add up
to the limit, so the limit holds across all shards; the price is that a shard cannot borrow
an idle shard's share. Settings refuse a concurrency or burst smaller than the number of
shards (a shard would get none).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

import trio
from saq.job import Job

from eventsched.core.jobqueue.adapter import JobQueue
from eventsched.core.jobqueue.edits import Removed
from eventsched.core.jobqueue.jobs import Orphans, ScheduledJob
from eventsched.core.jobqueue.limits import Lane, event_of
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")

_JUMP_MULTIPLIER = 2862933555777941757
_MASK64 = (1 << 64) - 1


def id_hash(event_id: str) -> int:
    """The 64-bit key of an event id: BLAKE2b-64 of its UTF-8 bytes, big-endian."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash of a 64-bit ``key`` into ``buckets``."""
    if buckets < 1:
        raise ValueError("buckets must be positive")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_of(key: str, count: int) -> int:
    """The shard (0-based, of ``count``) of a job key's event (``<id>`` or ``<id>#<n>``)."""
    if count == 1:
        return 0
    return jump_hash(id_hash(event_of(key)), count)


def lane_share(lane: Lane, index: int, count: int) -> Lane:
    """Shard ``index``'s part of ``lane``'s limits (see the module docstring)."""
    if count == 1:
        return lane

    def split(total: int) -> int:
        return total // count + (1 if index < total % count else 0)

    return dataclasses.replace(
        lane,
        concurrency=split(lane.concurrency),
        rate=lane.rate / count,
        burst=split(lane.burst),
    )


class PartlyEnqueued(DependencyError):
    """Some shards took their jobs, others did not answer (raised as their error)."""

    def __init__(
        self, error: DependencyError, failed: list[int], added: int, left_out: int
    ) -> None:
        super().__init__(error.dependency, error.problem)
        self.error = error
        self.failed = failed  # positions of the shards that did not answer
        self.added = added  # new jobs on the shards that did
        self.left_out = left_out  # jobs meant for the failed shards


def shard_label(index: int, count: int) -> str:
    """The dependency name of a shard on /readyz and in errors: ``redis`` alone, else
    ``redis[i]``."""
    return "redis" if count == 1 else f"redis[{index}]"


class ShardedQueue:
    """The job queue on every shard (see the module docstring). Build and use it inside
    ``trio_asyncio.open_loop()``."""

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        *,
        connect_timeout: float = 5.0,
        op_timeout: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one shard")
        self.name = name
        self.shards: list[JobQueue] = [
            JobQueue(
                url,
                name,
                connect_timeout=connect_timeout,
                op_timeout=op_timeout,
                dependency=shard_label(i, len(urls)),
            )
            for i, url in enumerate(urls)
        ]

    @property
    def count(self) -> int:
        return len(self.shards)

    def _by_shard(self, keys: Sequence[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(shard_of(key, len(self.shards)), []).append(key)
        return groups

    # -- life cycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        for shard in self.shards:
            await shard.connect()

    async def close(self) -> None:
        for shard in self.shards:
            await shard.close()

    async def ping(self) -> None:
        """Raise :class:`DependencyError` (naming the shard) unless every shard answers."""
        for shard in self.shards:
            await shard.ping()

    # -- routed by event id -------------------------------------------------------------------

    async def enqueue_many(self, jobs: Sequence[ScheduledJob]) -> int:
        """Enqueue each job on its event's shard; return how many were new."""
        if len(self.shards) == 1:
            return await self.shards[0].enqueue_many(jobs)
        groups: dict[int, list[ScheduledJob]] = {}
        for job in jobs:
            groups.setdefault(shard_of(job.key, len(self.shards)), []).append(job)
        # The shards are asked in parallel (the time of one round trip, not one each). Every
        # shard that answers gets its jobs, even if another is down; then the failure is
        # raised (a caller retries the whole call: enqueueing is idempotent).
        added = 0
        failed: list[int] = []
        error: DependencyError | None = None
        left_out = 0

        async def enqueue(index: int, group: list[ScheduledJob]) -> None:
            nonlocal added, error, left_out
            try:
                new = await self.shards[index].enqueue_many(group)
            except DependencyError as err:
                failed.append(index)
                error = error or err
                left_out += len(group)
            else:
                added += new  # after the await: `added += await ...` would read it before

        async with trio.open_nursery() as nursery:
            for index, group in groups.items():
                nursery.start_soon(enqueue, index, group)
        if error is None:
            return added
        if len(failed) == len(groups):
            raise error
        raise PartlyEnqueued(error, failed, added, left_out)

    async def remove_jobs(self, keys: Sequence[str]) -> Removed:
        """Remove these pending, untaken jobs from their events' shards; a key found on
        none of them is looked for on the others (a job left there by an older shard list).
        Only the events' own shards must answer: a copy on a silent other shard is left to
        the claim, whose compare-and-set in PostgreSQL refuses what was cancelled."""
        result = Removed()
        if not keys:
            return result
        for index, group in self._by_shard(keys).items():
            done = await self.shards[index].remove_jobs(group)
            result.removed += done.removed
            result.taken += done.taken
            rest = [k for k in group if k not in {*done.removed, *done.taken}]
            for other in range(len(self.shards)):
                if rest and other != index:
                    more = await self._elsewhere(other, rest)
                    result.removed += more.removed
                    result.taken += more.taken
                    rest = [k for k in rest if k not in {*more.removed, *more.taken}]
        return result

    async def place_job(self, job: ScheduledJob) -> str:
        """Have ``job`` pending on its event's shard at ``job.scheduled`` (see
        :meth:`JobQueue.place_job`); a pending copy on another shard (an older shard list)
        is removed first, or, if a worker has taken it there, left alone (``taken``). A copy
        on a silent other shard stays: its claim finds the new due time in PostgreSQL and
        puts it back until then, or runs the event once with this one."""
        home = shard_of(job.key, len(self.shards))
        for index in range(len(self.shards)):
            if index != home and (await self._elsewhere(index, [job.key])).taken:
                return "taken"
        return await self.shards[home].place_job(job)

    async def _elsewhere(self, index: int, keys: list[str]) -> Removed:
        """Remove copies of ``keys`` from a shard that is not their home; nothing (logged)
        if that shard does not answer."""
        try:
            return await self.shards[index].remove_jobs(keys)
        except DependencyError as err:
            log.warning("shard_unreachable", shard=index, error=err.problem)
            return Removed()

    # -- asked of every shard -----------------------------------------------------------------
    #
    # The reconciler's questions. With several shards a shard that does not answer is left
    # out (logged) rather than failing the whole answer, so the other shards are still
    # repaired: each answer says what it assumes of the silent shard. If no shard answers
    # (or there is only one), the error is raised as from a JobQueue.

    async def _each(self, ask: Callable[[JobQueue], Awaitable[T]]) -> list[T | None]:
        """``ask`` every shard in turn; None for a shard that failed (see above)."""
        answers: list[T | None] = []
        first: DependencyError | None = None
        for index, shard in enumerate(self.shards):
            try:
                answers.append(await ask(shard))
            except DependencyError as err:
                if len(self.shards) == 1:
                    raise
                first = first or err
                log.warning("shard_unreachable", shard=index, error=err.problem)
                answers.append(None)
        if first is not None and all(a is None for a in answers):
            raise first
        return answers

    def _homed_on(self, keys: Sequence[str], answers: Sequence[object | None]) -> set[str]:
        """Of ``keys``, those whose event's shard did not answer."""
        silent = {i for i, a in enumerate(answers) if a is None}
        return {k for k in keys if shard_of(k, len(self.shards)) in silent} if silent else set()

    async def pending_keys(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` whose jobs are pending on any shard. Keys whose own shard
        does not answer are counted as pending: they cannot be enqueued there now anyway."""
        wanted = list(keys)
        answers = await self._each(lambda shard: shard.pending_keys(wanted))
        found = set().union(*(a for a in answers if a is not None))
        return found | self._homed_on(wanted, answers)

    async def job_exists(self, key: str) -> bool:
        return bool(await self.pending_keys([key]))

    async def live_active(self, keys: Sequence[str]) -> set[str]:
        """Of these job keys, those active on a live worker, on any shard. Keys whose own
        shard does not answer are counted as live: what cannot be seen is not taken over."""
        wanted = list(keys)
        answers = await self._each(lambda shard: shard.live_active(wanted))
        live = set().union(*(a for a in answers if a is not None))
        return live | self._homed_on(wanted, answers)

    async def requeue_orphans(
        self, keys: Sequence[str], stalled: Collection[tuple[str, str]] = ()
    ) -> Orphans:
        """:meth:`JobQueue.requeue_orphans` on every shard that answers (the ``stalled`` of
        one answer, passed to the next call, holds job ids, which name their shard's queue
        alike)."""
        wanted = list(keys)
        result = Orphans()
        for done in await self._each(lambda shard: shard.requeue_orphans(wanted, stalled)):
            if done is not None:
                result.requeued += done.requeued
                result.stalled |= done.stalled
        return result

    async def enqueue_reachable(self, jobs: Sequence[ScheduledJob]) -> int:
        """:meth:`enqueue_many`, leaving out (logged) the jobs of a shard that does not
        answer, when others did: the reconciler enqueues them on a later pass."""
        try:
            return await self.enqueue_many(jobs)
        except PartlyEnqueued as err:
            log.warning("shard_unreachable", shards=err.failed, error=err.error.problem,
                        left_out=err.left_out)  # fmt: skip
            return err.added

    async def counts(self) -> dict[str, int]:
        """The sum of every shard's :meth:`JobQueue.counts`."""
        return sum_counts([await shard.counts() for shard in self.shards])

    async def shard_counts(self) -> list[dict[str, int] | DependencyError]:
        """Each shard's counts, or the error that shard answered with."""
        result: list[dict[str, int] | DependencyError] = []
        for shard in self.shards:
            try:
                result.append(await shard.counts())
            except DependencyError as err:
                result.append(err)
        return result

    # -- asyncio side (the executor's job functions) -------------------------------------------

    async def aio_enqueue(self, jobs: Sequence[ScheduledJob]) -> int:
        """:meth:`enqueue_many`, called on the asyncio side (Redis errors raise as such)."""
        groups: dict[int, list[ScheduledJob]] = {}
        for job in jobs:
            groups.setdefault(shard_of(job.key, len(self.shards)), []).append(job)
        added = await asyncio.gather(
            *(self.shards[i].aio_queue.enqueue_scheduled(g) for i, g in groups.items())
        )
        return sum(added)

    def forget_lanes_nowait(self, event_ids: Sequence[str]) -> None:
        """Drop the lane marks of events that are done, each on its shard."""
        for index, group in self._by_shard(event_ids).items():
            self.shards[index].aio_queue.forget_lanes_nowait(group)

    def held_reason(self, job: Job) -> str:
        """Why a job this process claimed waited (see ``OnTimeQueue.held_reason``)."""
        for shard in self.shards:
            if job.queue is shard.aio_queue:
                return shard.aio_queue.held_reason(job.id)
        return ""


def sum_counts(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for state, n in one.items():
            total[state] = total.get(state, 0) + n
    return total


def each_lane_share(lanes: Sequence[Lane], index: int, count: int) -> list[Lane]:
    """Shard ``index``'s share of every lane."""
    return [lane_share(lane, index, count) for lane in lanes]
