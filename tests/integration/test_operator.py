"""Operator commands against the real stack: ``send``, ``status``, ``dlq list``, ``dlq replay``.

The commands run in-process through click's test runner (the same entry point as the
console script) with a ``--settings`` file pointing at this test's database, queue and
topics; the state they report on is written directly into PostgreSQL, Redis and Kafka.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import redis

from eventsched.core.domain.deadletter import dlq_headers
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.status import StatusReport, render_status
from tests.support.cli import run
from tests.support.clients import delete_queue_keys, read_topic
from tests.support.eventkeys import REGISTER_KEYS
from tests.support.ingest import (
    RawMessage,
    child_sections,
    commit_offsets,
    make_events,
    produce,
)
from tests.support.proc import free_port
from tests.support.servers import Names
from tests.support.settingsfile import write_settings


@pytest.fixture
def stack(
    tmp_path: Path, names: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> Iterator[Path]:
    """A settings file for this test's database, queue and topics (3 partitions each)."""
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 3})
    yield write_settings(
        tmp_path / "settings.toml", child_sections(names, database, redis_url, kafka_bootstrap)
    )
    delete_queue_keys(redis_url, names.queue)


# -- send ------------------------------------------------------------------------------


def test_send_publishes_one_event_and_prints_its_id(
    stack: Path, names: Names, kafka_bootstrap: str
) -> None:
    result = run(stack, "send", "--type", "invoice.due", "--in", "5m", "--payload", '{"n": 1}',
                 "--key", "invoice-42")  # fmt: skip

    assert result.exit_code == 0, result.output
    (record,) = read_topic(kafka_bootstrap, names.topic)
    now = datetime.now(UTC)
    event = decode_event(record.value, now=now, limits=DecodeLimits(), headers=record.headers)
    assert result.stdout == f"{event.id}\n"
    assert (event.type, event.payload, event.idempotency_key) == (
        "invoice.due",
        {"n": 1},
        "invoice-42",
    )
    assert record.key == b"invoice-42"
    assert record.headers == dict(kafka_headers())
    assert now + timedelta(minutes=4) < event.execute_at <= now + timedelta(minutes=5)


def test_send_at_an_absolute_time_with_an_offset(
    stack: Path, names: Names, kafka_bootstrap: str
) -> None:
    local = datetime.now(timezone(timedelta(hours=1))).replace(microsecond=250_000)
    due = local + timedelta(days=2)
    result = run(stack, "send", "--type", "t", "--at", due.isoformat())

    assert result.exit_code == 0, result.output
    (record,) = read_topic(kafka_bootstrap, names.topic)
    event = decode_event(record.value, now=datetime.now(UTC), limits=DecodeLimits())
    assert event.execute_at == due.astimezone(UTC)
    assert event.payload == {}


# -- status ------------------------------------------------------------------------------


def test_status_reports_every_section(
    stack: Path, names: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> None:
    now = datetime.now(UTC)
    overdue, future, done = make_events(3)
    with psycopg.connect(database, autocommit=True) as conn:
        for event, due, status in [
            (overdue, now - timedelta(minutes=2), "scheduled"),
            (future, now + timedelta(hours=1), "scheduled"),
            (done, now - timedelta(hours=1), "succeeded"),
        ]:
            conn.execute(
                "INSERT INTO events (id, idempotency_key, type, payload, execute_at, status,"
                " created_at) VALUES (%s, %s, %s, '{}', %s, %s, now())",
                (event.id, event.idempotency_key, event.type, due, status),
            )
            conn.execute(REGISTER_KEYS)
    client = redis.Redis.from_url(redis_url)
    client.zadd(f"saq:{names.queue}:incomplete", {"a": now.timestamp() + 60, "b": 0})
    client.rpush(f"saq:{names.queue}:queued", "b")
    client.close()
    # Five events on partition 0 of which the group committed two; two DLQ messages.
    messages = [RawMessage(encode_event(e), kafka_key(e), None, 0) for e in make_events(5)]
    produce(kafka_bootstrap, names.topic, messages)
    commit_offsets(kafka_bootstrap, names.group, names.topic, {0: 2})
    produce(kafka_bootstrap, names.dlq_topic, [RawMessage(b"x"), RawMessage(b"y")])

    result = run(stack, "status", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["events"]["by_status"] == {
        "scheduled": 2, "running": 0, "retrying": 0, "succeeded": 1, "dead": 0,
        "cancelled": 0,
    }  # fmt: skip
    oldest = report["events"]["oldest_overdue"]
    assert oldest["id"] == str(overdue.id)
    assert 120 <= oldest["overdue_seconds"] < 180
    assert report["queue"] == {"name": names.queue, "queued": 1, "scheduled": 1, "active": 0}
    kafka = report["kafka"]
    assert kafka["lag"]["0"] == {"committed": 2, "high_watermark": 5, "lag": 3}
    assert kafka["lag"]["1"]["lag"] == kafka["lag"]["2"]["lag"] == 0
    assert (kafka["total_lag"], kafka["dlq_size"]) == (3, 2)

    human = run(stack, "status")
    assert human.exit_code == 0
    for line in ["EVENTS (PostgreSQL)", "  scheduled             2", "total lag 3",
                 f"DLQ {names.dlq_topic}: 2 messages", f"oldest overdue: {overdue.id}"]:  # fmt: skip
        assert line in human.stdout


def test_status_names_unreachable_dependencies_and_exits_1(
    tmp_path: Path, names: Names, kafka_bootstrap: str
) -> None:
    sections = child_sections(
        names,
        f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
        f"redis://127.0.0.1:{free_port()}/0",
        kafka_bootstrap,
    )
    settings = write_settings(tmp_path / "down.toml", sections)

    result = run(settings, "status", "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["events"]["error"].startswith("postgres unavailable")
    assert report["queue"]["error"].startswith("redis unavailable")
    assert report["kafka"]["error"] == f"kafka unavailable: topic {names.topic} does not exist"
    human = render_status(StatusReport(**report))
    assert human.count("unavailable:") == 3


# -- dlq -------------------------------------------------------------------------------


def _dead_letter(value: bytes, reason: str, offset: int, key: bytes | None) -> RawMessage:
    original = [*kafka_headers(), ("trace-id", b"t-1")]
    headers = dlq_headers(
        reason=reason,
        error=f"{reason} detail",
        source_topic="events",
        source_partition=1,
        source_offset=offset,
        source_timestamp_ms=1_700_000_000_000,
        consumer_id="host:1",
        failed_at=datetime.now(UTC),
        original=original,
    )
    return RawMessage(value, key, headers, 0)


def test_dlq_list_and_replay_with_remembered_progress(
    stack: Path, names: Names, kafka_bootstrap: str
) -> None:
    dead = [
        _dead_letter(b"{not json", "invalid_json", 10, b"k-10"),
        _dead_letter(b'{"id": 1}', "invalid_field", 11, None),
        _dead_letter(b"[oops", "invalid_json", 12, b"k-12"),
    ]
    produce(kafka_bootstrap, names.dlq_topic, dead)

    listed = run(stack, "dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    entries = json.loads(listed.stdout)
    assert [(e["offset"], e["reason"], e["key"], e["preview"]) for e in entries] == [
        (0, "invalid_json", "k-10", "{not json"),
        (1, "invalid_field", None, '{"id": 1}'),
        (2, "invalid_json", "k-12", "[oops"),
    ]
    assert entries[0]["source"] == "events/1@10" and entries[0]["error"] == "invalid_json detail"
    assert "reason=invalid_json" in run(stack, "dlq", "list", "--limit", "1").stdout

    def replay(*args: str) -> str:
        result = run(stack, "dlq", "replay", *args)
        assert result.exit_code == 0, result.output
        head, *reasons = result.stdout.splitlines()
        return str(head.split(" (group")[0]) + "".join(f" |{r.strip()}" for r in reasons)

    assert (
        replay("--reason", "invalid_json", "--dry-run")
        == "would re-run 0, would re-send 2, would skip 1 |1 dlq-reason is not invalid_json"
    )
    assert read_topic(kafka_bootstrap, names.topic) == []
    assert replay("--reason", "invalid_json", "--limit", "1") == "re-run 0, re-sent 1, skipped 0"
    assert (
        replay("--reason", "invalid_json")
        == "re-run 0, re-sent 1, skipped 1 |1 dlq-reason is not invalid_json"
    )
    assert replay("--reason", "invalid_json") == "re-run 0, re-sent 0, skipped 0"
    # Its own progress, without a filter.
    assert replay() == "re-run 0, re-sent 3, skipped 0"

    replayed = read_topic(kafka_bootstrap, names.topic)
    assert sorted((r.value, r.key) for r in replayed) == sorted(
        [(b"{not json", b"k-10"), (b"[oops", b"k-12")] * 2 + [(b'{"id": 1}', None)]
    )
    for record in replayed:  # the original headers, none of the DLQ's
        assert record.headers == {**dict(kafka_headers()), "trace-id": b"t-1"}


def test_dlq_list_of_an_empty_dlq(stack: Path) -> None:
    result = run(stack, "dlq", "list")
    assert (result.exit_code, result.stdout) == (0, "DLQ is empty\n")
