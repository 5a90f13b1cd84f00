"""Operator commands behind the CLI: ``send``, ``status``, ``dlq list`` and ``dlq replay``.

These are short-lived command-line actions, not part of the trio runtime, so the Kafka
parts use confluent-kafka's blocking clients directly (created, used and closed on one
thread); ``status`` runs its PostgreSQL and Redis queries through the usual adapters in one
``trio.run`` with the Kafka part in a worker thread, every section under a time limit.

High watermarks: Tansu answers ListOffsets(latest) with the base offset of the last record
batch + 1 instead of the end of the partition. Fetch responses carry the right high
watermark, so :func:`high_watermarks` reads the tail of every partition (one batch at most)
and trusts the larger of the two. On Kafka this costs one small fetch per partition.

DLQ replay progress lives in a consumer group of its own, per reason filter
(``kafka.replay_group``, or ``<replay_group>.<reason>`` with ``--reason``), so replaying
one class of failures never passes over messages of another. The group is used with
``assign()`` and explicit commits, never joined: nothing to wait for, no rebalance. A letter
of the executor re-runs its dead event (PostgreSQL compare-and-set, then the job in Redis,
both from the trio side of one ``trio.run`` while the Kafka loop runs in a worker thread); a
letter of the consumer is re-sent to the events topic (see :func:`dlq_replay`).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as TP
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import AdminClient

from eventsched.core.domain.deadletter import DLQ_HEADER_NAMES
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event, format_time, parse_time
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.kafka import ClientKind, config_from_settings
from eventsched.core.runtime.errors import DecodeError, DependencyError, EventschedError
from eventsched.core.runtime.settings import (
    Settings,
    parse_duration,
    redact,
    require_postgres,
    require_redis,
)
from eventsched.core.store.executions import DEAD_REASONS

if TYPE_CHECKING:
    from eventsched.core.jobqueue import JobQueue
    from eventsched.core.store.pool import Database

T = TypeVar("T")

#: Seconds each ``status`` section (and each Kafka request) may take.
SECTION_TIMEOUT: Final = 5.0
#: Characters of a DLQ value shown by ``dlq list``.
PREVIEW_CHARS: Final = 120
#: A dead letter with a header starting with this was cut to fit (key, headers or value):
#: replaying it would publish something else than the original. ``dlq-truncated-from``
#: is what older versions wrote for a cut value.
TRUNCATED_PREFIX: Final = "dlq-truncated-"
#: Replayed messages per delivery check and commit.
REPLAY_CHUNK: Final = 100


class InputError(EventschedError):
    """A command-line value is unusable; the CLI prints one line and exits 2."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")


# -- send ------------------------------------------------------------------------------


def build_event(
    settings: Settings,
    *,
    type_: str,
    at: str | None,
    in_: str | None,
    payload: str | None,
    key: str | None,
    now: datetime | None = None,
) -> Event:
    """The event ``eventsched send`` publishes; InputError names the bad option."""
    if (at is None) == (in_ is None):
        raise InputError("--at/--in", "give exactly one of --at TIME or --in DURATION")
    now = now or datetime.now(UTC)
    if at is not None:
        try:
            due = parse_time(at)
        except DecodeError:
            raise InputError(
                "--at", f"{at!r} is not an RFC 3339 time with an offset (2030-01-31T09:00:00Z)"
            ) from None
    else:
        assert in_ is not None
        try:
            due = now + timedelta(seconds=parse_duration(in_))
        except ValueError as err:
            raise InputError("--in", str(err)) from None
    data: Any = {}
    if payload is not None:
        data = _parse_payload(payload)
    limits = settings.consumer
    if due > now + timedelta(seconds=limits.horizon):
        raise InputError(
            "--at/--in", f"more than consumer.horizon ({_human(limits.horizon)}) ahead"
        )
    if due < now - timedelta(seconds=limits.max_past):
        raise InputError("--at", f"more than consumer.max_past ({_human(limits.max_past)}) ago")
    try:
        event = new_event(type_, data, due, idempotency_key=key)
    except ValueError as err:
        text = str(err)
        option = (
            "--key"
            if "idempotency" in text
            else "--payload"
            if text.startswith("payload")
            else "--type"
        )
        raise InputError(option, text) from None
    _check_as_consumer(event, DecodeLimits.from_settings(limits), now)
    return event


def _parse_payload(payload: str) -> Any:
    """The ``--payload`` JSON object; every parser failure is an InputError."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as err:
        raise InputError("--payload", f"not valid JSON ({err.msg} at {err.pos})") from None
    except RecursionError:
        raise InputError("--payload", "not valid JSON (nested too deeply to parse)") from None
    except ValueError as err:  # an integer beyond the int-string conversion limit
        detail = str(err).split(";")[0]
        raise InputError("--payload", f"not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise InputError("--payload", "must be a JSON object ({...})")
    return data


#: The option to blame for each reason the consumer's decoder can give.
_OPTION_OF_REASON: Final = {
    "invalid_type": "--type",
    "invalid_key": "--key",
    "too_old": "--at/--in",
    "beyond_horizon": "--at/--in",
    "invalid_timestamp": "--at/--in",
}


def _check_as_consumer(event: Event, limits: DecodeLimits, now: datetime) -> None:
    """Decode the bytes ``send`` would publish with the consumer's own decoder and limits
    (depth, size, number range, ...), so that nothing ``send`` accepts is dead-lettered;
    InputError names the option to blame."""
    value = encode_event(event)
    try:
        decode_event(value, now=now, limits=limits, headers=dict(kafka_headers()))
    except DecodeError as err:
        if err.reason == "too_large":
            raise InputError(
                "--payload",
                f"the event is {len(value)} bytes encoded, more than "
                f"consumer.max_message_bytes ({limits.max_message_bytes})",
            ) from None
        option = _OPTION_OF_REASON.get(err.reason, "--payload")
        raise InputError(option, err.detail) from None


def _human(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def send_event(settings: Settings, event: Event, *, timeout: float = 15.0) -> tuple[int, int]:
    """Publish ``event`` (idempotent producer, acks=all); returns (partition, offset)."""
    config = config_from_settings(
        settings, ClientKind.PRODUCER, own={"message.timeout.ms": int(timeout * 1000)}
    )
    producer = _client(Producer, config)
    outcome: dict[str, Any] = {}
    headers: list[tuple[str, str | bytes | None]] = [*kafka_headers()]

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        outcome["error"] = err
        outcome["where"] = (msg.partition(), msg.offset())

    try:
        producer.produce(
            settings.kafka.topic,
            value=encode_event(event),
            key=kafka_key(event),
            headers=headers,
            on_delivery=on_delivery,
        )
    except (KafkaException, BufferError) as err:
        raise DependencyError("kafka", f"cannot send: {err}") from err
    producer.flush(timeout + 1)
    if "error" not in outcome:
        raise DependencyError("kafka", f"no delivery report within {timeout:g}s")
    if outcome["error"] is not None:
        raise DependencyError("kafka", f"delivery failed: {outcome['error'].str()}")
    where: tuple[int, int] = outcome["where"]
    return where


# -- Kafka helpers -----------------------------------------------------------------------


def _client(cls: Callable[[dict[str, Any]], T], config: dict[str, Any]) -> T:
    # librdkafka would print every client error to stderr; keep the command's output clean
    # and let the calls' own errors speak.
    config.setdefault("error_cb", lambda err: None)
    config.setdefault("log_level", 0)
    try:
        return cls(config)
    except (KafkaException, ValueError, TypeError) as err:
        raise DependencyError("kafka", f"cannot create client: {err}") from err


def _reader(settings: Settings, group: str, **extra: Any) -> Consumer:
    return _client(
        Consumer,
        config_from_settings(
            settings,
            ClientKind.READER,
            own={
                "group.id": group,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                # Short long-polls: an empty partition answers (EOF) quickly.
                "fetch.wait.max.ms": 100,
                **extra,
            },
        ),
    )


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as err:
        raise DependencyError("kafka", f"cannot list topic {topic}: {err}") from err
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise DependencyError("kafka", f"topic {topic} does not exist")
    return sorted(info.partitions)


# OffsetSpec is public API, but confluent-kafka's stubs neither export nor type it.
_EARLIEST: Final = kafka_admin.OffsetSpec.earliest()  # type: ignore[attr-defined,no-untyped-call]
_LATEST: Final = kafka_admin.OffsetSpec.latest()  # type: ignore[attr-defined,no-untyped-call]


def _admin(settings: Settings) -> AdminClient:
    return _client(AdminClient, config_from_settings(settings, ClientKind.ADMIN))


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


# -- status ------------------------------------------------------------------------------


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
    from eventsched.core.jobqueue import JobQueue

    queue = JobQueue(require_redis(settings), settings.redis.queue, connect_timeout=SECTION_TIMEOUT)
    try:
        await queue.connect()
        counts = await queue.counts()
    finally:
        await queue.close()
    return {"name": settings.redis.queue, **counts}


async def _kafka_section_async(settings: Settings) -> dict[str, Any]:
    section: dict[str, Any] = await trio.to_thread.run_sync(
        kafka_status, settings, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True
    )
    return section


def kafka_status(settings: Settings, timeout: float = SECTION_TIMEOUT) -> dict[str, Any]:
    """Consumer-group lag per partition and the DLQ size (blocking)."""
    k = settings.kafka
    admin = _admin(settings)
    consumer = _reader(settings, k.consumer_group)
    try:
        partitions = _partitions(consumer, k.topic, timeout)
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
        dlq_partitions = _partitions(consumer, k.dlq_topic, timeout)
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
    if "error" in queue:
        lines.append(f"  {queue['error']}")
    else:
        for name in ("queued", "scheduled", "active"):
            lines.append(f"  {name:<10} {queue[name]:>12}")
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


# -- DLQ ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DlqMessage:
    partition: int
    offset: int
    timestamp: str | None
    key: str | None
    reason: str | None
    error: str | None
    source: str | None
    failed_at: str | None
    value_bytes: int
    preview: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: bytes | None, limit: int | None = None) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8", "backslashreplace")
    if limit is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return text


def _dlq_message(message: Any) -> DlqMessage:
    headers: dict[str, bytes | None] = dict(message.headers() or [])
    kind, ts = message.timestamp()
    value: bytes = message.value() or b""
    source = None
    if headers.get("source-topic") is not None:
        source = (
            f"{_text(headers['source-topic'])}/{_text(headers.get('source-partition'))}"
            f"@{_text(headers.get('source-offset'))}"
        )
    return DlqMessage(
        partition=message.partition(),
        offset=message.offset(),
        timestamp=None if kind == 0 else format_time(datetime.fromtimestamp(ts / 1000, UTC)),
        key=_text(message.key(), 80),
        reason=_text(headers.get("dlq-reason")),
        error=_text(headers.get("dlq-error")),
        source=source,
        failed_at=_text(headers.get("failed-at")),
        value_bytes=len(value),
        preview=_text(value, PREVIEW_CHARS) or "",
    )


def _read(
    consumer: Consumer,
    topic: str,
    starts: Mapping[int, int],
    visit: Callable[[Any], bool],
    timeout: float,
) -> None:
    """Read ``topic`` from ``starts`` until every partition is at its end, calling
    ``visit(message)`` in partition order of arrival; ``visit`` returns False to stop.

    ``timeout`` bounds the silence between two fetches, not the whole read.
    """
    consumer.assign([TP(topic, p, offset) for p, offset in starts.items()])
    waiting = set(starts)
    last_progress = time.monotonic()
    while waiting:
        messages = consumer.consume(500, 0.2)
        if messages:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > timeout:
            raise DependencyError("kafka", f"reading {topic}: no answer within {timeout:g}s")
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    waiting.discard(message.partition())
                    continue
                if error.fatal():
                    raise DependencyError("kafka", f"reading {topic}: {error.str()}")
                continue
            partition = message.partition()
            if partition is not None:
                waiting.add(partition)
            if not visit(message):
                return


def dlq_list(
    settings: Settings, *, limit: int = 50, timeout: float = SECTION_TIMEOUT
) -> list[DlqMessage]:
    """The oldest ``limit`` DLQ messages (by broker timestamp), read with assign():
    no group membership, nothing committed."""
    topic = settings.kafka.dlq_topic
    consumer = _reader(settings, f"{settings.kafka.replay_group}.list")
    try:
        partitions = _partitions(consumer, topic, timeout)
        per_partition: dict[int, int] = {p: 0 for p in partitions}
        found: list[DlqMessage] = []

        def visit(message: Any) -> bool:
            # At most `limit` per partition: enough to pick the oldest `limit` of all.
            if per_partition[message.partition()] < limit:
                per_partition[message.partition()] += 1
                found.append(_dlq_message(message))
            return any(n < limit for n in per_partition.values())

        _read(consumer, topic, {p: OFFSET_BEGINNING for p in partitions}, visit, timeout)
    finally:
        consumer.close()
    found.sort(key=lambda m: (m.timestamp or "", m.partition, m.offset))
    return found[:limit]


def render_dlq(messages: list[DlqMessage]) -> str:
    if not messages:
        return "DLQ is empty"
    lines = []
    for m in messages:
        lines.append(
            f"{m.partition}:{m.offset}  {m.timestamp or '-'}  reason={m.reason or '-'}  "
            f"key={m.key if m.key is not None else '-'}  from={m.source or '-'}"
        )
        if m.error:
            lines.append(f"    error: {m.error}")
        lines.append(f"    value ({m.value_bytes} bytes): {m.preview}")
    return "\n".join(lines)


#: Why a letter was skipped (the keys of ReplayResult.skipped).
SKIP_FILTERED: Final = "dlq-reason is not {reason}"
SKIP_TRUNCATED: Final = "the copy was cut to fit the DLQ (cannot be re-sent)"
SKIP_NOT_DEAD: Final = "event is {status}, not dead"
SKIP_DEAD_AGAIN: Final = "event went dead again after this letter (its newer letter re-runs it)"
SKIP_UNKNOWN: Final = "event not in PostgreSQL"
SKIP_BAD_ID: Final = "event-id header is not a UUID"

#: Headers of a letter the executor published (``DeadLetters.message``); such a letter is
#: told from the consumer's by ``event-id`` and a ``dlq-reason`` only the executor gives.
EVENT_ID_HEADER: Final = "event-id"
ATTEMPTS_HEADER: Final = "attempts"
_EXECUTOR_REASONS: Final = frozenset(reason.encode() for reason in DEAD_REASONS)


@dataclass
class ReplayResult:
    """What ``dlq replay`` did with each letter it read: re-ran the dead event, re-sent the
    message to the events topic, or skipped it (counted by reason)."""

    rerun: int = 0
    resent: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    group: str = ""
    dry_run: bool = False

    @property
    def replayed(self) -> int:
        return self.rerun + self.resent


def render_replay(result: ReplayResult) -> str:
    """The summary line of ``eventsched dlq replay``, then one line per skip reason."""
    skipped = sum(result.skipped.values())
    if result.dry_run:
        head = f"would re-run {result.rerun}, would re-send {result.resent}, would skip {skipped}"
    else:
        head = f"re-run {result.rerun}, re-sent {result.resent}, skipped {skipped}"
    lines = [f"{head} (group {result.group})"]
    lines += [f"  {n} {why}" for why, n in result.skipped.most_common()]
    return "\n".join(lines)


# A dead event runs again: compare-and-set `dead` -> `scheduled` for the death this letter
# reported (same attempt count), due now (next_attempt_at: the claim takes a re-run's due
# time from there; execute_at stays the event's own), with a fresh budget from attempt_base.
# last_error is kept: it is the error of the most recent failed attempt until the next one.
# The DLQ bookkeeping is cleared so that another death is published again.
_RERUN_SQL: Final = """
UPDATE events
SET status = 'scheduled', attempt_base = attempts, next_attempt_at = now(),
    finished_at = NULL, dead_reason = NULL, dlq_published_at = NULL, updated_at = now()
WHERE id = %(id)s AND status = 'dead' AND (%(attempts)s::int IS NULL OR attempts = %(attempts)s)
RETURNING extract(epoch FROM next_attempt_at)::float8
"""
_STATE_SQL: Final = "SELECT status, attempts FROM events WHERE id = %(id)s"


class _Reruns:
    """The PostgreSQL and Redis side of a replay (trio side, opened on first use)."""

    def __init__(self, settings: Settings, dry_run: bool) -> None:
        self._settings = settings
        self._dry_run = dry_run
        self._db: Database | None = None
        self._queue: JobQueue | None = None
        self._would_rerun: set[str] = set()  # dry run: events an earlier letter re-runs

    async def rerun(self, event_id: str, attempts: int | None) -> str | None:
        """Re-run the event if it is dead from the death this letter reported; None if it
        was re-run (or would be, in a dry run), else why not."""
        from eventsched.core.domain.jobcontract import make_job, saq_timeout
        from eventsched.core.store.pool import Database

        if self._db is None:
            self._db = await Database.open(
                require_postgres(self._settings), min_size=1, max_size=1,
                connect_timeout=SECTION_TIMEOUT,
            )  # fmt: skip
        params = {"id": event_id, "attempts": attempts}
        if self._dry_run:
            row = await self._db.fetchone(_STATE_SQL, params)
            if event_id in self._would_rerun:
                return SKIP_NOT_DEAD.format(status="scheduled")  # as it would be by now
            if row is not None and row[0] == "dead" and attempts in (None, row[1]):
                self._would_rerun.add(event_id)
                return None
            return _why_not(row)
        row = await self._db.fetchone(_RERUN_SQL, params)
        if row is None:
            return _why_not(await self._db.fetchone(_STATE_SQL, params))
        try:
            queue = await self._connected_queue()
            await queue.enqueue_many([make_job(event_id, 1, row[0], saq_timeout(self._settings))])
        except DependencyError as err:
            raise DependencyError(
                "redis",
                f"{err.problem}; event {event_id} is scheduled again in PostgreSQL, and the "
                "executor's reconciler enqueues it after reconciler.grace",
            ) from err
        return None

    async def _connected_queue(self) -> JobQueue:
        from eventsched.core.jobqueue import JobQueue

        if self._queue is None:
            queue = JobQueue(
                require_redis(self._settings), self._settings.redis.queue,
                connect_timeout=SECTION_TIMEOUT,
            )  # fmt: skip
            try:
                await queue.connect()
            except DependencyError:
                await queue.close()
                raise
            self._queue = queue
        return self._queue

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            if self._queue is not None:
                await self._queue.close()
            if self._db is not None:
                await self._db.close()


def _why_not(row: tuple[Any, ...] | None) -> str:
    if row is None:
        return SKIP_UNKNOWN
    status, _ = row
    return SKIP_DEAD_AGAIN if status == "dead" else SKIP_NOT_DEAD.format(status=status)


def dlq_replay(
    settings: Settings,
    *,
    reason: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    timeout: float = SECTION_TIMEOUT,
) -> ReplayResult:
    """Replay DLQ letters; each one is re-run, re-sent or skipped (see :class:`ReplayResult`).

    * A letter of the executor (an ``event-id`` header and a ``dlq-reason`` of
      ``execstore.DEAD_REASONS``): the event is set back
      from ``dead`` to ``scheduled``, due now, with a fresh attempt budget (compare-and-set
      on the death the letter reported: its ``attempts``), and its job is enqueued as the
      executor's first attempt. An event that is not dead any more, or died again since
      (a newer letter), or is unknown is skipped: replaying a letter twice re-runs once.
    * A letter of the consumer (a message that could not be decoded or stored): re-sent to
      ``kafka.topic`` (original value, key and non-DLQ headers), unless the consumer had to
      cut its value.

    Starts at the replay group's committed offsets (the beginning the first time); letters
    whose ``dlq-reason`` does not match ``reason`` are skipped. Progress is committed after
    each chunk's re-sends are acknowledged, so an interrupted replay resumes where it stopped
    (at worst re-sending one chunk, which the consumer absorbs as duplicates; a re-run is not
    repeated, see above). ``limit`` bounds the letters re-run or re-sent. ``dry_run`` changes,
    sends and commits nothing (it reads PostgreSQL to tell re-runs from skips).

    The Kafka part runs blocking in a worker thread; PostgreSQL and Redis are used from the
    trio side (``trio.from_thread``), opened only when an executor letter shows up.
    """
    k = settings.kafka
    group = k.replay_group if reason is None else f"{k.replay_group}.{reason}"
    result = ReplayResult(group=group, dry_run=dry_run)

    async def main() -> None:
        import trio_asyncio

        async with trio_asyncio.open_loop():
            reruns = _Reruns(settings, dry_run)
            try:
                await trio.to_thread.run_sync(
                    functools.partial(
                        _replay_letters, settings, group, reason, limit, dry_run, timeout,
                        result, reruns,
                    ),
                    limiter=trio.CapacityLimiter(1),
                )  # fmt: skip
            finally:
                await reruns.close()

    trio.run(main)
    return result


def _replay_letters(
    settings: Settings,
    group: str,
    reason: str | None,
    limit: int | None,
    dry_run: bool,
    timeout: float,
    result: ReplayResult,
    reruns: _Reruns,
) -> None:
    """The Kafka side of :func:`dlq_replay` (a worker thread)."""
    k = settings.kafka
    consumer = _reader(settings, group)
    producer = None
    if not dry_run:
        producer = _client(Producer, config_from_settings(settings, ClientKind.PRODUCER))
    pending: list[tuple[int, int]] = []  # (partition, next offset) examined, not committed
    failures: list[str] = []

    def flush() -> None:
        if producer is not None:
            left = producer.flush(timeout * 3)
            if left or failures:
                problem = failures[0] if failures else f"{left} messages undelivered"
                raise DependencyError("kafka", f"replay delivery failed: {problem}")
        if pending and not dry_run:
            offsets: dict[int, int] = {}
            for partition, offset in pending:
                offsets[partition] = max(offsets.get(partition, 0), offset)
            try:
                consumer.commit(
                    offsets=[TP(k.dlq_topic, p, o) for p, o in offsets.items()],
                    asynchronous=False,
                )
            except KafkaException as err:
                raise DependencyError("kafka", f"cannot commit replay progress: {err}") from err
        pending.clear()

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    def visit(message: Any) -> bool:
        headers = list(message.headers() or [])
        by_name = dict(headers)
        dlq_reason = by_name.get("dlq-reason")
        event_id = by_name.get(EVENT_ID_HEADER)
        if reason is not None and dlq_reason != reason.encode():
            result.skipped[SKIP_FILTERED.format(reason=reason)] += 1
        elif event_id is not None and dlq_reason in _EXECUTOR_REASONS:
            # A re-run reads the event from PostgreSQL: a cut copy re-runs as well.
            why_not = _rerun(event_id, by_name.get(ATTEMPTS_HEADER), reruns)
            if why_not is None:
                result.rerun += 1
            else:
                result.skipped[why_not] += 1
        elif any(name.startswith(TRUNCATED_PREFIX) for name in by_name):
            result.skipped[SKIP_TRUNCATED] += 1
        else:
            if producer is not None:
                original = [(n, v) for n, v in headers if n not in DLQ_HEADER_NAMES]
                producer.produce(
                    k.topic,
                    value=message.value(),
                    key=message.key(),
                    headers=original,
                    on_delivery=on_delivery,
                )
                producer.poll(0)
            result.resent += 1
        pending.append((message.partition(), message.offset() + 1))
        if len(pending) >= REPLAY_CHUNK:
            flush()
        return limit is None or result.replayed < limit

    try:
        partitions = _partitions(consumer, k.dlq_topic, timeout)
        try:
            committed = consumer.committed(
                [TP(k.dlq_topic, p) for p in partitions], timeout=timeout
            )
        except KafkaException as err:
            raise DependencyError("kafka", f"cannot read replay progress: {err}") from err
        starts = {
            tp.partition: tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed
        }
        if limit is None or limit > 0:
            _read(consumer, k.dlq_topic, starts, visit, timeout)
        flush()
    finally:
        consumer.close()


def _rerun(raw_id: bytes | None, raw_attempts: bytes | None, reruns: _Reruns) -> str | None:
    """Worker-thread side of a re-run: check the headers, then ask the trio side."""
    try:
        event_id = str(uuid.UUID((raw_id or b"").decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return SKIP_BAD_ID
    attempts: int | None
    try:
        attempts = int(raw_attempts) if raw_attempts is not None else None
    except ValueError:
        attempts = None
    why_not: str | None = trio.from_thread.run(reruns.rerun, event_id, attempts)
    return why_not
