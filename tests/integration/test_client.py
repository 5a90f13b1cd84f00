"""The client against the real broker: what it sends is read back from the topic and decoded
with the consumer's decoder; refused input sends nothing; an unreachable broker is a
DeliveryError within the timeout; threads, asyncio and trio share or use clients; and the
consumer role records an event the client scheduled."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import trio

from eventsched import AsyncClient, Client, DeliveryError
from eventsched.core.domain.commands import Command, command_headers, parse_command
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import kafka_headers
from eventsched.core.kafka import ensure_topics
from tests.support.clients import ReadRecord, delete_queue_keys, query, read_topic
from tests.support.ingest import rows_reach, running
from tests.support.servers import Names

LIMITS = DecodeLimits()


@pytest.fixture
def topic(kafka_bootstrap: str, names: Names) -> str:
    ensure_topics(kafka_bootstrap, {names.topic: 3})
    return names.topic


@pytest.fixture
def client(kafka_bootstrap: str, topic: str) -> Iterator[Client]:
    with Client(kafka_bootstrap, topic, requested_by="tests", timeout=15) as c:
        yield c


def events_of(records: list[ReadRecord]) -> dict[uuid.UUID, tuple[Event, ReadRecord]]:
    now = datetime.now(UTC)
    out = {}
    for record in records:
        event = decode_event(record.value, now=now, limits=LIMITS, headers=record.headers)
        out[event.id] = (event, record)
    return out


def commands_of(records: list[ReadRecord]) -> list[tuple[Command, ReadRecord]]:
    now = datetime.now(UTC)
    return [(parse_command(r.value or b"", now=now, limits=LIMITS), r) for r in records]


def test_schedule_is_on_the_topic_as_the_consumer_decodes_it(
    client: Client, kafka_bootstrap: str, topic: str
) -> None:
    at = datetime(2027, 1, 5, 9, 30, 0, 123456, tzinfo=UTC)
    before = datetime.now(UTC)
    by_key = client.schedule("invoice.due", {"invoice": 42}, at=at, key="invoice-42")
    soon = client.schedule("ping", {}, delay=timedelta(minutes=5))
    now_id = client.schedule("ping", {"n": [1, 2.5, None, True, "é"]})
    after = datetime.now(UTC)

    got = events_of(read_topic(kafka_bootstrap, topic))
    assert set(got) == {by_key, soon, now_id}
    event, record = got[by_key]
    assert (event.type, event.payload, event.idempotency_key) == (
        "invoice.due",
        {"invoice": 42},
        "invoice-42",
    )
    assert event.execute_at == at.replace(microsecond=124000)  # rounded up: never early
    assert record.key == b"invoice-42"
    assert record.headers == dict(kafka_headers())
    event, record = got[soon]
    assert record.key == str(soon).encode() == event.idempotency_key.encode()
    assert before + timedelta(minutes=5) - timedelta(milliseconds=1) <= event.execute_at
    assert event.execute_at <= after + timedelta(minutes=5)
    assert got[now_id][0].payload == {"n": [1, 2.5, None, True, "é"]}


def test_schedule_many_sends_a_thousand_and_all_are_acknowledged(
    client: Client, kafka_bootstrap: str, topic: str
) -> None:
    items: list[Any] = [
        {"type": "bulk", "payload": {"i": i}, "delay": i, "key": f"bulk-{i}"} for i in range(1000)
    ]
    ids = client.schedule_many(items)
    assert len(set(ids)) == 1000
    got = events_of(read_topic(kafka_bootstrap, topic, timeout=30))
    assert list(got) == sorted(got, key=lambda i: (got[i][1].partition, got[i][1].offset))
    assert set(got) == set(ids)
    for i, event_id in enumerate(ids):
        event, record = got[event_id]
        assert (event.payload, record.key) == ({"i": i}, f"bulk-{i}".encode())


def test_cancel_reschedule_and_retry_are_commands_on_the_topic(
    client: Client, kafka_bootstrap: str, topic: str
) -> None:
    event_id = uuid.uuid4()
    looks_like_an_id = str(uuid.uuid4())
    at = datetime.now(UTC) + timedelta(hours=2)
    sent = [
        client.cancel("invoice-42"),
        client.reschedule(event_id, at=at),
        client.reschedule("k", delay=60),
        client.retry(looks_like_an_id),
        client.retry(event_id, at=at),
    ]
    got = {c.command_id: (c, r) for c, r in commands_of(read_topic(kafka_bootstrap, topic))}
    assert set(got) == set(sent)
    shapes = [
        (got[i][0].op, got[i][0].idempotency_key, got[i][0].event_id, got[i][1].key) for i in sent
    ]
    assert shapes == [
        ("cancel", "invoice-42", None, b"invoice-42"),
        ("reschedule", None, event_id, str(event_id).encode()),
        ("reschedule", "k", None, b"k"),
        ("retry", looks_like_an_id, None, looks_like_an_id.encode()),
        ("retry", None, event_id, str(event_id).encode()),
    ]
    due = [got[i][0].execute_at for i in sent]
    assert due[0] is None and due[3] is None
    assert due[1] == due[4] == at + timedelta(microseconds=-at.microsecond % 1000)  # rounded up
    assert due[2] is not None and due[2] > datetime.now(UTC) + timedelta(seconds=50)
    for command, record in got.values():
        assert command.requested_by == "tests"
        assert record.headers == dict(command_headers())


def test_refused_input_sends_nothing(kafka_bootstrap: str, topic: str) -> None:
    limits = DecodeLimits(max_message_bytes=2000, max_payload_depth=4, horizon=86_400.0)
    with Client(kafka_bootstrap, topic, limits=limits, timeout=15) as client:
        refusals: list[tuple[Any, str]] = [
            (partial(client.schedule, "", {}), "invalid_type"),
            (partial(client.schedule, "t", {}, at=datetime(2030, 1, 1)), "naive"),
            (partial(client.schedule, "t", {"x": "y" * 3000}), "too_large"),
            (partial(client.schedule, "t", {"a": [[[[1]]]]}), "too_deep"),
            (partial(client.schedule, "t", {}, at=datetime.now(UTC), delay=1), "not both"),
            (partial(client.schedule, "t", {}, delay=timedelta(days=2)), "beyond_horizon"),
            (partial(client.reschedule, "k", delay=timedelta(days=2)), "beyond_horizon"),
            (partial(client.reschedule, "k"), "needs at or delay"),
            (partial(client.cancel, ""), "invalid_key"),
            (
                partial(client.schedule_many, [{"type": "t", "payload": {}}, {"type": ""}]),
                "item 1",
            ),
        ]
        for call, match in refusals:
            with pytest.raises(ValueError, match=match):
                call()
    assert read_topic(kafka_bootstrap, topic) == []


def test_an_unreachable_broker_is_a_delivery_error_within_the_timeout(closed_port: int) -> None:
    secret = "hunter2-secret"
    config = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": "app",
        "sasl.password": secret,
    }
    client = Client(f"127.0.0.1:{closed_port}", "events", kafka_config=config, timeout=2)
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError) as caught:
            client.schedule("t", {}, key="unsent")
        elapsed = time.monotonic() - started
        assert 1.5 < elapsed < 2 + 2.5
        assert len(caught.value.failed) == 1 and caught.value.acknowledged == ()
        assert secret not in str(caught.value) and secret not in repr(client)
        with pytest.raises(DeliveryError) as many:
            client.schedule_many([{"type": "t", "payload": {}}] * 3)
        assert len(many.value.failed) == 3 and "3 of 3" in str(many.value)
    finally:
        client.close(0)


def test_eight_threads_share_one_client_and_each_gets_its_own_acknowledgement(
    client: Client, kafka_bootstrap: str, topic: str
) -> None:
    per_thread = 40
    results: dict[int, list[uuid.UUID]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait()
            ids = []
            for i in range(per_thread):
                ids.append(client.schedule("threaded", {"n": n, "i": i}, key=f"t{n}-{i}"))
                if i % 10 == 0:
                    ids.append(client.cancel(f"t{n}-{i}"))
            results[n] = ids
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    sent = {i for ids in results.values() for i in ids}
    assert len(sent) == 8 * (per_thread + 4)
    records = read_topic(kafka_bootstrap, topic)
    seen = set()
    for record in records:
        if record.headers.get("schema-version") == b"2":
            seen.add(
                parse_command(record.value or b"", now=datetime.now(UTC), limits=LIMITS).command_id
            )
        else:
            seen.add(decode_event(record.value, now=datetime.now(UTC), limits=LIMITS).id)
    assert seen == sent


def test_the_async_client_from_asyncio(kafka_bootstrap: str, topic: str) -> None:
    async def main() -> tuple[list[uuid.UUID], float]:
        async with AsyncClient(kafka_bootstrap, topic, timeout=15) as client:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            beat = asyncio.create_task(ticker())
            started = time.monotonic()
            one, two = await asyncio.gather(
                client.schedule("a", {"n": 1}, key="async-1"),
                client.schedule("a", {"n": 2}, delay=30),
            )
            many = await client.schedule_many(
                [{"type": "a", "payload": {"i": i}} for i in range(50)]
            )
            command = await client.reschedule("async-1", delay=60)
            elapsed = time.monotonic() - started
            beat.cancel()
            # The loop kept running while the client waited for the broker.
            assert ticks > 0
        assert client.closed
        return [one, two, *many, command], elapsed

    ids, _ = asyncio.run(main())
    records = read_topic(kafka_bootstrap, topic)
    assert len(records) == 53
    events = events_of([r for r in records if r.headers.get("schema-version") == b"1"])
    commands = commands_of([r for r in records if r.headers.get("schema-version") == b"2"])
    assert set(events) | {c.command_id for c, _ in commands} == set(ids)
    assert events[ids[0]][1].key == b"async-1"


async def test_the_sync_client_from_trio(kafka_bootstrap: str, topic: str) -> None:
    client = await trio.to_thread.run_sync(partial(Client, kafka_bootstrap, topic, timeout=15))
    try:
        ids = []
        async with trio.open_nursery() as nursery:

            async def send(n: int) -> None:
                ids.append(
                    await trio.to_thread.run_sync(
                        partial(client.schedule, "from.trio", {"n": n}, delay=5)
                    )
                )

            for n in range(4):
                nursery.start_soon(send, n)
    finally:
        await trio.to_thread.run_sync(client.close)
    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topic)
    assert set(events_of(records)) == set(ids) and len(ids) == 4


async def test_the_consumer_records_what_the_client_scheduled(
    make_settings: Any, names: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> None:
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 1})
    settings = make_settings()
    try:
        async with running(settings, ["consumer"]):
            client = Client.from_settings(settings, timeout=15)
            try:
                event_id = await trio.to_thread.run_sync(
                    partial(client.schedule, "e2e", {"ok": True}, delay=3600, key="e2e-1")
                )
            finally:
                await trio.to_thread.run_sync(client.close)
            await rows_reach(database, 1)
        rows = query(database, "SELECT id, idempotency_key, type, payload, status FROM events")
        assert rows == [(event_id, "e2e-1", "e2e", {"ok": True}, "scheduled")]
    finally:
        delete_queue_keys(redis_url, names.queue)
