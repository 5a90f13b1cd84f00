"""Dead-letter copies: the headers that say why a message failed, and the size budget.

The consumer (a message it cannot decode or store) and the executor (an event that is dead)
send a copy of the message to the DLQ topic with :func:`dlq_headers`, cut to the budget by
:func:`fit_dead_letter`. ``dlq replay`` drops these headers again (:data:`DLQ_HEADER_NAMES`).
Pure functions; any side.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Final

from eventsched.core.domain.event import format_time
from eventsched.core.runtime.redaction import redact

__all__ = [
    "DLQ_ERROR_MAX_BYTES",
    "DLQ_HEADERS_MAX_BYTES",
    "DLQ_HEADER_NAMES",
    "DLQ_KEY_MAX_BYTES",
    "DLQ_MAX_BYTES",
    "DLQ_MIN_BYTES",
    "DLQ_TRUNCATED_PREFIX",
    "dlq_headers",
    "dlq_size",
    "fit_dead_letter",
]

DLQ_ERROR_MAX_BYTES: Final = 1024
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
    to 1 KiB after :func:`~eventsched.core.runtime.redaction.redact` took any secret out of it (an error
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
