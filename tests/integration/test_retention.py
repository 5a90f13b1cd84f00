"""Retention of the time-partitioned log on a real PostgreSQL (docs/retention.md): a pass
creates partitions ahead, retires old days by dropping whole partitions, never drops an
unfinished event, forgets keys with their events (the idempotency window), archives what
it drops; `eventsched retention` shows and enforces it."""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from eventsched.cli import cli
from eventsched.core.domain.event import Event
from eventsched.core.domain.retention import RetentionPolicy, partition_name
from eventsched.core.runtime.settings import Settings, build_settings
from eventsched.core.store import events as eventstore
from eventsched.core.store import migrations, retention
from eventsched.core.store.leader import lock_key
from tests.support.cli import assert_one_line_exit_2, offline
from tests.support.metrics import metric_value
from tests.support.migrations import REPO_SQL_DIR

OLD_DAYS = 40  # the old day's age: beyond keep (30 days)


@pytest.fixture
def dsn(empty_database: str) -> str:
    migrations.up(empty_database, REPO_SQL_DIR)
    return empty_database


def consumer_insert(conn: psycopg.Connection[Any], *events: Event) -> set[str]:
    """The consumer's own insert statement (keys in event_keys, ON CONFLICT DO NOTHING):
    the keys that were new."""
    rows = [eventstore.IngestRow(e, "events", 0, n) for n, e in enumerate(events)]
    cur = conn.execute(eventstore._INSERT_SQL, eventstore._columns(rows))
    return {key for key, _day in cur.fetchall()}


def event(key: str, due: datetime | None = None) -> Event:
    now = datetime.now(UTC).replace(microsecond=0)
    return Event(uuid.uuid4(), key, "t", {"k": key}, due or now, now)


def backdate(conn: psycopg.Connection[Any], day: date) -> None:
    """Give the old day its partition (what the migration does for an old log): the rows
    recorded that day are in the default partition until the partition exists."""
    retention._create_day(conn, day)


def old_log(conn: psycopg.Connection[Any], day: date) -> dict[str, uuid.UUID]:
    """Events recorded on ``day`` (40 days ago), one per fate, with an attempt each and a
    command on the old finished one."""
    recorded = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    now = datetime.now(UTC)
    kinds = {
        # status, finished_at
        "succeeded_old": ("succeeded", recorded + timedelta(seconds=1)),
        "dead_old": ("dead", recorded + timedelta(seconds=1)),
        "cancelled_old": ("cancelled", recorded + timedelta(seconds=1)),
        "long_future": ("scheduled", None),  # due in 200 days
        "stuck_running": ("running", None),  # a worker died on it
        "retrying": ("retrying", None),
        "finished_lately": ("succeeded", now - timedelta(days=1)),  # within keep
        "dead_lately": ("dead", now - timedelta(days=2)),
    }
    ids = {}
    for key, (status, finished_at) in kinds.items():
        event_id = uuid.uuid4()
        ids[key] = event_id
        execute_at = recorded + timedelta(days=200) if key == "long_future" else recorded
        conn.execute(
            "INSERT INTO event_keys (idempotency_key, id, retain_from) VALUES (%s, %s, %s)",
            (key, event_id, recorded),
        )
        conn.execute(
            "INSERT INTO events (id, idempotency_key, type, payload, execute_at, status,"
            " attempts, next_attempt_at, created_at, recorded_at, updated_at, finished_at,"
            " retain_from) VALUES (%s, %s, 't', '{}', %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                event_id, key, execute_at, status, 0 if status == "scheduled" else 1,
                now + timedelta(minutes=5) if status == "retrying" else None,
                recorded, recorded, recorded, finished_at, recorded,
            ),
        )  # fmt: skip
        if status != "scheduled":
            conn.execute(
                "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
                " lateness_ms, worker_id, event_retain_from) VALUES (%s, 1, %s, %s, 0, 'w', %s)",
                (event_id, recorded, recorded, recorded),
            )
    conn.execute(
        "INSERT INTO event_commands (command_id, op, event_id, created_at, result)"
        " VALUES (%s, 'cancel', %s, %s, 'not_applicable')",
        (uuid.uuid4(), ids["succeeded_old"], recorded),
    )
    conn.execute(
        "INSERT INTO event_commands (command_id, op, idempotency_key, created_at, result,"
        " applied_at) VALUES (%s, 'cancel', 'nobody', %s, 'unknown_event', %s)",
        (uuid.uuid4(), recorded, recorded),
    )
    return ids


DROPPED = {"succeeded_old", "dead_old", "cancelled_old"}


def test_a_pass_drops_old_finished_events_and_keeps_every_unfinished_one(
    dsn: str, tmp_path: Path
) -> None:
    today = datetime.now(UTC).date()
    old_day = today - timedelta(days=OLD_DAYS)
    policy = RetentionPolicy(archive_dir=str(tmp_path / "archive"))
    with retention.connect(dsn) as conn:
        ids = old_log(conn, old_day)
        assert conn.execute("SELECT count(*) FROM events_default").fetchone() == (8,)
        backdate(conn, old_day)
        assert conn.execute("SELECT count(*) FROM events_default").fetchone() == (0,)
        before = {
            str(r[0]): r[1:]
            for r in conn.execute(
                "SELECT id, status, execute_at, attempts, finished_at FROM events"
            ).fetchall()
        }

        dry = retention.enforce(conn, policy, dry_run=True)
        assert dry.plan.retire == (old_day,)
        assert (dry.hopped, dry.dropped["events"]) == (5, 3)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (8,)  # nothing done

        report = retention.enforce(conn, policy)
        assert report.retired == [old_day]
        assert report.dropped == {"events": 3, "event_attempts": 3}
        assert report.hopped == 5
        assert report.commands_deleted == 1  # the unknown_event command, applied 40 days ago
        assert report.created == []  # the migration made today + 7 days already

        # Every kept event is unchanged but for its partition: today's.
        kept = {
            str(r[0]): r[1:]
            for r in conn.execute(
                "SELECT id, status, execute_at, attempts, finished_at FROM events"
            ).fetchall()
        }
        assert set(kept) == {str(ids[k]) for k in ids if k not in DROPPED}
        assert all(kept[i] == before[i] for i in kept)
        where = conn.execute(
            "SELECT DISTINCT tableoid::regclass::text FROM events"
            " UNION SELECT DISTINCT tableoid::regclass::text FROM event_attempts"
        ).fetchall()
        assert sorted(w[0] for w in where) == [
            partition_name("event_attempts", today),
            partition_name("events", today),
        ]
        # Their keys moved with them; the dropped events' keys, attempts, commands went.
        keys = dict(conn.execute("SELECT idempotency_key, retain_from FROM event_keys"))
        assert set(keys) == set(ids) - DROPPED
        assert conn.execute(
            "SELECT count(*) FROM event_keys k JOIN events e"
            " ON e.id = k.id AND e.retain_from = k.retain_from"
        ).fetchone() == (5,)
        assert conn.execute("SELECT count(*) FROM event_attempts").fetchone() == (4,)
        assert conn.execute("SELECT count(*) FROM event_commands").fetchone() == (0,)
        assert retention.existing_days(conn) == {today + timedelta(days=n) for n in range(8)}
        leftovers = conn.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE '%%_p%%_retiring'"
        ).fetchall()
        assert leftovers == []

        # A second pass has nothing to do.
        again = retention.enforce(conn, policy)
        assert (again.retired, again.hopped, again.dropped["events"]) == ([], 0, 0)

    # The archive holds exactly the dropped rows, and COPY reads it back.
    archive = tmp_path / "archive" / f"events_p{old_day:%Y%m%d}.csv.gz"
    with gzip.open(archive, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["idempotency_key"] for r in rows} == DROPPED
    assert (tmp_path / "archive" / f"event_attempts_p{old_day:%Y%m%d}.csv.gz").exists()
    assert not list((tmp_path / "archive").glob("*.partial"))
    with retention.connect(dsn) as conn:
        conn.execute("CREATE TEMPORARY TABLE restored (LIKE events)")
        with (
            gzip.open(archive, "rb") as f,
            conn.cursor() as cur,
            cur.copy("COPY restored FROM STDIN (FORMAT csv, HEADER)") as copy,
        ):
            copy.write(f.read())
        assert conn.execute("SELECT count(*) FROM restored").fetchone() == (3,)


def test_a_duplicate_inside_the_window_is_absorbed_and_outside_it_is_a_new_event(
    dsn: str,
) -> None:
    today = datetime.now(UTC).date()
    old_day = today - timedelta(days=OLD_DAYS)
    with retention.connect(dsn) as conn:
        old_log(conn, old_day)
        backdate(conn, old_day)
        fresh = event("fresh-key")
        assert consumer_insert(conn, fresh) == {"fresh-key"}
        # Inside the window: recorded today, an old event still kept (hopped or not yet
        # retired): the same key is a duplicate.
        assert consumer_insert(conn, event("fresh-key")) == set()
        assert consumer_insert(conn, event("long_future")) == set()
        assert consumer_insert(conn, event("succeeded_old")) == set()  # not retired yet

        retention.enforce(conn, RetentionPolicy())

        # Outside: the old finished event was dropped with its key: a new event.
        assert consumer_insert(conn, event("succeeded_old")) == {"succeeded_old"}
        # Still inside: kept events keep their keys.
        assert consumer_insert(conn, event("long_future")) == set()
        assert consumer_insert(conn, event("finished_lately")) == set()
        assert consumer_insert(conn, event("fresh-key")) == set()
        rows = conn.execute(
            "SELECT idempotency_key, count(*) FROM events GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert all(n == 1 for _, n in rows)


def test_an_event_reopened_after_the_snapshot_is_not_dropped(dsn: str) -> None:
    """A dead event re-run (dlq replay) between the pass's snapshot and its lock hops."""
    today = datetime.now(UTC).date()
    old_day = today - timedelta(days=OLD_DAYS)
    with retention.connect(dsn) as conn:
        ids = old_log(conn, old_day)
        backdate(conn, old_day)
        real_columns = retention._columns

        def replay_between(c: psycopg.Connection[Any], table: str) -> list[str]:
            # Called after the pass's snapshot and before its lock: a dlq replay re-opens
            # the old dead event now (another session, committed).
            if table == "events":
                with psycopg.connect(dsn, autocommit=True) as other:
                    other.execute(
                        "UPDATE events SET status = 'scheduled', finished_at = NULL,"
                        " updated_at = now() WHERE id = %s",
                        (ids["dead_old"],),
                    )
            return real_columns(c, table)

        retention._columns = replay_between  # type: ignore[assignment]
        try:
            report = retention.enforce(conn, RetentionPolicy())
        finally:
            retention._columns = real_columns  # type: ignore[assignment]
        assert report.hopped == 6
        status = conn.execute("SELECT status FROM events WHERE id = %s", (ids["dead_old"],))
        assert status.fetchone() == ("scheduled",)


def test_partitions_are_created_ahead_and_from_the_default_partition(dsn: str) -> None:
    today = datetime.now(UTC).date()
    policy = RetentionPolicy(ahead=timedelta(days=10))
    with retention.connect(dsn) as conn:
        # An event recorded in 9 days' time (a clock ahead): no partition yet, so default.
        later = datetime.combine(today + timedelta(days=9), datetime.min.time(), tzinfo=UTC)
        conn.execute(
            "INSERT INTO events (id, idempotency_key, type, payload, execute_at, created_at,"
            " retain_from) VALUES (%s, 'ahead', 't', '{}', now(), now(), %s)",
            (uuid.uuid4(), later + timedelta(hours=1)),
        )
        report = retention.enforce(conn, policy)
        made = {today + timedelta(days=n) for n in (8, 9, 10)}
        assert set(report.created) == {
            partition_name(t, d) for t in ("events", "event_attempts") for d in made
        }
        assert conn.execute("SELECT count(*) FROM events_default").fetchone() == (0,)
        where = conn.execute("SELECT tableoid::regclass::text FROM events").fetchone()
        assert where == (partition_name("events", today + timedelta(days=9)),)
        # The moved partition has every index of its parent.
        indexes = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename = %s",
            (partition_name("events", today + timedelta(days=9)),),
        ).fetchone()
        reference = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE tablename = %s",
            (partition_name("events", today),),
        ).fetchone()
        assert indexes == reference


def test_status_lists_every_partition(dsn: str) -> None:
    today = datetime.now(UTC).date()
    with retention.connect(dsn) as conn:
        consumer_insert(conn, event("a"), event("b"))
        conn.execute(
            "UPDATE events SET status = 'succeeded', finished_at = now() WHERE idempotency_key = 'a'"
        )
        parts = retention.list_partitions(conn)
    mine = [p for p in parts if p.table == "events" and p.day == today]
    assert len(mine) == 1
    assert (mine[0].rows, mine[0].unfinished, mine[0].finished) == (2, 1, 1)
    assert mine[0].range.startswith("FOR VALUES FROM (")
    assert {p.name for p in parts if p.day is None} == {"events_default", "event_attempts_default"}
    assert len(parts) == 2 * 9


def test_the_pass_is_json(dsn: str) -> None:
    with retention.connect(dsn) as conn:
        report = retention.enforce(conn, RetentionPolicy(), dry_run=True)
    assert json.loads(json.dumps(report.to_json()))["dry_run"] is True


# -- the duty, the command ----------------------------------------------------------------------


def settings_for(dsn: str, **retention_values: Any) -> Settings:
    return build_settings(
        {
            "postgres": {"dsn": dsn},
            "redis": {"queue": f"q-{uuid.uuid4().hex[:8]}"},
            "retention": retention_values,
        },
        "test",
    )


async def test_one_executor_at_a_time_leads_the_duty_and_counts_what_it_drops(dsn: str) -> None:
    import trio_asyncio

    from eventsched.plugins.executor.retention import RetentionDuty

    today = datetime.now(UTC).date()
    with retention.connect(dsn) as conn:
        old_log(conn, today - timedelta(days=OLD_DAYS))
        backdate(conn, today - timedelta(days=OLD_DAYS))
    settings = settings_for(dsn)
    first, second = RetentionDuty(settings=settings), RetentionDuty(settings=settings)
    dropped = metric_value("eventsched_retention_dropped_total", table="events")
    attempts = metric_value("eventsched_retention_dropped_total", table="event_attempts")
    hopped = metric_value("eventsched_retention_hopped_total")
    async with trio_asyncio.open_loop():
        try:
            assert await first.lock.campaign(False)
            assert not await second.lock.campaign(False)  # the same key: one leader
            report = await first.pass_once()
        finally:
            await first.lock.release()
            await second.lock.release()
    assert report is not None and report.retired == [today - timedelta(days=OLD_DAYS)]
    assert metric_value("eventsched_retention_dropped_total", table="events") - dropped == 3
    assert (
        metric_value("eventsched_retention_dropped_total", table="event_attempts") - attempts == 3
    )
    assert metric_value("eventsched_retention_hopped_total") - hopped == 5


def eventsched(dsn: str, *args: str, queue: str = "q-cli") -> Any:
    env = {"EVENTSCHED_POSTGRES__DSN": dsn, "EVENTSCHED_REDIS__QUEUE": queue}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_the_command_shows_partitions_and_enforces_under_the_duty_lock(dsn: str) -> None:
    today = datetime.now(UTC).date()
    old_day = today - timedelta(days=OLD_DAYS)
    with retention.connect(dsn) as conn:
        old_log(conn, old_day)
        backdate(conn, old_day)

    shown = eventsched(dsn, "retention", "status", "--json")
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    old = next(p for p in report["partitions"] if p["name"] == partition_name("events", old_day))
    assert (old["rows"], old["unfinished"], old["finished"]) == (8, 3, 5)
    assert report["pass"]["retire"] == [old_day.isoformat()]
    assert report["pass"]["dropped"]["events"] == 3 and report["pass"]["hopped"] == 5
    text = eventsched(dsn, "retention", "status")
    assert partition_name("events", old_day) in text.stdout
    assert "would drop 3 events" in text.stdout

    dry = eventsched(dsn, "retention", "enforce", "--dry-run")
    assert dry.exit_code == 0 and "would drop 3 events" in dry.stdout
    with retention.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (8,)
        # While the duty's lock is held elsewhere (a leader's pass), enforce refuses.
        assert retention.take_lock(conn, lock_key("q-cli", retention.DUTY))
        busy = eventsched(dsn, "retention", "enforce")
        assert busy.exit_code == 1
        assert "another process is running a retention pass" in busy.stderr
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (8,)

    done = eventsched(dsn, "retention", "enforce")
    assert done.exit_code == 0, done.output
    assert "dropped 3 events and 3 attempts, moved 5 events" in done.stdout
    with retention.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (5,)


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("KEEP", "36h", "retention.keep"),
        ("AHEAD", "0s", "retention.ahead"),
        ("INTERVAL", "8d", "retention.interval"),
    ],
)
def test_a_bad_retention_setting_exits_2_naming_it(name: str, value: str, key: str) -> None:
    result = offline("retention", "status", **{f"EVENTSCHED_RETENTION__{name}": value})
    assert_one_line_exit_2(result, f"invalid setting {key}")
