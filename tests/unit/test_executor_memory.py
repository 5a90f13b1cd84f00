"""The payload budget and heap trimming of the executor, without servers (the burst and the
dispatcher on Redis are in tests/integration/test_executor_memory.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from eventsched.core.jobqueue import PayloadBudget
from eventsched.core.jobqueue import budget as memory
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import load_settings
from eventsched.core.runtime.units import parse_size
from tests.support.memory_handlers import MB


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MB", 64 * MB), ("512kb", 512 * 1024), ("1GiB", 1024 * MB), ("1.5MB", int(1.5 * MB)),
     ("100", 100), (4096, 4096), ("0", 0)],
)  # fmt: skip
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["64XB", "", "-1MB", -5, True, "MB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match=r"size like|negative"):
        parse_size(text)


def test_the_budget_setting_defaults_to_64mb_and_a_bad_one_names_the_key() -> None:
    assert load_settings(environ={}).executor.inflight_bytes == 64 * MB
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"EVENTSCHED_EXECUTOR__INFLIGHT_BYTES": "lots"})
    assert str(info.value) == (
        "invalid setting executor.inflight_bytes: expected a size like 512KB, 64MB or 1GB,"
        " got 'lots'"
    )


def test_a_budget_smaller_than_one_message_is_refused() -> None:
    # It would run one job at a time whatever the payloads' sizes.
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"EVENTSCHED_EXECUTOR__INFLIGHT_BYTES": "512KB"})
    assert str(info.value) == (
        "invalid setting executor.inflight_bytes: must be 0 (no bound) or at least"
        " consumer.max_message_bytes (1048576): a job counts that much until its claim"
    )
    assert (
        load_settings(environ={"EVENTSCHED_EXECUTOR__INFLIGHT_BYTES": "0"}).executor.inflight_bytes
        == 0
    )


def test_room_counts_unclaimed_jobs_at_their_worst_case_and_claimed_ones_at_their_size() -> None:
    budget = PayloadBudget(1000, unknown=100)
    freed: list[int] = []
    budget.on_release(lambda: freed.append(budget.held))
    assert budget.room() == 10
    for n in range(10):
        budget.reserve(f"j{n}")
    assert (budget.held, budget.room()) == (1000, 0)
    budget.settle("j0", 10)  # smaller than feared: room again, the dispatcher is told
    assert (budget.held, budget.room(), freed) == (910, 0, [910])
    budget.settle("j1", 0)  # no payload (a lost claim)
    assert (budget.held, budget.room()) == (810, 1)
    budget.settle("j2", 700)  # bigger than feared: over the limit until it ends
    assert (budget.held, budget.room()) == (1410, 0)
    budget.release("j2")
    budget.release("j2")  # a second release changes nothing
    budget.settle("j9", 5)
    assert budget.held == 615
    for n in range(10):
        budget.release(f"j{n}")
    assert (budget.held, budget.room()) == (0, 10)


def test_a_size_hint_is_reserved_instead_of_the_worst_case() -> None:
    budget = PayloadBudget(1000, unknown=400)
    assert (budget.room(), budget.room(100)) == (2, 10)
    for n in range(9):
        assert budget.fits(100)
        budget.reserve(f"h{n}", 100)
    assert (budget.held, budget.fits(100), budget.fits(None)) == (900, True, False)
    budget.reserve("h9", 100)
    assert (budget.held, budget.fits(1), budget.room(100)) == (1000, False, 0)
    budget.settle("h0", 60)  # smaller than its hint: room again
    assert (budget.held, budget.fits(40), budget.fits(41)) == (960, True, False)
    budget.settle("h1", 150)  # bigger than its hint: over the limit until it ends
    assert budget.held == 1010
    for n in range(10):
        budget.release(f"h{n}")
    assert (budget.held, budget.fits(None)) == (0, True)


def test_one_job_always_fits_so_a_payload_bigger_than_the_budget_still_runs() -> None:
    budget = PayloadBudget(1000, unknown=4000)
    assert budget.room() == 1
    budget.reserve("huge")
    assert budget.room() == 0
    budget.settle("huge", 50_000)
    assert budget.room() == 0
    budget.release("huge")
    assert budget.room() == 1


def test_freed_heap_is_trimmed_once_after_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[float] = []

    def trim() -> bool:
        trims.append(time.monotonic())
        return True

    monkeypatch.setattr(memory, "trim_heap", trim)

    async def burst() -> None:
        budget = PayloadBudget(100, unknown=10, trim_after=50, trim_delay=0.05)
        for wave in range(3):  # waves that refill the budget at once: no trim between them
            ids = [f"{wave}-{n}" for n in range(10)]
            for job_id in ids:
                budget.reserve(job_id)
                budget.settle(job_id, 10)
            for job_id in ids:
                budget.release(job_id)
        await asyncio.sleep(0.1)
        assert len(trims) == 1
        budget.reserve("small")
        budget.settle("small", 10)  # below trim_after since the trim: nothing to give back
        budget.release("small")
        await asyncio.sleep(0.1)

    asyncio.run(burst())
    assert len(trims) == 1


def test_payloads_still_held_at_a_trim_are_trimmed_once_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1) is None)

    async def burst_with_a_tail() -> None:
        budget = PayloadBudget(1000, unknown=100, trim_after=200, trim_delay=0.05, trim_tail=20)
        for n in range(10):
            budget.reserve(f"j{n}")
            budget.settle(f"j{n}", 80)
        for n in range(8):  # 640 freed, 160 still held: a quarter of the 800 high-water mark
            budget.release(f"j{n}")
        await asyncio.sleep(0.1)
        assert len(trims) == 1  # trimmed with the tail (160 bytes) still alive
        budget.release("j8")
        budget.release("j9")  # the tail is gone: 160 freed, less than trim_after
        await asyncio.sleep(0.1)
        assert len(trims) == 2

    asyncio.run(burst_with_a_tail())
