"""Helpers for the ingest tests: put messages into Kafka, look at what came out.

Blocking helpers (confluent-kafka, psycopg, redis) are plain functions; async tests call
them with ``trio.to_thread.run_sync``. Reading a topic back, queries and waiting are in
``tests.support.clients`` and ``tests.support.waiting``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import trio
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.runtime.root import Runtime
from eventsched.core.runtime.settings import Settings
from tests.support.clients import query
from tests.support.proc import AppProcess
from tests.support.servers import Names, service_sections
from tests.support.waiting import wait_until


@dataclass(frozen=True)
class RawMessage:
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes | None]] | None = None
    partition: int | None = None


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


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (-1001 when none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        answer = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in answer}
    finally:
        consumer.close()


def commit_offsets(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit these offsets (partition -> offset) for the group, as a member that read up
    to them would have."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False
        )
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


def saq_kwargs(redis_url: str, queue: str) -> dict[str, dict[str, Any]]:
    """Job key -> the kwargs of its stored job, for every job pending in the queue."""
    return {key: record["kwargs"] for key, record in saq_records(redis_url, queue).items()}


def saq_records(redis_url: str, queue: str) -> dict[str, dict[str, Any]]:
    """Job key -> its stored job record (SAQ's job dict), for every job pending in the queue."""
    client = redis.Redis.from_url(redis_url)
    try:
        prefix = f"saq:job:{queue}:"
        members = [m.decode() for m in client.zrange(f"saq:{queue}:incomplete", 0, -1)]
        records = client.mget(members) if members else []
        return {
            member[len(prefix) :]: json.loads(record)
            for member, record in zip(members, records, strict=True)
            if record is not None
        }
    finally:
        client.close()


def count_rows(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM events")[0][0])


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


@asynccontextmanager
async def running_consumer(settings: Settings) -> AsyncIterator[int]:
    """The consumer role run as :func:`running` does; yields the port of its /readyz and
    /metrics (asked for as 0: a real loopback port by then)."""
    async with running(settings, ["consumer"]) as runtime:
        port = runtime.bound_port
        assert port is not None and port > 0  # a real loopback port, not 0
        yield port


# -- child processes ---------------------------------------------------------------------


def child_sections(
    names: Names, database: str, redis_url: str, kafka_bootstrap: str, **extra: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The settings of a child process for this test's database, queue and topics."""
    sections: dict[str, dict[str, Any]] = {
        **service_sections(names, database, redis_url, kafka_bootstrap),
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
