"""Trio adapter for a confluent-kafka ``Producer`` owned by one worker thread.

Owns :class:`KafkaProducer` (trio side), :class:`_ProducerWorker` (the worker thread: every
call on the client, delivery callbacks, rebuilding a fatal client) and the message and
delivery-report types. See :mod:`eventsched.core.kafka.bridge` for the threading model.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio
from confluent_kafka import (
    KafkaError,
    KafkaException,
    Message,
    Producer,
)

from eventsched.core.kafka.bridge import (
    _Call,
    _code,
    _describe,
    _error_logger,
    _Link,
    _task_group,
    _TrioPort,
)
from eventsched.core.kafka.clientconfig import PRODUCER_DEFAULTS
from eventsched.core.runtime import metrics, tracing
from eventsched.core.runtime.errors import ConfigError, DependencyError, EventschedError

# One logger name for the whole adapter: its lines are found under one name.
log = structlog.get_logger("eventsched.core.kafka")


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message for :meth:`KafkaProducer.send_many`."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """The broker's answer for one message: where it was stored, or why not."""

    topic: str
    partition: int | None
    offset: int | None
    #: ``None`` when delivered, else ``"CODE_NAME: text"`` from librdkafka.
    error: str | None = None
    #: librdkafka's error code (``KafkaError.*``) when there is one.
    code: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def too_large(self) -> bool:
        """Refused for its size (the producer's ``message.max.bytes`` or the broker's)."""
        return self.code in _TOO_LARGE

    @property
    def message_specific(self) -> bool:
        """Refused for what this message is: sending the same bytes again cannot help
        (size, a record the broker calls invalid, an argument the client refuses).
        Anything else (timeouts, a broker or producer problem) may pass on a retry."""
        return self.code in _MESSAGE_ERRORS

    def raise_for_error(self) -> None:
        """Raise DependencyError when the message was not delivered."""
        if self.error is not None:
            raise DependencyError("kafka", f"delivery to {self.topic} failed: {self.error}")


class _Delivery:
    """Delivery reports of one ``send_many`` call.

    ``settle`` runs only on the producer thread (produce errors and delivery callbacks both
    happen there), so the counters need no lock; trio reads ``reports`` after ``done``.
    A settled delivery joins ``ready`` (the worker's list, touched on its thread only); the
    worker sets the ``done`` events of everything in it with one trio callback per loop
    step (:meth:`_ProducerWorker.wake`), not one per message.
    """

    def __init__(self, messages: Sequence[OutboundMessage], ready: list[_Delivery]) -> None:
        self.messages = messages
        self.reports: list[DeliveryReport | None] = [None] * len(messages)
        self.remaining = len(messages)
        self.done = trio.Event()
        self._ready = ready

    def settle(self, index: int, report: DeliveryReport) -> None:
        if self.reports[index] is not None:
            return
        self.reports[index] = report
        self.remaining -= 1
        if self.remaining == 0:
            self._ready.append(self)

    def on_delivery(self, index: int, err: KafkaError | None, msg: Message) -> None:
        """librdkafka delivery callback (producer thread, inside poll/flush)."""
        self.settle(
            index,
            DeliveryReport(
                topic=msg.topic() or self.messages[index].topic,
                partition=msg.partition(),
                offset=msg.offset(),
                error=None if err is None else f"{err.name()}: {err.str()}",
                code=None if err is None else err.code(),
            ),
        )

    def fail_unsettled(self, reason: str) -> None:
        """Producer thread: messages without a report yet become errors (the client that
        had them is being replaced and will never report them)."""
        for index, report in enumerate(self.reports):
            if report is None:
                self.settle(index, DeliveryReport(self.messages[index].topic, None, None, reason))

    def fail_rest(self, reason: str) -> None:
        """Trio side, after the thread ended: unanswered messages become errors."""
        for index, report in enumerate(self.reports):
            if report is None:
                self.reports[index] = DeliveryReport(self.messages[index].topic, None, None, reason)
        self.remaining = 0
        self.done.set()

    def result(self) -> list[DeliveryReport]:
        return [report for report in self.reports if report is not None]


def _set_all(events: list[trio.Event]) -> None:
    """Trio thread: wake the senders of settled deliveries (cannot raise)."""
    for event in events:
        event.set()


@dataclass(eq=False)
class _Produce:
    delivery: _Delivery


#: Delivery errors that are about the message itself (see DeliveryReport.message_specific).
_TOO_LARGE: Final = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_MESSAGE_ERRORS: Final = _TOO_LARGE | {
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError._INVALID_ARG,  # produce() refused an argument (TypeError/ValueError)
}


class _ProducerWorker:
    """Everything that runs on the producer thread.

    Rebuilding: the idempotent client can get stuck in two ways that only a new client
    cures. (1) A fatal error (``error_cb`` or a report flagged fatal, ``_FATAL``): the client
    refuses everything from then on. (2) The broker forgot our producer id (its state was
    lost: a memory-only broker restarted; on Kafka a producer id that expired): every
    ProduceRequest is answered ``UNKNOWN_PRODUCER_ID``, librdkafka bumps the epoch locally
    and retries, the application only sees ``_MSG_TIMED_OUT``. (2) shows in librdkafka's
    statistics (``eos.producer_id``/``eos.producer_epoch``) as an epoch that keeps climbing
    without any delivery in between; :data:`STUCK_EPOCH_BUMPS` steps trigger a rebuild.

    A rebuild (on this thread, between two inbox items) purges the old client's queue and
    in-flight requests, serves the purge reports, fails any message still unreported, then
    replaces the client. Callers thus get an error report for every message that was not
    acknowledged (some may have reached the broker: at-least-once) and send them again.
    """

    # How long the loop may block on its inbox: short while messages are in flight so
    # that delivery callbacks are served promptly, longer when idle.
    BUSY_POLL: Final = 0.005
    IDLE_WAIT: Final = 0.2
    # How long to serve delivery reports before retrying after BufferError (queue full).
    FULL_QUEUE_POLL: Final = 0.05
    #: librdkafka statistics interval (ms) unless the configuration sets one.
    STATS_INTERVAL_MS: Final = 1000
    #: Producer-id/epoch changes without a delivery in between that mean the broker keeps
    #: refusing our producer id (a healthy client has one; an expired id costs one bump).
    STUCK_EPOCH_BUMPS: Final = 5
    #: Minimum seconds between two rebuilds (a broker that keeps failing us is not helped
    #: by a new client every few milliseconds).
    REBUILD_INTERVAL: Final = 5.0

    def __init__(self, config: Mapping[str, Any], port: _TrioPort) -> None:
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.abort = threading.Event()
        self._config = dict(config)
        self._user_error_cb = self._config.pop("error_cb", None)
        self._user_stats_cb = self._config.pop("stats_cb", None)
        self._config["error_cb"] = self._on_error
        self._config["stats_cb"] = self._on_stats
        self._config.setdefault("statistics.interval.ms", self.STATS_INTERVAL_MS)
        self._port = port
        self._producer: Producer | None = None
        self._stopping = False
        # Deliveries with messages not reported yet (touched on this thread only).
        self._live: set[_Delivery] = set()
        #: Deliveries settled since the last :meth:`wake` (touched on this thread only).
        self.ready: list[_Delivery] = []
        # Why the client must be replaced (a reason label and words), or None.
        self._rebuild: tuple[str, str] | None = None
        self._last_rebuild = -self.REBUILD_INTERVAL
        # (producer id, epoch) in the client's last statistics, and how often it changed
        # since the last delivery.
        self._pid: tuple[int, int] | None = None
        self._pid_changes = 0
        #: Clients replaced so far (read by trio, written here).
        self.rebuilds = 0

    def start(self) -> None:
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        try:
            return Producer(self._config)
        except (KafkaException, ValueError, TypeError) as err:
            raise ConfigError("kafka.producer", _describe(err)) from err

    def run(self) -> None:
        while not self._stopping:
            item = self._next_item()
            if isinstance(item, _Call):
                item.run(self._port)
            elif isinstance(item, _Produce):
                self._produce_all(item.delivery)
            if self._producer is not None:
                self._producer.poll(0)
                if self._rebuild is not None and not self._stopping:
                    self._maybe_rebuild()
            self.wake()
        self.wake()
        self._producer = None  # destroy the handle on this thread

    def wake(self) -> None:
        """Tell trio about every delivery settled since the last call: one callback (and
        one wake-up of the trio thread) for all the reports one ``poll`` served."""
        if self.ready:
            events = [delivery.done for delivery in self.ready]
            self.ready.clear()
            self._port.post(_set_all, events)

    def _next_item(self) -> object:
        producer = self._producer
        if producer is not None and len(producer) > 0:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                producer.poll(self.BUSY_POLL)
                return None
        try:
            return self.inbox.get(timeout=self.IDLE_WAIT)
        except queue.Empty:
            return None

    # -- client health (callbacks run on this thread, inside poll/flush) ----------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._want_rebuild("fatal", f"fatal error {err.name()}: {err.str()}")
        if self._user_error_cb is not None:
            self._user_error_cb(err)

    def _on_stats(self, stats: str) -> None:
        if self._user_stats_cb is not None:
            self._user_stats_cb(stats)
        try:
            eos = json.loads(stats).get("eos", {})
            pid = (int(eos["producer_id"]), int(eos["producer_epoch"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if pid[0] < 0:  # no producer id yet
            return
        last, self._pid = self._pid, pid
        if last is None or last == pid:
            return
        # A new epoch of the same id counts its steps; a new id counts one.
        self._pid_changes += pid[1] - last[1] if pid[0] == last[0] and pid[1] > last[1] else 1
        if self._pid_changes >= self.STUCK_EPOCH_BUMPS:
            self._want_rebuild(
                "stuck_pid",
                f"producer id/epoch changed {self._pid_changes} times without a delivery "
                "(the broker keeps answering UNKNOWN_PRODUCER_ID)",
            )

    def _on_delivery(
        self, delivery: _Delivery, index: int, err: KafkaError | None, msg: Message
    ) -> None:
        delivery.on_delivery(index, err, msg)
        if delivery.remaining == 0:
            self._live.discard(delivery)
        if err is None:
            self._pid_changes = 0
        elif err.fatal() or err.code() == KafkaError._FATAL:
            self._want_rebuild("fatal", f"fatal error {err.name()}: {err.str()}")

    def _want_rebuild(self, label: str, reason: str) -> None:
        if self._rebuild is None:
            self._rebuild = (label, reason)

    def _maybe_rebuild(self) -> None:
        if time.monotonic() - self._last_rebuild < self.REBUILD_INTERVAL:
            return
        assert self._rebuild is not None
        label, reason = self._rebuild
        old = self._producer
        assert old is not None
        log.warning("kafka_producer_rebuilt", reason=reason, undelivered=len(old))
        try:
            old.purge(in_queue=True, in_flight=True, blocking=True)
        except KafkaException as err:  # a fatal client may refuse; it is dropped anyway
            log.warning("kafka_producer_purge_failed", error=_describe(err))
        old.poll(0)  # serves the purge reports: _PURGE_QUEUE / _PURGE_INFLIGHT
        for delivery in list(self._live):
            delivery.fail_unsettled(f"_PRODUCER_REBUILT: producer rebuilt ({label})")
        self._live.clear()
        self._producer = None
        del old  # destroyed here, on its own thread
        self._last_rebuild = time.monotonic()
        self._rebuild = None
        self._pid, self._pid_changes = None, 0
        try:
            self._producer = self._new_producer()
        except ConfigError as err:  # the same configuration worked before: try again later
            log.error("kafka_producer_rebuild_failed", error=str(err))
            self._rebuild = (label, reason)
            return
        self.rebuilds += 1
        metrics.KAFKA_PRODUCER_REBUILDS.labels(label).inc()

    # -- produce ----------------------------------------------------------------------

    def _produce_all(self, delivery: _Delivery) -> None:
        producer = self._producer
        if producer is None:
            delivery_error = "producer is not started"
            for index, message in enumerate(delivery.messages):
                delivery.settle(index, DeliveryReport(message.topic, None, None, delivery_error))
            return
        self._live.add(delivery)
        for index, message in enumerate(delivery.messages):
            self._produce_one(producer, delivery, index, message)
        if delivery.remaining == 0:
            self._live.discard(delivery)

    def _produce_one(
        self, producer: Producer, delivery: _Delivery, index: int, message: OutboundMessage
    ) -> None:
        callback = functools.partial(self._on_delivery, delivery, index)
        headers: list[tuple[str, str | bytes | None]] | None = (
            list(message.headers) if message.headers is not None else None
        )
        while True:
            try:
                producer.produce(
                    message.topic,
                    value=message.value,
                    key=message.key,
                    headers=headers,
                    on_delivery=callback,
                )
                return
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports to make room,
                # then try again. This is the back-pressure: send_many simply takes longer.
                if self.abort.is_set():
                    reason = "producer closing with a full local queue"
                    delivery.settle(index, DeliveryReport(message.topic, None, None, reason))
                    return
                producer.poll(self.FULL_QUEUE_POLL)
                self.wake()
            except KafkaException as err:
                code = _code(err)
                first = err.args[0] if err.args else None
                if code == KafkaError._FATAL or (isinstance(first, KafkaError) and first.fatal()):
                    self._want_rebuild("fatal", f"fatal error: {_describe(err)}")
                report = DeliveryReport(message.topic, None, None, _describe(err), code)
                delivery.settle(index, report)
                return
            except (TypeError, ValueError) as err:
                report = DeliveryReport(
                    message.topic, None, None, f"_INVALID_ARG: {err}", KafkaError._INVALID_ARG
                )
                delivery.settle(index, report)
                return

    def flush(self, timeout: float) -> int:
        assert self._producer is not None
        remaining = self._producer.flush(timeout)
        self.wake()  # the reports flush served reach trio before flush's own answer
        return remaining

    def close(self, timeout: float) -> int:
        """Flush within ``timeout``, purge the rest; returns how many were not delivered."""
        self._stopping = True
        producer = self._producer
        if producer is None:
            return 0
        remaining = producer.flush(timeout)
        if remaining:
            # Purged messages get a delivery report with a _PURGE_* error, so every
            # waiting send_many learns the outcome instead of hanging.
            producer.purge(in_queue=True, in_flight=True, blocking=True)
            producer.poll(0)
        self.wake()
        return remaining


def _publish_spans(
    messages: Sequence[OutboundMessage],
) -> tuple[list[OutboundMessage], list[tuple[int, Any]]]:
    """Tracing on: a producer span for each message without a ``traceparent`` header, whose
    context the message then carries (W3C Trace Context in a Kafka header); returns the
    messages and (index, span) of the spans started."""
    out: list[OutboundMessage] = []
    spans: list[tuple[int, Any]] = []
    for index, message in enumerate(messages):
        if tracing.header_traceparent(message.headers) is None:
            started = tracing.start_publish(message.topic)
            if started is not None:
                spans.append((index, started[0]))
                headers = tracing.with_traceparent(message.headers or (), started[1])
                message = OutboundMessage(message.topic, message.value, message.key, headers)
        out.append(message)
    return out, spans


class KafkaProducer:
    """Trio adapter for a confluent-kafka Producer owned by one worker thread.

    Use ``async with KafkaProducer.open(config) as producer:``; ``config`` is merged over
    :data:`PRODUCER_DEFAULTS`. Each send hops to the worker thread once per call (not per
    message) and awaits the broker's delivery reports. A send whose caller is cancelled is
    still delivered; only its report is dropped. On exit the producer flushes within
    ``flush_timeout`` (shielded), purges what is left and logs/records the count in
    :attr:`undelivered`.

    A client that went fatal or whose producer id the broker forgot is replaced on its
    thread (see :class:`_ProducerWorker`); the messages it had not reported are reported
    as failed, so a caller that sends failed messages again loses nothing.
    """

    def __init__(self, config: Mapping[str, Any], flush_timeout: float) -> None:
        config = {**PRODUCER_DEFAULTS, **config}
        config.setdefault("error_cb", _error_logger("producer"))
        self._port = _TrioPort(trio.lowlevel.current_trio_token())
        self._worker = _ProducerWorker(config, self._port)
        self._link = _Link(
            "eventsched-kafka-producer", self._worker.inbox, self._port, self._fail_pending
        )
        self._flush_timeout = flush_timeout
        self._closing = False
        self._pending: set[_Delivery] = set()
        #: Messages not delivered at close (None until closed).
        self.undelivered: int | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, config: Mapping[str, Any], *, flush_timeout: float = 10.0
    ) -> AsyncIterator[KafkaProducer]:
        """Start the producer thread; ready when the client exists.

        On exit, flushes for at most ``flush_timeout`` s (shielded) and purges the rest.
        """
        async with _task_group() as nursery:
            producer = cls(config, flush_timeout)
            nursery.start_soon(
                producer._link.host, producer._link.thread_main(producer._worker.run)
            )
            try:
                await producer._link.call(producer._worker.start, "start producer")
                yield producer
            finally:
                await producer._shutdown()

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> DeliveryReport:
        """Send one message and await its delivery report."""
        (report,) = await self.send_many([OutboundMessage(topic, value, key, headers)])
        return report

    async def send_many(self, messages: Sequence[OutboundMessage]) -> list[DeliveryReport]:
        """Send messages in one thread hop; reports come back in the same order.

        A full local queue slows this call down (back-pressure) rather than failing it.
        Per-message failures are reported in the reports; use ``raise_for_error``.
        """
        if self._closing or self._link.gone:
            raise DependencyError("kafka", "producer is closed")
        if not messages:
            return []
        spans: list[tuple[int, Any]] = []
        if tracing.loaded():
            messages, spans = _publish_spans(messages)
        delivery = _Delivery(tuple(messages), self._worker.ready)
        self._pending.add(delivery)
        self._worker.inbox.put(_Produce(delivery))
        try:
            await delivery.done.wait()
        finally:
            self._pending.discard(delivery)
            for index, started in spans:
                report = delivery.reports[index]
                where = {} if report is None else {"messaging.kafka.offset": report.offset}
                error = "no delivery report" if report is None else report.error
                tracing.end_publish(started, error, where)
        return delivery.result()

    @property
    def rebuilds(self) -> int:
        """How many times the client was replaced (see :class:`_ProducerWorker`)."""
        return self._worker.rebuilds

    async def flush(self, timeout: float) -> int:  # noqa: ASYNC109 - librdkafka's own wait
        """Wait up to ``timeout`` s for outstanding deliveries; returns how many remain."""
        return await self._link.call(functools.partial(self._worker.flush, timeout), "flush")

    def _fail_pending(self) -> None:
        # Only called once the thread has ended (or was abandoned), so no report can race.
        for delivery in self._pending:
            delivery.fail_rest("producer closed before a delivery report arrived")

    async def _shutdown(self) -> None:
        self._closing = True
        # Shielded: flushing must happen even when the caller is being cancelled; the
        # deadline keeps a dead broker from holding shutdown hostage.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._flush_timeout + 2.0) as scope:
                if not self._link.gone:
                    close = functools.partial(self._worker.close, self._flush_timeout)
                    try:
                        self.undelivered = await self._link.call(close, "close producer")
                    except EventschedError as err:
                        log.error("kafka_producer_close_failed", error=str(err))
                await self._link.done.wait()
            if scope.cancelled_caught:
                log.error("kafka_producer_stop_timeout")
                self._worker.abort.set()
                self._link.abandon()
        self._fail_pending()
        if self.undelivered:
            log.warning("kafka_producer_undelivered_on_close", count=self.undelivered)
