"""``eventsched dlq list`` and ``eventsched dlq replay``: read the dead-letter topic, replay it.

Both read the topic with ``assign()`` (blocking consumer): ``dlq list`` commits nothing;
``dlq replay`` keeps its progress in a consumer group of its own, per reason filter
(``kafka.replay_group``, or ``<replay_group>.<reason>`` with ``--reason``), so replaying
one class of failures never passes over messages of another. The group is used with
``assign()`` and explicit commits, never joined: nothing to wait for, no rebalance. A letter
of the executor re-runs its dead event (:mod:`eventsched.core.store.replay`, then the job in
Redis, both from the trio side of one ``trio.run`` while the Kafka loop runs in a worker
thread); a letter of the consumer is re-sent to the events topic (see :func:`dlq_replay`).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import trio
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as TP

from eventsched.core.domain.deadletter import DLQ_HEADER_NAMES, DLQ_TRUNCATED_PREFIX
from eventsched.core.domain.event import format_time
from eventsched.core.kafka import ClientKind, config_from_settings
from eventsched.core.operations.oneshot import (
    SECTION_TIMEOUT,
    new_client,
    new_reader,
    topic_partitions,
)
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.settings import Settings, require_postgres, require_redis
from eventsched.core.store.executions import DEAD_REASONS

if TYPE_CHECKING:
    from eventsched.core.domain.policies import Policies
    from eventsched.core.jobqueue import ShardedQueue
    from eventsched.core.store.pool import Database

#: Characters of a DLQ value shown by ``dlq list``.
PREVIEW_CHARS: Final = 120
#: Replayed messages per delivery check and commit.
REPLAY_CHUNK: Final = 100


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
    consumer = new_reader(settings, f"{settings.kafka.replay_group}.list")
    try:
        partitions = topic_partitions(consumer, topic, timeout)
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


class _Reruns:
    """The PostgreSQL and Redis side of a replay (trio side, opened on first use)."""

    def __init__(self, settings: Settings, dry_run: bool) -> None:
        self._settings = settings
        self._dry_run = dry_run
        self._db: Database | None = None
        self._queue: ShardedQueue | None = None
        self._would_rerun: set[str] = set()  # dry run: events an earlier letter re-runs
        self._policies: Policies | None = None  # the types' lanes, read on first use

    async def rerun(self, event_id: str, attempts: int | None) -> str | None:
        """Re-run the event if it is dead from the death this letter reported; None if it
        was re-run (or would be, in a dry run), else why not."""
        from eventsched.core.domain.jobcontract import FIRST_ATTEMPT, make_job, saq_timeout
        from eventsched.core.store import replay
        from eventsched.core.store.pool import Database

        if self._db is None:
            self._db = await Database.open(
                require_postgres(self._settings), min_size=1, max_size=1,
                connect_timeout=SECTION_TIMEOUT,
            )  # fmt: skip
        if self._dry_run:
            state = await replay.event_state(self._db, event_id)
            if event_id in self._would_rerun:
                return SKIP_NOT_DEAD.format(status="scheduled")  # as it would be by now
            if state is not None and state[0] == "dead" and attempts in (None, state[1]):
                self._would_rerun.add(event_id)
                return None
            return _why_not(state)
        rerun = await replay.rerun_dead(self._db, event_id, attempts)
        if rerun is None:
            return _why_not(await replay.event_state(self._db, event_id))
        if self._policies is None:
            from eventsched.core.domain.policies import Policies

            self._policies = Policies(self._settings)
        # Its lane (per-type limits): the event's mark in Redis may have been lost since.
        lane = self._policies.lane_of(rerun.type)
        job = make_job(
            event_id, FIRST_ATTEMPT, rerun.due, saq_timeout(self._settings), day=rerun.day,
            lane=lane, size=rerun.size,
        )  # fmt: skip
        try:
            queue = await self._connected_queue()
            await queue.enqueue_many([job])
        except DependencyError as err:
            raise DependencyError(
                "redis",
                f"{err.problem}; event {event_id} is scheduled again in PostgreSQL, and the "
                "executor's reconciler enqueues it after reconciler.grace",
            ) from err
        return None

    async def _connected_queue(self) -> ShardedQueue:
        from eventsched.core.jobqueue import ShardedQueue

        if self._queue is None:
            queue = ShardedQueue(
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


def _why_not(state: tuple[str, int] | None) -> str:
    if state is None:
        return SKIP_UNKNOWN
    status, _ = state
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
    consumer = new_reader(settings, group)
    producer = None
    if not dry_run:
        producer = new_client(Producer, config_from_settings(settings, ClientKind.PRODUCER))
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
        elif any(name.startswith(DLQ_TRUNCATED_PREFIX) for name in by_name):
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
        partitions = topic_partitions(consumer, k.dlq_topic, timeout)
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
