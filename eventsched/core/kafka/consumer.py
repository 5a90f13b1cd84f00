"""Trio adapter for batch consumption with manual, generation-checked commits.

Owns :class:`KafkaConsumer` (trio side) and the ``async for`` over its batches. The client
itself lives on the consumer thread (:mod:`eventsched.core.kafka.consumerthread`); see
:mod:`eventsched.core.kafka.bridge` for the threading model.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio

from eventsched.core.kafka.bridge import (
    _describe,
    _error_logger,
    _Link,
    _task_group,
    _TrioPort,
)
from eventsched.core.kafka.clientconfig import CONSUMER_DEFAULTS
from eventsched.core.kafka.consumerthread import _ConsumerWorker, _Done, _Signal
from eventsched.core.kafka.records import (
    Batch,
    CommitResult,
    ConsumerStats,
    RebalanceHook,
    TopicPartitionKey,
)
from eventsched.core.runtime.errors import ConfigError, DependencyError

# One logger name for the whole adapter: its lines are found under one name.
log = structlog.get_logger("eventsched.core.kafka")


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
    ``buffered_batches + 1`` batches exist outside trio's hands. With 0 slots the hand-off
    is a rendezvous: the one batch the thread built waits until trio asks for it (the
    consumer role's choice, to hold one batch of records less). If the wait lasts longer
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
        if max_batch < 1 or buffered_batches < 0:
            raise ConfigError("kafka.consumer", "max_batch must be >= 1 and buffered_batches >= 0")
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
