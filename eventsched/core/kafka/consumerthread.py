"""The consumer thread: every call on a confluent-kafka ``Consumer``, rebalance callbacks
and generation-checked commits.

Owns :class:`_ConsumerWorker` and the inbox items trio sends it. Everything here runs on
the consumer's worker thread; it reaches trio only through the :class:`_TrioPort` of its
:class:`~eventsched.core.kafka.consumer.KafkaConsumer`.
"""

from __future__ import annotations

import itertools
import queue
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from eventsched.core.kafka.bridge import (
    _Call,
    _code,
    _describe,
)
from eventsched.core.kafka.records import (
    Batch,
    CommitResult,
    Record,
    TopicPartitionKey,
)
from eventsched.core.runtime.errors import ConfigError, DependencyError

if TYPE_CHECKING:
    from eventsched.core.kafka.consumer import KafkaConsumer

# One logger name for the whole adapter: its lines are found under one name.
log = structlog.get_logger("eventsched.core.kafka")


@dataclass(frozen=True, slots=True)
class _Done:
    """Posted to the consumer inbox when a trio task the thread waits for has ended."""

    ticket: int
    ok: bool


class _Signal:
    """Inbox sentinels from trio to the consumer thread."""

    STOP: Final = object()  # stop fetching; keep serving calls
    CLOSE: Final = object()  # close the consumer and end the thread


# Commit errors that mean "you are no longer the owner" rather than "the broker is sick".
_LOST_OWNERSHIP: Final = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError._ASSIGNMENT_LOST,
    }
)


class _ConsumerWorker:
    """Everything that runs on the consumer thread, including rebalance callbacks.

    The assignment bookkeeping (``_generation``, ``_owned``) is touched only here, and
    commits are validated here too, so a commit can never interleave with a revocation.
    """

    WAIT_SLICE: Final = 0.5  # how often a waiting thread checks whether it was abandoned
    # Once trio has left a batch untaken this long, the thread "holds": it pauses every
    # assigned partition and keeps calling consume() (which then returns nothing) so that
    # rebalances are served and max.poll.interval.ms never expires, however slow trio is.
    HOLD_AFTER: Final = 1.0

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        max_batch: int,
        poll_timeout: float,
        trio_side: KafkaConsumer,
    ) -> None:
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.batches_fetched = 0
        self.records_fetched = 0
        self._config = dict(config)
        self._topics = list(topics)
        self._max_batch = max_batch
        self._poll_timeout = poll_timeout
        self._trio = trio_side
        self._port = trio_side._port
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy", ""))
        self._consumer: Consumer | None = None
        self._generation = 0
        self._owned: dict[TopicPartitionKey, int] = {}  # partition -> generation assigned
        self._paused = False  # paused by the caller
        self._holding = False  # paused by us while trio does not take a batch
        self._done_tickets: dict[int, bool] = {}
        self._intake = True
        self._closing = False
        self._tickets = itertools.count(1)
        self._log = log.bind(group=str(config.get("group.id")))
        self._headers = _SharedHeaders()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        try:
            consumer = Consumer(self._config)
        except (KafkaException, ValueError, TypeError) as err:
            raise ConfigError("kafka.consumer", _describe(err)) from err
        consumer.subscribe(
            self._topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer

    def run(self) -> None:
        try:
            while not self._closing:
                self._serve_inbox(block=not self._intake or self._consumer is None)
                if self._closing or self._consumer is None:
                    continue
                if not self._intake:
                    # Stopped but not closed yet: stay in the group, fetching nothing, so
                    # the caller's last commits remain valid until it closes us.
                    self._poll_while_holding()
                    continue
                # The Message list is a temporary: confluent's Message objects (each with
                # its own header list) are freed once copied into Records, not kept alive
                # while the hand-off waits for trio and the next consume() fills another.
                batch = self._to_batch(self._consumer.consume(self._max_batch, self._poll_timeout))
                if batch is not None:
                    self._hand_off(batch)
                    del batch  # trio's now; not kept through the next consume()
        finally:
            self._close_consumer()

    def _close_consumer(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        self._intake = False
        try:
            # Runs the revoke callback (and so the caller's on_revoke hook, whose commits
            # need self._consumer still set) on this thread. LeaveGroup may time out on
            # some brokers (Tansu); that is harmless.
            consumer.close()
        except (KafkaException, RuntimeError) as err:
            self._log.warning("kafka_consumer_close_failed", error=_describe(err))
        finally:
            self._consumer = None
            self._owned.clear()
        self._publish_assignment()

    # -- inbox ------------------------------------------------------------------------

    def _serve_inbox(self, *, block: bool) -> None:
        """Handle queued items; with ``block``, wait a slice for the first one."""
        try:
            item = self.inbox.get(timeout=self.WAIT_SLICE) if block else self.inbox.get_nowait()
        except queue.Empty:
            self._closing = self._closing or self._trio._link.abandoned.is_set()
            return
        while True:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: object) -> None:
        if isinstance(item, _Call):
            item.run(self._port)
        elif item is _Signal.STOP:
            self._intake = False
        elif item is _Signal.CLOSE:
            self._intake = False
            self._closing = True
        elif isinstance(item, _Done):
            # Waits nest (a rebalance hook inside a hold), so a _Done may reach a waiter
            # other than its own; park it where its waiter will look.
            self._done_tickets[item.ticket] = item.ok

    def _wait_for_trio(
        self, afn: Callable[..., Awaitable[None]], *args: object, hold: bool = False
    ) -> bool:
        """Run ``afn(*args, ticket)`` as a trio task and block until it reports back.

        Meanwhile the thread keeps serving its inbox, so the trio task may commit, pause
        or query this consumer without deadlocking. With ``hold`` (only outside
        consume()), a long wait pauses fetching and keeps polling; see HOLD_AFTER.
        Returns the task's ``ok``.
        """
        ticket = next(self._tickets)
        if not self._port.post(self._trio._spawn, afn, (*args, ticket), ticket):
            return False
        started = last_poll = time.monotonic()
        held = False
        try:
            while ticket not in self._done_tickets:
                try:
                    self._handle(self.inbox.get(timeout=self.WAIT_SLICE))
                except queue.Empty:
                    if self._trio._link.abandoned.is_set():
                        return False
                now = time.monotonic()
                if hold and now - started >= self.HOLD_AFTER and now - last_poll >= self.WAIT_SLICE:
                    held = self._poll_while_holding() or held
                    last_poll = now
            return self._done_tickets.pop(ticket)
        finally:
            if held:
                self._end_hold()

    # -- consuming --------------------------------------------------------------------

    def _to_batch(self, messages: list[Message]) -> Batch | None:
        records: list[Record] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_message_error(error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is None or partition is None or offset is None:
                continue
            if (topic, partition) not in self._owned:
                continue  # fetched before a revocation; the new owner will read it
            timestamp_type, timestamp = message.timestamp()
            raw_headers = message.headers()
            records.append(
                Record(
                    sys.intern(topic),  # confluent makes a new str per message
                    partition,
                    offset,
                    _as_bytes(message.key()),
                    _as_bytes(message.value()),
                    () if not raw_headers else self._headers.share(raw_headers),
                    None if timestamp_type == 0 else timestamp,
                )
            )
        if not records:
            return None
        self.batches_fetched += 1
        self.records_fetched += len(records)
        return Batch(tuple(records), self._generation)

    def _on_message_error(self, error: KafkaError) -> None:
        # Consumer errors are informational: librdkafka recovers on its own (reconnects,
        # rejoins after _MAX_POLL_EXCEEDED...). Only fatal errors end the consumer.
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        self._log.warning("kafka_consume_error", code=error.name(), reason=error.str())

    def _hand_off(self, batch: Batch) -> None:
        """Block until trio accepts the batch: this is the back-pressure."""
        if not self._wait_for_trio(self._trio._hand_off, batch, hold=True):
            self._intake = False  # trio stopped taking batches; this one is dropped

    def _poll_while_holding(self) -> bool:
        """Pause everything (once), then poll so the group sees us alive; True if held."""
        consumer = self._consumer
        if consumer is None:
            return False
        if not self._holding:
            self._holding = True
            consumer.pause(consumer.assignment())
            self._log.info("kafka_fetch_held")
        # Paused partitions yield nothing (librdkafka drops what it had prefetched and
        # refetches from the consumed position on resume), but rebalance callbacks run.
        self._rewind(consumer, consumer.consume(self._max_batch, 0))
        return True

    def _rewind(self, consumer: Consumer, messages: list[Message]) -> None:
        """Seek back over records that a held consume() returned anyway, so none is lost."""
        first: dict[TopicPartitionKey, int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_message_error(error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is not None and partition is not None and offset is not None:
                first[(topic, partition)] = min(offset, first.get((topic, partition), offset))
        for (topic, partition), offset in first.items():
            if (topic, partition) in self._owned:
                consumer.seek(TopicPartition(topic, partition, offset))

    def _end_hold(self) -> None:
        self._holding = False
        consumer = self._consumer
        if consumer is not None and not self._paused:
            consumer.resume(consumer.assignment())
        self._log.info("kafka_fetch_resumed")

    # -- rebalance callbacks (inside consume()/close() on this thread) -----------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        keys = _keys(partitions)
        for key in keys:
            self._owned[key] = self._generation
        if self._paused or self._holding:
            # Assign ourselves so that the new partitions can be paused before any fetch.
            if self._cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
            consumer.pause(partitions)
        self._log.info(
            "kafka_partitions_assigned", partitions=sorted(keys), generation=self._generation
        )
        self._publish_assignment()
        if self._trio._on_assign is not None:
            self._wait_for_trio(self._trio._run_hook, self._trio._on_assign, keys)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = _keys(partitions)
        self._log.info("kafka_partitions_revoked", partitions=sorted(keys))
        # The hook runs while we still own the partitions, so its commits are accepted.
        if self._trio._on_revoke is not None:
            self._wait_for_trio(self._trio._run_hook, self._trio._on_revoke, keys)
        self._release(keys)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost (session timeout, max.poll.interval.ms exceeded): another member may already
        # own them, so commits are pointless and the hook is not run.
        keys = _keys(partitions)
        self._log.warning("kafka_partitions_lost", partitions=sorted(keys))
        self._release(keys)

    def _release(self, keys: frozenset[TopicPartitionKey]) -> None:
        self._generation += 1
        for key in keys:
            self._owned.pop(key, None)
        self._publish_assignment()

    def _publish_assignment(self) -> None:
        self._port.post(self._trio._set_assignment, frozenset(self._owned))

    # -- calls from trio --------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartitionKey, int], generation: int) -> CommitResult:
        fresh = {
            key: offset
            for key, offset in offsets.items()
            if self._owned.get(key, generation + 1) <= generation
        }
        stale = {key: offset for key, offset in offsets.items() if key not in fresh}
        if stale:
            self._log.warning("kafka_commit_stale_partitions", partitions=sorted(stale))
        if not fresh:
            return CommitResult({}, stale)
        consumer = self._require()
        try:
            answer = consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in fresh.items()],
                asynchronous=False,
            )
        except KafkaException as err:
            if _code(err) in _LOST_OWNERSHIP:
                self._log.warning("kafka_commit_refused", reason=_describe(err))
                return CommitResult({}, {**stale, **fresh})
            raise
        failed = [tp for tp in answer if tp.error is not None]
        if failed:
            raise KafkaException(failed[0].error)
        return CommitResult(fresh, stale)

    def pause(self) -> None:
        consumer = self._require()
        self._paused = True
        consumer.pause(consumer.assignment())

    def resume(self) -> None:
        consumer = self._require()
        self._paused = False
        if not self._holding:  # else the hold's end resumes
            consumer.resume(consumer.assignment())

    def lag(self, timeout: float) -> dict[TopicPartitionKey, int]:
        consumer = self._require()
        positions = consumer.position(consumer.assignment())
        unknown = [tp for tp in positions if tp.offset < 0]
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in (consumer.committed(unknown, timeout) if unknown else [])
        }
        lag: dict[TopicPartitionKey, int] = {}
        for tp in positions:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            # Tansu answers ListOffsets(latest) with the last batch's base offset + 1, not
            # the true end; fetch responses carry the right high watermark, so trust the
            # larger of the two.
            high = max(high, consumer.get_watermark_offsets(tp, cached=True)[1])
            key = (tp.topic, tp.partition)
            position = tp.offset if tp.offset >= 0 else committed.get(key, -1)
            lag[key] = max(0, high - (position if position >= 0 else low))
        return lag

    def _require(self) -> Consumer:
        if self._consumer is None:
            raise DependencyError("kafka", "consumer is closed")
        return self._consumer


class _SharedHeaders:
    """Header tuples for Records, the ones that repeat from message to message shared.

    Every v1 message carries the same ``content-type`` and ``schema-version`` headers, and
    confluent builds new objects for them per message: a name, a value and a pair each,
    about 350 bytes a record, several batches of which are alive at once (in the hand-off
    and in the consumer role's pipeline). Pairs with a short value, and header sets made
    only of such pairs, are kept and reused; longer values (a ``traceparent``) stay per
    message. Both tables stop growing at ``LIMIT`` entries, so headers that vary do not
    accumulate; they are only not shared then.
    """

    #: Values up to this many bytes are shared.
    SHORT: Final = 32
    #: At most this many pairs, and as many header sets, are kept.
    LIMIT: Final = 256

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, bytes | None], tuple[str, bytes | None]] = {}
        self._sets: dict[
            tuple[tuple[str, bytes | None], ...], tuple[tuple[str, bytes | None], ...]
        ] = {}

    def share(
        self,
        raw: list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None],
    ) -> tuple[tuple[str, bytes | None], ...]:
        pairs: list[tuple[str, bytes | None]] = []
        all_shared = True
        for name, raw_value in _header_list(raw):
            pair = (name, _as_bytes(raw_value))
            known = self._pairs.get(pair)
            if known is None:
                value = pair[1]
                if (value is None or len(value) <= self.SHORT) and len(self._pairs) < self.LIMIT:
                    self._pairs[pair] = known = pair
                else:
                    all_shared = False
                    known = pair
            pairs.append(known)
        headers = tuple(pairs)
        if not all_shared:
            return headers
        known_set = self._sets.get(headers)
        if known_set is not None:
            return known_set
        if len(self._sets) < self.LIMIT:
            self._sets[headers] = headers
        return headers


def _keys(partitions: list[TopicPartition]) -> frozenset[TopicPartitionKey]:
    return frozenset((tp.topic, tp.partition) for tp in partitions)


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _header_list(
    headers: list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None],
) -> list[tuple[str, str | bytes | None]]:
    if isinstance(headers, dict):
        return list(headers.items())
    return headers
