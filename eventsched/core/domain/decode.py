"""Incoming events: decode and validate a Kafka message value into an :class:`Event`.

Pure functions and frozen types, no I/O; any side. The consumer calls :func:`decode_event`
for every message (``eventsched send`` checks its event with it too); anything it rejects
raises :class:`DecodeError` whose ``reason`` is one of :data:`DECODE_REASONS` (it
becomes the ``dlq-reason`` header and a metrics label). The v1 format is the one
:mod:`~eventsched.core.domain.wire` writes; JSON parsing and the payload walk are in
:mod:`~eventsched.core.domain.jsonparse`.

The message shape of the Go original is accepted too (``ID``, ``IdempotencyKey``, ``Type``,
``Payload``, ``NextRunAt`` = due time, ``CreatedAt``; ``Status``, ``RetryCount`` and other
extra fields are ignored). A message is v1 when it has ``id`` or ``execute_at``, Go-shaped
when it has ``ID`` or ``NextRunAt``; having both kinds is ``invalid_field``.

Decisions worth knowing:

* Any RFC 4122/9562 UUID (variant ``10``, version 1-8) is accepted as id, not only v7: ids of
  the Go original are usually v4. Nil/max UUIDs are rejected. Upper case and the 32-digit
  form without hyphens are accepted; the idempotency key defaults to the canonical form.
* Timestamps must be RFC 3339 with an offset (``T``/``t``/space separator, ``Z``/``z``
  accepted as RFC 3339 allows; msgspec also takes ``+0200`` without the colon). Years
  0 and 10000+, month 13 and times that leave years 1-9999 when converted to UTC are
  ``invalid_timestamp``. Fractions beyond microseconds (Go writes nanoseconds) are
  rounded to microseconds by the parser, then every timestamp is converted to UTC and kept
  to the millisecond, so an :class:`Event` always holds UTC milliseconds: the due time
  rounded up (a job never starts before the instant asked for), ``created_at`` truncated.
* ``idempotency_key: null`` counts as absent (and so does ``""`` in the Go shape, Go's zero
  value); in v1 an empty key is ``invalid_key``.
* Go ``Payload``: a JSON object, or a string holding standard base64 (what Go writes for a
  ``[]byte`` field) that decodes to a JSON object; anything else is ``invalid_payload``. A
  string holding JSON text (not base64) is rejected.
* Unknown top-level fields are ignored (forward compatibility; breaking changes bump the
  ``schema-version`` header). A missing ``schema-version`` header means version 1 (the Go
  original sends no headers); ``content-type`` is not checked.
* Duplicate keys with different values are ``duplicate_key``, found exactly (see
  :mod:`~eventsched.core.domain.jsonparse` for how); duplicates with identical values are
  accepted.
* Payload depth counts containers: ``{}`` is 1, ``{"a": [1]}`` is 2. Nesting beyond the
  interpreter's recursion limit (msgspec raises RecursionError) is ``too_deep`` as well.
* ``type`` must be 1-200 printable characters (no NUL, control characters, lone
  surrogates); the idempotency key 1-512 characters without NUL or lone surrogates.
* PostgreSQL ``jsonb`` rejects ``\\u0000`` and cannot represent NaN/Infinity (msgspec and
  strict JSON reject those anyway; the stdlib fallback turns them into a marker that is
  reported as ``invalid_payload``), and text cannot hold lone surrogates; integers are
  limited by Python's int-string conversion limit (4300 digits), more is
  ``invalid_payload``.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

import msgspec

from eventsched.core.domain.event import (
    MAX_KEY_LENGTH,
    MAX_TYPE_LENGTH,
    Event,
    Shape,
    check_key,
    check_type,
    due_ms,
    format_time,
    short,
    utc_ms,
)
from eventsched.core.domain.jsonparse import needs_scan, parse_json, scan_payload
from eventsched.core.runtime.errors import DecodeError

if TYPE_CHECKING:
    from eventsched.core.runtime.sections import ConsumerSettings

__all__ = ["DECODE_REASONS", "DecodeLimits", "decode_event"]

# Every reason decode_event can raise, roughly in the order of the checks (field errors
# found by msgspec come in the message's field order). They are the values of the
# `dlq-reason` header and of a metrics label: keep the set small and never rename one.
DECODE_REASONS: Final[tuple[str, ...]] = (
    "empty",  # tombstone (None) without a key, or zero-length value
    "unsupported_schema",  # schema-version header present and not "1" (or "2", see message)
    "too_large",  # value longer than max_message_bytes
    "invalid_utf8",  # value is not valid UTF-8
    "invalid_json",  # not JSON (syntax error, truncated, BOM, ...)
    "too_deep",  # payload nested deeper than max_payload_depth (or beyond the parser's limit)
    "duplicate_key",  # an object has the same key twice with different values
    "not_an_object",  # top-level JSON value is not an object
    "missing_field",  # a required field is absent (detail names it)
    "invalid_field",  # a field has the wrong JSON type, or v1 and Go field names are mixed
    "invalid_id",  # id is not an RFC 4122/9562 UUID
    "invalid_key",  # idempotency key empty, longer than 512 characters, or contains NUL
    "invalid_type",  # type empty, longer than 200 characters, or not printable
    "invalid_timestamp",  # not RFC 3339, no offset, or out of range
    "invalid_payload",  # not an object, NUL/lone surrogate, NaN/Infinity, huge number
    "too_old",  # due time further in the past than max_past
    "beyond_horizon",  # due time further in the future than horizon
    "invalid_op",  # a command whose op is not cancel, reschedule, retry (or schedule)
)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Input limits of the decoder; defaults equal the ConsumerSettings defaults."""

    max_message_bytes: int = 1_048_576
    max_payload_depth: int = 32
    max_past: float = 86_400.0  # seconds
    horizon: float = 365 * 86_400.0  # seconds
    # Precomputed once: building timedeltas for every message is measurable at 100k/s.
    _max_past: timedelta = field(init=False, repr=False, compare=False)
    _horizon: timedelta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_message_bytes <= 0 or self.max_payload_depth <= 0:
            raise ValueError("max_message_bytes and max_payload_depth must be positive")
        if not (0 <= self.max_past < math.inf and 0 <= self.horizon < math.inf):
            raise ValueError("max_past and horizon must be finite and not negative")
        object.__setattr__(self, "_max_past", _seconds(self.max_past))
        object.__setattr__(self, "_horizon", _seconds(self.horizon))

    @classmethod
    def from_settings(cls, consumer: ConsumerSettings) -> DecodeLimits:
        return cls(
            max_message_bytes=consumer.max_message_bytes,
            max_payload_depth=consumer.max_payload_depth,
            max_past=float(consumer.max_past),
            horizon=float(consumer.horizon),
        )


def _seconds(value: float) -> timedelta:
    # Anything beyond timedelta's range (~2.7 million years) is "no limit" in practice.
    return timedelta.max if value >= timedelta.max.total_seconds() else timedelta(seconds=value)


class _EventBuilder:
    """Same slots as Event, but mutable: builds decoded events about 3x faster.

    A frozen dataclass sets each field through ``object.__setattr__`` (2.7 us for Event on
    the reference machine, the largest single cost of decode_event). decode_event fills
    this twin and switches its ``__class__`` (allowed between classes with identical slot
    layouts): the result is a real Event, equal to one built by its constructor.
    """

    __slots__ = Event.__slots__

    def __init__(
        self,
        id: uuid.UUID,
        idempotency_key: str,
        type: str,
        payload: dict[str, Any],
        execute_at: datetime,
        created_at: datetime,
        late: bool,
        shape: Shape,
    ) -> None:
        self.id = id
        self.idempotency_key = idempotency_key
        self.type = type
        self.payload = payload
        self.execute_at = execute_at
        self.created_at = created_at
        self.late = late
        self.shape = shape


class _V1(msgspec.Struct):
    # Field order is the order missing fields are reported in.
    id: uuid.UUID
    type: str
    payload: Any
    execute_at: datetime
    created_at: datetime
    idempotency_key: str | None = None


class _Go(msgspec.Struct, rename="pascal"):
    # The Go original's field names; renamed to ID explicitly ("pascal" gives "Id").
    id: uuid.UUID = msgspec.field(name="ID")
    type: str
    payload: Any
    next_run_at: datetime
    created_at: datetime
    idempotency_key: str | None = None


class _Names(NamedTuple):
    id: str
    key: str
    type: str
    payload: str
    execute_at: str
    created_at: str


_V1_NAMES: Final = _Names("id", "idempotency_key", "type", "payload", "execute_at", "created_at")
_GO_NAMES: Final = _Names("ID", "IdempotencyKey", "Type", "Payload", "NextRunAt", "CreatedAt")

_WireT = TypeVar("_WireT", _V1, _Go)


def decode_event(
    value: bytes | None,
    *,
    now: datetime,
    limits: DecodeLimits,
    headers: Mapping[str, bytes | None] | None = None,
) -> Event:
    """Decode and validate one Kafka message value; raise DecodeError(reason, detail).

    ``now`` (aware) decides lateness: due times up to ``limits.max_past`` in the past are
    accepted with ``late=True``. Only DecodeError escapes, whatever the bytes.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not value:
        raise DecodeError("empty", "tombstone (no value)" if value is None else "empty value")
    if headers:
        version = headers.get("schema-version")
        if version is not None and version != b"1":
            shown = short(version.decode("ascii", "backslashreplace"))
            raise DecodeError("unsupported_schema", f"schema-version {shown}, expected 1")
    if len(value) > limits.max_message_bytes:
        raise DecodeError(
            "too_large", f"{len(value)} bytes, limit {limits.max_message_bytes} bytes"
        )
    obj, canonical = parse_json(value)
    if type(obj) is not dict:
        raise DecodeError("not_an_object", f"top-level JSON value is {_kind(obj)}, not an object")

    is_v1 = "id" in obj or "execute_at" in obj
    is_go = "ID" in obj or "NextRunAt" in obj
    if is_v1 and is_go:
        raise DecodeError(
            "invalid_field", "mixes v1 (id/execute_at) and Go (ID/NextRunAt) field names"
        )
    shape: Shape
    if is_go:
        go = _convert(obj, _Go)
        names, shape = _GO_NAMES, "go"
        # An empty IdempotencyKey is Go's zero value for "not set".
        event_id, key, type_, payload = go.id, go.idempotency_key or None, go.type, go.payload
        execute_at, created_at = go.next_run_at, go.created_at
    else:
        v1 = _convert(obj, _V1)
        names, shape = _V1_NAMES, "v1"
        event_id, key, type_, payload = v1.id, v1.idempotency_key, v1.type, v1.payload
        execute_at, created_at = v1.execute_at, v1.created_at

    # The happy path below inlines the cheap tests of the check_* helpers: at 100k
    # messages/s every function call shows up in the profile.
    id_text: str = obj[names.id]
    if not _rfc_uuid(event_id, id_text):
        raise DecodeError(
            "invalid_id", f"{names.id} {event_id} is not an RFC 4122/9562 UUID (variant/version)"
        )
    if key is None:
        # str(UUID) is slow; the text we parsed is already canonical in the usual case.
        key = id_text if len(id_text) == 36 and id_text == id_text.lower() else str(event_id)
    elif not (0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and "\x00" not in key):
        check_key(key, names.key)
    if not (0 < len(type_) <= MAX_TYPE_LENGTH and type_.isprintable() and not type_.isspace()):
        check_type(type_, names.type)

    if type(payload) is dict:
        # needs_scan inlined; the +1 is the top-level object's brace.
        if (
            not canonical
            or len(value) - len(value.translate(None, b"{[")) > limits.max_payload_depth + 1
            or value.find(b"\\u0000") >= 0
        ):
            scan_payload(payload, limits.max_payload_depth, names.payload)
    elif shape == "go" and type(payload) is str:
        payload = _decode_base64_payload(payload, limits, names.payload)
    else:
        raise DecodeError(
            "invalid_payload", f"{names.payload} is {_kind(payload)}, not a JSON object"
        )

    # Skip the call when the timestamp is already UTC milliseconds (our producer's form).
    if execute_at.tzinfo is not UTC or execute_at.microsecond % 1000:
        execute_at = due_ms(execute_at, names.execute_at, obj[names.execute_at])
    if created_at.tzinfo is not UTC or created_at.microsecond % 1000:
        created_at = utc_ms(created_at, names.created_at, obj[names.created_at])

    try:
        latest = now + limits._horizon
    except OverflowError:
        latest = datetime.max.replace(tzinfo=UTC)
    if execute_at > latest:
        raise DecodeError(
            "beyond_horizon",
            f"{names.execute_at} {format_time(execute_at)} is more than "
            f"{human(limits.horizon)} ahead",
        )
    late = execute_at < now
    if late:
        try:
            earliest = now - limits._max_past
        except OverflowError:
            earliest = datetime.min.replace(tzinfo=UTC)
        if execute_at < earliest:
            raise DecodeError(
                "too_old",
                f"{names.execute_at} {format_time(execute_at)} is more than "
                f"{human(limits.max_past)} in the past",
            )
    event = _EventBuilder(event_id, key, type_, payload, execute_at, created_at, late, shape)
    event.__class__ = Event  # type: ignore[assignment]  # see _EventBuilder
    return event  # type: ignore[return-value]  # it is an Event now


def _convert(obj: dict[str, Any], tp: type[_WireT]) -> _WireT:
    """Typed conversion in C (UUID and RFC 3339 parsing included), errors mapped to reasons."""
    try:
        return msgspec.convert(obj, tp)
    except msgspec.ValidationError as err:
        raise reason_for(str(err), obj) from None


def reason_for(message: str, obj: dict[str, Any]) -> DecodeError:
    # msgspec's messages look like "Object missing required field `type`",
    # "Expected `str`, got `int` - at `$.type`", "Invalid UUID - at `$.id`",
    # "Invalid RFC3339 encoded datetime - at `$.execute_at`".
    path = message.rpartition(" - at `$.")[2].rstrip("`") if " - at `$." in message else "?"
    if message.startswith("Object missing required field"):
        name = message.split("`")[1] if "`" in message else "?"
        return DecodeError("missing_field", f"missing field {name}")
    if message.startswith("Invalid UUID"):
        return DecodeError("invalid_id", f"{path} is not a UUID: {short(obj.get(path))}")
    if message.startswith("Invalid RFC3339"):
        return DecodeError(
            "invalid_timestamp", f"{path} is not an RFC 3339 timestamp: {short(obj.get(path))}"
        )
    if message.startswith("Expected") and "got" in message:
        expected_got = message.partition(" - at")[0]
        return DecodeError("invalid_field", f"{path}: {expected_got}")
    return DecodeError("invalid_field", message[:200])


def _rfc_uuid(value: uuid.UUID, text: str) -> bool:
    """Variant 10 (RFC 4122/9562) and version 1-8; read from the text when canonical (faster)."""
    if len(text) == 36:  # the only 36-character form msgspec accepts is the hyphenated one
        return text[14] in "12345678" and text[19] in "89abAB"
    bits = value.int
    return (bits >> 62) & 0b11 == 0b10 and 1 <= (bits >> 76) & 0xF <= 8


def _decode_base64_payload(text: str, limits: DecodeLimits, name: str) -> dict[str, Any]:
    """A Go ``[]byte`` payload: base64 of a JSON object."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise DecodeError(
            "invalid_payload", f"{name} is a string but not base64 of a JSON object"
        ) from None
    try:
        obj, canonical = parse_json(raw) if raw else (None, False)
    except DecodeError as err:
        if err.reason in ("too_deep", "duplicate_key"):
            raise
        raise DecodeError("invalid_payload", f"{name} (base64) is not JSON: {err.detail}") from None
    if type(obj) is not dict:
        raise DecodeError(
            "invalid_payload", f"{name} (base64) holds {_kind(obj)}, not a JSON object"
        )
    if needs_scan(raw, canonical, limits.max_payload_depth):
        scan_payload(obj, limits.max_payload_depth, name)
    return obj


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), "a number")


def human(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"
