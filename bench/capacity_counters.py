"""The PostgreSQL and Redis counters ``bench.capacity`` reads: statements
(``pg_stat_statements``, which :func:`enable_statements` preloads), the WAL position, table
and index bytes, Redis commands, CPU and memory; :func:`server_work` turns two readings into
costs per event.
"""

from __future__ import annotations

import re
from typing import Any

from bench.stack import Stack

TABLES = ("events", "event_attempts", "event_commands", "dlq_undeliverable")
#: The harness's own statements (bench.stack, bench.stats, tests.support.clients, bench.capacity
#: and this module), left out of the statement counts; whitespace is collapsed before matching.
HARNESS_SQL = re.compile(
    r"^SELECT xact_commit|n_tup_hot_upd|^SELECT relname, seq_scan|^SELECT indexrelname|"
    r"FROM pg_stat_wal|pg_current_wal_lsn|pg_total_relation_size|FROM pg_stat_statements|"
    r"pg_stat_statements_reset|^TRUNCATE|^COPY|FROM event_attempts a JOIN events e|"
    r"min\(recorded_at\)|^SELECT count\(\*\) FROM event_attempts$|"
    r"^SELECT status, count\(\*\) FROM events GROUP BY status"
)
TRANSACTION_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SET|SHOW|SELECT \$1)\b", re.I)


def enable_statements(stack: Stack) -> None:
    """Preload ``pg_stat_statements`` (a restart) and create it in the events database."""
    stack.sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    stack.sql("ALTER SYSTEM SET pg_stat_statements.track_utility = on")
    stack.restart_server("postgres")
    stack.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def table_bytes(stack: Stack) -> dict[str, int]:
    """Heap + indexes + TOAST of each table, summed over its partitions if it has any."""
    out: dict[str, int] = {}
    for table in TABLES:
        row = stack.sql(
            "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint,"
            " coalesce(sum(pg_indexes_size(relid)), 0)::bigint"
            " FROM (SELECT relid FROM pg_partition_tree(%s::regclass)"
            " UNION SELECT %s::regclass) AS parts",
            (table, table),
        )[0]
        out[table], out[f"{table}.indexes"] = int(row[0]), int(row[1])
    return out


def snapshot(stack: Stack) -> dict[str, float]:
    """Cumulative counters: PostgreSQL (stats, WAL position, sizes) and Redis."""
    out = dict(stack.server_stats())
    lsn = stack.sql("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8")[0][0]
    out["pg.wal_lsn"] = float(lsn)
    out.update({f"size.{k}": float(v) for k, v in table_bytes(stack).items()})
    with stack.redis() as r:
        cpu = r.info("cpu")
        out["redis_cpu_s"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        out["redis_used_memory"] = float(r.info("memory")["used_memory"])
    return out


def redis_counters(stack: Stack, url: str) -> dict[str, float]:
    """One Redis server's cumulative counters: ``redis.<command>.calls``, ``redis_cpu_s``
    (``INFO cpu``) and ``redis_used_memory``."""
    out: dict[str, float] = {}
    with stack.redis(url) as r:
        for command, stats in r.info("commandstats").items():
            out[f"redis.{command.removeprefix('cmdstat_')}.calls"] = float(stats["calls"])
        cpu = r.info("cpu")
        out["redis_cpu_s"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        out["redis_used_memory"] = float(r.info("memory")["used_memory"])
    return out


def statements(stack: Stack) -> list[dict[str, Any]]:
    """The roles' statements since the last reset: calls, rows, WAL bytes each."""
    rows = stack.sql(
        "SELECT query, calls, rows, wal_bytes FROM pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    out = []
    for query, calls, nrows, wal in rows:
        text = " ".join(query.split())
        if HARNESS_SQL.search(text):
            continue
        out.append(
            {
                "query": text[:90],
                "calls": int(calls),
                "rows": int(nrows),
                "wal_bytes": int(wal),
                "control": bool(TRANSACTION_CONTROL.match(text)),
            }
        )
    return sorted(out, key=lambda s: -s["calls"])


def redis_calls(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Redis command calls in the window by command (``info`` is the harness's)."""
    out: dict[str, float] = {}
    for key, value in after.items():
        if key.startswith("redis.") and key.endswith(".calls"):
            name = key[len("redis.") : -len(".calls")]
            calls = value - before.get(key, 0.0)
            if calls > 0 and name not in ("info", "ping", "client|setinfo", "hello"):
                out[name] = calls
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def server_work(stack: Stack, before: dict[str, float], events: int) -> dict[str, Any]:
    """Statements, WAL and Redis commands per event since ``before`` (and the statement
    reset that followed it)."""
    after = snapshot(stack)
    stmts = statements(stack)
    n = max(1, events)
    return {
        "pg_statements_data": sum(s["calls"] for s in stmts if not s["control"]) / n,
        "pg_wal_bytes": (after["pg.wal_lsn"] - before["pg.wal_lsn"]) / n,
        "redis_commands": sum(redis_calls(before, after).values()) / n,
        "top_statements": [
            {**s, "per_event": s["calls"] / n, "rows_per_call": s["rows"] / max(1, s["calls"])}
            for s in stmts
            if not s["control"]
        ][:6],
    }
