"""The consumer role plugin: :class:`IngestConsumer` runs the batch pipeline (trio side):
batches from the Kafka consumer adapter are recorded (:mod:`.record`), scheduled (one
pipelined enqueue of their SAQ jobs, then the jobs of the events their commands changed,
:mod:`.commands`) and committed in fetch order; the rebalance hook waits for the batches in
flight.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

import trio

from eventsched.core.domain.jobcontract import saq_timeout
from eventsched.core.domain.policies import Policies
from eventsched.core.jobqueue import PartlyEnqueued, ScheduledJob
from eventsched.core.kafka import (
    Batch,
    ClientKind,
    KafkaConsumer,
    TopicPartitionKey,
    config_from_settings,
)
from eventsched.core.runtime import metrics, tracing
from eventsched.core.runtime.contracts import RoleContext
from eventsched.core.runtime.logs import get_logger
from eventsched.core.store import commands as commandstore
from eventsched.core.store import events as eventstore
from eventsched.plugins.consumer.commands import Commands
from eventsched.plugins.consumer.deadletters import DeadLetterCopies
from eventsched.plugins.consumer.dependencies import DependencyRetry
from eventsched.plugins.consumer.partitions import PartitionWatch
from eventsched.plugins.consumer.record import Recorded, Recorder

# One logger name for the whole role, as before it was split into modules.
log = get_logger("eventsched.plugins.consumer")

#: Durable batches that may wait for the committer before scheduling waits too.
COMMIT_BACKLOG: Final = 4
#: Batches being recorded and scheduled at once. The consumer is latency-bound (it waits
#: for PostgreSQL, then for Redis), so a second batch overlaps the waits; the INSERTs still
#: run one at a time in fetch order (the first of two conflicting duplicates wins, and two
#: INSERTs never wait on each other's keys).
PARALLEL_BATCHES: Final = 2


@dataclass(slots=True)
class _InFlight:
    """A batch between fetch and commit: set when it is recorded and scheduled, and
    ``inserted`` once its INSERT ran (the next batch's INSERT waits for it)."""

    inserted: trio.Event = field(default_factory=trio.Event)
    #: Set once recorded and scheduled (its commands' jobs synced too).
    done: trio.Event = field(default_factory=trio.Event)
    result: Recorded | None = None


class IngestConsumer:
    """The consumer role plugin (see the package docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"postgres", "redis", "kafka_producer"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        s = ctx.settings.consumer
        self._db = ctx.resources.require_db()
        self._queue = ctx.resources.require_queue()
        self._producer = ctx.resources.require_kafka_producer()
        self._consumer_id = f"{socket.gethostname()}:{os.getpid()}"
        self._log = log.bind(role=ctx.role)
        # Batches taken from the adapter and not yet committed (or given up).
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        # For the lag gauge: offsets committed by us, and the end of what we fetched.
        self._committed: dict[TopicPartitionKey, int] = {}
        self._fetched_end: dict[TopicPartitionKey, int] = {}
        self._retrying = DependencyRetry(s, ctx.health, self._log)
        self._commands = Commands(
            db=self._db,
            queue=self._queue,
            job_timeout=saq_timeout(ctx.settings),
            retrying=self._retrying,
            log=self._log,
            lane_of=Policies(ctx.settings).lane_of,
        )
        self._recorder = Recorder(
            s,
            db=self._db,
            job_timeout=saq_timeout(ctx.settings),
            lane_of=Policies(ctx.settings).lane_of,
            dead_letters=DeadLetterCopies(
                db=self._db,
                producer=self._producer,
                topic=ctx.settings.kafka.dlq_topic,
                consumer_id=self._consumer_id,
                health=ctx.health,
                role=ctx.role,
                retrying=self._retrying,
                log=self._log,
            ),
            commands=self._commands,
            retrying=self._retrying,
            fetched_end=self._fetched_end,
            log=self._log,
        )
        self._partitions = PartitionWatch(
            ctx, committed=self._committed, fetched_end=self._fetched_end, log=self._log
        )

    # -- life cycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Ready means ready: join the group only once PostgreSQL (with its schema) and Redis
        # answer, so partitions go to members that can work.
        with trio.CancelScope() as waiting:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, self.ctx.stopping, waiting)
                await self._retrying(eventstore.check_schema, self._db)
                await self._retrying(commandstore.check_schema, self._db)
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
        started = False
        while True:
            # One Kafka consumer per pass; another pass only after a rejoin (the watch of
            # the partitions decides it, see consumer.rejoin_after): a new member id, in a
            # group the broker was made to forget.
            rejoin = trio.Event()
            async with KafkaConsumer.open(
                config,
                [k.topic],
                max_batch=s.max_batch,
                # No batch waits in the hand-off channel: the consumer thread holds the
                # next one, built, until a slot takes it (librdkafka's queue is behind it).
                buffered_batches=0,
                poll_timeout=s.batch_timeout,
                on_revoke=self._on_revoke,
                hook_timeout=s.revoke_wait + 5.0,
                close_timeout=min(10.0, self.settings.shutdown.grace),
            ) as consumer:
                self._retrying.consumer = consumer
                if not started:
                    task_status.started()
                    started = True
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._stop_intake_on_stopping, consumer)
                        nursery.start_soon(_stop_intake_when_set, rejoin, consumer)
                        nursery.start_soon(self._partitions.refresh_lag, consumer)
                        nursery.start_soon(self._partitions.watch_assignment, consumer, rejoin)
                        await self._pipeline(consumer)
                        nursery.cancel_scope.cancel()
                finally:
                    # Nothing is in flight any more (done or cancelled): the revoke hook that
                    # runs while the consumer closes must not wait for it.
                    self._in_flight = 0
                    self._idle.set()
            self._log.info("consumer_stopped", **_stats(consumer))
            if self.ctx.stopping.is_set() or not rejoin.is_set():
                return
            await self._partitions.reset_group()
            if self.ctx.stopping.is_set():
                return

    async def _stop_intake_on_stopping(self, consumer: KafkaConsumer) -> None:
        await self.ctx.stopping.wait()
        self._log.info("consumer_stopping_intake")
        consumer.stop()

    async def _pipeline(self, consumer: KafkaConsumer) -> None:
        """Record and schedule up to PARALLEL_BATCHES batches at once (their INSERTs one at a
        time, in fetch order), commit in fetch order. A batch is taken from the adapter only
        when a slot is free, so no more batches are held than before."""
        to_commit, committing = trio.open_memory_channel[Recorded](COMMIT_BACKLOG)
        to_order, ordering = trio.open_memory_channel[_InFlight](PARALLEL_BATCHES)
        slots = trio.Semaphore(PARALLEL_BATCHES)
        previous = _InFlight()
        previous.inserted.set()
        previous.done.set()
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
                    metrics.CONSUMER_BATCH_MESSAGES.observe(len(batch))
                    current = _InFlight()
                    await to_order.send(current)
                    nursery.start_soon(self._process, batch, previous, current, slots)
                    # Not kept here while waiting for a slot: _process lets it go once recorded.
                    del batch
                    previous = current

    async def _process(
        self, batch: Batch, previous: _InFlight, current: _InFlight, slots: trio.Semaphore
    ) -> None:
        try:
            # One span per batch, linked to each message's trace (tracing on only); each
            # event's own trace continues in the executor from the traceparent it keeps.
            with tracing.span(
                "process events",
                kind="consumer",
                links=(tracing.header_traceparent(r.headers) or "" for r in batch.records),
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "process",
                    "messaging.batch.message_count": len(batch.records),
                },
            ):
                recorded = await self._recorder.record(
                    batch, after=previous.inserted, inserted=current.inserted
                )
                # Recorded holds what scheduling and the commit need; the records (about
                # 1 KB each) are not kept through the enqueue, command sync and commit wait.
                del batch
                if recorded.jobs:
                    added = await self._retrying(self._enqueue, recorded.jobs)
                    metrics.JOBS_SCHEDULED.inc(added)
                    recorded.jobs = []  # scheduled: not needed while the commit waits
            if recorded.commands:
                # Redis follows the commands in log order: after the previous batch's.
                await previous.done.wait()
                await self._commands.sync(recorded.commands)
            current.result = recorded
            current.done.set()
        finally:
            slots.release()

    async def _enqueue(self, jobs: Sequence[ScheduledJob]) -> int:
        """Enqueue a batch's jobs; the new ones on shards that answered are counted even
        when another shard did not (the retry then finds them there and counts only the
        rest)."""
        try:
            return await self._queue.enqueue_many(jobs)
        except PartlyEnqueued as err:
            metrics.JOBS_SCHEDULED.inc(err.added)
            raise

    async def _in_fetch_order(
        self,
        receive: trio.MemoryReceiveChannel[_InFlight],
        send: trio.MemorySendChannel[Recorded],
    ) -> None:
        async with receive, send:
            async for in_flight in receive:
                await in_flight.done.wait()
                assert in_flight.result is not None  # set before done
                await send.send(in_flight.result)

    async def _commit_all(
        self, receive: trio.MemoryReceiveChannel[Recorded], consumer: KafkaConsumer
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

    # -- stages 2 and 3: schedule and commit -------------------------------------------

    async def _commit(self, consumer: KafkaConsumer, done: Sequence[Recorded]) -> None:
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

    def _account(self, done: Sequence[Recorded]) -> None:
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
            for applied in recorded.commands:
                result = applied.result if applied.fresh else commandstore.REPEATED
                metrics.COMMANDS.labels(applied.command.op, result).inc()
            recorded.commands = []
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


async def _stop_intake_when_set(event: trio.Event, consumer: KafkaConsumer) -> None:
    await event.wait()
    consumer.stop()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _stats(consumer: KafkaConsumer) -> dict[str, int]:
    stats = consumer.stats()
    return {
        "batches_fetched": stats.batches_fetched,
        "batches_delivered": stats.batches_delivered,
        "records_fetched": stats.records_fetched,
    }
