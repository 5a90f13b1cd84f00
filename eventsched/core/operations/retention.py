"""``eventsched retention status|enforce``: the partitions of the time-partitioned log and
one maintenance pass (docs/retention.md, docs/operations.md).

Blocking psycopg on a connection of its own. ``enforce`` takes the retention duty's
advisory lock first, so it never runs beside the executors' leader (nor beside another
``enforce``); ``--dry-run`` takes no lock and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from eventsched.core.domain.retention import policy_from_settings
from eventsched.core.runtime.errors import DependencyError, EventschedError
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.settings import Settings, require_postgres
from eventsched.core.store import retention as store
from eventsched.core.store.leader import lock_key


class RetentionBusy(EventschedError):
    """Another process holds the retention duty's lock (a pass is running)."""


@dataclass(frozen=True, slots=True)
class RetentionStatus:
    partitions: list[store.PartitionInfo]
    would: store.PassReport  # what a pass now would do (a dry run)

    def to_json(self) -> dict[str, Any]:
        return {
            "partitions": [
                {
                    "table": p.table,
                    "name": p.name,
                    "day": p.day.isoformat() if p.day else None,
                    "range": p.range,
                    "rows": p.rows,
                    "bytes": p.bytes,
                    "unfinished": p.unfinished,
                    "finished": p.finished,
                }
                for p in self.partitions
            ],
            "pass": self.would.to_json(),
        }


@contextmanager
def _connected(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    try:
        with store.connect(require_postgres(settings)) as conn:
            yield conn
    except psycopg.Error as err:
        raise DependencyError("postgres", redact(str(err)) or type(err).__name__) from err


def status(settings: Settings) -> RetentionStatus:
    policy = policy_from_settings(settings.retention)
    with _connected(settings) as conn:
        return RetentionStatus(
            store.list_partitions(conn), store.enforce(conn, policy, dry_run=True)
        )


def enforce(settings: Settings, *, dry_run: bool = False) -> store.PassReport:
    policy = policy_from_settings(settings.retention)
    with _connected(settings) as conn:
        if dry_run:
            return store.enforce(conn, policy, dry_run=True)
        if not store.take_lock(conn, lock_key(settings.redis.queue, store.DUTY)):
            raise RetentionBusy(
                "another process is running a retention pass (the retention lock is held);"
                " try again later"
            )
        return store.enforce(conn, policy)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def render_status(s: RetentionStatus) -> str:
    lines = [f"{'PARTITION':<32} {'RANGE':<58} {'ROWS':>10} {'SIZE':>9} {'UNFINISHED':>10}"]
    for p in s.partitions:
        unfinished = "" if p.unfinished is None else str(p.unfinished)
        bound = p.range.replace("FOR VALUES ", "")
        lines.append(f"{p.name:<32} {bound:<58} {p.rows:>10} {_size(p.bytes):>9} {unfinished:>10}")
    lines.append("")
    lines.append(render_pass(s.would))
    return "\n".join(lines)


def render_pass(r: store.PassReport) -> str:
    verb = "would" if r.dry_run else ""
    create = ", ".join(d.isoformat() for d in r.plan.create) or "none"
    retire = ", ".join(d.isoformat() for d in r.plan.retire) or "none"
    out = [
        f"cutoff: {r.plan.cutoff.isoformat()} (finished before it: dropped with their day)",
        f"days to create: {create}",
        f"days to retire: {retire}",
    ]
    if r.dry_run:
        out.append(
            f"{verb} drop {r.dropped['events']} events and {r.dropped['event_attempts']}"
            f" attempts; {verb} move {r.hopped} events to today's partition"
        )
    else:
        out.append(
            f"created {len(r.created)} partitions; retired {len(r.retired)} days: dropped"
            f" {r.dropped['events']} events and {r.dropped['event_attempts']} attempts, moved"
            f" {r.hopped} events to today's partition; deleted {r.commands_deleted} commands"
            " of no event"
        )
        out.extend(f"archived: {path}" for path in r.archived)
    return "\n".join(out)
