"""The dead-letter publisher of the executor: dead events -> the DLQ topic, after their
``dead`` state is committed (PostgreSQL is the outbox: ``dlq_published_at IS NULL``).

:meth:`DeadLetters.submit_nowait` is called from job functions (asyncio side) and by the
reconciler; :meth:`DeadLetters.run` is a trio task that reads the rows, publishes through
the Kafka producer adapter (its own worker thread) and marks them published.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final

import trio

from eventsched.core.domain.deadletter import (
    DLQ_MAX_BYTES,
    DLQ_MIN_BYTES,
    dlq_headers,
    fit_dead_letter,
)
from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import encode_event, kafka_headers
from eventsched.core.kafka import KafkaProducer, OutboundMessage
from eventsched.core.runtime import metrics
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.store import recovery
from eventsched.core.store.executions import DeadEvent
from eventsched.core.store.pool import Database

if TYPE_CHECKING:
    from eventsched.core.runtime.health import Health

# One logger name for the whole role, as before it was split into modules.
log = get_logger("eventsched.plugins.executor")

#: Dead events read and published in one round, at most.
MAX_BATCH: Final = 500


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
