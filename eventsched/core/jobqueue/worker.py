"""The SAQ worker that starts jobs on time, and its life cycle driven from trio.

:class:`OnTimeWorker` (asyncio side) runs ``concurrency`` slots fed by one
:class:`~eventsched.core.jobqueue.dispatcher.Dispatcher`; it wires the two together (the
store hands out jobs from the dispatcher while the worker serves). :func:`make_worker`,
:func:`run_worker` and :func:`drain_worker` run on the trio side. Invariants: a job never
starts before its due time on this process's clock; signals stay trio's; a graceful stop
takes no new jobs and lets running ones finish, a hard stop re-queues them.
"""

from __future__ import annotations

import asyncio
import signal
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
import trio_asyncio
from saq.job import Status
from saq.types import Context, FunctionsType, JobTaskContext
from saq.utils import now
from saq.worker import Worker, ensure_coroutine_function

from eventsched.core.jobqueue.adapter import JobQueue, dependency_error
from eventsched.core.jobqueue.dispatcher import Dispatcher
from eventsched.core.jobqueue.jobs import PutBack
from eventsched.core.jobqueue.store import REDIS_ERRORS, OnTimeQueue
from eventsched.core.jobqueue.timing import wait_until
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

#: What a job function receives (SAQ's context: the job under ``"job"``); role plugins name
#: it through this package instead of importing SAQ.
JobContext = Context

if TYPE_CHECKING:
    from eventsched.core.jobqueue.budget import PayloadBudget

log = get_logger(__name__)


class OnTimeWorker(Worker[Context]):
    """A SAQ worker that starts each job at its due time, leaves signals alone and drains.

    * ``SIGNALS = []``: SAQ's ``start()`` would call ``loop.add_signal_handler`` for SIGINT
      and SIGTERM, which under trio-asyncio is ``signal.signal`` — replacing trio's handlers.
      The runtime owns signals and calls :meth:`stop_intake` / :meth:`stop` instead.
    * The schedule timer and the per-slot ``BLMOVE`` are replaced by one :class:`Dispatcher`.
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
    :mod:`eventsched.core.jobqueue.budget`); a job's bytes are released when it ends.
    ``function_waits``: the job function is called as soon as the slot has the job (up to
    ``claim_ahead`` before its due time) and waits for the due time itself
    (:func:`~eventsched.core.jobqueue.timing.wait_until`), so that it can do its own
    preparation (the executor's PostgreSQL claim) before the due time; by default the slot
    waits before calling it.
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
        function_waits: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(queue, functions, **kwargs)
        self._function_waits = function_waits
        self.queue: OnTimeQueue = queue
        queue.owner = self.id
        self._dispatcher = Dispatcher(
            queue,
            max_wait=max_wait,
            min_interval=min_interval,
            claim_ahead=claim_ahead,
            budget=payload_budget,
        )
        self._upkeep_tasks: list[asyncio.Task[None]] = []
        self._dispatcher_task: asyncio.Task[None] | None = None
        self._serving = False  # the queue hands out jobs from our dispatcher
        self._ready = asyncio.Event()
        self._draining = False
        self._idle = asyncio.Event()
        # Each job function as a coroutine function, made once: SAQ's
        # ensure_coroutine_function inspects the function on every call (~3% of the
        # executor's loop thread at 1,000 jobs/s).
        self._coroutines: dict[str, Callable[..., Awaitable[Any]]] = {}

    def _coroutine_function(self, name: str) -> Callable[..., Awaitable[Any]]:
        function = self._coroutines.get(name)
        if function is None:
            function = ensure_coroutine_function(self.functions[name], self.pool)
            self._coroutines[name] = function
        return function

    async def upkeep(self) -> list[asyncio.Task[None]]:
        """Called by ``start()`` once: ping Redis, attach the dispatcher, start loops."""
        await self.queue.redis.ping()  # ready means ready: fail start-up if Redis is down
        self.queue.serve_from(self._dispatcher.get)  # raises if another worker is served
        self._serving = True
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
            except REDIS_ERRORS as err:
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
        (docs/design-notes.md has the cost). Here the function runs in the slot's task
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
            function = self._coroutine_function(job.function)
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
        if job is not None and not self._function_waits:
            # Never early, whatever the mover's clock said: the due time is compared with
            # the clock of the process that runs (and records) the job.
            await wait_until(float(job.scheduled))
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
        if self._serving:
            self.queue.serve_from(None)
            self._serving = False


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
        except REDIS_ERRORS as err:
            raise dependency_error(err) from err

    try:  # the usual start-up failure, raised plainly rather than inside a nursery's group
        await trio_asyncio.aio_as_trio(worker.queue.redis.ping)()
    except REDIS_ERRORS as err:
        raise dependency_error(err) from err
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
