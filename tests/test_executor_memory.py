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
* after <= baseline + 32 MB, within 5 s of the last outcome: what stays is libpq's input
  buffer (grown to the largest row), Python's object arenas and RSS noise; the heap kept
  without giving memory back was 280-450 MB here.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import trio
import trio_asyncio

from eventsched.plugins.executor import make_job
from tests.conftest import Names
from tests.support.execution import (
    all_finished,
    executor_env,
    insert_events,
    new_events,
    queue_client,
    status_counts,
    wait_until,
)
from tests.support.proc import AppProcess

pytestmark = [
    pytest.mark.usefixtures("executor_state"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

MB = 1024 * 1024
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


def _calls(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines())


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
                await wait_until(all_finished(database, len(warm) + EVENTS), limit=40)
                finished = time.monotonic()
                peak = _peak(pid)
                # Memory given back: wait (up to SETTLE) for RSS to come near the baseline.
                deadline = finished + SETTLE
                after = _rss(pid)
                while after > baseline + 32 * MB and time.monotonic() < deadline:
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
    assert len(calls) == 20 + EVENTS and set(calls.values()) == {1}  # every handler ran once
    assert peak <= baseline + 2 * limit + 32 * MB
    assert after <= baseline + 32 * MB
