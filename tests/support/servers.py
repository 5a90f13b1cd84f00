"""Server fixtures: real PostgreSQL, Redis and Kafka-protocol broker for the whole session.

The integration and deploy tiers take these fixtures through their conftest (one definition
here); the unit tier has none of them.

Each service comes from an environment variable when set (CI points them at the machine's
PostgreSQL and Redis), else from the embedded servers of the dev stack (the same code as
`eventsched dev`):

- ``EVENTSCHED_TEST_POSTGRES_DSN``: a server-level DSN (tests create their own databases)
- ``EVENTSCHED_TEST_REDIS_URL``: tests use their own queue names (key prefixes)
- ``EVENTSCHED_TEST_KAFKA``: bootstrap servers; tests use their own topic and group names

Every test gets its own database, topics and queue name, so tests cannot see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from eventsched.core.operations.devbrokers import KafkaBroker, RedisServer
from eventsched.core.operations.devpostgres import PostgresServer
from eventsched.core.runtime.settings import Settings, build_settings
from eventsched.core.store import migrations
from tests.support.clients import FAST_GROUP_CONFIG, delete_queue_keys

_Server = TypeVar("_Server", PostgresServer, RedisServer, KafkaBroker)


@contextmanager
def started(server: _Server) -> Iterator[_Server]:
    """``server`` running until the block ends."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def pg_admin_dsn(services_dir: Path) -> Iterator[str]:
    """A DSN of a PostgreSQL server on which tests may create databases."""
    if dsn := os.environ.get("EVENTSCHED_TEST_POSTGRES_DSN"):
        yield dsn
        return
    with started(PostgresServer(services_dir / "pg", fast=True)) as server:
        yield server.admin_conninfo()


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    if url := os.environ.get("EVENTSCHED_TEST_REDIS_URL"):
        yield url
        return
    with started(RedisServer(services_dir / "redis", fast=True)) as server:
        yield server.url


@pytest.fixture(scope="session")
def kafka_bootstrap(services_dir: Path) -> Iterator[str]:
    if bootstrap := os.environ.get("EVENTSCHED_TEST_KAFKA"):
        yield bootstrap
        return
    with started(KafkaBroker(services_dir / "kafka")) as broker:
        yield broker.url


def _with_dbname(admin_dsn: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)


@pytest.fixture
def empty_database(pg_admin_dsn: str) -> Iterator[str]:
    """A new, empty database for this test only; dropped afterwards."""
    name = f"es_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(pg_admin_dsn, name)
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database(empty_database: str) -> str:
    """A new database with every migration applied."""
    migrations.up(empty_database, migrations.default_sql_dir())
    return empty_database


@dataclass(frozen=True)
class Names:
    """Unique Kafka topic/group and SAQ queue names for one test."""

    topic: str
    dlq_topic: str
    group: str
    queue: str


@pytest.fixture
def names() -> Names:
    tag = uuid.uuid4().hex[:10]
    return Names(
        topic=f"events-{tag}",
        dlq_topic=f"events-dlq-{tag}",
        group=f"group-{tag}",
        queue=f"queue-{tag}",
    )


def service_sections(
    names: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> dict[str, dict[str, Any]]:
    """The settings sections that point a role at this test's database, queue and topics."""
    return {
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "topic": names.topic,
            "dlq_topic": names.dlq_topic,
            "consumer_group": names.group,
            "consumer_client": dict(FAST_GROUP_CONFIG),
        },
        "postgres": {"dsn": database},
        "redis": {"url": redis_url, "queue": names.queue},
    }


@pytest.fixture
def make_settings(database: str, redis_url: str, kafka_bootstrap: str, names: Names) -> Any:
    """Build Settings pointing at this test's database, queue and topics (plus overrides)."""

    def make(**sections: dict[str, Any]) -> Settings:
        raw: dict[str, Any] = {
            **service_sections(names, database, redis_url, kafka_bootstrap),
            "shutdown": {"grace": 5},
        }
        for section, values in sections.items():
            raw[section] = {**raw.get(section, {}), **values}
        return build_settings(raw, "test")

    return make


# -- executor-side tests (test_executor, test_reconciler) ------------------------------------


@pytest.fixture
def dlq_topic(kafka_bootstrap: str, names: Names) -> Names:
    """This test's DLQ topic exists (one partition)."""
    from eventsched.core.kafka import ensure_topics

    ensure_topics(kafka_bootstrap, {names.dlq_topic: 1})
    return names


@pytest.fixture
def executor_state(redis_url: str, names: Names) -> Iterator[None]:
    """The test handlers' records start empty; this test's SAQ queue keys go afterwards."""
    from tests.support import exec_handlers

    exec_handlers.reset()
    yield
    delete_queue_keys(redis_url, names.queue)


@pytest.fixture
def clean_queue(redis_url: str, names: Names) -> Iterator[str]:
    """This test's SAQ queue (its name), whose keys go afterwards: for consumer-side tests."""
    yield names.queue
    delete_queue_keys(redis_url, names.queue)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test alone, so stopping it disturbs nobody."""
    with started(PostgresServer(tmp_path / "pg", fast=True)) as server:
        yield server


@contextmanager
def own_redis_servers(*directories: Path) -> Iterator[list[RedisServer]]:
    """A Redis server of one test alone per directory, running until the block ends
    (started in order, stopped in reverse): servers, not databases of one server, so that a
    FLUSHALL or a stop of one touches no other test's keys, nor the other servers."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(started(RedisServer(directory, fast=True)))
            for directory in directories
        ]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test alone (its URL): FLUSHALL must not touch anyone else's keys."""
    with own_redis_servers(tmp_path / "redis") as (server,):
        yield server.url


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[str]]:
    """Two Redis servers of this test alone (their URLs), the shards of one job queue: a
    FLUSHALL of one must leave the other alone."""
    with own_redis_servers(tmp_path / "shard0", tmp_path / "shard1") as servers:
        yield [server.url for server in servers]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker of this test alone, so restarting it disturbs nobody."""
    with started(KafkaBroker(tmp_path / "kafka")) as broker:
        yield broker
