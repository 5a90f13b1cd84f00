"""The consumer role against real PostgreSQL, Redis and broker.

Specification: every valid message becomes exactly one row and one SAQ job (key = event id,
scheduled = due time), offsets are committed only after that; bad messages land in the DLQ
with their reason; outages, crashes, rebalances and shutdowns lose nothing and duplicate
nothing in effect.

In-process tests run the role with the real runtime (``tests.support.ingest.running``);
crash, rebalance and signal tests run ``python -m eventsched run --role consumer`` children.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from structlog.testing import capture_logs

from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import encode_event, kafka_headers, new_event
from eventsched.core.jobqueue import payload_bytes
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.devpostgres import PostgresServer
from eventsched.core.operations.summary import metric_total
from eventsched.core.store import events as eventstore
from eventsched.core.store import migrations
from eventsched.core.store.events import IngestRow
from eventsched.core.store.pool import Database
from tests.support.clients import FAST_GROUP_CONFIG, query, read_topic
from tests.support.corpus import load_corpus
from tests.support.ingest import (
    RawMessage,
    child_sections,
    committed_offsets,
    count_rows,
    event_message,
    make_events,
    produce,
    rows_reach,
    running,
    saq_kwargs,
    saq_records,
    saq_schedule,
    start_role,
    wait_assigned,
)
from tests.support.metrics import metric_sum, scrape
from tests.support.servers import Names
from tests.support.settingsfile import write_settings
from tests.support.waiting import wait_until

PARTITIONS = 3
# Children of the crash and rebalance tests: a dead member is noticed after 3 s instead of 6
# (and Tansu completes joins in about half the session timeout).
QUICK_GROUP = {
    "consumer_client": {
        **FAST_GROUP_CONFIG,
        "session.timeout.ms": 3000,
        "heartbeat.interval.ms": 300,
    }
}


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: PARTITIONS, names.dlq_topic: 1})
    return names


def consumed(result: str) -> float:
    return metric_total("eventsched_events_consumed_total", result=result)


def assert_scheduled_once(redis_url: str, queue: str, events: list[Event]) -> None:
    """One pending job per event, keyed by its id, scheduled at its due time (ms)."""
    schedule = saq_schedule(redis_url, queue)
    assert len(schedule) == len(events)
    for event in events:
        assert schedule[str(event.id)] == pytest.approx(event.execute_at.timestamp(), abs=1e-3)


def assert_recorded_once(dsn: str, events: list[Event]) -> None:
    rows = query(dsn, "SELECT id, idempotency_key, type, payload, execute_at, status FROM events")
    assert len(rows) == len(events)
    by_id = {row[0]: row for row in rows}
    for event in events:
        row = by_id[event.id]
        assert row[1:] == (
            event.idempotency_key,
            event.type,
            event.payload,
            event.execute_at,
            "scheduled",
        )


# -- the happy path and duplicates -------------------------------------------------------


async def test_events_are_recorded_scheduled_and_committed(
    make_settings: Any,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    events = make_events(300)
    positions = await trio.to_thread.run_sync(
        produce, kafka_bootstrap, topics.topic, [event_message(e) for e in events]
    )
    new_before = consumed("new")

    async with running(make_settings(consumer={"max_batch": 100}), ["consumer"]):
        await rows_reach(database, len(events))

    assert_recorded_once(database, events)
    assert_scheduled_once(redis_url, topics.queue, events)
    # Kafka coordinates are recorded, and every offset is committed.
    coordinates = query(
        database, "SELECT id, kafka_topic, kafka_partition, kafka_offset FROM events"
    )
    expected = {e.id: (topics.topic, *pos) for e, pos in zip(events, positions, strict=True)}
    assert {row[0]: row[1:] for row in coordinates} == expected
    ends: dict[int, int] = {}
    for partition, offset in positions:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert await trio.to_thread.run_sync(
        committed_offsets, kafka_bootstrap, topics.group, topics.topic
    ) == {p: ends.get(p, -1001) for p in range(PARTITIONS)}
    assert consumed("new") - new_before == len(events)


async def test_redelivery_and_conflicting_keys_keep_the_first_event_and_one_job(
    make_settings: Any,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    events = make_events(100)
    # A crashed run recorded these in PostgreSQL but never enqueued their jobs.
    orphans = make_events(20, start=100)
    await _insert_directly(database, topics.topic, orphans)
    first = new_event(
        "conflict.test",
        {"v": 1},
        datetime.now(UTC) + timedelta(hours=1),
        idempotency_key="same-key",
    )
    second = new_event(
        "conflict.test",
        {"v": 2},
        datetime.now(UTC) + timedelta(hours=2),
        idempotency_key="same-key",
    )
    later = new_event(
        "conflict.test",
        {"v": 3},
        datetime.now(UTC) + timedelta(hours=3),
        idempotency_key="same-key",
    )
    new_before, dup_before = consumed("new"), consumed("duplicate")
    batch_one = [event_message(e) for e in [*events, *orphans, first, second]]
    await trio.to_thread.run_sync(produce, kafka_bootstrap, topics.topic, batch_one)

    with capture_logs() as logs:
        async with running(make_settings(), ["consumer"]):
            await rows_reach(database, 121)
            # The same messages again, and a third event under the taken key.
            again = [event_message(e) for e in [*events, later]]
            await trio.to_thread.run_sync(produce, kafka_bootstrap, topics.topic, again)

            async def all_seen() -> bool:
                return consumed("duplicate") - dup_before >= 20 + 1 + 100 + 1

            await wait_until(all_seen)

    assert_recorded_once(database, [*events, *orphans, first])
    assert_scheduled_once(redis_url, topics.queue, [*events, *orphans, first])
    # Every job names its event's partition day, the new events' from the insert and the
    # orphans' from the lookup of their keys (the executor's claim takes it as a hint).
    days = query(database, "SELECT id::text, (retain_from AT TIME ZONE 'UTC')::date FROM events")
    hints = saq_kwargs(redis_url, topics.queue)
    assert {key: kwargs.get("day") for key, kwargs in hints.items()} == {
        event_id: day.isoformat() for event_id, day in days
    }
    # ... and its payload's size, as the executor's payload budget counts it (SAQ's meta).
    payloads = query(database, "SELECT id::text, payload FROM events")
    records = saq_records(redis_url, topics.queue)
    assert {key: record.get("meta", {}).get("size") for key, record in records.items()} == {
        event_id: payload_bytes(payload) for event_id, payload in payloads
    }
    assert consumed("new") - new_before == 101
    assert consumed("duplicate") - dup_before == 122
    conflicts = [line for line in logs if line["event"] == "conflicting_duplicate"]
    assert [(c["kept_id"], c["dropped_id"]) for c in conflicts] == [
        (str(first.id), str(second.id)),
        (str(first.id), str(later.id)),
    ]
    assert all(
        c["log_level"] == "warning" and c["idempotency_key"] == "same-key" for c in conflicts
    )


async def test_the_first_of_two_conflicting_messages_wins_across_parallel_batches(
    make_settings: Any, topics: Names, database: str, kafka_bootstrap: str, clean_queue: str
) -> None:
    """Batches are recorded two at a time; their INSERTs must still run in fetch order, or
    a later, quick-to-decode batch would take a key before an earlier, slow one. One
    partition, max_batch 10: batches alternate between ten big first messages and ten small
    conflicting second ones for the same keys."""
    due = datetime.now(UTC) + timedelta(hours=1)
    firsts: list[Event] = []
    messages = []
    for block in range(6):
        keys = [f"race-{block}-{i}" for i in range(10)]
        big = [
            new_event("race.test", {"blob": "x" * 50_000, "i": i}, due, idempotency_key=k)
            for i, k in enumerate(keys)
        ]
        small = [
            new_event("race.test", {"i": i}, due, idempotency_key=k) for i, k in enumerate(keys)
        ]
        firsts += big
        messages += [event_message(e, partition=0) for e in [*big, *small]]
    await trio.to_thread.run_sync(produce, kafka_bootstrap, topics.topic, messages)

    with capture_logs() as logs:
        async with running(make_settings(consumer={"max_batch": 10}), ["consumer"]):
            await rows_reach(database, len(firsts))

            async def all_seen() -> bool:
                return sum(line["event"] == "conflicting_duplicate" for line in logs) >= 60

            await wait_until(all_seen)

    assert_recorded_once(database, firsts)
    kept = {line["kept_id"] for line in logs if line["event"] == "conflicting_duplicate"}
    assert kept == {str(e.id) for e in firsts}


async def _insert_directly(dsn: str, topic: str, events: list[Event]) -> None:
    import trio_asyncio

    async with trio_asyncio.open_loop():
        db = await Database.open(dsn)
        try:
            rows = [IngestRow(e, topic, 0, 10_000 + i) for i, e in enumerate(events)]
            assert len(await eventstore.insert_events(db, rows)) == len(events)
        finally:
            await db.close()


# -- bad input ---------------------------------------------------------------------------


async def test_bad_messages_go_to_the_dlq_with_their_reason_and_good_ones_around_them_are_recorded(
    make_settings: Any,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    limits = DecodeLimits(max_message_bytes=64 * 1024)
    corpus = load_corpus(datetime.now(UTC), limits)
    bad = [case for case in corpus if case.expect != "ok"]
    # Accepted corpus shapes (v1, Go, late...); several share an id, keep one of each.
    good_cases = list(
        {
            decode_event(c.value, now=datetime.now(UTC), limits=limits).id: c
            for c in reversed(corpus)
            if c.expect == "ok"
        }.values()
    )
    good = make_events(len(bad) + 1)
    # Valid JSON, but its id already belongs to another event: PostgreSQL refuses the row.
    stolen_id = Event(good[0].id, "another-key", "t", {}, good[0].execute_at, good[0].created_at)
    messages: list[RawMessage] = []
    expected: list[tuple[bytes | None, str, dict[str, bytes]]] = []
    for event, case in zip(good, bad, strict=False):
        messages.append(event_message(event, partition=0))
        messages.append(RawMessage(case.value, None, list(case.headers.items()) or None, 0))
        expected.append((case.value, case.expect, case.headers))
    messages.append(event_message(good[-1], partition=0))
    messages += [RawMessage(case.value, None, None, 0) for case in good_cases]
    stolen = encode_event(stolen_id)
    messages.append(RawMessage(stolen, b"another-key", kafka_headers(), 0))
    expected.append((stolen, "db_rejected", dict(kafka_headers())))
    invalid_before = consumed("invalid")
    positions = await trio.to_thread.run_sync(produce, kafka_bootstrap, topics.topic, messages)
    offsets = {m.value: pos[1] for m, pos in zip(messages, positions, strict=True)}
    settings = make_settings(consumer={"max_message_bytes": limits.max_message_bytes})

    async with running(settings, ["consumer"]):
        await rows_reach(database, len(good) + len(good_cases))

        async def dead_lettered() -> bool:
            return consumed("invalid") - invalid_before >= len(expected)

        await wait_until(dead_lettered)

    assert count_rows(database) == len(good) + len(good_cases)
    dlq = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topics.dlq_topic)
    assert len(dlq) == len(expected)
    for record, (value, reason, original_headers) in zip(dlq, expected, strict=True):
        assert (record.value or None, record.headers["dlq-reason"]) == (
            value or None,
            reason.encode(),
        )
        assert record.headers["source-topic"] == topics.topic.encode()
        assert record.headers["source-partition"] == b"0"
        assert record.headers["source-offset"] == str(offsets[value]).encode()
        assert {
            "dlq-error",
            "source-timestamp",
            "consumer-id",
            "failed-at",
        } <= record.headers.keys()
        for name, header in original_headers.items():
            assert record.headers[name] == header
    assert b"another-key" in {r.key for r in dlq}
    assert len(saq_schedule(redis_url, topics.queue)) == len(good) + len(good_cases)


# -- failures ----------------------------------------------------------------------------


def _wait(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.HTTPError:
        return 0, {}
    return response.status_code, response.json()


def test_postgres_outage_pauses_ingest_without_loss_or_dlq_and_resumes(
    tmp_path: Path, names: Names, redis_url: str, kafka_bootstrap: str, clean_queue: str
) -> None:
    ensure_topics(kafka_bootstrap, {names.topic: PARTITIONS, names.dlq_topic: 1})
    server = PostgresServer(tmp_path / "pg", fast=True)
    server.start()
    app = None
    try:
        with psycopg.connect(server.admin_conninfo(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE ingest")
        dsn = server.admin_conninfo("ingest")
        migrations.up(dsn, migrations.default_sql_dir())
        settings = write_settings(
            tmp_path / "settings.toml",
            child_sections(
                names,
                dsn,
                redis_url,
                kafka_bootstrap,
                consumer={"backoff_max": "500ms"},
                postgres={"connect_timeout": "1s"},
            ),
        )
        app = start_role(settings)
        port = app.wait_event("http_listening")["port"]
        wait_assigned(app)
        events = make_events(300)
        produce(kafka_bootstrap, names.topic, [event_message(e) for e in events[:150]])
        _wait(lambda: count_rows(dsn) == 150, what="first half recorded")
        assert _readyz(port)[0] == 200

        server.stop()
        produce(kafka_bootstrap, names.topic, [event_message(e) for e in events[150:]])
        _wait(lambda: "postgres" in _readyz(port)[1].get("failing", []), what="readyz 503")
        status, body = _readyz(port)
        assert status == 503 and body["dependencies"]["postgres"] != "ok"
        app.wait_event("dependency_retry")
        server.start()

        _wait(lambda: count_rows(dsn) == 300, what="second half recorded")
        _wait(lambda: _readyz(port)[0] == 200, what="readyz 200 again")
        assert app.stop() == 0
        assert_recorded_once(dsn, events)
    finally:
        if app is not None:
            app.kill()
        server.stop()
    assert_scheduled_once(redis_url, names.queue, events)
    assert read_topic(kafka_bootstrap, names.dlq_topic) == []
    ends = _ends(kafka_bootstrap, names.topic)
    assert committed_offsets(kafka_bootstrap, names.group, names.topic) == ends


def _ends(bootstrap: str, topic: str) -> dict[int, int]:
    ends = {p: -1001 for p in range(PARTITIONS)}
    for record in read_topic(bootstrap, topic):
        ends[record.partition] = record.offset + 1
    return ends


class _Trickle:
    """Produce events in small chunks from a thread, so that consumers work mid-stream."""

    def __init__(self, bootstrap: str, topic: str, events: list[Event], chunk: int = 100) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(bootstrap, topic, events, chunk), daemon=True
        )
        self.error: BaseException | None = None
        self._thread.start()

    def _run(self, bootstrap: str, topic: str, events: list[Event], chunk: int) -> None:
        try:
            for start in range(0, len(events), chunk):
                produce(bootstrap, topic, [event_message(e) for e in events[start : start + chunk]])
                time.sleep(0.05)
        except BaseException as err:  # reported by join()
            self.error = err

    def join(self) -> None:
        self._thread.join(60)
        assert self.error is None, self.error


def _crash_settings(
    tmp_path: Path, topics: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> Path:
    """The consumer children of the crash and rebalance tests: small batches, quick group."""
    return write_settings(
        tmp_path / "settings.toml",
        child_sections(
            topics,
            database,
            redis_url,
            kafka_bootstrap,
            consumer={"max_batch": 50},
            kafka=QUICK_GROUP,
        ),
    )


def test_kill_9_mid_stream_then_restart_records_and_schedules_everything_once(
    tmp_path: Path,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    settings = _crash_settings(tmp_path, topics, database, redis_url, kafka_bootstrap)
    events = make_events(2000)
    first = start_role(settings)
    second = None
    try:
        wait_assigned(first)
        trickle = _Trickle(kafka_bootstrap, topics.topic, events)
        _wait(lambda: count_rows(database) >= 300, what="some events recorded")
        first.kill()
        assert count_rows(database) < len(events), "the stream was over before the kill"
        trickle.join()

        second = start_role(settings)
        _wait(lambda: count_rows(database) == len(events), timeout=40, what="all recorded")
        _wait(
            lambda: (
                committed_offsets(kafka_bootstrap, topics.group, topics.topic)
                == _ends(kafka_bootstrap, topics.topic)
            ),
            what="everything committed",
        )
        assert second.stop() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert_recorded_once(database, events)
    assert_scheduled_once(redis_url, topics.queue, events)


def test_three_consumers_share_partitions_survive_a_leaver_and_shut_down_cleanly(
    tmp_path: Path,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    settings = _crash_settings(tmp_path, topics, database, redis_url, kafka_bootstrap)
    events = make_events(1500)
    apps = [start_role(settings) for _ in range(3)]
    restarted = None
    try:
        ports = [app.wait_event("http_listening")["port"] for app in apps]

        def owners() -> list[int]:
            return [len(_assignment(app)) for app in apps]

        _wait(lambda: owners() == [1, 1, 1], what="one partition each")
        trickle = _Trickle(kafka_bootstrap, topics.topic, events)
        _wait(lambda: count_rows(database) >= 200, what="some events recorded")
        # One member leaves under load: SIGTERM drains its batch, commits and exits 0.
        apps[2].proc.send_signal(signal.SIGTERM)
        assert apps[2].wait() == 0, "".join(apps[2].raw[-30:])
        trickle.join()
        _wait(lambda: count_rows(database) == len(events), timeout=40, what="all recorded")
        ends = _ends(kafka_bootstrap, topics.topic)
        _wait(
            lambda: committed_offsets(kafka_bootstrap, topics.group, topics.topic) == ends,
            what="everything committed",
        )
        consumed_by_each = [
            metric_sum(scrape(p), "eventsched_events_consumed_total", result="new")
            for p in ports[:2]
        ]
        assert all(n > 0 for n in consumed_by_each)
        # Every rebalance let the batches in flight commit first: nothing was read twice.
        assert [
            metric_sum(scrape(p), "eventsched_events_consumed_total", result="duplicate")
            for p in ports[:2]
        ] == [0, 0]

        # A restarted third member starts from the committed offsets: nothing is read again.
        restarted = start_role(settings)
        port = restarted.wait_event("http_listening")["port"]
        members = [apps[0], apps[1], restarted]
        _wait(
            lambda: sorted(len(_assignment(app)) for app in members) == [1, 1, 1],
            what="one partition each again",
        )
        time.sleep(1.0)
        assert metric_sum(scrape(port), "eventsched_consumer_batch_messages_count") == 0
        # (All stop together: Tansu often stalls a rebalance that follows a leave closely.)
        for app in members:
            app.proc.send_signal(signal.SIGTERM)
        assert [app.wait() for app in members] == [0, 0, 0]
    except BaseException:
        _dump([*apps, restarted])
        raise
    finally:
        for app in apps:
            app.kill()
        if restarted is not None:
            restarted.kill()
        import os

        if os.environ.get("DUMP"):
            for app in [*apps, restarted]:
                if app is not None:
                    print("=====", "".join(x for x in app.raw if "CONFWARN" not in x)[-6000:])
    assert_recorded_once(database, events)
    assert_scheduled_once(redis_url, topics.queue, events)


def _dump(apps: list[Any]) -> None:
    """Print the children's log lines (librdkafka's config warnings left out)."""
    for app in apps:
        if app is not None:
            print("=====", "".join(x for x in app.raw if "CONFWARN" not in x)[-8000:])


def _assignment(app: Any) -> set[tuple[str, int]]:
    """A child's current partitions, from its assigned/revoked log lines."""
    owned: set[tuple[str, int]] = set()
    for line in list(app.lines):
        if line.get("event") == "kafka_partitions_assigned":
            owned |= {tuple(p) for p in line["partitions"]}
        elif line.get("event") in ("kafka_partitions_revoked", "kafka_partitions_lost"):
            owned -= {tuple(p) for p in line["partitions"]}
    return owned
