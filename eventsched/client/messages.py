"""Build and check what the clients send: events (schema version 1) and commands (version 2).

Pure functions, no I/O; they run on the caller's thread (or, for the async client's
batches, a worker thread). Every message is decoded again by the consumer's own decoder
(:func:`~eventsched.core.domain.decode.decode_event`,
:func:`~eventsched.core.domain.commands.parse_command`) with the client's
:class:`~eventsched.core.domain.decode.DecodeLimits` before it is handed to Kafka: what the
consumer would refuse raises ValueError here, naming the consumer's reason, and is never sent.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Required, TypedDict

from eventsched.core.domain.commands import (
    Op,
    command_headers,
    encode_command,
    new_command,
    parse_command,
)
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.runtime.errors import DecodeError
from eventsched.core.runtime.tracing import current_traceparent, with_traceparent

__all__ = [
    "Delay",
    "Outgoing",
    "ScheduleItem",
    "Target",
    "check_requested_by",
    "command_message",
    "due_time",
    "event_message",
    "event_messages",
]

#: A delay: a timedelta, or seconds.
Delay = timedelta | float
#: What a command acts on: a :class:`uuid.UUID` is an event id, a ``str`` an idempotency key.
Target = uuid.UUID | str


class ScheduleItem(TypedDict, total=False):
    """One event of :meth:`Client.schedule_many`: the arguments of :meth:`Client.schedule`."""

    type: Required[str]
    payload: Required[dict[str, Any]]
    at: datetime | None
    delay: Delay | None
    key: str | None


_ITEM_KEYS = frozenset(ScheduleItem.__annotations__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One checked Kafka message: ``id`` is the event id or the command id."""

    id: uuid.UUID
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def due_time(now: datetime, at: datetime | None, delay: Delay | None) -> datetime | None:
    """``at``, or ``now + delay``, or None when neither is given; ValueError for both."""
    if at is not None and delay is not None:
        raise ValueError("give at or delay, not both")
    if at is not None:
        if not isinstance(at, datetime):
            raise TypeError(f"at must be a datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(
                f"at {at.isoformat()} is a naive datetime: give it a time zone"
                " (for example datetime.now(UTC) + timedelta(minutes=5))"
            )
        return at
    if delay is None:
        return None
    if isinstance(delay, bool) or not isinstance(delay, timedelta | int | float):
        raise TypeError(f"delay must be a timedelta or seconds, got {type(delay).__name__}")
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"delay must be a finite, non-negative duration, got {delay!r}")
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"beyond_horizon: delay {seconds:g}s is out of range") from None


def event_message(
    type: str,
    payload: dict[str, Any],
    *,
    at: datetime | None,
    delay: Delay | None,
    key: str | None,
    limits: DecodeLimits,
) -> Outgoing:
    """A new event (fresh UUIDv7 id) due at ``at``, after ``delay`` or now, checked."""
    if not isinstance(type, str):
        raise TypeError(f"type must be a str, got {_builtin_type(type).__name__}")
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str, got {_builtin_type(key).__name__}")
    now = datetime.now(UTC)
    event = new_event(type, payload, due_time(now, at, delay) or now, idempotency_key=key)
    return _event_outgoing(event, limits)


def event_messages(items: Iterable[ScheduleItem | Event], limits: DecodeLimits) -> list[Outgoing]:
    """Every item built and checked; the first bad one raises, naming its position."""
    out: list[Outgoing] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, Event):
                out.append(_event_outgoing(item, limits))
                continue
            if not isinstance(item, Mapping):
                raise TypeError(f"expected a mapping or an Event, got {type(item).__name__}")
            unknown = sorted(set(item) - _ITEM_KEYS)
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}")
            if "type" not in item or "payload" not in item:
                raise ValueError("type and payload are required")
            out.append(
                event_message(
                    item["type"],
                    item["payload"],
                    at=item.get("at"),
                    delay=item.get("delay"),
                    key=item.get("key"),
                    limits=limits,
                )
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"item {index}: {err}") from err
    return out


def command_message(
    op: Op,
    target: Target,
    *,
    execute_at: datetime | None,
    requested_by: str,
    limits: DecodeLimits,
) -> Outgoing:
    """A command on ``target`` (a UUID: the event id; a str: the idempotency key), checked."""
    if isinstance(target, uuid.UUID):
        command = new_command(op, event_id=target, execute_at=execute_at, requested_by=requested_by)
    elif isinstance(target, str):
        command = new_command(
            op, idempotency_key=target, execute_at=execute_at, requested_by=requested_by
        )
    else:
        raise TypeError(
            "key_or_id must be a str (idempotency key) or a uuid.UUID (event id),"
            f" got {type(target).__name__}"
        )
    value = encode_command(command)
    _check(lambda now: parse_command(value, now=now, limits=limits))
    return Outgoing(command.command_id, command.kafka_key, value, tuple(command_headers()))


def check_requested_by(requested_by: str) -> None:
    """ValueError unless ``requested_by`` is what a command may carry."""
    if not isinstance(requested_by, str):
        raise TypeError(f"requested_by must be a str, got {type(requested_by).__name__}")
    new_command("cancel", idempotency_key="-", requested_by=requested_by)


# ``type`` is a parameter name of event_message (the event type, as in new_event).
_builtin_type = type


def _event_outgoing(event: Event, limits: DecodeLimits) -> Outgoing:
    value = encode_event(event)
    # The application's current span (OpenTelemetry set up by the application): the event's
    # attempts become spans of its trace. Nothing is loaded or added otherwise.
    headers = tuple(with_traceparent(kafka_headers(), current_traceparent()))
    _check(lambda now: decode_event(value, now=now, limits=limits, headers=dict(headers)))
    return Outgoing(event.id, kafka_key(event), value, headers)


def _check(decode: Callable[[datetime], object]) -> None:
    """Run the consumer's decoder; its refusal becomes ValueError("<reason>: <detail>")."""
    try:
        decode(datetime.now(UTC))
    except DecodeError as err:
        raise ValueError(f"{err.reason}: {err.detail}") from err
