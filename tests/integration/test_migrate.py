"""Specification of eventsched.core.store.migrations and of the first schema migration.

The checks that need no database are in tests/unit/test_migrate.py. Every test here runs
against a real PostgreSQL in a database of its own (random name, dropped afterwards), so
the tests can run side by side with other suites.
"""

from __future__ import annotations

import re
import threading
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from eventsched.core.runtime.errors import MigrationError
from eventsched.core.store import migrations
from tests.support.migrations import REPO_SQL_DIR, write_migrations

# ------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Database:
    name: str
    dsn: str


@pytest.fixture
def database(empty_database: str) -> Database:
    """A fresh, empty database (the tier's ``empty_database``: dropped, connections and all,
    after the test)."""
    return Database(conninfo_to_dict(empty_database)["dbname"], empty_database)


@pytest.fixture
def migrated(database: Database) -> Database:
    """A database with the real schema applied."""
    migrations.up(database.dsn, REPO_SQL_DIR)
    return database


def three_steps(directory: Path) -> Path:
    """Three small migrations with sparse versions (as timestamps would be)."""
    return write_migrations(
        directory,
        {
            "000001_a.up.sql": "CREATE TABLE a (x int);",
            "000001_a.down.sql": "DROP TABLE a;",
            "000005_b.up.sql": "CREATE TABLE b (x int);\nCREATE TABLE b2 (x int);",
            "000005_b.down.sql": "DROP TABLE b2;\nDROP TABLE b;",
            "20240101120000_c.up.sql": "CREATE TABLE c (x int);",
            "20240101120000_c.down.sql": "DROP TABLE c;",
        },
    )


def tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {str(row[0]) for row in rows}


def schema_migrations_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, dirty FROM schema_migrations").fetchall()


def execute(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


# ------------------------------------------------------------- up and down


def test_up_down_up_round_trip_keeps_golang_migrate_bookkeeping(database: Database) -> None:
    dsn = database.dsn
    assert migrations.version(dsn) == (None, False)

    latest = max(m.version for m in migrations.list_migrations(REPO_SQL_DIR))
    every = [m.version for m in migrations.list_migrations(REPO_SQL_DIR)]
    assert migrations.up(dsn, REPO_SQL_DIR) == every
    assert {"events", "event_attempts", "schema_migrations"} <= tables(dsn)
    assert migrations.version(dsn) == (latest, False)
    assert schema_migrations_rows(dsn) == [(latest, False)]
    # The table exactly as golang-migrate creates it.
    columns = execute(
        dsn,
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'schema_migrations' ORDER BY ordinal_position",
    )
    assert columns == [("version", "bigint", "NO"), ("dirty", "boolean", "NO")]
    primary_key = execute(
        dsn,
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = 'schema_migrations'::regclass AND i.indisprimary",
    )
    assert primary_key == [("version",)]

    assert migrations.up(dsn, REPO_SQL_DIR) == []  # nothing pending

    assert migrations.down(dsn, REPO_SQL_DIR, None) == every[::-1]
    assert tables(dsn) == {"schema_migrations"}
    assert migrations.version(dsn) == (None, False)
    assert schema_migrations_rows(dsn) == []  # golang-migrate truncates for "no version"

    assert migrations.up(dsn, REPO_SQL_DIR) == every
    assert {"events", "event_attempts"} <= tables(dsn)
    assert migrations.version(dsn) == (latest, False)


def test_version_does_not_create_the_bookkeeping_table(database: Database) -> None:
    assert migrations.version(database.dsn) == (None, False)
    assert "schema_migrations" not in tables(database.dsn)


def test_up_and_down_by_steps(database: Database, tmp_path: Path) -> None:
    dsn, sql_dir = database.dsn, three_steps(tmp_path)

    assert migrations.up(dsn, sql_dir, steps=2) == [1, 5]
    assert migrations.version(dsn) == (5, False)
    assert tables(dsn) == {"schema_migrations", "a", "b", "b2"}
    assert migrations.up(dsn, sql_dir, steps=5) == [20240101120000]  # fewer pending than steps
    assert migrations.version(dsn) == (20240101120000, False)

    assert migrations.down(dsn, sql_dir, steps=2) == [20240101120000, 5]
    assert migrations.version(dsn) == (1, False)
    assert tables(dsn) == {"schema_migrations", "a"}
    assert migrations.down(dsn, sql_dir) == [1]  # one step by default
    assert migrations.down(dsn, sql_dir) == []  # nothing left
    assert migrations.version(dsn) == (None, False)


def test_down_all(database: Database, tmp_path: Path) -> None:
    dsn, sql_dir = database.dsn, three_steps(tmp_path)
    assert migrations.up(dsn, sql_dir) == [1, 5, 20240101120000]
    assert migrations.down(dsn, sql_dir, steps=None) == [20240101120000, 5, 1]
    assert tables(dsn) == {"schema_migrations"}
    assert schema_migrations_rows(dsn) == []


@pytest.mark.parametrize("steps", [0, -1])
def test_steps_must_be_positive(database: Database, steps: int) -> None:
    with pytest.raises(MigrationError, match="steps must be a positive"):
        migrations.up(database.dsn, REPO_SQL_DIR, steps=steps)
    with pytest.raises(MigrationError, match="steps must be a positive"):
        migrations.down(database.dsn, REPO_SQL_DIR, steps=steps)


def test_unknown_database_version_is_refused(database: Database, tmp_path: Path) -> None:
    migrations.force(database.dsn, 7)
    with pytest.raises(MigrationError, match="at version 7, which has no migration files"):
        migrations.up(database.dsn, three_steps(tmp_path))


# --------------------------------------------------------- failures and force


def broken_second_step(directory: Path) -> Path:
    return write_migrations(
        directory,
        {
            "000001_ok.up.sql": "CREATE TABLE ok (x int);",
            "000001_ok.down.sql": "DROP TABLE ok;",
            # The first statement succeeds; the file as a whole must be rolled back.
            "000002_broken.up.sql": "CREATE TABLE half (x int);\n\nSELECT nope FROM ok;\n",
            "000002_broken.down.sql": "DROP TABLE half;",
        },
    )


def test_failed_migration_leaves_the_database_dirty_until_forced(
    database: Database, tmp_path: Path
) -> None:
    dsn, sql_dir = database.dsn, broken_second_step(tmp_path)

    with pytest.raises(MigrationError) as failure:
        migrations.up(dsn, sql_dir)
    message = str(failure.value)
    assert "000002_broken.up.sql" in message
    assert 'column "nope" does not exist' in message
    assert "line 3" in message
    assert "eventsched migrate force 1" in message
    assert "this run applied: 1." in message
    assert isinstance(failure.value.__cause__, psycopg.errors.UndefinedColumn)

    # golang-migrate's protocol: the target version is recorded dirty before running.
    assert migrations.version(dsn) == (2, True)
    assert schema_migrations_rows(dsn) == [(2, True)]
    assert "half" not in tables(dsn)  # the file ran as one transaction

    for refused in (migrations.up, migrations.down):
        with pytest.raises(MigrationError, match="dirty at version 2") as refusal:
            refused(dsn, sql_dir)
        assert "`eventsched migrate force 1` if `up` of 2 failed" in str(refusal.value)

    migrations.force(dsn, 1)
    assert migrations.version(dsn) == (1, False)
    (sql_dir / "000002_broken.up.sql").write_text("CREATE TABLE half (x int);")
    assert migrations.up(dsn, sql_dir) == [2]
    assert migrations.version(dsn) == (2, False)


def test_failed_down_of_the_first_migration_is_recorded_as_dirty_nil_version(
    database: Database, tmp_path: Path
) -> None:
    dsn = database.dsn
    sql_dir = write_migrations(
        tmp_path,
        {"000001_a.up.sql": "CREATE TABLE a (x int);", "000001_a.down.sql": "DROP TABLE nope;"},
    )
    migrations.up(dsn, sql_dir)
    with pytest.raises(MigrationError, match=r"000001_a\.down\.sql failed") as failure:
        migrations.down(dsn, sql_dir)
    assert "eventsched migrate force 1" in str(failure.value)  # the schema is still at 1
    assert schema_migrations_rows(dsn) == [(-1, True)]  # golang-migrate issue #330
    assert migrations.version(dsn) == (None, True)
    with pytest.raises(MigrationError, match=r"dirty at no version \(-1\)") as refusal:
        migrations.up(dsn, sql_dir)
    assert "`eventsched migrate force 1` if `down` of 1 failed" in str(refusal.value)

    migrations.force(dsn, -1)
    assert schema_migrations_rows(dsn) == []
    assert migrations.version(dsn) == (None, False)


def test_force_rejects_versions_below_minus_one(database: Database) -> None:
    with pytest.raises(MigrationError, match="cannot force version -2"):
        migrations.force(database.dsn, -2)


def test_empty_migration_file_only_moves_the_version(database: Database, tmp_path: Path) -> None:
    sql_dir = write_migrations(
        tmp_path, {"000001_noop.up.sql": "\n", "000001_noop.down.sql": "-- nothing\n"}
    )
    assert migrations.up(database.dsn, sql_dir) == [1]
    assert migrations.down(database.dsn, sql_dir) == [1]
    assert migrations.version(database.dsn) == (None, False)


# ------------------------------------------------------------- concurrency


def test_concurrent_up_applies_each_migration_once(database: Database, tmp_path: Path) -> None:
    # Without the lock both threads would run 000001 (the second CREATE TABLE fails)
    # and 000002 twice (two rows in runs). pg_sleep widens the race window.
    sql_dir = write_migrations(
        tmp_path,
        {
            "000001_runs.up.sql": "CREATE TABLE runs (step int); SELECT pg_sleep(0.3);",
            "000001_runs.down.sql": "DROP TABLE runs;",
            "000002_log.up.sql": "INSERT INTO runs VALUES (2); SELECT pg_sleep(0.3);",
            "000002_log.down.sql": "DELETE FROM runs WHERE step = 2;",
        },
    )
    start = threading.Barrier(2)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run_up() -> None:
        start.wait()
        try:
            results.append(migrations.up(database.dsn, sql_dir))
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=run_up) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert sorted(results) == [[], [1, 2]]
    assert execute(database.dsn, "SELECT step FROM runs") == [(2,)]
    assert migrations.version(database.dsn) == (2, False)


def golang_migrate_lock_key(database_name: str) -> int:
    """The key golang-migrate's postgres driver takes for postgres://host/<database_name>.

    GenerateAdvisoryLockId(purl.Path, current_schema(), "schema_migrations"): CRC-32
    IEEE of the NUL-joined names times 1486364155, as uint32.
    """
    names = f"/{database_name}\x00public\x00schema_migrations".encode()
    return (zlib.crc32(names) * 1486364155) % 2**32


def test_the_lock_is_the_one_golang_migrate_takes(database: Database) -> None:
    key = golang_migrate_lock_key(database.name)
    assert migrations.advisory_lock_id(f"/{database.name}", "public") == key
    with psycopg.connect(database.dsn, autocommit=True) as other_migrator:
        other_migrator.execute("SELECT pg_advisory_lock(%s)", (key,))
        with pytest.raises(MigrationError, match=r"waiting for the migration lock"):
            migrations.up(database.dsn, REPO_SQL_DIR, lock_timeout=0.3)
        with pytest.raises(MigrationError, match=r"waiting for the migration lock"):
            migrations.force(database.dsn, 1, lock_timeout=0.3)
        other_migrator.execute("SELECT pg_advisory_unlock(%s)", (key,))
    assert migrations.up(database.dsn, REPO_SQL_DIR) == [
        m.version for m in migrations.list_migrations(REPO_SQL_DIR)
    ]
    # Released afterwards: nobody holds it any more.
    held = execute(
        database.dsn,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
        (key,),
    )
    assert held == [(0,)]


def test_lock_timeout_does_not_limit_the_migration_itself(
    database: Database, tmp_path: Path
) -> None:
    # A migration waiting on a table lock longer than lock_timeout must still succeed.
    sql_dir = write_migrations(
        tmp_path,
        {
            "000001_t.up.sql": "CREATE TABLE t (x int);",
            "000001_t.down.sql": "DROP TABLE t;",
            "000002_alter.up.sql": "ALTER TABLE t ADD COLUMN y int;",
            "000002_alter.down.sql": "ALTER TABLE t DROP COLUMN y;",
        },
    )
    migrations.up(database.dsn, sql_dir, steps=1)
    with psycopg.connect(database.dsn) as blocker:
        blocker.execute("LOCK TABLE t IN ACCESS SHARE MODE")
        releaser = threading.Timer(0.6, blocker.rollback)
        releaser.start()
        try:
            assert migrations.up(database.dsn, sql_dir, lock_timeout=0.2) == [2]
        finally:
            releaser.join()


# ---------------------------------------------------------- the real schema


def insert_event(dsn: str, **overrides: Any) -> uuid.UUID:
    now = datetime.now(UTC)
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "idempotency_key": f"key-{uuid.uuid4()}",
        "type": "email.send",
        "payload": Jsonb({"to": "a@example.org"}),
        "execute_at": now + timedelta(minutes=5),
        "created_at": now,
        "kafka_topic": "events",
        "kafka_partition": 0,
        "kafka_offset": 42,
    } | overrides
    columns = sql.SQL(", ").join(sql.Identifier(column) for column in row)
    values = sql.SQL(", ").join(sql.Placeholder() * len(row))
    with psycopg.connect(dsn) as conn:
        # The key table first, as the consumer's insert does (sql/000008); both rows get
        # the transaction's now() as retain_from.
        conn.execute(
            "INSERT INTO event_keys (idempotency_key, id, retain_from) VALUES (%s, %s, now())",
            (row["idempotency_key"], row["id"]),
        )
        conn.execute(
            sql.SQL("INSERT INTO events ({}) VALUES ({})").format(columns, values),
            tuple(row.values()),
        )
    return uuid.UUID(str(row["id"]))


def insert_attempt(dsn: str, event_id: uuid.UUID, attempt: int = 1, **overrides: Any) -> None:
    now = datetime.now(UTC)
    row: dict[str, Any] = {
        "event_id": event_id,
        "attempt": attempt,
        "scheduled_for": now - timedelta(milliseconds=12),
        "started_at": now,
        "lateness_ms": 12.0,
        "worker_id": "worker-1",
    } | overrides
    columns = sql.SQL(", ").join(sql.Identifier(column) for column in row)
    values = sql.SQL(", ").join(sql.Placeholder() * len(row))
    with psycopg.connect(dsn) as conn:
        # The partition key is the event's (the claim copies it, sql/000008).
        conn.execute(
            sql.SQL(
                "INSERT INTO event_attempts ({}, event_retain_from)"
                " SELECT {}, (SELECT retain_from FROM events WHERE id = %s)"
            ).format(columns, values),
            (*row.values(), event_id),
        )


def test_new_event_gets_its_defaults(migrated: Database) -> None:
    event_id = insert_event(migrated.dsn)
    row = execute(
        migrated.dsn,
        "SELECT status, attempts, late, last_error, next_attempt_at, finished_at, "
        "recorded_at IS NOT NULL, updated_at IS NOT NULL FROM events WHERE id = %s",
        (event_id,),
    )
    assert row == [("scheduled", 0, False, None, None, None, True, True)]


def test_idempotency_key_is_unique(migrated: Database) -> None:
    # Unique across every partition: the key table is not partitioned (sql/000008).
    insert_event(migrated.dsn, idempotency_key="order-1")
    with pytest.raises(psycopg.errors.UniqueViolation, match="event_keys_pkey"):
        insert_event(migrated.dsn, idempotency_key="order-1")


def test_an_id_belongs_to_one_key(migrated: Database) -> None:
    event_id = insert_event(migrated.dsn)
    with pytest.raises(psycopg.errors.UniqueViolation, match="event_keys_id_key"):
        insert_event(migrated.dsn, id=event_id)


def test_an_attempt_is_recorded_once(migrated: Database) -> None:
    event_id = insert_event(migrated.dsn)
    insert_attempt(migrated.dsn, event_id, 1, outcome="retried", error="timeout")
    insert_attempt(migrated.dsn, event_id, 2)  # running: no outcome yet
    # The constraint of the partition, named after the parent's.
    with pytest.raises(psycopg.errors.UniqueViolation, match=r"event_attempts_p[0-9]{8}_event_id"):
        insert_attempt(migrated.dsn, event_id, 2)
    assert execute(
        migrated.dsn, "SELECT attempt, outcome FROM event_attempts ORDER BY attempt"
    ) == [(1, "retried"), (2, None)]


def test_an_event_and_its_attempts_share_a_day_partition(migrated: Database) -> None:
    event_id = insert_event(migrated.dsn)
    insert_attempt(migrated.dsn, event_id, 1)
    day = datetime.now(UTC).strftime("%Y%m%d")
    assert execute(
        migrated.dsn,
        "SELECT (SELECT tableoid::regclass::text FROM events WHERE id = %s),"
        " (SELECT tableoid::regclass::text FROM event_attempts WHERE event_id = %s)",
        (event_id, event_id),
    ) == [(f"events_p{day}", f"event_attempts_p{day}")]


def test_partitions_exist_a_week_ahead_and_a_default_one(migrated: Database) -> None:
    today = datetime.now(UTC).date()
    for table in ("events", "event_attempts"):
        names = {
            row[0]
            for row in execute(
                migrated.dsn,
                "SELECT relid::text FROM pg_partition_tree(%s::regclass) WHERE isleaf",
                (table,),
            )
        }
        days = {f"{table}_p{today + timedelta(days=n):%Y%m%d}" for n in range(8)}
        assert names == days | {f"{table}_default"}


@pytest.mark.parametrize(
    ("table", "values", "constraint"),
    [
        pytest.param("events", {"status": "done"}, "events_status_check", id="status"),
        pytest.param("events", {"attempts": -1}, "events_attempts_check", id="attempts"),
        pytest.param(
            "events",
            {"status": "retrying"},
            "events_retrying_has_next_attempt_check",
            id="retrying-without-next-attempt",
        ),
        pytest.param(
            "event_attempts", {"outcome": "failed"}, "event_attempts_outcome_check", id="outcome"
        ),
        pytest.param(
            "event_attempts", {"attempt": 0}, "event_attempts_attempt_check", id="attempt"
        ),
    ],
)
def test_check_constraints(
    migrated: Database, table: str, values: dict[str, Any], constraint: str
) -> None:
    if table == "events":
        with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
            insert_event(migrated.dsn, **values)
    else:
        event_id = insert_event(migrated.dsn)
        with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
            insert_attempt(migrated.dsn, event_id, **({"attempt": 1} | values))


def test_every_status_is_accepted(migrated: Database) -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    for status in ("scheduled", "running", "retrying", "succeeded", "dead"):
        insert_event(migrated.dsn, status=status, next_attempt_at=later)
    assert execute(migrated.dsn, "SELECT count(*) FROM events") == [(5,)]


@pytest.mark.parametrize(
    ("query", "index"),
    [
        pytest.param(
            "SELECT id FROM events WHERE status = 'scheduled' "
            "AND execute_at < now() - interval '5 seconds' ORDER BY execute_at LIMIT 500",
            "events_scheduled_execute_at_idx",
            id="reconciler-overdue-scheduled",
        ),
        pytest.param(
            "SELECT min(execute_at) FROM events WHERE status = 'scheduled' AND execute_at < now()",
            "events_scheduled_execute_at_idx",
            id="status-oldest-overdue",
        ),
        pytest.param(
            "SELECT id FROM events WHERE status = 'retrying' "
            "AND next_attempt_at < now() - interval '5 seconds' LIMIT 500",
            "events_retrying_next_attempt_at_idx",
            id="reconciler-lost-retries",
        ),
        pytest.param(
            "SELECT id FROM events WHERE status = 'running' "
            "AND updated_at < now() - interval '5 minutes' LIMIT 500",
            "events_running_updated_at_idx",
            id="reconciler-stale-running",
        ),
        pytest.param(
            "SELECT count(*) FROM events WHERE status = 'dead'",
            "events_dead_finished_at_idx",
            id="status-count-dead",
        ),
        pytest.param(
            "SELECT avg(lateness_ms) FROM event_attempts "
            "WHERE started_at >= now() - interval '1 hour'",
            "event_attempts_started_at_brin",
            id="analysis-attempts-by-time",
        ),
    ],
)
def test_queries_can_use_their_index(migrated: Database, query: str, index: str) -> None:
    # The tables are empty, so forbid sequential scans to see which index is usable.
    with psycopg.connect(migrated.dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(str(row[0]) for row in conn.execute(f"EXPLAIN {query}"))
        # The plan names the partitions' indexes: map them to the parent's.
        used = set(re.findall(r"(?:using|on) (\w+(?:idx|brin))\b", plan))
        parents = {
            str(row[0])
            for name in used
            for row in conn.execute("SELECT pg_partition_root(%s::regclass)::text", (name,))
        }
    assert index in parents, plan


def test_tables_are_documented(migrated: Database) -> None:
    comments = execute(
        migrated.dsn,
        "SELECT c.relname, obj_description(c.oid, 'pg_class') IS NOT NULL FROM pg_class c "
        "WHERE c.relname IN ('events', 'event_attempts') ORDER BY c.relname",
    )
    assert comments == [("event_attempts", True), ("events", True)]
