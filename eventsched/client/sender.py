"""The Kafka producer under both clients: one idempotent confluent-kafka ``Producer``, a
poller thread that serves its delivery reports, and one future per message.

Threads: :meth:`Sender.submit` runs on the caller's thread, any thread (confluent-kafka's
``Producer`` is thread-safe). Delivery reports run on the poller thread, which completes
each message's own :class:`concurrent.futures.Future`, so concurrent callers each get their
own acknowledgement whoever polls. The blocking client waits on those futures
(:meth:`Sender.send`); the async client awaits them through :func:`asyncio.wrap_future`,
which blocks no thread.

``confluent_kafka`` is imported when a sender is made, not with this module: it imports
asyncio, which :mod:`eventsched` must not load before an entry point's trio-asyncio bootstrap
(:mod:`eventsched.core.runtime.bootstrap`) patched it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent import futures
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from eventsched.client.errors import ClientError, DeliveryError
from eventsched.client.messages import Outgoing

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

__all__ = ["GRACE", "QUEUE_FULL", "Delivery", "Sender", "failed_delivery"]

_LOG: Final = logging.getLogger("eventsched.client")
#: How long after the timeout a caller still waits for librdkafka's own verdict (it checks
#: message timeouts periodically, not at the exact millisecond).
GRACE: Final = 1.0
_POLL_INTERVAL: Final = 0.1
_FULL_QUEUE_PAUSE: Final = 0.005
QUEUE_FULL: Final = "librdkafka's local queue stayed full"

#: A message's future: ``None`` once acknowledged, else why it failed.
Delivery = futures.Future[str | None]


class _LastError:
    """The last client-level error librdkafka reported (e.g. a refused connection): it
    explains a timeout better than "Message timed out". Written on the poller thread."""

    __slots__ = ("text",)

    def __init__(self) -> None:
        self.text: str | None = None

    def record(self, err: KafkaError) -> None:
        self.text = _describe(err)


class Sender:
    """One producer for one topic; see the module docstring for who runs what."""

    def __init__(self, config: dict[str, Any], topic: str, timeout: float) -> None:
        from confluent_kafka import KafkaException, Producer

        self._kafka_exception = KafkaException
        self.topic = topic
        self.timeout = timeout
        self._last_error = _LastError()
        config = {**config, "error_cb": self._last_error.record, "logger": _LOG}
        try:
            self._producer = Producer(config)
        except (KafkaException, TypeError, ValueError) as err:
            raise ClientError(f"invalid Kafka configuration: {_describe(err)}") from None
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The thread holds the producer and the stop event, not this object: a client that
        # is dropped without close() stops its poller when it is collected.
        self._poller = threading.Thread(
            target=_poll_until,
            args=(self._producer, self._stop),
            name=f"eventsched-client-poller-{topic}",
            daemon=True,
        )
        self._poller.start()
        weakref.finalize(self, self._stop.set)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, message: Outgoing) -> Delivery:
        """Hand one message to librdkafka; raises BufferError when its queue is full."""
        if self._closed:
            raise ClientError("the client is closed")
        delivery: Delivery = futures.Future()
        try:
            self._producer.produce(
                self.topic,
                value=message.value,
                key=message.key,
                headers=list(message.headers),
                on_delivery=partial(_delivered, delivery),
            )
        except self._kafka_exception as err:
            delivery.set_result(f"refused by the producer: {_describe(err)}")
        return delivery

    def send(self, messages: Sequence[Outgoing]) -> None:
        """Send and wait for every acknowledgement; DeliveryError names what failed."""
        deadline = time.monotonic() + self.timeout
        deliveries: list[Delivery] = []
        for message in messages:
            while True:
                try:
                    deliveries.append(self.submit(message))
                    break
                except BufferError:
                    if time.monotonic() >= deadline:
                        deliveries.append(failed_delivery(QUEUE_FULL))
                        break
                    time.sleep(_FULL_QUEUE_PAUSE)
        futures.wait(deliveries, timeout=max(0.0, deadline + GRACE - time.monotonic()))
        self.outcome(messages, deliveries)

    def outcome(self, messages: Sequence[Outgoing], deliveries: Sequence[Delivery]) -> None:
        """Raise DeliveryError for every message that is not acknowledged (yet)."""
        failed: list[Outgoing] = []
        problems: dict[str, None] = {}  # distinct, in order
        for message, delivery in zip(messages, deliveries, strict=True):
            if delivery.done() and not delivery.cancelled():
                problem = delivery.result()
                if problem is None:
                    continue
            else:
                problem = f"no acknowledgement within {self.timeout:g}s"
            failed.append(message)
            problems[problem] = None
        if not failed:
            return
        text = "; ".join(list(problems)[:3])
        if self._last_error.text and self._last_error.text not in text:
            text += f" (last client error: {self._last_error.text})"
        failed_ids = {m.id for m in failed}
        raise DeliveryError(
            text, [m.id for m in failed], [m.id for m in messages if m.id not in failed_ids]
        )

    def close(self, timeout: float | None = None) -> int:
        """Stop taking messages, wait up to ``timeout`` (default: the client's) for the ones
        in flight, stop the poller. Returns how many were still undelivered. Idempotent."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        try:
            left: int = self._producer.flush(self.timeout if timeout is None else timeout)
        finally:
            self._stop.set()
            self._poller.join()
        return left


def _poll_until(producer: Producer, stop: threading.Event) -> None:
    while not stop.is_set():
        producer.poll(_POLL_INTERVAL)


def _delivered(delivery: Delivery, err: KafkaError | None, _msg: Message) -> None:
    # The async client cancels the futures it stopped waiting for: a late report is dropped.
    with contextlib.suppress(futures.InvalidStateError):
        delivery.set_result(None if err is None else _describe(err))


def failed_delivery(problem: str) -> Delivery:
    """A delivery that failed before it reached librdkafka."""
    delivery: Delivery = futures.Future()
    delivery.set_result(problem)
    return delivery


def _describe(err: BaseException | KafkaError) -> str:
    from confluent_kafka import KafkaError, KafkaException

    first = err.args[0] if isinstance(err, KafkaException) and err.args else err
    if isinstance(first, KafkaError):
        return f"{first.name()}: {first.str()}"
    return str(first) or type(first).__name__
