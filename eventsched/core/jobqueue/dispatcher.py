"""The worker's dispatcher: claims due jobs for idle slots at their due time (asyncio side).

Depends on the store (:class:`~eventsched.core.jobqueue.store.OnTimeQueue`, whose claim
script it runs and whose batched state changes it carries) and on the payload budget; the
store knows nothing of it: :class:`~eventsched.core.jobqueue.worker.OnTimeWorker` makes the
store hand out jobs from a dispatcher (:meth:`OnTimeQueue.serve_from`).
Invariants: it claims no more jobs than slots wait for (and the budget has room for), so no
job sits claimed but unstarted; a job handed to a slot that vanished goes back to `queued`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import TYPE_CHECKING

from saq.job import Job

from eventsched.core.jobqueue.jobs import JobClaim, size_hint
from eventsched.core.jobqueue.store import REDIS_ERRORS, OnTimeQueue
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

if TYPE_CHECKING:
    from eventsched.core.jobqueue.budget import PayloadBudget

log = get_logger(__name__)

#: The first claim after one that found nothing takes at most this many jobs; the next
#: claim, at once, takes what the slots wait for. A burst of jobs due at one instant would
#: otherwise start with one big claim: every slot's job handed out in the same loop pass,
#: and each job's own preparation (the executor's PostgreSQL claim) queued behind all of
#: theirs, so even the first job of the burst starts late. A few jobs go ahead instead.
OPENING_CLAIM = 8


def claim_size(demand: int, room: int | None, opening: bool) -> int:
    """Jobs to claim now: one per waiting slot (``demand``), no more than the payload budget
    has ``room`` for (None: no budget), and at most :data:`OPENING_CLAIM` when ``opening``
    (the last claim found nothing)."""
    size = demand if room is None else min(demand, room)
    return min(size, OPENING_CLAIM) if opening else size


class Dispatcher:
    """Claims due jobs for the worker's idle slots, waking at the next due score.

    Worker slots wait in :meth:`get`; :meth:`run` claims no more jobs than there are
    waiting slots, so no job sits claimed but unstarted (at most :data:`OPENING_CLAIM` in
    the first claim of a burst, the rest at once after it), and with a ``budget`` no more
    than it has room for (:class:`~eventsched.core.jobqueue.budget.PayloadBudget`: each job handed out
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
        self._batcher = queue.batcher
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
        self._opening = True  # the last claim found nothing: the next one is small
        self._budget = budget
        if budget is not None:
            budget.on_release(self._budget_freed)
            # While the budget is what limits, bytes come free a job at a time; claiming
            # each time would cost a Redis round trip per job. Wait for room for this many.
            self._claim_batch = max(1, budget.limit // budget.unknown // 8)
        # Bytes the budget reserves per job of the next claim, as in the last one that
        # brought jobs: their largest size hint (None: a job without one, the worst case).
        self._each: int | None = None

    def _demand(self) -> int:
        while self._getters and self._getters[0].done():
            self._getters.popleft()
        return sum(1 for g in self._getters if not g.done())

    def _limit(self) -> int:
        """Jobs to claim now (:func:`claim_size`)."""
        demand = self._demand()
        room = self._budget.room(self._each) if self._budget is not None and demand else None
        return claim_size(demand, room, self._opening)

    def _worth_a_claim(self) -> bool:
        """Room for ``_claim_batch`` jobs, or for every waiting slot (O(1): a stale getter
        at worst costs one claim that takes less). What fits is still claimed every
        ``max_wait`` and at every due time."""
        if self._budget is None:
            return True
        room = self._budget.room(self._each)
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
        """Give each job to a waiting slot, in order, while the budget has room for its
        size hint; return those no slot (or no room) is left for."""
        left = deque(jobs)
        while left and self._getters:
            getter = self._getters.popleft()
            if getter.done():
                continue
            job = left[0]
            if self._budget is not None:
                size = size_hint(job)
                if not self._budget.fits(size):  # the hints of the last claim were smaller
                    self._getters.appendleft(getter)
                    break
                self._budget.reserve(job.id, size)
            left.popleft()
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

    async def _claim(self) -> JobClaim:
        async with self._batcher.lock:
            batch = self._batcher.take()
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            self._last_claim = time.time()
            limit = self._limit()
            try:
                result = await self._queue.claim(
                    limit,
                    self._last_claim + self._ahead,
                    commands=self._batcher.encode(batch) if batch else "",
                )
            except BaseException as err:
                self._batcher.settle(batch, err)
                raise
            self._batcher.settle(batch, None)
            if self._budget is not None and result.jobs:
                hints = [size_hint(job) for job in result.jobs]
                self._each = None if None in hints else max(h for h in hints if h is not None)
            if limit:
                # Asked and got nothing: the queue ran dry, the next jobs open a burst.
                # (A claim that asked for none, every slot busy, says nothing about it.)
                self._opening = not result.jobs
            return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not self._closed:
            self._wake.clear()
            self._target = math.inf
            try:
                result = await self._claim()
            except REDIS_ERRORS as err:
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
            if result.wake_at is not None:
                # A lane is out of tokens (or of leases: a lease released sooner wakes us
                # through the wake-up channel): claim again when one is due.
                delay = min(delay, max(result.wake_at - now, 0.0))
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
