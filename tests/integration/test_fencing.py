"""Never twice while alive: a pause longer than ``reconciler.stale_after`` (SIGSTOP of an
executor; PostgreSQL down while outcomes are written behind) must not make a second run of a
handler overlap a first run that is still going to complete.

Real executor processes, real PostgreSQL (a server of the test's own where it is stopped) and
Redis. What is counted is handler invocations: the ``journal`` handler appends ``start`` when
it is called and ``done`` when it completes (its side effect) to a file shared by every
process. The rule checked (:func:`overlaps`): a run that completes must complete before any
later run of the same event starts; a run that was stopped (no ``done``) is allowed. After a
PostgreSQL outage, a run that completed is repeated only if its attempt was taken over, as
the README's "Leases" section allows (checked from the attempt rows and the executor's log).
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from eventsched.core.domain.jobcontract import make_job
from eventsched.core.operations.devpostgres import PostgresServer
from eventsched.core.store import executions, migrations
from eventsched.core.store.executions import Claimed, ClaimRequest
from tests.support.clients import status_counts
from tests.support.exec_handlers import read_journal
from tests.support.execution import (
    NewEvent,
    attempt_rows,
    executor_env,
    insert_events,
    new_events,
    queue_client,
)
from tests.support.proc import AppProcess
from tests.support.servers import Names

STALE_AFTER = 2.0
FAST = {
    "EVENTSCHED_HANDLERS__DEFAULT": "tests.support.exec_handlers:journal",
    "EVENTSCHED_RECONCILER__INTERVAL": "300ms",
    "EVENTSCHED_RECONCILER__GRACE": "1s",
    "EVENTSCHED_RECONCILER__STALE_AFTER": f"{STALE_AFTER:g}s",
    "EVENTSCHED_POSTGRES__CONNECT_TIMEOUT": "1s",
}


def overlaps(journal: list[dict[str, Any]]) -> list[str]:
    """Runs of an event that completed after a later run of the same event had started."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)  # event -> runs in start order
    for line in journal:
        key = (line["event"], line["attempt"], line["pid"])
        if line["what"] == "start":
            runs[line["event"]].append({"key": key, "start": line["t"], "done": None})
        else:
            for run in reversed(runs[line["event"]]):
                if run["key"] == key and run["done"] is None:
                    run["done"] = line["t"]
                    break
    found = []
    for event, event_runs in runs.items():
        for i, first in enumerate(event_runs):
            for later in event_runs[i + 1 :]:
                if first["done"] is not None and first["done"] > later["start"]:
                    found.append(f"{event}: {first} still ran when {later} started")
    return found


def dones(journal: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for line in journal:
        if line["what"] == "done":
            out[line["event"]] += 1
    return dict(out)


def completed_attempts(journal: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Event -> the attempts whose run completed, in the order they completed."""
    out: dict[str, list[int]] = defaultdict(list)
    for line in journal:
        if line["what"] == "done":
            out[line["event"]].append(line["attempt"])
    return dict(out)


async def _enqueue(url: str, queue: str, events: list[NewEvent]) -> None:
    import trio_asyncio

    async with trio_asyncio.open_loop(), queue_client(url, queue) as jobs:
        await jobs.enqueue_many([make_job(e.id, 1, e.execute_at, 60) for e in events])


def _wait(check: Any, limit: float, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.05)


def test_sigstop_longer_than_stale_after_never_lets_two_runs_overlap(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    journal_path = str(tmp_path / "journal")
    env = executor_env(names, database, redis_url, kafka_bootstrap, **FAST,
                       TEST_HANDLER_JOURNAL=journal_path)  # fmt: skip
    # The first attempt runs long (it is paused in the middle), the second is quick.
    (event,) = new_events(1, due=time.time(), sleep=[6.0, 0.3])
    insert_events(database, [event])
    # The executor that will be paused runs no reconciler: the other one must lead.
    paused = AppProcess(["run", "--role", "executor", "--port", "0"],
                        env={**env, "EVENTSCHED_RECONCILER__ENABLED": "false"})  # fmt: skip
    other: AppProcess | None = None
    try:
        paused.wait_event("role_ready", timeout=30)
        trio.run(_enqueue, redis_url, names.queue, [event])
        _wait(lambda: read_journal(journal_path), 10, "the first run")
        other = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
        other.wait_event("role_ready", timeout=30)
        os.kill(paused.proc.pid, signal.SIGSTOP)
        try:
            # Long enough for the lease to expire and the other executor to take over.
            _wait(lambda: status_counts(database) == {"succeeded": 1}, 15, "the takeover")
        finally:
            os.kill(paused.proc.pid, signal.SIGCONT)
        # The first run's handler had 6 s of sleep: it would complete right now.
        time.sleep(2.0)
    finally:
        paused.stop()
        if other is not None:
            other.stop()
    journal = read_journal(journal_path)
    starts = [line for line in journal if line["what"] == "start"]
    assert [(line["attempt"], line["pid"]) for line in starts] == [
        (1, paused.proc.pid),
        (2, other.proc.pid),
    ], journal
    assert overlaps(journal) == [], journal
    assert dones(journal) == {event.id: 1}, journal


def test_postgres_down_longer_than_stale_after_runs_no_completed_handler_again(
    own_postgres: PostgresServer,
    redis_url: str,
    kafka_bootstrap: str,
    names: Names,
    tmp_path: Path,
) -> None:
    dsn = own_postgres.url
    migrations.up(dsn, migrations.default_sql_dir())
    journal_path = str(tmp_path / "journal")
    # Eight slots, not the default one per CPU (two on CI): the 30 runs get under way in a
    # few seconds instead of ten, and more of them are in flight when PostgreSQL goes.
    env = executor_env(names, dsn, redis_url, kafka_bootstrap, **FAST,
                       EVENTSCHED_EXECUTOR__CONCURRENCY="8",
                       TEST_HANDLER_JOURNAL=journal_path)  # fmt: skip
    # Runs of 0.2 to 2.2 s: when PostgreSQL goes, some complete (their outcome waits to be
    # written), others are still running.
    events = new_events(30, due=lambda i: time.time() + 1.0 + (i % 3) * 0.1)
    events = [
        NewEvent(e.id, e.type, {**e.payload, "sleep": 0.2 + (i % 6) * 0.4}, e.execute_at)
        for i, e in enumerate(events)
    ]
    insert_events(dsn, events)
    app = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        app.wait_event("role_ready", timeout=30)
        trio.run(_enqueue, redis_url, names.queue, events)
        _wait(lambda: len(read_journal(journal_path)) >= 40, 15, "runs under way")
        own_postgres.stop()
        time.sleep(2.5 * STALE_AFTER)
        own_postgres.start()

        def finished() -> bool:
            try:
                return status_counts(dsn) == {"succeeded": len(events)}
            except psycopg.Error:
                return False

        _wait(finished, 30, "every event succeeded")
        time.sleep(1.0)
    finally:
        app.stop()
    journal = read_journal(journal_path)
    assert overlaps(journal) == [], journal
    # Every event ran to completion at least once.
    assert set(dones(journal)) == {e.id for e in events}, journal
    # A run that completed is run again only when its outcome lost the race the README
    # allows ("Leases"): the executor could neither record it nor renew its lease within
    # S / 2 of the reconciler seeing it expired after the outage, so the reconciler took the
    # attempt over and the executor's outcome was discarded. Anything else is a violation.
    rows = {(r.event_id, r.attempt): r for r in attempt_rows(dsn)}
    discarded = {
        (line["event_id"], line["attempt"])
        for line in app.lines
        if line.get("event") == "outcome_discarded" and line.get("outcome") == "succeeded"
    }
    unexplained = {}
    for event_id, attempts in completed_attempts(journal).items():
        for attempt in attempts[:-1]:  # every completed run but the last was repeated
            row = rows.get((event_id, attempt))
            taken_over = (
                row is not None
                and row.outcome == "retried"
                and (row.error or "").startswith("worker lost")
                and (event_id, attempt) in discarded
            )
            if not taken_over:
                unexplained[event_id, attempt] = row
    lines = [line for line in app.lines if line.get("event_id") in {k[0] for k in unexplained}]
    assert unexplained == {}, (unexplained, lines, journal)


def test_a_claims_lease_starts_when_its_statement_was_sent_even_if_resent(database: str) -> None:
    """The executor counts an attempt's lease from ``Claimed.sent``: never later than the
    claim's ``updated_at``, also when the claim is sent again after a lost answer (it is
    then recognised as done, and the lease started with the first statement)."""
    (event,) = new_events(1, due=time.time() - 1)
    insert_events(database, [event])
    request = [ClaimRequest(event.id, 0, time.time())]
    with psycopg.connect(database, autocommit=True) as conn:
        before = time.monotonic()
        (first,) = executions.claim_batch(conn, request, worker_id="w1")
        after = time.monotonic()
        time.sleep(0.5)
        (again,) = executions.claim_batch(conn, request, worker_id="w1")  # the answer was lost
    assert isinstance(first, Claimed) and isinstance(again, Claimed)
    assert before <= first.sent <= after
    assert again.sent == pytest.approx(first.sent, abs=0.05)
