"""The JSON log line's fixed keys: ``level``, ``logger`` and the ``ts`` timestamp."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from eventsched.core.runtime import logs
from eventsched.core.runtime.logs import LineWriter, configure_logging, get_logger


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


# -- the roles' batched writes (logging.flush_interval) --------------------------------------


class Output(io.StringIO):
    """A stream that counts its flushes (one per write of a batch)."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def batched(interval: float) -> tuple[Output, Any]:
    out = Output()
    configure_logging("debug", "json", stream=out, flush_interval=interval)
    return out, get_logger("eventsched.batched")


def events(out: io.StringIO) -> list[object]:
    return [line["event"] for line in parsed(out)]


def test_info_lines_wait_for_the_interval_then_leave_together(lines: io.StringIO) -> None:
    out, log = batched(0.2)
    log.info("one")
    log.debug("two")
    assert out.getvalue() == ""
    deadline = time.monotonic() + 5
    while out.getvalue() == "" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events(out) == ["one", "two"]
    assert out.flushes == 1


def test_a_warning_leaves_at_once_after_the_lines_before_it(lines: io.StringIO) -> None:
    out, log = batched(60)
    log.info("first")
    log.warning("trouble")
    assert events(out) == ["first", "trouble"]
    log.info("later")
    log.error("worse")
    logging.getLogger("somelib").error("a library's error")  # through the stdlib bridge
    assert events(out) == ["first", "trouble", "later", "worse", "a library's error"]


def test_a_full_batch_leaves_without_waiting(lines: io.StringIO) -> None:
    out, log = batched(60)
    for n in range(LineWriter.MAX_LINES):
        log.info("line", n=n)
    assert [line["n"] for line in parsed(out)] == list(range(LineWriter.MAX_LINES))
    assert out.flushes == 1


def test_zero_writes_every_line_at_once(lines: io.StringIO) -> None:
    out, log = batched(0)
    log.info("now")
    assert events(out) == ["now"]


def test_waiting_lines_are_written_at_exit(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from eventsched.core.runtime.logs import configure_logging, get_logger\n"
        "configure_logging('info', 'json', stream=sys.stdout, flush_interval=10)\n"
        "get_logger('x').info('last_words')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert '"event":"last_words"' in done.stdout
