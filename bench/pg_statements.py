"""What the executor's two statements cost PostgreSQL per event, by batch size.

The executor claims events (``executions.claim_batch``) and records outcomes
(``executions.finish_batch``) one statement and one commit per batch. At a steady rate the
batches are as large as the jobs that came due while the previous statement ran: a few
events at 1,000 events/s. This runs claim + finish (each in its own transaction, as the
executor's two threads do) on the embedded PostgreSQL of ``eventsched dev`` (fsync on, or
``--fast-stack``) at several batch sizes and reads the backend's CPU time from ``/proc``:
the fixed cost per statement is what small batches pay per event.

    python -m bench.pg_statements                    # 2,000 events per batch size
    python -m bench.pg_statements --quick            # CI: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from eventsched.core.operations.devstack import DevStack
from eventsched.core.store import executions, migrations
from eventsched.core.store.executions import ClaimRequest, Outcome

BATCHES = (1, 2, 5, 10, 20, 50, 200)


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _insert(dsn: str, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    now = datetime.now(UTC)
    with psycopg.connect(dsn, autocommit=True) as conn:
        columns = "id, idempotency_key, type, payload, execute_at, created_at"
        with conn.cursor() as cur, cur.copy(f"COPY events ({columns}) FROM STDIN") as copy:
            for event_id in ids:
                copy.write_row((event_id, event_id, "bench.event", '{"n": 1}', now, now))
        conn.execute(
            "INSERT INTO event_keys (idempotency_key, id, retain_from)"
            " SELECT idempotency_key, id, retain_from FROM events"
        )
        conn.execute("ANALYZE events")
    return ids


def measure(dsn: str, batch: int, ids: list[str]) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        conn.commit()
        cpu0, wall0, pairs = _backend_cpu(pid), time.perf_counter(), 0
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            executions.claim_batch(
                conn, [ClaimRequest(i, 0, time.time()) for i in chunk], worker_id="bench"
            )
            conn.commit()
            executions.finish_batch(
                conn, [Outcome(i, 1, "succeeded", None, time.time()) for i in chunk]
            )
            conn.commit()
            pairs += 1
        cpu, wall = _backend_cpu(pid) - cpu0, time.perf_counter() - wall0
    return {
        "batch": batch,
        "events": len(ids),
        "backend_cpu_us_per_event": round(cpu / len(ids) * 1e6, 1),
        "backend_cpu_ms_per_batch": round(cpu / pairs * 1e3, 3),
        "wall_us_per_event": round(wall / len(ids) * 1e6, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--events", type=int, default=2000, help="events per batch size")
    parser.add_argument("--fast-stack", action="store_true", help="fsync off")
    args = parser.parse_args(argv)
    per_size = 40 if args.quick else args.events
    batches = (1, 5) if args.quick else BATCHES
    with tempfile.TemporaryDirectory(prefix="esbench-pg-") as tmp:
        stack = DevStack(Path(tmp), redis=False, kafka=False, fast=args.fast_stack)
        info = stack.start()
        try:
            assert info.postgres_dsn is not None
            migrations.up(info.postgres_dsn, migrations.default_sql_dir())
            ids = _insert(info.postgres_dsn, per_size * len(batches))
            rows = [
                measure(info.postgres_dsn, b, ids[i * per_size : (i + 1) * per_size])
                for i, b in enumerate(batches)
            ]
        finally:
            stack.stop()
    print("| batch | PG backend CPU per event (us) | per batch (ms) | wall per event (us) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['backend_cpu_us_per_event']:,.0f} | "
            f"{r['backend_cpu_ms_per_batch']:.2f} | {r['wall_us_per_event']:,.0f} |"
        )
    print(json.dumps({"benchmark": "pg_statements", "quick": args.quick, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
