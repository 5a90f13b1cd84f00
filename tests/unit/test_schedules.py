"""Recurring schedules (core.domain.schedules): validation, DST rules over full years,
``every`` intervals, bounds, misfire policies and occurrence keys. Fixed datetimes only."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from eventsched.core.domain.event import MAX_KEY_LENGTH
from eventsched.core.domain.schedules import (
    MAX_NAME_LENGTH,
    ScheduleSpec,
    due_occurrences,
    next_occurrences,
    occurrence_key,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
YEAR = 2025
# The 2025 transitions (UTC instants): spring forward, fall back. Checked against the time
# zone data by test_transitions_are_where_the_tests_expect_them.
TRANSITIONS = {
    "Europe/Berlin": (datetime(2025, 3, 30, 1, tzinfo=UTC), datetime(2025, 10, 26, 1, tzinfo=UTC)),
    "America/New_York": (
        datetime(2025, 3, 9, 7, tzinfo=UTC),
        datetime(2025, 11, 2, 6, tzinfo=UTC),
    ),
    # Lord Howe: +10:30 <-> +11:00, fall back 02:00 -> 01:30 in April, spring forward
    # 02:00 -> 02:30 in October (southern hemisphere).
    "Australia/Lord_Howe": (
        datetime(2025, 10, 4, 15, 30, tzinfo=UTC),
        datetime(2025, 4, 5, 15, tzinfo=UTC),
    ),
    "UTC": (),
}


def spec(**kwargs: Any) -> ScheduleSpec:
    fields: dict[str, Any] = {"name": "nightly", "type": "report"}
    fields.update(kwargs)
    return ScheduleSpec(**fields)


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


def local(
    zone: ZoneInfo,
    y: int,
    mo: int,
    d: int,
    h: int = 0,
    mi: int = 0,
    s: int = 0,
    us: int = 0,
    *,
    fold: int = 0,
) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=zone, fold=fold)


def year_of(schedule: ScheduleSpec) -> list[datetime]:
    """Every occurrence whose local date is in YEAR."""
    zone = schedule.zone
    begin = datetime(YEAR, 1, 1, tzinfo=zone).astimezone(UTC) - timedelta(microseconds=1)
    end = datetime(YEAR + 1, 1, 1, tzinfo=zone).astimezone(UTC)
    found = []
    after = begin
    while True:
        batch = next_occurrences(schedule, after, 1000)
        found += [at for at in batch if at < end]
        if not batch or batch[-1] >= end:
            return found
        after = batch[-1]


def expected_instant(wall: datetime, zone: ZoneInfo, transitions: tuple[datetime, ...]) -> datetime:
    """The oracle: an existing wall time at its first occurrence; one in a gap at the
    transition (the first instant after the gap)."""
    first = wall.replace(tzinfo=zone, fold=0)
    if first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall:
        return first.astimezone(UTC)
    (gap,) = [t for t in transitions if t.astimezone(zone).date() == wall.date()]
    return gap


def days() -> list[date]:
    first = date(YEAR, 1, 1)
    return [first + timedelta(days=n) for n in range((date(YEAR + 1, 1, 1) - first).days)]


def test_transitions_are_where_the_tests_expect_them() -> None:
    for name, instants in TRANSITIONS.items():
        zone = ZoneInfo(name)
        for at in instants:
            before = (at - timedelta(seconds=1)).astimezone(zone).utcoffset()
            assert before != at.astimezone(zone).utcoffset(), (name, at)


# --- DST: full-year sweeps ------------------------------------------------------------------

DAILY = [
    ("Europe/Berlin", 2, 30),  # 02:30 is in the gap in March and occurs twice in October
    ("America/New_York", 2, 30),  # in the gap in March
    ("America/New_York", 1, 30),  # occurs twice in November
    ("Australia/Lord_Howe", 2, 30),  # the first instant after October's gap
    ("Australia/Lord_Howe", 2, 15),  # in October's 30-minute gap
    ("Australia/Lord_Howe", 1, 45),  # occurs twice in April (30 minutes apart)
    ("UTC", 2, 30),
]


@pytest.mark.parametrize(("name", "hour", "minute"), DAILY)
def test_daily_runs_once_every_local_day(name: str, hour: int, minute: int) -> None:
    zone = ZoneInfo(name)
    found = year_of(spec(cron=f"{minute} {hour} * * *", timezone=name))
    assert found == sorted(set(found))  # ascending, no duplicates
    assert [at.astimezone(zone).date() for at in found] == days()  # one run per local day
    expected = [
        expected_instant(datetime.combine(day, time(hour, minute)), zone, TRANSITIONS[name])
        for day in days()
    ]
    assert found == expected
    assert all(at.tzinfo is UTC for at in found)


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_hourly_runs_each_wall_clock_hour_once(name: str) -> None:
    zone = ZoneInfo(name)
    found = year_of(spec(cron="0 * * * *", timezone=name))
    walls = [at.astimezone(zone).replace(tzinfo=None) for at in found]
    assert found == sorted(set(found))
    assert len(set(walls)) == len(walls)  # no wall-clock time runs twice
    expected = sorted(
        {
            expected_instant(datetime.combine(day, time(hour)), zone, TRANSITIONS[name])
            for day in days()
            for hour in range(24)
        }
    )
    assert found == expected
    # Only the transitions themselves are off the hour (in a gap: its end).
    off_the_hour = [at for at in found if at.astimezone(zone).minute != 0]
    assert off_the_hour == ([TRANSITIONS[name][0]] if name == "Australia/Lord_Howe" else [])


def test_berlin_dst_days_explicitly() -> None:
    daily = spec(cron="30 2 * * *", timezone="Europe/Berlin")
    spring = next_occurrences(daily, local(BERLIN, 2025, 3, 29, 12), 2)
    assert [at.astimezone(BERLIN).isoformat() for at in spring] == [
        "2025-03-30T03:00:00+02:00",  # 02:30 does not exist: the end of the gap
        "2025-03-31T02:30:00+02:00",
    ]
    autumn = next_occurrences(daily, local(BERLIN, 2025, 10, 25, 12), 2)
    assert [at.astimezone(BERLIN).isoformat() for at in autumn] == [
        "2025-10-26T02:30:00+02:00",  # the first 02:30 (CEST); the second one (CET) does not run
        "2025-10-27T02:30:00+01:00",
    ]
    # From inside the repeated hour (second pass) the repeat is not run either.
    inside = local(BERLIN, 2025, 10, 26, 2, 40, fold=1)
    assert next_occurrences(daily, inside, 1) == [utc(2025, 10, 27, 1, 30)]
    hourly = spec(cron="0 * * * *", timezone="Europe/Berlin")
    fall = next_occurrences(hourly, local(BERLIN, 2025, 10, 26, 0, 30), 4)
    assert [at.astimezone(BERLIN).isoformat() for at in fall] == [
        "2025-10-26T01:00:00+02:00",
        "2025-10-26T02:00:00+02:00",
        "2025-10-26T03:00:00+01:00",  # 02:00 CET is a repeat: two hours of elapsed time
        "2025-10-26T04:00:00+01:00",
    ]
    quarter = spec(cron="*/15 * * * *", timezone="Europe/Berlin")
    gap = next_occurrences(quarter, local(BERLIN, 2025, 3, 30, 1, 30), 3)
    assert [at.astimezone(BERLIN).isoformat() for at in gap] == [
        "2025-03-30T01:45:00+01:00",
        "2025-03-30T03:00:00+02:00",  # 02:00..02:45 and 03:00 itself: one run
        "2025-03-30T03:15:00+02:00",
    ]


def test_lord_howe_thirty_minute_shifts() -> None:
    quarter = spec(cron="*/15 * * * *", timezone="Australia/Lord_Howe")
    fall = next_occurrences(quarter, local(LORD_HOWE, 2025, 4, 6, 1, 0), 5)
    assert [at.astimezone(LORD_HOWE).isoformat() for at in fall] == [
        "2025-04-06T01:15:00+11:00",
        "2025-04-06T01:30:00+11:00",
        "2025-04-06T01:45:00+11:00",
        "2025-04-06T02:00:00+10:30",  # 01:30 and 01:45 at +10:30 are repeats
        "2025-04-06T02:15:00+10:30",
    ]
    spring = next_occurrences(quarter, local(LORD_HOWE, 2025, 10, 5, 1, 30), 3)
    assert [at.astimezone(LORD_HOWE).isoformat() for at in spring] == [
        "2025-10-05T01:45:00+10:30",
        "2025-10-05T02:30:00+11:00",  # 02:00 and 02:15 do not exist
        "2025-10-05T02:45:00+11:00",
    ]


def test_new_york_dst_days_explicitly() -> None:
    daily = spec(cron="30 1 * * *", timezone="America/New_York")
    (first,) = next_occurrences(daily, local(NEW_YORK, 2025, 11, 1, 12), 1)
    assert first.astimezone(NEW_YORK).isoformat() == "2025-11-02T01:30:00-04:00"
    gap = spec(cron="30 2 * * *", timezone="America/New_York")
    (first,) = next_occurrences(gap, local(NEW_YORK, 2025, 3, 8, 12), 1)
    assert first.astimezone(NEW_YORK).isoformat() == "2025-03-09T03:00:00-04:00"


# --- every: elapsed time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "after"),
    [
        (BERLIN, local(BERLIN, 2025, 10, 26, 1, 7)),
        (BERLIN, local(BERLIN, 2025, 3, 30, 1, 7)),
        (LORD_HOWE, local(LORD_HOWE, 2025, 4, 6, 1, 7)),
        (NEW_YORK, local(NEW_YORK, 2025, 11, 2, 0, 7)),
    ],
)
def test_every_is_elapsed_time_across_dst(zone: ZoneInfo, after: datetime) -> None:
    schedule = spec(every=timedelta(minutes=15), timezone=str(zone))
    found = next_occurrences(schedule, after, 24)
    gaps = {(b - a).total_seconds() for a, b in pairwise(found)}
    assert gaps == {900.0}
    # Anchored at the Unix epoch: quarter hours of UTC.
    assert all(at.minute % 15 == 0 and at.second == 0 for at in found)
    assert found[0] > after and found[0] - after <= timedelta(minutes=15)


def test_every_is_anchored_at_start() -> None:
    start = utc(2025, 1, 1, 0, 0, 7, 250_000)
    schedule = spec(every=timedelta(seconds=90), start=start)
    assert next_occurrences(schedule, utc(2024, 1, 1), 3) == [
        start,
        start + timedelta(seconds=90),
        start + timedelta(seconds=180),
    ]
    assert next_occurrences(schedule, start, 1) == [start + timedelta(seconds=90)]
    assert next_occurrences(schedule, utc(2025, 1, 1, 1), 1) == [
        utc(2025, 1, 1, 1, 0, 7, 250_000)
    ]  # 40 x 90 s


def test_every_without_start_is_anchored_at_the_epoch() -> None:
    schedule = spec(every=timedelta(hours=7))
    (first,) = next_occurrences(schedule, utc(2025, 1, 1), 1)
    assert (first - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(hours=7) == timedelta(0)
    assert first - utc(2025, 1, 1) <= timedelta(hours=7)


# --- cron with seconds, bounds ----------------------------------------------------------------


def test_six_fields_put_the_seconds_first() -> None:
    schedule = spec(cron="*/20 * * * * *")
    assert next_occurrences(schedule, utc(2025, 1, 1, 0, 0, 0), 4) == [
        utc(2025, 1, 1, 0, 0, 20),
        utc(2025, 1, 1, 0, 0, 40),
        utc(2025, 1, 1, 0, 1, 0),
        utc(2025, 1, 1, 0, 1, 20),
    ]
    nine = spec(cron="30 0 9 * * *")  # 09:00:30 every day
    assert next_occurrences(nine, utc(2025, 1, 1), 1) == [utc(2025, 1, 1, 9, 0, 30)]
    # The DST rules hold for 6-field expressions too.
    gap = spec(cron="15 30 2 * * *", timezone="Europe/Berlin")
    assert next_occurrences(gap, local(BERLIN, 2025, 3, 29, 12), 1) == [utc(2025, 3, 30, 1)]


def test_next_occurrences_are_strictly_after() -> None:
    schedule = spec(cron="0 * * * *")
    assert next_occurrences(schedule, utc(2025, 1, 1, 5), 1) == [utc(2025, 1, 1, 6)]
    assert next_occurrences(schedule, utc(2025, 1, 1, 5, 0, 0, 1), 1) == [utc(2025, 1, 1, 6)]
    assert next_occurrences(schedule, utc(2025, 1, 1, 4, 59, 59, 999_999), 1) == [
        utc(2025, 1, 1, 5)
    ]
    assert next_occurrences(schedule, utc(2025, 1, 1), 0) == []


def test_start_and_end_are_inclusive_bounds() -> None:
    schedule = spec(cron="0 * * * *", start=utc(2025, 1, 1, 3), end=utc(2025, 1, 1, 6))
    assert next_occurrences(schedule, utc(2024, 12, 1), 10) == [
        utc(2025, 1, 1, 3),
        utc(2025, 1, 1, 4),
        utc(2025, 1, 1, 5),
        utc(2025, 1, 1, 6),
    ]
    assert next_occurrences(schedule, utc(2025, 1, 1, 6), 10) == []
    every = spec(every=timedelta(hours=1), start=utc(2025, 1, 1, 3, 30), end=utc(2025, 1, 1, 5))
    assert next_occurrences(every, utc(2025, 1, 1), 10) == [
        utc(2025, 1, 1, 3, 30),
        utc(2025, 1, 1, 4, 30),
    ]


def test_bounds_are_stored_in_utc_milliseconds() -> None:
    schedule = spec(cron="0 * * * *", start=local(BERLIN, 2025, 6, 1, 12, 0, 0, 123_456))
    assert schedule.start == utc(2025, 6, 1, 10, 0, 0, 123_000)
    assert schedule.start is not None and schedule.start.tzinfo is UTC


# --- misfire policies -------------------------------------------------------------------------

NOW = utc(2025, 1, 1, 12, 0)


def hourly(**kwargs: Any) -> ScheduleSpec:
    return spec(cron="0 * * * *", **kwargs)


def test_run_all_catches_up_every_missed_occurrence() -> None:
    due = due_occurrences(hourly(misfire="run_all"), utc(2025, 1, 1, 8), NOW, 3600)
    assert due == [utc(2025, 1, 1, h) for h in (9, 10, 11, 12, 13)]


def test_run_all_keeps_the_newest_up_to_the_limit() -> None:
    schedule = hourly(misfire="run_all", misfire_limit=2)
    due = due_occurrences(schedule, utc(2024, 12, 1), NOW, 0)
    assert due == [utc(2025, 1, 1, 10), utc(2025, 1, 1, 11), NOW]


def test_run_all_with_a_huge_backlog_stays_cheap() -> None:
    schedule = spec(every=timedelta(seconds=1), misfire="run_all", misfire_limit=3)
    due = due_occurrences(schedule, utc(2000, 1, 1), NOW, 1)
    assert due == [NOW - timedelta(seconds=s) for s in (3, 2, 1, 0, -1)]


def test_run_once_runs_only_the_latest_missed() -> None:
    due = due_occurrences(hourly(misfire="run_once"), utc(2025, 1, 1, 3), NOW, 1800)
    assert due == [utc(2025, 1, 1, 11), NOW]


def test_skip_runs_none_of_the_missed() -> None:
    due = due_occurrences(hourly(misfire="skip"), utc(2025, 1, 1, 3), NOW, 7200)
    assert due == [NOW, utc(2025, 1, 1, 13), utc(2025, 1, 1, 14)]


def test_nothing_is_missed_without_a_last_materialised() -> None:
    assert due_occurrences(hourly(misfire="run_all"), None, NOW + timedelta(minutes=1), 3600) == [
        utc(2025, 1, 1, 13)
    ]


def test_already_materialised_occurrences_are_not_returned() -> None:
    schedule = hourly(misfire="run_all")
    assert due_occurrences(schedule, utc(2025, 1, 1, 13), NOW, 7200) == [utc(2025, 1, 1, 14)]
    assert due_occurrences(schedule, NOW, NOW, 0) == []


def test_paused_schedules_have_nothing_due() -> None:
    schedule = hourly(misfire="run_all", paused=True)
    assert due_occurrences(schedule, utc(2025, 1, 1, 3), NOW, 7200) == []
    assert next_occurrences(schedule, NOW, 1) == [utc(2025, 1, 1, 13)]  # the calendar stays


def test_misfire_respects_start_and_end() -> None:
    schedule = hourly(misfire="run_all", start=utc(2025, 1, 1, 10), end=utc(2025, 1, 1, 11))
    assert due_occurrences(schedule, utc(2024, 1, 1), NOW, 7200) == [
        utc(2025, 1, 1, 10),
        utc(2025, 1, 1, 11),
    ]
    once = hourly(misfire="run_once", end=utc(2025, 1, 1, 9, 30))
    assert due_occurrences(once, utc(2024, 1, 1), NOW, 7200) == [utc(2025, 1, 1, 9)]


@pytest.mark.parametrize(
    ("name", "cron", "when"),
    [
        ("Europe/Berlin", "*/30 * * * *", local(BERLIN, 2025, 10, 26, 2, 10, fold=1)),
        ("Europe/Berlin", "0 * * * *", local(BERLIN, 2025, 10, 26, 2, 59, fold=1)),
        ("Europe/Berlin", "*/15 * * * *", local(BERLIN, 2025, 3, 30, 3, 5)),
        ("Australia/Lord_Howe", "*/15 * * * *", local(LORD_HOWE, 2025, 4, 6, 1, 40, fold=1)),
        ("Australia/Lord_Howe", "*/15 * * * *", local(LORD_HOWE, 2025, 10, 5, 2, 31)),
        ("America/New_York", "*/20 * * * *", local(NEW_YORK, 2025, 11, 2, 1, 5, fold=1)),
    ],
)
def test_missed_occurrences_match_the_calendar_around_transitions(
    name: str, cron: str, when: datetime
) -> None:
    schedule = spec(cron=cron, timezone=name, misfire="run_all", misfire_limit=1000)
    last = when - timedelta(hours=6)
    calendar = [at for at in next_occurrences(schedule, last, 100) if at < when]
    assert due_occurrences(schedule, last, when, 0) == calendar
    once = spec(cron=cron, timezone=name, misfire="run_once")
    assert due_occurrences(once, last, when, 0) == calendar[-1:]


# --- occurrence keys --------------------------------------------------------------------------


def test_occurrence_keys() -> None:
    at = local(BERLIN, 2025, 3, 30, 3, 0)
    assert occurrence_key("nightly", at) == "nightly@2025-03-30T01:00:00.000Z"
    assert occurrence_key("n", utc(2025, 1, 1, 0, 0, 1, 250_999)) == "n@2025-01-01T00:00:01.250Z"
    longest = "a" * MAX_NAME_LENGTH
    assert len(occurrence_key(longest, NOW)) == MAX_KEY_LENGTH
    spec(name=longest, cron="0 * * * *")
    with pytest.raises(ValueError, match="occurrence key has 513 characters"):
        occurrence_key(longest + "a", NOW)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name: empty"),
        ({"name": "a" * (MAX_NAME_LENGTH + 1)}, "name: 488 characters, limit 487"),
        ({"name": "has space"}, "name: 'has space' must start"),
        ({"name": "a@b"}, "name: 'a@b' must start"),
        ({"type": ""}, "type is empty"),
        ({"type": 3}, "type: 3 is not a string"),
        ({"cron": None}, "cron, every: exactly one"),  # neither
        ({"every": timedelta(1)}, "cron, every: exactly one"),  # both
        ({"cron": "* * * *"}, "cron: '\\* \\* \\* \\*' has 4 fields, expected 5"),
        ({"cron": "61 * * * *"}, "cron: '61 \\* \\* \\* \\*': Bad minute"),
        ({"cron": "0 0 * * * 99"}, "cron: .*Bad day-of-week"),
        ({"cron": "0 0 31 2 *"}, "cron: .*Bad day-of-month"),
        ({"cron": "0 0 * * 8"}, "cron: .*Bad day-of-week"),
        ({"cron": 5}, "cron: 5 is not a string"),
    ],
)
def test_validation_names_the_field(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "nightly", "type": "report", "cron": "0 * * * *"}
    base.update(fields)
    with pytest.raises(ValueError, match=f"^{message}"):
        ScheduleSpec(**base)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"every": timedelta(0)}, "every: 0:00:00 is not positive"),
        ({"every": timedelta(seconds=-1)}, "every: .* is not positive"),
        ({"every": timedelta(microseconds=1500)}, "every: .* whole number of milliseconds"),
        ({"every": 60}, "every: 60 is not a duration"),
        ({"timezone": "Mars/Olympus"}, "timezone: 'Mars/Olympus' is not a known"),
        ({"timezone": "../etc/passwd"}, "timezone: "),
        ({"timezone": ""}, "timezone: "),
        ({"payload": []}, "payload: a JSON object is required, not list"),
        ({"payload": {1: "x"}}, "payload: every key"),
        ({"payload": {"x": object()}}, "payload: not JSON"),
        ({"start": datetime(2025, 1, 1)}, "start: 2025-01-01T00:00:00 has no UTC offset"),
        ({"end": "2025"}, "end: '2025' is not a datetime"),
        ({"start": utc(2025, 2, 1), "end": utc(2025, 1, 1)}, "end: .* is before start"),
        ({"misfire": "later"}, "misfire: 'later' is not one of run_once, run_all, skip"),
        ({"misfire_limit": 0}, "misfire_limit: 0 is not a positive integer"),
        ({"misfire_limit": True}, "misfire_limit: True"),
        ({"paused": "no"}, "paused: 'no' is not a boolean"),
    ],
)
def test_validation_of_the_other_fields(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "nightly", "type": "report", "every": timedelta(minutes=5)}
    base.update(fields)
    with pytest.raises(ValueError, match=f"^{message}"):
        ScheduleSpec(**base)


def test_a_valid_spec() -> None:
    schedule = ScheduleSpec(
        name="billing.nightly-run:eu",
        type="invoice.issue",
        cron="0 2 * * MON-FRI",
        timezone="Europe/Berlin",
        payload={"region": "eu", "dry_run": False},
        start=utc(2025, 1, 1),
        end=utc(2026, 1, 1),
        misfire="run_all",
        misfire_limit=10,
    )
    assert schedule.zone is BERLIN
    assert schedule.paused is False
    assert spec(cron="0 * * * *").timezone == "UTC"


def test_arguments_must_be_aware() -> None:
    schedule = hourly()
    with pytest.raises(ValueError, match=r"^after: "):
        next_occurrences(schedule, datetime(2025, 1, 1), 1)
    with pytest.raises(ValueError, match=r"^now: "):
        due_occurrences(schedule, None, datetime(2025, 1, 1), 1)
    with pytest.raises(ValueError, match=r"^last_materialised: "):
        due_occurrences(schedule, datetime(2025, 1, 1), NOW, 1)
    with pytest.raises(ValueError, match=r"^lookahead: "):
        due_occurrences(schedule, None, NOW, -1)
    with pytest.raises(ValueError, match=r"^count: "):
        next_occurrences(schedule, NOW, -1)
