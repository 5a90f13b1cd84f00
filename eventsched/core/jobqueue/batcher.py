"""Batched, ordered, atomic application of the job queue's small state changes (asyncio side).

Invariants: blocks reach Redis in submission order (a job's finish never overtakes its start
record) and each batch is one atomic script call. The store submits; the dispatcher, when one
runs, carries batches inside its claims; otherwise the batcher flushes them itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from redis import asyncio as aioredis

from eventsched.core.jobqueue.scripts import APPLY_LUA
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

log = get_logger(__name__)

_JSON_ENCODER = msgspec.json.Encoder()

Command = tuple[str | int, ...]


Batch = list[tuple[list[Command], "asyncio.Future[None] | None"]]


class Batcher:
    """Coalesces SAQ's small per-job state changes into few atomic script calls.

    Every job costs a start record and a finish (sometimes a retry), each a few commands.
    Sent one by one, their round trips would dominate the worker's CPU (a loopback ``send``
    plus, under trio-asyncio, a trio scheduler pass with an ``epoll`` syscall per asyncio
    callback; docs/design-notes.md has the figures). So blocks are collected and sent together — by the worker's dispatcher inside its next claim
    (the *carrier*, no extra round trip at all), or by our own flusher when no dispatcher
    runs. Whoever sends holds :attr:`lock` until Redis answered and takes the pending blocks
    only once it holds it, so batches reach Redis in submission order (a job's finish never
    overtakes its start record) and each stays atomic (a script runs whole or not at all).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(APPLY_LUA)
        self._pending: Batch = []
        self._flusher: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self._carrier: Callable[[], None] | None = None
        # Blocks submitted with a key that have not been taken yet (see withdraw()).
        self._keyed: dict[str, list[Command]] = {}

    async def run(self, commands: list[Command]) -> None:
        """Apply ``commands`` with the next batch and wait for it.

        Never call this from the carrier itself: it would wait for its own next claim.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit(commands, future)
        await future

    def submit_nowait(self, commands: list[Command], *, key: str | None = None) -> None:
        """Apply ``commands`` with the next batch; a failure is logged, not raised.

        No future, so no done-callback either: one event-loop callback less per job.
        ``key``: :meth:`withdraw` may still empty the block until it is taken.
        """
        self._submit(commands, None)
        if key is not None:
            self._keyed[key] = commands

    def withdraw(self, key: str) -> None:
        """Empty the block submitted under ``key``, if no batch has taken it yet (a block
        that a later one in the same batch makes pointless: a job's start record, when its
        finish follows)."""
        commands = self._keyed.pop(key, None)
        if commands is not None:
            commands.clear()

    def _submit(self, commands: list[Command], future: asyncio.Future[None] | None) -> None:
        self._pending.append((commands, future))
        if len(self._pending) > 1:
            return  # already announced
        if self._carrier is not None:
            self._carrier()
        elif self._flusher is None:
            # The task's first step runs on the next loop turn, after every block submitted
            # in this one has joined the batch.
            self._flusher = asyncio.ensure_future(self._flush_all())

    def attach(self, carrier: Callable[[], None]) -> None:
        """Let ``carrier()`` be called when blocks are waiting; it must then :meth:`take`
        them (holding :attr:`lock`) and :meth:`settle` them, soon."""
        self._carrier = carrier

    def detach(self) -> None:
        """Back to flushing by ourselves (the carrier stopped)."""
        self._carrier = None
        if self._pending and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_all())

    def take(self) -> Batch:
        """The pending blocks, to send now; call with :attr:`lock` held."""
        batch, self._pending = self._pending, []
        self._keyed.clear()  # taken: too late to withdraw any of them
        return batch

    @staticmethod
    def encode(batch: Batch) -> str:
        return _JSON_ENCODER.encode(
            [command for commands, _ in batch for command in commands]
        ).decode()

    @staticmethod
    def settle(batch: Batch, error: BaseException | None) -> None:
        """Resolve the batch's futures once Redis answered (or failed to)."""
        if error is not None and any(future is None for _, future in batch):
            log.warning("job_state_record_failed", error=redact(str(error)))
        for _, future in batch:
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)

    async def drain(self) -> None:
        """Wait until everything submitted so far has been sent and answered."""
        if self._pending and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_all())
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        async with self.lock:  # a batch the carrier has in flight
            pass

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                async with self.lock:
                    batch = self.take()
                    if not batch:
                        continue
                    try:
                        await self._script(keys=[], args=[self.encode(batch)])
                    except BaseException as err:
                        self.settle(batch, err)
                        if not isinstance(err, Exception):
                            raise
                    else:
                        self.settle(batch, None)
        finally:
            self._flusher = None
