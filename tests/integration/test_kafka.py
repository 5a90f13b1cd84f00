"""Kafka adapter against a real Tansu broker.

A module fixture starts Tansu (memory storage) on a free loopback port, unless
EVENTSCHED_TEST_KAFKA names a kafka_bootstrap address to use instead. Every test uses its own
topics and consumer groups. Group settings are shortened because Tansu takes about
session.timeout.ms / 2 to finish a group join (20+ s with librdkafka's defaults).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import trio

from eventsched.core.kafka import (
    Batch,
    KafkaConsumer,
    KafkaProducer,
    OutboundMessage,
    Record,
    TopicPartitionKey,
    check_broker,
    ensure_topics,
)
from eventsched.core.runtime.errors import ConfigError, DependencyError
from tests.support.clients import FAST_GROUP_CONFIG
from tests.support.proc import free_port
from tests.support.waiting import wait_until


def _name(kind: str) -> str:
    return f"test-{kind}-{uuid.uuid4().hex[:10]}"


async def _topic(kafka_bootstrap: str, partitions: int) -> str:
    name = _name("topic")
    await trio.to_thread.run_sync(ensure_topics, kafka_bootstrap, {name: partitions})
    return name


def _consumer_config(kafka_bootstrap: str, group: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": kafka_bootstrap, "group.id": group, **FAST_GROUP_CONFIG, **extra}


async def _produce(kafka_bootstrap: str, topic: str, count: int, start: int = 0) -> None:
    messages = [
        OutboundMessage(topic, f"value-{i}".encode(), key=f"key-{i}".encode())
        for i in range(start, start + count)
    ]
    async with KafkaProducer.open({"bootstrap.servers": kafka_bootstrap}) as producer:
        for report in await producer.send_many(messages):
            report.raise_for_error()


async def _collect(
    consumer: KafkaConsumer, count: int, *, commit: bool = True, limit: float = 20
) -> list[Record]:
    """Receive (and commit) batches until ``count`` records arrived."""
    records: list[Record] = []
    with trio.fail_after(limit):
        async for batch in consumer.batches():
            records.extend(batch)
            if commit:
                result = await consumer.commit(batch.next_offsets(), generation=batch.generation)
                assert result.committed == batch.next_offsets()
            if len(records) >= count:
                break
    return records


async def _next_batch(consumer: KafkaConsumer, limit: float = 20) -> Batch:
    with trio.fail_after(limit):
        async for batch in consumer.batches():
            return batch
    raise AssertionError("consumer stopped")


# -- topics ------------------------------------------------------------------------------


def test_ensure_topics_creates_and_is_idempotent(kafka_bootstrap: str) -> None:
    events, dlq = _name("events"), _name("dlq")

    first = ensure_topics(kafka_bootstrap, {events: 3, dlq: 1})
    second = ensure_topics(kafka_bootstrap, {events: 3, dlq: 1})

    assert first == [f"created {events} with 3 partitions", f"created {dlq} with 1 partitions"]
    assert second == [f"{events} exists with 3 partitions", f"{dlq} exists with 1 partitions"]


def test_ensure_topics_never_shrinks_and_explains_unsupported_growth(kafka_bootstrap: str) -> None:
    topic = _name("topic")
    ensure_topics(kafka_bootstrap, {topic: 2})

    assert ensure_topics(kafka_bootstrap, {topic: 1}) == [
        f"{topic} has 2 partitions, more than the 1 wanted; "
        "left as is (partitions are never removed)"
    ]
    with pytest.raises(DependencyError) as caught:
        ensure_topics(kafka_bootstrap, {topic: 4})
    # Tansu has no CreatePartitions.
    assert "broker does not support adding partitions (CreatePartitions)" in str(caught.value)
    assert f"cannot grow {topic} from 2 to 4 partitions" in str(caught.value)


def test_ensure_topics_reports_an_unreachable_broker() -> None:
    with pytest.raises(DependencyError, match="kafka unavailable: cannot list topics"):
        ensure_topics(f"127.0.0.1:{free_port()}", {"events": 1}, timeout=1.0)


async def test_check_broker(kafka_bootstrap: str) -> None:
    await check_broker(kafka_bootstrap)
    with pytest.raises(DependencyError, match=r"kafka unavailable: broker 127\.0\.0\.1:"):
        await check_broker(f"127.0.0.1:{free_port()}", request_timeout=0.5)


# -- producing and consuming ---------------------------------------------------------------


async def test_send_many_and_consume_all_in_batches(kafka_bootstrap: str) -> None:
    topic = await _topic(kafka_bootstrap, 3)
    count = 2000
    messages = [
        OutboundMessage(
            topic, f"v{i}".encode(), key=f"k{i}".encode(), headers=[("n", str(i).encode())]
        )
        for i in range(count)
    ]
    # A tiny local queue forces BufferError, which must turn into back-pressure.
    config = {"bootstrap.servers": kafka_bootstrap, "queue.buffering.max.messages": 100}
    async with KafkaProducer.open(config) as producer:
        reports = await producer.send_many(messages)
    assert all(report.ok for report in reports), [r.error for r in reports if not r.ok][:3]
    assert len({(r.partition, r.offset) for r in reports}) == count

    group = _name("group")
    async with KafkaConsumer.open(
        _consumer_config(kafka_bootstrap, group), [topic], max_batch=500
    ) as consumer:
        records = await _collect(consumer, count)
        stats = consumer.stats()

    assert len(records) == count
    assert stats.records_fetched == count
    assert stats.batches_fetched >= count // 500  # consume() returns at most max_batch
    assert {r.key for r in records} == {f"k{i}".encode() for i in range(count)}
    for record in records:
        number = record.key.decode()[1:] if record.key else "?"
        assert record.value == f"v{number}".encode()
        assert record.headers == (("n", number.encode()),)
        assert record.header("n") == number.encode()
        assert record.timestamp_ms is not None
        assert abs(time.time() * 1000 - record.timestamp_ms) < 300_000  # produced by this test
    for partition in range(3):
        offsets = [r.offset for r in records if r.partition == partition]
        assert offsets == list(range(len(offsets)))


async def test_new_consumer_starts_after_offsets_committed_on_the_way_out(
    kafka_bootstrap: str,
) -> None:
    topic, group = await _topic(kafka_bootstrap, 1), _name("group")
    await _produce(kafka_bootstrap, topic, 100)
    config = _consumer_config(kafka_bootstrap, group)
    processed: list[Batch] = []

    async def commit_processed(partitions: frozenset[TopicPartitionKey]) -> None:
        for batch in processed:
            await first.commit(batch.next_offsets(), generation=batch.generation)

    # The first consumer is left by cancellation: closing still runs on_revoke, shielded,
    # and its commits are accepted because the partitions are not released yet.
    with trio.CancelScope() as scope:
        async with KafkaConsumer.open(
            config, [topic], max_batch=10, on_revoke=commit_processed
        ) as first:
            async for batch in first.batches():
                processed.append(batch)
                if sum(map(len, processed)) >= 30:
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    async with KafkaConsumer.open(config, [topic], max_batch=10) as second:
        rest = await _collect(second, 70)

    assert [r.offset for b in processed for r in b] == list(range(30))
    assert [r.offset for r in rest] == list(range(30, 100))


async def test_uncommitted_records_are_redelivered(kafka_bootstrap: str) -> None:
    topic, group = await _topic(kafka_bootstrap, 1), _name("group")
    await _produce(kafka_bootstrap, topic, 50)
    config = _consumer_config(kafka_bootstrap, group)

    async with KafkaConsumer.open(config, [topic], max_batch=10) as first:
        committed = await _collect(first, 10)
        uncommitted = await _next_batch(first)  # received, never committed
    async with KafkaConsumer.open(config, [topic], max_batch=10) as second:
        again = await _collect(second, 40)

    assert [r.offset for r in committed] == list(range(10))
    assert [r.offset for r in uncommitted] == list(range(10, 20))
    assert [r.offset for r in again] == list(range(10, 50))


async def test_slow_trio_side_does_not_make_the_thread_buffer(kafka_bootstrap: str) -> None:
    topic = await _topic(kafka_bootstrap, 1)
    await _produce(kafka_bootstrap, topic, 100)
    config = _consumer_config(kafka_bootstrap, _name("group"))

    async with KafkaConsumer.open(config, [topic], max_batch=10, buffered_batches=1) as consumer:
        batches = consumer.batches()
        received: list[Record] = []
        for _ in range(3):
            with trio.fail_after(20):
                received.extend(await batches.__anext__())
            # Slow processing, long enough for the thread to hold (pause + keep polling).
            await trio.sleep(1.6)
            stats = consumer.stats()
            # At most one batch in the channel and one in the thread's hands.
            assert stats.batches_fetched - stats.batches_delivered <= 2
        received.extend(await _collect(consumer, 100 - len(received), commit=False))

    # Holding and resuming lost or repeated nothing.
    assert [r.offset for r in received] == list(range(100))


async def test_pause_resume_and_lag(kafka_bootstrap: str) -> None:
    topic = await _topic(kafka_bootstrap, 1)
    await _produce(kafka_bootstrap, topic, 40)
    config = _consumer_config(kafka_bootstrap, _name("group"))

    async with KafkaConsumer.open(config, [topic], max_batch=100) as consumer:
        await _collect(consumer, 40)
        assert consumer.assignment() == {(topic, 0)}
        assert await consumer.lag() == {(topic, 0): 0}

        await consumer.pause()
        await _produce(kafka_bootstrap, topic, 15, start=40)
        with trio.move_on_after(1.5) as quiet:
            await _next_batch(consumer)
        assert quiet.cancelled_caught, "a paused consumer fetched records"

        await consumer.resume()
        resumed: list[Batch] = []
        with trio.fail_after(20):
            async for batch in consumer.batches():
                resumed.append(batch)
                if sum(map(len, resumed)) >= 15:
                    break
        assert [r.offset for b in resumed for r in b] == list(range(40, 55))

        # stop() ends the iteration (nothing more arrives) but commits still work.
        consumer.stop()
        with trio.fail_after(5):
            leftovers = [batch async for batch in consumer.batches()]
        assert leftovers == []
        too_old = await consumer.commit({(topic, 0): 55}, generation=0)
        assert too_old.stale == {(topic, 0): 55}  # generation 0 predates the assignment
        last = resumed[-1]
        result = await consumer.commit(last.next_offsets(), generation=last.generation)
        assert result.committed == {(topic, 0): 55}


# -- rebalancing ---------------------------------------------------------------------------


async def test_two_consumers_split_partitions_and_stale_commits_are_refused(
    kafka_bootstrap: str,
) -> None:
    topic, group = await _topic(kafka_bootstrap, 3), _name("group")
    config = _consumer_config(kafka_bootstrap, group)
    revoked_a: list[frozenset[TopicPartitionKey]] = []
    revoked_b: list[frozenset[TopicPartitionKey]] = []
    hook_commits: list[dict[TopicPartitionKey, int]] = []
    processed: list[Batch] = []

    async def a_on_revoke(partitions: frozenset[TopicPartitionKey]) -> None:
        # Commit what is done before the partitions go: this must be accepted.
        revoked_a.append(partitions)
        for batch in processed:
            result = await consumer_a.commit(batch.next_offsets(), generation=batch.generation)
            hook_commits.append(dict(result.committed))
        processed.clear()

    async def b_on_revoke(partitions: frozenset[TopicPartitionKey]) -> None:
        revoked_b.append(partitions)

    # Nobody drains the consumers below: their threads hold untaken batches, and must still
    # take part in rebalances (max.poll.interval.ms is 10 s here; a member that stopped
    # polling would be thrown out and its on_revoke hook never run).
    async with KafkaConsumer.open(
        config, [topic], max_batch=5, on_revoke=a_on_revoke
    ) as consumer_a:
        await wait_until(lambda: len(consumer_a.assignment()) == 3)
        await _produce(kafka_bootstrap, topic, 60)
        done = await _next_batch(consumer_a)
        processed.append(done)
        in_flight = await _next_batch(consumer_a)  # will not be finished before rebalance

        async with KafkaConsumer.open(
            config, [topic], max_batch=5, on_revoke=b_on_revoke
        ) as consumer_b:
            await wait_until(
                lambda: (
                    len(consumer_a.assignment()) + len(consumer_b.assignment()) == 3
                    and bool(consumer_b.assignment())
                )
            )
            assert consumer_a.assignment().isdisjoint(consumer_b.assignment())
            assert consumer_a.assignment()  # each member owns something
            assert revoked_a == [frozenset((topic, p) for p in range(3))]
            assert hook_commits == [done.next_offsets()]

            # The in-flight batch predates the rebalance: its commit must be refused.
            late = await consumer_a.commit(
                in_flight.next_offsets(), generation=in_flight.generation
            )
            assert late.committed == {}
            assert late.stale == in_flight.next_offsets()

        # B left: its partitions were revoked from it, and A was rebalanced again.
        assert revoked_b
        await wait_until(lambda: len(consumer_a.assignment()) == 3)
        assert len(revoked_a) == 2


# -- producer shutdown ---------------------------------------------------------------------


async def test_producer_flushes_queued_messages_on_exit(kafka_bootstrap: str) -> None:
    topic = await _topic(kafka_bootstrap, 1)
    reports = []

    async def send(producer: KafkaProducer) -> None:
        messages = [OutboundMessage(topic, b"x", key=str(i).encode()) for i in range(50)]
        reports.extend(await producer.send_many(messages))

    started = trio.current_time()
    # A long linger keeps the messages queued locally until the exit flush.
    config = {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5000}
    async with trio.open_nursery() as nursery, KafkaProducer.open(config) as p:
        nursery.start_soon(send, p)
        await trio.sleep(0.2)
        assert not reports
    assert p.undelivered == 0
    assert [r.offset for r in reports] == list(range(50))
    assert all(r.ok for r in reports)
    assert trio.current_time() - started < 4  # flush sent at once, not after linger.ms


async def test_producer_reports_undelivered_messages_when_the_broker_is_gone() -> None:
    config = {"bootstrap.servers": f"127.0.0.1:{free_port()}", "message.timeout.ms": 60000}
    reports = []

    async def send(producer: KafkaProducer) -> None:
        reports.extend(await producer.send_many([OutboundMessage("nowhere", b"x")] * 3))

    async with (
        trio.open_nursery() as nursery,
        KafkaProducer.open(config, flush_timeout=0.5) as producer,
    ):
        nursery.start_soon(send, producer)
        await trio.sleep(0.2)
    assert producer.undelivered == 3
    assert len(reports) == 3
    assert all(r.error and "PURGE" in r.error for r in reports), reports
    with pytest.raises(DependencyError, match="delivery to nowhere failed"):
        reports[0].raise_for_error()


async def test_open_raises_plain_errors(kafka_bootstrap: str) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.producer"):
        async with KafkaProducer.open({"bootstrap.servers": kafka_bootstrap, "no.such.key": 1}):
            pass
    with pytest.raises(ConfigError, match=r"group\.id"):
        async with KafkaConsumer.open({"bootstrap.servers": kafka_bootstrap}, ["t"]):
            pass
    # The caller's own exception leaves the adapter unwrapped (no ExceptionGroup).
    with pytest.raises(KeyError):
        async with KafkaProducer.open({"bootstrap.servers": kafka_bootstrap}) as producer:
            raise KeyError("boom")
    with pytest.raises(DependencyError, match="producer is closed"):
        await producer.send("t", b"x")
