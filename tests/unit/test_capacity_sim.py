"""The capacity simulation's pure logic (bench/capacity_sim.py): fair shares, Kafka's range
assignment, and that the simulated queues obey the operational laws they stand for."""

from __future__ import annotations

import pytest

from bench.capacity_sim import (
    Costs,
    Deployment,
    Point,
    StageCost,
    checked_rates,
    drain_rate,
    partition_owners,
    points_from_run,
    run_steady,
    water_fill,
    with_own,
)

#: Round numbers: a consumer handles 10,000 events/s, an executor 5,000 attempts/s.
COSTS = Costs(
    consume=StageCost(hold_us=100.0, cpu_us=50.0, pg_us=10.0, redis_us=5.0),
    execute=StageCost(hold_us=200.0, cpu_us=150.0, pg_us=40.0, redis_us=20.0),
)


@pytest.mark.parametrize(
    ("capacity", "demands", "shares"),
    [
        (2.0, [0.5, 0.5], [0.5, 0.5]),  # enough for everyone
        (2.0, [0.2, 1.0, 1.0], [0.2, 0.9, 0.9]),  # the small asker is served in full
        (1.0, [1.0, 1.0, 1.0, 1.0], [0.25] * 4),
        (3.0, [], []),
    ],
)
def test_water_fill_is_max_min_fair(
    capacity: float, demands: list[float], shares: list[float]
) -> None:
    assert water_fill(capacity, demands) == pytest.approx(shares)


@pytest.mark.parametrize(
    ("partitions", "consumers", "owners"),
    [
        (3, 1, [0, 0, 0]),
        (3, 2, [0, 0, 1]),  # the first consumer gets the extra partition
        (4, 2, [0, 0, 1, 1]),
        (2, 3, [0, 1]),  # the third consumer idles
    ],
)
def test_partitions_are_range_assigned(partitions: int, consumers: int, owners: list[int]) -> None:
    assert partition_owners(partitions, consumers) == owners


def test_below_saturation_everything_offered_finishes_and_the_utilisation_law_holds() -> None:
    d = Deployment(partitions=6, consumers=2, executors=2, pg_cores=4.0, retry=0.1)
    rate = 2000.0
    r = run_steady(COSTS, d, rate, seconds=4.0, dt=0.02)
    assert r.throughput == pytest.approx(rate, rel=0.02)
    attempts = 1 / (1 - d.retry)
    # U = X * D: PostgreSQL's CPU per event over its cores.
    pg = rate * (COSTS.consume.pg_us + attempts * COSTS.execute.pg_us) * 1e-6 / d.pg_cores
    assert r.utilisation["postgres"] == pytest.approx(pg, rel=0.03)
    # An executor is busy its hold time per attempt; the two share the attempts.
    assert r.utilisation["executor"] == pytest.approx(
        rate * attempts / 2 * COSTS.execute.hold_us * 1e-6, rel=0.03
    )


def test_above_the_executors_limit_the_backlog_grows_and_throughput_caps() -> None:
    d = Deployment(partitions=3, consumers=1, executors=1, pg_cores=8.0, retry=0.0)
    r = run_steady(COSTS, d, 8000.0, seconds=4.0, dt=0.02)
    assert r.throughput == pytest.approx(5000.0, rel=0.02)  # 1 / 200 us
    assert r.utilisation["executor"] == pytest.approx(1.0, rel=0.01)
    assert r.backlog > 8000.0  # 3,000/s more than it can take, for 4 s


def test_two_consumers_on_three_partitions_ingest_one_and_a_half_times_as_fast() -> None:
    one = drain_rate(COSTS, Deployment(3, 1, 0, pg_cores=8.0), ingest=3000)
    two = drain_rate(COSTS, Deployment(3, 2, 0, pg_cores=8.0), ingest=3000)
    assert one == pytest.approx(10_000.0, rel=0.05)
    assert two / one == pytest.approx(1.5, rel=0.05)


def test_a_shared_host_caps_what_a_second_executor_adds() -> None:
    alone = Deployment(3, 1, 1, pg_cores=2.0, retry=0.0)
    dedicated = drain_rate(COSTS, Deployment(3, 1, 2, pg_cores=2.0, retry=0.0), due=2000)
    shared = drain_rate(
        COSTS, Deployment(3, 1, 2, pg_cores=2.0, host_cores=2.0, retry=0.0), due=2000
    )
    one = drain_rate(COSTS, alone, due=2000)
    assert dedicated / one == pytest.approx(2.0, rel=0.05)
    # Two executors want 2 x 0.75 cores and PostgreSQL + Redis 0.6 more: 2.1 of 2 cores.
    assert 1.5 < shared / one < 1.95


def test_redis_shards_split_the_redis_work() -> None:
    heavy = Costs(COSTS.consume, StageCost(hold_us=50.0, cpu_us=10.0, pg_us=1.0, redis_us=400.0))
    one = run_steady(heavy, Deployment(3, 1, 4, redis_shards=1, retry=0.0), 4000.0, 2.0, 0.02)
    two = run_steady(heavy, Deployment(3, 1, 4, redis_shards=2, retry=0.0), 4000.0, 2.0, 0.02)
    assert one.throughput == pytest.approx(2500.0, rel=0.05)  # 1 core / 400 us
    assert two.throughput == pytest.approx(4000.0, rel=0.02)
    assert two.utilisation["redis"] == pytest.approx(0.8, rel=0.03)


def _drain(rate: float, foreign: float, shards: int) -> dict[str, object]:
    cpu_us = {"executor": 150.0, "postgres": 40.0, "redis": 20.0, "kafka": 1.0}
    if shards == 2:
        cpu_us |= {"redis": 12.0, "redis1": 10.0}
    return {
        "throughput_finished": {"per_s": rate},
        "cpu": {"foreign_cores": foreign},
        "shards": [{"shard": i} for i in range(shards)],
        "work": {"cpu_us": cpu_us},
    }


def test_a_runs_sharded_executor_points_are_checked_with_their_shards() -> None:
    doc = {
        "git": {"label": "abc1234"},
        "date": "2026-12-03T21:20:00+00:00",
        "results": {
            "scaling": {
                "consumers": [
                    {"per_s": 10.0, "cpu": {"foreign_cores": 0.1}},
                    {"per_s": 15.0, "cpu": {"foreign_cores": 0.2}},
                ],
                "executors": [_drain(100.0, 0.0, 1), _drain(150.0, 0.1, 1)],
                "executors_2shards": [_drain(110.0, 0.0, 2), _drain(170.0, 0.2, 2)],
            }
        },
    }
    points = points_from_run(doc)
    assert [(p.what, p.shards, p.rates) for p in points] == [
        ("consumers", 1, (10.0, 15.0)),
        ("executors", 1, (100.0, 150.0)),
        ("executors", 2, (110.0, 170.0)),
    ]
    assert points[2].foreign == (0.0, 0.2) and points[2].source == "bench.capacity abc1234 21:20"
    # The run's own one-executor cost: hold from its rate, CPU per event by process, every
    # shard's Redis CPU summed; the consumers' point had no costs (an older run's JSON).
    assert points[2].own == StageCost(hold_us=1e6 / 110.0, cpu_us=150.0, pg_us=40.0, redis_us=22.0)
    assert points[0].own is None
    own = with_own(points[2], COSTS)
    assert own.execute == points[2].own and own.consume == COSTS.consume


def test_a_point_with_two_shards_is_simulated_with_two_redis_cores() -> None:
    # Redis-bound executors: one Redis core caps the drain at 1 / 400 us = 2,500/s; two
    # shards on a host with cores to spare lift that cap.
    heavy = Costs(COSTS.consume, StageCost(hold_us=100.0, cpu_us=10.0, pg_us=1.0, redis_us=400.0))
    one = checked_rates(Point("executors", "t", (1.0, 1.0), (0.0, 0.0)), heavy, 2000)
    two = checked_rates(Point("executors", "t", (1.0, 1.0), (0.0, 0.0), shards=2), heavy, 2000)
    assert one[1] == pytest.approx(2500.0, rel=0.05)
    assert two[1] > 1.5 * one[1]
