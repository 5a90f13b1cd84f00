"""Commands on events in the consumer's pipeline: apply them in PostgreSQL, then bring
Redis in line (trio side).

A batch's commands (cancel, reschedule, retry; a tombstone with a key is a cancel) are
applied in log order, right after the batch's INSERT and before the next batch's
(:mod:`~eventsched.plugins.consumer.record`), with :func:`~eventsched.core.store.commands.apply_commands`:
one transaction, a compare-and-set per command, each recorded in ``event_commands``. A
command that precedes, in its partition, the schedule message that this batch inserts for
its target finds no event (``unknown_event``), as it would have one batch earlier.

Redis follows PostgreSQL (:meth:`Commands.sync`), after the batch's own jobs are enqueued
and after the previous batch's commands are synced: the job of a cancelled event is
removed, the job of a rescheduled or retried event is moved to (or added at) its new due
time. The state synced is the event's state after the command, so syncing again (a retry
after a Redis failure, a repeated command) is harmless. A job a worker has already taken is
left to the executor's claim, which refuses a cancelled event and puts back one that is not
due yet. Offsets are committed only after both steps.

Per command one log line (``command_applied``) and ``eventsched_commands_total{op,result}``
(counted at commit, with the batch's other metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eventsched.core.domain.jobcontract import FIRST_ATTEMPT, job_key, make_job
from eventsched.core.jobqueue import ScheduledJob, ShardedQueue
from eventsched.core.kafka import Record
from eventsched.core.store import commands as commandstore
from eventsched.core.store.commands import Applied, CommandRow
from eventsched.core.store.events import RowsRejected
from eventsched.core.store.pool import Database
from eventsched.plugins.consumer.dependencies import DependencyRetry


@dataclass(frozen=True, slots=True)
class Rejected:
    """A command PostgreSQL refused even alone (for the DLQ, reason ``db_rejected``)."""

    record: Record
    problem: str


class Commands:
    """Applies commands and syncs their jobs (see the module docstring)."""

    def __init__(
        self,
        *,
        db: Database,
        queue: ShardedQueue,
        job_timeout: int,
        retrying: DependencyRetry,
        log: Any,
        lane_of: Callable[[str | None], str],
    ) -> None:
        self._db = db
        self._queue = queue
        self._job_timeout = job_timeout
        self._lane_of = lane_of  # an event type's queue lane (per-type limits, priority)
        self._retrying = retrying
        self._log = log

    async def apply(
        self, rows: Sequence[CommandRow], records: Sequence[Record]
    ) -> tuple[list[Applied], list[Rejected]]:
        """Apply ``rows`` (``records``: their messages) in order; log each. A batch that
        PostgreSQL refuses for its data is applied one command at a time, to find the
        culprit."""
        if not rows:
            return [], []
        try:
            applied = await self._retrying(commandstore.apply_commands, self._db, rows)
            rejected: list[Rejected] = []
        except RowsRejected:
            applied, rejected = [], []
            for row, record in zip(rows, records, strict=True):
                try:
                    applied += await self._retrying(commandstore.apply_commands, self._db, [row])
                except RowsRejected as err:
                    self._log.warning(
                        "command_rejected", command_id=str(row.command.command_id),
                        problem=err.problem, partition=row.partition, offset=row.offset,
                    )  # fmt: skip
                    rejected.append(Rejected(record, err.problem))
        for done, row in zip(applied, (r for r in rows if _kept(r, rejected)), strict=True):
            self._logged(done, row)
        return applied, rejected

    def _logged(self, done: Applied, row: CommandRow) -> None:
        c = done.command
        self._log.info(
            "command_applied" if done.fresh else "command_repeated",
            op=c.op,
            result=done.result,
            command_id=str(c.command_id),
            event_id=done.event_id,
            idempotency_key=c.idempotency_key,
            status_before=done.status_before,
            status=done.status,
            execute_at=None if c.execute_at is None else c.execute_at.isoformat(),
            requested_by=c.requested_by or None,
            partition=row.partition,
            offset=row.offset,
        )

    async def sync(self, applied: Sequence[Applied]) -> None:
        """Bring Redis in line with the events these commands changed (their last state)."""
        remove: list[str] = []
        place: list[ScheduledJob] = []
        for done in _last_per_event(applied):
            assert done.event_id is not None  # _last_per_event keeps known events only
            if done.status == "cancelled":
                remove += {done.event_id, job_key(done.event_id, done.attempts + 1)}
            elif done.status in ("scheduled", "retrying") and done.due is not None:
                place.append(self.job_for(done))
        if remove:
            await self._retrying(self._queue.remove_jobs, remove)
        for job in place:
            await self._retrying(self._queue.place_job, job)

    def job_for(self, done: Applied) -> ScheduledJob:
        """The job an event needs in its state after the command: a scheduled event's is
        the first attempt's (as after ``dlq replay``), a retrying one's the next attempt's."""
        assert done.event_id is not None and done.due is not None
        attempt = FIRST_ATTEMPT if done.status == "scheduled" else done.attempts + 1
        return make_job(
            done.event_id, attempt, done.due, self._job_timeout, traceparent=done.traceparent,
            day=done.day, lane=self._lane_of(done.type), size=done.size,
        )  # fmt: skip


def synced_ids(applied: Sequence[Applied]) -> set[str]:
    """Ids of the events whose jobs :meth:`Commands.sync` takes care of."""
    return {done.event_id for done in _last_per_event(applied) if done.event_id is not None}


def _last_per_event(applied: Sequence[Applied]) -> list[Applied]:
    # Only commands that changed (or, repeated, had changed) their event's status or due
    # time need Redis; the last state per event is the one that counts.
    last: dict[str, Applied] = {}
    for done in applied:
        if done.event_id is not None and done.result == "applied":
            last[done.event_id] = done
    return list(last.values())


def _kept(row: CommandRow, rejected: Sequence[Rejected]) -> bool:
    return not any(
        r.record.partition == row.partition and r.record.offset == row.offset for r in rejected
    )
