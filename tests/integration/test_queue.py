"""Specification of the job-queue adapter (``eventsched.core.jobqueue``) against a real Redis.

Redis: ``EVENTSCHED_TEST_REDIS_URL`` or ``redis://127.0.0.1:6379``. Every test uses its own
queue name (its own key namespace) and deletes its keys afterwards. Job functions run on
the asyncio side of trio-asyncio and only touch plain Python objects; the trio side polls.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_asyncio
from redis import asyncio as aioredis
from saq.job import Status
from saq.types import Context

from eventsched.core.jobqueue import (
    JobQueue,
    OnTimeWorker,
    ScheduledJob,
    drain_worker,
    make_worker,
    run_worker,
)
from eventsched.core.jobqueue import store as store_module
from eventsched.core.jobqueue.jobs import size_hint
from eventsched.core.runtime.errors import DependencyError

REDIS_URL = os.environ.get("EVENTSCHED_TEST_REDIS_URL", "redis://127.0.0.1:6379")


async def aio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Call an asyncio coroutine function from the test (trio) side."""
    return await trio_asyncio.aio_as_trio(fn)(*args)


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop():
        yield


@pytest.fixture
async def queue_name(aio_loop: None) -> AsyncIterator[str]:
    """A fresh queue name; every key of its namespace is deleted afterwards."""
    name = f"test-q-{uuid.uuid4().hex[:12]}"
    yield name

    async def cleanup() -> None:
        redis = aioredis.from_url(REDIS_URL)
        try:
            for pattern in (f"saq:{name}:*", f"saq:job:{name}:*", f"saq:abort:{name}*"):
                keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
                if keys:
                    await redis.delete(*keys)
        finally:
            await redis.aclose()

    with trio.CancelScope(shield=True):
        await aio(cleanup)


@pytest.fixture
async def jobs(queue_name: str) -> AsyncIterator[JobQueue]:
    queue = JobQueue(REDIS_URL, queue_name)
    await queue.connect()
    yield queue
    await queue.close()


@pytest.fixture
async def other_jobs(queue_name: str) -> AsyncIterator[JobQueue]:
    """A second client of the same queue, as another executor process would have."""
    queue = JobQueue(REDIS_URL, queue_name)
    await queue.connect()
    yield queue
    await queue.close()


class Recorder:
    """A job function that records when each job started, for the trio side to inspect."""

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold  # seconds each job runs
        self.started: list[tuple[str, float, float]] = []  # (key, start, scheduled)
        self.finished: list[str] = []

    async def record(self, ctx: Context, **kwargs: Any) -> None:
        job = ctx["job"]
        self.started.append((job.key, time.time(), float(job.scheduled)))
        if self.hold:
            await asyncio.sleep(self.hold)
        self.finished.append(job.key)

    def keys(self) -> list[str]:
        return [key for key, _, _ in self.started]

    async def wait_started(self, count: int, within: float = 10.0) -> None:
        with trio.fail_after(within):
            while len(self.started) < count:  # noqa: ASYNC110  # written by asyncio-side jobs
                await trio.sleep(0.01)


@asynccontextmanager
async def running(worker: OnTimeWorker) -> AsyncIterator[trio.Nursery]:
    """Run ``worker`` for the block's duration, then drain it gracefully."""
    async with trio.open_nursery() as nursery:
        await nursery.start(run_worker, worker)
        yield nursery
        with trio.fail_after(10):
            await drain_worker(worker)


def due_in(seconds: float) -> float:
    return time.time() + seconds


def job(queue: JobQueue, n: int | str, scheduled: float, **kwargs: Any) -> ScheduledJob:
    return ScheduledJob(
        key=f"{queue.name}-{n}", function="record", scheduled=scheduled, kwargs=kwargs
    )


def lateness_report(recorder: Recorder) -> tuple[float, float, float]:
    late = sorted((start - scheduled) * 1000 for _, start, scheduled in recorder.started)
    p50 = late[len(late) // 2]
    p99 = late[min(len(late) - 1, math.ceil(len(late) * 0.99) - 1)]
    return p50, p99, late[-1]


# -- enqueue ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "job_timeout", "size"), [({"x": 1}, 7, None), ({}, 10, None), ({}, 10, 321)]
)
async def test_enqueue_stores_what_saq_would_store(
    jobs: JobQueue, kwargs: dict[str, Any], job_timeout: int, size: int | None
) -> None:
    queue = jobs.aio_queue
    scheduled = due_in(100) + 0.000123
    spec = ScheduledJob(
        key=f"{jobs.name}-a",
        function="record",
        scheduled=scheduled,
        kwargs=kwargs,
        timeout=job_timeout,
        size=size,
    )
    assert await jobs.enqueue_many([spec]) == 1

    stored = await aio(queue.redis.get, queue.job_id(spec.key))
    expected = queue.make_job(spec)
    expected.queued = json.loads(stored)["queued"]
    assert json.loads(stored) == json.loads(json.dumps(expected.to_dict()))  # SAQ's own

    saq_job = await aio(queue.job, spec.key)
    assert saq_job.scheduled == scheduled  # float seconds, nothing truncated
    assert (saq_job.retries, saq_job.timeout, saq_job.status) == (1, job_timeout, Status.QUEUED)
    assert size_hint(saq_job) == size  # in the job's meta, not among its kwargs
    assert saq_job.kwargs == kwargs
    assert await aio(queue.redis.zscore, queue.namespace("incomplete"), saq_job.id) == scheduled


async def test_serialize_matches_saq_to_dict(jobs: JobQueue) -> None:
    queue = jobs.aio_queue
    saq_job = queue.make_job(job(jobs, "a", due_in(10), event_id="e1"))
    assert json.loads(queue.serialize(saq_job)) == json.loads(json.dumps(saq_job.to_dict()))
    saq_job.status, saq_job.result, saq_job.error = Status.COMPLETE, {"ok": True}, None
    saq_job.meta, saq_job.attempts, saq_job.started = {"m": 1}, 1, 123
    assert json.loads(queue.serialize(saq_job)) == json.loads(json.dumps(saq_job.to_dict()))


async def test_enqueuing_a_pending_key_again_is_a_no_op(jobs: JobQueue) -> None:
    later = due_in(100)
    assert await jobs.enqueue_many([job(jobs, "a", later)]) == 1
    assert await jobs.enqueue_many([job(jobs, "a", later + 5), job(jobs, "b", later)]) == 1
    assert await jobs.enqueue_many([job(jobs, "c", later), job(jobs, "c", later)]) == 1
    assert await jobs.counts() == {"queued": 0, "scheduled": 3, "active": 0}
    saq_job = await aio(jobs.aio_queue.job, f"{jobs.name}-a")
    assert saq_job.scheduled == later  # the first enqueue wins
    assert await jobs.job_exists(f"{jobs.name}-a")
    assert not await jobs.job_exists(f"{jobs.name}-zzz")
    keys = [f"{jobs.name}-{n}" for n in ("a", "b", "zzz")]
    assert await jobs.pending_keys(keys) == set(keys[:2])


async def test_due_jobs_are_queued_at_once(jobs: JobQueue) -> None:
    assert await jobs.enqueue_many([job(jobs, "past", due_in(-1)), job(jobs, "now", 0.0)]) == 2
    assert await jobs.counts() == {"queued": 2, "scheduled": 0, "active": 0}


async def test_enqueue_throughput(jobs: JobQueue) -> None:
    start = due_in(600)
    batch = [job(jobs, n, start + n / 1000, event_id=str(n)) for n in range(5000)]
    began = time.perf_counter()
    assert await jobs.enqueue_many(batch) == 5000
    rate = 5000 / (time.perf_counter() - began)
    print(f"\nenqueue_many(5000): {rate:,.0f} jobs/s")
    assert rate > 5000  # loose: the box is shared; ~20k/s measured when idle


async def test_redis_down_is_a_dependency_error(aio_loop: None) -> None:
    queue = JobQueue("redis://127.0.0.1:1", "nowhere", connect_timeout=1.0)
    with pytest.raises(DependencyError) as caught:
        await queue.ping()
    assert caught.value.dependency == "redis"
    with pytest.raises(DependencyError):
        await run_worker(make_worker(queue, [("record", Recorder().record)], concurrency=1))
    await queue.close()


# -- moving -----------------------------------------------------------------------------------


async def test_a_job_is_never_moved_before_its_due_time_nor_twice(jobs: JobQueue) -> None:
    queue = jobs.aio_queue
    scheduled = due_in(100) + 0.0004  # sub-millisecond part on purpose
    await jobs.enqueue_many([job(jobs, "a", scheduled)])

    early = await aio(queue.claim, 1, scheduled - 1e-6)
    assert (early.moved, early.jobs, early.next_due) == (0, [], scheduled)

    on_time = await aio(queue.claim, 1, scheduled)
    assert on_time.moved == 1
    assert [j.key for j in on_time.jobs] == [f"{jobs.name}-a"]

    again = await aio(queue.claim, 1, scheduled + 1)
    assert (again.moved, again.jobs, again.next_due) == (0, [], None)
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 1}


@pytest.mark.parametrize("worker_alive", [True, False])
async def test_sweep_spares_a_just_claimed_job_but_recovers_an_orphan(
    jobs: JobQueue, monkeypatch: pytest.MonkeyPatch, worker_alive: bool
) -> None:
    monkeypatch.setattr(store_module, "_CLAIM_GRACE", 0.3)
    queue = jobs.aio_queue
    await jobs.enqueue_many([job(jobs, "a", due_in(-1))])
    (claimed,) = (await aio(queue.claim, 1)).jobs  # in `active`, status still QUEUED

    async def start_soon() -> None:  # what a live worker does a moment after claiming
        await asyncio.sleep(0.05)
        queue.mark_active(claimed)
        await queue.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(aio, queue.sweep, 1, 0.2)
        if worker_alive:
            nursery.start_soon(aio, start_soon)

    stored = await aio(queue.job, claimed.key)
    if worker_alive:
        assert stored.status == Status.ACTIVE
        assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 1}
    else:  # its worker died before starting it: back in the queue, not lost
        assert stored.status == Status.QUEUED
        assert await jobs.counts() == {"queued": 1, "scheduled": 0, "active": 0}


@pytest.mark.parametrize("start_sent_first", [False, True])
async def test_a_start_record_still_waiting_is_folded_into_the_finish(
    jobs: JobQueue, start_sent_first: bool
) -> None:
    # A job that finishes before its start record left (the usual case: both ride with
    # the dispatcher's next claim) writes its finished record only: the ACTIVE text
    # would be overwritten in the same atomic batch anyway. One sent earlier stays sent.
    queue = jobs.aio_queue
    await jobs.enqueue_many([job(jobs, "a", due_in(-1))])
    (claimed,) = (await aio(queue.claim, 1)).jobs
    redis = aioredis.from_url(REDIS_URL)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await aio(pubsub.subscribe, claimed.id)

    async def run_job() -> None:
        queue.mark_active(claimed)
        if start_sent_first:
            await queue.flush()
        queue.complete_nowait(claimed, None)
        await queue.flush()

    async def published() -> list[str]:
        seen: list[str] = []
        until = time.monotonic() + 0.5  # None also answers the subscription's confirmation
        while time.monotonic() < until:
            message = await pubsub.get_message(timeout=0.1)
            if message is not None:
                seen.append(message["data"].decode())
        return seen

    try:
        await aio(run_job)
        seen = await aio(published)
    finally:
        await aio(pubsub.aclose)
        await aio(redis.aclose)
    assert seen == (["active", "complete"] if start_sent_first else ["complete"])
    stored = await aio(queue.job, claimed.key)
    assert stored.status == Status.COMPLETE
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


async def test_schedule_serves_a_stock_saq_worker(jobs: JobQueue) -> None:
    queue = jobs.aio_queue
    await jobs.enqueue_many([job(jobs, "a", due_in(0.05)), job(jobs, "b", due_in(100))])
    assert await aio(queue.schedule) == []
    await trio.sleep(0.06)
    assert await aio(queue.schedule) == [queue.job_id(f"{jobs.name}-a")]
    assert await jobs.counts() == {"queued": 1, "scheduled": 1, "active": 0}


# -- workers ----------------------------------------------------------------------------------


async def test_jobs_start_on_time_and_never_early(jobs: JobQueue) -> None:
    recorder = Recorder()
    start = due_in(0.3)
    await jobs.enqueue_many([job(jobs, n, start + n * 0.004) for n in range(300)])  # to +1.5 s
    async with running(make_worker(jobs, [("record", recorder.record)], concurrency=10)):
        await recorder.wait_started(300)

    assert sorted(recorder.keys()) == sorted(f"{jobs.name}-{n}" for n in range(300))
    assert all(begun >= scheduled for _, begun, scheduled in recorder.started)
    p50, p99, worst = lateness_report(recorder)
    print(f"\n300 jobs, 1 worker: lateness p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.2f} ms")
    assert p99 < 50
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


async def test_a_job_is_claimed_ahead_of_its_due_time_and_started_at_it(jobs: JobQueue) -> None:
    # The claim's round trip happens before the due time; the job waits in its slot.
    recorder = Recorder()
    scheduled = due_in(0.6)
    await jobs.enqueue_many([job(jobs, "a", scheduled)])
    claimed_at: float | None = None
    worker = make_worker(jobs, [("record", recorder.record)], concurrency=2, claim_ahead=0.3)
    async with running(worker):
        with trio.fail_after(5):
            while claimed_at is None:
                if (await jobs.counts())["active"] == 1:
                    claimed_at = time.time()
                await trio.sleep(0.005)
        await recorder.wait_started(1)

    [(_, begun, _)] = recorder.started
    assert claimed_at < scheduled - 0.2  # claimed ~0.3 s ahead (the poll may lag a little)
    assert begun >= scheduled


async def test_two_workers_run_each_job_exactly_once(jobs: JobQueue, other_jobs: JobQueue) -> None:
    recorder = Recorder()
    start = due_in(0.2)
    await jobs.enqueue_many([job(jobs, n, start + n * 0.0008) for n in range(1000)])
    async with (
        running(make_worker(jobs, [("record", recorder.record)], concurrency=10)),
        running(make_worker(other_jobs, [("record", recorder.record)], concurrency=10)),
    ):
        await recorder.wait_started(1000)
        await trio.sleep(0.2)  # room for a duplicate to show up

    assert len(recorder.started) == 1000
    assert set(recorder.keys()) == {f"{jobs.name}-{n}" for n in range(1000)}
    assert all(begun >= scheduled for _, begun, scheduled in recorder.started)
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


async def test_counts_follow_jobs_through_the_queue(jobs: JobQueue) -> None:
    recorder = Recorder(hold=0.5)
    await jobs.enqueue_many([job(jobs, n, due_in(100)) for n in range(3)])
    await jobs.enqueue_many([job(jobs, n, due_in(-1)) for n in range(3, 5)])
    assert await jobs.counts() == {"queued": 2, "scheduled": 3, "active": 0}

    async with running(make_worker(jobs, [("record", recorder.record)], concurrency=1)):
        await recorder.wait_started(1)
        assert await jobs.counts() == {"queued": 1, "scheduled": 3, "active": 1}
        await recorder.wait_started(2)
    assert await jobs.counts() == {"queued": 0, "scheduled": 3, "active": 0}


async def test_worker_leaves_signal_handling_to_trio(jobs: JobQueue) -> None:
    assert OnTimeWorker.SIGNALS == []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        async with running(make_worker(jobs, [("record", Recorder().record)], concurrency=2)):
            assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
            signal.raise_signal(signal.SIGINT)
            with trio.fail_after(2):
                async for signum in received:
                    assert signum == signal.SIGINT
                    break
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


async def test_drain_lets_the_running_job_finish_and_takes_no_new_one(jobs: JobQueue) -> None:
    recorder = Recorder(hold=0.5)
    await jobs.enqueue_many([job(jobs, "first", due_in(0))])
    worker = make_worker(jobs, [("record", recorder.record)], concurrency=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_worker, worker)
        await recorder.wait_started(1)
        await jobs.enqueue_many([job(jobs, "second", due_in(0.1))])
        with trio.fail_after(5):
            await drain_worker(worker)  # run_worker returns too, ending the nursery

    assert recorder.finished == [f"{jobs.name}-first"]
    stored = await aio(jobs.aio_queue.job, f"{jobs.name}-first")
    assert stored.status == Status.COMPLETE
    assert await jobs.job_exists(f"{jobs.name}-second")  # left for the next worker


async def test_a_finished_key_can_be_enqueued_again_at_once(jobs: JobQueue) -> None:
    # SAQ's rule: dedup only while the job is incomplete; the executor's PostgreSQL
    # compare-and-set is what stops a second execution.
    recorder = Recorder()
    await jobs.enqueue_many([job(jobs, "a", due_in(0))])
    async with running(make_worker(jobs, [("record", recorder.record)], concurrency=1)):
        await recorder.wait_started(1)
    assert not await jobs.job_exists(f"{jobs.name}-a")
    assert await jobs.enqueue_many([job(jobs, "a", due_in(100))]) == 1


async def test_a_hard_stop_requeues_the_running_job_once(jobs: JobQueue) -> None:
    stuck = Recorder(hold=30)
    await jobs.enqueue_many([job(jobs, "a", due_in(0))])
    async with trio.open_nursery() as nursery:
        await nursery.start(
            run_worker, make_worker(jobs, [("record", stuck.record)], concurrency=1)
        )
        await stuck.wait_started(1)
        nursery.cancel_scope.cancel()

    assert stuck.finished == []
    queue = jobs.aio_queue
    assert await jobs.counts() == {"queued": 1, "scheduled": 0, "active": 0}
    # Score 0 = "already queued": SAQ's own retry kept the old due score here, and its next
    # schedule pass queued the job a second time.
    assert (
        await aio(queue.redis.zscore, queue.namespace("incomplete"), queue.job_id(f"{jobs.name}-a"))
        == 0
    )

    rerun = Recorder()
    async with running(make_worker(jobs, [("record", rerun.record)], concurrency=2)):
        await rerun.wait_started(1)
        await trio.sleep(0.3)
    assert rerun.keys() == [f"{jobs.name}-a"]


async def test_a_failing_job_is_not_retried_by_saq(jobs: JobQueue) -> None:
    calls: list[str] = []

    async def fail(ctx: Context) -> None:
        calls.append(ctx["job"].key)
        raise RuntimeError("boom")

    await jobs.enqueue_many([ScheduledJob(key=f"{jobs.name}-a", function="fail", scheduled=0.0)])
    async with running(make_worker(jobs, [("fail", fail)], concurrency=1)):
        with trio.fail_after(5):
            while not calls:  # noqa: ASYNC110  # written by an asyncio-side job
                await trio.sleep(0.01)
        await trio.sleep(0.3)
    assert calls == [f"{jobs.name}-a"]
    stored = await aio(jobs.aio_queue.job, f"{jobs.name}-a")
    assert (stored.status, stored.attempts) == (Status.FAILED, 1)
    assert "boom" in stored.error


async def test_an_aborted_job_is_cancelled(jobs: JobQueue) -> None:
    recorder = Recorder(hold=30)
    await jobs.enqueue_many([job(jobs, "a", due_in(0))])
    async with running(
        make_worker(jobs, [("record", recorder.record)], concurrency=1, timers={"abort": 1})
    ):
        await recorder.wait_started(1)
        saq_job = await aio(jobs.aio_queue.job, f"{jobs.name}-a")
        await aio(jobs.aio_queue.abort, saq_job, "operator said so")
        with trio.fail_after(5):
            while (await aio(jobs.aio_queue.job, saq_job.key)).status != Status.ABORTED:  # noqa: ASYNC110  # state in Redis
                await trio.sleep(0.05)
    assert recorder.finished == []
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


@pytest.mark.slow
async def test_lateness_at_1000_jobs_per_second(jobs: JobQueue) -> None:
    recorder = Recorder()
    start, total = due_in(1.0), 5000
    await jobs.enqueue_many([job(jobs, n, start + n / 1000) for n in range(total)])
    async with running(make_worker(jobs, [("record", recorder.record)], concurrency=20)):
        await recorder.wait_started(total, within=30)

    assert len(set(recorder.keys())) == total
    assert all(begun >= scheduled for _, begun, scheduled in recorder.started)
    p50, p99, worst = lateness_report(recorder)
    # Informational only: speed targets are proven by bench/, not by timed unit tests
    # (the 2 shared cores run other tests at the same time).
    print(
        f"\n5,000 jobs at 1,000/s: lateness p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.2f} ms"
    )


def test_the_installed_saq_is_the_release_the_queue_was_checked_against() -> None:
    # Fails after a SAQ upgrade: review OnTimeQueue/OnTimeWorker against the new release's
    # RedisQueue and Worker, then widen TESTED_SAQ (and pyproject.toml's pin).
    import saq

    from eventsched.core.jobqueue import TESTED_SAQ, check_saq_version
    from eventsched.core.runtime.errors import UntestedVersion

    check_saq_version()
    assert saq.__version__.startswith("0.26.")
    with pytest.raises(UntestedVersion, match=r"saq 0\.27\.0 is not a version .*saq>=0\.26,<0\.27"):
        check_saq_version("0.27.0")
    assert TESTED_SAQ == ">=0.26,<0.27"
