"""Dead-letter copies always fit, an undeliverable one is kept in PostgreSQL, and a
dead-letter path that keeps failing shows on ``/readyz`` and in ``eventsched_role_stalled``.

Real roles (the runtime in this process) against real PostgreSQL, Redis and Tansu. A
per-message failure must never stop a partition: after each bad message comes a valid
event, which must be recorded and its offset committed.

"The dead-letter producer cannot deliver while the broker answers" is set up with
``kafka.client`` ``bootstrap.servers``: that key reaches the shared producer, while the
consumer and the readiness probe keep using ``kafka.bootstrap_servers``. Nothing listens on
the producer's port until the test starts a broker there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from confluent_kafka import KafkaError, Producer

from eventsched.core.domain.deadletter import fit_dead_letter
from eventsched.core.domain.jobcontract import make_job, saq_timeout
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.devbrokers import KafkaBroker
from eventsched.core.runtime.root import Runtime
from tests.support.clients import delete_queue_keys, query, read_topic
from tests.support.dlq import our_headers
from tests.support.execution import insert_events, new_events, queue_client
from tests.support.ingest import (
    RawMessage,
    committed_offsets,
    event_message,
    make_events,
    rows_reach,
    running,
)
from tests.support.metrics import metric_value
from tests.support.proc import free_port
from tests.support.servers import Names
from tests.support.waiting import wait_until

BIG = 1_000_000


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names, redis_url: str) -> Iterator[Names]:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    yield names
    delete_queue_keys(redis_url, names.queue)


def produce_big(bootstrap: str, topic: str, messages: Sequence[RawMessage]) -> list[int]:
    """Like the ingest helper, with a client that may send messages of a few MB."""
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10_000_000})
    offsets: list[int] = []
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            offsets.append(msg.offset())

    for m in messages:
        producer.produce(
            topic, value=m.value, key=m.key, headers=list(m.headers or []), on_delivery=on_delivery
        )
        producer.flush(30)
    assert not errors, errors
    return offsets


# -- item 1 through the consumer role --------------------------------------------------------


@pytest.mark.parametrize("big", ["key", "headers"])
async def test_a_huge_key_or_huge_headers_are_cut_and_the_partition_moves_on(
    make_settings: Any, topics: Names, database: str, kafka_bootstrap: str, big: str
) -> None:
    key = b"k" * BIG if big == "key" else b"small-key"
    headers: list[tuple[str, bytes | None]] = [("keep", b"me")]
    if big == "headers":
        headers += [(f"big-{i}", bytes([65 + i]) * 400_000) for i in range(3)]
    (event,) = make_events(1)
    messages = [RawMessage(b"oops", key, headers), event_message(event)]
    offsets = await trio.to_thread.run_sync(produce_big, kafka_bootstrap, topics.topic, messages)
    settings = make_settings(consumer={"backoff_max": 0.5})

    async with running(settings, ["consumer"]):
        await rows_reach(database, 1, limit=30)  # the valid event after the bad one

        async def committed() -> bool:
            done = await trio.to_thread.run_sync(
                committed_offsets, kafka_bootstrap, topics.group, topics.topic
            )
            return done.get(0) == offsets[-1] + 1

        await wait_until(committed, limit=20)

    (copy,) = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topics.dlq_topic)
    assert copy.value == b"oops"
    assert copy.headers["dlq-reason"] == b"invalid_json"
    assert copy.headers["source-offset"] == str(offsets[0]).encode()
    assert copy.headers["keep"] == b"me"
    size = len(copy.key or b"") + len(copy.value or b"")
    size += sum(len(k) + len(v or b"") for k, v in copy.headers.items())
    assert size <= 900_000
    if big == "key":
        assert copy.headers["dlq-truncated-key"] == str(BIG).encode()
        assert copy.key == key[: len(copy.key or b"")] and 0 < len(copy.key or b"") <= 1024
        assert "dlq-truncated-headers" not in copy.headers
    else:
        assert copy.key == key
        assert (
            copy.headers["dlq-truncated-headers"]
            == str(sum(len(k) + len(v or b"") for k, v in headers)).encode()
        )
        assert not any(name.startswith("big-") for name in copy.headers)
    assert "dlq-truncated-value" not in copy.headers


async def test_a_copy_that_cannot_be_delivered_is_kept_in_postgres_and_the_partition_moves_on(
    make_settings: Any, topics: Names, database: str, kafka_bootstrap: str
) -> None:
    """A producer limit below the smallest copy: the copy goes to PostgreSQL instead."""
    value = b"not json " * 5000  # 45,000 bytes: cannot be sent by a 20,000-byte producer
    (event,) = make_events(1)
    messages = [RawMessage(value, b"the-key", [("h", b"v")]), event_message(event)]
    offsets = await trio.to_thread.run_sync(produce_big, kafka_bootstrap, topics.topic, messages)
    settings = make_settings(
        consumer={"backoff_max": 0.5},
        kafka={"client": {"message.max.bytes": 20_000}},
    )

    async with running(settings, ["consumer"]):
        await rows_reach(database, 1, limit=30)

        async def committed() -> bool:
            done = await trio.to_thread.run_sync(
                committed_offsets, kafka_bootstrap, topics.group, topics.topic
            )
            return done.get(0) == offsets[-1] + 1

        await wait_until(committed, limit=20)

    rows = await trio.to_thread.run_sync(
        query,
        database,
        "SELECT source_topic, source_partition, source_offset, reason, delivery_error,"
        " key, value, header_names, header_values FROM dlq_undeliverable",
    )
    assert len(rows) == 1
    topic, partition, offset, reason, delivery_error, key, stored, names, values = rows[0]
    assert (topic, partition, offset, reason) == (topics.topic, 0, offsets[0], "invalid_json")
    assert "MSG_SIZE_TOO_LARGE" in delivery_error
    assert (bytes(key), bytes(stored)) == (b"the-key", value)
    headers = dict(zip(names, (bytes(v) if v is not None else None for v in values), strict=True))
    assert headers["h"] == b"v" and headers["dlq-reason"] == b"invalid_json"
    assert await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topics.dlq_topic) == []


# -- item 3: readiness tells the truth -------------------------------------------------------


def _stalled(runtime: Runtime) -> list[str]:
    return list(runtime.health.readiness()[1].get("stalled", []))


async def test_consumer_dead_letter_delivery_failing_makes_readyz_503_until_it_delivers(
    make_settings: Any, topics: Names, database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    dead_port = free_port()
    (event,) = make_events(1)
    messages = [RawMessage(b"oops", b"k"), event_message(event)]
    offsets = await trio.to_thread.run_sync(produce_big, kafka_bootstrap, topics.topic, messages)
    settings = make_settings(
        consumer={"backoff_max": 0.5},
        kafka={
            "client": {"bootstrap.servers": f"127.0.0.1:{dead_port}", "message.timeout.ms": 1500}
        },
    )
    labels = {"role_name": "consumer", "reason": "dlq_failing"}
    broker = KafkaBroker(tmp_path / "dlq-broker", port=dead_port)
    try:
        async with running(settings, ["consumer"]) as runtime:

            async def stalled() -> bool:
                return any("dead-letter delivery failing" in s for s in _stalled(runtime))

            await wait_until(stalled, limit=30)
            ready, body = runtime.health.readiness()
            assert not ready
            (line,) = body["stalled"]
            assert line.startswith("consumer: dead-letter delivery failing for ")
            assert metric_value("eventsched_role_stalled", **labels) == 1
            # Nothing of the batch is committed while its dead letter is not acknowledged.
            done = await trio.to_thread.run_sync(
                committed_offsets, kafka_bootstrap, topics.group, topics.topic
            )
            assert done.get(0, -1) < 0

            broker.start()  # blocks trio briefly; forked from the main thread on purpose
            # The operator's part: no client creates a topic by naming it.
            ensure_topics(broker.url, {topics.dlq_topic: 1})

            async def recovered() -> bool:
                return not _stalled(runtime)

            await wait_until(recovered, limit=30)
            assert metric_value("eventsched_role_stalled", **labels) == 0

            async def committed() -> bool:
                done = await trio.to_thread.run_sync(
                    committed_offsets, kafka_bootstrap, topics.group, topics.topic
                )
                return done.get(0) == offsets[-1] + 1

            await wait_until(committed, limit=20)
        copies = await trio.to_thread.run_sync(read_topic, broker.url, topics.dlq_topic)
        assert [c.headers["source-offset"] for c in copies][-1:] == [str(offsets[0]).encode()]
    finally:
        broker.stop()


async def test_executor_dead_letter_delivery_failing_makes_readyz_503_until_it_delivers(
    make_settings: Any, topics: Names, database: str, tmp_path: Path
) -> None:
    dead_port = free_port()
    settings = make_settings(
        handlers={"other.type": "tests.support.exec_handlers:ok"},  # none for test.event
        reconciler={"enabled": False},
        kafka={
            "client": {"bootstrap.servers": f"127.0.0.1:{dead_port}", "message.timeout.ms": 1500}
        },
    )
    labels = {"role_name": "executor", "reason": "dlq_failing"}
    (event,) = new_events(1, due=time.time())
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with trio_asyncio.open_loop(), queue_client(settings.redis.url, topics.queue) as jobs:
        await jobs.enqueue_many([make_job(event.id, 1, event.execute_at, saq_timeout(settings))])
    broker = KafkaBroker(tmp_path / "dlq-broker", port=dead_port)
    try:
        async with running(settings, ["executor"]) as runtime:

            async def stalled() -> bool:
                return any("dead-letter delivery failing" in s for s in _stalled(runtime))

            await wait_until(stalled, limit=30)
            ready, body = runtime.health.readiness()
            assert not ready
            assert any(
                s.startswith("executor: dead-letter delivery failing") for s in body["stalled"]
            )
            assert metric_value("eventsched_role_stalled", **labels) == 1

            broker.start()
            ensure_topics(broker.url, {topics.dlq_topic: 1})  # no client creates topics

            async def published() -> bool:
                rows = await trio.to_thread.run_sync(
                    query, database, "SELECT 1 FROM events WHERE dlq_published_at IS NOT NULL"
                )
                return bool(rows) and not _stalled(runtime)

            await wait_until(published, limit=40)
            assert metric_value("eventsched_role_stalled", **labels) == 0
    finally:
        broker.stop()


def test_dlq_replay_skips_every_copy_that_was_cut(
    make_settings: Any, topics: Names, kafka_bootstrap: str
) -> None:
    """Replaying a cut copy would publish something else than the original message."""
    from eventsched.core.operations.dlq import SKIP_TRUNCATED, dlq_replay

    def copy(value: bytes, *cut: tuple[str, bytes]) -> RawMessage:
        key, value, headers = fit_dead_letter(b"k", value, our_headers())
        return RawMessage(value, key, [*headers, *cut])

    messages = [
        copy(b"whole"),
        copy(b"cut-key", ("dlq-truncated-key", b"1000000")),
        copy(b"cut-headers", ("dlq-truncated-headers", b"1200000")),
        copy(b"cut-value", ("dlq-truncated-value", b"2000000")),
        copy(b"cut-by-an-older-version", ("dlq-truncated-from", b"2000000")),
    ]
    produce_big(kafka_bootstrap, topics.dlq_topic, messages)
    result = dlq_replay(make_settings(), dry_run=True)
    assert (result.rerun, result.resent) == (0, 1)
    assert result.skipped == {SKIP_TRUNCATED: 4}
