"""Run trio-asyncio's ready callbacks in batches instead of one per trio scheduler pass.

trio-asyncio's loop (``BaseTrioEventLoop._main_loop_one``) runs one asyncio callback per
call: it opens a ``move_on_after`` cancel scope, awaits the callback queue (a trio
checkpoint: a full pass of trio's scheduler, with an ``epoll_wait`` syscall) and runs the
callback. Every asyncio task wake-up, future callback and ``call_soon`` pays for that pass:
~38 us per task wake-up on the dev box against ~5 us in plain asyncio, ~9 us batched
(``python -m bench.loop``). In the executor, which wakes a few tasks per job, py-spy put
trio's scheduler and these cancel scopes at ~27% of the event-loop thread
(``bench/RESULTS.md``).

:func:`install` replaces that step with one that first runs every callback (and due timer)
that is ready now without yielding, up to :data:`BATCH` of them, then yields to trio once,
so trio tasks are never starved for longer than one batch. Order is trio-asyncio's own: due
timers first, then the queue in FIFO order. When nothing is ready it falls back to the
original step (which blocks until the next callback or timer). The shutdown drain
(``no_wait=True``) always uses the original.

The replacement reads trio-asyncio internals (``_q_recv``, ``_timers``,
``AsyncHandle``), so it is installed only for the versions it was checked against
(:data:`CHECKED_VERSIONS`); any other version runs stock trio-asyncio (slower, equally
correct), and ``tests/unit/test_aioloop.py`` fails so that an upgrade is reviewed here.

It also drops cancelled timers from the heap, as asyncio's own loop does: trio-asyncio's
``_timer_handle_cancelled`` does nothing, so every cancelled timer (each ``asyncio.timeout``
or ``wait_for`` that finished early) stayed in ``_timers`` until its deadline. In the
executor that was one handle per job for the job timeout: ~38,000 handles (and their
contexts) at 1,000 jobs/s, which the garbage collector's full collections walked in 40-55 ms
pauses that showed up as execution lateness. Cancellations are counted and the heap is
rebuilt without them once they are more than :data:`MIN_CANCELLED` and half of it.

And it checks callbacks only in debug mode, as asyncio's own loop does: trio-asyncio's
``call_soon``, ``call_later`` and ``call_at`` test every callback for being a coroutine
function (``inspect`` on each call), and every future's result reaches its waiter through
``call_soon``: ~3% of the executor's loop thread at 1,000 jobs/s.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Coroutine
from typing import Any, Final

import trio
import trio_asyncio
from sniffio import thread_local as sniffio_library
from trio_asyncio import _base
from trio_asyncio._handles import AsyncHandle

#: trio-asyncio versions whose ``_main_loop_one`` this module was checked against.
CHECKED_VERSIONS: Final = frozenset({"0.16.0"})
#: Most callbacks run between two trio scheduler passes.
BATCH: Final = 64
#: Cancelled timers tolerated in the heap before it is compacted (asyncio uses 100 too).
MIN_CANCELLED: Final = 100

_original: Callable[..., Coroutine[Any, Any, None]] | None = None


async def _main_loop_batch(self: Any, no_wait: bool = False) -> None:
    """``BaseTrioEventLoop._main_loop_one``, running up to BATCH ready callbacks."""
    assert _original is not None  # set by install() before this replaces the method
    if no_wait:
        await _original(self, no_wait=True)
        return
    ran = 0
    timers: list[asyncio.TimerHandle] = self._timers
    if self._eventsched_cancelled > MIN_CANCELLED and 2 * self._eventsched_cancelled > len(timers):
        timers[:] = [timer for timer in timers if not timer._cancelled]
        heapq.heapify(timers)
        self._eventsched_cancelled = 0
    while ran < BATCH:
        if timers and timers[0].when() <= self.time():
            obj: Any = heapq.heappop(timers)
        else:
            try:
                obj = self._q_recv.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(obj, asyncio.TimerHandle):
                if not obj._cancelled:  # cancelled before it reached the heap
                    heapq.heappush(timers, obj)
                continue
        ran += 1
        if isinstance(obj, AsyncHandle):
            obj._context.run(self._nursery.start_soon, obj._run, name=obj._callback)
            await obj._started.wait()
        elif not obj._cancelled:
            previous, sniffio_library.name = sniffio_library.name, "asyncio"
            try:
                obj._run()
            finally:
                sniffio_library.name = previous
    if ran:
        await trio.lowlevel.checkpoint()  # let trio's own tasks run between batches
        return
    await _original(self)  # nothing ready: block until a callback or timer is


def _timer_handle_cancelled(self: Any, handle: asyncio.TimerHandle) -> None:
    """``TimerHandle.cancel`` calls this (asyncio counts them too); the step compacts."""
    self._eventsched_cancelled += 1


def _check_callback(self: Any, callback: Any, method: str) -> None:
    """``BaseEventLoop._check_callback`` in debug mode only (asyncio's own rule)."""
    if self._debug:
        asyncio.BaseEventLoop._check_callback(self, callback, method)  # type: ignore[attr-defined]


def installed() -> bool:
    """Whether the batched step is in place."""
    return _original is not None and _base.BaseTrioEventLoop._main_loop_one is _main_loop_batch


def install() -> bool:
    """Install the batched step (idempotent); False if this trio-asyncio is unchecked."""
    global _original
    if installed():
        return True
    if getattr(trio_asyncio, "__version__", None) not in CHECKED_VERSIONS:
        return False
    _original = _base.BaseTrioEventLoop._main_loop_one
    _base.BaseTrioEventLoop._eventsched_cancelled = 0
    _base.BaseTrioEventLoop._timer_handle_cancelled = _timer_handle_cancelled
    _base.BaseTrioEventLoop._check_callback = _check_callback
    _base.BaseTrioEventLoop._main_loop_one = _main_loop_batch
    return True
