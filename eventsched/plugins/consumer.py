"""The consumer role: Kafka ``events`` -> PostgreSQL (source of truth) -> SAQ jobs in Redis.

Per Kafka batch, in three steps; up to ``PARALLEL_BATCHES`` batches are in the first two at
once (batch N+1 is decoded and scheduled while batch N is inserted), the inserts run one
batch at a time in fetch order, and commits follow fetch order:

1. *record*: decode every message (:func:`decode_event`); invalid ones go to the DLQ topic
   with their original bytes, key and headers plus the reason headers; valid ones are
   inserted into PostgreSQL with ONE statement (``ON CONFLICT (idempotency_key) DO
   NOTHING``), then the keys that already existed are looked up.
2. *schedule*: one pipelined enqueue of a SAQ job (the executor's contract,
   :func:`eventsched.core.domain.jobcontract.make_job`: key = event id, scheduled = due time) for
   every event of the batch whose row is still ``scheduled`` - new rows and rows a crashed
   run inserted but never enqueued (enqueueing a pending key again is a no-op).
3. *commit*: the batch's offsets; batches that became durable while a commit was in flight
   are merged into the next commit.

So an offset is committed only once everything before it is durable in PostgreSQL and
Redis (and DLQ deliveries are acknowledged, or the refused copies kept in PostgreSQL); a crash anywhere means redelivery, which the
idempotency key and the job key make harmless.

Failures:

* A dependency down (``DependencyError``: PostgreSQL, Redis, broker) is retried with
  exponential backoff and jitter for as long as it takes; meanwhile fetching is paused,
  ``/readyz`` names the dependency and nothing is committed or skipped. It never sends a
  message to the DLQ.
* PostgreSQL refusing the data of the batch (``RowsRejected``) is narrowed down by splitting
  the batch in halves; a single row still refused after ``consumer.max_retries`` attempts
  goes to the DLQ with reason ``db_rejected``.
* Dead-letter copies are cut to the budget of :func:`~eventsched.core.domain.deadletter.fit_dead_letter`
  (the key, the original headers, the value, each only as far as needed; ``dlq-truncated-*``
  headers say what was cut). A copy the topic refuses for what it is (still too large,
  invalid record) is kept in PostgreSQL (``dlq_undeliverable``) and the batch moves on; any
  other delivery failure is a dependency failure (retried, never skipped) and marks the role
  stalled (``dlq_failing``) until the copies are acknowledged.
* The same idempotency key with other content (another id, type, payload or due time):
  the first event wins; the later message counts as ``duplicate`` and is logged as
  ``conflicting_duplicate`` with both ids.

Rebalances: the revoke hook waits (``consumer.revoke_wait``) for the batches in flight and
commits what is durable; the adapter refuses commits for partitions that moved meanwhile.
A consumer left without partitions for ``consumer.unassigned_grace`` while records wait
that no member commits reports itself stalled (``/readyz`` 503; see ``_watch_assignment``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypeVar

import tenacity
import trio

from eventsched.core.domain.deadletter import (
    DLQ_MIN_BYTES,
    DLQ_TRUNCATED_PREFIX,
    dlq_headers,
    fit_dead_letter,
)
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event
from eventsched.core.domain.jobcontract import make_job, saq_timeout
from eventsched.core.jobqueue import ScheduledJob
from eventsched.core.kafka import (
    Admin,
    Batch,
    ClientKind,
    EmptyPartitions,
    KafkaConsumer,
    OutboundMessage,
    Record,
    TopicPartitionKey,
    config_from_settings,
)
from eventsched.core.runtime import metrics
from eventsched.core.runtime.contracts import RoleContext
from eventsched.core.runtime.errors import DecodeError, DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.store import deadletters
from eventsched.core.store import events as eventstore
from eventsched.core.store.events import IngestRow, RowsRejected, StoredEvent

log = get_logger(__name__)
T = TypeVar("T")

#: DLQ reason for a row PostgreSQL refused even alone (decode reasons come from core.domain.decode).
DB_REJECTED: Final = "db_rejected"
#: Durable batches that may wait for the committer before scheduling waits too.
COMMIT_BACKLOG: Final = 4
#: Batches being recorded and scheduled at once. The consumer is latency-bound (it waits
#: for PostgreSQL, then for Redis), so a second batch overlaps the waits; the INSERTs still
#: run one at a time in fetch order (the first of two conflicting duplicates wins, and two
#: INSERTs never wait on each other's keys).
PARALLEL_BATCHES: Final = 2
#: The stall reason (``eventsched_role_stalled`` label) while dead letters cannot be sent.
DLQ_FAILING: Final = "dlq_failing"


@dataclass(slots=True)
class _Recorded:
    """A batch after stage 1: durable in PostgreSQL, bad messages acknowledged by the DLQ.

    Holds what the commit and the metrics need, not the records: up to COMMIT_BACKLOG of
    these wait for the committer, and their messages need not stay in memory meanwhile."""

    #: The assignment generation the batch was fetched under (for the commit).
    generation: int
    #: Broker timestamps (ms) of the batch's records, for the ingest latency histogram.
    timestamps_ms: list[int]
    #: Per partition, the offset to commit once this batch is done.
    offsets: dict[TopicPartitionKey, int]
    jobs: list[ScheduledJob]
    new: int
    duplicates: int
    invalid: int
    dlq_reasons: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _InFlight:
    """A batch between fetch and commit: set when it is recorded and scheduled, and
    ``inserted`` once its INSERT ran (the next batch's INSERT waits for it)."""

    inserted: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    result: _Recorded | None = None


@dataclass(frozen=True, slots=True)
class _Invalid:
    record: Record
    reason: str
    error: str


@dataclass(frozen=True, slots=True)
class _Copy:
    """The dead-letter copy of one bad message, as it is sent now."""

    item: _Invalid
    #: The headers before any cut (the original ones, then ours).
    headers: list[tuple[str, bytes | None]]
    message: OutboundMessage
    #: Already cut to DLQ_MIN_BYTES: a copy refused for its size now goes to PostgreSQL.
    smallest: bool = False

    def cut_to_minimum(self) -> _Copy | None:
        """The copy cut to DLQ_MIN_BYTES, or None when that changes nothing."""
        if self.smallest:
            return None
        record = self.item.record
        key, value, headers = fit_dead_letter(
            record.key, record.value or b"", self.headers, budget=DLQ_MIN_BYTES
        )
        if (key, value, headers) == (self.message.key, self.message.value, self.message.headers):
            return None
        message = _outbound(self.message.topic, key, value, headers)
        return _Copy(self.item, self.headers, message, smallest=True)


class IngestConsumer:
    """The consumer role plugin (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"postgres", "redis", "kafka_producer"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        s = ctx.settings.consumer
        self._db = ctx.resources.require_db()
        self._queue = ctx.resources.require_queue()
        self._producer = ctx.resources.require_kafka_producer()
        self._limits = DecodeLimits.from_settings(s)
        self._consumer_id = f"{socket.gethostname()}:{os.getpid()}"
        self._job_timeout = saq_timeout(ctx.settings)
        self._consumer: KafkaConsumer | None = None
        # Dependencies whose failure paused consumption: name -> problem.
        self._failing: dict[str, str] = {}
        # Batches taken from the adapter and not yet committed (or given up).
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        # For the lag gauge: offsets committed by us, and the end of what we fetched.
        self._committed: dict[TopicPartitionKey, int] = {}
        self._fetched_end: dict[TopicPartitionKey, int] = {}
        # One token per _dead_letter call whose delivery is failing (the stall is cleared
        # when none is left).
        self._dlq_failing: set[object] = set()
        self._log = log.bind(role=ctx.role)

    # -- life cycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Ready means ready: join the group only once PostgreSQL (with its schema) and Redis
        # answer, so partitions go to members that can work.
        with trio.CancelScope() as waiting:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, self.ctx.stopping, waiting)
                await self._retrying(eventstore.check_schema, self._db)
                await self._retrying(self._queue.ping)
                nursery.cancel_scope.cancel()
        if self.ctx.stopping.is_set():
            task_status.started()
            return
        s, k = self.settings.consumer, self.settings.kafka
        config = config_from_settings(
            self.settings,
            ClientKind.GROUP_CONSUMER,
            own={
                "group.id": k.consumer_group,
                "client.id": f"eventsched-consumer-{self._consumer_id}",
            },
        )
        async with KafkaConsumer.open(
            config,
            [k.topic],
            max_batch=s.max_batch,
            poll_timeout=s.batch_timeout,
            on_revoke=self._on_revoke,
            hook_timeout=s.revoke_wait + 5.0,
            close_timeout=min(10.0, self.settings.shutdown.grace),
        ) as consumer:
            self._consumer = consumer
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stop_intake_on_stopping, consumer)
                    nursery.start_soon(self._refresh_lag, consumer)
                    nursery.start_soon(self._watch_assignment, consumer)
                    await self._pipeline(consumer)
                    nursery.cancel_scope.cancel()
            finally:
                # Nothing is in flight any more (done or cancelled): the revoke hook that
                # runs while the consumer closes must not wait for it.
                self._in_flight = 0
                self._idle.set()
        self._log.info("consumer_stopped", **_stats(consumer))

    async def _stop_intake_on_stopping(self, consumer: KafkaConsumer) -> None:
        await self.ctx.stopping.wait()
        self._log.info("consumer_stopping_intake")
        consumer.stop()

    async def _pipeline(self, consumer: KafkaConsumer) -> None:
        """Record and schedule up to PARALLEL_BATCHES batches at once (their INSERTs one at a
        time, in fetch order), commit in fetch order. A batch is taken from the adapter only
        when a slot is free, so no more batches are held than before."""
        to_commit, committing = trio.open_memory_channel[_Recorded](COMMIT_BACKLOG)
        to_order, ordering = trio.open_memory_channel[_InFlight](PARALLEL_BATCHES)
        slots = trio.Semaphore(PARALLEL_BATCHES)
        previous = _InFlight()
        previous.inserted.set()
        batches = consumer.batches()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit_all, committing, consumer)
            nursery.start_soon(self._in_fetch_order, ordering, to_commit)
            async with to_order:
                while True:
                    await slots.acquire()
                    try:
                        batch = await batches.__anext__()
                    except StopAsyncIteration:
                        break
                    self._in_flight += 1
                    if self._idle.is_set():
                        self._idle = trio.Event()
                    metrics.CONSUMER_BATCH_SIZE.observe(len(batch))
                    current = _InFlight()
                    await to_order.send(current)
                    nursery.start_soon(self._process, batch, previous, current, slots)
                    previous = current

    async def _process(
        self, batch: Batch, previous: _InFlight, current: _InFlight, slots: trio.Semaphore
    ) -> None:
        try:
            recorded = await self._record(batch, after=previous.inserted, inserted=current.inserted)
            if recorded.jobs:
                added = await self._retrying(self._queue.enqueue_many, recorded.jobs)
                metrics.JOBS_SCHEDULED.inc(added)
                recorded.jobs = []  # scheduled: not needed while the commit waits
            current.result = recorded
            current.done.set()
        finally:
            slots.release()

    async def _in_fetch_order(
        self,
        receive: trio.MemoryReceiveChannel[_InFlight],
        send: trio.MemorySendChannel[_Recorded],
    ) -> None:
        async with receive, send:
            async for in_flight in receive:
                await in_flight.done.wait()
                assert in_flight.result is not None  # set before done
                await send.send(in_flight.result)

    async def _commit_all(
        self, receive: trio.MemoryReceiveChannel[_Recorded], consumer: KafkaConsumer
    ) -> None:
        """Commit durable batches; batches that became durable during a commit are merged
        into the next one, so a slow commit (a round trip to the group coordinator, taken
        between two consume() calls of the consumer thread) does not slow the pipeline."""
        async with receive:
            async for first in receive:
                done = [first]
                while True:
                    try:
                        done.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(consumer, done)
                self._account(done)
                self._in_flight -= len(done)
                if self._in_flight == 0:
                    self._idle.set()

    # -- stage 1: decode, record, dead-letter ------------------------------------------

    async def _record(self, batch: Batch, *, after: trio.Event, inserted: trio.Event) -> _Recorded:
        """Decode, then (once ``after`` is set) insert, look up duplicates and dead-letter;
        sets ``inserted`` as soon as its INSERT is done."""
        now = datetime.now(UTC)
        limits = self._limits
        rows: list[IngestRow] = []
        invalid: list[_Invalid] = []
        first_by_key: dict[str, IngestRow] = {}
        later: list[IngestRow] = []  # same key as an earlier message of this batch
        for record in batch.records:
            try:
                event = decode_event(
                    record.value,
                    now=now,
                    limits=limits,
                    headers=dict(record.headers) if record.headers else None,
                )
            except DecodeError as err:
                invalid.append(_Invalid(record, err.reason, err.detail))
                continue
            row = IngestRow(event, record.topic, record.partition, record.offset)
            if event.idempotency_key in first_by_key:
                later.append(row)
            else:
                first_by_key[event.idempotency_key] = row
                rows.append(row)

        await after.wait()
        try:
            new_keys, rejected = await self._insert(rows)
        finally:
            inserted.set()  # on failure the pipeline is being torn down anyway
        for row, problem in rejected:
            invalid.append(_Invalid(_record_of(batch, row), DB_REJECTED, problem))
        rejected_keys = {row.event.idempotency_key for row, _ in rejected}
        existing_rows = [
            row
            for row in rows
            if row.event.idempotency_key not in new_keys
            and row.event.idempotency_key not in rejected_keys
        ]
        existing: dict[str, StoredEvent] = {}
        if existing_rows:
            existing = await self._retrying(eventstore.lookup_existing, self._db, existing_rows)

        jobs = [
            self._job(row.event.id, row.event.execute_at)
            for row in rows
            if row.event.idempotency_key in new_keys
        ]
        for row in existing_rows:
            stored = existing.get(row.event.idempotency_key)
            if stored is None:
                # Cannot happen unless someone deletes rows: a conflict means a committed row.
                self._log.error(
                    "idempotency_key_vanished",
                    idempotency_key=row.event.idempotency_key,
                    partition=row.partition,
                    offset=row.offset,
                )
                continue
            if not stored.same:
                self._conflict(row, stored.id)
            if stored.status == "scheduled":
                jobs.append(self._job(stored.id, stored.execute_at))
        for row in later:
            first = first_by_key[row.event.idempotency_key]
            if not _same_event(first.event, row.event):
                self._conflict(row, first.event.id)

        delivered = await self._dead_letter(invalid) if invalid else []
        offsets = batch.next_offsets()
        for key, offset in offsets.items():
            self._fetched_end[key] = max(self._fetched_end.get(key, 0), offset)
        return _Recorded(
            generation=batch.generation,
            timestamps_ms=[
                r.timestamp_ms
                for r in batch.records
                if r.timestamp_ms is not None and r.timestamp_ms >= 0
            ],
            offsets=offsets,
            jobs=jobs,
            new=len(new_keys),
            duplicates=len(existing_rows) + len(later),
            invalid=len(invalid),
            dlq_reasons=delivered,
        )

    async def _insert(
        self, rows: Sequence[IngestRow]
    ) -> tuple[set[str], list[tuple[IngestRow, str]]]:
        """Insert rows; returns (new keys, rows refused even alone with the reason)."""
        if not rows:
            return set(), []
        try:
            return await self._retrying(eventstore.insert_events, self._db, rows), []
        except RowsRejected as err:
            if len(rows) == 1:
                return await self._insert_one(rows[0], err)
        # Some row's data is refused: halve until the culprits are alone (about
        # 2 * log2(len(rows)) statements per bad row instead of one per row).
        middle = len(rows) // 2
        new_a, rejected_a = await self._insert(rows[:middle])
        new_b, rejected_b = await self._insert(rows[middle:])
        return new_a | new_b, rejected_a + rejected_b

    async def _insert_one(
        self, row: IngestRow, first_error: RowsRejected
    ) -> tuple[set[str], list[tuple[IngestRow, str]]]:
        error = first_error
        for attempt in range(1, self.settings.consumer.max_retries):
            await trio.sleep(min(self.settings.consumer.backoff_initial * 2 ** (attempt - 1), 1.0))
            try:
                return await self._retrying(eventstore.insert_events, self._db, [row]), []
            except RowsRejected as err:
                error = err
        self._log.warning(
            "row_rejected",
            problem=error.problem,
            event_id=str(row.event.id),
            partition=row.partition,
            offset=row.offset,
            attempts=self.settings.consumer.max_retries,
        )
        return set(), [(row, error.problem)]

    def _conflict(self, row: IngestRow, winner_id: Any) -> None:
        self._log.warning(
            "conflicting_duplicate",
            idempotency_key=row.event.idempotency_key,
            kept_id=str(winner_id),
            dropped_id=str(row.event.id),
            partition=row.partition,
            offset=row.offset,
        )

    def _job(self, event_id: Any, execute_at: datetime) -> ScheduledJob:
        # The executor's job contract: first attempt, key = event id, due time in epoch s.
        return make_job(str(event_id), 1, execute_at.timestamp(), self._job_timeout)

    async def _dead_letter(self, invalid: Sequence[_Invalid]) -> list[str]:
        """Send a copy of each bad message to the DLQ topic; return once every copy is
        acknowledged, or kept in PostgreSQL when the topic refused it for a
        message-specific reason. Returns the reasons of the copies the topic took.

        Copies are cut to the dead-letter budget (``fit_dead_letter``); a dependency
        failure is retried with backoff for as long as it takes, and meanwhile the role is
        marked stalled (``dlq_failing``): ``/readyz`` answers 503 naming it."""
        failed_at = datetime.now(UTC)
        dlq_topic = self.settings.kafka.dlq_topic
        copies: list[_Copy] = []
        for item in invalid:
            record = item.record
            headers = dlq_headers(
                reason=item.reason,
                error=item.error,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                source_timestamp_ms=record.timestamp_ms,
                consumer_id=self._consumer_id,
                failed_at=failed_at,
                original=record.headers,
            )
            full = headers
            key, value, cut = fit_dead_letter(record.key, record.value or b"", full)
            self._log.warning(
                "message_dead_lettered",
                reason=item.reason,
                error=item.error,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                **_cuts(cut),
            )
            copies.append(_Copy(item, full, _outbound(dlq_topic, key, value, cut)))
        token = object()
        kept: list[_Copy] = []
        try:
            await self._retrying(self._deliver_all, copies, kept, token)
        finally:
            self._dlq_failing.discard(token)
            if not self._dlq_failing:
                self.ctx.health.unstall(self.ctx.role, DLQ_FAILING)
        kept_ids = {id(copy.item) for copy in kept}
        return [item.reason for item in invalid if id(item) not in kept_ids]

    async def _deliver_all(self, copies: list[_Copy], kept: list[_Copy], token: object) -> None:
        """Send until every copy is acknowledged or kept in PostgreSQL. ``copies`` is
        trimmed in place to what is left, so a retry (after DependencyError) sends only
        those again; ``kept`` collects the copies kept in PostgreSQL."""
        while copies:
            reports = await self._producer.send_many([copy.message for copy in copies])
            left: list[_Copy] = []
            refused: list[tuple[_Copy, str]] = []
            problem: str | None = None
            for copy, report in zip(copies, reports, strict=True):
                if report.ok:
                    continue
                assert report.error is not None
                smaller = copy.cut_to_minimum() if report.too_large else None
                if smaller is not None:
                    left.append(smaller)
                elif report.message_specific:
                    refused.append((copy, report.error))
                else:
                    left.append(copy)
                    problem = problem or report.error
            if refused:
                await self._keep_in_postgres(refused)
                kept.extend(copy for copy, _ in refused)
            copies[:] = left
            if problem is not None:
                self._dlq_failing.add(token)
                self.ctx.health.stall(self.ctx.role, DLQ_FAILING, "dead-letter delivery failing")
                raise DependencyError("kafka", f"DLQ delivery failed: {problem}")

    async def _keep_in_postgres(self, refused: Sequence[tuple[_Copy, str]]) -> None:
        """Keep copies the DLQ topic refused for what they are (the partition moves on)."""
        rows: list[deadletters.Undeliverable] = []
        for copy, error in refused:
            record, message = copy.item.record, copy.message
            if not copy.smallest:  # the table holds copies of bounded size
                smaller = copy.cut_to_minimum()
                message = smaller.message if smaller is not None else message
            self._log.error(
                "dead_letter_kept_in_postgres",
                reason=copy.item.reason,
                delivery_error=error,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            rows.append(
                deadletters.Undeliverable(
                    source_topic=record.topic,
                    source_partition=record.partition,
                    source_offset=record.offset,
                    reason=copy.item.reason,
                    error=_header_text(message, "dlq-error"),
                    delivery_error=error,
                    key=message.key,
                    value=message.value,
                    headers=list(message.headers or ()),
                    consumer_id=self._consumer_id,
                )
            )
        await self._retrying(deadletters.record, self._db, rows)
        for copy, _ in refused:
            metrics.DLQ_UNDELIVERABLE.labels(copy.item.reason).inc()

    # -- stages 2 and 3: schedule and commit -------------------------------------------

    async def _commit(self, consumer: KafkaConsumer, done: Sequence[_Recorded]) -> None:
        # One commit per assignment generation (normally one): the adapter checks each
        # partition's ownership against the generation its records were fetched under.
        by_generation: dict[int, dict[TopicPartitionKey, int]] = {}
        for recorded in done:
            offsets = by_generation.setdefault(recorded.generation, {})
            for key, offset in recorded.offsets.items():
                offsets[key] = max(offsets.get(key, 0), offset)
        for generation in sorted(by_generation):
            result = await self._retrying(
                consumer.commit, by_generation[generation], generation=generation
            )
            self._committed.update(result.committed)
            for key in result.stale:
                self._committed.pop(key, None)
            if result.stale:
                # Those records belong to another member now; it reprocesses them harmlessly.
                self._log.info("commit_stale", partitions=sorted(result.stale))

    def _account(self, done: Sequence[_Recorded]) -> None:
        committed_at = time.time()
        observe = metrics.INGEST_LATENCY.observe
        new = duplicates = invalid = 0
        for recorded in done:
            for timestamp_ms in recorded.timestamps_ms:
                observe(max(0.0, committed_at - timestamp_ms / 1000))
            new += recorded.new
            duplicates += recorded.duplicates
            invalid += recorded.invalid
            for reason in recorded.dlq_reasons:
                metrics.DLQ_MESSAGES.labels(reason).inc()
        if new:
            metrics.EVENTS_CONSUMED.labels("new").inc(new)
        if duplicates:
            metrics.EVENTS_CONSUMED.labels("duplicate").inc(duplicates)
        if invalid:
            metrics.EVENTS_CONSUMED.labels("invalid").inc(invalid)

    async def _on_revoke(self, partitions: frozenset[TopicPartitionKey]) -> None:
        """Rebalance: give the batches in flight time to be recorded and committed while we
        still own their partitions (commits made before the revocation completes count)."""
        with trio.move_on_after(self.settings.consumer.revoke_wait) as scope:
            await self._idle.wait()
        if scope.cancelled_caught:
            # Their commits will be refused as stale; the new owner reprocesses them.
            self._log.warning("revoke_before_batches_done", partitions=sorted(partitions))

    # -- dependency failures -----------------------------------------------------------

    async def _retrying(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` until it stops raising DependencyError (backoff with jitter); pause
        consumption and mark the dependency down meanwhile, undo both on success."""
        s = self.settings.consumer
        retrying = tenacity.AsyncRetrying(
            sleep=trio.sleep,
            retry=tenacity.retry_if_exception_type(DependencyError),
            # Full exponential backoff plus up to one initial step of jitter, so that several
            # consumers do not hammer a recovering server in lockstep.
            wait=tenacity.wait_exponential(multiplier=s.backoff_initial, max=s.backoff_max)
            + tenacity.wait_random(0, s.backoff_initial),
            before_sleep=self._on_dependency_failure,
            reraise=True,
        )
        result: T = await retrying(fn, *args, **kwargs)
        if self._failing:
            await self._on_recovery()
        return result

    async def _on_dependency_failure(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        err = outcome.exception() if outcome is not None else None
        if not isinstance(err, DependencyError):
            return
        first = not self._failing
        if self._failing.get(err.dependency) != err.problem:
            self.ctx.health.mark(err.dependency, err.problem)
        self._failing[err.dependency] = err.problem
        self._log.warning(
            "dependency_retry",
            dependency=err.dependency,
            error=err.problem,
            attempt=state.attempt_number,
            retry_in=round(state.upcoming_sleep, 3),
        )
        if first and self._consumer is not None:
            try:
                await self._consumer.pause()
            except DependencyError as pause_err:
                self._log.warning("pause_failed", error=str(pause_err))

    async def _on_recovery(self) -> None:
        for dependency in list(self._failing):
            self.ctx.health.mark(dependency, None)
        self._failing.clear()
        self._log.info("dependencies_recovered")
        if self._consumer is not None:
            try:
                await self._consumer.resume()
            except DependencyError as err:
                self._log.warning("resume_failed", error=str(err))

    # -- lag ---------------------------------------------------------------------------

    async def _refresh_lag(self, consumer: KafkaConsumer) -> None:
        """Keep ``eventsched_consumer_lag{partition}`` current: end of the partition minus
        the next offset this consumer will commit.

        Deliberately not ``KafkaConsumer.lag()``: that asks the broker from the consumer
        thread, one partition at a time, each request queued behind the long-polling fetch
        (~0.5 s each, measured), and the thread neither fetches nor commits meanwhile. Here
        a separate admin client asks for all partitions in one request, on a worker thread.
        The end is the larger of that answer and the end of what we fetched (Tansu answers
        ListOffsets(latest) with the start of the last record batch).
        """
        limiter = trio.CapacityLimiter(1)
        admin = Admin(
            config_from_settings(
                self.settings,
                ClientKind.ADMIN,
                # The runtime's own probe reports the broker.
                own={"error_cb": lambda err: None},
            )
        )
        shown: set[str] = set()
        while True:
            await trio.sleep(self.settings.consumer.lag_interval)
            assigned = sorted(consumer.assignment())
            try:
                ends = await trio.to_thread.run_sync(
                    admin.latest_offsets, assigned, limiter=limiter, abandon_on_cancel=True
                )
            except DependencyError as err:
                self._log.debug("lag_unavailable", error=str(err))
                continue
            current: dict[str, int] = {}
            for key in assigned:
                position = self._committed.get(key)
                if position is not None:
                    end = max(ends.get(key, 0), self._fetched_end.get(key, 0))
                    current[str(key[1])] = max(0, end - position)
            for partition, value in current.items():
                metrics.CONSUMER_LAG.labels(partition).set(value)
            for gone in shown - current.keys():
                metrics.CONSUMER_LAG.remove(gone)
            shown = set(current)

    # -- no partitions -----------------------------------------------------------------

    async def _watch_assignment(self, consumer: KafkaConsumer) -> None:
        """Report the role stalled (``unassigned``) while it has had no partitions for
        ``consumer.unassigned_grace`` and records wait that no member of the group commits;
        clear it as soon as partitions arrive.

        Having no partitions is normal for a spare member (more members than partitions),
        so it is not a stall by itself. Records wait on a partition when the group's
        committed offset there is below the end (see
        :func:`~eventsched.core.kafka.admin.waiting_work`); nobody works on them when they
        have waited behind the same committed offset for the grace too.
        So a spare beside a member that keeps committing stays ready even while records
        come in (some brokers, Tansu among them, list no member assignments in
        DescribeGroups: the committed offsets are the sign of a working member that every
        broker gives).

        Runs in trio; the broker queries run on a worker thread of their own limiter.
        """
        s, k = self.settings.consumer, self.settings.kafka
        role = self.ctx.role
        limiter = trio.CapacityLimiter(1)
        client = config_from_settings(
            self.settings,
            ClientKind.ADMIN,
            # The runtime's own probe reports the broker.
            own={"error_cb": lambda err: None},
        )
        # One admin client for every check, made at the first (the worker thread holds it
        # while it asks); a consumer that always has partitions never connects one.
        admin: Admin | None = None
        spell: float | None = None
        # Per partition where records wait, during this spell without partitions: the
        # group's committed offset and the monotonic instant records were first seen
        # waiting behind that same offset.
        unmoved: dict[int, tuple[int, float]] = {}
        empty = EmptyPartitions()
        try:
            while True:
                # Taken before looking, so that a change while we look ends the wait.
                changed = consumer.assignment_changed()
                since = consumer.unassigned_since()
                if since is None:
                    self.ctx.health.unstall(role, "unassigned")
                    spell = None
                elif since != spell:
                    # A new spell: look after one interval (most rebalances end by then).
                    spell, unmoved = since, {}
                else:
                    if admin is None:
                        admin = Admin(client)
                    try:
                        waiting = await trio.to_thread.run_sync(
                            admin.waiting_work,
                            k.consumer_group,
                            k.topic,
                            {p: end for (t, p), end in self._fetched_end.items() if t == k.topic},
                            empty,
                            5.0,
                            limiter=limiter,
                            abandon_on_cancel=True,
                        )
                    except DependencyError as err:
                        # Keep the last verdict; the runtime's broker check reports the broker.
                        self._log.debug("unassigned_check_failed", error=str(err))
                    else:
                        self._judge_unassigned(consumer, since, waiting, unmoved)
                with trio.move_on_after(s.lag_interval):
                    await changed.wait()
        finally:
            self.ctx.health.unstall(role, "unassigned")

    def _judge_unassigned(
        self,
        consumer: KafkaConsumer,
        since: float,
        waiting: dict[int, tuple[int, bool]],
        unmoved: dict[int, tuple[int, float]],
    ) -> None:
        """Stall or clear the role from one look at the group (see _watch_assignment)."""
        role, grace = self.ctx.role, self.settings.consumer.unassigned_grace
        if consumer.unassigned_since() != since:
            return  # partitions came (or came and went) while we looked
        now = time.monotonic()
        stuck: list[int] = []
        for partition, (committed, has_work) in waiting.items():
            seen = unmoved.get(partition)
            if not has_work:
                unmoved.pop(partition, None)
            elif seen is None or seen[0] != committed:
                unmoved[partition] = (committed, now)
            elif now - seen[1] >= grace:
                stuck.append(partition)
        if stuck and now - since >= grace:
            if (role, "unassigned") not in self.ctx.health.stalls:
                self._log.warning(
                    "no_partitions_while_records_wait",
                    waiting_partitions=sorted(stuck),
                    unassigned_s=round(now - since, 1),
                )
            self.ctx.health.stall(role, "unassigned", "no partitions assigned", since)
        else:
            self.ctx.health.unstall(role, "unassigned")


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _record_of(batch: Batch, row: IngestRow) -> Record:
    for record in batch.records:
        if record.partition == row.partition and record.offset == row.offset:
            return record
    raise LookupError(f"no record at {row.partition}:{row.offset}")  # rows come from batch


def _same_event(a: Event, b: Event) -> bool:
    return (
        a.id == b.id
        and a.type == b.type
        and a.execute_at == b.execute_at
        and a.payload == b.payload
    )


def _outbound(
    topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes | None]]
) -> OutboundMessage:
    # confluent-kafka accepts None header values (Kafka allows null ones).
    return OutboundMessage(topic, value, key, headers)  # type: ignore[arg-type]


def _cuts(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """The dlq-truncated-* headers of a copy, as log fields (``truncated_key=...``)."""
    return {
        "truncated_" + name[len(DLQ_TRUNCATED_PREFIX) :]: (value or b"").decode()
        for name, value in headers
        if name.startswith(DLQ_TRUNCATED_PREFIX)
    }


def _header_text(message: OutboundMessage, name: str) -> str:
    for header, value in message.headers or ():
        if header == name:
            return (value or b"").decode("ascii", "replace")
    return ""


def _stats(consumer: KafkaConsumer) -> dict[str, int]:
    stats = consumer.stats()
    return {
        "batches_fetched": stats.batches_fetched,
        "batches_delivered": stats.batches_delivered,
        "records_fetched": stats.records_fetched,
    }
