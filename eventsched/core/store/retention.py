"""The SQL of retention: partitions of the time-partitioned log, created ahead and retired.

The design is docs/retention.md; the decisions without a database (the plan of a pass at an
instant, a row's fate, the partition names) are :mod:`eventsched.core.domain.retention`.
Blocking psycopg on a connection of its own (autocommit; each step its own transaction):
the executor's duty runs it in a worker thread, ``eventsched retention`` directly.

A pass (:func:`enforce`), under the duty's advisory lock:

1. continue any retirement an earlier pass left (tables ``<table>_pYYYYMMDD_retiring``);
2. **create** the missing day partitions from today to ``ahead`` (moving rows of such a
   day out of the default partition first, if the duty was down that long);
3. **retire** each day older than ``keep``: collect the rows that must stay without a lock
   (on a snapshot), then in one short transaction detach the day's partitions of both
   tables, move (*hop*) the rows that stay into today's partition with a new
   ``retain_from`` (their attempts along, their key updated), and rename what is left
   ``..._retiring``; then delete the keys and commands of the retiring events in batches,
   archive the tables if asked (a gzip-compressed ``COPY ... CSV HEADER``), and drop them;
4. delete the commands that reached no event, ``keep`` after they were applied.

Event rows are never deleted one by one except the few that hop (they are inserted again
first, in the same transaction). An unfinished event always hops: it is never dropped.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

from eventsched.core.domain.retention import (
    FINISHED_STATUSES,
    MaintenancePlan,
    RetentionPolicy,
    archive_file_name,
    parse_partition_name,
    partition_bounds,
    partition_name,
    plan,
)
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

__all__ = [
    "DUTY",
    "TABLES",
    "PartitionInfo",
    "PassReport",
    "enforce",
    "existing_days",
    "list_partitions",
    "run_pass",
    "take_lock",
]

log = get_logger(__name__)

#: The duty's name in its advisory lock key (``core.store.leader.lock_key(queue, DUTY)``).
DUTY: Final = "retention"
#: The partitioned tables and their partition key.
TABLES: Final = {"events": "retain_from", "event_attempts": "event_retain_from"}
_UNFINISHED: Final = ("scheduled", "running", "retrying")
#: Keys and commands of retiring events deleted per transaction.
BATCH: Final = 5000
#: A retirement waits this long at most for the lock DETACH needs (then the next pass).
LOCK_TIMEOUT: Final = "5s"
_RETIRING_RE: Final = re.compile(r"^events_p(?P<day>[0-9]{8})_retiring$")


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One partition of ``events`` or ``event_attempts`` (``day`` None: the default one)."""

    table: str
    name: str
    day: date | None
    range: str  # FOR VALUES ... as PostgreSQL shows it
    rows: int  # exact below ESTIMATE_ABOVE rows, else the planner's estimate
    bytes: int  # with indexes and TOAST
    unfinished: int | None  # events only: scheduled, running and retrying (exact)
    finished: int | None  # events only: rows - unfinished


@dataclass(slots=True)
class PassReport:
    """What a pass did (or, dry, would do)."""

    plan: MaintenancePlan
    dry_run: bool
    created: list[str] = field(default_factory=list)
    retired: list[date] = field(default_factory=list)
    #: Rows dropped, by table; for a dry run the rows that would be (estimates for attempts).
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    #: Events moved to today's partition (dry run: that would be).
    hopped: int = 0
    archived: list[str] = field(default_factory=list)
    commands_deleted: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff": self.plan.cutoff.isoformat(),
            "create": [d.isoformat() for d in self.plan.create],
            "retire": [d.isoformat() for d in self.plan.retire],
            "created": self.created,
            "retired": [d.isoformat() for d in self.retired],
            "dropped": self.dropped,
            "hopped": self.hopped,
            "archived": self.archived,
            "commands_deleted": self.commands_deleted,
        }


ESTIMATE_ABOVE: Final = 1_000_000


def take_lock(conn: psycopg.Connection[Any], key: int) -> bool:
    """Try the duty's session-level advisory lock on ``conn`` (``eventsched retention
    enforce`` takes it, so it never runs beside the leader's pass)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    return bool(row and row[0])


def existing_days(conn: psycopg.Connection[Any], table: str = "events") -> set[date]:
    """The days that have a partition of ``table``."""
    rows = conn.execute(
        "SELECT relid::text FROM pg_partition_tree(%s::regclass) WHERE isleaf", (table,)
    ).fetchall()
    return {d for (name,) in rows if (d := parse_partition_name(table, name)) is not None}


def list_partitions(conn: psycopg.Connection[Any]) -> list[PartitionInfo]:
    """Every partition of both tables, oldest day first, the default one last."""
    out: list[PartitionInfo] = []
    for table in TABLES:
        rows = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint,"
            " pg_total_relation_size(c.oid)"
            " FROM pg_partition_tree(%s::regclass) p JOIN pg_class c ON c.oid = p.relid"
            " WHERE p.isleaf",
            (table,),
        ).fetchall()
        for name, bound, reltuples, size in rows:
            ident = sql.Identifier(name)
            if reltuples < ESTIMATE_ABOVE:  # -1: never analysed
                counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident))
                total = int(_one(counted))
            else:
                total = int(reltuples)
            unfinished = finished = None
            if table == "events":
                # Each status has its partial index: three index-only counts.
                unfinished = sum(
                    int(
                        _one(
                            conn.execute(
                                sql.SQL("SELECT count(*) FROM {} WHERE status = %s").format(ident),
                                (status,),
                            )
                        )
                    )
                    for status in _UNFINISHED
                )
                finished = max(0, total - unfinished)
            out.append(
                PartitionInfo(
                    table,
                    name,
                    parse_partition_name(table, name),
                    bound,
                    total,
                    int(size),
                    unfinished,
                    finished,
                )
            )
    out.sort(key=lambda p: (p.table != "events", p.day is None, p.day or date.min))
    return out


def enforce(
    conn: psycopg.Connection[Any],
    policy: RetentionPolicy,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PassReport:
    """One maintenance pass at ``now`` on ``conn`` (autocommit; the caller holds the duty's
    lock). ``dry_run``: only say what it would do."""
    now = now or datetime.now(UTC)
    step = plan(now, existing_days(conn), policy)
    report = PassReport(step, dry_run)
    if dry_run:
        for day in step.retire:
            keep, drop = _would_retire(conn, day, step.cutoff)
            report.hopped += keep
            report.dropped["events"] += drop
            attempts = _relation_rows(conn, partition_name("event_attempts", day))
            report.dropped["event_attempts"] += attempts
        return report
    for day in _retiring_days(conn):  # an interrupted pass first
        _finish_retirement(conn, day, policy, report)
    for day in step.create:
        report.created += _create_day(conn, day)
    for day in step.retire:
        _retire_day(conn, day, step.cutoff, policy, report)
    report.commands_deleted = _purge_unknown_commands(conn, step.cutoff)
    return report


# -- create ----------------------------------------------------------------------------------


def _create_day(conn: psycopg.Connection[Any], day: date) -> list[str]:
    """The day's partition of both tables; rows of that day already in the default
    partition (the duty was down longer than ``ahead``) are moved into it first."""
    lo, hi = partition_bounds(day)
    made = []
    for table, key in TABLES.items():
        name = partition_name(table, day)
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() not in (None, (None,)):
            continue
        with conn.transaction():
            ident, parent = sql.Identifier(name), sql.Identifier(table)
            default = sql.Identifier(f"{table}_default")
            stray = conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE {} >= %s AND {} < %s LIMIT 1").format(
                    default, sql.Identifier(key), sql.Identifier(key)
                ),
                (lo, hi),
            ).fetchone()
            if stray is None:
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        ident, parent, sql.Literal(lo.isoformat()), sql.Literal(hi.isoformat())
                    )
                )
            else:
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                    ).format(ident, parent)
                )
                conn.execute(
                    sql.SQL(
                        "WITH moved AS (DELETE FROM {} WHERE {} >= %s AND {} < %s RETURNING *)"
                        " INSERT INTO {} SELECT * FROM moved"
                    ).format(default, sql.Identifier(key), sql.Identifier(key), ident),
                    (lo, hi),
                )
                conn.execute(
                    sql.SQL(
                        "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        parent, ident, sql.Literal(lo.isoformat()), sql.Literal(hi.isoformat())
                    )
                )
                log.info("retention_partition_filled_from_default", partition=name)
        made.append(name)
    return made


# -- retire ----------------------------------------------------------------------------------


def _keep_condition() -> str:
    """Rows of a retired day that stay (hop): what :func:`..domain.retention.fate` says."""
    finished = ", ".join(f"'{s}'" for s in sorted(FINISHED_STATUSES))
    return f"NOT (status IN ({finished}) AND finished_at IS NOT NULL AND finished_at < %(cutoff)s)"


def _would_retire(conn: psycopg.Connection[Any], day: date, cutoff: datetime) -> tuple[int, int]:
    name = sql.Identifier(partition_name("events", day))
    row = conn.execute(
        sql.SQL("SELECT count(*) FILTER (WHERE {}), count(*) FROM {}").format(
            sql.SQL(_keep_condition()), name
        ),
        {"cutoff": cutoff},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]) - int(row[0])


def _retire_day(
    conn: psycopg.Connection[Any],
    day: date,
    cutoff: datetime,
    policy: RetentionPolicy,
    report: PassReport,
) -> None:
    events_d = partition_name("events", day)
    attempts_d = partition_name("event_attempts", day)
    # 1. On a snapshot, without locks: the rows that stay, and the instant before it.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        t0 = _one(conn.execute("SELECT now()"))
        staying = [
            r[0]
            for r in conn.execute(
                sql.SQL("SELECT id FROM {} WHERE {}").format(
                    sql.Identifier(events_d), sql.SQL(_keep_condition())
                ),
                {"cutoff": cutoff},
            )
        ]
    # 2. One short transaction: detach both, hop what stays, rename what is left.
    events_cols = _columns(conn, "events")
    attempts_cols = _columns(conn, "event_attempts")
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        for table, name in (("events", events_d), ("event_attempts", attempts_d)):
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                    sql.Identifier(table), sql.Identifier(name)
                )
            )
        # Everything that changed after the snapshot is caught here, each on an index: an
        # event re-opened (unfinished status), finished again (dead/cancelled finished_at),
        # or run again (an attempt started after t0).
        conn.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE retention_hop ON COMMIT DROP AS"
                " SELECT id FROM {ev} WHERE id = ANY(%(staying)s::uuid[])"
                " UNION SELECT id FROM {ev} WHERE status IN ('scheduled', 'running', 'retrying')"
                " UNION SELECT id FROM {ev} WHERE status IN ('dead', 'cancelled')"
                "   AND finished_at >= %(cutoff)s"
                " UNION SELECT event_id FROM {at} WHERE started_at >= %(t0)s"
            ).format(ev=sql.Identifier(events_d), at=sql.Identifier(attempts_d)),
            {"staying": staying, "cutoff": cutoff, "t0": t0},
        )
        hopped = _hop(conn, events_d, attempts_d, events_cols, attempts_cols)
        for name in (events_d, attempts_d):
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(name), sql.Identifier(f"{name}_retiring")
                )
            )
    report.hopped += hopped
    log.info("retention_day_detached", day=day.isoformat(), hopped=hopped)
    _finish_retirement(conn, day, policy, report)


def _hop(
    conn: psycopg.Connection[Any],
    events_d: str,
    attempts_d: str,
    events_cols: list[str],
    attempts_cols: list[str],
) -> int:
    """Move the events of ``retention_hop`` (and their attempts) from the detached day into
    the log again with ``retain_from = now()`` (today's partition); update their keys."""

    def cols(names: list[str], key: str) -> tuple[sql.Composable, sql.Composable]:
        target = sql.SQL(", ").join(sql.Identifier(n) for n in names)
        source = sql.SQL(", ").join(
            sql.SQL("now()") if n == key else sql.Identifier(n) for n in names
        )
        return target, source

    target, source = cols(events_cols, "retain_from")
    hopped = conn.execute(
        sql.SQL(
            "INSERT INTO events ({}) SELECT {} FROM {} WHERE id IN (SELECT id FROM retention_hop)"
        ).format(target, source, sql.Identifier(events_d))
    ).rowcount
    target, source = cols(attempts_cols, "event_retain_from")
    conn.execute(
        sql.SQL(
            "INSERT INTO event_attempts ({}) SELECT {} FROM {}"
            " WHERE event_id IN (SELECT id FROM retention_hop)"
        ).format(target, source, sql.Identifier(attempts_d))
    )
    conn.execute(
        "UPDATE event_keys SET retain_from = now() WHERE id IN (SELECT id FROM retention_hop)"
    )
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE id IN (SELECT id FROM retention_hop)").format(
            sql.Identifier(events_d)
        )
    )
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE event_id IN (SELECT id FROM retention_hop)").format(
            sql.Identifier(attempts_d)
        )
    )
    return int(hopped or 0)


def _retiring_days(conn: psycopg.Connection[Any]) -> list[date]:
    rows = conn.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE 'events_p%%_retiring'"
    ).fetchall()
    days = []
    for (name,) in rows:
        if match := _RETIRING_RE.match(name):
            days.append(datetime.strptime(match["day"], "%Y%m%d").date())
    return sorted(days)


def _finish_retirement(
    conn: psycopg.Connection[Any], day: date, policy: RetentionPolicy, report: PassReport
) -> None:
    """Steps 3 and 4: keys and commands of the retiring events in batches, the archive,
    the drop. Idempotent: an interrupted run is continued by the next pass."""
    events_r = f"{partition_name('events', day)}_retiring"
    attempts_r = f"{partition_name('event_attempts', day)}_retiring"
    dropped_events = 0
    last: Any = None
    while True:
        with conn.transaction():
            ids = [
                r[0]
                for r in conn.execute(
                    sql.SQL(
                        "SELECT id FROM {} WHERE %(last)s::uuid IS NULL OR id > %(last)s::uuid"
                        " ORDER BY id LIMIT %(n)s"
                    ).format(sql.Identifier(events_r)),
                    {"last": last, "n": BATCH},
                )
            ]
            if not ids:
                break
            conn.execute("DELETE FROM event_keys WHERE id = ANY(%s::uuid[])", (ids,))
            conn.execute("DELETE FROM event_commands WHERE event_id = ANY(%s::uuid[])", (ids,))
        dropped_events += len(ids)
        last = ids[-1]
    dropped_attempts = _relation_rows(conn, attempts_r, exact=True)
    if policy.archive_dir:
        for table, name in (("events", events_r), ("event_attempts", attempts_r)):
            report.archived.append(_archive(conn, name, Path(policy.archive_dir), table, day))
    with conn.transaction():
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(events_r)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(attempts_r)))
    report.retired.append(day)
    report.dropped["events"] += dropped_events
    report.dropped["event_attempts"] += dropped_attempts
    log.info(
        "retention_day_dropped",
        day=day.isoformat(),
        events=dropped_events,
        attempts=dropped_attempts,
    )


def _archive(
    conn: psycopg.Connection[Any], relation: str, directory: Path, table: str, day: date
) -> str:
    """``COPY relation TO STDOUT (FORMAT csv, HEADER)`` through gzip into
    ``directory/<table>_pYYYYMMDD.csv.gz``: written under a temporary name, flushed to disk,
    then renamed, so a complete file is there before the drop."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / archive_file_name(table, day)
    partial = final.with_name(final.name + ".partial")
    copy_sql = sql.SQL("COPY {} TO STDOUT (FORMAT csv, HEADER)").format(sql.Identifier(relation))
    with partial.open("wb") as raw:
        with (
            gzip.GzipFile(filename=final.name[:-3], mode="wb", fileobj=raw) as out,
            conn.cursor() as cur,
            cur.copy(copy_sql) as copy,
        ):
            for chunk in copy:
                out.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, final)
    log.info("retention_archived", file=str(final))
    return str(final)


def _purge_unknown_commands(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    """Commands that reached no event, applied before ``cutoff``, in batches."""
    total = 0
    while True:
        deleted = conn.execute(
            "DELETE FROM event_commands WHERE command_id IN ("
            " SELECT command_id FROM event_commands"
            " WHERE event_id IS NULL AND applied_at < %s LIMIT %s)",
            (cutoff, BATCH),
        ).rowcount
        total += max(0, deleted or 0)
        if not deleted:
            return total


# -- helpers ---------------------------------------------------------------------------------


def _columns(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _relation_rows(conn: psycopg.Connection[Any], name: str, *, exact: bool = False) -> int:
    if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() in (None, (None,)):
        return 0
    if not exact:
        est = _one(
            conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (name,))
        )
        if est is not None and int(est) >= ESTIMATE_ABOVE:
            return int(est)
    return int(_one(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name)))))


def _one(cur: psycopg.Cursor[Any]) -> Any:
    row = cur.fetchone()
    assert row is not None
    return row[0]


def run_pass(dsn: str, policy: RetentionPolicy, now: datetime) -> PassReport:
    """:func:`enforce` on a connection of its own (the duty's pass; the caller leads);
    PostgreSQL errors come out as ``DependencyError("postgres", ...)``."""
    try:
        with connect(dsn) as conn:
            return enforce(conn, policy, now=now)
    except psycopg.Error as err:
        raise DependencyError("postgres", redact(str(err)) or type(err).__name__) from err


@contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for a pass or a status (its own session: its advisory lock
    goes with it)."""
    with psycopg.connect(dsn, autocommit=True, application_name="eventsched-retention") as conn:
        yield conn
