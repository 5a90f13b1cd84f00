"""Helpers for the ingest tests: put messages into Kafka, look at what came out.

Blocking helpers (confluent-kafka, psycopg, redis) are plain functions; async tests call
them with ``trio.to_thread.run_sync``. Reading a topic uses ``assign()`` and partition EOF
rather than watermarks: Tansu's ListOffsets(latest) answers the last batch's base offset
+ 1, not the end of the partition.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis
import trio
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.runtime.root import Runtime
from eventsched.core.runtime.settings import Settings
from tests.support.proc import AppProcess
from tests.support.servers import FAST_GROUP_CONFIG, Names


@dataclass(frozen=True)
class RawMessage:
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes | None]] | None = None
    partition: int | None = None


@dataclass(frozen=True)
class ReadRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    timestamp_ms: int


def make_events(
    count: int, *, type: str = "test.event", due_in: float = 600.0, start: int = 0
) -> list[Event]:
    """``count`` v1 events due ``due_in`` s from now (ms apart), payload {"n": i}."""
    now = datetime.now(UTC)
    return [
        new_event(type, {"n": i}, now + timedelta(seconds=due_in, milliseconds=i))
        for i in range(start, start + count)
    ]


def event_message(event: Event, partition: int | None = None) -> RawMessage:
    return RawMessage(encode_event(event), kafka_key(event), kafka_headers(), partition)


def produce(bootstrap: str, topic: str, messages: Iterable[RawMessage]) -> list[tuple[int, int]]:
    """Send and wait for every delivery; returns (partition, offset) per message, in order."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    results: list[tuple[int, int] | None] = []
    errors: list[str] = []

    def on_delivery(index: int, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            results[index] = (msg.partition(), msg.offset())

    for index, message in enumerate(messages):
        results.append(None)
        kwargs: dict[str, Any] = {"value": message.value, "key": message.key}
        if message.headers is not None:
            kwargs["headers"] = list(message.headers)
        if message.partition is not None:
            kwargs["partition"] = message.partition
        while True:
            try:
                producer.produce(
                    topic, on_delivery=lambda e, m, i=index: on_delivery(i, e, m), **kwargs
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(30)
    assert not errors, errors[:3]
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def read_topic(bootstrap: str, topic: str, *, timeout: float = 15.0) -> list[ReadRecord]:
    """Every record of ``topic`` (all partitions, from the beginning), by partition/offset."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        done: set[int] = set()
        records: list[ReadRecord] = []
        deadline = time.monotonic() + timeout
        while len(done) < len(partitions):
            assert time.monotonic() < deadline, f"{topic}: no EOF on {set(partitions) - done}"
            for message in consumer.consume(1000, 0.2):
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error.str()
                    done.add(message.partition())
                    continue
                done.discard(message.partition())
                records.append(
                    ReadRecord(
                        partition=message.partition(),
                        offset=message.offset(),
                        key=message.key(),
                        value=message.value(),
                        headers=dict(message.headers() or []),
                        timestamp_ms=message.timestamp()[1],
                    )
                )
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (-1001 when none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        answer = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in answer}
    finally:
        consumer.close()


def saq_schedule(redis_url: str, queue: str) -> dict[str, float]:
    """Job key -> score in the queue's ``incomplete`` zset (the due time while scheduled)."""
    client = redis.Redis.from_url(redis_url)
    try:
        prefix = f"saq:job:{queue}:"
        entries = client.zrange(f"saq:{queue}:incomplete", 0, -1, withscores=True)
        return {member.decode()[len(prefix) :]: score for member, score in entries}
    finally:
        client.close()


def delete_queue_keys(redis_url: str, queue: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in (f"saq:{queue}:*", f"saq:job:{queue}:*"):
            keys = list(client.scan_iter(match=pattern, count=5000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
    finally:
        client.close()


def query(dsn: str, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def count_rows(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM events")[0][0])


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, limit: float = 20.0, interval: float = 0.1
) -> None:
    """Poll ``check`` until true (the state lives in other processes: no event to wait on)."""
    with trio.fail_after(limit):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(interval)


async def rows_reach(dsn: str, count: int, *, limit: float = 20.0) -> None:
    async def check() -> bool:
        return await trio.to_thread.run_sync(count_rows, dsn) >= count

    await wait_until(check, limit=limit, interval=0.2)


@asynccontextmanager
async def running(settings: Settings, roles: Sequence[str]) -> AsyncIterator[Runtime]:
    """Run roles in this process; yields once they are ready; stops them (drained) on exit."""
    runtime = Runtime(settings, list(roles), port=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runtime.run)
        with trio.fail_after(30):
            await runtime.all_ready.wait()
        try:
            yield runtime
        finally:
            runtime.request_stop()


# -- child processes ---------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_settings(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """A settings file for ``--settings`` (``[default.<section>]`` tables, nested dicts as
    sub-tables, keys quoted so that ``session.timeout.ms`` stays one key)."""
    lines: list[str] = []

    def table(name: str, values: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        for key, value in values.items():
            if key not in nested:
                lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
        for key, value in nested.items():
            table(f"{name}.{json.dumps(key)}", value)

    for section, values in sections.items():
        table(f"default.{section}", values)
    path.write_text("\n".join(lines) + "\n")
    return path


def child_sections(
    names: Names, database: str, redis_url: str, kafka_bootstrap: str, **extra: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The settings of a child process for this test's database, queue and topics."""
    sections: dict[str, dict[str, Any]] = {
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "topic": names.topic,
            "dlq_topic": names.dlq_topic,
            "consumer_group": names.group,
            "consumer_client": dict(FAST_GROUP_CONFIG),
        },
        "postgres": {"dsn": database},
        "redis": {"url": redis_url, "queue": names.queue},
        "shutdown": {"grace": "5s"},
        "logging": {"format": "json"},
    }
    for section, values in extra.items():
        sections[section] = {**sections.get(section, {}), **values}
    return sections


def start_role(settings_file: Path, role: str = "consumer") -> AppProcess:
    return AppProcess(["--settings", str(settings_file), "run", "--role", role, "--port", "0"])


def wait_assigned(app: AppProcess, timeout: float = 30.0) -> dict[str, Any]:
    return app.wait_event("kafka_partitions_assigned", timeout)
