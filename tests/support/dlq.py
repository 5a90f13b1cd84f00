"""Dead-letter helpers shared by the unit and integration tiers."""

from __future__ import annotations

from datetime import UTC, datetime

from eventsched.core.domain.deadletter import dlq_headers


def our_headers() -> list[tuple[str, bytes | None]]:
    """The headers the consumer gives a dead letter (a long error, cut by dlq_headers)."""
    return dlq_headers(
        reason="invalid_json",
        error="x" * 5000,  # cut to 1 KiB by dlq_headers
        source_topic="events",
        source_partition=0,
        source_offset=7,
        source_timestamp_ms=1,
        consumer_id="host:1",
        failed_at=datetime.now(UTC),
        original=[("a", b"1"), ("big", b"B" * 10_000), ("z", None)],
    )
