"""The long-lived idempotent producer survives a broker that lost its producer state.

Tansu keeps everything in memory: restarted on the same port it has forgotten our producer
id (and every topic, which the test creates again). librdkafka then gets
``UNKNOWN_PRODUCER_ID`` for every ProduceRequest, bumps its epoch locally and retries,
forever: the application only ever sees ``_MSG_TIMED_OUT``. The adapter must notice and
build a new client; messages it had in flight are reported as failed (the caller sends
them again), never as delivered.

Each test owns its broker (restarting the shared one would disturb every other test).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import trio
import trio_asyncio
from confluent_kafka import KafkaError

from eventsched.core.domain.jobcontract import make_job, saq_timeout
from eventsched.core.kafka import KafkaProducer, OutboundMessage, ensure_topics
from eventsched.core.operations.devbrokers import KafkaBroker
from tests.support.clients import delete_queue_keys, query, read_topic
from tests.support.execution import insert_events, new_events, queue_client
from tests.support.ingest import (
    RawMessage,
    event_message,
    make_events,
    produce,
    rows_reach,
    running,
)
from tests.support.metrics import metric_value
from tests.support.servers import Names
from tests.support.waiting import wait_until


def restart_empty(broker: KafkaBroker, topics: dict[str, int]) -> None:
    """Restart on the same port (everything is lost) and create the topics again.

    Killed, not stopped: Tansu loses its state either way, and on SIGTERM it waits about
    5 s for the connected clients (the producer under test) before it exits.

    Called on the test's main thread, blocking trio for a moment: the broker is forked
    with PDEATHSIG, so it must not be started from a short-lived worker thread."""
    broker.kill()
    broker.start()
    ensure_topics(broker.url, topics)


async def test_producer_delivers_again_after_the_broker_forgot_its_producer_id(
    own_broker: KafkaBroker,
) -> None:
    topic = f"rebuild-{uuid.uuid4().hex[:8]}"
    ensure_topics(own_broker.url, {topic: 1})
    rebuilds_before = metric_value("eventsched_kafka_producer_rebuilds_total", reason="stuck_pid")
    config = {"bootstrap.servers": own_broker.url, "message.timeout.ms": 5000}
    async with KafkaProducer.open(config) as producer:
        (await producer.send(topic, b"before")).raise_for_error()
        restart_empty(own_broker, {topic: 1})

        # Each attempt waits at most message.timeout.ms; the old client never delivers.
        errors: list[str] = []
        with trio.move_on_after(25):
            while True:
                report = await producer.send(topic, b"after")
                if report.ok:
                    break
                assert isinstance(report.error, str) and report.error  # says why
                errors.append(report.error)
        assert report.ok, f"never delivered again after the restart: {errors}"
        assert producer.rebuilds >= 1
    assert (
        metric_value("eventsched_kafka_producer_rebuilds_total", reason="stuck_pid")
        > rebuilds_before
    )
    records = await trio.to_thread.run_sync(read_topic, own_broker.url, topic)
    # Only what was acknowledged after the restart is there (the broker lost the rest).
    assert [r.value for r in records] == [b"after"]


async def test_messages_in_flight_during_a_rebuild_are_failed_not_lost(
    own_broker: KafkaBroker,
) -> None:
    """Every send gets a report; whatever was not acknowledged is sent again and arrives."""
    topic = f"rebuild-{uuid.uuid4().hex[:8]}"
    ensure_topics(own_broker.url, {topic: 1})
    config = {"bootstrap.servers": own_broker.url, "message.timeout.ms": 20000}
    async with KafkaProducer.open(config) as producer:
        (await producer.send(topic, b"warm-up")).raise_for_error()
        restart_empty(own_broker, {topic: 1})
        wanted = {f"m{i}".encode() for i in range(20)}
        left = set(wanted)
        with trio.fail_after(30):
            while left:
                batch = sorted(left)
                reports = await producer.send_many([OutboundMessage(topic, v) for v in batch])
                left = {v for v, r in zip(batch, reports, strict=True) if not r.ok}
    records = await trio.to_thread.run_sync(read_topic, own_broker.url, topic)
    assert {r.value for r in records} >= wanted


async def test_the_executor_publishes_dead_events_again_after_the_broker_restart(
    own_broker: KafkaBroker, make_settings: Any, database: str, names: Names, redis_url: str
) -> None:
    """Through the real executor role: its DLQ publisher shares the rebuilt producer."""
    ensure_topics(own_broker.url, {names.dlq_topic: 1})
    settings = make_settings(
        kafka={"bootstrap_servers": own_broker.url, "client": {"message.timeout.ms": 5000}},
        handlers={"other.type": "tests.support.exec_handlers:ok"},  # none for test.event
        reconciler={"enabled": False},
    )
    first, second = new_events(2, due=lambda i: time.time() + (0 if i == 0 else 12))
    await trio.to_thread.run_sync(insert_events, database, [first, second])
    timeout = saq_timeout(settings)
    async with trio_asyncio.open_loop(), queue_client(redis_url, names.queue) as jobs:
        await jobs.enqueue_many([make_job(e.id, 1, e.execute_at, timeout) for e in (first, second)])

    def published() -> set[str]:
        rows = query(database, "SELECT id FROM events WHERE dlq_published_at IS NOT NULL")
        return {str(row[0]) for row in rows}

    try:
        async with running(settings, ["executor"]):
            await wait_until(lambda: first.id in published(), limit=15)
            restart_empty(own_broker, {names.dlq_topic: 1})  # before the second is due
            await wait_until(lambda: second.id in published(), limit=45)
    finally:
        delete_queue_keys(redis_url, names.queue)
    records = await trio.to_thread.run_sync(read_topic, own_broker.url, names.dlq_topic)
    assert [r.headers["event-id"] for r in records] == [second.id.encode()]


async def test_a_fatal_error_replaces_the_client(kafka_bootstrap: str) -> None:
    """A fatal error as librdkafka reports it (error_cb with fatal=True), injected on the
    producer thread: confluent-kafka does not expose librdkafka's fatal-error test hook."""
    topic = f"rebuild-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, {topic: 1})
    before = metric_value("eventsched_kafka_producer_rebuilds_total", reason="fatal")
    async with KafkaProducer.open({"bootstrap.servers": kafka_bootstrap}) as producer:
        (await producer.send(topic, b"one")).raise_for_error()
        fatal = KafkaError(KafkaError._FATAL, "injected fatal error", fatal=True)
        await producer._link.call(lambda: producer._worker._on_error(fatal), "inject")
        (await producer.send(topic, b"two")).raise_for_error()
        assert producer.rebuilds == 1
    assert metric_value("eventsched_kafka_producer_rebuilds_total", reason="fatal") == before + 1
    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topic)
    assert [r.value for r in records] == [b"one", b"two"]


async def test_the_consumer_dead_letters_again_after_the_broker_restart(
    own_broker: KafkaBroker, make_settings: Any, database: str, names: Names, redis_url: str
) -> None:
    """Through the real consumer role: a bad message after the restart reaches the DLQ and
    the valid event behind it is recorded (the DLQ copy goes through the rebuilt producer)."""
    topics = {names.topic: 1, names.dlq_topic: 1}
    ensure_topics(own_broker.url, topics)
    settings = make_settings(
        kafka={"bootstrap_servers": own_broker.url, "client": {"message.timeout.ms": 5000}},
        consumer={"backoff_max": 0.5},
    )
    first, second = make_events(2)

    def dead_letters() -> list[bytes | None]:
        return [r.value for r in read_topic(own_broker.url, names.dlq_topic)]

    try:
        async with running(settings, ["consumer"]):
            produce(own_broker.url, names.topic, [RawMessage(b"bad-1"), event_message(first)])
            await rows_reach(database, 1, limit=30)
            await wait_until(lambda: dead_letters() == [b"bad-1"], limit=15)
            restart_empty(own_broker, topics)
            produce(own_broker.url, names.topic, [RawMessage(b"bad-2"), event_message(second)])
            # The row is inserted before the dead letter is sent: wait for the copy itself.
            await rows_reach(database, 2, limit=30)
            await wait_until(lambda: dead_letters() == [b"bad-2"], limit=45)
    finally:
        delete_queue_keys(redis_url, names.queue)
