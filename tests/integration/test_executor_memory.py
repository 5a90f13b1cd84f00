"""Executor memory under a burst of big payloads: bounded while it lasts, given back after.

A real executor process (256 slots) gets 300 events with ~1 MB payloads due at the same
moment. Events go straight into PostgreSQL and their jobs into SAQ, as the consumer would
record and enqueue them; the handler appends one line per call to a file, so every
invocation is counted. The process's resident set size is read from /proc (psutil for
samples, ``VmHWM`` for the exact peak, reset before the burst), so this test runs on Linux.

Margins, and why:

* peak <= baseline + 2 x budget + 32 MB: the budget bounds the payloads held as Python
  objects; while a claim batch is converted its rows also sit in libpq's result (the second
  budget); 32 MB is allocator slack and the bookkeeping of 300 jobs.
* after <= baseline + 16 MB, within 5 s of the last outcome (the trim waits 1 s): room
  for libpq's input buffer (grown to the largest row), Python's object arenas and RSS
  noise; without giving freed heap back, RSS stays near its peak.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
import trio_asyncio
from saq.types import Context

from eventsched.core.domain.jobcontract import make_job
from eventsched.core.jobqueue import (
    JobQueue,
    PayloadBudget,
    ScheduledJob,
    drain_worker,
    make_worker,
    run_worker,
)
from tests.support.clients import status_counts
from tests.support.execution import (
    all_finished,
    executor_env,
    insert_events,
    new_events,
    open_job_queue,
    queue_client,
)
from tests.support.memory_handlers import MB
from tests.support.proc import AppProcess
from tests.support.servers import Names
from tests.support.waiting import wait_until

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

EVENTS = 300
PAYLOAD = 1_000_000  # characters of the payload's blob (its JSON is a few bytes more)
DEFAULT_BUDGET = 64 * MB  # executor.inflight_bytes
SLOTS = 256
SETTLE = 5.0  # seconds RSS gets to come back after the last outcome


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _reset_peak(pid: int) -> None:
    # "5" resets the VmHWM high-water mark to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


class _Sampler:
    """RSS of a process every 10 ms on a thread (the peak is also read exactly via VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.samples.append((time.monotonic(), _rss(self.pid)))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _calls(path: Path) -> list[tuple[str, int]]:
    """(event id, blob length) of every handler call, from the handler's file."""
    if not path.exists():
        return []
    return [(p[0], int(p[2])) for p in (line.split() for line in path.read_text().splitlines())]


@linux_only
@pytest.mark.usefixtures("executor_state")
@pytest.mark.parametrize("budget", [None, "16MB"], ids=["default-budget", "16MB"])
async def test_a_burst_of_big_payloads_stays_within_the_budget_and_memory_comes_back(
    budget: str | None,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    names: Names,
    dlq_topic: Names,
    tmp_path: Path,
) -> None:
    calls_file = tmp_path / "calls"
    env = executor_env(
        names,
        database,
        redis_url,
        kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT="tests.support.memory_handlers:record",
        EVENTSCHED_EXECUTOR__CONCURRENCY=str(SLOTS),
        EVENTSCHED_RECONCILER__ENABLED="false",
        TEST_CALLS_FILE=str(calls_file),
        TEST_HANDLER_SLEEP="0.05",
    )
    limit = DEFAULT_BUDGET
    if budget is not None:
        env["EVENTSCHED_EXECUTOR__INFLIGHT_BYTES"] = budget
        limit = int(budget.removesuffix("MB")) * MB
    app = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        app.wait_event("role_ready", timeout=30)
        pid = app.proc.pid
        # Warm up every code path a job takes (claim, handler, outcome) with small payloads.
        warm = new_events(20, due=time.time())
        burst = new_events(EVENTS, due=time.time(), blob=secrets.token_hex(32) * (PAYLOAD // 64))
        await trio.to_thread.run_sync(insert_events, database, warm + burst)
        async with trio_asyncio.open_loop(), queue_client(redis_url, names.queue) as jobs:
            await jobs.enqueue_many([make_job(e.id, 1, e.execute_at, 60) for e in warm])
            await wait_until(all_finished(database, len(warm)), limit=20)
            await trio.sleep(1.0)
            baseline = _rss(pid)
            _reset_peak(pid)
            with _Sampler(pid) as sampler:
                due = time.time() + 0.5
                await jobs.enqueue_many([make_job(e.id, 1, due, 60) for e in burst])
                await wait_until(all_finished(database, len(warm) + EVENTS), limit=60)
                finished = time.monotonic()
                peak = _peak(pid)
                # Memory given back: RSS 2 s after the burst (past the trim's 1 s delay), or
                # as soon as it comes near the baseline, within SETTLE.
                await trio.sleep(2.0)
                deadline = finished + SETTLE
                after = _rss(pid)
                while after > baseline + 16 * MB and time.monotonic() < deadline:
                    await trio.sleep(0.1)
                    after = _rss(pid)
            peak = max(peak, *(rss for _, rss in sampler.samples))
        print(  # the numbers go to the commit message and the report
            f"\nRSS baseline {baseline / MB:.0f} MB, peak {peak / MB:.0f} MB,"
            f" after {after / MB:.0f} MB ({time.monotonic() - finished:.1f} s after the last"
            f" event finished)"
        )
    finally:
        app.stop()
    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 20 + EVENTS}
    calls = _calls(calls_file)
    per_event = Counter(event_id for event_id, _ in calls)
    assert len(per_event) == 20 + EVENTS and set(per_event.values()) == {1}  # each ran once
    sizes = dict(calls)
    assert {sizes[e.id] for e in burst} == {PAYLOAD}  # with its whole payload
    assert peak <= baseline + 2 * limit + 32 * MB
    assert after <= baseline + 16 * MB


# -- the dispatcher keeps to the budget (real Redis) ----------------------------------------------


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[JobQueue]:
    async with open_job_queue(redis_url, "test-mem") as queue:
        yield queue


class Loaded:
    """A job function that 'loads' a payload of ``size`` bytes (settles its budget bytes as
    the executor does after its claim), holds it a moment, and records the budget's state
    and how many jobs ran at once."""

    def __init__(self, budget: PayloadBudget, size: int) -> None:
        self.budget = budget
        self.size = size
        self.running = 0
        self.most_running = 0
        self.most_held = 0
        self.calls: Counter[str] = Counter()

    async def run(self, ctx: Context, **kwargs: Any) -> None:
        job = ctx["job"]
        self.calls[job.key] += 1
        self.budget.settle(job.id, self.size)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.most_held = max(self.most_held, self.budget.held)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.running -= 1


async def _run_all(jobs: JobQueue, loaded: Loaded, count: int, hint: int | None = None) -> None:
    now = time.time()
    await jobs.enqueue_many(
        [
            ScheduledJob(key=f"{jobs.name}-{n}", function="run", scheduled=now, size=hint)
            for n in range(count)
        ]
    )
    worker = make_worker(jobs, [("run", loaded.run)], concurrency=50, payload_budget=loaded.budget)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_worker, worker)
        with trio.fail_after(20):
            while sum(loaded.calls.values()) < count or loaded.running:  # noqa: ASYNC110  # asyncio side
                await trio.sleep(0.01)
        await drain_worker(worker)


async def test_the_dispatcher_hands_out_only_what_the_budget_has_room_for(jobs: JobQueue) -> None:
    # Payloads of 80 bytes, each feared to be 100 until its "claim": 10 jobs are handed out
    # at first, and as they settle, room for more (12 at most: 12 x 80 <= 1000).
    loaded = Loaded(PayloadBudget(1000, unknown=100), size=80)
    await _run_all(jobs, loaded, 60)
    assert len(loaded.calls) == 60 and set(loaded.calls.values()) == {1}
    assert loaded.most_held <= 1000  # 50 slots, but never more bytes than the budget
    assert 10 <= loaded.most_running <= 12
    assert loaded.budget.held == 0  # every job gave its bytes back
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


async def test_jobs_with_a_size_hint_are_handed_out_as_far_as_their_sizes_fit(
    jobs: JobQueue,
) -> None:
    # Feared at 500 bytes, two jobs would be handed out at once; the enqueuer said 100, and
    # ten are (the claims' round trips no longer bound a burst of small payloads).
    loaded = Loaded(PayloadBudget(1000, unknown=500), size=100)
    await _run_all(jobs, loaded, 60, hint=100)
    assert len(loaded.calls) == 60 and set(loaded.calls.values()) == {1}
    assert loaded.most_held <= 1000
    assert 8 <= loaded.most_running <= 10
    assert loaded.budget.held == 0
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


async def test_a_hint_that_does_not_fit_sends_the_job_back_until_there_is_room(
    jobs: JobQueue,
) -> None:
    # Hints of 400 in a budget of 1000: two at a time, whatever the last claim suggested.
    loaded = Loaded(PayloadBudget(1000, unknown=100), size=400)
    await _run_all(jobs, loaded, 12, hint=400)
    assert len(loaded.calls) == 12 and set(loaded.calls.values()) == {1}
    assert loaded.most_held <= 1000 and loaded.most_running == 2
    assert loaded.budget.held == 0
    assert await jobs.counts() == {"queued": 0, "scheduled": 0, "active": 0}


async def test_payloads_bigger_than_the_budget_run_one_at_a_time(jobs: JobQueue) -> None:
    loaded = Loaded(PayloadBudget(1000, unknown=2000), size=5000)
    await _run_all(jobs, loaded, 8)
    assert len(loaded.calls) == 8 and set(loaded.calls.values()) == {1}
    assert loaded.most_running == 1
    assert loaded.budget.held == 0
