"""A burst of jobs due at one instant starts with a small claim (real Redis).

The dispatcher's first claim after one that found nothing takes at most ``OPENING_CLAIM``
jobs and the next claim, at once, the rest the slots wait for: the first jobs of a burst
start (and send their own PostgreSQL claims, in the executor) without waiting behind every
slot's job (the rule itself: tests/unit/test_dispatcher.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from saq.types import Context

from eventsched.core.jobqueue import JobQueue, ScheduledJob, drain_worker, make_worker, run_worker
from eventsched.core.jobqueue.dispatcher import OPENING_CLAIM
from eventsched.core.jobqueue.jobs import JobClaim
from tests.support.execution import open_job_queue


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[JobQueue]:
    async with open_job_queue(redis_url, "test-burst") as queue:
        yield queue


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
