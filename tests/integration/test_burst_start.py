"""A burst of jobs due at one instant starts with a small claim (real Redis).

The dispatcher's first claim after one that found nothing takes at most ``OPENING_CLAIM``
jobs and the next claim, at once, the rest the slots wait for: the first jobs of a burst
start (and send their own PostgreSQL claims, in the executor) without waiting behind every
slot's job (the rule itself: tests/unit/test_dispatcher.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_asyncio
from redis import asyncio as aioredis
from saq.types import Context

from eventsched.core.jobqueue import JobQueue, ScheduledJob, drain_worker, make_worker, run_worker
from eventsched.core.jobqueue.dispatcher import OPENING_CLAIM
from eventsched.core.jobqueue.jobs import JobClaim


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[JobQueue]:
    name = f"test-burst-{uuid.uuid4().hex[:12]}"

    async def cleanup() -> None:
        redis = aioredis.from_url(redis_url)
        try:
            for pattern in (f"saq:{name}:*", f"saq:job:{name}:*", f"saq:abort:{name}*"):
                keys = [key async for key in redis.scan_iter(match=pattern)]
                if keys:
                    await redis.delete(*keys)
        finally:
            await redis.aclose()

    async with trio_asyncio.open_loop():
        queue = JobQueue(redis_url, name)
        await queue.connect()
        try:
            yield queue
        finally:
            await queue.close()
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(cleanup)()


async def test_a_burst_opens_with_a_small_claim_and_the_rest_follow_at_once(
    jobs: JobQueue,
) -> None:
    slots, count = 30, 40
    handed_out: list[int] = []  # jobs per claim that handed any out, in order
    queue = jobs.aio_queue
    claim = queue.claim

    async def counted(*args: Any, **kwargs: Any) -> JobClaim:
        result = await claim(*args, **kwargs)
        if result.jobs:
            handed_out.append(len(result.jobs))
        return result

    queue.claim = counted  # type: ignore[method-assign]  # a spy on this queue only
    calls: Counter[str] = Counter()

    async def run(ctx: Context, **kwargs: Any) -> None:
        calls[ctx["job"].key] += 1
        await asyncio.sleep(0.05)

    worker = make_worker(jobs, [("run", run)], concurrency=slots)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_worker, worker)
        # Due once the idle worker has claimed (and found nothing) at least once.
        due = time.time() + 0.3
        await jobs.enqueue_many(
            [ScheduledJob(key=f"{jobs.name}-{n}", function="run", scheduled=due) for n in range(count)]
        )  # fmt: skip
        with trio.fail_after(20):
            while sum(calls.values()) < count:  # noqa: ASYNC110  # asyncio side
                await trio.sleep(0.01)
        await drain_worker(worker)
    assert len(calls) == count and set(calls.values()) == {1}
    assert handed_out[:2] == [OPENING_CLAIM, slots - OPENING_CLAIM]
    assert sum(handed_out) == count
