"""Trio-native Kafka adapter around confluent-kafka (librdkafka), which is blocking.

What lives here:

* :func:`ensure_topics` (sync) creates missing topics and grows partition counts; it backs
  ``eventsched topics ensure`` and the dev stack.
* :class:`KafkaProducer`: ``send`` / ``send_many`` await the broker's delivery reports.
* :class:`KafkaConsumer`: batch consumption with manual, generation-checked commits.

Threading model (the part to read before changing anything):

Each client object (one ``Producer``, one ``Consumer``) is owned by ONE dedicated worker
thread, and every call on that object is made from that thread: produce/poll/flush/purge,
consume/commit/pause/resume/position/close. librdkafka itself is thread-safe (librdkafka
FAQ, "Is the library thread-safe?"; confluent-kafka-python issue #460, where its author says
consuming on one thread and committing from another is fine), but the Python binding is
moving the other way: ``Consumer.c`` now has a "reject-on-contention gate" that raises
``ConcurrentModificationException`` when two threads are inside the same Consumer at once
(compiled in on free-threaded builds today, see ``CFL_CONSUMER_GATE_ENABLED``). Keeping
each client on a single thread is correct on every build, and it also gives us a single,
race-free place to check commits against rebalances (see :class:`KafkaConsumer`).

Trio talks to a worker through a thread-safe inbox (``queue.SimpleQueue``) of small
command objects; a worker talks back to trio only through ``TrioToken.run_sync_soon`` with
tiny callbacks that cannot raise (set an event, store a result, start a task). No worker
ever touches a trio object directly, and librdkafka callbacks (delivery reports, rebalance)
run on the worker thread inside ``poll``/``flush``/``consume``.

The worker thread is started with ``trio.to_thread.run_sync`` under its own
``CapacityLimiter(1)`` rather than a bare ``threading.Thread``: trio then accounts for the
thread (the host task lives in the adapter's nursery), it never takes a slot of the default
limiter that other ``to_thread`` users share, and an unexpected crash is reported through
the same path as normal completion. ``abandon_on_cancel=True`` is only an escape hatch: the
adapters wait for their worker to finish on their own (shielded, with a deadline), and only
abandon it when that deadline passes.
"""

from __future__ import annotations

import functools
import itertools
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Generic, NamedTuple, TypeVar

import outcome
import structlog
import trio
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewPartitions, NewTopic

from eventsched.core import metrics
from eventsched.core.errors import ConfigError, DependencyError, EventschedError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: ``(topic, partition)``: how partitions are named everywhere in this module's API.
TopicPartitionKey = tuple[str, int]

#: An async callable run in trio on rebalance, with the partitions concerned.
RebalanceHook = Callable[[frozenset[TopicPartitionKey]], Awaitable[None]]

PRODUCER_DEFAULTS: Final[Mapping[str, Any]] = {
    # No duplicates or reordering on internal retries; requires acks=all.
    "enable.idempotence": True,
    "acks": "all",
    # A few ms of batching costs little latency and saves many requests.
    "linger.ms": 5,
    # Upper bound on how long ``send`` waits for a delivery report (librdkafka's default is
    # 5 minutes, far too long for a caller that awaits each report).
    "message.timeout.ms": 30_000,
}

CONSUMER_DEFAULTS: Final[Mapping[str, Any]] = {
    # Offsets are committed explicitly, only after PostgreSQL and Redis succeeded.
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    # Liveness is judged by heartbeats from librdkafka's own thread: a dead process loses
    # its partitions after session.timeout.ms; the heartbeat interval stays at most a
    # third of it. (Tansu takes about session.timeout.ms / 2 to complete a group join.)
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
    # Progress is judged by the time between consume() calls. Slow processing in trio does
    # not count against it: when trio leaves a batch untaken, the worker pauses fetching
    # and keeps calling consume() (see _ConsumerWorker.HOLD_AFTER). What does count is time
    # the worker spends elsewhere: a rebalance hook (bounded by hook_timeout), a commit or
    # lag query (bounded by socket.timeout.ms). librdkafka's default is ample for those.
    "max.poll.interval.ms": 300_000,
    # Bounds each broker request, notably the synchronous commit the consumer thread waits
    # on, well below librdkafka's 60 s default.
    "socket.timeout.ms": 10_000,
}


# --------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout: float = 10.0,
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Make each topic exist with at least the wanted number of partitions.

    Idempotent: missing topics are created, topics with fewer partitions are grown, and
    topics with more are reported and left alone (partitions are never removed). Returns
    one human line per topic saying what was found or done. ``config`` holds extra client
    settings (security...). Blocking: call it from a thread when inside trio.

    Raises:
        ConfigError: a partition count or the replication factor is below 1.
        DependencyError: the broker is unreachable or refused an operation; the message
            lists every topic that failed.
    """
    for name, partitions in topics.items():
        if partitions < 1:
            raise ConfigError(f"topics.{name}", f"partition count must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise ConfigError("replication_factor", f"must be >= 1, got {replication_factor}")
    # The AdminClient must stay referenced until every future it returned has resolved:
    # if it is garbage-collected first, librdkafka destroys the handle and the futures
    # fail with _DESTROY. It lives in this frame until we return.
    admin = AdminClient({**(config or {}), "bootstrap.servers": bootstrap})
    existing = _partition_counts(admin, timeout)
    missing = {name: n for name, n in topics.items() if name not in existing}
    created, problems = _create_topics(admin, missing, replication_factor, timeout)
    if set(missing) - set(created):
        # Someone else created some of them meanwhile (TOPIC_ALREADY_EXISTS): look again.
        existing = _partition_counts(admin, timeout)
    lines: list[str] = []
    grow: dict[str, int] = {}
    for name, wanted in topics.items():
        have = existing.get(name)
        if name in created:
            lines.append(f"created {name} with {wanted} partitions")
        elif have is None:
            continue  # creation failed; already in problems
        elif have == wanted:
            lines.append(f"{name} exists with {have} partitions")
        elif have > wanted:
            lines.append(
                f"{name} has {have} partitions, more than the {wanted} wanted; "
                "left as is (partitions are never removed)"
            )
        else:
            grow[name] = wanted
    grown, grow_problems = _add_partitions(admin, grow, existing, timeout)
    lines.extend(f"grew {name} from {existing[name]} to {grow[name]} partitions" for name in grown)
    problems.extend(grow_problems)
    for line in lines:
        log.info("kafka_topic_ensured", detail=line)
    if problems:
        raise DependencyError("kafka", "; ".join(problems))
    return lines


async def check_broker(
    bootstrap: str,
    config: Mapping[str, Any] | None = None,
    *,
    request_timeout: float = 2.0,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """Readiness probe: the broker must answer a metadata request within ``request_timeout`` s.

    Runs in a thread (a fresh AdminClient each time, created and destroyed there); if the
    caller is cancelled the thread is abandoned and ends by itself within ``request_timeout``.
    Pass a ``limiter`` to keep probes off trio's default thread limiter.

    Raises:
        DependencyError: no answer, or no broker in the answer.
    """
    probe = functools.partial(_probe_broker, bootstrap, dict(config or {}), request_timeout)
    await trio.to_thread.run_sync(probe, abandon_on_cancel=True, limiter=limiter)


def _probe_broker(bootstrap: str, config: dict[str, Any], timeout: float) -> None:
    admin = AdminClient({**config, "bootstrap.servers": bootstrap})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as err:
        raise DependencyError("kafka", f"broker {bootstrap}: {_describe(err)}") from err
    if not metadata.brokers:
        raise DependencyError("kafka", f"broker {bootstrap}: metadata lists no broker")


def _partition_counts(admin: AdminClient, timeout: float) -> dict[str, int]:
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as err:
        raise DependencyError("kafka", f"cannot list topics: {_describe(err)}") from err
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None
    }


def _create_topics(
    admin: AdminClient, wanted: Mapping[str, int], replication_factor: int, timeout: float
) -> tuple[set[str], list[str]]:
    """Create topics; returns (created, problems). Existing ones count as neither."""
    if not wanted:
        return set(), []
    futures = admin.create_topics(
        [NewTopic(name, n, replication_factor) for name, n in wanted.items()],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    created: set[str] = set()
    problems: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 1)
        except KafkaException as err:
            if _code(err) != KafkaError.TOPIC_ALREADY_EXISTS:
                problems.append(f"cannot create topic {name}: {_describe(err)}")
        except TimeoutError:
            problems.append(f"cannot create topic {name}: no answer within {timeout} s")
        else:
            created.add(name)
    return created, problems


def _add_partitions(
    admin: AdminClient, wanted: Mapping[str, int], existing: Mapping[str, int], timeout: float
) -> tuple[list[str], list[str]]:
    """Grow partition counts; returns (grown, problems)."""
    if not wanted:
        return [], []
    futures = admin.create_partitions(
        [NewPartitions(name, n) for name, n in wanted.items()],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    grown: list[str] = []
    problems: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 1)
        except KafkaException as err:
            reason = _describe(err)
            if _code(err) in (
                KafkaError._UNSUPPORTED_FEATURE,
                KafkaError.UNSUPPORTED_VERSION,
                KafkaError.INVALID_REQUEST,
            ):
                reason = "broker does not support adding partitions (CreatePartitions)"
            problems.append(
                f"cannot grow {name} from {existing[name]} to {wanted[name]} partitions: {reason}"
            )
        except TimeoutError:
            problems.append(f"cannot grow {name}: no answer within {timeout} s")
        else:
            grown.append(name)
    return grown, problems


def _code(err: KafkaException) -> int | None:
    first = err.args[0] if err.args else None
    return first.code() if isinstance(first, KafkaError) else None


def _describe(err: BaseException) -> str:
    first = err.args[0] if err.args else None
    if isinstance(first, KafkaError):
        return f"{first.name()}: {first.str()}"
    return str(err) or type(err).__name__


# --------------------------------------------------------------------------------------
# Worker-thread plumbing shared by producer and consumer
# --------------------------------------------------------------------------------------


class _TrioPort:
    """The only way a worker thread reaches trio: schedule a tiny callback.

    Callbacks run by ``run_sync_soon`` must never raise (that would crash ``trio.run``),
    so only trivial, exception-free functions are posted.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    def post(self, fn: Callable[..., object], *args: object) -> bool:
        """Schedule ``fn(*args)`` in trio; False when trio has already finished."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            return False
        return True


class _Call(Generic[T]):
    """A function for the worker thread to run, with its outcome for the trio side."""

    __slots__ = ("done", "fn", "result")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: outcome.Outcome[T] | None = None

    def run(self, port: _TrioPort) -> None:
        """Worker thread: run the function and hand its outcome to trio."""
        port.post(self.resolve, outcome.capture(self.fn))

    def resolve(self, result: outcome.Outcome[T]) -> None:
        """Trio thread: record the outcome (first one wins)."""
        if self.result is None:
            self.result = result
            self.done.set()


class _Link:
    """Trio side of one worker thread: start it, send it calls, learn when it ends."""

    def __init__(
        self,
        name: str,
        inbox: queue.SimpleQueue[object],
        port: _TrioPort,
        on_finished: Callable[[], None],
    ) -> None:
        self.name = name
        self.inbox = inbox
        self.port = port
        self._on_finished = on_finished
        self.done = trio.Event()
        self.failure: BaseException | None = None
        self.abandoned = threading.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._host_scope = trio.CancelScope()
        self._pending: set[_Call[Any]] = set()

    @property
    def gone(self) -> bool:
        return self.done.is_set()

    async def host(self, run: Callable[[], None]) -> None:
        """Run the worker loop on its dedicated thread (see the module docstring)."""
        with self._host_scope:
            await trio.to_thread.run_sync(
                run, limiter=self._limiter, abandon_on_cancel=True, thread_name=self.name
            )

    def thread_main(self, run: Callable[[], None]) -> Callable[[], None]:
        """Wrap a worker loop so that its end, normal or not, is always reported."""

        def main() -> None:
            failure: BaseException | None = None
            try:
                run()
            except BaseException as exc:
                failure = exc
                log.exception("kafka_worker_thread_crashed", worker=self.name)
            finally:
                self.port.post(self._finished, failure)

        return main

    def _finished(self, failure: BaseException | None) -> None:
        # Runs in trio after every result the thread posted before (run_sync_soon is
        # FIFO), so any call still pending here will never be answered.
        self.failure = failure
        for call in self._pending:
            call.resolve(outcome.Error(self._gone_error()))
        self._on_finished()
        self.done.set()

    def _gone_error(self) -> DependencyError:
        if self.failure is not None:
            return DependencyError("kafka", f"{self.name} failed: {_describe(self.failure)}")
        return DependencyError("kafka", f"{self.name} is closed")

    async def call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on the worker thread and return its result.

        KafkaException becomes DependencyError. If the caller is cancelled, the call still
        runs on the thread; its result is dropped.
        """
        if self.gone:
            raise self._gone_error()
        call = _Call(fn)
        self._pending.add(call)
        self.inbox.put(call)
        try:
            await call.done.wait()
        finally:
            self._pending.discard(call)
        assert call.result is not None
        try:
            return call.result.unwrap()
        except KafkaException as err:
            raise DependencyError("kafka", f"{what} failed: {_describe(err)}") from err

    def abandon(self) -> None:
        """Give up on a worker that did not finish in time; it ends on its own later."""
        self.abandoned.set()
        self._host_scope.cancel()


@asynccontextmanager
async def _task_group() -> AsyncIterator[trio.Nursery]:
    """A nursery for an adapter's helper tasks that does not wrap the caller's errors.

    The helper tasks never raise, so an exception group leaving this nursery holds only
    what the ``async with`` body raised; callers get that exception itself.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            only = group.exceptions[0]
            raise only from only.__cause__
        raise


def _error_logger(client: str) -> Callable[[KafkaError], None]:
    """librdkafka ``error_cb``: runs on the worker thread inside poll/consume."""

    def on_error(err: KafkaError) -> None:
        log.warning(
            "kafka_client_error",
            client=client,
            code=err.name(),
            reason=err.str(),
            fatal=err.fatal(),
        )

    return on_error


# --------------------------------------------------------------------------------------
# Producer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message for :meth:`KafkaProducer.send_many`."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """The broker's answer for one message: where it was stored, or why not."""

    topic: str
    partition: int | None
    offset: int | None
    #: ``None`` when delivered, else ``"CODE_NAME: text"`` from librdkafka.
    error: str | None = None
    #: librdkafka's error code (``KafkaError.*``) when there is one.
    code: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def too_large(self) -> bool:
        """Refused for its size (the producer's ``message.max.bytes`` or the broker's)."""
        return self.code in _TOO_LARGE

    @property
    def message_specific(self) -> bool:
        """Refused for what this message is: sending the same bytes again cannot help
        (size, a record the broker calls invalid, an argument the client refuses).
        Anything else (timeouts, a broker or producer problem) may pass on a retry."""
        return self.code in _MESSAGE_ERRORS

    def raise_for_error(self) -> None:
        """Raise DependencyError when the message was not delivered."""
        if self.error is not None:
            raise DependencyError("kafka", f"delivery to {self.topic} failed: {self.error}")


class _Delivery:
    """Delivery reports of one ``send_many`` call.

    ``settle`` runs only on the producer thread (produce errors and delivery callbacks both
    happen there), so the counters need no lock; trio reads ``reports`` after ``done``.
    """

    def __init__(self, messages: Sequence[OutboundMessage], port: _TrioPort) -> None:
        self.messages = messages
        self.reports: list[DeliveryReport | None] = [None] * len(messages)
        self.remaining = len(messages)
        self.done = trio.Event()
        self._port = port

    def settle(self, index: int, report: DeliveryReport) -> None:
        if self.reports[index] is not None:
            return
        self.reports[index] = report
        self.remaining -= 1
        if self.remaining == 0:
            self._port.post(self.done.set)

    def on_delivery(self, index: int, err: KafkaError | None, msg: Message) -> None:
        """librdkafka delivery callback (producer thread, inside poll/flush)."""
        self.settle(
            index,
            DeliveryReport(
                topic=msg.topic() or self.messages[index].topic,
                partition=msg.partition(),
                offset=msg.offset(),
                error=None if err is None else f"{err.name()}: {err.str()}",
                code=None if err is None else err.code(),
            ),
        )

    def fail_unsettled(self, reason: str) -> None:
        """Producer thread: messages without a report yet become errors (the client that
        had them is being replaced and will never report them)."""
        for index, report in enumerate(self.reports):
            if report is None:
                self.settle(index, DeliveryReport(self.messages[index].topic, None, None, reason))

    def fail_rest(self, reason: str) -> None:
        """Trio side, after the thread ended: unanswered messages become errors."""
        for index, report in enumerate(self.reports):
            if report is None:
                self.reports[index] = DeliveryReport(self.messages[index].topic, None, None, reason)
        self.remaining = 0
        self.done.set()

    def result(self) -> list[DeliveryReport]:
        return [report for report in self.reports if report is not None]


@dataclass(eq=False)
class _Produce:
    delivery: _Delivery


#: Delivery errors that are about the message itself (see DeliveryReport.message_specific).
_TOO_LARGE: Final = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_MESSAGE_ERRORS: Final = _TOO_LARGE | {
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError._INVALID_ARG,  # produce() refused an argument (TypeError/ValueError)
}


class _ProducerWorker:
    """Everything that runs on the producer thread.

    Rebuilding: the idempotent client can get stuck in two ways that only a new client
    cures. (1) A fatal error (``error_cb`` or a report flagged fatal, ``_FATAL``): the client
    refuses everything from then on. (2) The broker forgot our producer id (its state was
    lost: a memory-only broker restarted; on Kafka a producer id that expired): every
    ProduceRequest is answered ``UNKNOWN_PRODUCER_ID``, librdkafka bumps the epoch locally
    and retries, the application only sees ``_MSG_TIMED_OUT``. (2) shows in librdkafka's
    statistics (``eos.producer_id``/``eos.producer_epoch``) as an epoch that keeps climbing
    without any delivery in between; :data:`STUCK_EPOCH_BUMPS` steps trigger a rebuild.

    A rebuild (on this thread, between two inbox items) purges the old client's queue and
    in-flight requests, serves the purge reports, fails any message still unreported, then
    replaces the client. Callers thus get an error report for every message that was not
    acknowledged (some may have reached the broker: at-least-once) and send them again.
    """

    # How long the loop may block on its inbox: short while messages are in flight so
    # that delivery callbacks are served promptly, longer when idle.
    BUSY_POLL: Final = 0.005
    IDLE_WAIT: Final = 0.2
    # How long to serve delivery reports before retrying after BufferError (queue full).
    FULL_QUEUE_POLL: Final = 0.05
    #: librdkafka statistics interval (ms) unless the configuration sets one.
    STATS_INTERVAL_MS: Final = 1000
    #: Producer-id/epoch changes without a delivery in between that mean the broker keeps
    #: refusing our producer id (a healthy client has one; an expired id costs one bump).
    STUCK_EPOCH_BUMPS: Final = 5
    #: Minimum seconds between two rebuilds (a broker that keeps failing us is not helped
    #: by a new client every few milliseconds).
    REBUILD_INTERVAL: Final = 5.0

    def __init__(self, config: Mapping[str, Any], port: _TrioPort) -> None:
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.abort = threading.Event()
        self._config = dict(config)
        self._user_error_cb = self._config.pop("error_cb", None)
        self._user_stats_cb = self._config.pop("stats_cb", None)
        self._config["error_cb"] = self._on_error
        self._config["stats_cb"] = self._on_stats
        self._config.setdefault("statistics.interval.ms", self.STATS_INTERVAL_MS)
        self._port = port
        self._producer: Producer | None = None
        self._stopping = False
        # Deliveries with messages not reported yet (touched on this thread only).
        self._live: set[_Delivery] = set()
        # Why the client must be replaced (a reason label and words), or None.
        self._rebuild: tuple[str, str] | None = None
        self._last_rebuild = -self.REBUILD_INTERVAL
        # (producer id, epoch) in the client's last statistics, and how often it changed
        # since the last delivery.
        self._pid: tuple[int, int] | None = None
        self._pid_changes = 0
        #: Clients replaced so far (read by trio, written here).
        self.rebuilds = 0

    def start(self) -> None:
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        try:
            return Producer(self._config)
        except (KafkaException, ValueError, TypeError) as err:
            raise ConfigError("kafka.producer", _describe(err)) from err

    def run(self) -> None:
        while not self._stopping:
            item = self._next_item()
            if isinstance(item, _Call):
                item.run(self._port)
            elif isinstance(item, _Produce):
                self._produce_all(item.delivery)
            if self._producer is not None:
                self._producer.poll(0)
                if self._rebuild is not None and not self._stopping:
                    self._maybe_rebuild()
        self._producer = None  # destroy the handle on this thread

    def _next_item(self) -> object:
        producer = self._producer
        if producer is not None and len(producer) > 0:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                producer.poll(self.BUSY_POLL)
                return None
        try:
            return self.inbox.get(timeout=self.IDLE_WAIT)
        except queue.Empty:
            return None

    # -- client health (callbacks run on this thread, inside poll/flush) ----------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._want_rebuild("fatal", f"fatal error {err.name()}: {err.str()}")
        if self._user_error_cb is not None:
            self._user_error_cb(err)

    def _on_stats(self, stats: str) -> None:
        if self._user_stats_cb is not None:
            self._user_stats_cb(stats)
        try:
            eos = json.loads(stats).get("eos", {})
            pid = (int(eos["producer_id"]), int(eos["producer_epoch"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if pid[0] < 0:  # no producer id yet
            return
        last, self._pid = self._pid, pid
        if last is None or last == pid:
            return
        # A new epoch of the same id counts its steps; a new id counts one.
        self._pid_changes += pid[1] - last[1] if pid[0] == last[0] and pid[1] > last[1] else 1
        if self._pid_changes >= self.STUCK_EPOCH_BUMPS:
            self._want_rebuild(
                "stuck_pid",
                f"producer id/epoch changed {self._pid_changes} times without a delivery "
                "(the broker keeps answering UNKNOWN_PRODUCER_ID)",
            )

    def _on_delivery(
        self, delivery: _Delivery, index: int, err: KafkaError | None, msg: Message
    ) -> None:
        delivery.on_delivery(index, err, msg)
        if delivery.remaining == 0:
            self._live.discard(delivery)
        if err is None:
            self._pid_changes = 0
        elif err.fatal() or err.code() == KafkaError._FATAL:
            self._want_rebuild("fatal", f"fatal error {err.name()}: {err.str()}")

    def _want_rebuild(self, label: str, reason: str) -> None:
        if self._rebuild is None:
            self._rebuild = (label, reason)

    def _maybe_rebuild(self) -> None:
        if time.monotonic() - self._last_rebuild < self.REBUILD_INTERVAL:
            return
        assert self._rebuild is not None
        label, reason = self._rebuild
        old = self._producer
        assert old is not None
        log.warning("kafka_producer_rebuilt", reason=reason, undelivered=len(old))
        try:
            old.purge(in_queue=True, in_flight=True, blocking=True)
        except KafkaException as err:  # a fatal client may refuse; it is dropped anyway
            log.warning("kafka_producer_purge_failed", error=_describe(err))
        old.poll(0)  # serves the purge reports: _PURGE_QUEUE / _PURGE_INFLIGHT
        for delivery in list(self._live):
            delivery.fail_unsettled(f"_PRODUCER_REBUILT: producer rebuilt ({label})")
        self._live.clear()
        self._producer = None
        del old  # destroyed here, on its own thread
        self._last_rebuild = time.monotonic()
        self._rebuild = None
        self._pid, self._pid_changes = None, 0
        try:
            self._producer = self._new_producer()
        except ConfigError as err:  # the same configuration worked before: try again later
            log.error("kafka_producer_rebuild_failed", error=str(err))
            self._rebuild = (label, reason)
            return
        self.rebuilds += 1
        metrics.KAFKA_PRODUCER_REBUILDS.labels(label).inc()

    # -- produce ----------------------------------------------------------------------

    def _produce_all(self, delivery: _Delivery) -> None:
        producer = self._producer
        if producer is None:
            delivery_error = "producer is not started"
            for index, message in enumerate(delivery.messages):
                delivery.settle(index, DeliveryReport(message.topic, None, None, delivery_error))
            return
        self._live.add(delivery)
        for index, message in enumerate(delivery.messages):
            self._produce_one(producer, delivery, index, message)
        if delivery.remaining == 0:
            self._live.discard(delivery)

    def _produce_one(
        self, producer: Producer, delivery: _Delivery, index: int, message: OutboundMessage
    ) -> None:
        callback = functools.partial(self._on_delivery, delivery, index)
        headers: list[tuple[str, str | bytes | None]] | None = (
            list(message.headers) if message.headers is not None else None
        )
        while True:
            try:
                producer.produce(
                    message.topic,
                    value=message.value,
                    key=message.key,
                    headers=headers,
                    on_delivery=callback,
                )
                return
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports to make room,
                # then try again. This is the back-pressure: send_many simply takes longer.
                if self.abort.is_set():
                    reason = "producer closing with a full local queue"
                    delivery.settle(index, DeliveryReport(message.topic, None, None, reason))
                    return
                producer.poll(self.FULL_QUEUE_POLL)
            except KafkaException as err:
                code = _code(err)
                first = err.args[0] if err.args else None
                if code == KafkaError._FATAL or (isinstance(first, KafkaError) and first.fatal()):
                    self._want_rebuild("fatal", f"fatal error: {_describe(err)}")
                report = DeliveryReport(message.topic, None, None, _describe(err), code)
                delivery.settle(index, report)
                return
            except (TypeError, ValueError) as err:
                report = DeliveryReport(
                    message.topic, None, None, f"_INVALID_ARG: {err}", KafkaError._INVALID_ARG
                )
                delivery.settle(index, report)
                return

    def flush(self, timeout: float) -> int:
        assert self._producer is not None
        return self._producer.flush(timeout)

    def close(self, timeout: float) -> int:
        """Flush within ``timeout``, purge the rest; returns how many were not delivered."""
        self._stopping = True
        producer = self._producer
        if producer is None:
            return 0
        remaining = producer.flush(timeout)
        if remaining:
            # Purged messages get a delivery report with a _PURGE_* error, so every
            # waiting send_many learns the outcome instead of hanging.
            producer.purge(in_queue=True, in_flight=True, blocking=True)
            producer.poll(0)
        return remaining


class KafkaProducer:
    """Trio adapter for a confluent-kafka Producer owned by one worker thread.

    Use ``async with KafkaProducer.open(config) as producer:``; ``config`` is merged over
    :data:`PRODUCER_DEFAULTS`. Each send hops to the worker thread once per call (not per
    message) and awaits the broker's delivery reports. A send whose caller is cancelled is
    still delivered; only its report is dropped. On exit the producer flushes within
    ``flush_timeout`` (shielded), purges what is left and logs/records the count in
    :attr:`undelivered`.

    A client that went fatal or whose producer id the broker forgot is replaced on its
    thread (see :class:`_ProducerWorker`); the messages it had not reported are reported
    as failed, so a caller that sends failed messages again loses nothing.
    """

    def __init__(self, config: Mapping[str, Any], flush_timeout: float) -> None:
        config = {**PRODUCER_DEFAULTS, **config}
        config.setdefault("error_cb", _error_logger("producer"))
        self._port = _TrioPort(trio.lowlevel.current_trio_token())
        self._worker = _ProducerWorker(config, self._port)
        self._link = _Link(
            "eventsched-kafka-producer", self._worker.inbox, self._port, self._fail_pending
        )
        self._flush_timeout = flush_timeout
        self._closing = False
        self._pending: set[_Delivery] = set()
        #: Messages not delivered at close (None until closed).
        self.undelivered: int | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, config: Mapping[str, Any], *, flush_timeout: float = 10.0
    ) -> AsyncIterator[KafkaProducer]:
        """Start the producer thread; ready when the client exists.

        On exit, flushes for at most ``flush_timeout`` s (shielded) and purges the rest.
        """
        async with _task_group() as nursery:
            producer = cls(config, flush_timeout)
            nursery.start_soon(
                producer._link.host, producer._link.thread_main(producer._worker.run)
            )
            try:
                await producer._link.call(producer._worker.start, "start producer")
                yield producer
            finally:
                await producer._shutdown()

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> DeliveryReport:
        """Send one message and await its delivery report."""
        (report,) = await self.send_many([OutboundMessage(topic, value, key, headers)])
        return report

    async def send_many(self, messages: Sequence[OutboundMessage]) -> list[DeliveryReport]:
        """Send messages in one thread hop; reports come back in the same order.

        A full local queue slows this call down (back-pressure) rather than failing it.
        Per-message failures are reported in the reports; use ``raise_for_error``.
        """
        if self._closing or self._link.gone:
            raise DependencyError("kafka", "producer is closed")
        if not messages:
            return []
        delivery = _Delivery(tuple(messages), self._port)
        self._pending.add(delivery)
        self._worker.inbox.put(_Produce(delivery))
        try:
            await delivery.done.wait()
        finally:
            self._pending.discard(delivery)
        return delivery.result()

    @property
    def rebuilds(self) -> int:
        """How many times the client was replaced (see :class:`_ProducerWorker`)."""
        return self._worker.rebuilds

    async def flush(self, timeout: float) -> int:  # noqa: ASYNC109 - librdkafka's own wait
        """Wait up to ``timeout`` s for outstanding deliveries; returns how many remain."""
        return await self._link.call(functools.partial(self._worker.flush, timeout), "flush")

    def _fail_pending(self) -> None:
        # Only called once the thread has ended (or was abandoned), so no report can race.
        for delivery in self._pending:
            delivery.fail_rest("producer closed before a delivery report arrived")

    async def _shutdown(self) -> None:
        self._closing = True
        # Shielded: flushing must happen even when the caller is being cancelled; the
        # deadline keeps a dead broker from holding shutdown hostage.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._flush_timeout + 2.0) as scope:
                if not self._link.gone:
                    close = functools.partial(self._worker.close, self._flush_timeout)
                    try:
                        self.undelivered = await self._link.call(close, "close producer")
                    except EventschedError as err:
                        log.error("kafka_producer_close_failed", error=str(err))
                await self._link.done.wait()
            if scope.cancelled_caught:
                log.error("kafka_producer_stop_timeout")
                self._worker.abort.set()
                self._link.abandon()
        self._fail_pending()
        if self.undelivered:
            log.warning("kafka_producer_undelivered_on_close", count=self.undelivered)


# --------------------------------------------------------------------------------------
# Consumer
# --------------------------------------------------------------------------------------


class Record(NamedTuple):
    """One consumed message, copied out of confluent's Message on the consumer thread.

    A NamedTuple, not a frozen dataclass: equally immutable, and built in a third of the
    time (0.5 vs 1.4 us), once per message on the consumer thread, which holds the GIL.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    #: Milliseconds since the epoch, or None when the broker gave no timestamp.
    timestamp_ms: int | None

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Batch:
    """Records from one ``consume`` call, stamped with the assignment generation.

    Pass ``generation`` back to :meth:`KafkaConsumer.commit`; offsets of partitions that
    were revoked (or revoked and assigned again) since this batch was fetched are refused.
    """

    records: tuple[Record, ...]
    generation: int

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def next_offsets(self) -> dict[TopicPartitionKey, int]:
        """Per partition, the offset to commit once every record here is processed."""
        offsets: dict[TopicPartitionKey, int] = {}
        for record in self.records:
            key = (record.topic, record.partition)
            offsets[key] = max(offsets.get(key, 0), record.offset + 1)
        return offsets


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`KafkaConsumer.commit` did with each partition's offset."""

    committed: Mapping[TopicPartitionKey, int]
    #: Not committed because this consumer no longer owns the partition, or owns it again
    #: only since after the batch was fetched. Those records are redelivered to the owner.
    stale: Mapping[TopicPartitionKey, int]


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """Counters for metrics and tests (read from trio; written by the consumer thread)."""

    batches_fetched: int
    batches_delivered: int
    records_fetched: int


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
                messages = self._consumer.consume(self._max_batch, self._poll_timeout)
                batch = self._to_batch(messages)
                if batch is not None:
                    self._hand_off(batch)
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
                    topic,
                    partition,
                    offset,
                    _as_bytes(message.key()),
                    _as_bytes(message.value()),
                    ()
                    if not raw_headers
                    else tuple(
                        (name, _as_bytes(value)) for name, value in _header_list(raw_headers)
                    ),
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


class _Batches:
    """``async for`` over the hand-off channel (a class, not an async generator, so that
    breaking out of the loop needs no generator finalization)."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> Batch:
        try:
            batch = await self._consumer._receive.receive()
        except trio.EndOfChannel:
            failure = self._consumer._link.failure
            if failure is not None:
                raise DependencyError(
                    "kafka", f"consumer failed: {_describe(failure)}"
                ) from failure
            raise StopAsyncIteration from None
        self._consumer._delivered += 1
        return batch


class KafkaConsumer:
    """Trio adapter for batch consumption with manual commits (one worker thread).

    Usage::

        async with KafkaConsumer.open(config, ["events"], on_revoke=commit_done) as consumer:
            async for batch in consumer.batches():
                await process(batch)
                await consumer.commit(batch.next_offsets(), generation=batch.generation)

    Hand-off and back-pressure: the thread calls ``consume(max_batch, poll_timeout)`` and
    hands each non-empty batch to a trio memory channel of ``buffered_batches`` slots; while
    the channel is full the thread waits and does not fetch, so at most
    ``buffered_batches + 1`` batches exist outside trio's hands. If the wait lasts longer
    than a second the thread "holds": it pauses all assigned partitions and keeps calling
    ``consume`` (which then returns nothing) every half second, so the member stays in the
    group and serves rebalances however long trio takes; fetching resumes from the
    consumed position when trio takes the batch. Records of the held batch whose partition
    was revoked meanwhile are still handed over; their commit is refused as stale.

    Commit guarantee: every batch carries the generation of the assignment it was fetched
    under (a counter bumped on every assignment change). ``commit`` runs on the consumer
    thread, where rebalances also run, and commits a partition's offset only if this
    consumer has owned that partition without interruption since before that generation;
    otherwise the offset is returned as stale and the records go to the new owner
    (at-least-once). ``on_revoke`` runs before partitions are released, so commits it makes
    (with any generation still valid) are accepted. Lost partitions skip the hook.

    Calls (commit, pause, resume, lag) are executed by the consumer thread between
    ``consume`` calls, so they may wait up to ``poll_timeout``.

    Shutdown: :meth:`stop` ends intake (buffered batches are still yielded, then
    :meth:`batches` ends) while the member stays in the group and calls keep working;
    leaving the ``async with`` closes the consumer (running ``on_revoke``) under a shield,
    within ``close_timeout``.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        nursery: trio.Nursery,
        max_batch: int,
        buffered_batches: int,
        poll_timeout: float,
        on_assign: RebalanceHook | None,
        on_revoke: RebalanceHook | None,
        hook_timeout: float,
        close_timeout: float,
    ) -> None:
        self._port = _TrioPort(trio.lowlevel.current_trio_token())
        self._nursery = nursery
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._hook_timeout = hook_timeout
        self._close_timeout = close_timeout
        self._send, self._receive = trio.open_memory_channel[Batch](buffered_batches)
        self._handoff_scope: trio.CancelScope | None = None
        self._intake_stopped = False
        self._assignment: frozenset[TopicPartitionKey] = frozenset()
        # Monotonic instant since when the assignment is empty (None while it is not);
        # a consumer starts with none.
        self._unassigned_since: float | None = time.monotonic()
        self._assignment_changed = trio.Event()
        self._delivered = 0
        self._worker = _ConsumerWorker(config, topics, max_batch, poll_timeout, self)
        # When the thread ends for any reason, batches() must end too.
        self._link = _Link(
            "eventsched-kafka-consumer", self._worker.inbox, self._port, self._send.close
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        max_batch: int = 500,
        buffered_batches: int = 1,
        poll_timeout: float = 0.1,
        on_assign: RebalanceHook | None = None,
        on_revoke: RebalanceHook | None = None,
        hook_timeout: float = 30.0,
        close_timeout: float = 10.0,
    ) -> AsyncIterator[KafkaConsumer]:
        """Create, subscribe and start fetching; ready once subscribed (not yet assigned).

        ``config`` (with ``bootstrap.servers`` and ``group.id``) is merged over
        :data:`CONSUMER_DEFAULTS`. ``on_assign``/``on_revoke`` run in trio, shielded, at
        most ``hook_timeout`` s each, while the consumer thread waits for them.
        """
        merged: dict[str, Any] = {**CONSUMER_DEFAULTS, **config}
        for required in ("bootstrap.servers", "group.id"):
            if not merged.get(required):
                raise ConfigError(f"kafka.consumer.{required}", "is required")
        if max_batch < 1 or buffered_batches < 1:
            raise ConfigError("kafka.consumer", "max_batch and buffered_batches must be >= 1")
        merged.setdefault("error_cb", _error_logger("consumer"))
        async with _task_group() as nursery:
            consumer = cls(
                merged,
                topics,
                nursery=nursery,
                max_batch=max_batch,
                buffered_batches=buffered_batches,
                poll_timeout=poll_timeout,
                on_assign=on_assign,
                on_revoke=on_revoke,
                hook_timeout=hook_timeout,
                close_timeout=close_timeout,
            )
            nursery.start_soon(
                consumer._link.host, consumer._link.thread_main(consumer._worker.run)
            )
            try:
                await consumer._link.call(consumer._worker.start, "start consumer")
                yield consumer
            finally:
                await consumer._shutdown()

    # -- public API -------------------------------------------------------------------

    def batches(self) -> AsyncIterator[Batch]:
        """Iterate batches until :meth:`stop` (or close); raises if the thread failed."""
        return _Batches(self)

    async def commit(
        self, offsets: Mapping[TopicPartitionKey, int], *, generation: int
    ) -> CommitResult:
        """Synchronously commit "next offset to read" per partition (last processed + 1).

        Partitions not continuously owned since ``generation`` are refused (``stale``).
        Raises DependencyError when the broker fails the commit.
        """
        frozen = dict(offsets)
        if any(offset < 0 for offset in frozen.values()):
            raise ValueError(f"offsets must be >= 0: {frozen}")
        if not frozen:
            return CommitResult({}, {})
        commit = functools.partial(self._worker.commit, frozen, generation)
        return await self._link.call(commit, "commit")

    async def pause(self) -> None:
        """Stop fetching from all assigned partitions, and from any assigned later."""
        await self._link.call(self._worker.pause, "pause")

    async def resume(self) -> None:
        """Fetch again from all assigned partitions."""
        await self._link.call(self._worker.resume, "resume")

    def assignment(self) -> frozenset[TopicPartitionKey]:
        """Partitions currently assigned (as last reported by the consumer thread)."""
        return self._assignment

    def unassigned_since(self) -> float | None:
        """The :func:`time.monotonic` instant since when no partition is assigned, or None
        while some are. It starts at :meth:`open` and restarts whenever the assignment
        becomes empty (each eager rebalance empties it between revoke and assign)."""
        return self._unassigned_since

    def assignment_changed(self) -> trio.Event:
        """An event set at the next change of :meth:`assignment` (take it, then wait)."""
        return self._assignment_changed

    async def lag(self, *, request_timeout: float = 5.0) -> dict[TopicPartitionKey, int]:
        """Per assigned partition: high watermark minus this consumer's fetch position.

        The position includes records fetched but not yet processed (at most
        ``(buffered_batches + 1) * max_batch``).
        """
        lag = functools.partial(self._worker.lag, request_timeout)
        return await self._link.call(lag, "lag")

    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            batches_fetched=self._worker.batches_fetched,
            batches_delivered=self._delivered,
            records_fetched=self._worker.records_fetched,
        )

    def stop(self) -> None:
        """Stop intake: fetch nothing more; :meth:`batches` ends after buffered batches."""
        if self._intake_stopped:
            return
        self._intake_stopped = True
        if self._handoff_scope is not None:
            self._handoff_scope.cancel()
        self._send.close()
        self._worker.inbox.put(_Signal.STOP)

    # -- trio side of the thread's requests -------------------------------------------

    def _spawn(
        self, afn: Callable[..., Awaitable[None]], args: tuple[object, ...], ticket: int
    ) -> None:
        """Posted by the thread: start a helper task, or tell the thread it cannot run."""
        try:
            self._nursery.start_soon(afn, *args)
        except RuntimeError:  # nursery closed: trio side is gone
            self._worker.inbox.put(_Done(ticket, ok=False))

    async def _hand_off(self, batch: Batch, ticket: int) -> None:
        ok = False
        try:
            with trio.CancelScope() as scope:
                self._handoff_scope = scope
                if not self._intake_stopped:
                    await self._send.send(batch)
                    ok = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._handoff_scope = None
            self._worker.inbox.put(_Done(ticket, ok))

    async def _run_hook(
        self, hook: RebalanceHook, partitions: frozenset[TopicPartitionKey], ticket: int
    ) -> None:
        try:
            # Shielded so that a cancelled caller can still commit on its way out; the
            # deadline keeps a stuck hook from stalling the rebalance forever.
            with trio.CancelScope(shield=True), trio.move_on_after(self._hook_timeout) as scope:
                await hook(partitions)
            if scope.cancelled_caught:
                log.error("kafka_rebalance_hook_timeout", timeout=self._hook_timeout)
        except Exception:
            log.exception("kafka_rebalance_hook_failed")
        finally:
            self._worker.inbox.put(_Done(ticket, ok=True))

    def _set_assignment(self, assignment: frozenset[TopicPartitionKey]) -> None:
        # Posted by the consumer thread; runs in trio and cannot raise.
        if assignment:
            self._unassigned_since = None
        elif self._unassigned_since is None:
            self._unassigned_since = time.monotonic()
        if assignment != self._assignment:
            self._assignment = assignment
            self._assignment_changed.set()
            self._assignment_changed = trio.Event()

    async def _shutdown(self) -> None:
        self.stop()
        self._worker.inbox.put(_Signal.CLOSE)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._close_timeout) as scope:
                await self._link.done.wait()
            if scope.cancelled_caught:
                log.error("kafka_consumer_close_timeout")
                self._link.abandon()
