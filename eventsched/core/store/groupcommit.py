"""Group commit: a worker thread runs the requests of many concurrent callers as one
PostgreSQL statement (one transaction) per round trip.

Generic over the request and result types: the caller gives a ``batch_fn`` that turns a
batch of requests into results on a blocking connection (the executor's claims and outcomes,
:mod:`eventsched.core.store.executions`). Nothing waits for a timer: while one batch is in
flight the next one fills up, so batches grow with load and a lone request goes out at once
(PostgreSQL's own group commit idea).

Three sides, each method says which it runs on:

* **asyncio side** (the trio-asyncio loop; callers are SAQ jobs): :meth:`GroupCommit.submit`,
  :meth:`~GroupCommit.submit_nowait`, :attr:`~GroupCommit.backlog`, :attr:`~GroupCommit.idle`,
  :meth:`~GroupCommit.close`, and ``_deliver``, the one callback per batch;
* **trio side**: :meth:`GroupCommit.run`, which owns the thread for the service's lifetime;
* **the commit thread**: ``_thread_main`` and everything it calls (``_take``, ``_run_batch``,
  ``_execute``, ``_connection_failed``, ``_requeue_and_fail``, ``_to_loop``). Only this
  thread touches the connection.

Invariants:

* ``_pending`` is touched only under ``_cond``, on either side.
* Every request taken off ``_pending`` is counted in ``_in_flight`` until it is delivered on
  the loop (or put back, for a write-behind request after a connection failure), exactly
  once; so ``idle`` means every request submitted has been answered.
* Futures are resolved, and ``after_batch`` called, only on the loop and only after the
  statement committed (or failed): one ``call_soon_threadsafe`` per batch, whatever its size.
* A statement holds at most one request per ``key`` and at most ``max_batch`` requests.
* A write-behind request (:meth:`~GroupCommit.submit_nowait`) is never failed: it is re-sent
  until it commits, or logged and dropped once older than ``patience``. A waiting request
  fails with :class:`DependencyError` when the connection breaks, whether or not its batch
  committed; ``batch_fn`` must therefore recognise a re-sent request as done.

Why a thread and not psycopg's async connection: under trio-asyncio every asyncio callback
costs a trio scheduler pass and an async statement takes several, which queued behind the
jobs' own callbacks at high rates (measurement: ``docs/design-notes.md``, "Group commit on a
thread"). The thread's blocking round trip costs the loop one callback per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
import trio

from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

log = get_logger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

#: The statements run here address their batch's rows by key. On a table whose statistics
#: are stale (a fresh install, a test, a benchmark: autovacuum analyses at most once a
#: minute) the planner may cost a scan of a small `event_attempts` below an index lookup,
#: and the generic plan that psycopg's prepared statement keeps from its sixth execution
#: on goes on scanning the whole table per statement or per row as it grows: ~7,000 rows
#: read per event, and claims slower than the rate, in a 1,000/s benchmark. Sequential
#: scans are made a last resort on these connections only.
_SESSION_OPTIONS = "-c enable_seqscan=off"

BatchFn = Callable[[psycopg.Connection[Any], Sequence[Req]], Sequence[Res]]
AfterBatch = Callable[[Sequence[Req], Sequence[Res]], None]


@dataclass(slots=True)
class _Item(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res] | None  # None: submitted without waiting (write-behind)
    since: float  # time.monotonic() of submission


class GroupCommit(Generic[Req, Res]):
    """Runs requests of many concurrent jobs as one statement per round trip.

    Jobs (asyncio side) queue requests; a dedicated thread with a blocking connection of
    its own takes every pending request, runs ``batch_fn`` once, and hands the results back
    to the event loop in ONE callback, which resolves the requests' futures and calls
    ``after_batch`` — only after the statement committed.

    Two ways in:

    * :meth:`submit` returns a future (the claim: the handler must not run before it);
    * :meth:`submit_nowait` does not wait (outcomes, write-behind): the request stays queued
      across connection failures and is re-sent until it commits or is older than
      ``patience`` seconds (then it is logged and dropped; the reconciler recovers the
      event). A waiting job costs one more wake-up through the loop.

    If a statement fails for a reason other than the connection (one bad request), the batch
    is retried one request at a time so only that request fails; deadlocks and
    serialization failures (the statement rolled back) are retried. When the connection
    breaks or cannot be opened, waiting requests fail with :class:`DependencyError`
    (whether their batch committed is unknown; callers re-submit, and ``batch_fn``
    recognises a re-sent request as done), and the thread reconnects with backoff.
    """

    def __init__(
        self,
        name: str,
        batch_fn: BatchFn[Req, Res],
        *,
        key: Callable[[Req], str],
        max_batch: int,
        after_batch: AfterBatch[Req, Res] | None = None,
        patience: float = 60.0,
        min_interval: float = 0.0,
    ) -> None:
        self.name = name
        # Shortest time between two statements: 0 for claims (a job waits for its claim);
        # a few ms for write-behind outcomes, where nobody waits and fewer, bigger batches
        # cost less CPU.
        self._min_interval = min_interval
        self._batch_fn = batch_fn
        self._key = key
        self._max_batch = max_batch
        self._after_batch = after_batch
        self._patience = patience
        self._cond = threading.Condition()
        self._pending: list[_Item[Req, Res]] = []  # guarded by _cond
        self._in_flight = 0  # taken by the thread, not yet delivered on the loop
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.problem: str | None = None  # the connection's last failure, None when fine
        self.batches = 0  # statements sent (for tests and benchmarks)
        self.requests = 0

    # -- asyncio side ----------------------------------------------------------------------------

    def submit(self, request: Req) -> asyncio.Future[Res]:
        """Queue ``request``; the future resolves once its statement committed."""
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._add(_Item(request, future, time.monotonic()))
        return future

    def submit_nowait(self, request: Req) -> None:
        """Queue ``request`` without waiting for it (see the class docstring)."""
        self._add(_Item(request, None, time.monotonic()))

    def _add(self, item: _Item[Req, Res]) -> None:
        with self._cond:
            self._pending.append(item)
            if len(self._pending) == 1:
                self._cond.notify()

    @property
    def backlog(self) -> int:
        """Requests pending or in flight."""
        return len(self._pending) + self._in_flight

    @property
    def idle(self) -> bool:
        return self.backlog == 0

    def close(self) -> None:
        """Serve what is pending, then let the thread end."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def _deliver(
        self, batch: list[_Item[Req, Res]], results: Sequence[Res | BaseException]
    ) -> None:
        # On the loop: one callback per batch, whatever its size.
        done_requests: list[Req] = []
        done_results: list[Res] = []
        try:
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(result)
                    continue
                if item.future is not None and not item.future.done():
                    item.future.set_result(result)
                done_requests.append(item.request)
                done_results.append(result)
            if done_requests and self._after_batch is not None:
                try:
                    self._after_batch(done_requests, done_results)
                except Exception:
                    log.exception("after_batch_failed", store=self.name)
        finally:
            with self._cond:
                self._in_flight -= len(batch)

    # -- trio side -------------------------------------------------------------------------------

    async def run(self, dsn: str, connect_timeout: float = 5.0) -> None:
        """Serve on a dedicated thread until :meth:`close`d and drained (call inside
        ``trio_asyncio.open_loop``)."""
        self._loop = asyncio.get_event_loop()
        limiter = trio.CapacityLimiter(1)  # its own: never a slot of the shared pool
        await trio.to_thread.run_sync(
            self._thread_main, dsn, connect_timeout, limiter=limiter, abandon_on_cancel=True
        )

    # -- the thread --------------------------------------------------------------------------------

    def _thread_main(self, dsn: str, connect_timeout: float) -> None:
        conn: psycopg.Connection[Any] | None = None
        backoff = 0.1
        next_batch = 0.0
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._closing:
                        self._cond.wait()
                    if not self._pending:
                        return  # closing and drained
                    wait = next_batch - time.monotonic()
                    if wait > 0 and not self._closing:
                        self._cond.wait(wait)  # close() cuts it short
                next_batch = time.monotonic() + self._min_interval
                if conn is None or conn.closed:
                    try:
                        conn = psycopg.connect(
                            dsn,
                            autocommit=True,
                            connect_timeout=max(1, int(connect_timeout)),
                            application_name=f"eventsched-executor-{self.name}",
                            options=_SESSION_OPTIONS,
                        )
                        self.problem = None
                        backoff = 0.1
                    except psycopg.Error as err:
                        self._connection_failed(err)
                        with self._cond:
                            self._cond.wait(backoff)  # close() cuts it short
                            if self._closing:
                                return
                        backoff = min(backoff * 2, 5.0)
                        continue
                batch = self._take()
                if batch:
                    self._run_batch(conn, batch)
                # Not kept while waiting: its futures hold their results (a claim's payload).
                del batch
        finally:
            if conn is not None:
                conn.close()

    def _take(self) -> list[_Item[Req, Res]]:
        # A request whose job gave up (cancelled future) is dropped; one request per event
        # per statement (a second one for the same event waits for the next batch).
        batch: list[_Item[Req, Res]] = []
        later: list[_Item[Req, Res]] = []
        seen: set[str] = set()
        with self._cond:
            for item in self._pending:
                if item.future is not None and item.future.done():
                    continue
                key = self._key(item.request)
                if key in seen or len(batch) >= self._max_batch:
                    later.append(item)
                else:
                    seen.add(key)
                    batch.append(item)
            self._pending = later
            self._in_flight += len(batch)
        return batch

    def _run_batch(self, conn: psycopg.Connection[Any], batch: list[_Item[Req, Res]]) -> None:
        results: list[Res | BaseException]
        try:
            results = list(self._execute(conn, [item.request for item in batch]))
        except psycopg.Error as err:
            if conn.broken or conn.closed or isinstance(err, psycopg.InterfaceError):
                conn.close()
                self._requeue_and_fail(batch, err)
                return
            if len(batch) == 1:
                if batch[0].future is None:
                    log.error("write_failed", store=self.name, request=repr(batch[0].request),
                              error=redact(str(err)))  # fmt: skip
                results = [err]
            else:
                log.warning("group_commit_batch_failed", batch=self.name,
                            size=len(batch), error=redact(str(err)))  # fmt: skip
                for item in batch:  # each is delivered (and counted out) on its own
                    self._run_batch(conn, [item])
                return
        self._to_loop(batch, results)

    def _execute(self, conn: psycopg.Connection[Any], requests: list[Req]) -> Sequence[Res]:
        for attempt in range(3):
            try:
                self.batches += 1
                self.requests += len(requests)
                return self._batch_fn(conn, requests)
            except psycopg.errors.TransactionRollback:
                # Deadlock or serialization failure: the statement rolled back whole.
                if attempt == 2:
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _connection_failed(self, err: BaseException) -> None:
        self.problem = redact(str(err)) or type(err).__name__
        log.warning("store_connection_failed", store=self.name, error=self.problem)
        # Waiting requests fail now (their jobs retry or give up); write-behind ones wait.
        now = time.monotonic()
        failed: list[_Item[Req, Res]] = []
        with self._cond:
            kept: list[_Item[Req, Res]] = []
            for item in self._pending:
                if item.future is not None:
                    failed.append(item)
                elif now - item.since < self._patience:
                    kept.append(item)
                else:
                    log.error("write_dropped", store=self.name, request=repr(item.request),
                              error=self.problem, note="the reconciler recovers the event")  # fmt: skip
            self._pending = kept
            self._in_flight += len(failed)
        if failed:
            error = DependencyError("postgres", self.problem)
            self._to_loop(failed, [error] * len(failed))

    def _requeue_and_fail(self, batch: list[_Item[Req, Res]], err: BaseException) -> None:
        waiting = [item for item in batch if item.future is not None]
        with self._cond:
            self._pending[:0] = [item for item in batch if item.future is None]
            self._in_flight -= len(batch) - len(waiting)
        self._connection_failed(err)
        if waiting:
            error = DependencyError("postgres", redact(str(err)) or type(err).__name__)
            self._to_loop(waiting, [error] * len(waiting))

    def _to_loop(
        self, batch: list[_Item[Req, Res]], results: Sequence[Res | BaseException]
    ) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody waits any more
            loop.call_soon_threadsafe(self._deliver, batch, results)
