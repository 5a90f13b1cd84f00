"""Migration 000008 on a populated database, and the executor's statements on the
time-partitioned log (docs/retention.md). Real PostgreSQL, a database per test."""

from __future__ import annotations

import psycopg
import pytest

from bench.migrate_partitioned import counts, populate
from eventsched.core.store import migrations
from tests.support.migrations import REPO_SQL_DIR


@pytest.fixture
def at_version_7(empty_database: str) -> str:
    migrations.up(empty_database, REPO_SQL_DIR, steps=7)
    return empty_database


def test_converting_a_populated_log_keeps_every_event_and_attempt(at_version_7: str) -> None:
    dsn = at_version_7
    before = populate(dsn, 3_000, 12)
    with psycopg.connect(dsn) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM events GROUP BY 1").fetchall())
    assert set(statuses) == {"scheduled", "running", "retrying", "succeeded", "dead", "cancelled"}
    assert before["attempts"] > before["events"] // 2 and before["commands"] > 0

    migrations.up(dsn, REPO_SQL_DIR, steps=1)  # 000008 alone: its down is checked below
    assert migrations.version(dsn) == (8, False)
    assert counts(dsn) == before
    with psycopg.connect(dsn) as conn:
        # Every event in the partition of the day it was recorded, its key beside it, its
        # attempts in the partition of the same day.
        misplaced = conn.execute(
            "SELECT count(*) FROM events e"
            " WHERE e.tableoid::regclass::text"
            "  <> 'events_p' || to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYYMMDD')"
            "  OR e.retain_from <> e.recorded_at"
        ).fetchone()
        keys = conn.execute(
            "SELECT count(*) FROM events e JOIN event_keys k"
            " ON k.id = e.id AND k.idempotency_key = e.idempotency_key"
            " AND k.retain_from = e.retain_from"
        ).fetchone()
        strays = conn.execute(
            "SELECT count(*) FROM event_attempts a LEFT JOIN events e"
            " ON e.id = a.event_id AND e.retain_from = a.event_retain_from"
            " WHERE e.id IS NULL"
            "  OR substr(a.tableoid::regclass::text, 16) <> substr(e.tableoid::regclass::text, 8)"
        ).fetchone()
        default_rows = conn.execute("SELECT count(*) FROM events_default").fetchone()
        attempt_ids = conn.execute(
            "SELECT nextval('event_attempts_id_seq') > (SELECT max(id) FROM event_attempts)"
        ).fetchone()
    assert misplaced == (0,)
    assert keys == (before["events"],)
    assert strays == (0,)
    assert default_rows == (0,)
    assert attempt_ids == (True,)

    migrations.down(dsn, REPO_SQL_DIR, steps=1)
    assert migrations.version(dsn) == (7, False)
    assert counts(dsn) == before
    with psycopg.connect(dsn) as conn:
        constraints = {
            row[0]
            for row in conn.execute(
                "SELECT conname FROM pg_constraint"
                " WHERE conrelid IN ('events'::regclass, 'event_attempts'::regclass,"
                "  'event_commands'::regclass)"
            )
        }
    assert {
        "events_pkey",
        "events_idempotency_key_key",
        "event_attempts_event_id_fkey",
        "event_attempts_event_id_attempt_key",
        "event_commands_event_id_fkey",
    } <= constraints


def test_a_claim_and_an_outcome_find_an_event_moved_after_its_key_was_read(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention moves a kept event into today's partition (a hop) between the executor's
    read of its key and its statement: the statement, which names the old day, finds
    nothing, and is sent again with the key's new day."""
    import time
    from datetime import UTC, datetime, timedelta

    from eventsched.core.store import executions
    from eventsched.core.store.executions import Claimed, ClaimRequest, NotClaimed, Outcome
    from tests.support.execution import insert_events, new_events

    migrations.up(empty_database, REPO_SQL_DIR)
    event = new_events(1, due=time.time() - 1)[0]
    insert_events(empty_database, [event])
    real = executions._partitions
    stale = (datetime.now(UTC).date() + timedelta(days=3),)  # a day it is not in
    calls: list[tuple[str, ...]] = []

    def first_stale(conn: psycopg.Connection[object], ids: list[str]) -> tuple[object, ...]:
        calls.append(tuple(ids))
        return stale if len(calls) % 2 == 1 else real(conn, ids)  # type: ignore[arg-type]

    monkeypatch.setattr(executions, "_partitions", first_stale)
    with psycopg.connect(empty_database) as conn:
        [claimed] = executions.claim_batch(
            conn, [ClaimRequest(event.id, 0, time.time())], worker_id="w1"
        )
        conn.commit()
        assert isinstance(claimed, Claimed)
        [done] = executions.finish_outcomes(
            conn, [Outcome(event.id, 1, "succeeded", None, time.time())]
        )
        conn.commit()
        assert done == "succeeded"
        assert len(calls) == 4  # each statement looked again once
        # An event that exists nowhere is not looked for twice.
        calls.clear()
        monkeypatch.setattr(executions, "_partitions", real)
        [missing] = executions.claim_batch(
            conn,
            [ClaimRequest("0190d4a0-0000-7000-8000-000000000000", 0, time.time())],
            worker_id="w1",
        )
        assert missing == NotClaimed("0190d4a0-0000-7000-8000-000000000000", None, None, None)


def test_fresh_partitions_do_not_get_plans_that_scan_them_whole(empty_database: str) -> None:
    """The executor's statements are prepared and run from a cached generic plan. A
    partition analysed while empty (reltuples 0) made that plan a sequential scan of
    today's `event_attempts` partition, kept while the partition grew: in a 1,000/s
    bench.lateness run ~2,500 attempt rows read per event and p99 lateness 195 ms. The
    migration analyses only the partitions that hold rows; an empty one is planned like a
    new table (assumed not small), by its index."""
    import json
    import time
    from datetime import UTC, datetime

    from psycopg import sql

    from eventsched.core.store import executions
    from tests.support.execution import insert_events, new_events

    migrations.up(empty_database, REPO_SQL_DIR)
    events = new_events(50, due=time.time() - 1)
    insert_events(empty_database, events)
    today = (datetime.now(UTC).date(),)
    claim = [{"id": events[0].id, "attempt": 0, "started": time.time()}]
    finish = [dict(claim[0], attempt=1, status="succeeded", error=None, finished=time.time(),
                   next_at=None, reason=None)]  # fmt: skip
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for name, text, req in (
            ("claim", executions._CLAIM_SQL, claim),
            ("finish", executions._FINISH_SQL, finish),
        ):
            statement = executions._in_days(text, today).replace("%(req)s", "$1::text")
            statement = statement.replace("%(worker)s", "'w1'").replace("%(ahead)s", "0")
            conn.execute(f"PREPARE {name} AS {statement}")
            explained = conn.execute(
                sql.SQL("EXPLAIN EXECUTE {}({})").format(
                    sql.Identifier(name), sql.Literal(json.dumps(req))
                )
            ).fetchall()
            plan = "\n".join(str(row[0]) for row in explained)
            assert "Seq Scan on event_attempts" not in plan, plan


def test_stale_and_missing_day_hints_still_claim_and_record(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims and outcomes name their events' days from what they carry (a job's ``day``
    hint, the claim's ``Claimed.day``) and look the keys up only for those that carry none.
    A day that retention made stale (it retired the day and the event hopped to today's
    partition) finds nothing, and the event is looked up and found in its new day: real
    retention pass, batches mixing hinted, stale and unhinted requests."""
    import time
    from datetime import UTC, datetime, timedelta

    from eventsched.core.domain.retention import RetentionPolicy
    from eventsched.core.store import executions, retention
    from eventsched.core.store.executions import Claimed, ClaimRequest, Outcome
    from tests.support.execution import insert_events, new_events

    migrations.up(empty_database, REPO_SQL_DIR)
    today = datetime.now(UTC).date()
    old_day = today - timedelta(days=40)  # beyond retention.keep: the next pass retires it
    recorded = datetime.combine(old_day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    with retention.connect(empty_database) as rconn:
        retention._create_day(rconn, old_day)
    due = time.time() - 1
    old = new_events(3, due=due)  # recorded 40 days ago, not run yet
    insert_events(empty_database, old, retain_from=recorded, recorded_at=recorded)
    fresh = new_events(2, due=due)  # recorded today
    insert_events(empty_database, fresh)

    real = executions._partitions
    looked_up: list[tuple[str, ...]] = []

    def spy(conn: psycopg.Connection[object], ids: list[str]) -> tuple[object, ...]:
        looked_up.append(tuple(ids))
        return real(conn, ids)  # type: ignore[arg-type]

    monkeypatch.setattr(executions, "_partitions", spy)
    with psycopg.connect(empty_database) as conn:
        # A right hint: no lookup, and the claim tells the day its outcome will carry.
        [running] = executions.claim_batch(
            conn, [ClaimRequest(old[1].id, 0, time.time(), day=old_day)], worker_id="w1"
        )
        conn.commit()
        assert isinstance(running, Claimed) and running.day == old_day
        assert looked_up == []

        # Retention retires the old day: both unfinished events hop to today's partition.
        with retention.connect(empty_database) as rconn:
            report = retention.enforce(rconn, RetentionPolicy())
        assert report.retired == [old_day] and report.hopped == 3

        # A stale hint alone: the claim names the retired day and finds nothing; the event
        # is looked up and claimed in today's partition.
        [moved] = executions.claim_batch(
            conn, [ClaimRequest(old[2].id, 0, time.time(), day=old_day)], worker_id="w1"
        )
        conn.commit()
        assert isinstance(moved, Claimed) and moved.day == today
        assert looked_up == [(old[2].id,)]

        # A stale hint, a right one and none, in one batch: only the unhinted request is
        # looked up (the stale one is found all the same: today is named for the others).
        looked_up.clear()
        claimed = executions.claim_batch(
            conn,
            [
                ClaimRequest(old[0].id, 0, time.time(), day=old_day),
                ClaimRequest(fresh[0].id, 0, time.time(), day=today),
                ClaimRequest(fresh[1].id, 0, time.time()),
            ],
            worker_id="w1",
        )
        conn.commit()
        assert [type(c) for c in claimed] == [Claimed] * 3
        assert [c.day for c in claimed if isinstance(c, Claimed)] == [today] * 3
        assert looked_up == [(fresh[1].id,)]

        # The outcome of the attempt claimed before the hop carries the retired day: it is
        # looked up and recorded in the event's new partition, attempt row included.
        looked_up.clear()
        [done] = executions.finish_outcomes(
            conn, [Outcome(old[1].id, 1, "succeeded", None, time.time(), day=running.day)]
        )
        conn.commit()
        assert done == "succeeded"
        assert looked_up == [(old[1].id,)]

        # Outcomes carrying their claim's day and one carrying none, in one batch.
        looked_up.clear()
        recorded_now = executions.finish_outcomes(
            conn,
            [
                Outcome(c.event_id, 1, "succeeded", None, time.time(), day=c.day)
                for c in [moved, *claimed[:2]]
                if isinstance(c, Claimed)
            ]
            + [Outcome(fresh[1].id, 1, "succeeded", None, time.time())],
        )
        conn.commit()
        assert recorded_now == ["succeeded"] * 4
        assert looked_up == [(fresh[1].id,)]
        outcomes = conn.execute(
            "SELECT a.event_id::text, a.outcome, a.tableoid::regclass::text FROM event_attempts a"
        ).fetchall()
    assert sorted(outcomes) == sorted(
        (e.id, "succeeded", f"event_attempts_p{today:%Y%m%d}") for e in [*old, *fresh]
    )


async def test_the_enqueuers_that_read_an_event_tell_its_day_for_the_job(
    empty_database: str,
) -> None:
    """The reconciler's pages and take-overs, the commands and ``dlq replay`` read the
    event's row anyway: each returns the day of its partition, which the job it enqueues
    carries as the claim's hint (the job contract's ``day``)."""
    import time
    from datetime import UTC, datetime, timedelta

    import trio_asyncio

    from eventsched.core.domain.commands import new_command
    from eventsched.core.store import recovery, replay, retention
    from eventsched.core.store.commands import CommandRow, apply_commands
    from eventsched.core.store.pool import Database
    from tests.support.execution import insert_events, new_events

    migrations.up(empty_database, REPO_SQL_DIR)
    old_day = datetime.now(UTC).date() - timedelta(days=3)  # a day that is not today's
    recorded = datetime.combine(old_day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    with retention.connect(empty_database) as rconn:
        retention._create_day(rconn, old_day)
    overdue, moved, stale, dead = new_events(4, due=time.time() - 60)
    there = {"retain_from": recorded, "recorded_at": recorded}
    insert_events(empty_database, [overdue, moved], **there)
    seen = datetime.now(UTC) - timedelta(hours=1)
    insert_events(empty_database, [stale], status="running", attempts=1, updated_at=seen, **there)
    insert_events(empty_database, [dead], status="dead", attempts=1, finished_at=seen, **there)
    async with trio_asyncio.open_loop():
        db = await Database.open(empty_database, max_size=1)
        try:
            found = await recovery.candidates(db, "overdue", age=1, limit=10)
            [running] = await recovery.candidates(db, "stale_running", age=1, limit=10)
            [taken] = await recovery.take_over(
                db, [running], stale_after=1, max_attempts=3, error="lost"
            )
            rerun = await replay.rerun_dead(db, dead.id, 1)
            later = datetime.now(UTC) + timedelta(minutes=5)
            [applied] = await apply_commands(
                db,
                [
                    CommandRow(
                        new_command(
                            "reschedule", event_id=moved.id, execute_at=later, requested_by="t"
                        )
                    )
                ],
            )
        finally:
            await db.close()
    assert sorted((c.event_id, c.day) for c in found) == sorted(
        [(overdue.id, old_day), (moved.id, old_day)]
    )
    assert (running.event_id, running.day) == (stale.id, old_day)
    assert (taken.status, taken.day) == ("retrying", old_day)
    assert rerun is not None and rerun[1] == old_day
    assert (applied.result, applied.day) == ("applied", old_day)
