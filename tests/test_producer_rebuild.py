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

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from eventsched.core.devstack import KafkaBroker
from eventsched.core.kafka import KafkaProducer, OutboundMessage, ensure_topics
from tests.conftest import metric_value
from tests.support.ingest import read_topic


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def restart_empty(broker: KafkaBroker, topics: dict[str, int]) -> None:
    """Restart on the same port (everything is lost) and create the topics again.

    Called on the test's main thread, blocking trio for a moment: the broker is forked
    with PDEATHSIG, so it must not be started from a short-lived worker thread."""
    broker.stop()
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
                assert report.error is not None
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
