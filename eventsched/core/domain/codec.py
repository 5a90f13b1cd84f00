"""The event wire format: decode and validate Kafka messages, encode new events.

Pure functions and frozen types, no I/O. The consumer calls :func:`decode_event` for every
message; anything it rejects raises :class:`DecodeError` whose ``reason`` is one of
:data:`DECODE_REASONS` (it becomes the ``dlq-reason`` header and a metrics label).

Wire format, schema version 1 (Kafka key = idempotency key, headers from
:func:`kafka_headers`)::

    {"id": "<UUID>", "idempotency_key": "<str, optional, defaults to id>", "type": "<str>",
     "payload": {...}, "execute_at": "<RFC 3339>", "created_at": "<RFC 3339>"}

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
  rounded to microseconds by the parser, then every timestamp is truncated to milliseconds
  and converted to UTC, so an :class:`Event` always holds UTC milliseconds.
* ``idempotency_key: null`` counts as absent (and so does ``""`` in the Go shape, Go's zero
  value); in v1 an empty key is ``invalid_key``.
* Go ``Payload``: a JSON object, or a string holding standard base64 (what Go writes for a
  ``[]byte`` field) that decodes to a JSON object; anything else is ``invalid_payload``. A
  string holding JSON text (not base64) is rejected.
* Unknown top-level fields are ignored (forward compatibility; breaking changes bump the
  ``schema-version`` header). A missing ``schema-version`` header means version 1 (the Go
  original sends no headers); ``content-type`` is not checked.
* Duplicate keys: msgspec keeps the last of two equal keys. The fast path re-encodes the
  decoded value and compares it with the input; equal bytes prove there was no duplicate
  anywhere (the re-encoding has unique keys). Our own producer's output (compact msgspec
  JSON) always takes this path, and so does Go's encoding/json output unless it escapes
  ``<>&``. Any other input (whitespace as in ``json.dumps`` defaults, ``\\u00e9`` escapes,
  ``1e5`` number spellings, ...) goes through the stdlib parser with an
  ``object_pairs_hook`` that sees every key: exact, but about 4x slower. Duplicates with
  identical values are accepted.
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
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeVar

import msgspec

from eventsched.core.runtime.errors import DecodeError
from eventsched.core.runtime.settings import redact

if TYPE_CHECKING:
    from eventsched.core.runtime.settings import ConsumerSettings

__all__ = [
    "DECODE_REASONS",
    "DLQ_ERROR_MAX_BYTES",
    "DLQ_HEADERS_MAX_BYTES",
    "DLQ_HEADER_NAMES",
    "DLQ_KEY_MAX_BYTES",
    "DLQ_MAX_BYTES",
    "DLQ_MIN_BYTES",
    "DLQ_TRUNCATED_PREFIX",
    "MAX_KEY_LENGTH",
    "MAX_TYPE_LENGTH",
    "SCHEMA_VERSION",
    "DecodeLimits",
    "Event",
    "UUID7Generator",
    "decode_event",
    "dlq_headers",
    "dlq_size",
    "encode_event",
    "fit_dead_letter",
    "format_time",
    "kafka_headers",
    "kafka_key",
    "new_event",
    "parse_time",
    "uuid7",
]

SCHEMA_VERSION: Final = 1
MAX_TYPE_LENGTH: Final = 200
MAX_KEY_LENGTH: Final = 512
DLQ_ERROR_MAX_BYTES: Final = 1024

# Every reason decode_event can raise, roughly in the order of the checks (field errors
# found by msgspec come in the message's field order). They are the values of the
# `dlq-reason` header and of a metrics label: keep the set small and never rename one.
DECODE_REASONS: Final[tuple[str, ...]] = (
    "empty",  # tombstone (None) or zero-length value
    "unsupported_schema",  # schema-version header present and not "1"
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
    "invalid_op",  # a command's op is not cancel, reschedule, retry (or schedule)
)

Shape = Literal["v1", "go"]


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


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded (or newly created) event; timestamps are UTC with millisecond precision."""

    id: uuid.UUID
    idempotency_key: str
    type: str
    payload: dict[str, Any]
    execute_at: datetime
    created_at: datetime
    # The due time had passed (by at most max_past) when the event was decoded: run it now.
    late: bool = False
    shape: Shape = "v1"


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


# --- time -----------------------------------------------------------------------------


def format_time(dt: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z``: ``2024-05-01T10:00:00.123Z``."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt.isoformat()} has no UTC offset")
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="milliseconds")[:-6] + "Z"  # drop "+00:00"


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 with a mandatory offset into an aware UTC datetime (microseconds kept).

    Raises ``DecodeError("invalid_timestamp", ...)``.
    """
    try:
        dt = msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        raise DecodeError(
            "invalid_timestamp", f"not an RFC 3339 timestamp: {_short(text)}"
        ) from None
    return _utc(dt, "timestamp", text)


def _utc(dt: datetime, name: str, original: object = None) -> datetime:
    tz = dt.tzinfo
    if tz is None or (tz is not UTC and dt.utcoffset() is None):
        shown = _short(dt.isoformat() if original is None else original)
        raise DecodeError("invalid_timestamp", f"{name} has no UTC offset: {shown}")
    if tz is not UTC:
        try:
            dt = dt.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            shown = _short(dt.isoformat() if original is None else original)
            raise DecodeError(
                "invalid_timestamp", f"{name} is out of range in UTC: {shown}"
            ) from None
    return dt


# Truncating with a precomputed timedelta is ~10x faster than datetime.replace() (measured).
_SUB_MS: Final = tuple(timedelta(microseconds=us) for us in range(1000))


def _utc_ms(dt: datetime, name: str, original: object = None) -> datetime:
    dt = _utc(dt, name, original)
    return dt - _SUB_MS[dt.microsecond % 1000]


# --- UUIDv7 ---------------------------------------------------------------------------


class UUID7Generator:
    """Monotonic UUIDv7 ids (RFC 9562, section 6.2 method 1, with a 42-bit counter).

    Same layout as CPython 3.14's ``uuid.uuid7``: 48-bit Unix milliseconds, a 42-bit
    counter seeded randomly each millisecond (top bit clear, so it has room to count up)
    and 32 random bits. Within one millisecond the counter increments, so the ids of one
    generator sort in creation order; if the clock goes backwards the last timestamp is
    reused. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def next(self, unix_ms: int | None = None) -> uuid.UUID:
        """The next id; ``unix_ms`` (default: the clock) is for tests and replays."""
        ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
        with self._lock:
            if ms > self._last_ms:
                counter = _random_counter()
            else:
                ms = self._last_ms
                counter = self._counter + 1
                if counter > 0x3FF_FFFF_FFFF:  # counter exhausted: borrow the next millisecond
                    ms += 1
                    counter = _random_counter()
            self._last_ms, self._counter = ms, counter
        return _uuid7(ms, counter)


def _random_counter() -> int:
    return int.from_bytes(os.urandom(6)) & 0x1FF_FFFF_FFFF


def _uuid7(unix_ms: int, counter: int) -> uuid.UUID:
    if not 0 <= unix_ms <= 0xFFFF_FFFF_FFFF:
        raise ValueError(f"unix_ms {unix_ms} does not fit in 48 bits")
    return uuid.UUID(
        int=unix_ms << 80
        | 0x7 << 76  # version 7
        | (counter >> 30) << 64  # rand_a: the counter's top 12 bits
        | 0b10 << 62  # variant 10
        | (counter & 0x3FFF_FFFF) << 32  # rand_b: the counter's low 30 bits, then random
        | int.from_bytes(os.urandom(4))
    )


# Process-wide on purpose: ids are only ordered if they come from one counter.
_PROCESS_UUID7: Final = UUID7Generator()


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """A new UUIDv7. Without ``unix_ms`` it comes from the process-wide generator, so ids
    of this process sort in creation order. With ``unix_ms`` (a given creation time) it is
    independent of that order: letting a caller's clock move the shared generator would
    stamp every later id with that time.
    """
    if unix_ms is None:
        return _PROCESS_UUID7.next()
    return _uuid7(unix_ms, _random_counter())


# --- encoding -------------------------------------------------------------------------

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
        due = _utc_ms(execute_at, "execute_at")
        if now is None:
            event_id = uuid7()  # monotonic; created_at is read back from it
            created_at = _EPOCH + (event_id.int >> 80) * _MILLISECOND
        else:
            created_at = _utc_ms(now, "now")
            event_id = uuid7((created_at - _EPOCH) // _MILLISECOND)
        key = str(event_id) if idempotency_key is None else idempotency_key
        _check_type(type, "type")
        _check_key(key, "idempotency_key")
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
    if "\x00" in text or not _utf8_ok(text):
        raise ValueError(f"payload string {_short(text)} contains NUL or a lone surrogate")


# --- DLQ headers ----------------------------------------------------------------------

DLQ_HEADER_NAMES: Final = (
    "dlq-reason",
    "dlq-error",
    "source-topic",
    "source-partition",
    "source-offset",
    "source-timestamp",
    "consumer-id",
    "failed-at",
    "dlq-truncated-key",
    "dlq-truncated-headers",
    "dlq-truncated-value",
)

# The dead-letter budget (docs/wire-format.md, "Dead letters"). A copy whose key + value + headers
# (names, values and DLQ_HEADER_OVERHEAD each) fit in DLQ_MAX_BYTES is sent unchanged: that
# stays below librdkafka's default message.max.bytes (1,000,000) and Kafka's default
# max.message.bytes (1,048,588). A bigger one is cut, in this order and only as far as
# needed: the key to DLQ_KEY_MAX_BYTES, the original headers to DLQ_HEADERS_MAX_BYTES
# (whole headers kept in order, the rest dropped), the value to what is left. A copy still
# refused for its size is cut the same way to DLQ_MIN_BYTES. Our own headers are never cut
# (they are bounded: dlq-error 1 KiB, the others a few hundred bytes).
DLQ_MAX_BYTES: Final = 900_000
DLQ_MIN_BYTES: Final = 64 * 1024
DLQ_KEY_MAX_BYTES: Final = 1024
DLQ_HEADERS_MAX_BYTES: Final = 16 * 1024
#: Bytes counted per header on top of its name and value (its framing in a record).
DLQ_HEADER_OVERHEAD: Final = 8
#: Every header saying what was cut starts with this; its value is the original size
#: in bytes (ASCII digits): of the key, of all original headers (names + values), of the value.
DLQ_TRUNCATED_PREFIX: Final = "dlq-truncated-"

DlqHeaders = list[tuple[str, bytes | None]]


def dlq_headers(
    *,
    reason: str,
    error: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    source_timestamp_ms: int | None,
    consumer_id: str,
    failed_at: datetime,
    original: Iterable[tuple[str, bytes | None]] | None = None,
) -> list[tuple[str, bytes | None]]:
    """Headers for a message sent to the DLQ: the original ones, then ours.

    Original headers keep their order; ones named like ours (a message that failed before
    and was replayed) are dropped so each DLQ header appears exactly once. Our values are
    ASCII (non-ASCII escaped, control characters replaced by spaces); ``dlq-error`` is cut
    to 1 KiB after :func:`~eventsched.core.runtime.settings.redact` took any secret out of it (an error
    may quote a URL from the payload). ``source-timestamp`` (Kafka timestamp, ms since the epoch) is left out when
    unknown (``None`` or negative, as librdkafka reports a missing timestamp).
    """
    ours: list[tuple[str, bytes | None]] = [
        ("dlq-reason", _ascii(reason, 128)),
        ("dlq-error", _ascii(redact(error), DLQ_ERROR_MAX_BYTES)),
        ("source-topic", _ascii(source_topic, 256)),
        ("source-partition", str(source_partition).encode()),
        ("source-offset", str(source_offset).encode()),
    ]
    if source_timestamp_ms is not None and source_timestamp_ms >= 0:
        ours.append(("source-timestamp", str(source_timestamp_ms).encode()))
    ours.append(("consumer-id", _ascii(consumer_id, 256)))
    ours.append(("failed-at", format_time(failed_at).encode()))
    kept = [(k, v) for k, v in original or () if k not in DLQ_HEADER_NAMES]
    return kept + ours


def dlq_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]
) -> int:
    """The size the dead-letter budget counts for a message (see DLQ_MAX_BYTES)."""
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(n.encode()) + len(v or b"") + DLQ_HEADER_OVERHEAD for n, v in headers)
    )


def fit_dead_letter(
    key: bytes | None, value: bytes, headers: DlqHeaders, *, budget: int = DLQ_MAX_BYTES
) -> tuple[bytes | None, bytes, DlqHeaders]:
    """Cut a dead-letter copy to ``budget`` (see DLQ_MAX_BYTES for the order of cuts).

    ``headers`` is what :func:`dlq_headers` returned: the original headers, then ours.
    Each part that was cut adds a ``dlq-truncated-key|headers|value`` header holding its
    original size; a copy within the budget is returned unchanged. Pure; any side.
    """
    if dlq_size(key, value, headers) <= budget:
        return key, value, headers
    original = [(n, v) for n, v in headers if n not in DLQ_HEADER_NAMES]
    ours = [(n, v) for n, v in headers if n in DLQ_HEADER_NAMES]
    cuts: DlqHeaders = []

    def size() -> int:
        return dlq_size(key, value, [*original, *ours, *cuts])

    if key is not None and len(key) > DLQ_KEY_MAX_BYTES and size() > budget:
        cuts.append(("dlq-truncated-key", str(len(key)).encode()))
        key = key[:DLQ_KEY_MAX_BYTES]
    if original and size() > budget:
        kept: DlqHeaders = []
        used = 0
        for name, header_value in original:
            used += dlq_size(None, header_value, [(name, None)])
            if used > DLQ_HEADERS_MAX_BYTES:
                break
            kept.append((name, header_value))
        if len(kept) < len(original):
            total = sum(len(n.encode()) + len(v or b"") for n, v in original)
            cuts.append(("dlq-truncated-headers", str(total).encode()))
            original = kept
    if size() > budget:
        length = len(value)
        cuts.append(("dlq-truncated-value", str(length).encode()))
        value = value[: max(0, length - (size() - budget))]
    return key, value, [*original, *ours, *cuts]


_CONTROL = {c: " " for c in (*range(0x20), 0x7F)}


def _ascii(text: str, limit: int) -> bytes:
    data = text.translate(_CONTROL).encode("ascii", "backslashreplace")
    return data if len(data) <= limit else data[: limit - 3] + b"..."


# --- decoding -------------------------------------------------------------------------


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

_DECODER: Final = msgspec.json.Decoder()
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
            shown = _short(version.decode("ascii", "backslashreplace"))
            raise DecodeError("unsupported_schema", f"schema-version {shown}, expected 1")
    if len(value) > limits.max_message_bytes:
        raise DecodeError(
            "too_large", f"{len(value)} bytes, limit {limits.max_message_bytes} bytes"
        )
    obj, canonical = _parse_json(value)
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

    # The happy path below inlines the cheap tests of the _check_* helpers: at 100k
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
        _check_key(key, names.key)
    if not (0 < len(type_) <= MAX_TYPE_LENGTH and type_.isprintable() and not type_.isspace()):
        _check_type(type_, names.type)

    if type(payload) is dict:
        # _needs_scan inlined; the +1 is the top-level object's brace.
        if (
            not canonical
            or len(value) - len(value.translate(None, b"{[")) > limits.max_payload_depth + 1
            or value.find(b"\\u0000") >= 0
        ):
            _scan_payload(payload, limits.max_payload_depth, names.payload)
    elif shape == "go" and type(payload) is str:
        payload = _decode_base64_payload(payload, limits, names.payload)
    else:
        raise DecodeError(
            "invalid_payload", f"{names.payload} is {_kind(payload)}, not a JSON object"
        )

    # Skip the call when the timestamp is already UTC milliseconds (our producer's form).
    if execute_at.tzinfo is not UTC or execute_at.microsecond % 1000:
        execute_at = _utc_ms(execute_at, names.execute_at, obj[names.execute_at])
    if created_at.tzinfo is not UTC or created_at.microsecond % 1000:
        created_at = _utc_ms(created_at, names.created_at, obj[names.created_at])

    try:
        latest = now + limits._horizon
    except OverflowError:
        latest = datetime.max.replace(tzinfo=UTC)
    if execute_at > latest:
        raise DecodeError(
            "beyond_horizon",
            f"{names.execute_at} {format_time(execute_at)} is more than "
            f"{_human(limits.horizon)} ahead",
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
                f"{_human(limits.max_past)} in the past",
            )
    event = _EventBuilder(event_id, key, type_, payload, execute_at, created_at, late, shape)
    event.__class__ = Event  # type: ignore[assignment]  # see _EventBuilder
    return event  # type: ignore[return-value]  # it is an Event now


def _convert(obj: dict[str, Any], tp: type[_WireT]) -> _WireT:
    """Typed conversion in C (UUID and RFC 3339 parsing included), errors mapped to reasons."""
    try:
        return msgspec.convert(obj, tp)
    except msgspec.ValidationError as err:
        raise _reason_for(str(err), obj) from None


def _reason_for(message: str, obj: dict[str, Any]) -> DecodeError:
    # msgspec's messages look like "Object missing required field `type`",
    # "Expected `str`, got `int` - at `$.type`", "Invalid UUID - at `$.id`",
    # "Invalid RFC3339 encoded datetime - at `$.execute_at`".
    path = message.rpartition(" - at `$.")[2].rstrip("`") if " - at `$." in message else "?"
    if message.startswith("Object missing required field"):
        name = message.split("`")[1] if "`" in message else "?"
        return DecodeError("missing_field", f"missing field {name}")
    if message.startswith("Invalid UUID"):
        return DecodeError("invalid_id", f"{path} is not a UUID: {_short(obj.get(path))}")
    if message.startswith("Invalid RFC3339"):
        return DecodeError(
            "invalid_timestamp", f"{path} is not an RFC 3339 timestamp: {_short(obj.get(path))}"
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


def _check_type(value: str, name: str) -> None:
    # One combined test for the valid case; the branches below only explain a failure.
    # isprintable() is False for NUL, other control characters and lone surrogates.
    if 0 < len(value) <= MAX_TYPE_LENGTH and value.isprintable() and not value.isspace():
        return
    if not value.strip():
        raise DecodeError("invalid_type", f"{name} is empty")
    if len(value) > MAX_TYPE_LENGTH:
        raise DecodeError(
            "invalid_type", f"{name} has {len(value)} characters, limit {MAX_TYPE_LENGTH}"
        )
    raise DecodeError("invalid_type", f"{name} {_short(value)} has unprintable characters")


def _check_key(value: str, name: str) -> None:
    if 0 < len(value) <= MAX_KEY_LENGTH and "\x00" not in value and _utf8_ok(value):
        return
    if not value:
        raise DecodeError("invalid_key", f"{name} is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise DecodeError(
            "invalid_key", f"{name} has {len(value)} characters, limit {MAX_KEY_LENGTH}"
        )
    raise DecodeError("invalid_key", f"{name} contains NUL or a lone surrogate")


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# --- JSON parsing: fast path and exact fallback ---------------------------------------


class _BadNumber:
    """Stands in for NaN/Infinity/out-of-range numbers the stdlib fallback parser met."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else text[:21] + "..."

    def __repr__(self) -> str:
        return self.text


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _parse_float(text: str) -> float | _BadNumber:
    number = float(text)
    return number if math.isfinite(number) else _BadNumber(text)


def _parse_int(text: str) -> int | _BadNumber:
    try:
        return int(text)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        return _BadNumber(text)


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen and not _same(seen[key], value):
                raise _DuplicateKey(key)
            seen[key] = value
    return obj


def _same(a: Any, b: Any) -> bool:
    # Stricter than ==, for which 1 == 1.0 == True.
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is _BadNumber:
        return bool(a.text == b.text)
    return bool(a == b)


def _parse_json(data: bytes) -> tuple[Any, bool]:
    """Parse JSON; the flag says the fast path proved the input canonical (see module doc)."""
    try:
        obj = _DECODER.decode(data)
    except RecursionError:
        raise DecodeError("too_deep", "JSON nesting exceeds the parser's recursion limit") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        # Let the fallback find the precise reason (UTF-8, NaN, huge number, syntax).
        return _parse_json_slow(data), False
    try:
        canonical = _ENCODER.encode(obj) == data
    except Exception:  # e.g. RecursionError; the fallback decides
        canonical = False
    return (obj, True) if canonical else (_parse_json_slow(data), False)


def _parse_json_slow(data: bytes) -> Any:
    try:
        # Strict UTF-8 ourselves: json.loads(bytes) would guess UTF-16/32 and pass surrogates.
        text = data.decode()
    except UnicodeDecodeError as err:
        raise DecodeError(
            "invalid_utf8", f"invalid UTF-8 byte 0x{data[err.start]:02x} at offset {err.start}"
        ) from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_pairs_hook,
            parse_constant=_BadNumber,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except _DuplicateKey as err:
        raise DecodeError(
            "duplicate_key", f"key {_short(err.key)} appears twice with different values"
        ) from None
    except RecursionError:
        raise DecodeError("too_deep", "JSON nesting exceeds the parser's recursion limit") from None
    except json.JSONDecodeError as err:
        raise DecodeError("invalid_json", f"{err.msg} (offset {err.pos})") from None


def _needs_scan(data: bytes, canonical: bool, max_brackets: int) -> bool:
    """Whether the payload must be walked; False only when the raw bytes prove it clean.

    Canonical msgspec output has no NaN, no huge numbers and no lone surrogates, writes NUL
    as ``\\u0000``, and cannot nest deeper than its number of brackets.
    """
    return (
        not canonical
        # One pass that drops the brackets beats two count() calls (measured).
        or len(data) - len(data.translate(None, b"{[")) > max_brackets
        or data.find(b"\\u0000") >= 0  # find() is faster than `in` here (measured)
    )


def _scan_payload(payload: dict[str, Any], max_depth: int, name: str) -> None:
    """Walk the payload: depth, NUL and lone surrogates in keys and strings, bad numbers."""
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise DecodeError("too_deep", f"{name} is nested deeper than {max_depth} levels")
        values: Iterable[Any]
        if type(node) is dict:
            for key in node:
                _payload_text(key, name)
            values = node.values()
        else:
            values = node
        for value in values:
            kind = type(value)
            if kind is str:
                _payload_text(value, name)
            elif kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind is _BadNumber:
                raise DecodeError(
                    "invalid_payload",
                    f"{name} has NaN/Infinity or an out-of-range number {value!r}",
                )


def _payload_text(text: str, name: str) -> None:
    if "\x00" in text:
        raise DecodeError("invalid_payload", f"{name} has a \\u0000 character (jsonb rejects it)")
    if not _utf8_ok(text):
        raise DecodeError("invalid_payload", f"{name} has a lone surrogate (not valid UTF-8)")


def _decode_base64_payload(text: str, limits: DecodeLimits, name: str) -> dict[str, Any]:
    """A Go ``[]byte`` payload: base64 of a JSON object."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise DecodeError(
            "invalid_payload", f"{name} is a string but not base64 of a JSON object"
        ) from None
    try:
        obj, canonical = _parse_json(raw) if raw else (None, False)
    except DecodeError as err:
        if err.reason in ("too_deep", "duplicate_key"):
            raise
        raise DecodeError("invalid_payload", f"{name} (base64) is not JSON: {err.detail}") from None
    if type(obj) is not dict:
        raise DecodeError(
            "invalid_payload", f"{name} (base64) holds {_kind(obj)}, not a JSON object"
        )
    if _needs_scan(raw, canonical, limits.max_payload_depth):
        _scan_payload(obj, limits.max_payload_depth, name)
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


def _human(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
