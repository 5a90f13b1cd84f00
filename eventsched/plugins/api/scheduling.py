"""Scheduling through the API: one event (``POST /v1/events``) or a batch of them
(``POST /v1/events/batch``).

Both build the event exactly as the consumer will read it back (``decode_event`` with the
consumer's limits), so nothing the API accepts lands in the dead-letter topic; both publish
on the command log and answer once the broker has acknowledged. A batch exists because an
HTTP request costs the api process far more than an event does (hypercorn on trio: ~1.2 ms
of CPU per request before any work, bench/RESULTS.md): many events per request is how one
api process schedules thousands of events a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event, format_time
from eventsched.core.domain.wire import encode_event, kafka_headers, new_event
from eventsched.core.runtime.errors import DecodeError
from eventsched.plugins.api.schemas import (
    ApiError,
    FieldError,
    ScheduleRequest,
    convert_object,
    due_time,
    field_for_reason,
    invalid,
    json_object,
)

#: Events in one ``POST /v1/events/batch`` at most.
MAX_BATCH: Final = 500
#: Bytes of one batch body at most (each event still fits ``consumer.max_message_bytes``).
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024

V1_HEADER_LIST: Final = kafka_headers()
V1_HEADERS: Final[Mapping[str, bytes | None]] = dict(V1_HEADER_LIST)


@dataclass(frozen=True, slots=True)
class Prepared:
    """An event ready to publish: the event and its wire bytes."""

    event: Event
    value: bytes
    #: Whether the request named the idempotency key (else it is the new event's id, which
    #: no recorded event can have: no lookup needed).
    keyed: bool


def prepare(
    body: ScheduleRequest, key: str | None, now: datetime, limits: DecodeLimits
) -> Prepared:
    """The event a schedule request asks for, checked as the consumer will check it; 422
    (413 for its size) naming the field otherwise."""
    due = due_time(body.execute_at, body.delay_ms, now, required=True)
    assert due is not None  # required=True
    try:
        event = new_event(body.type, body.payload, due, idempotency_key=key)
    except ValueError as err:
        raise invalid(field_of(str(err))) from None
    value = encode_event(event)
    try:  # exactly what the consumer will run: nothing accepted here lands in the DLQ
        decode_event(value, now=now, limits=limits, headers=V1_HEADERS)
    except DecodeError as err:
        if err.reason == "too_large":
            raise ApiError(413, "too_large", f"the event is too large: {err.detail}") from None
        raise invalid(field_for_reason(err)) from None
    return Prepared(event, value, keyed=key is not None)


def field_of(message: str) -> FieldError:
    """The body field a ``ValueError`` of :func:`new_event` is about."""
    reason, _, detail = message.partition(":")
    if reason in ("invalid_type", "invalid_key", "invalid_timestamp"):
        return field_for_reason(DecodeError(reason, detail.strip()))
    return FieldError("payload", message)


def prepare_batch(raw: bytes, now: datetime, limits: DecodeLimits) -> list[Prepared]:
    """Every event of a batch body ``{"events": [...]}``, or 422 naming each bad field as
    ``events[i].<field>`` (nothing of a batch with one bad event is published)."""
    obj = json_object(raw, "a JSON object with an events array")
    unknown = [FieldError(name, "unknown field") for name in obj if name != "events"]
    items = obj.get("events")
    if not isinstance(items, list):
        raise invalid(*unknown, FieldError("events", "required: an array of events"))
    if unknown:
        raise invalid(*unknown)
    if not items:
        raise invalid(FieldError("events", "must hold at least one event"))
    if len(items) > MAX_BATCH:
        raise invalid(FieldError("events", f"at most {MAX_BATCH} events in one batch"))
    errors: list[FieldError] = []
    prepared: list[Prepared] = []
    first_of_key: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"events[{i}]"
        try:
            if not isinstance(item, dict):
                raise invalid(FieldError("body", "must be a JSON object"))
            body = convert_object(item, ScheduleRequest)
            one = prepare(body, body.idempotency_key, now, limits)
        except ApiError as err:
            if err.status == 413:
                raise ApiError(413, "too_large", f"{where}: {err.message}") from None
            errors.extend(_within(where, f) for f in err.fields)
            continue
        key = one.event.idempotency_key
        if key in first_of_key:
            errors.append(
                FieldError(f"{where}.idempotency_key", f"repeats events[{first_of_key[key]}]")
            )
            continue
        first_of_key[key] = i
        prepared.append(one)
    if errors:
        raise invalid(*errors)
    return prepared


def _within(where: str, field: FieldError) -> FieldError:
    name = where if field.field == "body" else f"{where}.{field.field}"
    return FieldError(name, field.message)


def accepted(event: Event) -> dict[str, Any]:
    """The answer for an event published now."""
    return {
        "id": str(event.id),
        "idempotency_key": event.idempotency_key,
        "execute_at": format_time(event.execute_at),
        "already_known": False,
    }
