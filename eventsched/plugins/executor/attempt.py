"""The executor's job function and what it uses: claims, handlers, outcomes, retries.

:meth:`Attempts.execute_event` is the SAQ job function (asyncio side, inside SAQ's job
task, on the root trio-asyncio loop): it claims the attempt (a :class:`GroupCommit` of
claims), runs the handler under its timeout and lease (:mod:`.lease`), decides the outcome
(:mod:`.retry`) and writes it behind (a :class:`GroupCommit` of outcomes); once outcomes
commit, :meth:`Attempts._after_outcomes` (on the loop) enqueues retries and hands dead
events to :class:`~eventsched.plugins.executor.deadletters.DeadLetters`. The group
commits' statements run on their own threads; the role starts and stops them (trio side).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, Final, TypeVar

import httpx

from eventsched.core.domain.jobcontract import (
    attempt_of,
    day_of,
    is_first_attempt,
    make_job,
    saq_timeout,
)
from eventsched.core.domain.policies import Policies, TypePolicy
from eventsched.core.jobqueue import (
    REDIS_ERRORS,
    JobContext,
    PayloadBudget,
    PutBack,
    ScheduledJob,
    ShardedQueue,
    payload_bytes,
    wait_until,
)
from eventsched.core.runtime import metrics, tracing
from eventsched.core.runtime.contracts import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    load_handler,
)
from eventsched.core.runtime.errors import DependencyError, describe
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.settings import Settings
from eventsched.core.store import executions
from eventsched.core.store.executions import (
    Claimed,
    ClaimRequest,
    ClaimResult,
    NotClaimed,
    NotDue,
    Outcome,
)
from eventsched.core.store.groupcommit import GroupCommit
from eventsched.plugins.executor.deadletters import DeadLetters
from eventsched.plugins.executor.lease import Fenced, Leases, Running
from eventsched.plugins.executor.retry import Failure, decide, retry_delay

T = TypeVar("T")

#: Seconds a job keeps re-sending its claim while PostgreSQL is unreachable before it gives
#: up (the reconciler re-enqueues the event later).
CLAIM_PATIENCE: Final = 10.0
#: Same for the outcome; giving up leaves the event `running` for the reconciler's
#: stale-running path (the handler would then run again).
RECORD_PATIENCE: Final = 60.0
#: Event types used as metric labels: those named in settings; any other is "other".
OTHER_TYPE: Final = "other"
#: Seconds between two outcome statements at least (write-behind: nobody waits for them).
#: PostgreSQL's CPU per event falls with the batch (bench.pg_statements: ~150 µs at 10 per
#: statement, ~90 µs at 25 or more): at a steady 1,000 events/s, 25 ms batches ~25 outcomes.
OUTCOME_INTERVAL: Final = 0.025
#: Statement sizes of the group commits.
MAX_BATCH: Final = 500
#: Seconds before its due time a job may be taken (the worker's claim-ahead window); the
#: claim refuses an event due later than this (its job came early) and puts the job back.
CLAIM_AHEAD: Final = 0.04
#: Seconds between two claims of the worker's dispatcher at least, while jobs come due one
#: by one at a steady rate: the jobs due within it share one Redis claim and one PostgreSQL
#: claim statement. Each claim costs a Redis script, a PostgreSQL statement and their loop
#: trips whatever it carries, so at a steady rate the cost per job falls with the batch
#: (measured at 1,000 events/s: executor 0.84 -> 0.38 ms of CPU per job, PostgreSQL 0.27 ->
#: 0.10 cores, from a 2 ms interval to this one with a 40 ms window). The claim of the last
#: job of an interval still has CLAIM_AHEAD - CLAIM_INTERVAL (20 ms) for its round trips
#: before the job is due. A backlog (a burst) is claimed back to back, not at this pace.
CLAIM_INTERVAL: Final = 0.02
#: Worker slots beyond ``executor.concurrency``: jobs taken ahead that are being claimed or
#: wait for their due time hold a slot but no handler slot, so a process with few handler
#: slots still claims ahead. About rate x CLAIM_AHEAD (rate / 25) of them are busy: 256
#: cover ~6,400 events/s per process (64 covered ~1,600/s; beyond that jobs were claimed
#: only once a slot freed, after their due time).
AHEAD_SLOTS: Final = 256


def failure_text(err: BaseException) -> str:
    """The text of a handler's failure, as stored in ``events.last_error`` and
    ``event_attempts.error``, logged and published in the DLQ ``dlq-error`` header:
    :func:`~eventsched.core.runtime.errors.describe` with URL credentials, query values,
    token-like path segments and conninfo passwords redacted (whatever handler raised it)."""
    return redact(describe(err))


class Attempts:
    """Runs attempts of events for the executor role (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: ShardedQueue,
        worker_id: str,
        dead_letters: DeadLetters,
        leases: Leases,
        budget: PayloadBudget | None,
        log: Any,  # the role's bound logger
    ) -> None:
        s = self.settings = settings
        self._jobs = jobs
        self._log = log
        self.dead_letters = dead_letters
        self._leases = leases
        # Payload bytes in flight (None: unbounded), settled once a claim tells the size.
        self._budget = budget
        self.policies = Policies(s)
        self._saq_timeout = saq_timeout(s)
        self._rng = random.Random()
        #: The one HTTP client shared by every handler (None until a handler asks for it).
        self.http: httpx.AsyncClient | None = None
        self._handlers, self._default = self._load_handlers()
        named = {*s.handlers, *s.types, *s.producer.event_types, *s.webhooks}
        known = named - {"default"}
        self._labels = frozenset(known)
        # Metric children looked up once (labels() costs more than the observation).
        self._durations = {t: metrics.EXECUTION_DURATION.labels(t) for t in {*known, OTHER_TYPE}}
        self.claims: GroupCommit[ClaimRequest, ClaimResult] = GroupCommit(
            "claim",
            functools.partial(executions.claim_batch, worker_id=worker_id, ahead=CLAIM_AHEAD),
            key=lambda r: r.event_id,
            max_batch=MAX_BATCH,
        )
        self.finishes: GroupCommit[Outcome, str] = GroupCommit(
            "finish",
            executions.finish_outcomes,
            key=lambda o: o.event_id,
            max_batch=MAX_BATCH,
            after_batch=self._after_outcomes,
            patience=RECORD_PATIENCE,
            min_interval=OUTCOME_INTERVAL,
        )
        # Outcomes are written behind (the job returns at once) until this many wait; then
        # jobs wait for their own write, which slows intake instead of growing memory.
        self._write_behind_limit = max(MAX_BATCH, 2 * s.executor_concurrency)
        # Handlers running at once (executor.concurrency); the worker has AHEAD_SLOTS more
        # slots, for jobs that are claimed and wait for their due time.
        self._handler_slots = asyncio.Semaphore(s.executor_concurrency)
        #: Retry enqueues in progress (the role waits for them before it stops).
        self.retrying: set[asyncio.Task[None]] = set()
        # The trace of each event whose attempt runs or awaits its outcome (event id ->
        # traceparent or None), for its retry's job; dropped with the outcome.
        self._traces: dict[str, str | None] = {}

    # -- handlers ------------------------------------------------------------------------------

    def _load_handlers(self) -> tuple[dict[str, Handler], Handler | None]:
        """Load every configured handler now (each type's, by its policy, and the default's):
        a bad one stops start-up (PluginError)."""
        loaded: dict[tuple[str, str], Handler] = {}

        def load(policy: TypePolicy) -> Handler | None:
            if policy.handler is None:
                return None
            where = (policy.handler_key, policy.handler)
            if where not in loaded:
                context = HandlerContext(self.settings, policy.handler_key, self._http_client)
                loaded[where] = load_handler(policy.handler_key, policy.handler, context)
            return loaded[where]

        handlers: dict[str, Handler] = {}
        for type_ in {*self.settings.handlers, *self.settings.types} - {"default"}:
            handler = load(self.policies[type_])
            if handler is not None:
                handlers[type_] = handler
        return handlers, load(self.policies.default)

    def _http_client(self) -> httpx.AsyncClient:
        """The one HTTP client shared by every handler (asyncio side; created on first use)."""
        if self.http is None:
            self.http = httpx.AsyncClient(
                timeout=float(self.settings.executor.webhook.timeout),
                limits=httpx.Limits(max_connections=max(10, self.settings.executor_concurrency)),
            )
        return self.http

    def handler_for(self, type_: str) -> Handler | None:
        return self._handlers.get(type_, self._default)

    def label(self, type_: str | None) -> str:
        return type_ if type_ is not None and type_ in self._labels else OTHER_TYPE

    # -- the job function (asyncio side) --------------------------------------------------------

    def job_for(
        self,
        event_id: str,
        attempt: int,
        scheduled: float,
        type_: str | None = None,
        traceparent: str | None = None,
        day: date | None = None,
        size: int | None = None,
    ) -> ScheduledJob:
        """The job of an event's attempt: the job contract, with this role's SAQ timeout
        (and the type's lane, when the caller knows the type; the event's trace context;
        its partition day, when the caller read it with the event; its payload's size, when
        the caller has the payload)."""
        return make_job(
            event_id, attempt, scheduled, self._saq_timeout, lane=self.policies.lane_of(type_),
            traceparent=traceparent, day=day, size=size,
        )  # fmt: skip

    async def execute_event(
        self,
        ctx: JobContext,
        *,
        event_id: str,
        attempt: int | None = None,
        traceparent: str | None = None,
        day: str | None = None,
        **newer: object,
    ) -> None:
        """SAQ job function: run the attempt of an event that the job's ``attempt`` kwarg
        names (absent: the first; see :func:`~eventsched.core.domain.jobcontract.attempt_of`);
        ``traceparent``: the event's trace, which the attempt's span joins; ``day``: the
        event's partition day, the claim's hint (absent or stale: it is looked up).
        ``newer``: kwargs a later version of the job contract added, ignored: they are
        optional hints by the contract's rule, so roles can be upgraded in any order."""
        claimed = time.time()
        number = attempt_of(attempt)
        try:
            uuid.UUID(event_id)
        except (ValueError, TypeError, AttributeError):
            self._log.error("job_with_bad_event_id", event_id=repr(event_id))
            return
        # Held back by a limit of its type (the claim script said so), or free to run.
        held = self._jobs.held_reason(ctx["job"]) if "job" in ctx else ""
        # A claim asks for the first attempt with 0 (see ClaimRequest).
        request = ClaimRequest(
            event_id, 0 if is_first_attempt(number) else number, claimed, held or None,
            day_of(day),
        )  # fmt: skip
        claim = await self._patiently(self.claims, request, CLAIM_PATIENCE)
        if claim is None:
            return  # PostgreSQL unreachable: the reconciler re-enqueues the event
        size: int | None = None  # the payload's JSON size, once needed
        if self._budget is not None and "job" in ctx:
            size = payload_bytes(claim.payload) if isinstance(claim, Claimed) else 0
            self._budget.settle(ctx["job"].id, size)
        if isinstance(claim, NotClaimed):
            self._skipped(claim, number)
            return
        if isinstance(claim, NotDue):
            metrics.CLAIMS_NOT_DUE.inc()
            self._log.warning(
                "job_came_early", event_id=event_id, job_attempt=number,
                scheduled_for=claim.scheduled_for,
                early_s=round(claim.scheduled_for - claimed, 3),
                note="put back at the due time",
            )  # fmt: skip
            raise PutBack(claim.scheduled_for)
        label = self.label(claim.type)
        task = asyncio.current_task()
        assert task is not None  # SAQ runs job functions in a task
        # The claim set updated_at = now() no earlier than claim.sent: the lease starts
        # there (not at our submission, which may have waited for a connection).
        lease_start = claim.sent
        running = self._leases.hold(event_id, claim.attempt, lease_start, task)
        parent = tracing.parse_traceparent(traceparent)
        with tracing.span(
            f"execute {claim.type}",
            kind="consumer",
            parent=parent,
            attributes={
                "eventsched.event.id": event_id,
                "eventsched.event.type": claim.type,
                "eventsched.attempt": claim.attempt,
            },
        ) as current:
            # The event's trace for the retries: its own, or (none came with it) this
            # first attempt's, so later attempts join one trace all the same.
            own = tracing.current_traceparent()
            if parent or own:
                self._traces[event_id] = parent or own
            try:
                # The claim was made up to CLAIM_AHEAD before the due time (the worker hands
                # jobs out that early): the handler starts at the due time, never before.
                await wait_until(claim.scheduled_for)
                async with self._handler_slots:  # no wait unless every handler slot is busy
                    failure = await self._run_handler(claim, label, ctx, running, own or parent)
            except asyncio.CancelledError:
                running.finished = time.monotonic()
                tracing.fail(current, "interrupted")
                self._record_interrupted(claim, label, running.started)
                raise
            if running.started is not None:
                tracing.set_attributes(
                    current,
                    {"eventsched.lateness_s": round(running.started - claim.scheduled_for, 6)},
                )
            if failure is not None:
                tracing.fail(current, failure.error)
        running.finished = time.monotonic()
        started = running.started
        if started is not None:
            # Lateness where an outsider sees it: the handler's invocation minus the due time.
            late = started - claim.scheduled_for
            if held:
                metrics.EXECUTION_HELD.labels(label, held).observe(late)
            else:
                metrics.EXECUTION_LATENESS.observe(late)
        policy = self.policies[claim.type]
        if failure is not None and size is None:
            size = payload_bytes(claim.payload)  # for a retry's job (the budget's hint)
        outcome = decide(
            event_id,
            claim.attempt,
            failure,
            max_attempts=policy.max_retries,
            now=time.time(),
            delay=lambda n: retry_delay(n, policy.retry_backoff, self._rng),
            label=label,
            base=claim.base,
            started=started,
            day=claim.day,
            size=size,
        )
        await self._record(outcome)

    async def _run_handler(
        self,
        claim: Claimed,
        label: str,
        ctx: JobContext,
        running: Running,
        traceparent: str | None = None,
    ) -> Failure | None:
        # The attempt's start, at or after its due time; the handler's invocation below
        # replaces it (an attempt that fails before that records when it was given up).
        running.started = time.time()
        if not running.lease_ok():
            # The claim took longer than the lease (PostgreSQL slow or unreachable).
            return Failure(f"lease lost before the handler started ({self._leases.lease:g}s)")
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
            traceparent=traceparent,
        )
        limit = self._handler_timeout(ctx, self.policies[claim.type].timeout)
        began = time.perf_counter()
        # No asyncio.timeout here: under trio-asyncio every timer costs two trips through
        # the loop (queued, then popped, even when cancelled) and stays in its heap until it
        # would have fired; :meth:`_reap` cancels overdue handlers from one periodic scan.
        running.deadline = time.monotonic() + limit
        running.started = time.time()
        try:
            await Fenced(handler(event), running)
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
                return Failure(
                    f"lease lost: no heartbeat reached PostgreSQL for {self._leases.lease:g}s"
                )
            return Failure(f"handler timed out after {limit:g}s")
        except PermanentError as err:
            return Failure(failure_text(err), permanent=True)
        except Exception as err:
            return Failure(failure_text(err))
        finally:
            running.deadline = math.inf
            self._durations[label].observe(time.perf_counter() - began)
        if running.cancelled and running.task.cancelling():
            running.task.uncancel()  # the handler swallowed our cancellation
        return None

    @staticmethod
    def _handler_timeout(ctx: JobContext, timeout: float) -> float:
        # SAQ cancels the job at its own timeout (set by whoever enqueued it); ours must
        # fire first so the failure is recorded and retried rather than cut off.
        saq_limit = ctx["job"].timeout if "job" in ctx else 0
        if saq_limit:
            return min(timeout, max(0.5 * saq_limit, saq_limit - 5.0))
        return timeout

    def _skipped(self, claim: NotClaimed, attempt: int) -> None:
        metrics.EXECUTIONS.labels(self.label(claim.type), "skipped_duplicate").inc()
        if claim.type is None:
            self._log.warning("job_for_unknown_event", event_id=claim.event_id)
        else:
            self._log.info(
                "skipped_duplicate",
                event_id=claim.event_id,
                job_attempt=attempt,
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
        if self.finishes.backlog < self._write_behind_limit:
            self.finishes.submit_nowait(outcome)
            return
        recorded = await self._patiently(self.finishes, outcome, RECORD_PATIENCE)
        if recorded is None:
            self._leases.release(outcome.event_id, outcome.attempt)
            self._traces.pop(outcome.event_id, None)
            self._log.error(
                "outcome_not_recorded", event_id=outcome.event_id, attempt=outcome.attempt,
                outcome=outcome.status, note="reconciler recovers it as stale running",
            )  # fmt: skip
        # Metrics, retries and dead letters follow in _after_outcomes, as for write-behind.

    def _after_outcomes(self, outcomes: Sequence[Outcome], recorded: Sequence[str]) -> None:
        """After a batch of outcomes committed (on the loop): count, log, enqueue retries
        (one Redis call per batch, in a task), hand dead events to the DLQ publisher. A
        failure recorded as ``cancelled`` (a cancel command came while it ran) gets neither."""
        retries: list[ScheduledJob] = []
        # Events of laned types that ended (succeeded, dead, cancelled): drop their lane
        # marks (a replay or a retry command marks the event again).
        done_laned: list[str] = []
        counts: Counter[tuple[str, str]] = Counter()  # one inc() per label and status
        for outcome, status in zip(outcomes, recorded, strict=True):
            self._leases.release(outcome.event_id, outcome.attempt)
            traceparent = self._traces.pop(outcome.event_id, None)
            if status == executions.DISCARDED:
                # Someone else moved the event on (the reconciler took the attempt over).
                self._log.warning(
                    "outcome_discarded", event_id=outcome.event_id, attempt=outcome.attempt,
                    outcome=outcome.status,
                )  # fmt: skip
                continue
            counts[outcome.label, "retried" if status == "retrying" else status] += 1
            if status != "retrying" and self.policies.lane_of(outcome.label):
                done_laned.append(outcome.event_id)
            if status == "succeeded":
                continue
            if status == "cancelled":
                self._log.info(
                    "attempt_failed_after_cancel", event_id=outcome.event_id,
                    attempt=outcome.attempt, error=outcome.error,
                    note="a cancel was requested while it ran: no retry",
                )  # fmt: skip
                continue
            if status == "retrying":
                assert outcome.next_attempt_at is not None  # decide() sets it for retrying
                at, label = outcome.next_attempt_at, outcome.label
                job = self.job_for(
                    outcome.event_id, outcome.attempt + 1, at, label, traceparent,
                    day=outcome.day, size=outcome.size,
                )  # fmt: skip
                retries.append(job)
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
        self._jobs.forget_lanes_nowait(done_laned)
        if retries:
            task = asyncio.ensure_future(self._enqueue_retries(retries))
            self.retrying.add(task)
            task.add_done_callback(self.retrying.discard)

    async def _enqueue_retries(self, jobs: list[ScheduledJob]) -> None:
        try:
            await self._jobs.aio_enqueue(jobs)
        except REDIS_ERRORS as err:
            # The events are `retrying` in PostgreSQL; the reconciler enqueues them after grace.
            self._log.warning(
                "retry_enqueue_failed", jobs=[job.key for job in jobs], error=redact(str(err))
            )

    def _record_interrupted(self, claim: Claimed, label: str, started: float | None) -> None:
        """The job is being cancelled (shutdown past its grace, SAQ's own timeout): record
        the attempt as failed (written behind, so the cancellation is not delayed; the
        executor flushes the writes before it stops) and retry at once."""
        outcome = decide(
            claim.event_id,
            claim.attempt,
            Failure("interrupted: the executor stopped before the handler finished"),
            max_attempts=self.policies[claim.type].max_retries,
            now=time.time(),
            delay=lambda _: 0.0,
            label=label,
            base=claim.base,
            started=started,
            day=claim.day,
            size=payload_bytes(claim.payload),
        )
        self.finishes.submit_nowait(outcome)

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

    @property
    def store_stats(self) -> dict[str, tuple[int, int]]:
        """(statements, requests) per group commit."""
        return {
            self.claims.name: (self.claims.batches, self.claims.requests),
            self.finishes.name: (self.finishes.batches, self.finishes.requests),
        }
