"""Retention rules (core.domain.retention): the policy's validation, partition names and
bounds, the maintenance plan at a fixed ``now``, the fate of a row in a retired partition,
and the idempotency window. Fixed datetimes only: no clock is read."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from eventsched.core.domain.retention import (
    DAY,
    FINISHED_STATUSES,
    RetentionPolicy,
    archive_file_name,
    fate,
    idempotency_window,
    parse_partition_name,
    partition_bounds,
    partition_name,
    plan,
)

NOW = datetime(2026, 12, 3, 16, 30, tzinfo=UTC)
TODAY = date(2026, 12, 3)
POLICY = RetentionPolicy()


def days(first: date, last: date) -> set[date]:
    return {first + timedelta(days=n) for n in range((last - first).days + 1)}


# ------------------------------------------------------------------------------ policy


def test_defaults_are_the_documented_ones() -> None:
    assert POLICY.keep == timedelta(days=30)
    assert POLICY.ahead == timedelta(days=7)
    assert POLICY.interval == timedelta(hours=1)
    assert POLICY.archive_dir == ""


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"keep": timedelta(0)}, "keep"),
        ({"keep": timedelta(hours=36)}, "keep"),  # not whole days
        ({"keep": timedelta(days=-1)}, "keep"),
        ({"keep": timedelta(days=3651)}, "keep"),
        ({"ahead": timedelta(hours=12)}, "ahead"),
        ({"ahead": timedelta(days=91)}, "ahead"),
        ({"interval": timedelta(0)}, "interval"),
        ({"interval": timedelta(days=2)}, "interval"),
        ({"interval": timedelta(days=1), "ahead": timedelta(days=1)}, "interval"),
        ({"archive_dir": "/tmp/a\x00b"}, "archive_dir"),
    ],
)
def test_a_bad_policy_names_its_field_first(fields: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} ") as caught:
        RetentionPolicy(**fields)
    assert "\n" not in str(caught.value)


def test_the_smallest_and_largest_policies_are_accepted() -> None:
    RetentionPolicy(keep=DAY, ahead=DAY, interval=timedelta(hours=23), archive_dir="/a")
    RetentionPolicy(keep=timedelta(days=3650), ahead=timedelta(days=90), interval=DAY)


# -------------------------------------------------------------------------- partitions


def test_partition_names_round_trip() -> None:
    assert partition_name("events", TODAY) == "events_p20261203"
    assert partition_name("event_attempts", date(2027, 1, 9)) == "event_attempts_p20270109"
    for table in ("events", "event_attempts"):
        for day in days(date(2026, 12, 25), date(2027, 1, 5)):
            assert parse_partition_name(table, partition_name(table, day)) == day


@pytest.mark.parametrize(
    "name",
    [
        "events_default",
        "event_attempts_p20261203",  # another table's partition
        "events_p2026120",
        "events_p20261332",  # no such day
        "events_p20261203_old",
        "Events_p20261203",
    ],
)
def test_other_tables_are_not_partitions_of_events(name: str) -> None:
    assert parse_partition_name("events", name) is None


def test_a_bad_table_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^table "):
        partition_name("events; DROP TABLE x", TODAY)


def test_bounds_are_one_utc_day_start_inclusive() -> None:
    start, end = partition_bounds(TODAY)
    assert start == datetime(2026, 12, 3, tzinfo=UTC)
    assert end == datetime(2026, 12, 4, tzinfo=UTC)
    assert end - start == DAY


def test_archive_file_is_named_after_the_partition() -> None:
    assert archive_file_name("events", TODAY) == "events_p20261203.csv.gz"


# ------------------------------------------------------------------------------- plan


def test_a_fresh_schema_gets_today_and_the_days_ahead() -> None:
    result = plan(NOW, frozenset(), POLICY)
    assert result.create == tuple(sorted(days(TODAY, date(2026, 12, 10))))
    assert result.create[0] == TODAY  # where rows hop to, so first
    assert result.retire == ()


def test_a_maintained_schema_needs_one_new_day_per_day() -> None:
    existing = days(date(2026, 11, 2), date(2026, 12, 9))
    result = plan(NOW, existing, POLICY)
    assert result.create == (date(2026, 12, 10),)


def test_a_day_is_retired_once_its_whole_range_is_older_than_keep() -> None:
    existing = days(date(2026, 10, 30), date(2026, 12, 10))
    result = plan(NOW, existing, POLICY)
    # cutoff = 2026-11-03 16:30; the day 2026-11-02 ended at 11-03 00:00 <= cutoff,
    # 2026-11-03 ends at 11-04 00:00 > cutoff: some of its rows are younger than keep.
    assert result.cutoff == NOW - timedelta(days=30)
    assert result.retire == (
        date(2026, 10, 30),
        date(2026, 10, 31),
        date(2026, 11, 1),
        date(2026, 11, 2),
    )
    assert result.create == ()


def test_the_boundary_instant_retires_the_day() -> None:
    day = date(2026, 11, 2)
    boundary = partition_bounds(day)[1] + timedelta(days=30)
    assert plan(boundary - timedelta(microseconds=1), {day}, POLICY).retire == ()
    assert plan(boundary, {day}, POLICY).retire == (day,)


def test_today_is_never_retired_even_with_the_shortest_keep() -> None:
    policy = RetentionPolicy(keep=DAY, ahead=timedelta(days=2))
    result = plan(NOW, days(date(2026, 12, 1), date(2026, 12, 5)), policy)
    assert result.retire == (date(2026, 12, 1),)
    assert TODAY not in result.retire


def test_future_partitions_are_never_retired() -> None:
    existing = days(date(2027, 1, 1), date(2027, 1, 3))  # a clock that ran ahead once
    assert plan(NOW, existing, POLICY).retire == ()


def test_plan_refuses_a_naive_now() -> None:
    with pytest.raises(ValueError, match="naive"):
        plan(datetime(2026, 12, 3, 16, 30), frozenset(), POLICY)


def test_plan_works_in_utc_whatever_the_zone_of_now() -> None:
    # 2026-12-04 00:30 in UTC+2 is 2026-12-03 22:30 UTC: today is still the 3rd.
    local = datetime(2026, 12, 4, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert plan(local, frozenset(), POLICY).create[0] == TODAY


# ------------------------------------------------------------------------------- fate

CUTOFF = NOW - timedelta(days=30)


@pytest.mark.parametrize("status", sorted(FINISHED_STATUSES))
def test_finished_before_the_cutoff_is_dropped(status: str) -> None:
    assert fate(status, CUTOFF - timedelta(seconds=1), CUTOFF) == "drop"


@pytest.mark.parametrize("status", sorted(FINISHED_STATUSES))
def test_finished_within_keep_hops(status: str) -> None:
    assert fate(status, CUTOFF, CUTOFF) == "hop"
    assert fate(status, NOW, CUTOFF) == "hop"


@pytest.mark.parametrize("status", ["scheduled", "running", "retrying"])
def test_an_unfinished_event_always_hops(status: str) -> None:
    # Even with an old finished_at (a dead event replayed long ago keeps it until it ends).
    assert fate(status, CUTOFF - timedelta(days=300), CUTOFF) == "hop"
    assert fate(status, None, CUTOFF) == "hop"


def test_a_finished_event_without_finished_at_is_not_dropped_on_doubt() -> None:
    assert fate("succeeded", None, CUTOFF) == "hop"


def test_an_unknown_status_is_not_dropped() -> None:
    assert fate("paused", CUTOFF - DAY, CUTOFF) == "hop"


# ---------------------------------------------------------------- idempotency window


def test_the_window_is_keep_at_least_and_one_day_and_a_pass_more_at_most() -> None:
    window = idempotency_window(POLICY)
    assert window.at_least == timedelta(days=30)
    assert window.at_most == timedelta(days=31, hours=1)


def test_the_window_agrees_with_plan_and_fate() -> None:
    """Walk one event recorded at the start of a day through passes every interval: its
    row (and key) goes exactly at the first pass at or after the day's end + keep, which
    lies inside the window for every recording instant of the day."""
    policy = RetentionPolicy(
        keep=timedelta(days=3), ahead=timedelta(days=2), interval=timedelta(hours=6)
    )
    window = idempotency_window(policy)
    day = date(2026, 12, 1)
    for recorded_at in (partition_bounds(day)[0], partition_bounds(day)[1] - timedelta(seconds=1)):
        finished_at = recorded_at + timedelta(minutes=5)
        passes = (partition_bounds(day)[0] + n * policy.interval for n in range(100))
        dropped_at = next(
            at
            for at in passes
            if day in plan(at, {day}, policy).retire
            and fate("succeeded", finished_at, plan(at, {day}, policy).cutoff) == "drop"
        )
        kept = dropped_at - recorded_at
        assert window.at_least <= kept <= window.at_most


# ---------------------------------------------------------------- [retention] settings


def test_the_settings_become_the_policy() -> None:
    from eventsched.core.domain.retention import policy_from_settings
    from eventsched.core.runtime.settings import build_settings

    settings = build_settings(
        {"retention": {"keep": "10d", "ahead": "3d", "interval": "30m", "archive_dir": "/a"}}
    )
    assert policy_from_settings(settings.retention) == RetentionPolicy(
        keep=timedelta(days=10),
        ahead=timedelta(days=3),
        interval=timedelta(minutes=30),
        archive_dir="/a",
    )
    assert policy_from_settings(build_settings({}).retention) == RetentionPolicy()


@pytest.mark.parametrize(
    ("values", "key", "problem"),
    [
        ({"keep": "36h"}, "retention.keep", "must be a whole number of days"),
        ({"ahead": "100d"}, "retention.ahead", "must be between 1d and 90d"),
        ({"interval": "7d"}, "retention.interval", "must be more than 0s and at most 1d"),
        ({"ahead": "1d", "interval": "1d"}, "retention.interval", "(1d) must be shorter"),
    ],
)
def test_a_bad_setting_names_its_key(values: dict[str, str], key: str, problem: str) -> None:
    from eventsched.core.domain.retention import policy_from_settings
    from eventsched.core.runtime.errors import ConfigError
    from eventsched.core.runtime.settings import build_settings

    with pytest.raises(ConfigError) as caught:
        policy_from_settings(build_settings({"retention": values}).retention)
    assert caught.value.key == key
    assert caught.value.problem.startswith(problem), caught.value.problem
