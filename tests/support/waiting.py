"""Waiting, in a trio test, for state that lives in other processes or threads."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio


async def wait_until(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    *,
    limit: float = 20.0,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` every ``interval`` s until it is true; fail after ``limit`` s.

    An async ``check`` is awaited; a plain one (a blocking client call) runs in a worker
    thread. There is no event to wait on: the state is in other processes.
    """
    with trio.fail_after(limit):
        while True:
            if inspect.iscoroutinefunction(check):
                done = await check()
            else:
                done = await trio.to_thread.run_sync(check)
            if done:
                return
            await trio.sleep(interval)
