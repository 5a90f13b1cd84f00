"""The executor's leases (fencing): which attempts this process holds, and how a handler
is stopped once its attempt's lease is gone.

With ``S = reconciler.stale_after``:

* The claim starts the attempt's lease (``updated_at = now()``); this process renews it (one
  statement for every attempt due, every ``S / 8``) for as long as it *holds* the attempt:
  while the handler runs and until its outcome has committed.
* This process counts the lease as ``LEASE_FRACTION`` x ``S`` (= ``S / 2``) from the moment
  it *sent* the claim or its last successful renewal, on its monotonic clock. Once that has
  passed (PostgreSQL unreachable, the process paused, the event loop starved), or a renewal
  finds the attempt no longer running (taken over), the lease is lost: the handler runs no
  further step — :class:`Fenced` throws :class:`LeaseLost` (a ``CancelledError``) at the
  await it is suspended in, and the reaper cancels it there too — and the attempt is
  recorded as failed (``lease lost``), to be retried.
* The reconciler takes an attempt over only when ``updated_at`` is older than ``S`` *and* it
  has seen it so, unchanged, for ``TAKEOVER_MARGIN`` x ``S`` more; the takeover is a CAS on
  that ``updated_at``. PostgreSQL sets ``updated_at`` no earlier than our send time, so
  the next attempt can only be claimed at least ``S`` after our lease ran out (clock rates
  alike; no clock synchronisation needed).
* The attempt number is the fencing token: the outcome write, the renewal and the takeover
  all compare it (``AND attempts = n``), so a stopped attempt's outcome cannot overwrite
  the next one's.

What a handler can rely on: no two runs of one event overlap — a run starts only after every
earlier run of the event returned or was stopped by its lease (it got ``CancelledError`` and
was resumed no more). Not covered: code the handler runs while handling that
``CancelledError`` (it must not start side effects there), and a synchronous stretch of the
handler already under way when the process was paused (blocking calls are not allowed
anyway). A run may be repeated after a crash, a lost lease or a failure — also a run that
completed with its outcome unwritten before an outage longer than ``S``, if neither a renewal
nor the outcome reaches PostgreSQL within the reconciler's ``S / 2`` after it (taken over,
the outcome is discarded): side effects should be idempotent under ``event.id`` (stable
across attempts, the webhook's ``Idempotency-Key``);
``event.attempt`` grows with every run of the event, so a receiver that remembers the
highest attempt it saw per ``event.id`` and refuses lower ones fences out even such
leftovers.

Sides: :class:`Running` records are written by the job function (asyncio side) and read
by the two trio tasks of :class:`Leases` (:meth:`Leases.renew`, :meth:`Leases.reap`);
:class:`Fenced` runs inside the job's asyncio task.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from eventsched.core.runtime.errors import DependencyError
from eventsched.core.store import executions
from eventsched.core.store.pool import Database

#: The executor's lease of an attempt, as a fraction of ``reconciler.stale_after``, counted
#: from when the claim or the last successful renewal was sent.
LEASE_FRACTION: Final = 0.5


@dataclass(slots=True)
class Running:
    """An attempt this process holds: its handler runs, or its outcome is not committed yet
    (asyncio side writes, trio side reads)."""

    event_id: str
    attempt: int
    renewed: float  # time.monotonic() when the claim or the last successful renewal was sent
    lease_until: float  # renewed + the lease: the handler runs no step after this
    task: asyncio.Task[Any]
    deadline: float = math.inf  # time.monotonic() when the handler times out
    timed_out: bool = False
    lost: bool = False  # the lease ran out (or the attempt was taken over): handler stopped
    cancelled: bool = False  # we cancelled the task for it (to uncancel once handled)
    finished: float = math.inf  # time.monotonic() when the handler returned
    started: float | None = None  # time.time() when the handler was invoked (None: not yet)

    def lease_ok(self) -> bool:
        if self.lost:
            return False
        if time.monotonic() < self.lease_until:
            return True
        self.lost = True
        return False


class LeaseLost(asyncio.CancelledError):
    """Thrown into a handler whose attempt's lease ran out, at the await it is suspended in."""


class Fenced:
    """Awaits a handler's coroutine, checking its attempt's lease before every step.

    A handler is resumed only while its lease holds: once it ran out (the process was
    paused, PostgreSQL unreachable, the attempt taken over) the handler gets
    :class:`LeaseLost` (a ``CancelledError``) at the await it is suspended in instead of
    the result it waited for, however the process got there — the reaper's cancellation
    may come later than the resumption after a pause. One ``time.monotonic()`` per step.
    """

    __slots__ = ("_coro", "_running")

    def __init__(self, coro: Any, running: Running) -> None:
        self._coro = coro
        self._running = running

    def __await__(self) -> Any:
        coro, running = self._coro, self._running
        value: Any = None
        error: BaseException | None = None
        while True:
            if error is None and not running.lease_ok():
                error = LeaseLost("the attempt's lease ran out")
            try:
                step = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = yield step
            except BaseException as err:  # delivered to the handler, as `await` would
                error = err


class Leases:
    """The attempts this process holds, by (event id, attempt), and the two trio tasks that
    keep their leases: :meth:`renew` (the heartbeat) and :meth:`reap` (handlers past their
    timeout or their lease)."""

    def __init__(
        self,
        db: Database,
        *,
        stale_after: float,
        job_timeout: float,
        record_patience: float,
        log: Any,
    ) -> None:
        self._db = db
        self._stale_after = stale_after
        self._job_timeout = job_timeout
        # Seconds a finished attempt is held while its outcome write is retried.
        self._record_patience = record_patience
        self._log = log
        #: The lease of an attempt, as this process counts it.
        self.lease = LEASE_FRACTION * stale_after
        self.held: dict[tuple[str, int], Running] = {}

    def hold(self, event_id: str, attempt: int, sent: float, task: asyncio.Task[Any]) -> Running:
        """Hold an attempt claimed by a statement sent at ``sent`` (monotonic): its lease
        starts there (asyncio side)."""
        running = Running(event_id, attempt, sent, sent + self.lease, task)
        self.held[event_id, attempt] = running
        return running

    def release(self, event_id: str, attempt: int) -> None:
        """The attempt's outcome committed, was discarded or given up: hold it no more."""
        self.held.pop((event_id, attempt), None)

    def running(self) -> Mapping[str, int]:
        """Event id -> attempt, for attempts whose handler runs now."""
        return {r.event_id: r.attempt for r in self.held.values() if r.finished == math.inf}

    async def renew(self) -> None:
        """Renew the leases of the attempts this process holds (one statement every
        ``stale_after / 8`` for those renewed that long ago); a trio task."""
        every = max(0.05, self._stale_after / 8)
        while True:
            await trio.sleep(every)
            now = time.monotonic()
            held = list(self.held.items())
            for key, r in held:
                if now - r.finished > self._record_patience:
                    # Its outcome write was given up: the reconciler recovers the event.
                    self.held.pop(key, None)
            due = [
                r
                for _, r in held
                if now - r.renewed >= every and now - r.finished <= self._record_patience
            ]
            if not due:
                continue
            sent = time.monotonic()
            try:
                renewed = await executions.heartbeat(
                    self._db, [(r.event_id, r.attempt) for r in due]
                )
            except DependencyError as err:
                self._log.warning("heartbeat_failed", error=err.problem, running=len(due))
                continue
            for r in due:
                if r.event_id in renewed:
                    r.renewed = sent
                    if not r.lost:
                        r.lease_until = sent + self.lease
                elif self.held.get((r.event_id, r.attempt)) is r:
                    # Not running this attempt any more: its outcome committed, or it was
                    # taken over (then its handler, if still running, stops now).
                    if r.finished == math.inf:
                        self._lose(r)
                    else:
                        self.held.pop((r.event_id, r.attempt), None)

    def _lose(self, running: Running) -> None:
        """The attempt's lease is gone: stop its handler (it runs no further step)."""
        if running.lost and running.cancelled:
            return
        running.lost = True
        if running.finished == math.inf and not running.timed_out and not running.cancelled:
            running.cancelled = True
            running.task.cancel()

    async def reap(self) -> None:
        """Cancel handlers running past their timeout (checked every tenth of it, 10 ms to
        1 s: the timeout fires that much late at most) or past their lease (checked every
        ``stale_after / 16``); a trio task."""
        every = min(1.0, max(0.01, self._job_timeout / 10), self.lease / 8)
        while True:
            await trio.sleep(every)
            now = time.monotonic()
            for running in list(self.held.values()):
                if running.finished < math.inf or running.cancelled:
                    continue
                if running.lease_until <= now or running.lost:
                    self._lose(running)
                elif running.deadline <= now and not running.timed_out:
                    running.timed_out = True
                    running.cancelled = True
                    running.task.cancel()
