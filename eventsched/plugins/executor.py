"""The executor role: runs each scheduled event at its due time, once in effect.

The consumer enqueues one SAQ job per event; an :class:`~eventsched.core.jobqueue.OnTimeWorker`
(on the root trio-asyncio loop, ``executor.concurrency`` slots) starts it on time and calls
:meth:`Executor.execute_event`, which:

1. **claims** the event: CAS ``scheduled|retrying -> running`` plus its ``event_attempts``
   row, committed before the handler runs (a job whose claim loses — a duplicate delivery,
   a reconciler race, an event already done — runs nothing: ``skipped_duplicate``; a job
   that came before the event is due — beyond ``CLAIM_AHEAD`` — runs nothing either and is
   put back into the queue at the event's due time: ``eventsched_claims_not_due_total``);
2. runs the **handler** for the event type (``[handlers]``, else ``default``) under
   ``executor.job_timeout``;
3. **records** the outcome (CAS ``running -> succeeded|retrying|dead`` with ``AND attempts =
   n``, plus the attempt row), written behind: the job returns at once and the outcome
   commits with the next batch (see :meth:`Executor._record` for why that is safe);
4. once the outcome committed: on ``retrying`` enqueues the next attempt; on ``dead`` hands
   the event to the DLQ publisher.

The job contract (key scheme, kwargs, timeout) is :mod:`eventsched.core.domain.jobcontract`.
A dead event re-run by ``dlq replay`` (``scheduled`` again) gets the first attempt's job:
SAQ takes a finished key again.

Statuses and attempts: ``max_retries`` attempts in all (per budget: ``eventsched dlq replay``
sets a dead event back to ``scheduled`` with a fresh budget, its attempts counting on from
where they were; see :func:`decide`). A failure with attempts left ->
``retrying`` with ``next_attempt_at = now + backoff(n)`` (``base * factor**(n-1)``, capped
at ``max``, times ``1 ± jitter``); a failure of the last attempt -> ``dead``
(``retries_exhausted``); :class:`PermanentError` -> ``dead`` (``permanent_error``); no
handler for the type and no default -> ``dead`` (``no_handler``). An attempt interrupted by
shutdown or lost with its worker counts as an attempt too (so a handler that kills its
worker cannot loop forever).

Where handlers run: on the asyncio side, inside SAQ's job task, awaited directly. Per-job
CPU is the budget here (the queue adapter alone takes ~0.3-0.6 ms per job); hopping to the
trio side for every handler would add two cross-loop hand-offs per job. asyncio handlers
can use httpx/aiohttp/asyncpg directly; a trio handler is wrapped with
``trio_asyncio.trio_as_aio``.

Memory: a job carries only the event id; the payload comes with the claim. The worker hands
jobs to slots only while their payloads fit in ``executor.inflight_bytes``
(:class:`~eventsched.core.jobqueue.PayloadBudget`; a job counts as
``consumer.max_message_bytes`` until its claim tells its payload's size).

PostgreSQL writes are batched across concurrent jobs (:class:`GroupCommit`: one statement
per round trip on a dedicated thread, no timers).

Leases (fencing). With ``S = reconciler.stale_after``:

* The claim starts the attempt's lease (``updated_at = now()``); this process renews it (one
  statement for every attempt due, every ``S / 8``) for as long as it *holds* the attempt:
  while the handler runs and until its outcome has committed.
* This process counts the lease as ``LEASE_FRACTION`` x ``S`` (= ``S / 2``) from the moment
  it *sent* the claim or its last successful renewal, on its monotonic clock. Once that has
  passed (PostgreSQL unreachable, the process paused, the event loop starved), or a renewal
  finds the attempt no longer running (taken over), the lease is lost: the handler runs no
  further step — :class:`_Fenced` throws :class:`LeaseLost` (a ``CancelledError``) at the
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

Shutdown: on ``ctx.stopping`` the worker takes no new jobs and running ones finish (bounded
by the runtime's grace). Jobs still running when the grace ends are cancelled; each records
its attempt as interrupted (``retrying`` at once, or ``dead`` if it was the last) on its way
out — if even that fails, the reconciler's stale-running path recovers the event.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import random
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import httpx
import trio
import trio_asyncio

from eventsched.core.domain.deadletter import (
    DLQ_MAX_BYTES,
    DLQ_MIN_BYTES,
    dlq_headers,
    fit_dead_letter,
)
from eventsched.core.domain.event import Event
from eventsched.core.domain.jobcontract import (
    EXECUTE_FUNCTION,
    make_job,
    saq_timeout,
)
from eventsched.core.domain.wire import encode_event, kafka_headers
from eventsched.core.jobqueue import (
    REDIS_ERRORS,
    JobContext,
    OnTimeWorker,
    PayloadBudget,
    PutBack,
    ScheduledJob,
    drain_worker,
    make_worker,
    payload_bytes,
    run_worker,
)
from eventsched.core.kafka import KafkaProducer, OutboundMessage
from eventsched.core.runtime import metrics
from eventsched.core.runtime.contracts import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    RoleContext,
    check_handler,
    load_handler,
)
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import (
    RetryBackoffSettings,
    Settings,
    redact,
    require_postgres,
)
from eventsched.core.store import executions, recovery
from eventsched.core.store.executions import (
    Claimed,
    ClaimRequest,
    ClaimResult,
    DeadEvent,
    NotClaimed,
    NotDue,
    Outcome,
)
from eventsched.core.store.groupcommit import GroupCommit
from eventsched.core.store.pool import Database
from eventsched.plugins.reconciler import Reconciler

if TYPE_CHECKING:
    from eventsched.core.runtime.health import Health

log = get_logger(__name__)
T = TypeVar("T")

#: SAQ function name of the executor's job (the consumer enqueues jobs by this name).
#: Seconds a job keeps re-sending its claim while PostgreSQL is unreachable before it gives
#: up (the reconciler re-enqueues the event later).
CLAIM_PATIENCE: Final = 10.0
#: Same for the outcome; giving up leaves the event `running` for the reconciler's
#: stale-running path (the handler would then run again).
RECORD_PATIENCE: Final = 60.0
#: Event types used as metric labels: those named in settings; any other is "other".
OTHER_TYPE: Final = "other"
#: Seconds between two outcome statements at most (write-behind: nobody waits for them).
OUTCOME_INTERVAL: Final = 0.01
#: Statement sizes of the group commits.
MAX_BATCH: Final = 500
#: The executor's lease of an attempt, as a fraction of ``reconciler.stale_after``, counted
#: from when the claim or the last successful renewal was sent (see "Leases").
LEASE_FRACTION: Final = 0.5
#: Seconds before its due time a job may be taken (the worker's claim-ahead window); the
#: claim refuses an event due later than this (its job came early) and puts the job back.
CLAIM_AHEAD: Final = 0.01


# -- pure parts: keys, jobs, backoff, decisions ---------------------------------------------------


def retry_delay(attempt: int, backoff: RetryBackoffSettings, rng: random.Random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): exponential, jittered by
    ``± jitter`` (a fraction), never above ``max``."""
    delay = min(float(backoff.max), float(backoff.base) * backoff.factor ** (attempt - 1))
    if backoff.jitter:
        delay *= 1.0 + backoff.jitter * rng.uniform(-1.0, 1.0)
    return max(0.0, min(float(backoff.max), delay))


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed."""

    error: str
    permanent: bool = False
    reason: str = "permanent_error"  # the dead reason if permanent


def decide(
    event_id: str,
    attempt: int,
    failure: Failure | None,
    *,
    max_attempts: int,
    now: float,
    delay: Callable[[int], float],
    label: str = "",
    base: int = 0,
) -> Outcome:
    """The outcome of an attempt: succeeded, retrying after ``delay(n)``, or dead.

    ``n = attempt - base`` is the attempt's place in the current budget: ``base`` is the
    number of attempts made before it began (0; after a dlq replay re-ran a dead event, the
    attempts of the run that went dead), so a re-run gets ``max_attempts`` attempts of its
    own while attempt numbers keep counting.
    """
    n = attempt - base
    if failure is None:
        return Outcome(event_id, attempt, "succeeded", None, now, label=label)
    if failure.permanent:
        return Outcome(
            event_id, attempt, "dead", failure.error, now, dead_reason=failure.reason, label=label
        )
    if n >= max_attempts:
        return Outcome(
            event_id, attempt, "dead", failure.error, now, dead_reason="retries_exhausted",
            label=label,
        )  # fmt: skip
    return Outcome(
        event_id, attempt, "retrying", failure.error, now, next_attempt_at=now + delay(n),
        label=label,
    )  # fmt: skip


def _describe(err: BaseException) -> str:
    """The text of a handler's failure, as stored in ``events.last_error`` and
    ``event_attempts.error``, logged and published in the DLQ ``dlq-error`` header:
    ``Type: message`` with URL credentials, query values, token-like path segments and
    conninfo passwords redacted (whatever handler raised it)."""
    text = redact(str(err))
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# -- dead letters ------------------------------------------------------------------------------


class DeadLetters:
    """Publishes dead events to the DLQ topic, after their ``dead`` state is committed.

    Dead event ids arrive through :meth:`submit_nowait` (from job functions, any side); the
    trio task :meth:`run` reads the rows, publishes and sets ``dlq_published_at``. A crash
    in between loses nothing: the reconciler republishes dead events still unpublished
    after ``reconciler.grace`` (at-least-once; consumers of the DLQ dedupe by ``event-id``).

    A publish that fails for a dependency reason (broker unreachable, timeouts) is tried
    again with backoff (``RETRY_INITIAL`` .. ``RETRY_MAX`` s) until it succeeds or the
    publisher is closed; meanwhile the role is marked stalled (``dlq_failing``, so
    ``/readyz`` answers 503 naming it) and cleared at the next successful publish. Messages
    are cut to the dead-letter budget (:func:`fit_dead_letter`); one the topic still
    refuses for what it is stays unpublished in PostgreSQL (the outbox,
    ``dlq_published_at IS NULL``), is logged as ``dlq_publish_refused`` and does not stall.
    """

    RETRY_INITIAL: Final = 0.5
    RETRY_MAX: Final = 5.0

    def __init__(
        self,
        db: Database,
        producer: KafkaProducer,
        topic: str,
        worker_id: str,
        *,
        health: Health | None = None,
        role: str = "executor",
    ) -> None:
        self._db = db
        self._producer = producer
        self._topic = topic
        self._worker_id = worker_id
        self._health = health
        self._role = role
        self._send, self._receive = trio.open_memory_channel[str](10_000)
        # Submitted here and not published yet: the reconciler leaves these alone.
        self._in_flight: set[str] = set()
        self._closed = trio.Event()
        self.finished = trio.Event()  # run() returned (closed and drained)

    def submit_nowait(self, event_id: str) -> None:
        try:
            self._send.send_nowait(event_id)
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("dlq_handoff_dropped", event_id=event_id, note="reconciler republishes")
        else:
            self._in_flight.add(event_id)

    def close(self) -> None:
        self._send.close()
        self._closed.set()

    async def run(self) -> None:
        """Publish submitted dead events until :meth:`close`, then the rest."""
        try:
            await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> None:
        async with self._receive:
            async for first in self._receive:
                ids = [first]
                while len(ids) < MAX_BATCH:
                    try:
                        ids.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await self._publish_until_done(ids)
                finally:
                    self._in_flight.difference_update(ids)

    async def _publish_until_done(self, ids: list[str]) -> None:
        """Publish these dead events, retrying with backoff while the broker or PostgreSQL
        fails, until they are published or the publisher is closed (the reconciler then
        republishes what is left)."""
        delay = self.RETRY_INITIAL
        while True:
            try:
                dead = await recovery.dead_events(self._db, ids)
            except DependencyError as err:
                log.warning("dlq_lookup_failed", error=err.problem, events=len(ids))
                failing = True
            else:
                failing = (await self._publish(dead))[1]
            if not failing or self._closed.is_set():
                return
            with trio.move_on_after(delay):
                await self._closed.wait()
            delay = min(delay * 2, self.RETRY_MAX)

    async def republish(self, dead: list[DeadEvent]) -> int:
        """Publish dead events found unpublished by the reconciler, except those this
        process is publishing right now."""
        return await self.publish([d for d in dead if d.event_id not in self._in_flight])

    def message(self, dead: DeadEvent, *, budget: int = DLQ_MAX_BYTES) -> OutboundMessage:
        """The DLQ message of a dead event: the event as v1 JSON, reason headers; cut to
        ``budget`` if bigger (see :func:`fit_dead_letter`)."""
        event = Event(
            id=uuid.UUID(dead.event_id),
            idempotency_key=dead.idempotency_key,
            type=dead.type,
            payload=dead.payload,
            execute_at=dead.execute_at,
            created_at=dead.created_at,
        )
        from_kafka = dead.kafka_topic is not None
        ours = dlq_headers(
            reason=dead.reason,
            error=dead.error,
            source_topic=dead.kafka_topic or "",
            source_partition=-1 if dead.kafka_partition is None else dead.kafka_partition,
            source_offset=-1 if dead.kafka_offset is None else dead.kafka_offset,
            source_timestamp_ms=None,
            consumer_id=self._worker_id,
            failed_at=dead.finished_at,
        )
        headers: list[tuple[str, bytes | None]] = [
            *kafka_headers(),
            *(
                (name, value)
                for name, value in ours
                if value is not None and (from_kafka or not name.startswith("source-"))
            ),
            ("attempts", str(dead.attempts).encode()),
            ("event-id", dead.event_id.encode()),
        ]
        key, value, headers = fit_dead_letter(
            dead.idempotency_key.encode(), encode_event(event), headers, budget=budget
        )
        return OutboundMessage(
            topic=self._topic,
            value=value,
            key=key,
            headers=headers,  # type: ignore[arg-type]  # values are never None here
        )

    async def publish(self, dead: list[DeadEvent]) -> int:
        """Publish and mark as published; returns how many the broker acknowledged."""
        return (await self._publish(dead))[0]

    async def _publish(self, dead: list[DeadEvent]) -> tuple[int, bool]:
        """Publish and mark as published; returns (how many the broker acknowledged,
        whether some failed for a reason other than the message itself)."""
        if not dead:
            return 0, False
        messages = [self.message(d) for d in dead]
        try:
            reports = await self._producer.send_many(messages)
            # A message refused for its size gets one more try, cut to the minimum budget.
            again = [i for i, r in enumerate(reports) if r.too_large]
            if again:
                smaller = await self._producer.send_many(
                    [self.message(dead[i], budget=DLQ_MIN_BYTES) for i in again]
                )
                for i, report in zip(again, smaller, strict=True):
                    reports[i] = report
        except DependencyError as err:
            log.warning("dlq_publish_failed", error=err.problem, events=len(dead))
            self._stalled(True)
            return 0, True
        published: list[str] = []
        failing = False
        for item, report in zip(dead, reports, strict=True):
            if report.ok:
                published.append(item.event_id)
                metrics.DLQ_MESSAGES.labels(item.reason).inc()
                log.warning(
                    "event_dead_lettered",
                    event_id=item.event_id,
                    type=item.type,
                    reason=item.reason,
                    attempts=item.attempts,
                    error=item.error,
                )
            elif report.message_specific:
                # Sending it again cannot help; it stays unpublished in the outbox.
                log.error("dlq_publish_refused", event_id=item.event_id, error=report.error)
            else:
                failing = True
                log.warning("dlq_publish_failed", event_id=item.event_id, error=report.error)
        self._stalled(failing)
        try:
            await recovery.mark_published(self._db, published)
        except DependencyError as err:
            # They are in the DLQ; the reconciler will publish them once more (a duplicate).
            log.warning("dlq_mark_failed", error=err.problem, events=len(published))
        return len(published), failing

    def _stalled(self, failing: bool) -> None:
        if self._health is None:
            return
        if failing:
            self._health.stall(self._role, "dlq_failing", "dead-letter delivery failing")
        else:
            self._health.unstall(self._role, "dlq_failing")


# -- the role ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Running:
    """An attempt this process holds: its handler runs, or its outcome is not committed yet
    (asyncio side writes, trio side reads). See "Leases" in the module docstring."""

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

    def lease_ok(self) -> bool:
        if self.lost:
            return False
        if time.monotonic() < self.lease_until:
            return True
        self.lost = True
        return False


class LeaseLost(asyncio.CancelledError):
    """Thrown into a handler whose attempt's lease ran out, at the await it is suspended in."""


class _Fenced:
    """Awaits a handler's coroutine, checking its attempt's lease before every step.

    A handler is resumed only while its lease holds: once it ran out (the process was
    paused, PostgreSQL unreachable, the attempt taken over) the handler gets
    :class:`LeaseLost` (a ``CancelledError``) at the await it is suspended in instead of
    the result it waited for, however the process got there — the reaper's cancellation
    may come later than the resumption after a pause. One ``time.monotonic()`` per step.
    """

    __slots__ = ("_coro", "_running")

    def __init__(self, coro: Any, running: _Running) -> None:
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


class Executor:
    """The executor role plugin (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"postgres", "redis", "kafka_producer"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        s = self.settings = ctx.settings
        self._db = ctx.resources.require_db()
        self._jobs = ctx.resources.require_queue()
        self._producer = ctx.resources.require_kafka_producer()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._log = log.bind(role=ctx.role, worker_id=self.worker_id)
        self._max_attempts = s.executor.max_retries
        self._job_timeout = float(s.executor.job_timeout)
        self._saq_timeout = saq_timeout(s)
        self._rng = random.Random()
        self._http: httpx.AsyncClient | None = None
        self._handlers, self._default = self._load_handlers()
        known = (set(s.handlers) | set(s.producer.event_types) | set(s.webhooks)) - {"default"}
        self._labels = frozenset(known)
        # Metric children looked up once (labels() costs more than the observation).
        self._durations = {t: metrics.EXECUTION_DURATION.labels(t) for t in {*known, OTHER_TYPE}}
        self._claims: GroupCommit[ClaimRequest, ClaimResult] = GroupCommit(
            "claim",
            functools.partial(executions.claim_batch, worker_id=self.worker_id, ahead=CLAIM_AHEAD),
            key=lambda r: r.event_id,
            max_batch=MAX_BATCH,
        )
        self._finishes: GroupCommit[Outcome, bool] = GroupCommit(
            "finish",
            executions.finish_batch,
            key=lambda o: o.event_id,
            max_batch=MAX_BATCH,
            after_batch=self._after_outcomes,
            patience=RECORD_PATIENCE,
            min_interval=OUTCOME_INTERVAL,
        )
        # Outcomes are written behind (the job returns at once) until this many wait; then
        # jobs wait for their own write, which slows intake instead of growing memory.
        self._write_behind_limit = max(MAX_BATCH, 2 * s.executor_concurrency)
        # Payload bytes in flight (0: unbounded); a payload is at most one consumer message.
        self._budget = (
            PayloadBudget(s.executor.inflight_bytes, unknown=s.consumer.max_message_bytes)
            if s.executor.inflight_bytes
            else None
        )
        self.dead_letters = DeadLetters(
            self._db,
            self._producer,
            s.kafka.dlq_topic,
            self.worker_id,
            health=ctx.health,
            role=ctx.role,
        )
        self._running: dict[tuple[str, int], _Running] = {}
        # The lease of an attempt, as this process counts it (see "Leases").
        self._lease = LEASE_FRACTION * float(s.reconciler.stale_after)
        self._retrying: set[asyncio.Task[None]] = set()  # retry enqueues in progress
        self.worker: OnTimeWorker | None = None
        self.reconciler: Reconciler | None = None

    # -- handlers ------------------------------------------------------------------------------

    @staticmethod
    def check_settings(settings: Settings) -> None:
        """Before anything connects (the runtime calls it): every ``[handlers]`` target
        imports and has a handler's shape, else PluginError naming its key."""
        for type_, target in settings.handlers.items():
            check_handler(f"handlers.{type_}", target)

    def _load_handlers(self) -> tuple[dict[str, Handler], Handler | None]:
        """Load every configured handler now: a bad one stops start-up (PluginError)."""
        handlers: dict[str, Handler] = {}
        for type_, target in self.settings.handlers.items():
            key = f"handlers.{type_}"
            context = HandlerContext(self.settings, key, self._http_client)
            handlers[type_] = load_handler(key, target, context)
        default = handlers.pop("default", None)
        return handlers, default

    def _http_client(self) -> httpx.AsyncClient:
        """The one HTTP client shared by every handler (asyncio side; created on first use)."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=float(self.settings.executor.webhook.timeout),
                limits=httpx.Limits(max_connections=max(10, self.settings.executor_concurrency)),
            )
        return self._http

    def handler_for(self, type_: str) -> Handler | None:
        return self._handlers.get(type_, self._default)

    def _label(self, type_: str | None) -> str:
        return type_ if type_ is not None and type_ in self._labels else OTHER_TYPE

    # -- life cycle (trio) -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not await self._wait_for_dependencies():
            task_status.started()
            return
        # Services the job functions depend on live in their own, shielded scopes: when the
        # runtime's grace expires and the worker is cancelled, its jobs still record their
        # interrupted attempts through them on the way out; they are stopped last.
        async with trio.open_nursery() as services:
            dsn = require_postgres(self.settings)
            timeout = float(self.settings.postgres.connect_timeout)
            scopes = [
                await services.start(self._service, self._claims.run, dsn, timeout),
                await services.start(self._service, self._finishes.run, dsn, timeout),
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
                self._claims.close()
                self._finishes.close()
                while not (self._claims.idle and self._finishes.idle):  # noqa: ASYNC110  # written by other threads
                    await trio.sleep(0.01)
                if self._retrying:
                    await trio_asyncio.aio_as_trio(asyncio.wait)(list(self._retrying))
                self.dead_letters.close()
                await self.dead_letters.finished.wait()
            for scope in scopes:
                scope.cancel()
            if self._http is not None:
                with trio.move_on_after(2.0):
                    await trio_asyncio.aio_as_trio(self._http.aclose)()

    async def _run_worker(self, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        # Liveness of this worker for the reconciler: SAQ's worker-info key (it expires one
        # second after its interval), refreshed well within stale_after, and so that a dead
        # worker's jobs are known lost within reconciler.grace (whole seconds: redis-py
        # wants an int expiry).
        r = s.reconciler
        info_every = int(max(1, min(10, r.stale_after // 4, (r.grace - 1) // 2)))
        self.worker = worker = make_worker(
            self._jobs,
            [(EXECUTE_FUNCTION, self.execute_event)],
            concurrency=s.executor_concurrency,
            claim_ahead=CLAIM_AHEAD,
            id=self.worker_id,
            timers={"worker_info": info_every},
            payload_budget=self._budget,
        )
        self.reconciler = Reconciler(
            settings=s,
            db=self._db,
            jobs=self._jobs,
            dead_letters=self.dead_letters,
            job_for=self._job_for,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, worker)
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._reap)
            reconciling = trio.CancelScope()
            if s.reconciler.enabled:
                nursery.start_soon(self._reconcile, reconciling)
            self._log.info(
                "executor_started", concurrency=s.executor_concurrency, queue=self._jobs.name
            )
            task_status.started()
            await self.ctx.stopping.wait()
            reconciling.cancel()  # intake stops: no more re-enqueues
            self._log.info("executor_draining", running=len(self._running))
            await drain_worker(worker)
            self._log.info("executor_drained")
            nursery.cancel_scope.cancel()

    async def _reconcile(self, scope: trio.CancelScope) -> None:
        assert self.reconciler is not None  # built before this task starts
        with scope:
            await self.reconciler.run()

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

    async def _heartbeats(self) -> None:
        """Renew the leases of the attempts this process holds (one statement every
        ``stale_after / 8`` for those renewed that long ago); see "Leases"."""
        every = max(0.05, float(self.settings.reconciler.stale_after) / 8)
        while True:
            await trio.sleep(every)
            now = time.monotonic()
            held = list(self._running.items())
            for key, r in held:
                if now - r.finished > RECORD_PATIENCE:
                    # Its outcome write was given up: the reconciler recovers the event.
                    self._running.pop(key, None)
            due = [
                r
                for _, r in held
                if now - r.renewed >= every and now - r.finished <= RECORD_PATIENCE
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
                        r.lease_until = sent + self._lease
                elif self._running.get((r.event_id, r.attempt)) is r:
                    # Not running this attempt any more: its outcome committed, or it was
                    # taken over (then its handler, if still running, stops now).
                    if r.finished == math.inf:
                        self._lose(r)
                    else:
                        self._running.pop((r.event_id, r.attempt), None)

    def _lose(self, running: _Running) -> None:
        """The attempt's lease is gone: stop its handler (it runs no further step)."""
        if running.lost and running.cancelled:
            return
        running.lost = True
        if running.finished == math.inf and not running.timed_out and not running.cancelled:
            running.cancelled = True
            running.task.cancel()

    async def _reap(self) -> None:
        """Cancel handlers running past their timeout (checked every tenth of it, 10 ms to
        1 s: the timeout fires that much late at most) or past their lease (checked every
        ``stale_after / 16``)."""
        every = min(1.0, max(0.01, self._job_timeout / 10), self._lease / 8)
        while True:
            await trio.sleep(every)
            now = time.monotonic()
            for running in list(self._running.values()):
                if running.finished < math.inf or running.cancelled:
                    continue
                if running.lease_until <= now or running.lost:
                    self._lose(running)
                elif running.deadline <= now and not running.timed_out:
                    running.timed_out = True
                    running.cancelled = True
                    running.task.cancel()

    def _job_for(self, event_id: str, attempt: int, scheduled: float) -> ScheduledJob:
        return make_job(event_id, attempt, scheduled, self._saq_timeout)

    # -- the job function (asyncio side) --------------------------------------------------------

    async def execute_event(
        self, ctx: JobContext, *, event_id: str, attempt: int | None = None
    ) -> None:
        """SAQ job function: run attempt ``attempt`` (default: the first) of an event."""
        started = time.time()
        try:
            uuid.UUID(event_id)
        except (ValueError, TypeError, AttributeError):
            self._log.error("job_with_bad_event_id", event_id=repr(event_id))
            return
        request = ClaimRequest(event_id, attempt or 0, started)
        claim = await self._patiently(self._claims, request, CLAIM_PATIENCE)
        if claim is None:
            return  # PostgreSQL unreachable: the reconciler re-enqueues the event
        if self._budget is not None and "job" in ctx:
            size = payload_bytes(claim.payload) if isinstance(claim, Claimed) else 0
            self._budget.settle(ctx["job"].id, size)
        if isinstance(claim, NotClaimed):
            self._skipped(claim, attempt)
            return
        if isinstance(claim, NotDue):
            metrics.CLAIMS_NOT_DUE.inc()
            self._log.warning(
                "job_came_early", event_id=event_id, job_attempt=attempt or 1,
                due_at=claim.due_at, early_s=round(claim.due_at - started, 3),
                note="put back at the due time",
            )  # fmt: skip
            raise PutBack(claim.due_at)
        label = self._label(claim.type)
        metrics.EXECUTION_LATENESS.observe(started - claim.scheduled_for)
        task = asyncio.current_task()
        assert task is not None  # SAQ runs job functions in a task
        # The claim set updated_at = now() no earlier than claim.sent: the lease starts
        # there (not at our submission, which may have waited for a connection).
        lease_start = claim.sent
        running = _Running(event_id, claim.attempt, lease_start, lease_start + self._lease, task)
        self._running[event_id, claim.attempt] = running
        try:
            failure = await self._run_handler(claim, label, ctx, running)
        except asyncio.CancelledError:
            running.finished = time.monotonic()
            self._record_interrupted(claim, label)
            raise
        running.finished = time.monotonic()
        outcome = decide(
            event_id,
            claim.attempt,
            failure,
            max_attempts=self._max_attempts,
            now=time.time(),
            delay=self._delay,
            label=label,
            base=claim.base,
        )
        await self._record(outcome)

    def _delay(self, attempt: int) -> float:
        return retry_delay(attempt, self.settings.executor.retry_backoff, self._rng)

    async def _run_handler(
        self, claim: Claimed, label: str, ctx: JobContext, running: _Running
    ) -> Failure | None:
        if not running.lease_ok():
            # The claim took longer than the lease (PostgreSQL slow or unreachable).
            return Failure(f"lease lost before the handler started ({self._lease:g}s)")
        handler = self.handler_for(claim.type)
        if handler is None:
            return Failure(
                f"no handler for event type {claim.type!r} and no default handler",
                permanent=True,
                reason="no_handler",
            )
        event = HandlerEvent(
            id=claim.event_id,
            type=claim.type,
            payload=claim.payload,
            execute_at=datetime.fromtimestamp(claim.execute_at, UTC),
            attempt=claim.attempt,
        )
        limit = self._handler_timeout(ctx)
        began = time.perf_counter()
        # No asyncio.timeout here: under trio-asyncio every timer costs two trips through
        # the loop (queued, then popped, even when cancelled) and stays in its heap until it
        # would have fired; :meth:`_reap` cancels overdue handlers from one periodic scan.
        running.deadline = time.monotonic() + limit
        try:
            await _Fenced(handler(event), running)
        except asyncio.CancelledError:
            if not (running.timed_out or running.lost):
                raise
            if running.cancelled:
                running.task.uncancel()  # our own cancellation, handled here
            if running.lost:
                self._log.warning(
                    "lease_lost", event_id=claim.event_id, attempt=claim.attempt,
                    note="handler stopped; the attempt is retried",
                )  # fmt: skip
                return Failure(f"lease lost: no heartbeat reached PostgreSQL for {self._lease:g}s")
            return Failure(f"handler timed out after {limit:g}s")
        except PermanentError as err:
            return Failure(_describe(err), permanent=True)
        except Exception as err:
            return Failure(_describe(err))
        finally:
            running.deadline = math.inf
            self._durations[label].observe(time.perf_counter() - began)
        if running.cancelled and running.task.cancelling():
            running.task.uncancel()  # the handler swallowed our cancellation
        return None

    def _handler_timeout(self, ctx: JobContext) -> float:
        # SAQ cancels the job at its own timeout (set by whoever enqueued it); ours must
        # fire first so the failure is recorded and retried rather than cut off.
        saq_limit = ctx["job"].timeout if "job" in ctx else 0
        if saq_limit:
            return min(self._job_timeout, max(0.5 * saq_limit, saq_limit - 5.0))
        return self._job_timeout

    def _skipped(self, claim: NotClaimed, attempt: int | None) -> None:
        metrics.EXECUTIONS.labels(self._label(claim.type), "skipped_duplicate").inc()
        if claim.type is None:
            self._log.warning("job_for_unknown_event", event_id=claim.event_id)
        else:
            self._log.info(
                "skipped_duplicate",
                event_id=claim.event_id,
                job_attempt=attempt or 1,
                status=claim.status,
                attempts=claim.attempts,
            )

    async def _record(self, outcome: Outcome) -> None:
        """Record the outcome; written behind unless too many writes are waiting.

        Write-behind means SAQ acknowledges the job before the outcome is committed (a few
        milliseconds later, with the next batch). If the process dies in between, the
        event stays `running` without heartbeat, and the reconciler's stale-running path
        gives the attempt up as lost and runs the next one: the handler may run once more
        after a crash (at-least-once, as with any crash mid-handler), never twice for the
        same attempt number, and never while its first run is alive.
        """
        if self._finishes.backlog < self._write_behind_limit:
            self._finishes.submit_nowait(outcome)
            return
        recorded = await self._patiently(self._finishes, outcome, RECORD_PATIENCE)
        if recorded is None:
            self._running.pop((outcome.event_id, outcome.attempt), None)
            self._log.error(
                "outcome_not_recorded", event_id=outcome.event_id, attempt=outcome.attempt,
                outcome=outcome.status, note="reconciler recovers it as stale running",
            )  # fmt: skip
        # Metrics, retries and dead letters follow in _after_outcomes, as for write-behind.

    def _after_outcomes(self, outcomes: Sequence[Outcome], recorded: Sequence[bool]) -> None:
        """After a batch of outcomes committed (on the loop): count, log, enqueue retries
        (one Redis call per batch, in a task), hand dead events to the DLQ publisher."""
        retries: list[ScheduledJob] = []
        counts: Counter[tuple[str, str]] = Counter()  # one inc() per label and status
        for outcome, ok in zip(outcomes, recorded, strict=True):
            self._running.pop((outcome.event_id, outcome.attempt), None)
            if not ok:
                # Someone else moved the event on (the reconciler took the attempt over).
                self._log.warning(
                    "outcome_discarded", event_id=outcome.event_id, attempt=outcome.attempt,
                    outcome=outcome.status,
                )  # fmt: skip
                continue
            status = outcome.status
            counts[outcome.label, "retried" if status == "retrying" else status] += 1
            if status == "succeeded":
                continue
            if status == "retrying":
                assert outcome.next_attempt_at is not None  # decide() sets it for retrying
                retries.append(
                    self._job_for(outcome.event_id, outcome.attempt + 1, outcome.next_attempt_at)
                )
            else:
                self.dead_letters.submit_nowait(outcome.event_id)
            self._log.info(
                "attempt_failed",
                event_id=outcome.event_id,
                attempt=outcome.attempt,
                outcome=status,
                error=outcome.error,
                reason=outcome.dead_reason,
                retry_in=(
                    None
                    if outcome.next_attempt_at is None
                    else round(outcome.next_attempt_at - outcome.finished, 3)
                ),
            )
        for (label, status), n in counts.items():
            metrics.EXECUTIONS.labels(label, status).inc(n)
        if retries:
            task = asyncio.ensure_future(self._enqueue_retries(retries))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)

    async def _enqueue_retries(self, jobs: list[ScheduledJob]) -> None:
        try:
            await self._jobs.aio_queue.enqueue_scheduled(jobs)
        except REDIS_ERRORS as err:
            # The events are `retrying` in PostgreSQL; the reconciler enqueues them after grace.
            self._log.warning(
                "retry_enqueue_failed", jobs=[job.key for job in jobs], error=redact(str(err))
            )

    def _record_interrupted(self, claim: Claimed, label: str) -> None:
        """The job is being cancelled (shutdown past its grace, SAQ's own timeout): record
        the attempt as failed (written behind, so the cancellation is not delayed; the
        executor flushes the writes before it stops) and retry at once."""
        outcome = decide(
            claim.event_id,
            claim.attempt,
            Failure("interrupted: the executor stopped before the handler finished"),
            max_attempts=self._max_attempts,
            now=time.time(),
            delay=lambda _: 0.0,
            label=label,
            base=claim.base,
        )
        self._finishes.submit_nowait(outcome)

    async def _patiently(
        self, store: GroupCommit[Any, T], request: Any, patience: float
    ) -> T | None:
        """Submit ``request`` until it gets an answer; None if PostgreSQL stays unreachable
        for ``patience`` s. Requests are idempotent (see execstore), so re-sending is safe."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delay = 0.05
        while True:
            try:
                return await store.submit(request)
            except DependencyError as err:
                if loop.time() + delay > deadline:
                    self._log.error(
                        "postgres_write_failed", store=store.name, error=err.problem,
                        event_id=getattr(request, "event_id", None),
                    )  # fmt: skip
                    return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- introspection (tests, benchmarks) ------------------------------------------------------

    @property
    def running(self) -> Mapping[str, int]:
        """Event id -> attempt, for attempts this process is running now."""
        return {r.event_id: r.attempt for r in self._running.values() if r.finished == math.inf}

    @property
    def store_stats(self) -> dict[str, tuple[int, int]]:
        """(statements, requests) per group commit."""
        return {
            self._claims.name: (self._claims.batches, self._claims.requests),
            self._finishes.name: (self._finishes.batches, self._finishes.requests),
        }
