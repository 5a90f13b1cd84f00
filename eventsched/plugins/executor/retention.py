"""The retention duty: one executor at a time keeps the time-partitioned log's partitions.

Every ``retention.interval`` (first when it becomes leader) the leader runs a maintenance
pass (:func:`eventsched.core.store.retention.enforce`: create partitions ``ahead``, retire
days older than ``keep``; docs/retention.md) in a worker thread, on a connection of its own.

Leadership is its own advisory lock (``lock_key(queue, "retention")``), not the
reconciler's: a retirement scans a whole day and deletes its keys in batches, which would
delay the reconciler's repairs (every ``reconciler.interval``) by minutes. ``eventsched
retention enforce`` takes the same lock, so a manual pass never runs beside the leader's.
"""

from __future__ import annotations

from datetime import UTC, datetime

import trio

from eventsched.core.domain.retention import RetentionPolicy, policy_from_settings
from eventsched.core.runtime import metrics
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import Settings, require_postgres
from eventsched.core.store import retention as store
from eventsched.core.store.leader import LeaderLock, lead, lock_key

log = get_logger(__name__)


def record(report: store.PassReport) -> None:
    """The metrics of a pass that ran (not of a dry run)."""
    for table, rows in report.dropped.items():
        metrics.RETENTION_DROPPED.labels(table).inc(rows)
    metrics.RETENTION_HOPPED.inc(report.hopped)


class RetentionDuty:
    """See the module docstring; ``run`` until cancelled."""

    def __init__(self, *, settings: Settings) -> None:
        self._dsn = require_postgres(settings)
        self.policy: RetentionPolicy = policy_from_settings(settings.retention)
        self.lock = LeaderLock(
            self._dsn,
            lock_key(settings.redis.queue, store.DUTY),
            connect_timeout=float(settings.postgres.connect_timeout),
            name=store.DUTY,
        )
        self.passes = 0

    async def run(self) -> None:
        await lead(
            self.lock,
            self.pass_once,
            interval=self.policy.interval.total_seconds(),
            follower_interval=5.0,
            logger=log,
            became=("retention_leader", "retention_follower"),
        )

    async def pass_once(self, now: datetime | None = None) -> store.PassReport | None:
        """One pass; None if PostgreSQL failed it (logged; the next pass continues it)."""
        try:
            # Abandoned on cancel (shutdown): every step is its own transaction and the
            # next pass continues an interrupted one.
            report = await trio.to_thread.run_sync(
                self._enforce, now or datetime.now(UTC), abandon_on_cancel=True
            )
        except DependencyError as err:
            log.warning("retention_pass_failed", error=err.problem)
            return None
        record(report)
        self.passes += 1
        if report.created or report.retired:
            log.info("retention_pass", **report.to_json())
        return report

    def _enforce(self, now: datetime) -> store.PassReport:
        return store.run_pass(self._dsn, self.policy, now)
