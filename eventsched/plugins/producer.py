"""The producer role: random events into Kafka, like the Go original, or a steady load.

* ``producer.rate == 0``: one event every ``producer.interval``.
* ``producer.rate > 0``: that many events per second, sent in batches of at most
  ``producer.batch_size`` (load generation).

Each event gets a type from ``producer.event_types``, a small payload and a due time of
``now + uniform(producer.delay_min, producer.delay_max)``. Events go through the shared
:class:`~eventsched.core.kafka.KafkaProducer` (idempotent, ``acks=all``); delivery reports
are awaited in background tasks and counted (``eventsched_events_produced_total{type}``,
``eventsched_produce_errors_total``), so a slow broker never shifts the schedule. At most
``producer.max_in_flight`` sends wait for reports at once; beyond that, generation waits
(back-pressure, on top of the adapter's own when librdkafka's local queue is full).

The timing is a schedule anchored on ``trio.current_time()`` (see :class:`RateSchedule`),
not a sleep per event, so the achieved rate does not drift. On ``ctx.stopping`` the role
stops generating and waits for outstanding reports; the runtime flushes the producer when
it closes it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

import trio

from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.kafka import OutboundMessage
from eventsched.core.runtime import metrics
from eventsched.core.runtime.contracts import RoleContext
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger

log = get_logger(__name__)

#: Wake-ups per second at most in rate mode: sends carry rate/100 events or more.
MAX_WAKEUPS: Final = 100
#: A backlog older than this (the broker stalled us) is dropped rather than burst out.
MAX_LAG: Final = 1.0


class RateSchedule:
    """How many events are due, for an exact long-run rate.

    Event ``i`` (counting from 0) is due at ``origin + i / rate``. :meth:`take` returns how
    many are due now (at most ``batch_size``) and counts them as sent; :meth:`next_wake` is
    when the next chunk (``rate / MAX_WAKEUPS`` events, at least one) will be due. If the
    caller falls more than ``max_lag`` seconds behind, the older backlog is forgotten: the
    rate is kept from then on instead of bursting to catch up.
    """

    def __init__(
        self, rate: float, batch_size: int, origin: float, *, max_lag: float = MAX_LAG
    ) -> None:
        if rate <= 0 or batch_size < 1:
            raise ValueError("rate must be positive and batch_size at least 1")
        self.rate = rate
        self.batch_size = batch_size
        self.origin = origin
        self.max_lag = max_lag
        self.sent = 0
        self.dropped = 0
        self._chunk = max(1, min(batch_size, math.floor(rate / MAX_WAKEUPS)))

    def take(self, now: float) -> int:
        due = math.floor((now - self.origin) * self.rate + 1e-9) - self.sent
        backlog_limit = max(self._chunk, math.ceil(self.rate * self.max_lag))
        if due > backlog_limit:
            self.dropped += due - backlog_limit
            self.origin += (due - backlog_limit) / self.rate
            due = backlog_limit
        count = max(0, min(due, self.batch_size))
        self.sent += count
        return count

    def next_wake(self) -> float:
        return self.origin + (self.sent + self._chunk) / self.rate


class RandomProducer:
    """The producer role plugin (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"kafka_producer"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.producer
        self.topic = ctx.settings.kafka.topic
        self._producer = ctx.resources.require_kafka_producer()
        self._in_flight = trio.Semaphore(self.settings.max_in_flight)
        self._seq = itertools.count(1)
        self._random = random.Random()
        self._headers = kafka_headers()
        self._log = log.bind(role=ctx.role)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        mode = (
            {"rate": s.rate, "batch_size": s.batch_size} if s.rate > 0 else {"interval": s.interval}
        )
        self._log.info("producer_started", topic=self.topic, **mode)
        task_status.started()
        async with trio.open_nursery() as deliveries:
            with trio.CancelScope() as generating:
                deliveries.start_soon(_cancel_when_set, self.ctx.stopping, generating)
                if s.rate > 0:
                    await self._run_rate(deliveries)
                else:
                    await self._run_interval(deliveries)
            # Leaving the nursery waits for the outstanding delivery reports.
        self._log.info("producer_stopped", generated=next(self._seq) - 1)

    async def _run_interval(self, deliveries: trio.Nursery) -> None:
        interval = float(self.settings.interval)
        origin = trio.current_time()
        tick = 0
        while True:
            await self._send(deliveries, 1)
            # Next tick on the grid; ticks missed while the broker was slow are skipped.
            tick = max(tick + 1, math.floor((trio.current_time() - origin) / interval) + 1)
            await trio.sleep_until(origin + tick * interval)

    async def _run_rate(self, deliveries: trio.Nursery) -> None:
        schedule = RateSchedule(self.settings.rate, self.settings.batch_size, trio.current_time())
        dropped = 0
        while True:
            await trio.sleep_until(schedule.next_wake())
            count = schedule.take(trio.current_time())
            if schedule.dropped > dropped:
                self._log.warning(
                    "producer_behind",
                    dropped=schedule.dropped - dropped,
                    rate=schedule.rate,
                )
                dropped = schedule.dropped
            while count > 0:
                chunk = min(count, self.settings.batch_size)
                await self._send(deliveries, chunk)
                count -= chunk

    async def _send(self, deliveries: trio.Nursery, count: int) -> None:
        await self._in_flight.acquire()  # back-pressure: too many sends await reports
        messages, types = self._random_events(count)
        deliveries.start_soon(self._deliver, messages, types)

    def _random_events(self, count: int) -> tuple[list[OutboundMessage], list[str]]:
        s = self.settings
        rnd = self._random
        now = datetime.now(UTC)
        messages: list[OutboundMessage] = []
        types: list[str] = []
        for _ in range(count):
            type_ = rnd.choice(s.event_types)
            delay = timedelta(seconds=rnd.uniform(s.delay_min, s.delay_max))
            event = new_event(type_, self._payload(type_), now + delay)
            messages.append(
                OutboundMessage(self.topic, encode_event(event), kafka_key(event), self._headers)
            )
            types.append(type_)
        return messages, types

    def _payload(self, type_: str) -> dict[str, Any]:
        seq = next(self._seq)
        return {
            "seq": seq,
            "value": self._random.randint(1, 1_000_000),
            "message": f"random {type_} event #{seq}",
        }

    async def _deliver(self, messages: Sequence[OutboundMessage], types: Sequence[str]) -> None:
        try:
            reports = await self._producer.send_many(messages)
        except DependencyError as err:  # the producer is closed (shutdown)
            metrics.PRODUCE_ERRORS.inc(len(messages))
            self._log.warning("produce_failed", count=len(messages), error=str(err))
            return
        finally:
            self._in_flight.release()
        produced: dict[str, int] = {}
        failed = 0
        first_error: str | None = None
        for report, type_ in zip(reports, types, strict=True):
            if report.ok:
                produced[type_] = produced.get(type_, 0) + 1
            else:
                failed += 1
                first_error = first_error or report.error
        for type_, n in produced.items():
            metrics.EVENTS_PRODUCED.labels(type_).inc(n)
        if failed:
            metrics.PRODUCE_ERRORS.inc(failed)
            self._log.warning("produce_failed", count=failed, error=first_error)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
