"""The blocking :class:`Client` and what it shares with the async one (:class:`ClientBase`:
configuration, settings, limits).

Every method runs on the caller's thread and returns once the broker acknowledged the
message; any number of threads may share one client (see :mod:`eventsched.client.sender`).
From trio, call it in a worker thread: ``await trio.to_thread.run_sync(...)``.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from eventsched.client.messages import (
    Delay,
    ScheduleItem,
    Target,
    check_requested_by,
    command_message,
    due_time,
    event_message,
    event_messages,
)
from eventsched.client.sender import Sender
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import Event
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.settings import Settings, load_settings, require_kafka

__all__ = ["DEFAULT_TIMEOUT", "Client", "ClientBase"]

#: Seconds a send waits for the broker's acknowledgement (also librdkafka's
#: ``message.timeout.ms``, so librdkafka gives up on the message at the same time).
DEFAULT_TIMEOUT = 30.0


class ClientBase:
    """Configuration shared by :class:`Client` and :class:`~eventsched.client.AsyncClient`.

    ``limits`` are the consumer's (:class:`~eventsched.core.domain.decode.DecodeLimits`;
    default: the consumer's defaults): every message is checked against them before it is
    sent. ``kafka_config`` is librdkafka configuration layered as for every producer of
    eventsched (``kafka.client`` in settings: security, SASL, ...); the client always sets
    ``enable.idempotence``, ``acks=all`` and ``message.timeout.ms`` (= ``timeout``) itself.
    ``requested_by`` is written into every command (the event's history shows it).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = "events",
        *,
        limits: DecodeLimits | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        requested_by: str = "client",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        # Imported here: core.kafka brings trio and the metrics with it, which a plain
        # ``import eventsched`` (handler code) does not need.
        from eventsched.core.kafka.clientconfig import ClientKind, client_config

        if not isinstance(bootstrap_servers, str) or not bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must be host:port[,host:port]")
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty str")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        check_requested_by(requested_by)
        self.topic = topic
        self.limits = limits or DecodeLimits()
        self.requested_by = requested_by
        self.timeout = float(timeout)
        self._bootstrap = bootstrap_servers
        config = client_config(
            ClientKind.PRODUCER,
            bootstrap_servers,
            client=kafka_config,
            own={
                "enable.idempotence": True,
                "acks": "all",
                "message.timeout.ms": max(1, int(self.timeout * 1000)),
            },
        )
        self._sender = Sender(config, topic, self.timeout)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Self:
        """A client for ``settings``: ``kafka.bootstrap_servers``, ``kafka.topic``,
        ``kafka.client`` and the consumer's limits (``consumer.max_message_bytes``, ...).
        ``kwargs`` (``requested_by``, ``timeout``) go to the constructor.

        Raises:
            ConfigError: ``kafka.bootstrap_servers`` is not set or malformed.
        """
        return cls(
            require_kafka(settings),
            settings.kafka.topic,
            limits=DecodeLimits.from_settings(settings.consumer),
            kafka_config=settings.kafka.client,
            **kwargs,
        )

    @classmethod
    def from_env(cls, settings_file: str | os.PathLike[str] | None = None, **kwargs: Any) -> Self:
        """A client for the settings the CLI reads: ``config/settings.toml`` (or
        ``$EVENTSCHED_SETTINGS``), ``settings_file`` over it (the CLI's ``--settings``),
        then ``EVENTSCHED_*`` environment variables (``EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS``).
        """
        return cls.from_settings(load_settings(settings_file), **kwargs)

    @property
    def closed(self) -> bool:
        return self._sender.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {redact(self._bootstrap)} topic={self.topic!r} {state}>"


class Client(ClientBase):
    """Schedules events and sends commands to the ``events`` topic; blocking, thread-safe.

    Each method checks its message with the consumer's decoder and limits first (ValueError,
    naming the consumer's reason, and nothing is sent), then returns after the broker
    acknowledged it; :class:`~eventsched.DeliveryError` when that does not happen within
    ``timeout`` seconds. Use it as a context manager, or call :meth:`close`.

    A target of :meth:`cancel`, :meth:`reschedule` and :meth:`retry` (``key_or_id``) is an
    event id when it is a :class:`uuid.UUID` and an idempotency key when it is a ``str``:
    a string that looks like a UUID is still taken for a key (pass ``uuid.UUID(text)`` to
    mean the id).
    """

    def schedule(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        at: datetime | None = None,
        delay: Delay | None = None,
        key: str | None = None,
    ) -> uuid.UUID:
        """Schedule an event due at ``at`` (aware datetime), after ``delay`` (timedelta or
        seconds) or, with neither, now; returns its id. ``key`` is its idempotency key
        (default: the id): the first event of a key wins, later ones change nothing."""
        message = event_message(type, payload, at=at, delay=delay, key=key, limits=self.limits)
        self._sender.send([message])
        return message.id

    def schedule_many(self, items: Iterable[ScheduleItem | Event]) -> list[uuid.UUID]:
        """Schedule many events at once: each item holds the arguments of :meth:`schedule`
        (``{"type": ..., "payload": ..., "delay": 30}``) or is a ready
        :class:`~eventsched.Event`. All are checked before any is sent; then all are sent and
        awaited together. Returns their ids in order; one DeliveryError names the failed."""
        messages = event_messages(items, self.limits)
        if messages:
            self._sender.send(messages)
        return [m.id for m in messages]

    def cancel(self, key_or_id: Target) -> uuid.UUID:
        """Cancel an event; returns the command id."""
        return self._command("cancel", key_or_id, None)

    def reschedule(
        self, key_or_id: Target, *, at: datetime | None = None, delay: Delay | None = None
    ) -> uuid.UUID:
        """Move an event to a new due time (``at`` or ``delay``, one is required); returns
        the command id."""
        due = due_time(datetime.now(UTC), at, delay)
        if due is None:
            raise ValueError("reschedule needs at or delay")
        return self._command("reschedule", key_or_id, due)

    def retry(self, key_or_id: Target, *, at: datetime | None = None) -> uuid.UUID:
        """Run a dead or cancelled event again at ``at`` (default: at once), with a fresh
        attempt budget; returns the command id."""
        return self._command("retry", key_or_id, due_time(datetime.now(UTC), at, None))

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (default: the client's) for messages in flight, then stop.
        A closed client raises ClientError; closing twice does nothing."""
        self._sender.close(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _command(self, op: Any, target: Target, execute_at: datetime | None) -> uuid.UUID:
        message = command_message(
            op, target, execute_at=execute_at, requested_by=self.requested_by, limits=self.limits
        )
        self._sender.send([message])
        return message.id
