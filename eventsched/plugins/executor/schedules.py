"""The schedule leader: recurring schedules' occurrences become ordinary events on the log.

Runs inside the executor role. At start, every executor applies the ``[schedules.<name>]``
of its settings to PostgreSQL (:func:`eventsched.core.store.schedules.apply_settings`: an
unchanged definition is left alone, a changed one overwritten, a settings schedule no longer
in the file deleted, and its occurrences materialised ahead cancelled). Then one executor at
a time leads, every ``scheduler.interval``:

* for each schedule not paused, :func:`eventsched.core.domain.schedulefields.plan` says what
  to publish: the occurrences up to ``scheduler.lookahead`` ahead that are after its
  watermark, and those it missed (after the watermark and before now: no leader ran) as
  its misfire policy says (resuming a paused schedule moves its watermark to now, so what
  passed while it was paused is not a misfire);
* each occurrence is published to the ``events`` topic as an ordinary schedule message,
  keyed by its idempotency key ``<name>@<occurrence time UTC>``;
* the watermark advances only over what the broker acknowledged, and only on the revision
  of the schedule that was read. A schedule deleted meanwhile gets a cancel for each
  occurrence this pass published (the delete could not know them).

Exactly once: a leader that dies between publishing and advancing the watermark, two
leaders for a moment (a lock whose connection is gone but not yet noticed), or a publish
that is acknowledged but reported failed, all publish an occurrence again with the same
idempotency key, and the consumer records one event per key (``ON CONFLICT DO NOTHING``).

Leadership is its own advisory lock (``lock_key(queue, "schedules")``), not the
reconciler's: the two duties share nothing but the executor process, a long reconciler pass
(a restore after Redis lost its data) must not delay occurrences, ``reconciler.enabled =
false`` must not stop schedules, and two executors can split the two duties between them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import trio

from eventsched.core.domain.commands import command_headers, encode_command, new_command
from eventsched.core.domain.schedulefields import materialised_after, plan
from eventsched.core.domain.schedules import ScheduleSpec, occurrence_key
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.kafka import KafkaProducer, OutboundMessage
from eventsched.core.runtime import metrics
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import Settings, require_postgres
from eventsched.core.store import schedules as store
from eventsched.core.store.leader import LeaderLock, lead, lock_key
from eventsched.core.store.pool import Database

log = get_logger(__name__)

#: ``requested_by`` of the cancels the executor sends for removed or deleted schedules.
REQUESTED_BY: Final = "schedules"


def occurrence_message(spec: ScheduleSpec, at: datetime, topic: str) -> OutboundMessage:
    """The schedule message of one occurrence: an ordinary event keyed by its occurrence
    key (a fresh event id each time; the key makes repeats one event)."""
    event = new_event(spec.type, spec.payload, at, idempotency_key=occurrence_key(spec.name, at))
    return OutboundMessage(topic, encode_event(event), kafka_key(event), kafka_headers())


def cancel_message(key: str, topic: str, requested_by: str = REQUESTED_BY) -> OutboundMessage:
    """A cancel command for the event with idempotency key ``key``."""
    command = new_command("cancel", idempotency_key=key, requested_by=requested_by)
    return OutboundMessage(topic, encode_command(command), command.kafka_key, command_headers())


class ScheduleLeader:
    """See the module docstring; ``run`` until cancelled."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        producer: KafkaProducer,
        specs: dict[str, ScheduleSpec],  # the settings' schedules, validated
    ) -> None:
        self._db = db
        self._producer = producer
        self._specs = specs
        self._topic = settings.kafka.topic
        s = settings.scheduler
        self._interval = float(s.interval)
        self._lookahead = float(s.lookahead)
        self._batch = s.batch
        self._max_past = float(settings.consumer.max_past)
        self.lock = LeaderLock(
            require_postgres(settings),
            lock_key(settings.redis.queue, "schedules"),
            connect_timeout=float(settings.postgres.connect_timeout),
            name="schedules",
        )
        self.passes = 0

    async def run(self) -> None:
        await self._apply_settings()  # before the lock is first tried: nothing to release
        await lead(
            self.lock,
            self._pass,
            interval=self._interval,
            follower_interval=self._interval,
            logger=log,
            became=("schedule_leader", "schedule_follower"),
        )

    async def _pass(self) -> None:
        try:
            await self.materialise_once()
        except DependencyError as err:
            log.warning("schedule_pass_failed", error=str(err))

    async def _apply_settings(self) -> None:
        backoff = 0.2
        while True:
            try:
                applied = await store.apply_settings(self._db, self._specs)
                break
            except DependencyError as err:
                log.warning("schedule_settings_not_applied", error=err.problem, retry_in=backoff)
            await trio.sleep(backoff)
            backoff = min(2 * backoff, 5.0)
        if applied.created or applied.updated or applied.removed:
            log.info(
                "schedule_settings_applied",
                created=applied.created,
                updated=applied.updated,
                removed=[row.name for row in applied.removed],
            )
        now = datetime.now(UTC)
        for row in applied.removed:
            await self.cancel(materialised_after(row.spec, row.materialised_through, now), row.spec)

    async def materialise_once(self, now: datetime | None = None) -> int:
        """One pass over every schedule; returns how many occurrences were published."""
        published = 0
        for row in await store.list_schedules(self._db):
            if not row.spec.paused:
                published += await self._materialise(row, now or datetime.now(UTC))
        self.passes += 1
        return published

    async def _materialise(self, row: store.ScheduleRow, now: datetime) -> int:
        spec = row.spec
        step = plan(
            spec,
            row.materialised_through,
            now,
            lookahead=self._lookahead,
            max_past=self._max_past,
            limit=self._batch,
        )
        if step.too_old:
            metrics.SCHEDULE_OCCURRENCES.labels("too_old").inc(step.too_old)
            log.warning("schedule_occurrences_too_old", schedule=spec.name, count=step.too_old)
        reports = await self._producer.send_many(
            [occurrence_message(spec, at, self._topic) for at in step.occurrences]
        )
        acknowledged = 0
        for report in reports:  # the watermark moves over the acknowledged prefix only
            if not report.ok:
                break
            acknowledged += 1
        sent = step.occurrences[:acknowledged]
        metrics.SCHEDULE_OCCURRENCES.labels("published").inc(acknowledged)
        if acknowledged < len(step.occurrences):
            failed = len(step.occurrences) - acknowledged
            metrics.SCHEDULE_OCCURRENCES.labels("failed").inc(failed)
            log.warning("schedule_publish_failed", schedule=spec.name, failed=failed,
                        error=reports[acknowledged].error)  # fmt: skip
            through = sent[-1] if sent else row.materialised_through
        else:
            through = step.through
        if through is None or (not sent and not step.too_old and row.materialised_through):
            # Nothing published: the watermark may stay where it is (no occurrence lies
            # between it and the window), which spares a write per schedule and pass. A
            # new schedule's first watermark is written, so that misfires count from it.
            return 0
        advanced = await store.advance(self._db, spec.name, row.revision, through)
        if not advanced and await store.get(self._db, spec.name) is None:
            # Deleted while this pass published: its delete could not cancel these.
            await self.cancel([at for at in sent if at > now], spec)
        if sent:
            log.debug("schedule_materialised", schedule=spec.name, occurrences=len(sent))
        return len(sent)

    async def cancel(self, occurrences: list[datetime], spec: ScheduleSpec) -> None:
        """Publish a cancel for each occurrence of ``spec`` (errors are logged: a cancel
        not delivered leaves an occurrence to run, as it would have without the delete)."""
        if not occurrences:
            return
        messages = [
            cancel_message(occurrence_key(spec.name, at), self._topic) for at in occurrences
        ]
        try:
            reports = await self._producer.send_many(messages)
        except DependencyError as err:
            log.warning("schedule_cancel_failed", schedule=spec.name, error=err.problem)
            return
        done = sum(report.ok for report in reports)
        metrics.SCHEDULE_OCCURRENCES.labels("cancelled").inc(done)
        log.info("schedule_occurrences_cancelled", schedule=spec.name, cancelled=done,
                 failed=len(reports) - done)  # fmt: skip
