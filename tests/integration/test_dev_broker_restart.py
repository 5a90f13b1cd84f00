"""The dev broker keeps everything in memory: a restart of `eventsched dev` loses its topics,
their messages (the DLQ's too) and the group's committed offsets, while PostgreSQL and Redis
keep theirs.

Specification: after such a restart the topics are created again (``eventsched dev`` does so
at every start), and a consumer whose committed offsets vanished starts from the earliest
offset of each partition (``auto.offset.reset=earliest``): it reads every message sent since
the restart, so none is lost, and a message that PostgreSQL already holds (a producer
re-sending an event it had sent before the restart) is recognised by its idempotency key and
stored once.
"""

from __future__ import annotations

from typing import Any

import trio
from confluent_kafka.admin import AdminClient

from eventsched.core.domain.event import Event
from eventsched.core.kafka import ensure_topics
from eventsched.core.kafka.clientconfig import CONSUMER_DEFAULTS
from eventsched.core.operations.devbrokers import KafkaBroker
from tests.support.clients import query
from tests.support.ingest import (
    committed_offsets,
    count_rows,
    event_message,
    make_events,
    produce,
    rows_reach,
    running_consumer,
)
from tests.support.servers import Names
from tests.support.waiting import wait_until


def _topics(broker: KafkaBroker, names: Names) -> None:
    # What `eventsched dev` does at every start (devrun._prepare).
    ensure_topics(broker.url, {names.topic: 3, names.dlq_topic: 3})


def _topic_names(broker: KafkaBroker) -> set[str]:
    admin = AdminClient({"bootstrap.servers": broker.url})
    return set(admin.list_topics(timeout=10).topics)


def _ids(dsn: str) -> list[str]:
    return [str(row[0]) for row in query(dsn, "SELECT id FROM events ORDER BY id")]


async def _all_committed(broker: KafkaBroker, names: Names, count: int) -> None:
    async def check() -> bool:
        offsets = await trio.to_thread.run_sync(
            committed_offsets, broker.url, names.group, names.topic
        )
        return sum(max(0, offset) for offset in offsets.values()) >= count

    await wait_until(check, limit=30, interval=0.3)


async def _recorded_and_committed(
    broker: KafkaBroker, names: Names, database: str, events: list[Event]
) -> None:
    """Send ``events``, the test's first, and wait until PostgreSQL holds them and the
    group committed their offsets."""
    await trio.to_thread.run_sync(
        produce, broker.url, names.topic, [event_message(e) for e in events]
    )
    await rows_reach(database, len(events))
    await _all_committed(broker, names, len(events))


def test_a_consumer_whose_offsets_vanished_starts_from_the_earliest_offset() -> None:
    """The documented start position (README, docs/operations.md)."""
    assert CONSUMER_DEFAULTS["auto.offset.reset"] == "earliest"


async def test_a_restart_of_the_memory_only_broker_loses_no_event_and_duplicates_none(
    make_settings: Any, own_broker: KafkaBroker, names: Names, database: str, clean_queue: str
) -> None:
    await trio.to_thread.run_sync(_topics, own_broker, names)
    settings = make_settings(kafka={"bootstrap_servers": own_broker.url})
    before = make_events(20)
    async with running_consumer(settings):
        await _recorded_and_committed(own_broker, names, database, before)

    # The restart: the broker's memory (topics, messages, committed offsets) is gone.
    await trio.to_thread.run_sync(own_broker.stop)
    await trio.to_thread.run_sync(own_broker.start)
    topics = await trio.to_thread.run_sync(_topic_names, own_broker)
    assert names.topic not in topics, "the broker kept its topics: not a memory-only restart"
    await trio.to_thread.run_sync(_topics, own_broker, names)
    offsets = await trio.to_thread.run_sync(
        committed_offsets, own_broker.url, names.group, names.topic
    )
    assert set(offsets.values()) == {-1001}, "the group's offsets survived the restart"

    after = make_events(15, start=100)
    resent = before[:5]  # a producer re-sends events PostgreSQL already holds
    async with running_consumer(settings):
        await trio.to_thread.run_sync(
            produce,
            own_broker.url,
            names.topic,
            [event_message(e) for e in [*resent, *after]],
        )
        await rows_reach(database, len(before) + len(after))
        # Everything sent since the restart was read and committed, duplicates included.
        await _all_committed(own_broker, names, len(resent) + len(after))
    ids = await trio.to_thread.run_sync(_ids, database)
    assert sorted(ids) == sorted(str(e.id) for e in [*before, *after])
    assert await trio.to_thread.run_sync(count_rows, database) == len(before) + len(after)


async def test_a_consumer_that_stays_up_across_the_broker_restart_resumes_from_the_start(
    make_settings: Any, own_broker: KafkaBroker, names: Names, database: str, clean_queue: str
) -> None:
    """The consumer keeps running while the broker restarts under it (the broker child was
    killed and started by hand): it rejoins the forgotten group, finds no committed offset
    and reads the new topics from their start."""
    await trio.to_thread.run_sync(_topics, own_broker, names)
    settings = make_settings(kafka={"bootstrap_servers": own_broker.url})
    before = make_events(20)
    after = make_events(30, start=100)
    async with running_consumer(settings):
        await _recorded_and_committed(own_broker, names, database, before)
        await trio.to_thread.run_sync(own_broker.stop)
        await trio.to_thread.run_sync(own_broker.start)
        await trio.to_thread.run_sync(_topics, own_broker, names)
        await trio.to_thread.run_sync(
            produce,
            own_broker.url,
            names.topic,
            [event_message(e) for e in [*before[:5], *after]],
        )
        await rows_reach(database, len(before) + len(after), limit=60)
        await _all_committed(own_broker, names, 5 + len(after))
    ids = await trio.to_thread.run_sync(_ids, database)
    assert sorted(ids) == sorted(str(e.id) for e in [*before, *after])
