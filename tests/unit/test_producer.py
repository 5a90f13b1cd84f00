"""The producer's rate schedule (pure; the producer against the broker is in
tests/integration/test_producer.py).
"""

from __future__ import annotations

import pytest

from eventsched.plugins.producer import RateSchedule


def test_rate_schedule_keeps_the_long_run_rate_whatever_the_wake_up_times() -> None:
    schedule = RateSchedule(1000.0, 500, origin=100.0)
    now, sent = 100.0, 0
    for step in [0.003, 0.017, 0.0005, 0.1, 0.02, 0.2] * 20:  # irregular wake-ups
        now += step
        sent += schedule.take(now)
    assert sent == pytest.approx((now - 100.0) * 1000, abs=1)


def test_rate_schedule_wakes_for_chunks_of_a_hundredth_of_the_rate() -> None:
    schedule = RateSchedule(20_000.0, 500, origin=0.0)
    assert schedule.next_wake() == pytest.approx(0.01)  # 200 events
    assert schedule.take(0.01) == 200
    assert schedule.next_wake() == pytest.approx(0.02)
    slow = RateSchedule(2.0, 500, origin=0.0)
    assert slow.next_wake() == pytest.approx(0.5)  # one event at a time
    assert [slow.take(t) for t in (0.4, 0.5, 1.0, 1.2)] == [0, 1, 1, 0]


def test_rate_schedule_caps_a_send_at_the_batch_size() -> None:
    schedule = RateSchedule(10_000.0, 300, origin=0.0)
    assert schedule.take(0.1) == 300  # 1000 due
    assert schedule.take(0.1) == 300
    assert schedule.take(0.1) == 300
    assert schedule.take(0.1) == 100


def test_rate_schedule_forgets_a_backlog_older_than_max_lag_instead_of_bursting() -> None:
    schedule = RateSchedule(100.0, 10_000, origin=0.0, max_lag=1.0)
    assert schedule.take(5.0) == 100  # 500 were due; only the last second's worth is sent
    assert schedule.dropped == 400
    assert schedule.take(5.5) == 50  # and the rate holds from there
    assert schedule.take(6.0) == 50


@pytest.mark.parametrize(("rate", "batch"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_rate_schedule_rejects_nonsense(rate: float, batch: int) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        RateSchedule(rate, batch, origin=0.0)
