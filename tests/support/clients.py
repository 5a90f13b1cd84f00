"""One-shot blocking reads and writes against the servers, shared by the tests and bench/.

PostgreSQL queries, a whole Kafka topic read back, a test's SAQ keys removed from Redis, and
the Kafka group timings that make joins quick on Tansu. Every function opens its own client
and closes it; async tests call them with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from confluent_kafka import Consumer, KafkaError, TopicPartition

#: Kafka consumer settings for quick group joins on Tansu (its defaults make a join take
#: 20+ s: it finishes a join after about session.timeout.ms / 2). Measured: a 3 or 4 s
#: session joins in about 2 s, a 5 or 6 s one in about 3 s. 4 s (eight heartbeats) is what a
#: member may go unheard before it is evicted.
FAST_GROUP_CONFIG: Mapping[str, int] = {
    "session.timeout.ms": 4000,
    "heartbeat.interval.ms": 500,
    "max.poll.interval.ms": 10000,
}


# -- PostgreSQL ------------------------------------------------------------------------------


def query(
    dsn: str,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    connect_timeout: float | None = None,
) -> list[Any]:
    """The rows of one statement, autocommitted (none for a statement without a result)."""
    extra = {} if connect_timeout is None else {"connect_timeout": connect_timeout}
    with psycopg.connect(dsn, autocommit=True, **extra) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def status_counts(dsn: str) -> dict[str, int]:
    """Events per status."""
    return {s: int(n) for s, n in query(dsn, "SELECT status, count(*) FROM events GROUP BY status")}


# -- Kafka -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    timestamp_ms: int
    header_list: list[tuple[str, bytes | None]]  # as sent: in order, repeated names kept


def read_topic(bootstrap: str, topic: str, *, timeout: float = 15.0) -> list[ReadRecord]:
    """Every record of ``topic`` (all partitions, from the beginning), by partition/offset.

    The end of a partition is its EOF event, not its high watermark: Tansu's
    ListOffsets(latest) answers the last batch's base offset + 1.
    """
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
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
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
                headers = list(message.headers() or [])
                records.append(
                    ReadRecord(
                        partition=message.partition(),
                        offset=message.offset(),
                        key=message.key(),
                        value=message.value(),
                        headers=dict(headers),
                        timestamp_ms=message.timestamp()[1],
                        header_list=headers,
                    )
                )
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


# -- Redis -----------------------------------------------------------------------------------


def delete_queue_keys(redis_url: str, queue: str) -> None:
    """Remove every SAQ key of ``queue`` (jobs, schedule, stats, aborts)."""
    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in (f"saq:{queue}:*", f"saq:job:{queue}:*", f"saq:abort:{queue}*"):
            keys = list(client.scan_iter(match=pattern, count=5000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
    finally:
        client.close()
