"""The reconciler: PostgreSQL says which jobs should exist; put back the ones Redis lost.

Runs inside the executor role, one leader at a time across all executor processes. Every
``reconciler.interval`` the leader:

* ``overdue``: events ``scheduled`` and due more than ``reconciler.grace`` ago whose SAQ job
  (key = event id) is not pending -> enqueue it again;
* ``retry_overdue``: events ``retrying`` whose next attempt was due more than ``grace`` ago and
  whose job (key ``<id>#<n>``) is not pending -> enqueue it again;
* ``taken_by_lost_worker``: the job of such an event is pending, but taken (claimed ahead of
  its due time, or started) by a worker whose SAQ worker-info key has expired, the test of
  the stale-running path, or taken and still not started on two passes in a row (the claim's
  answer was lost with its connection) -> the job goes back to ``queued``;
* ``stale_running``: events ``running`` whose lease expired: no heartbeat for
  ``reconciler.stale_after`` (the executor renews ``updated_at`` of the attempts it holds
  every ``stale_after / 8``), seen so by this leader, unrenewed, for ``TAKEOVER_MARGIN`` x
  ``stale_after`` more, and whose SAQ job is not active on a live worker (SAQ's worker-info
  key of the job's worker has expired, or the job is not active at all) -> CAS ``running ->
  retrying`` on the ``updated_at`` it saw (the lost attempt's row gets outcome ``retried``,
  error "worker lost") and enqueue the next attempt, or ``dead`` if that was the last
  attempt. The executor stops a handler whose lease it could not renew for ``stale_after /
  2``, so the handler has stopped before this can happen (see :mod:`eventsched.plugins.executor.lease`);
* republishes dead events whose DLQ message was not acknowledged (a crash between the dead
  transition and the publish) after ``grace``.

Redis losing its data (FLUSHALL, a restart without persistence) is also noticed at once:
the leader keeps a marker key in the queue's namespace (``saq:<queue>:eventsched:epoch``).
When a marker it has seen is gone, Redis lost everything since the last pass, so the leader
enqueues every ``scheduled`` and ``retrying`` event again (``restore``, metric reason
``redis_lost``), soonest due first, up to ``MAX_PAGES`` pages a pass, before anything
else; jobs due later than that pass run on time instead of ``grace`` late. The marker reads
``restoring:<token>`` until the restore completes (compare-and-set), so a loss during the
restore, or a new leader finding one half done, starts it over. A loss while no reconciler
runs (or before a new leader's first pass) cannot be told from a first start: the paths
below then repair it, ``grace`` after each job's due time.

With several shards (:mod:`eventsched.core.jobqueue.shards`) every shard has its own marker,
and a shard that lost its data is restored alone: the leader walks the same candidates and
enqueues only the events whose jobs live on that shard (by the id hash), so the other shards'
jobs are neither touched nor delayed. The other paths ask every shard whether a job is
pending (a job left on the shard an older shard list gave it counts too). A shard that
cannot be reached is left out (logged): its marker is checked on a later pass, and the
events whose jobs live there wait for it, while the other shards are repaired as usual
(:class:`~eventsched.core.jobqueue.shards.ShardedQueue` says what each answer assumes).

This covers Redis losing data (FLUSHALL, a restart without persistence), enqueues lost
between PostgreSQL and Redis (consumer or executor crash), and workers killed mid-job. Every
re-enqueue uses the executor's key scheme, so a job that does exist is never doubled, and
whatever slips through (a race with a job finishing right now) is a duplicate delivery that
the claim CAS turns into ``skipped_duplicate``.

Leader election: a session-level PostgreSQL advisory lock held on a dedicated connection.
The lock lives exactly as long as the leader's session: a crashed or partitioned leader's
lock goes with its connection (TCP keepalives bound how long a half-open one lingers), there
is no lease to renew and no clock to trust, and the reconciler's work needs PostgreSQL
anyway — a leader that cannot reach PostgreSQL could not reconcile either. A Redis lease
would vanish with the very FLUSHALL the reconciler must repair, and a pause longer than its
TTL makes two leaders. Leadership only saves duplicate work: every step above is safe to run
twice.

The leader also refreshes the ``eventsched_events{status}``, ``eventsched_queue_jobs{state}``
(summed over the shards; per shard ``eventsched_queue_shard_jobs{shard,state}`` and
``eventsched_queue_shard_up{shard}``) and ``eventsched_oldest_overdue_seconds`` gauges every ``reconciler.gauge_interval`` (other
processes clear theirs, or show 0, so a dashboard sums or maxes without double counting).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final, Protocol, TypeVar

import trio

from eventsched.core.domain.event import STATUSES
from eventsched.core.domain.jobcontract import FIRST_ATTEMPT
from eventsched.core.jobqueue import ScheduledJob, ShardedQueue, shard_of
from eventsched.core.runtime import metrics
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import Settings, require_postgres
from eventsched.core.store import events, recovery
from eventsched.core.store.executions import DeadEvent
from eventsched.core.store.leader import LeaderLock, lock_key
from eventsched.core.store.pool import Database
from eventsched.core.store.recovery import Candidate, Cursor

log = get_logger(__name__)
T = TypeVar("T")

#: Pages of ``reconciler.batch`` rows one pass looks at per reason, at most.
MAX_PAGES: Final = 50
#: A stale attempt is taken over only after this leader has seen its lease expired, and not
#: renewed, for this fraction of ``stale_after`` (on top of ``stale_after`` itself).
TAKEOVER_MARGIN: Final = 0.5
#: Marker values (see the module docstring).
MARKER_OK: Final = "ok"
MARKER_RESTORING: Final = "restoring:"
#: What a restore walks through, in order.
RESTORE_REASONS: Final = ("restore_scheduled", "restore_retrying")


def _first_attempt(c: Candidate) -> int:
    return FIRST_ATTEMPT


def _next_attempt(c: Candidate) -> int:
    return c.attempts + 1


#: The attempt whose job each re-enqueuing reason puts back.
ATTEMPT_OF: Final[dict[str, Callable[[Candidate], int]]] = {
    "overdue": _first_attempt,
    "restore_scheduled": _first_attempt,
    "retry_overdue": _next_attempt,
    "restore_retrying": _next_attempt,
}
# (event id, attempt, due time, event type, traceparent, partition day, payload size; each
# of the last four may be None) -> its job
JobFor = Callable[[str, int, float, str | None, str | None, date | None, int | None], ScheduledJob]


class DeadLetterSink(Protocol):
    """Where dead events go (the executor's DeadLetters)."""

    def submit_nowait(self, event_id: str) -> None: ...

    async def republish(self, dead: list[DeadEvent]) -> int: ...


@dataclass
class _Paged:
    """What one walk through pages of candidates did."""

    total: int = 0  # what ``handle`` returned, summed
    pages: int = 0
    resume: Cursor | None = None  # where the next page starts; None: the last page was read


@dataclass
class _Restore:
    """A restore in progress: what is left to walk through, and where."""

    marker: str  # the marker value while it runs
    reasons: list[str] = field(default_factory=lambda: list(RESTORE_REASONS))
    cursor: Cursor = field(default_factory=Cursor)
    restored: int = 0


class Reconciler:
    """See the module docstring; ``run`` until cancelled."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        jobs: ShardedQueue,
        dead_letters: DeadLetterSink,
        job_for: JobFor,  # the executor's job builder: same keys, kwargs and timeout
    ) -> None:
        r = settings.reconciler
        self._db = db
        self._jobs = jobs
        self._dead_letters = dead_letters
        self._job_for = job_for
        self._interval = float(r.interval)
        self._gauge_interval = float(r.gauge_interval)
        self._grace = float(r.grace)
        self._stale_after = float(r.stale_after)
        self._margin = TAKEOVER_MARGIN * self._stale_after
        # (event id, attempt) -> (updated_at, when this leader first saw it stale with it).
        self._stale_since: dict[tuple[str, int], tuple[Any, float]] = {}
        # (job id, owner) of taken, unstarted jobs of overdue events seen by the last pass.
        self._stalled: set[tuple[str, str]] = set()
        self._stalled_next: set[tuple[str, str]] = set()
        self._seen_stale: dict[tuple[str, int], tuple[Any, float]] = {}
        self._batch = r.batch
        self._max_attempts = settings.executor.max_retries
        self.lock = LeaderLock(
            require_postgres(settings),
            lock_key(settings.redis.queue),
            connect_timeout=float(settings.postgres.connect_timeout),
        )
        self.passes = 0
        # Per shard (position in the shard list): this process has seen the epoch marker
        # there; a restore of that shard in progress.
        self._seen_marker: dict[int, bool] = {}
        self._restores: dict[int, _Restore] = {}

    # -- leadership loop -----------------------------------------------------------------------

    async def run(self) -> None:
        next_pass = next_gauges = trio.current_time()
        leading = False
        try:
            while True:
                was_leading = leading
                leading = await self.lock.campaign(leading)
                if leading != was_leading:
                    log.info("reconciler_leader" if leading else "reconciler_follower",
                             lock_key=self.lock.key)  # fmt: skip
                    if not leading:
                        metrics.EVENTS_BY_STATUS.clear()
                        metrics.QUEUE_JOBS.clear()
                        metrics.QUEUE_SHARD_JOBS.clear()
                        metrics.QUEUE_SHARD_UP.clear()
                        metrics.OLDEST_OVERDUE.set(0)
                now = trio.current_time()
                if not leading:
                    await trio.sleep(self._interval)
                    continue
                if now >= next_pass:
                    await self._safely("reconcile", self.reconcile_once)
                    next_pass = trio.current_time() + self._interval
                if now >= next_gauges:
                    await self._safely("gauges", self.refresh_gauges)
                    next_gauges = trio.current_time() + self._gauge_interval
                await trio.sleep_until(min(next_pass, next_gauges))
        finally:
            await self.lock.release()

    async def _safely(self, what: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except DependencyError as err:
            log.warning("reconciler_pass_failed", step=what, error=str(err))

    # -- one pass --------------------------------------------------------------------------------

    async def reconcile_once(self) -> dict[str, int]:
        """One pass over every reason; returns how many events each one re-enqueued
        (``dlq_republished``: dead events published again)."""
        redis_lost = await self._restore_if_lost()
        self._stalled_next = set()
        try:
            overdue = await self._requeue("overdue", self._grace)
            retry_overdue = await self._requeue("retry_overdue", self._grace)
        finally:
            self._stalled, self._stalled_next = self._stalled_next, set()
        done = {
            "redis_lost": redis_lost,
            "overdue": overdue,
            "retry_overdue": retry_overdue,
            "stale_running": await self._take_over_stale(),
            "dlq_republished": await self._republish_dead(),
        }
        self.passes += 1
        if any(done.values()):
            log.info("reconciler_pass", **done)
        return done

    async def _each_page(
        self,
        reason: str,
        age: float,
        handle: Callable[[list[Candidate]], Awaitable[int]],
        *,
        after: Cursor | None = None,
        max_pages: int = MAX_PAGES,
    ) -> _Paged:
        """Run ``handle`` on every page of candidates after ``after`` (keyset paging, oldest
        first), at most ``max_pages`` pages."""
        paged = _Paged()
        cursor = after or Cursor()
        while paged.pages < max_pages:
            page = await recovery.candidates(
                self._db, reason, age=age, limit=self._batch, after=cursor
            )
            paged.pages += 1
            if page:
                paged.total += await handle(page)
            if len(page) < self._batch:
                return paged  # the last page: nothing to resume
            cursor = Cursor(page[-1].at, page[-1].event_id)
        paged.resume = cursor
        return paged

    async def _requeue(self, reason: str, age: float) -> int:
        handle = functools.partial(self._requeue_page, reason, reason)
        return (await self._each_page(reason, age, handle)).total

    async def _requeue_page(
        self, reason: str, label: str, page: list[Candidate], *, shard: int | None = None
    ) -> int:
        """Enqueue the jobs of ``page`` that are not pending and whose event is still in
        the state ``reason`` found it in; returns how many were added. With ``shard``, only
        the events whose jobs live on that shard (a restore of that shard)."""
        if shard is not None:
            page = [c for c in page if shard_of(c.event_id, self._jobs.count) == shard]
            if not page:
                return 0
        attempt_of = ATTEMPT_OF[reason]
        jobs = [
            self._job_for(
                c.event_id, attempt_of(c), c.at.timestamp(), c.type, c.traceparent, c.day, c.size
            )
            for c in page
        ]
        pending = await self._jobs.pending_keys([job.key for job in jobs])
        if pending and reason in ("overdue", "retry_overdue"):
            # Pending, but maybe taken (ahead of its due time) by a worker that died before
            # its claim reached PostgreSQL, or taken by a claim whose answer was lost: give
            # such jobs back.
            orphans = await self._jobs.requeue_orphans(sorted(pending), self._stalled)
            self._stalled_next |= orphans.stalled
            if orphans.requeued:
                metrics.RECONCILER_REQUEUED.labels("taken_by_lost_worker").inc(
                    len(orphans.requeued)
                )
        missing = [(c, job) for c, job in zip(page, jobs, strict=True) if job.key not in pending]
        if missing:
            still = await recovery.still_waiting(self._db, reason, [c for c, _ in missing])
            missing = [(c, job) for c, job in missing if c.event_id in still]
        added = await self._jobs.enqueue_reachable([job for _, job in missing]) if missing else 0
        if added:
            metrics.RECONCILER_REQUEUED.labels(label).inc(added)
        return added

    # -- Redis lost its data: restore every pending job ------------------------------------------

    async def _restore_if_lost(self) -> int:
        """Check every shard's epoch marker; restore (part of) a shard that lost its data."""
        added = 0
        for index in range(self._jobs.count):
            try:
                added += await self._restore_shard_if_lost(index)
            except DependencyError as err:
                # The others are checked (and restored) all the same.
                log.warning("reconciler_pass_failed", step="restore", shard=index,
                            error=str(err))  # fmt: skip
        return added

    async def _restore_shard_if_lost(self, index: int) -> int:
        """Check one shard's epoch marker; restore (part of) it if it lost its data: the
        scheduled and retrying events whose jobs live there, soonest first."""
        shard = self._jobs.shards[index]
        where = {"queue": self._jobs.name, "shard": index}
        marker = await shard.get_marker()
        restore = self._restores.get(index)
        if restore is not None and marker != restore.marker:
            restore = None  # lost again during the restore: start over
            self._seen_marker[index] = True
        if restore is None:
            if marker is None and not self._seen_marker.get(index):
                # Never seen: a first start (or a loss before this leader's first pass).
                await shard.set_marker(MARKER_OK)
                self._seen_marker[index] = True
                return 0
            if marker is not None and not marker.startswith(MARKER_RESTORING):
                self._seen_marker[index] = True
                return 0
            # Gone since we saw it, or a restore that another leader left half done.
            restore = _Restore(f"{MARKER_RESTORING}{secrets.token_hex(8)}")
            await shard.set_marker(restore.marker)
            log.warning(
                "redis_data_lost",
                **where,
                note="enqueuing every scheduled and retrying event of the shard again,"
                " soonest first",
            )
        self._restores[index] = restore
        added = 0
        pages = 0
        while restore.reasons and pages < MAX_PAGES:
            reason = restore.reasons[0]
            paged = await self._each_page(
                reason,
                0.0,
                functools.partial(self._requeue_page, reason, "redis_lost", shard=index),
                after=restore.cursor,
                max_pages=MAX_PAGES - pages,
            )
            pages += paged.pages
            added += paged.total
            restore.restored += paged.total
            if paged.resume is None:
                restore.reasons.pop(0)
                restore.cursor = Cursor()
            else:
                restore.cursor = paged.resume
        if not restore.reasons:
            del self._restores[index]
            if await shard.set_marker(MARKER_OK, expect=restore.marker):
                log.info("redis_restore_done", **where, enqueued=restore.restored)
            else:
                log.warning("redis_data_lost_during_restore", **where)
        return added

    async def _take_over_stale(self) -> int:
        self._seen_stale = {}
        try:
            paged = await self._each_page("stale_running", self._stale_after, self._take_over_page)
        finally:
            # Forget attempts not seen stale in this pass (renewed, finished, taken over).
            self._stale_since, self._seen_stale = self._seen_stale, {}
        return paged.total

    def _expired_long_enough(self, c: Candidate) -> bool:
        """Has this leader seen the attempt's lease expired, unrenewed (same ``updated_at``),
        for ``TAKEOVER_MARGIN`` x ``stale_after``? Measured on this process's clock, while it
        could read PostgreSQL: after an outage every lease looks expired, and the executors
        get this long to renew theirs (or write their outcomes) first."""
        now = trio.current_time()
        key = (c.event_id, c.attempts)
        seen = self._stale_since.get(key)
        if seen is None or seen[0] != c.at:
            seen = (c.at, now)
        self._seen_stale[key] = seen
        return now - seen[1] >= self._margin

    async def _take_over_page(self, page: list[Candidate]) -> int:
        page = [c for c in page if self._expired_long_enough(c)]
        if not page:
            return 0
        keys = [
            self._job_for(c.event_id, c.attempts, 0.0, None, None, None, None).key for c in page
        ]
        found = {c.event_id: c for c in page}
        live = await self.live_jobs(keys)
        stale: list[Candidate] = []
        for c, key in zip(page, keys, strict=True):
            if key in live:
                # No heartbeat, yet its worker is alive and still on it (PostgreSQL trouble
                # on that worker?): its lease keeps the handler from running on, but wait for
                # the job to end there rather than run the next attempt beside it.
                log.info("stale_running_still_active", event_id=c.event_id, attempt=c.attempts)
            else:
                stale.append(c)
        taken = await recovery.take_over(
            self._db,
            stale,
            stale_after=self._stale_after,
            max_attempts=self._max_attempts,
            error=f"worker lost: no heartbeat for {self._stale_after:g}s",
        )
        jobs: list[ScheduledJob] = []
        for t in taken:
            log.warning("stale_attempt_taken_over", event_id=t.event_id, attempt=t.attempts,
                        status=t.status)  # fmt: skip
            if t.status == "retrying":
                assert t.next_attempt_at is not None  # set with status retrying
                was = found[t.event_id]  # take_over() answers for these candidates only
                job = self._job_for(
                    t.event_id, t.attempts + 1, t.next_attempt_at, was.type, was.traceparent,
                    t.day, was.size,
                )  # fmt: skip
                jobs.append(job)
            elif t.status == "dead":
                self._dead_letters.submit_nowait(t.event_id)
        added = await self._jobs.enqueue_reachable(jobs) if jobs else 0
        if added:
            metrics.RECONCILER_REQUEUED.labels("stale_running").inc(added)
        return added

    async def _republish_dead(self) -> int:
        dead = await recovery.unpublished_dead(self._db, age=self._grace, limit=self._batch)
        return await self._dead_letters.republish(dead) if dead else 0

    async def live_jobs(self, keys: list[str]) -> set[str]:
        """Of these job keys, those whose SAQ job is active on a worker still alive."""
        return await self._jobs.live_active(keys)

    # -- gauges ----------------------------------------------------------------------------------

    async def refresh_gauges(self) -> None:
        counts = await recovery.status_counts(self._db)
        for status in STATUSES:
            metrics.EVENTS_BY_STATUS.labels(status).set(counts.get(status, 0))
        total: dict[str, int] = {}
        for index, answer in enumerate(await self._jobs.shard_counts()):
            up = not isinstance(answer, DependencyError)
            metrics.QUEUE_SHARD_UP.labels(str(index)).set(1 if up else 0)
            if isinstance(answer, DependencyError):
                log.warning("shard_counts_failed", shard=index, error=answer.problem)
                continue
            for state, count in answer.items():
                metrics.QUEUE_SHARD_JOBS.labels(str(index), state).set(count)
                total[state] = total.get(state, 0) + count
        # The total of the shards that answered (a shard down shows in eventsched_queue_shard_up).
        for state, count in total.items():
            metrics.QUEUE_JOBS.labels(state).set(count)
        overdue = await events.oldest_overdue(self._db)
        metrics.OLDEST_OVERDUE.set(0.0 if overdue is None else overdue.overdue_seconds)
