"""Commands on the event log: cancel, reschedule and retry an event, as Kafka messages.

Pure functions and frozen types, no I/O. Commands travel on the ``events`` topic next to
the schedule messages, keyed by the target's idempotency key, so every command for one event
is ordered behind its schedule on one partition; the consumer applies them in that order.

Wire format, schema version 2 (header ``schema-version: 2``; a version-2 message without an
``op`` field, or with ``"op": "schedule"``, is a schedule message exactly as in version 1)::

    {"op": "cancel" | "reschedule" | "retry",
     "command_id": "<UUID>",                 # repeated commands with one id apply once
     "idempotency_key": "<str>",             # the target, by key (the Kafka key as well)
     "event_id": "<UUID>",                   # or by id; at least one of the two
     "execute_at": "<RFC 3339>",             # reschedule: required; retry: optional (now)
     "requested_by": "<str, optional>",      # who asked: shown in the event's history
     "created_at": "<RFC 3339>"}

A Kafka tombstone (no value) whose key is an idempotency key means *cancel* that event (the
convention of Kafka-native schedulers); :func:`tombstone_command` builds it, with a command
id derived from the message's position so a redelivered tombstone is the same command.

Decoding errors raise :class:`~eventsched.core.runtime.errors.DecodeError` with the reasons
of :data:`~eventsched.core.domain.decode.DECODE_REASONS` (``invalid_op`` for an unknown op),
so a malformed command goes to the DLQ like a malformed event.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

import msgspec

from eventsched.core.domain.decode import DecodeLimits, human, reason_for
from eventsched.core.domain.event import check_key, due_ms, format_time, short, utc_ms, uuid7
from eventsched.core.domain.jsonparse import parse_json
from eventsched.core.runtime.errors import DecodeError

__all__ = [
    "COMMAND_SCHEMA_VERSION",
    "FINISHED",
    "OPS",
    "RETRYABLE",
    "Command",
    "Op",
    "command_headers",
    "encode_command",
    "is_command",
    "new_command",
    "refusal",
    "tombstone_command",
]

Op = Literal["cancel", "reschedule", "retry"]
OPS: Final[tuple[str, ...]] = get_args(Op)
COMMAND_SCHEMA_VERSION: Final = 2
#: At most this many characters of ``requested_by`` are kept (longer is ``invalid_field``).
MAX_REQUESTED_BY: Final = 200
#: ``requested_by`` of a command that came as a Kafka tombstone.
TOMBSTONE: Final = "kafka-tombstone"
# Command ids of tombstones: uuid5(this namespace, "<topic>/<partition>/<offset>").
_TOMBSTONE_NAMESPACE: Final = uuid.UUID("0b4c6a3e-5d1f-4e8a-9c2b-7f3e1d5a6b90")
_HEADERS: Final = (("content-type", b"application/json"), ("schema-version", b"2"))
#: Statuses an event does not leave by itself; a cancel of one changes nothing.
FINISHED: Final = frozenset({"succeeded", "dead", "cancelled"})
#: Statuses a reschedule applies to.
RESCHEDULABLE: Final = frozenset({"scheduled", "retrying"})
#: Statuses a retry applies to.
RETRYABLE: Final = ("dead", "cancelled")
_ENCODER: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded (or newly created) command; timestamps are UTC milliseconds.

    The target is ``event_id`` when set, else ``idempotency_key``. ``execute_at`` is the new
    due time of a reschedule, or when a retried event is due (``None``: at once).
    """

    op: Op
    command_id: uuid.UUID
    idempotency_key: str | None
    event_id: uuid.UUID | None
    execute_at: datetime | None
    requested_by: str
    created_at: datetime

    @property
    def kafka_key(self) -> bytes:
        """The Kafka key: the idempotency key, else the event id (an event scheduled
        without a key has its id as key, so both land on the schedule's partition)."""
        return (self.idempotency_key or str(self.event_id)).encode()


class _Wire(msgspec.Struct):
    op: str
    command_id: uuid.UUID
    created_at: datetime
    idempotency_key: str | None = None
    event_id: uuid.UUID | None = None
    execute_at: datetime | None = None
    requested_by: str | None = None


def is_command(obj: Mapping[str, Any]) -> bool:
    """True when a decoded JSON object is a command (has an ``op`` other than schedule)."""
    op = obj.get("op")
    return op is not None and op != "schedule"


def new_command(
    op: Op,
    *,
    idempotency_key: str | None = None,
    event_id: uuid.UUID | str | None = None,
    execute_at: datetime | None = None,
    requested_by: str = "",
    now: datetime | None = None,
) -> Command:
    """Create a command with a fresh UUIDv7 id; ValueError for what the consumer would refuse
    regardless of its limits (no target, bad key, naive time, missing due time)."""
    try:
        return _validated(
            op,
            uuid7(),
            idempotency_key,
            uuid.UUID(str(event_id)) if event_id is not None else None,
            execute_at,
            requested_by,
            now or datetime.now(UTC),
            limits=None,
            now=None,
        )
    except DecodeError as err:
        raise ValueError(str(err)) from None


def refusal(op: Op, status: str) -> str | None:
    """Why ``op`` does not apply to an event in ``status``, or None when it does.

    The rules the consumer's compare-and-set enforces (a cancel of a running event applies:
    its attempt finishes and no retry follows); senders that can see the status (the HTTP
    API, ``eventsched events``) use this to refuse early with the same words.
    """
    if op == "cancel" and status in FINISHED:
        return f"the event is {status}: a finished event cannot be cancelled"
    if op == "reschedule" and status not in RESCHEDULABLE:
        return f"the event is {status}: only a scheduled or retrying event can be rescheduled"
    if op == "retry" and status not in RETRYABLE:
        return f"the event is {status}: only a dead or cancelled event can be retried"
    return None


def encode_command(command: Command) -> bytes:
    """The version-2 JSON value of ``command`` (compact, fields that are unset left out)."""
    out: dict[str, Any] = {"op": command.op, "command_id": str(command.command_id)}
    if command.idempotency_key is not None:
        out["idempotency_key"] = command.idempotency_key
    if command.event_id is not None:
        out["event_id"] = str(command.event_id)
    if command.execute_at is not None:
        out["execute_at"] = format_time(command.execute_at)
    if command.requested_by:
        out["requested_by"] = command.requested_by
    out["created_at"] = format_time(command.created_at)
    return _ENCODER.encode(out)


def command_headers() -> list[tuple[str, bytes]]:
    """Headers of every command message."""
    return list(_HEADERS)


def decode_command(obj: dict[str, Any], *, now: datetime, limits: DecodeLimits) -> Command:
    """Validate a JSON object that :func:`is_command` accepted; raise DecodeError.

    The due time of a reschedule or retry obeys the limits of an event's: more than
    ``limits.horizon`` ahead is ``beyond_horizon``, more than ``limits.max_past`` ago is
    ``too_old``; a time in the past within that means "at once".
    """
    try:
        wire = msgspec.convert(obj, _Wire)
    except msgspec.ValidationError as err:
        raise reason_for(str(err), obj) from None
    if wire.op not in OPS:
        raise DecodeError(
            "invalid_op", f"op {short(wire.op)} is not one of {', '.join(OPS)} or schedule"
        )
    return _validated(
        wire.op,  # type: ignore[arg-type]  # checked against OPS above
        wire.command_id,
        wire.idempotency_key,
        wire.event_id,
        wire.execute_at,
        wire.requested_by or "",
        wire.created_at,
        limits=limits,
        now=now,
    )


def parse_command(value: bytes, *, now: datetime, limits: DecodeLimits) -> Command:
    """Decode a whole command message value (tests and tools; the consumer's decoder
    parses once and calls :func:`decode_command`)."""
    if len(value) > limits.max_message_bytes:
        raise DecodeError(
            "too_large", f"{len(value)} bytes, limit {limits.max_message_bytes} bytes"
        )
    obj, _ = parse_json(value)
    if type(obj) is not dict or not is_command(obj):
        raise DecodeError("not_an_object", "not a command object")
    return decode_command(obj, now=now, limits=limits)


def tombstone_command(
    key: bytes | None, *, topic: str, partition: int, offset: int, now: datetime
) -> Command:
    """The cancel that a tombstone (no value) with ``key`` means; DecodeError ``empty`` when
    it has no usable key (nothing to cancel)."""
    if not key:
        raise DecodeError("empty", "tombstone (no value) without a key")
    try:
        text = key.decode()
    except UnicodeDecodeError:
        raise DecodeError("invalid_key", "tombstone key is not UTF-8") from None
    check_key(text, "tombstone key")
    command_id = uuid.uuid5(_TOMBSTONE_NAMESPACE, f"{topic}/{partition}/{offset}")
    return Command("cancel", command_id, text, None, None, TOMBSTONE, utc_ms(now, "now"))


def _validated(
    op: Op,
    command_id: uuid.UUID,
    idempotency_key: str | None,
    event_id: uuid.UUID | None,
    execute_at: datetime | None,
    requested_by: str,
    created_at: datetime,
    *,
    limits: DecodeLimits | None,
    now: datetime | None,
) -> Command:
    if op not in OPS:
        raise DecodeError("invalid_op", f"op {short(op)} is not one of {', '.join(OPS)}")
    if idempotency_key is None and event_id is None:
        raise DecodeError("missing_field", "missing field idempotency_key (or event_id)")
    if idempotency_key is not None:
        check_key(idempotency_key, "idempotency_key")
    if len(requested_by) > MAX_REQUESTED_BY or not requested_by.isprintable():
        raise DecodeError(
            "invalid_field",
            f"requested_by must be at most {MAX_REQUESTED_BY} printable characters",
        )
    if op == "reschedule" and execute_at is None:
        raise DecodeError("missing_field", "missing field execute_at (reschedule needs it)")
    if op == "cancel" and execute_at is not None:
        raise DecodeError("invalid_field", "execute_at: a cancel has no due time")
    if execute_at is not None:
        execute_at = due_ms(execute_at, "execute_at")
        if limits is not None and now is not None:
            if (execute_at - now).total_seconds() > limits.horizon:
                raise DecodeError(
                    "beyond_horizon",
                    f"execute_at {format_time(execute_at)} is more than "
                    f"{human(limits.horizon)} ahead",
                )
            if (now - execute_at).total_seconds() > limits.max_past:
                raise DecodeError(
                    "too_old",
                    f"execute_at {format_time(execute_at)} is more than "
                    f"{human(limits.max_past)} in the past",
                )
    created_at = utc_ms(created_at, "created_at")
    return Command(op, command_id, idempotency_key, event_id, execute_at, requested_by, created_at)
