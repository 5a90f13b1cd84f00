"""The consumer's dead-letter copies: each bad message (undecodable, or a row PostgreSQL
refused) goes to the DLQ topic with its original bytes, key and headers plus the reason
headers.

Copies are cut to the budget of :func:`~eventsched.core.domain.deadletter.fit_dead_letter` (the
key, the original headers, the value, each only as far as needed; ``dlq-truncated-*``
headers say what was cut). A copy the topic refuses for what it is (still too large,
invalid record) is kept in PostgreSQL (``dlq_undeliverable``) and the batch moves on; any
other delivery failure is a dependency failure (retried, never skipped) and marks the role
stalled (``dlq_failing``) until the copies are acknowledged.

Runs on the trio side (the role's batch tasks); sends go through the Kafka producer adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from eventsched.core.domain.deadletter import (
    DLQ_MIN_BYTES,
    DLQ_TRUNCATED_PREFIX,
    dlq_headers,
    fit_dead_letter,
)
from eventsched.core.kafka import KafkaProducer, OutboundMessage, Record
from eventsched.core.runtime import metrics
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.store import deadletters
from eventsched.core.store.pool import Database
from eventsched.plugins.consumer.dependencies import DependencyRetry

if TYPE_CHECKING:
    from eventsched.core.runtime.health import Health

#: The stall reason (``eventsched_role_stalled`` label) while dead letters cannot be sent.
DLQ_FAILING: Final = "dlq_failing"


@dataclass(frozen=True, slots=True)
class Invalid:
    """A bad message, and why."""

    record: Record
    reason: str
    error: str


@dataclass(frozen=True, slots=True)
class Copy:
    """The dead-letter copy of one bad message, as it is sent now."""

    item: Invalid
    #: The headers before any cut (the original ones, then ours).
    headers: list[tuple[str, bytes | None]]
    message: OutboundMessage
    #: Already cut to DLQ_MIN_BYTES: a copy refused for its size now goes to PostgreSQL.
    smallest: bool = False

    def cut_to_minimum(self) -> Copy | None:
        """The copy cut to DLQ_MIN_BYTES, or None when that changes nothing."""
        if self.smallest:
            return None
        record = self.item.record
        key, value, headers = fit_dead_letter(
            record.key, record.value or b"", self.headers, budget=DLQ_MIN_BYTES
        )
        if (key, value, headers) == (self.message.key, self.message.value, self.message.headers):
            return None
        message = _outbound(self.message.topic, key, value, headers)
        return Copy(self.item, self.headers, message, smallest=True)


class DeadLetterCopies:
    """Sends the dead-letter copies of a batch's bad messages (see the module docstring)."""

    def __init__(
        self,
        *,
        db: Database,
        producer: KafkaProducer,
        topic: str,
        consumer_id: str,
        health: Health,
        role: str,
        retrying: DependencyRetry,
        log: Any,
    ) -> None:
        self._db = db
        self._producer = producer
        self._topic = topic
        self._consumer_id = consumer_id
        self._health = health
        self._role = role
        self._retrying = retrying
        self._log = log
        # One token per send() call whose delivery is failing (the stall is cleared when
        # none is left).
        self._dlq_failing: set[object] = set()

    async def send(self, invalid: Sequence[Invalid]) -> list[str]:
        """Send a copy of each bad message to the DLQ topic; return once every copy is
        acknowledged, or kept in PostgreSQL when the topic refused it for a
        message-specific reason. Returns the reasons of the copies the topic took.

        Copies are cut to the dead-letter budget (``fit_dead_letter``); a dependency
        failure is retried with backoff for as long as it takes, and meanwhile the role is
        marked stalled (``dlq_failing``): ``/readyz`` answers 503 naming it."""
        failed_at = datetime.now(UTC)
        copies: list[Copy] = []
        for item in invalid:
            record = item.record
            headers = dlq_headers(
                reason=item.reason,
                error=item.error,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                source_timestamp_ms=record.timestamp_ms,
                consumer_id=self._consumer_id,
                failed_at=failed_at,
                original=record.headers,
            )
            full = headers
            key, value, cut = fit_dead_letter(record.key, record.value or b"", full)
            self._log.warning(
                "message_dead_lettered",
                reason=item.reason,
                error=item.error,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                **_cuts(cut),
            )
            copies.append(Copy(item, full, _outbound(self._topic, key, value, cut)))
        token = object()
        kept: list[Copy] = []
        try:
            await self._retrying(self._deliver_all, copies, kept, token)
        finally:
            self._dlq_failing.discard(token)
            if not self._dlq_failing:
                self._health.unstall(self._role, DLQ_FAILING)
        kept_ids = {id(copy.item) for copy in kept}
        return [item.reason for item in invalid if id(item) not in kept_ids]

    async def _deliver_all(self, copies: list[Copy], kept: list[Copy], token: object) -> None:
        """Send until every copy is acknowledged or kept in PostgreSQL. ``copies`` is
        trimmed in place to what is left, so a retry (after DependencyError) sends only
        those again; ``kept`` collects the copies kept in PostgreSQL."""
        while copies:
            reports = await self._producer.send_many([copy.message for copy in copies])
            left: list[Copy] = []
            refused: list[tuple[Copy, str]] = []
            problem: str | None = None
            for copy, report in zip(copies, reports, strict=True):
                if report.ok:
                    continue
                assert report.error is not None
                smaller = copy.cut_to_minimum() if report.too_large else None
                if smaller is not None:
                    left.append(smaller)
                elif report.message_specific:
                    refused.append((copy, report.error))
                else:
                    left.append(copy)
                    problem = problem or report.error
            if refused:
                await self._keep_in_postgres(refused)
                kept.extend(copy for copy, _ in refused)
            copies[:] = left
            if problem is not None:
                self._dlq_failing.add(token)
                self._health.stall(self._role, DLQ_FAILING, "dead-letter delivery failing")
                raise DependencyError("kafka", f"DLQ delivery failed: {problem}")

    async def _keep_in_postgres(self, refused: Sequence[tuple[Copy, str]]) -> None:
        """Keep copies the DLQ topic refused for what they are (the partition moves on)."""
        rows: list[deadletters.Undeliverable] = []
        for copy, error in refused:
            record, message = copy.item.record, copy.message
            if not copy.smallest:  # the table holds copies of bounded size
                smaller = copy.cut_to_minimum()
                message = smaller.message if smaller is not None else message
            self._log.error(
                "dead_letter_kept_in_postgres",
                reason=copy.item.reason,
                delivery_error=error,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            rows.append(
                deadletters.Undeliverable(
                    source_topic=record.topic,
                    source_partition=record.partition,
                    source_offset=record.offset,
                    reason=copy.item.reason,
                    error=_header_text(message, "dlq-error"),
                    delivery_error=error,
                    key=message.key,
                    value=message.value,
                    headers=list(message.headers or ()),
                    consumer_id=self._consumer_id,
                )
            )
        await self._retrying(deadletters.record, self._db, rows)
        for copy, _ in refused:
            metrics.DLQ_UNDELIVERABLE.labels(copy.item.reason).inc()


def _outbound(
    topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes | None]]
) -> OutboundMessage:
    # confluent-kafka accepts None header values (Kafka allows null ones).
    return OutboundMessage(topic, value, key, headers)  # type: ignore[arg-type]


def _cuts(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """The dlq-truncated-* headers of a copy, as log fields (``truncated_key=...``)."""
    return {
        "truncated_" + name[len(DLQ_TRUNCATED_PREFIX) :]: (value or b"").decode()
        for name, value in headers
        if name.startswith(DLQ_TRUNCATED_PREFIX)
    }


def _header_text(message: OutboundMessage, name: str) -> str:
    for header, value in message.headers or ():
        if header == name:
            return (value or b"").decode("ascii", "replace")
    return ""
