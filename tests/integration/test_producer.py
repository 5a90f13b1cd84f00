"""The producer role: random events on an interval, or a steady rate, into a real broker.

The timing rule (:class:`RateSchedule`) is a pure function of the clock, specified with
plain numbers in tests/unit/test_producer.py; the role itself runs in the real runtime against the broker, and what
it wrote is read back from the topic and decoded like the consumer would.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.summary import metric_total
from tests.support.clients import read_topic
from tests.support.ingest import running
from tests.support.servers import Names

# -- the role against the broker -------------------------------------------------------


def produced(type_: str | None = None) -> float:
    labels = {"type": type_} if type_ else {}
    return metric_total("eventsched_events_produced_total", **labels)


@pytest.fixture
def topic(kafka_bootstrap: str, names: Names) -> str:
    ensure_topics(kafka_bootstrap, {names.topic: 3})
    return names.topic


async def test_interval_mode_sends_one_random_event_per_interval(
    make_settings: Any, topic: str, kafka_bootstrap: str
) -> None:
    types = ("user.created", "order.placed")
    settings = make_settings(
        producer={
            "interval": "100ms",
            "event_types": list(types),
            "delay_min": "1s",
            "delay_max": "2s",
        }
    )
    before = produced()
    async with running(settings, ["producer"]):
        await trio.sleep(0.55)  # ticks at 0, 0.1, ..., 0.5

    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topic)
    assert 5 <= len(records) <= 7
    assert produced() - before == len(records)
    now = datetime.now(UTC)
    for record in records:
        event = decode_event(record.value, now=now, limits=DecodeLimits(), headers=record.headers)
        assert record.headers == {"content-type": b"application/json", "schema-version": b"1"}
        assert record.key == event.idempotency_key.encode() == str(event.id).encode()
        assert event.type in types
        assert set(event.payload) == {"seq", "value", "message"}
        delay = event.execute_at - event.created_at
        ms = timedelta(milliseconds=1)
        assert timedelta(seconds=1) - ms <= delay <= timedelta(seconds=2) + ms
    assert len({r.value for r in records}) == len(records)


async def test_rate_mode_achieves_the_configured_rate_with_back_pressure(
    make_settings: Any, topic: str, kafka_bootstrap: str, names: Names
) -> None:
    rate = 3000
    settings = make_settings(
        producer={"rate": rate, "batch_size": 250, "max_in_flight": 2},
        # A tiny librdkafka queue: sends must wait for room instead of failing.
        kafka={"client": {"queue.buffering.max.messages": 300}},
    )
    errors_before = metric_total("eventsched_produce_errors_total")
    async with running(settings, ["producer"]):
        started = trio.current_time()
        await trio.sleep(1.5)
        elapsed = trio.current_time() - started

    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topic)
    assert len(records) == pytest.approx(rate * elapsed, rel=0.1)
    assert metric_total("eventsched_produce_errors_total") == errors_before
