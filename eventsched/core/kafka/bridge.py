"""The trio <-> worker-thread bridge every Kafka client of this package runs on.

Owns :class:`_TrioPort`, :class:`_Call`, :class:`_Link`, :func:`_task_group`, librdkafka's
``error_cb`` logger and the error helpers (:func:`_code`, :func:`_describe`). Code here runs
on both sides; each function's docstring says which.

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
race-free place to check commits against rebalances (see
:class:`~eventsched.core.kafka.consumer.KafkaConsumer`).

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

import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import outcome
import structlog
import trio
from confluent_kafka import (
    KafkaError,
    KafkaException,
)

from eventsched.core.runtime.errors import DependencyError

# One logger name for the whole adapter: its lines are found under one name.
log = structlog.get_logger("eventsched.core.kafka")

T = TypeVar("T")


def _code(err: KafkaException) -> int | None:
    first = err.args[0] if err.args else None
    return first.code() if isinstance(first, KafkaError) else None


def _describe(err: BaseException) -> str:
    first = err.args[0] if err.args else None
    if isinstance(first, KafkaError):
        return f"{first.name()}: {first.str()}"
    return str(err) or type(err).__name__


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
