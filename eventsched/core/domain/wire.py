"""Outgoing events: build a new event and encode it as a Kafka message. Pure; any side.

Producers (the demo producer, ``eventsched send``, ``dlq replay``, user code through
:mod:`eventsched`) call :func:`new_event`, then :func:`encode_event`, :func:`kafka_key` and
:func:`kafka_headers`. :func:`new_event` refuses what the consumer would reject whatever its
limits (bad type or key, naive times, a payload that is not JSON or that msgspec would change).

Wire format, schema version 1 (Kafka key = idempotency key, headers from
:func:`kafka_headers`)::

    {"id": "<UUID>", "idempotency_key": "<str, optional, defaults to id>", "type": "<str>",
     "payload": {...}, "execute_at": "<RFC 3339>", "created_at": "<RFC 3339>"}

What the consumer accepts beyond this (the Go original's shape, other spellings) is described
in :mod:`~eventsched.core.domain.decode`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from eventsched.core.domain.event import (
    Event,
    check_key,
    check_type,
    due_ms,
    format_time,
    short,
    utc_ms,
    utf8_ok,
    uuid7,
)
from eventsched.core.runtime.errors import DecodeError

__all__ = ["encode_event", "kafka_headers", "kafka_key", "new_event"]

_ENCODER: Final = msgspec.json.Encoder()
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)
_HEADERS: Final = (("content-type", b"application/json"), ("schema-version", b"1"))


def new_event(
    type: str,
    payload: dict[str, Any],
    execute_at: datetime,
    *,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> Event:
    """Create a v1 event with a fresh UUIDv7 id; raises ValueError for what the consumer
    would reject regardless of its limits (bad type/key, naive times, non-JSON payload).

    ``now`` (default: the clock) becomes ``created_at`` and the id's timestamp.
    """
    try:
        due = due_ms(execute_at, "execute_at")
        if now is None:
            event_id = uuid7()  # monotonic; created_at is read back from it
            created_at = _EPOCH + (event_id.int >> 80) * _MILLISECOND
        else:
            created_at = utc_ms(now, "now")
            event_id = uuid7((created_at - _EPOCH) // _MILLISECOND)
        key = str(event_id) if idempotency_key is None else idempotency_key
        check_type(type, "type")
        check_key(key, "idempotency_key")
    except DecodeError as err:
        raise ValueError(str(err)) from None
    _check_outgoing_payload(payload)
    return Event(event_id, key, type, payload, due, created_at)


def encode_event(event: Event) -> bytes:
    """The v1 JSON value of ``event`` (compact; timestamps as RFC 3339 UTC milliseconds)."""
    return _ENCODER.encode(
        {
            "id": str(event.id),
            "idempotency_key": event.idempotency_key,
            "type": event.type,
            "payload": event.payload,
            "execute_at": format_time(event.execute_at),
            "created_at": format_time(event.created_at),
        }
    )


def kafka_key(event: Event) -> bytes:
    """The Kafka message key: the idempotency key, so duplicates share a partition."""
    return event.idempotency_key.encode()


def kafka_headers() -> list[tuple[str, bytes]]:
    """Headers of every v1 message."""
    return list(_HEADERS)


def _check_outgoing_payload(payload: object) -> None:
    """Reject payloads the consumer would refuse or msgspec would silently change."""
    if type(payload) is not dict:
        raise ValueError(f"payload must be a dict, got {type(payload).__name__}")
    stack: list[object] = [payload]
    while stack:
        node = stack.pop()
        items: Iterable[object]
        if type(node) is dict:
            for key in node:
                if type(key) is not str:
                    raise ValueError(f"payload keys must be str, got {type(key).__name__}")
                _outgoing_text(key)
            items = node.values()
        else:
            items = node  # type: ignore[assignment]  # only lists are pushed
        for value in items:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append(value)
            elif kind is str:
                _outgoing_text(value)  # type: ignore[arg-type]  # kind is str
            elif kind is float:
                if not math.isfinite(value):  # type: ignore[arg-type]  # kind is float
                    raise ValueError("payload contains NaN or Infinity (not JSON)")
            elif kind not in (int, bool, type(None)):
                raise ValueError(f"payload contains a {kind.__name__}, not a JSON value")


def _outgoing_text(text: str) -> None:
    if "\x00" in text or not utf8_ok(text):
        raise ValueError(f"payload string {short(text)} contains NUL or a lone surrogate")
