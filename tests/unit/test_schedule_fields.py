"""Schedules as users write them (settings, API, CLI) and the schedule leader's plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from eventsched.core.domain.schedulefields import (
    definition_hash,
    format_every,
    format_local,
    materialised_after,
    plan,
    spec_fields,
    spec_from_fields,
    specs_from_settings,
)
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import build_settings, load_settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


def every_second(**fields: Any) -> Any:
    return spec_from_fields("tick", {"type": "tick", "every": "1s", **fields})


# -- fields ----------------------------------------------------------------------------------


def test_fields_round_trip_through_json() -> None:
    spec = spec_from_fields(
        "nightly",
        {"type": "report", "cron": "30 2 * * *", "timezone": "Europe/Berlin",
         "payload": {"a": [1]}, "start": "2026-01-01T00:00:00+01:00", "misfire": "skip"},
    )  # fmt: skip
    fields = spec_fields(spec)
    assert fields["start"] == "2025-12-31T23:00:00.000Z"
    assert spec_from_fields("nightly", fields) == spec
    assert definition_hash(spec_from_fields("nightly", fields)) == definition_hash(spec)
    assert definition_hash(spec_from_fields("nightly", {**fields, "paused": True})) != (
        definition_hash(spec)
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"every": "1s"}, "type: required"),
        ({"type": "t"}, "cron, every: exactly one"),
        ({"type": "t", "every": "soon"}, "every: expected a duration"),
        ({"type": "t", "every": 0.0001}, "every: 0.0001 is not a whole number of milliseconds"),
        ({"type": "t", "every": "1s", "start": "yesterday"}, "start: 'yesterday' is not an RFC"),
        ({"type": "t", "every": "1s", "colour": "red"}, "colour: unknown key"),
        ({"type": "t", "cron": "61 * * * *"}, "cron: '61 * * * *'"),
        ({"type": "t", "cron": "* * * * *", "timezone": "Mars/Base"}, "timezone: 'Mars/Base'"),
    ],
)
def test_bad_fields_name_their_key(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("*", r"\*")):
        spec_from_fields("s", fields)


@pytest.mark.parametrize(
    ("ms", "text"), [(900_000, "15m"), (1500, "1500ms"), (172_800_000, "2d"), (1000, "1s")]
)
def test_every_is_shown_in_its_largest_whole_unit(ms: int, text: str) -> None:
    assert format_every(timedelta(milliseconds=ms)) == text


def test_local_times_carry_the_offset_in_force() -> None:
    summer = datetime(2026, 7, 1, 10, tzinfo=UTC)
    assert format_local(summer, "Europe/Berlin") == "2026-07-01T12:00:00+02:00"
    assert format_local(T0, "Europe/Berlin") == "2026-01-01T01:00:00+01:00"
    assert format_local(T0 + timedelta(milliseconds=5), "UTC") == "2026-01-01T00:00:00.005+00:00"


# -- the leader's plan ----------------------------------------------------------------------


def test_a_new_schedule_materialises_the_lookahead_and_moves_the_watermark_to_its_end() -> None:
    step = plan(every_second(), None, T0, lookahead=3, max_past=86_400, limit=1000)
    assert step.occurrences == [T0, T0 + S, T0 + 2 * S, T0 + 3 * S]
    assert step.through == T0 + 3 * S
    again = plan(every_second(), step.through, T0 + S / 2, lookahead=3, max_past=86_400, limit=9)
    assert again.occurrences == []  # nothing after the watermark within the window
    assert again.through == T0 + 3.5 * S  # now + lookahead


def test_the_batch_limit_stops_the_watermark_at_the_last_occurrence_taken() -> None:
    step = plan(every_second(), None, T0, lookahead=60, max_past=86_400, limit=10)
    assert len(step.occurrences) == 10 and step.through == T0 + 9 * S
    rest = plan(every_second(), step.through, T0, lookahead=60, max_past=86_400, limit=1000)
    assert rest.occurrences[0] == T0 + 10 * S and rest.through == T0 + 60 * S


def test_missed_occurrences_older_than_max_past_are_dropped_and_counted() -> None:
    spec = every_second(misfire="run_all")
    step = plan(spec, T0 - 30 * S, T0, lookahead=0, max_past=10, limit=1000)
    assert step.too_old == 19  # T0 - 29 s .. T0 - 11 s
    assert step.occurrences == [T0 - 10 * S + i * S for i in range(11)]


def test_materialised_after_is_what_a_delete_cancels() -> None:
    assert materialised_after(every_second(), T0 + 3 * S, T0) == [T0 + S, T0 + 2 * S, T0 + 3 * S]
    assert materialised_after(every_second(), None, T0) == []
    assert materialised_after(every_second(), T0 - S, T0) == []


# -- settings -------------------------------------------------------------------------------


def _settings(schedules: dict[str, Any]) -> Any:
    return build_settings({"schedules": schedules})


@pytest.mark.parametrize(
    ("entry", "key", "problem"),
    [
        ({"every": "1s"}, "schedules.Nightly.type", "required"),
        ({"type": "t", "every": "1s", "colour": 1}, "schedules.Nightly.colour", "unknown key"),
        ({"type": "t", "every": "1s", "misfire": "never"}, "schedules.Nightly.misfire", "invalid"),
        ({"type": "t", "cron": "99 * * * *"}, "schedules.Nightly.cron", "'99 * * * *'"),
        ({"type": "t", "every": "1s", "timezone": "Nowhere"}, "schedules.Nightly.timezone", ""),
        ({"type": "t"}, "schedules.Nightly.cron", "exactly one"),
        ({"type": "t", "every": "1s", "misfire_limit": 0}, "schedules.Nightly.misfire_limit", ""),
    ],
)
def test_a_bad_schedule_setting_names_its_key(
    entry: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        specs_from_settings(_settings({"Nightly": entry}))
    assert caught.value.key == key
    assert problem.lower() in caught.value.problem.lower()


def test_schedules_from_a_settings_file_keep_name_and_payload_case(tmp_path: Path) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text(
        '[default.schedules.Nightly]\ntype = "report"\ncron = "0 3 * * *"\n'
        'timezone = "Europe/Berlin"\nstart = 2026-01-01T00:00:00Z\n'
        "[default.schedules.Nightly.payload]\nReportId = 7\n"
        '[default.scheduler]\nlookahead = "2m"\n'
    )
    settings = load_settings(extra, environ={})
    spec = specs_from_settings(settings)["Nightly"]
    assert spec.payload == {"ReportId": 7} and spec.start == T0
    assert settings.scheduler.lookahead == 120.0


def test_the_lookahead_must_cover_the_interval() -> None:
    with pytest.raises(ConfigError, match=r"scheduler\.lookahead"):
        build_settings({"scheduler": {"interval": "10s", "lookahead": "5s"}})
