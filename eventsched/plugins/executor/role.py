"""The executor role plugin: :class:`Executor` builds the parts of the role and runs them
(trio side): the group-commit services, the on-time worker, the lease keepers, the
dead-letter publisher, the reconciler and the schedule leader; the job function itself is
:class:`~eventsched.plugins.executor.attempt.Attempts` (asyncio side).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import trio
import trio_asyncio

from eventsched.core.domain.jobcontract import EXECUTE_FUNCTION
from eventsched.core.domain.policies import Policies
from eventsched.core.domain.schedulefields import specs_from_settings
from eventsched.core.jobqueue import (
    OnTimeWorker,
    PayloadBudget,
    drain_worker,
    make_worker,
    run_worker,
)
from eventsched.core.jobqueue.shards import each_lane_share
from eventsched.core.runtime.contracts import RoleContext, check_handler
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import Settings, require_postgres
from eventsched.core.store import executions
from eventsched.plugins.executor.attempt import (
    AHEAD_SLOTS,
    CLAIM_AHEAD,
    CLAIM_INTERVAL,
    RECORD_PATIENCE,
    Attempts,
)
from eventsched.plugins.executor.deadletters import DeadLetters
from eventsched.plugins.executor.lease import Leases
from eventsched.plugins.executor.reconciler import Reconciler
from eventsched.plugins.executor.retention import RetentionDuty
from eventsched.plugins.executor.schedules import ScheduleLeader

# One logger name for the whole role, as before it was split into modules.
log = get_logger("eventsched.plugins.executor")


def split_slots(concurrency: int, workers: int) -> list[int]:
    """``concurrency`` slots shared out among ``workers`` as evenly as can be, at least one
    each."""
    return [max(1, concurrency // workers + (i < concurrency % workers)) for i in range(workers)]


class Executor:
    """The executor role plugin (see the package docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"postgres", "redis", "kafka_producer"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        s = self.settings = ctx.settings
        self._db = ctx.resources.require_db()
        self._jobs = ctx.resources.require_queue()
        self._producer = ctx.resources.require_kafka_producer()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._log = log.bind(role=ctx.role, worker_id=self.worker_id)
        # Payload bytes in flight (0: unbounded); a payload is at most one consumer message.
        self._budget = (
            PayloadBudget(s.executor.inflight_bytes, unknown=s.consumer.max_message_bytes)
            if s.executor.inflight_bytes
            else None
        )
        # Per-type limits and priorities: the claim serves each type's lane by them; with
        # several shards each shard's claim enforces its share of a limit (shards.lane_share).
        policies = Policies(s)
        shards = self._jobs.shards
        for index, shard in enumerate(shards):
            shard.aio_queue.set_lanes(
                each_lane_share(policies.lanes, index, len(shards)), policies.default.priority
            )
        #: The shards this process claims jobs from (``executor.shards``; empty: all).
        self.served: tuple[int, ...] = s.executor.shards or tuple(range(len(shards)))
        self.dead_letters = DeadLetters(
            self._db,
            self._producer,
            s.kafka.dlq_topic,
            self.worker_id,
            health=ctx.health,
            role=ctx.role,
        )
        self.leases = Leases(
            self._db,
            stale_after=float(s.reconciler.stale_after),
            # The reaper of overdue handlers checks often enough for the shortest timeout.
            job_timeout=min(policies.timeouts()),
            record_patience=RECORD_PATIENCE,
            log=self._log,
        )
        # Loads every configured handler now: a bad one stops start-up (PluginError).
        self.attempts = Attempts(
            s,
            jobs=self._jobs,
            worker_id=self.worker_id,
            dead_letters=self.dead_letters,
            leases=self.leases,
            budget=self._budget,
            log=self._log,
        )
        self.workers: list[OnTimeWorker] = []
        self.reconciler: Reconciler | None = None
        self.schedules = ScheduleLeader(
            settings=s, db=self._db, producer=self._producer, specs=specs_from_settings(s)
        )
        self.retention = RetentionDuty(settings=s)

    @staticmethod
    def check_settings(settings: Settings) -> None:
        """Before anything connects (the runtime calls it): every ``[handlers]`` and
        ``[types]`` handler target imports and has a handler's shape, else PluginError
        naming its key."""
        for type_, target in settings.handlers.items():
            check_handler(f"handlers.{type_}", target)
        policies = Policies(settings)
        for type_, own in settings.types.items():
            if own.handler is not None:
                check_handler(policies[type_].handler_key, own.handler)

    # -- life cycle (trio) -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not await self._wait_for_dependencies():
            task_status.started()
            return
        # Services the job functions depend on live in their own, shielded scopes: when the
        # runtime's grace expires and the worker is cancelled, its jobs still record their
        # interrupted attempts through them on the way out; they are stopped last.
        async with trio.open_nursery() as services:
            attempts = self.attempts
            dsn = require_postgres(self.settings)
            timeout = float(self.settings.postgres.connect_timeout)
            scopes = [
                await services.start(self._service, attempts.claims.run, dsn, timeout),
                await services.start(self._service, attempts.finishes.run, dsn, timeout),
                await services.start(self._service, self.dead_letters.run),
            ]
            try:
                await self._run_worker(task_status)
            finally:
                await self._stop_services(scopes)

    async def _service(
        self,
        fn: Callable[..., Any],
        *args: Any,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope(shield=True) as scope:
            task_status.started(scope)
            await fn(*args)

    async def _stop_services(self, scopes: list[trio.CancelScope]) -> None:
        # Shielded and bounded: this may run after the runtime's grace has expired.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(3.0):
                # Let the stores send what is pending (outcomes written behind, retries
                # enqueued), then the DLQ publisher publish what they handed it.
                attempts = self.attempts
                attempts.claims.close()
                attempts.finishes.close()
                while not (attempts.claims.idle and attempts.finishes.idle):  # noqa: ASYNC110  # written by other threads
                    await trio.sleep(0.01)
                if attempts.retrying:
                    await trio_asyncio.aio_as_trio(asyncio.wait)(list(attempts.retrying))
                self.dead_letters.close()
                await self.dead_letters.finished.wait()
            for scope in scopes:
                scope.cancel()
            http = self.attempts.http
            if http is not None:
                with trio.move_on_after(2.0):
                    await trio_asyncio.aio_as_trio(http.aclose)()

    async def _run_worker(self, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        # Liveness of this worker for the reconciler: SAQ's worker-info key (it expires one
        # second after its interval), refreshed well within stale_after, and so that a dead
        # worker's jobs are known lost within reconciler.grace (whole seconds: redis-py
        # wants an int expiry).
        r = s.reconciler
        info_every = int(max(1, min(10, r.stale_after // 4, (r.grace - 1) // 2)))
        # One worker per served shard; the process's slots and payload budget are shared
        # out among them (the slots evenly: the id hash spreads events evenly), and each has
        # AHEAD_SLOTS more for jobs claimed ahead that wait for their due time.
        self.workers = workers = [
            make_worker(
                self._jobs.shards[index],
                [(EXECUTE_FUNCTION, self.attempts.execute_event)],
                concurrency=slots + AHEAD_SLOTS,
                claim_ahead=CLAIM_AHEAD,
                min_interval=CLAIM_INTERVAL,
                # The job function claims the attempt in PostgreSQL as soon as the slot has
                # the job, then waits for the due time: the claim's round trip is off the start.
                function_waits=True,
                id=self.worker_id,
                timers={"worker_info": info_every},
                payload_budget=self._budget,
            )
            for index, slots in zip(
                self.served, split_slots(s.executor_concurrency, len(self.served)), strict=True
            )
        ]
        self.reconciler = Reconciler(
            settings=s,
            db=self._db,
            jobs=self._jobs,
            dead_letters=self.dead_letters,
            job_for=self.attempts.job_for,
        )
        async with trio.open_nursery() as nursery:
            for worker in workers:
                await nursery.start(run_worker, worker)
            nursery.start_soon(self.leases.renew)
            nursery.start_soon(self.leases.reap)
            reconciling = trio.CancelScope()
            if s.reconciler.enabled:
                nursery.start_soon(self._reconcile, reconciling)
            scheduling = trio.CancelScope()
            if s.scheduler.enabled:
                nursery.start_soon(self._lead_schedules, scheduling)
            retaining = trio.CancelScope()
            if s.retention.enabled:
                nursery.start_soon(self._retain, retaining)
            self._log.info(
                "executor_started", concurrency=s.executor_concurrency, queue=self._jobs.name,
                shards=list(self.served), of_shards=len(self._jobs.shards),
            )  # fmt: skip
            task_status.started()
            await self.ctx.stopping.wait()
            reconciling.cancel()  # intake stops: no more re-enqueues
            scheduling.cancel()  # nor new occurrences
            retaining.cancel()  # nor maintenance passes
            self._log.info("executor_draining", running=len(self.leases.held))
            async with trio.open_nursery() as draining:
                for worker in workers:
                    draining.start_soon(drain_worker, worker)
            self._log.info("executor_drained")
            nursery.cancel_scope.cancel()

    async def _reconcile(self, scope: trio.CancelScope) -> None:
        assert self.reconciler is not None  # built before this task starts
        with scope:
            await self.reconciler.run()

    async def _lead_schedules(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.schedules.run()

    async def _retain(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.retention.run()

    async def _wait_for_dependencies(self) -> bool:
        """Ready means ready: wait until PostgreSQL (with our schema) and Redis answer."""
        backoff = 0.1
        while not self.ctx.stopping.is_set():
            try:
                await self._db.ping()
                await executions.check_schema(self._db)
                await self._jobs.ping()
                return True
            except DependencyError as err:
                self.ctx.health.mark(err.dependency, err.problem)
                self._log.warning(
                    "dependency_unavailable",
                    dependency=err.dependency,
                    error=err.problem,
                    retry_in=backoff,
                )
            with trio.move_on_after(backoff):
                await self.ctx.stopping.wait()
            backoff = min(backoff * 2, 5.0)
        return False

    # -- introspection (tests, benchmarks) ------------------------------------------------------

    @property
    def running(self) -> Mapping[str, int]:
        """Event id -> attempt, for attempts this process is running now."""
        return self.leases.running()

    @property
    def store_stats(self) -> dict[str, tuple[int, int]]:
        """(statements, requests) per group commit."""
        return self.attempts.store_stats
