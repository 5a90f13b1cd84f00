"""Stage 1 of the consumer's pipeline, *record*: decode a Kafka batch, insert its valid
events into PostgreSQL with one statement (``ON CONFLICT (idempotency_key) DO NOTHING``),
apply its commands (:mod:`~eventsched.plugins.consumer.commands`) in log order, look up the
keys that already existed, send the bad messages' dead-letter copies, and build the SAQ
jobs of the events still ``scheduled`` (those a command changed get theirs from the
command's sync instead).

Failures: PostgreSQL refusing the data of the batch (``RowsRejected``) is narrowed down by
splitting the batch in halves; a single row still refused after ``consumer.max_retries``
attempts goes to the DLQ with reason ``db_rejected``. The same idempotency key with other
content (another id, type, payload or due time): the first event wins; the later message
counts as ``duplicate`` and is logged as ``conflicting_duplicate`` with both ids.

Runs on the trio side (one task per batch in flight).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Final

import trio

from eventsched.core.domain.commands import Command
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import Event
from eventsched.core.domain.jobcontract import FIRST_ATTEMPT, make_job
from eventsched.core.domain.message import decode_message
from eventsched.core.jobqueue import ScheduledJob, payload_bytes
from eventsched.core.kafka import Batch, Record, TopicPartitionKey
from eventsched.core.runtime.errors import DecodeError
from eventsched.core.runtime.sections import ConsumerSettings
from eventsched.core.runtime.tracing import header_traceparent
from eventsched.core.store import events as eventstore
from eventsched.core.store.commands import Applied, CommandRow
from eventsched.core.store.events import IngestRow, RowsRejected, StoredEvent
from eventsched.core.store.pool import Database
from eventsched.plugins.consumer.commands import Commands, synced_ids
from eventsched.plugins.consumer.deadletters import DeadLetterCopies, Invalid
from eventsched.plugins.consumer.dependencies import DependencyRetry

#: DLQ reason for a row PostgreSQL refused even alone (decode reasons come from core.domain.decode).
DB_REJECTED: Final = "db_rejected"


@dataclass(slots=True)
class Recorded:
    """A batch after stage 1: durable in PostgreSQL, bad messages acknowledged by the DLQ.

    Holds what the commit and the metrics need, not the records: up to COMMIT_BACKLOG of
    these wait for the committer, and their messages need not stay in memory meanwhile."""

    #: The assignment generation the batch was fetched under (for the commit).
    generation: int
    #: Broker timestamps (ms) of the batch's records, for the ingest latency histogram.
    timestamps_ms: list[int]
    #: Per partition, the offset to commit once this batch is done.
    offsets: dict[TopicPartitionKey, int]
    jobs: list[ScheduledJob]
    new: int
    duplicates: int
    invalid: int
    dlq_reasons: list[str] = field(default_factory=list)
    #: The batch's commands as applied, in log order: their jobs are synced after the
    #: batch's own jobs are enqueued (and dropped then, like the jobs).
    commands: list[Applied] = field(default_factory=list)


class Recorder:
    """Records batches (see the module docstring)."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        db: Database,
        job_timeout: int,
        lane_of: Callable[[str], str],
        dead_letters: DeadLetterCopies,
        commands: Commands,
        retrying: DependencyRetry,
        fetched_end: dict[TopicPartitionKey, int],
        log: Any,
    ) -> None:
        self._commands = commands
        self._settings = settings
        self._db = db
        self._limits = DecodeLimits.from_settings(settings)
        self._job_timeout = job_timeout
        self._lane_of = lane_of  # an event type's queue lane (per-type limits, priority)
        self._dead_letters = dead_letters
        self._retrying = retrying
        # The end of what was fetched, per partition (for the lag gauge); updated here.
        self._fetched_end = fetched_end
        self._log = log

    async def record(self, batch: Batch, *, after: trio.Event, inserted: trio.Event) -> Recorded:
        """Decode, then (once ``after`` is set) insert, apply commands, look up duplicates
        and dead-letter; sets ``inserted`` as soon as its INSERT and commands are done (the
        next batch's wait for it: log order)."""
        now = datetime.now(UTC)
        limits = self._limits
        rows: list[IngestRow] = []
        invalid: list[Invalid] = []
        first_by_key: dict[str, IngestRow] = {}
        later: list[IngestRow] = []  # same key as an earlier message of this batch
        commands: list[tuple[CommandRow, Record]] = []
        for record in batch.records:
            try:
                event = decode_message(
                    record.value,
                    now=now,
                    limits=limits,
                    headers=dict(record.headers) if record.headers else None,
                    key=record.key,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
            except DecodeError as err:
                invalid.append(Invalid(record, err.reason, err.detail))
                continue
            if isinstance(event, Command):
                command = CommandRow(event, record.topic, record.partition, record.offset)
                commands.append((command, record))
                continue
            row = IngestRow(
                event, record.topic, record.partition, record.offset,
                header_traceparent(record.headers),
            )  # fmt: skip
            if event.idempotency_key in first_by_key:
                later.append(row)
            else:
                first_by_key[event.idempotency_key] = row
                rows.append(row)

        await after.wait()
        try:
            new_keys, rejected = await self._insert(rows)
            applied, refused = await self._commands.apply(
                _hidden(commands, [r for r in rows if r.event.idempotency_key in new_keys]),
                [record for _, record in commands],
            )
        finally:
            inserted.set()  # on failure the pipeline is being torn down anyway
        for row, problem in rejected:
            invalid.append(Invalid(_record_of(batch, row), DB_REJECTED, problem))
        invalid += [Invalid(r.record, DB_REJECTED, r.problem) for r in refused]
        synced = synced_ids(applied)
        rejected_keys = {row.event.idempotency_key for row, _ in rejected}
        existing_rows = [
            row
            for row in rows
            if row.event.idempotency_key not in new_keys
            and row.event.idempotency_key not in rejected_keys
        ]
        existing: dict[str, StoredEvent] = {}
        if existing_rows:
            existing = await self._retrying(eventstore.lookup_existing, self._db, existing_rows)

        jobs: list[ScheduledJob] = []
        for row in rows:
            e = row.event
            day = new_keys.get(e.idempotency_key)
            if day is not None and not (synced and str(e.id) in synced):
                jobs.append(self._job(e.id, e.execute_at, e.type, row.traceparent, day, e.payload))
        for row in existing_rows:
            stored = existing.get(row.event.idempotency_key)
            if stored is None:
                # The key is taken but its event is gone: retention is dropping the event's
                # day and has not deleted its key yet (docs/retention.md, "The idempotency
                # window"). Still inside the window: the message is a duplicate.
                self._log.info(
                    "idempotency_key_of_retired_event",
                    idempotency_key=row.event.idempotency_key,
                    partition=row.partition,
                    offset=row.offset,
                )
                continue
            if not stored.same:
                self._conflict(row, stored.id)
            if stored.status == "scheduled" and not (synced and str(stored.id) in synced):
                # The message's traceparent: a redelivery of the stored event's own message.
                tp, payload = (row.traceparent, row.event.payload) if stored.same else (None, None)
                jobs.append(
                    self._job(stored.id, stored.execute_at, row.event.type, tp, stored.day, payload)
                )
        for row in later:
            first = first_by_key[row.event.idempotency_key]
            if not _same_event(first.event, row.event):
                self._conflict(row, first.event.id)

        delivered = await self._dead_letters.send(invalid) if invalid else []
        offsets = batch.next_offsets()
        for key, offset in offsets.items():
            self._fetched_end[key] = max(self._fetched_end.get(key, 0), offset)
        return Recorded(
            generation=batch.generation,
            timestamps_ms=[
                r.timestamp_ms
                for r in batch.records
                if r.timestamp_ms is not None and r.timestamp_ms >= 0
            ],
            offsets=offsets,
            jobs=jobs,
            new=len(new_keys),
            duplicates=len(existing_rows) + len(later),
            invalid=len(invalid),
            dlq_reasons=delivered,
            commands=applied,
        )

    async def _insert(
        self, rows: Sequence[IngestRow]
    ) -> tuple[dict[str, date], list[tuple[IngestRow, str]]]:
        """Insert rows; returns (new keys with their partition days, rows refused even
        alone with the reason)."""
        if not rows:
            return {}, []
        try:
            return await self._retrying(eventstore.insert_events, self._db, rows), []
        except RowsRejected as err:
            if len(rows) == 1:
                return await self._insert_one(rows[0], err)
        # Some row's data is refused: halve until the culprits are alone (about
        # 2 * log2(len(rows)) statements per bad row instead of one per row).
        middle = len(rows) // 2
        new_a, rejected_a = await self._insert(rows[:middle])
        new_b, rejected_b = await self._insert(rows[middle:])
        return new_a | new_b, rejected_a + rejected_b

    async def _insert_one(
        self, row: IngestRow, first_error: RowsRejected
    ) -> tuple[dict[str, date], list[tuple[IngestRow, str]]]:
        error = first_error
        for attempt in range(1, self._settings.max_retries):
            await trio.sleep(min(self._settings.backoff_initial * 2 ** (attempt - 1), 1.0))
            try:
                return await self._retrying(eventstore.insert_events, self._db, [row]), []
            except RowsRejected as err:
                error = err
        self._log.warning(
            "row_rejected",
            problem=error.problem,
            event_id=str(row.event.id),
            partition=row.partition,
            offset=row.offset,
            attempts=self._settings.max_retries,
        )
        return {}, [(row, error.problem)]

    def _conflict(self, row: IngestRow, winner_id: Any) -> None:
        self._log.warning(
            "conflicting_duplicate",
            idempotency_key=row.event.idempotency_key,
            kept_id=str(winner_id),
            dropped_id=str(row.event.id),
            partition=row.partition,
            offset=row.offset,
        )

    def _job(
        self,
        event_id: Any,
        execute_at: datetime,
        type_: str,
        traceparent: str | None,
        day: date | None,
        payload: dict[str, Any] | None,
    ) -> ScheduledJob:
        # The executor's job contract: first attempt, key = event id, due time in epoch s,
        # the event's partition day (from the insert or the lookup: no statement of its own)
        # and its payload's size as the executor's budget counts it (None: another event's
        # payload is stored under this key, its size unknown here).
        return make_job(
            str(event_id), FIRST_ATTEMPT, execute_at.timestamp(), self._job_timeout,
            lane=self._lane_of(type_), traceparent=traceparent, day=day,
            size=None if payload is None else payload_bytes(payload),
        )  # fmt: skip


def _hidden(
    commands: Sequence[tuple[CommandRow, Record]], new_rows: Sequence[IngestRow]
) -> list[CommandRow]:
    """The commands, each marked ``hide`` when its target is an event this batch inserted
    from a later message of the same partition (log order: the command came first)."""
    if not commands or not new_rows:
        return [row for row, _ in commands]
    by_key = {row.event.idempotency_key: row for row in new_rows}
    by_id = {row.event.id: row for row in new_rows}
    out: list[CommandRow] = []
    for row, _ in commands:
        c = row.command
        if c.event_id is not None:
            target = by_id.get(c.event_id)
        else:
            target = by_key.get(c.idempotency_key or "")
        later = (
            target is not None
            and target.partition == row.partition
            and row.offset is not None
            and target.offset > row.offset
        )
        out.append(replace(row, hide=True) if later else row)
    return out


def _record_of(batch: Batch, row: IngestRow) -> Record:
    for record in batch.records:
        if record.partition == row.partition and record.offset == row.offset:
            return record
    raise LookupError(f"no record at {row.partition}:{row.offset}")  # rows come from batch


def _same_event(a: Event, b: Event) -> bool:
    return (
        a.id == b.id
        and a.type == b.type
        and a.execute_at == b.execute_at
        and a.payload == b.payload
    )
