"""``eventsched status``: events by status, SAQ queue sizes, consumer lag and DLQ size.

The PostgreSQL and Redis queries run through the usual adapters in one ``trio.run`` (trio
side, asyncio through trio-asyncio) with the Kafka part in a worker thread (blocking
clients), every section under a time limit.

High watermarks: Tansu answers ListOffsets(latest) with the base offset of the last record
batch + 1 instead of the end of the partition. Fetch responses carry the right high
watermark, so :func:`high_watermarks` reads the tail of every partition (one batch at most)
and trusts the larger of the two. On Kafka this costs one small fetch per partition.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import trio
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as TP
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import AdminClient

from eventsched.core.domain.event import format_time
from eventsched.core.kafka import ClientKind, config_from_settings
from eventsched.core.operations.oneshot import (
    SECTION_TIMEOUT,
    new_client,
    new_reader,
    topic_partitions,
)
from eventsched.core.runtime.errors import DependencyError, EventschedError
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.settings import Settings, require_postgres, require_redis

# OffsetSpec is public API, but confluent-kafka's stubs neither export nor type it.
_EARLIEST: Final = kafka_admin.OffsetSpec.earliest()  # type: ignore[attr-defined,no-untyped-call]
_LATEST: Final = kafka_admin.OffsetSpec.latest()  # type: ignore[attr-defined,no-untyped-call]


def _admin(settings: Settings) -> AdminClient:
    return new_client(AdminClient, config_from_settings(settings, ClientKind.ADMIN))


def _list_offsets(
    admin: AdminClient, topic: str, partitions: Iterable[int], spec: Any, timeout: float
) -> dict[int, int]:
    futures = admin.list_offsets({TP(topic, p): spec for p in partitions}, request_timeout=timeout)
    try:
        return {tp.partition: f.result(timeout + 1).offset for tp, f in futures.items()}
    except (KafkaException, TimeoutError) as err:
        raise DependencyError("kafka", f"cannot read offsets of {topic}: {err}") from err


def high_watermarks(
    admin: AdminClient, consumer: Consumer, topic: str, partitions: list[int], timeout: float
) -> dict[int, tuple[int, int]]:
    """(low, high) per partition, with the true high watermark (see the module docstring).

    Offsets come from one batched ListOffsets request each for earliest and latest (a
    consumer's per-partition query waits behind its own long-polling fetch); the tails
    are then read with ``consumer`` (left unassigned afterwards).
    """
    lows = _list_offsets(admin, topic, partitions, _EARLIEST, timeout)
    highs = _list_offsets(admin, topic, partitions, _LATEST, timeout)
    marks = {p: (lows[p], highs[p]) for p in partitions}
    tails = [TP(topic, p, max(low, high - 1)) for p, (low, high) in marks.items() if high > low]
    if not tails:
        return marks
    consumer.assign(tails)
    try:
        waiting = {tp.partition for tp in tails}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.1):
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    waiting.discard(message.partition())
        for p, (low, high) in list(marks.items()):
            cached = consumer.get_watermark_offsets(TP(topic, p), cached=True)
            if cached is not None and cached[1] > high:
                marks[p] = (low, cached[1])
    finally:
        consumer.unassign()
    return marks


@dataclass
class StatusReport:
    """Every section holds its data, or ``{"error": ...}`` when its dependency failed."""

    events: dict[str, Any] = field(default_factory=dict)
    queue: dict[str, Any] = field(default_factory=dict)
    kafka: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any("error" in s for s in (self.events, self.queue, self.kafka))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def status(settings: Settings) -> StatusReport:
    """Gather the status sections concurrently; a failing section carries its error."""
    report = StatusReport()
    trio.run(_gather_status, settings, report)
    return report


async def _gather_status(settings: Settings, report: StatusReport) -> None:
    import trio_asyncio

    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(_section, report.events, _events_section, settings)
        nursery.start_soon(_section, report.queue, _queue_section, settings)
        nursery.start_soon(_section, report.kafka, _kafka_section_async, settings)


async def _section(into: dict[str, Any], fn: Callable[[Settings], Any], settings: Settings) -> None:
    try:
        with trio.fail_after(SECTION_TIMEOUT + 2):
            into.update(await fn(settings))
    except trio.TooSlowError:
        into["error"] = f"no answer within {SECTION_TIMEOUT + 2:g}s"
    except EventschedError as err:
        into["error"] = redact(str(err))


async def _events_section(settings: Settings) -> dict[str, Any]:
    from eventsched.core.store import events as eventstore
    from eventsched.core.store.pool import Database

    db = await Database.open(
        require_postgres(settings), min_size=1, max_size=1, connect_timeout=SECTION_TIMEOUT
    )
    try:
        counts = await eventstore.status_counts(db)
        overdue = await eventstore.oldest_overdue(db)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await db.close()
    return {
        "by_status": counts.counts,
        "succeeded_estimated": counts.estimated,
        "oldest_overdue": None
        if overdue is None
        else {
            "id": str(overdue.id),
            "execute_at": format_time(overdue.execute_at),
            "overdue_seconds": round(overdue.overdue_seconds, 3),
        },
    }


async def _queue_section(settings: Settings) -> dict[str, Any]:
    """The queue's job counts, summed over the shards; with several shards, each shard's
    too, and an error naming every shard that did not answer (the sums then leave it out)."""
    from eventsched.core.jobqueue import ShardedQueue
    from eventsched.core.jobqueue.shards import sum_counts

    queue = ShardedQueue(
        require_redis(settings), settings.redis.queue, connect_timeout=SECTION_TIMEOUT
    )
    shards: list[dict[str, Any]] = []
    answered: list[dict[str, int]] = []
    errors: list[DependencyError] = []
    try:
        for index, shard in enumerate(queue.shards):
            try:
                await shard.connect()
                counts = await shard.counts()
            except DependencyError as err:
                shards.append({"shard": index, "error": redact(str(err))})
                errors.append(err)
            else:
                shards.append({"shard": index, **counts})
                answered.append(counts)
    finally:
        await queue.close()
    if len(shards) == 1:
        if errors:
            raise errors[0]
        return {"name": settings.redis.queue, **answered[0]}
    section: dict[str, Any] = {"name": settings.redis.queue, **sum_counts(answered)}
    section["shards"] = shards
    if errors:
        section["error"] = "; ".join(redact(str(err)) for err in errors)
    return section


async def _kafka_section_async(settings: Settings) -> dict[str, Any]:
    section: dict[str, Any] = await trio.to_thread.run_sync(
        kafka_status, settings, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True
    )
    return section


def kafka_status(settings: Settings, timeout: float = SECTION_TIMEOUT) -> dict[str, Any]:
    """Consumer-group lag per partition and the DLQ size (blocking)."""
    k = settings.kafka
    admin = _admin(settings)
    consumer = new_reader(settings, k.consumer_group)
    try:
        partitions = topic_partitions(consumer, k.topic, timeout)
        try:
            committed = consumer.committed([TP(k.topic, p) for p in partitions], timeout=timeout)
        except KafkaException as err:
            raise DependencyError("kafka", f"cannot read committed offsets: {err}") from err
        marks = high_watermarks(admin, consumer, k.topic, partitions, timeout)
        lag: dict[str, dict[str, int | None]] = {}
        for tp in committed:
            low, high = marks[tp.partition]
            position = tp.offset if tp.offset >= 0 else None
            lag[str(tp.partition)] = {
                "committed": position,
                "high_watermark": high,
                "lag": high - (low if position is None else position),
            }
        dlq_partitions = topic_partitions(consumer, k.dlq_topic, timeout)
        dlq_marks = high_watermarks(admin, consumer, k.dlq_topic, dlq_partitions, timeout)
        return {
            "topic": k.topic,
            "group": k.consumer_group,
            "lag": lag,
            "total_lag": sum(int(v["lag"] or 0) for v in lag.values()),
            "dlq_topic": k.dlq_topic,
            "dlq_size": sum(high - low for low, high in dlq_marks.values()),
        }
    finally:
        consumer.close()


def render_status(report: StatusReport) -> str:
    """The human view of ``eventsched status``."""
    lines: list[str] = ["EVENTS (PostgreSQL)"]
    events = report.events
    if "error" in events:
        lines.append(f"  {events['error']}")
    else:
        for name, count in events["by_status"].items():
            note = " (estimated)" if name == "succeeded" and events["succeeded_estimated"] else ""
            lines.append(f"  {name:<10} {count:>12}{note}")
        overdue = events["oldest_overdue"]
        if overdue is None:
            lines.append("  oldest overdue: none")
        else:
            lines.append(
                f"  oldest overdue: {overdue['id']} due {overdue['execute_at']}, "
                f"{overdue['overdue_seconds']:.1f}s ago"
            )
    queue = report.queue
    lines.append(f"QUEUE (Redis, SAQ queue {queue.get('name', '?')})")
    if "queued" in queue:
        for name in ("queued", "scheduled", "active"):
            lines.append(f"  {name:<10} {queue[name]:>12}")
    for shard in queue.get("shards", ()):
        if "error" in shard:
            lines.append(f"  shard {shard['shard']}: down")
        else:
            counts = ", ".join(
                f"{name} {shard[name]}" for name in ("queued", "scheduled", "active")
            )
            lines.append(f"  shard {shard['shard']}: {counts}")
    if "error" in queue:
        lines.append(f"  {queue['error']}")
    kafka = report.kafka
    lines.append("KAFKA")
    if "error" in kafka:
        lines.append(f"  {kafka['error']}")
    else:
        lines.append(f"  consumer lag, group {kafka['group']} on {kafka['topic']}:")
        for partition, info in kafka["lag"].items():
            committed = "none" if info["committed"] is None else info["committed"]
            lines.append(
                f"    partition {partition:>3}  lag {info['lag']:>10}  "
                f"(committed {committed}, end {info['high_watermark']})"
            )
        lines.append(f"    total lag {kafka['total_lag']}")
        lines.append(f"  DLQ {kafka['dlq_topic']}: {kafka['dlq_size']} messages")
    return "\n".join(lines)
