"""Waiting for a due time on this process's wall clock: never early, late by as little as we can.

A timer on the event loop is coarse: trio sleeps in ``epoll_wait``, whose timeout CPython
rounds *up* to whole milliseconds, so a sleep until the due time wakes anywhere in the
millisecond after it (0.5 ms late on average) plus the loop's own pass. :func:`wait_until`
sleeps on the loop until :data:`SPIN` before the due time and spins on ``time.time()`` for
whatever is left when it woke early: the loop is held for at most :data:`SPIN`, and a wake
that lands after the due time returns at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

#: Seconds before the due time the loop timer aims for; what is left is spun through. The
#: timer wakes up to 1 ms after its target (rounded up), so about SPIN / 1 ms of waits end
#: with a spin of SPIN / 2 on average: 0.3 ms keeps the spin under 0.05 ms of CPU per wait
#: while the other waits land within 0.7 ms of the due time.
SPIN: Final = 0.0003


async def wait_until(due: float) -> None:
    """Return once ``time.time() >= due`` (epoch seconds), never before (asyncio side)."""
    left = due - time.time()
    while left > SPIN:
        await asyncio.sleep(left - SPIN)
        left = due - time.time()
    while time.time() < due:
        pass  # at most SPIN: cheaper than another loop timer, which costs a millisecond
