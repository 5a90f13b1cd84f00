"""``eventsched schedules``: add, list, show, pause, resume, next, delete against real
PostgreSQL and broker (click's runner, in-process), and the start-up check of
``[schedules.<name>]`` (a child process: exit 2, one line naming the key)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from eventsched.core.domain.schedules import occurrence_key
from eventsched.core.kafka import ensure_topics
from tests.support.cli import assert_one_line_exit_2, offline, run
from tests.support.clients import query, read_topic
from tests.support.ingest import child_sections
from tests.support.servers import Names
from tests.support.settingsfile import write_settings


@pytest.fixture
def stack(tmp_path: Path, names: Names, database: str, kafka_bootstrap: str) -> Iterator[Path]:
    """A settings file for this test's database and topic."""
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    yield write_settings(
        tmp_path / "settings.toml",
        child_sections(names, database, "redis://127.0.0.1:1/0", kafka_bootstrap),
    )


def test_add_list_show_pause_resume_next(stack: Path, database: str) -> None:
    added = run(
        stack, "schedules", "add", "nightly", "--type", "report", "--cron", "30 2 * * *",
        "--timezone", "America/New_York", "--payload", '{"id": 7}', "--misfire", "skip",
    )  # fmt: skip
    assert added.exit_code == 0 and added.output == "added nightly\n"
    assert run(stack, "schedules", "add", "tick", "--type", "t", "--every", "90s").exit_code == 0
    taken = run(stack, "schedules", "add", "tick", "--type", "t", "--every", "1s")
    assert taken.exit_code == 1 and "exists already" in taken.output

    listed = run(stack, "schedules", "list").output.splitlines()
    assert listed == [
        "nightly  cron '30 2 * * *' America/New_York  type=report  source=api",
        "tick  every 90s  type=t  source=api",
    ]
    shown = json.loads(run(stack, "schedules", "show", "nightly", "--json").output)
    assert shown["payload"] == {"id": 7} and shown["misfire"] == "skip"
    assert run(stack, "schedules", "pause", "tick").output == "paused tick\n"
    assert "paused:               True\n" in run(stack, "schedules", "show", "tick").output
    assert query(database, "SELECT paused FROM schedules WHERE name = 'tick'") == [(True,)]
    assert run(stack, "schedules", "resume", "tick").output == "resumed tick\n"
    assert query(database, "SELECT paused FROM schedules WHERE name = 'tick'") == [(False,)]

    # New York falls back on 1 November 2026: 01:30 happens twice and runs once; the
    # spring-forward of 8 March 2026 skips 02:30, which runs at 03:00.
    nxt = run(stack, "schedules", "next", "nightly", "--count", "3",
              "--from", "2026-03-07T12:00:00Z")  # fmt: skip
    assert nxt.output.splitlines() == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]


def test_delete_cancels_the_materialised_occurrences_on_the_log(
    stack: Path, database: str, kafka_bootstrap: str, names: Names
) -> None:
    before = datetime.now(UTC)
    through = datetime.fromtimestamp(int(before.timestamp()) + 8, UTC)
    query(
        database,
        "INSERT INTO schedules (name, type, every_ms, source, materialised_through)"
        " VALUES ('doomed', 't', 1000, 'api', %s), ('filed', 't', 1000, 'settings', NULL)",
        [through],
    )
    result = run(stack, "schedules", "delete", "doomed", "--json")
    after = datetime.now(UTC)
    assert result.exit_code == 0, result.output
    cancelled = json.loads(result.output)["cancelled"]
    # The occurrences after the command's own "now" (somewhere between before and after)
    # up to the watermark, in order: a suffix of those after `before` that holds every one
    # after `after`.
    materialised = [through - timedelta(seconds=i) for i in range(9, -1, -1)]
    may = [occurrence_key("doomed", at) for at in materialised if at > before]
    must = [occurrence_key("doomed", at) for at in materialised if at > after]
    assert must and len(must) <= len(cancelled) <= len(may)
    assert cancelled == may[len(may) - len(cancelled) :]
    records = read_topic(kafka_bootstrap, names.topic)
    assert [json.loads(r.value or b"{}")["idempotency_key"] for r in records] == cancelled
    refused = run(stack, "schedules", "delete", "filed")
    assert refused.exit_code == 1 and "comes from settings" in refused.output
    unknown = run(stack, "schedules", "delete", "doomed")
    assert unknown.exit_code == 1 and "no schedule named 'doomed'" in unknown.output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EVENTSCHED_SCHEDULES__NIGHTLY__TYPE": "t", "EVENTSCHED_SCHEDULES__NIGHTLY__CRON": "61 * * * *"},
            "invalid setting schedules.nightly.cron: '61 * * * *'",
        ),
        (
            {"EVENTSCHED_SCHEDULES__NIGHTLY__EVERY": "1s"},
            "invalid setting schedules.nightly.type: required",
        ),
        (
            {"EVENTSCHED_SCHEDULES__NIGHTLY__TYPE": "t", "EVENTSCHED_SCHEDULES__NIGHTLY__EVERY": "1s",
             "EVENTSCHED_SCHEDULES__NIGHTLY__TIMEZONE": "Europe/Atlantis"},
            "invalid setting schedules.nightly.timezone: 'Europe/Atlantis'",
        ),
    ],
    ids=["cron", "type", "timezone"],
)  # fmt: skip
def test_a_bad_schedule_setting_stops_start_up_with_one_line(
    env: dict[str, str], message: str
) -> None:
    result = offline("run", "--role", "executor", "--port", "0", **env)
    assert_one_line_exit_2(result, message)
    assert result.stdout == ""
