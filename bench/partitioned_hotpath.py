"""The executor's hot path (claim + finish) on a log with many populated partitions.

Builds a database of its own: ``--old`` finished events recorded over the last ``--days``
days (with the partitioned schema: one populated partition per day, about 40 with the
defaults, plus the 7 made ahead) and ``--due`` events due now, recorded today. Then claims
and finishes the due events in batches of ``--batch`` (``executions.claim_batch`` and
``executions.finish_batch``, each its own transaction, on one connection with psycopg's
default ``prepare_threshold``, as the executor's group-commit threads do) and reports the
wall time and the backend CPU per claim + finish pair, first pairs and steady state apart
(psycopg prepares a statement on its 6th execution; PostgreSQL may then switch to a
generic plan).

The schema is the newest of the ``eventsched`` that is imported, so the same script
measures before and after a change: run it with ``PYTHONPATH`` at an older checkout for the
"before" figure.

    python -m bench.partitioned_hotpath --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.partitioned_hotpath --dsn ... --explain   # EXPLAIN (ANALYZE, BUFFERS)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.migrate_partitioned import scratch_database
from eventsched.core.store import executions, migrations
from eventsched.core.store.executions import ClaimRequest, Outcome

_OLD_SQL = """
INSERT INTO events (id, idempotency_key, type, payload, execute_at, status, attempts,
                    created_at, recorded_at, updated_at, finished_at)
SELECT gen_random_uuid(), 'old-' || g, 'bench.event', '{"n": 1}'::jsonb, rec, 'succeeded', 1,
       rec, rec, rec, rec
FROM (SELECT g, now() - interval '1 day'
                - (%(days)s::float8 * g / %(events)s::float8) * interval '1 day' AS rec
      FROM generate_series(1, %(events)s) AS g) x
"""


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _schema_version(dsn: str) -> int:
    version, _ = migrations.version(dsn)
    return version or 0


def build(dsn: str, old: int, days: float, due: int) -> list[str]:
    """Populate at version 7 (as a real upgrade would), then migrate to the newest."""
    sql_dir = migrations.default_sql_dir()
    migrations.up(dsn, sql_dir, steps=7)
    ids = [str(uuid.uuid4()) for _ in range(due)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_OLD_SQL, {"events": old, "days": days})
        conn.execute(
            "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
            " finished_at, lateness_ms, outcome, worker_id)"
            " SELECT id, 1, execute_at, execute_at, execute_at, 0, 'succeeded', 'bench'"
            " FROM events"
        )
    migrations.up(dsn, sql_dir)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY events (id, idempotency_key, type, payload, execute_at, created_at)"
                " FROM STDIN"
            ) as copy,
        ):
            for event_id in ids:
                copy.write_row((event_id, event_id, "bench.event", '{"n": 1}', "now", "now"))
        if _schema_version(dsn) >= 8:
            conn.execute(
                "INSERT INTO event_keys (idempotency_key, id, retain_from)"
                " SELECT idempotency_key, id, retain_from FROM events"
                " WHERE status = 'scheduled' ON CONFLICT DO NOTHING"
            )
        conn.execute("VACUUM ANALYZE")
    return ids


def _claims(chunk: Sequence[str]) -> list[ClaimRequest]:
    return [ClaimRequest(i, 0, time.time()) for i in chunk]


def _outcomes(chunk: Sequence[str]) -> list[Outcome]:
    return [Outcome(i, 1, "succeeded", None, time.time()) for i in chunk]


def measure(dsn: str, ids: list[str], batch: int, plan_cache_mode: str = "") -> dict[str, Any]:
    walls: list[float] = []
    with psycopg.connect(dsn) as conn:
        if plan_cache_mode:
            conn.execute("SELECT set_config('plan_cache_mode', %s, false)", (plan_cache_mode,))
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        conn.commit()
        cpu0 = _backend_cpu(pid)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            t0 = time.perf_counter()
            claimed = executions.claim_batch(conn, _claims(chunk), worker_id="bench")
            conn.commit()
            assert all(isinstance(c, executions.Claimed) for c in claimed), claimed[:1]
            done = executions.finish_batch(conn, _outcomes(chunk))
            conn.commit()
            assert all(done)
            walls.append(time.perf_counter() - t0)
        cpu = _backend_cpu(pid) - cpu0
    steady = walls[10:] or walls
    return {
        "pairs": len(walls),
        "batch": batch,
        "first5_ms": [round(w * 1e3, 2) for w in walls[:5]],
        "steady_median_ms": round(statistics.median(steady) * 1e3, 2),
        "steady_p90_ms": round(sorted(steady)[int(len(steady) * 0.9)] * 1e3, 2),
        "backend_cpu_ms_per_pair": round(cpu / len(walls) * 1e3, 2),
    }


def explain(dsn: str, ids: list[str], batch: int) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of a claim after psycopg prepared it (generic plan)."""
    with psycopg.connect(dsn) as conn:
        for start in range(0, 8 * batch, batch):
            chunk = ids[start : start + batch]
            executions.claim_batch(conn, _claims(chunk), worker_id="bench")
            executions.finish_batch(conn, _outcomes(chunk))
            conn.commit()
        chunk = ids[8 * batch : 9 * batch]
        req = json.dumps(
            [{"id": i, "attempt": 0, "started": time.time(), "held_by": None} for i in chunk]
        )
        for line in conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + executions._CLAIM_SQL,
            {"req": req, "worker": "bench", "ahead": 0.0},
        ).fetchall():
            print(line[0])
        conn.rollback()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a PostgreSQL server (admin connection)")
    parser.add_argument("--old", type=int, default=600_000, help="finished events")
    parser.add_argument("--days", type=float, default=39.0)
    parser.add_argument("--due", type=int, default=6_000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument(
        "--plan-cache-mode", default="", help="auto, force_custom_plan or force_generic_plan"
    )
    args = parser.parse_args(argv)
    with scratch_database(args.dsn, "esbench_hot") as dsn:
        ids = build(dsn, args.old, args.days, args.due)
        version = _schema_version(dsn)
        with psycopg.connect(dsn) as conn:
            parts = conn.execute(
                "SELECT count(*) FROM pg_partition_tree('events') WHERE isleaf"
            ).fetchone()
        if args.explain:
            explain(dsn, ids, args.batch)
            return 0
        result = measure(dsn, ids, args.batch, args.plan_cache_mode)
    result.update(
        benchmark="partitioned_hotpath",
        schema_version=version,
        partitions=parts[0] if parts else 0,
        old=args.old,
        due=args.due,
        plan_cache_mode=args.plan_cache_mode or "default",
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
