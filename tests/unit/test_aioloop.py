"""The batched trio-asyncio loop step (eventsched.core.runtime.aioloop): same order, no starvation."""

from __future__ import annotations

import asyncio

import trio
import trio_asyncio

from eventsched.core.runtime import aioloop


def test_installed_for_the_pinned_trio_asyncio() -> None:
    # Fails after a trio-asyncio upgrade: review aioloop against the new _main_loop_one,
    # then add the version to CHECKED_VERSIONS.
    assert trio_asyncio.__version__ in aioloop.CHECKED_VERSIONS
    assert aioloop.installed()
    assert aioloop.install()  # idempotent


async def test_callbacks_and_timers_keep_asyncio_order() -> None:
    seen: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        for name in "abcdef":
            loop.call_soon(seen.append, name)
        loop.call_later(0.02, seen.append, "late")
        loop.call_later(0.01, seen.append, "early")
        loop.call_later(0.03, done.set_result, None)
        for i in range(3 * aioloop.BATCH):  # more than one batch
            loop.call_soon(seen.append, str(i))
        await done

    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(scenario)()
    numbers = [str(i) for i in range(3 * aioloop.BATCH)]
    assert seen == [*"abcdef", *numbers, "early", "late"]


async def test_trio_tasks_run_while_asyncio_is_busy() -> None:
    """A callback that re-schedules itself forever must not starve trio's own tasks."""
    spins = 0

    async with trio_asyncio.open_loop() as loop:
        stop = False

        def spin() -> None:
            nonlocal spins
            spins += 1
            if not stop:
                loop.call_soon(spin)

        loop.call_soon(spin)
        ticks = 0
        with trio.fail_after(5):
            for _ in range(20):
                await trio.sleep(0.001)
                ticks += 1
        stop = True
    assert ticks == 20
    assert spins > 20 * aioloop.BATCH  # the asyncio side kept running meanwhile


async def test_tasks_futures_and_threads_interleave() -> None:
    """Slots waiting on futures set from threads and from other tasks (the executor's
    shape) all finish, in a loop that also runs trio-side work."""

    async def slots() -> int:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()

        async def slot() -> int:
            total = 0
            while (item := await queue.get()) >= 0:
                fut = loop.create_future()
                loop.call_soon_threadsafe(fut.set_result, item)
                total += await fut
            return total

        tasks = [asyncio.ensure_future(slot()) for _ in range(20)]
        for i in range(2000):
            queue.put_nowait(i)
            if i % 50 == 0:
                await asyncio.sleep(0)
        for _ in tasks:
            queue.put_nowait(-1)
        return sum(await asyncio.gather(*tasks))

    async with trio_asyncio.open_loop():
        assert await trio_asyncio.aio_as_trio(slots)() == sum(range(2000))


async def test_stop_runs_what_was_scheduled_before_it() -> None:
    seen: list[int] = []
    async with trio_asyncio.open_loop() as loop:
        for i in range(3 * aioloop.BATCH):
            loop.call_soon(seen.append, i)
    # open_loop's exit stops the loop and drains every callback queued before the stop.
    assert seen == list(range(3 * aioloop.BATCH))


async def test_cancelled_timers_leave_the_heap() -> None:
    """Each finished asyncio.timeout/wait_for cancels a timer; trio-asyncio kept them all
    until their deadlines (a job timeout: tens of thousands of handles for the garbage
    collector to walk). Live timers still fire, in order."""
    fired: list[str] = []

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            for _ in range(50):
                async with asyncio.timeout(3600):  # what the executor does around a handler
                    await asyncio.sleep(0)
            await asyncio.sleep(0)
        doomed = [loop.call_later(3600, fired.append, "never") for _ in range(500)]
        loop.call_later(0.02, fired.append, "second")
        loop.call_later(0.01, fired.append, "first")
        for handle in doomed:
            handle.cancel()
        await asyncio.sleep(0.05)
        return len(loop._timers)  # type: ignore[attr-defined]  # trio-asyncio's heap

    async with trio_asyncio.open_loop():
        left = await trio_asyncio.aio_as_trio(scenario)()
    assert fired == ["first", "second"]
    # 1,500 timers were cancelled; without compaction all 1,500 would still be here.
    assert left <= 2 * aioloop.MIN_CANCELLED


async def test_callbacks_are_checked_only_in_debug_mode_as_asyncio_does() -> None:
    """trio-asyncio checks every call_soon/call_at callback for being a coroutine function
    (inspect, several percent of the executor's loop at 1,000 jobs/s); asyncio does that only
    in debug mode, and so does the installed loop."""
    checked: list[object] = []
    original = asyncio.coroutines.iscoroutinefunction

    def counting(func: object) -> bool:
        checked.append(func)
        return original(func)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        asyncio.coroutines.iscoroutinefunction = counting
        try:
            done = loop.create_future()
            loop.call_soon(done.set_result, None)
            await done
            assert checked == []
            loop.set_debug(True)
            try:

                async def coroutine_function() -> None:
                    pass

                try:
                    loop.call_soon(coroutine_function)
                except TypeError as err:
                    assert "coroutines cannot be used with call_soon()" in str(err)
                else:
                    raise AssertionError("a coroutine function was accepted in debug mode")
            finally:
                loop.set_debug(False)
        finally:
            asyncio.coroutines.iscoroutinefunction = original

    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(scenario)()
