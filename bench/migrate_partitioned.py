"""How long migration 000008 (the time-partitioned event log) takes on a populated database.

Creates a database of its own on a PostgreSQL server, migrates it to version 7, fills it
with ``--events`` events of every status recorded over ``--days`` days (attempts: one per
started event, three for retried and dead ones; a command for one event in six), then
times ``migrate up`` to 8 and ``migrate down`` to 7, checking that every event and attempt
is kept both ways. The database is dropped afterwards.

    python -m bench.migrate_partitioned --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.migrate_partitioned --dsn ... --events 1000000 --days 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from eventsched.core.store import migrations

# Statuses by event number g (mod 12): mostly succeeded, every other status present.
_POPULATE_SQL = """
INSERT INTO events (id, idempotency_key, type, payload, execute_at, status, attempts,
                    last_error, next_attempt_at, created_at, recorded_at, updated_at,
                    finished_at, dead_reason, cancel_requested_at)
SELECT gen_random_uuid(), 'bench-' || g, 'bench.event', '{"n": 1}'::jsonb,
       CASE s WHEN 'scheduled' THEN rec + interval '200 days' ELSE rec END,
       s,
       CASE s WHEN 'scheduled' THEN 0 WHEN 'succeeded' THEN 1 WHEN 'running' THEN 1
              WHEN 'cancelled' THEN 0 ELSE 3 END,
       CASE WHEN s IN ('retrying', 'dead') THEN 'boom' END,
       CASE s WHEN 'retrying' THEN rec + interval '1 minute' END,
       rec, rec, rec,
       CASE WHEN s IN ('succeeded', 'dead', 'cancelled') THEN rec + interval '1 second' END,
       CASE s WHEN 'dead' THEN 'retries_exhausted' END,
       CASE s WHEN 'cancelled' THEN rec END
FROM (
    SELECT g,
           now() - (%(days)s::float8 * g / %(events)s::float8) * interval '1 day' AS rec,
           CASE g %% 12 WHEN 0 THEN 'scheduled' WHEN 1 THEN 'running' WHEN 2 THEN 'retrying'
                        WHEN 3 THEN 'dead' WHEN 4 THEN 'cancelled' ELSE 'succeeded' END AS s
    FROM generate_series(1, %(events)s) AS g
) x
"""

_ATTEMPTS_SQL = """
INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at, finished_at,
                            lateness_ms, outcome, error, worker_id)
SELECT e.id, n, e.execute_at, e.execute_at + n * interval '1 second',
       CASE WHEN e.status = 'running' AND n = e.attempts THEN NULL
            ELSE e.execute_at + n * interval '1 second' END,
       1.5,
       CASE WHEN e.status = 'running' AND n = e.attempts THEN NULL
            WHEN n < e.attempts THEN 'retried'
            WHEN e.status = 'dead' THEN 'dead'
            WHEN e.status = 'retrying' THEN 'retried'
            ELSE 'succeeded' END,
       CASE WHEN e.status IN ('retrying', 'dead') THEN 'boom' END,
       'bench'
FROM events e, generate_series(1, e.attempts) AS n
"""

_COMMANDS_SQL = """
INSERT INTO event_commands (command_id, op, event_id, created_at, result, status_before)
SELECT gen_random_uuid(), 'cancel', e.id, e.created_at, 'not_applicable', e.status
FROM events e WHERE substr(e.idempotency_key, 7)::bigint % 6 = 0
"""


@contextmanager
def scratch_database(admin_dsn: str, prefix: str = "esbench_part") -> Iterator[str]:
    """A new database on the server of ``admin_dsn``; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def populate(dsn: str, events: int, days: float) -> dict[str, int]:
    """Fill a version-7 database: ``events`` events of mixed status over ``days`` days."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_POPULATE_SQL, {"events": events, "days": days})
        conn.execute(_ATTEMPTS_SQL)
        conn.execute(_COMMANDS_SQL)
        conn.execute("VACUUM ANALYZE events")
        conn.execute("VACUUM ANALYZE event_attempts")
    return counts(dsn)


def counts(dsn: str) -> dict[str, int]:
    """Rows per table, and a fingerprint of every event's and attempt's columns that both
    schemas share (equal before and after a migration when every row was kept as it was)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM event_attempts),"
            " (SELECT count(*) FROM event_commands),"
            " (SELECT sum(hashtext(concat_ws('|', id, idempotency_key, status, attempts,"
            "   execute_at, finished_at, next_attempt_at, recorded_at)))::bigint FROM events),"
            " (SELECT sum(hashtext(concat_ws('|', id, event_id, attempt, started_at, outcome,"
            "   finished_at)))::bigint FROM event_attempts)"
        ).fetchone()
    assert row is not None
    return {
        "events": row[0],
        "attempts": row[1],
        "commands": row[2],
        "events_hash": row[3] or 0,
        "attempts_hash": row[4] or 0,
    }


def run(admin_dsn: str, events: int, days: float) -> dict[str, Any]:
    with scratch_database(admin_dsn) as dsn:
        sql_dir = migrations.default_sql_dir()
        migrations.up(dsn, sql_dir, steps=7)
        assert migrations.version(dsn) == (7, False)
        before = populate(dsn, events, days)
        with psycopg.connect(dsn) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        t0 = time.perf_counter()
        migrations.up(dsn, sql_dir)
        up_s = time.perf_counter() - t0
        after_up = counts(dsn)
        with psycopg.connect(dsn) as conn:
            parts = conn.execute(
                "SELECT count(*) FROM pg_partition_tree('events') WHERE isleaf"
            ).fetchone()
        t0 = time.perf_counter()
        migrations.down(dsn, sql_dir, steps=1)
        down_s = time.perf_counter() - t0
        after_down = counts(dsn)
    if not before == after_up == after_down:
        raise SystemExit(f"rows changed: {before} / {after_up} / {after_down}")
    return {
        "benchmark": "migrate_partitioned",
        "events": before["events"],
        "attempts": before["attempts"],
        "commands": before["commands"],
        "days": days,
        "database_mb_before": round((size[0] if size else 0) / 1e6),
        "partitions_per_table": parts[0] if parts else 0,
        "up_s": round(up_s, 2),
        "down_s": round(down_s, 2),
        "events_per_s_up": round(before["events"] / up_s),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a PostgreSQL server (admin connection)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=40.0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.dsn, args.events, args.days)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
