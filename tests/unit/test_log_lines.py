"""The JSON log line's fixed keys: ``level``, ``logger`` and the ``ts`` timestamp."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from eventsched.core.runtime import logs
from eventsched.core.runtime.logs import configure_logging, get_logger


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = []


def parsed(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_names_its_level_module_and_utc_time_to_the_microsecond(
    lines: io.StringIO,
) -> None:
    log = get_logger("eventsched.somewhere")
    before = time.time()
    log.info("first", n=1)
    log.warning("second")
    after = time.time()
    first, second = parsed(lines)
    assert (first["event"], first["level"], first["logger"], first["n"]) == (
        "first", "info", "eventsched.somewhere", 1,
    )  # fmt: skip
    assert second["level"] == "warning"
    for line in (first, second):
        text = str(line["ts"])
        assert len(text) == len("2026-12-04T15:03:41.826979Z") and text.endswith("Z")
        stamp = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before - 1e-6 <= stamp.timestamp() <= after + 1e-6


def test_the_timestamp_follows_the_clock_across_seconds(
    lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The text up to the seconds is reused within a second: it must change with it.
    clock = iter([1_764_860_621.999_999, 1_764_860_622.0, 1_764_860_622.5, 1_764_860_683.25])
    monkeypatch.setattr(logs.time, "time", lambda: next(clock))
    log = get_logger("eventsched.clock")
    for n in range(4):
        log.info("tick", n=n)
    assert [line["ts"] for line in parsed(lines)] == [
        "2025-12-04T15:03:41.999999Z",
        "2025-12-04T15:03:42.000000Z",
        "2025-12-04T15:03:42.500000Z",
        "2025-12-04T15:04:43.250000Z",
    ]


def test_warn_and_exception_name_structlogs_levels(lines: io.StringIO) -> None:
    log = get_logger("eventsched.levels")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = parsed(lines)
    assert line["level"] == "error"
    assert "ValueError: boom" in str(line["exception"])
