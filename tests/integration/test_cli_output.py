"""Operator commands print results on stdout and log to stderr at ``logging.level``; the
stdlib bridge keeps a library's traceback."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

from tests.support.proc import REPO


def _eventsched(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventsched", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **env},
    )


def test_migrate_prints_only_its_result_and_logs_to_stderr_at_the_set_level(
    empty_database: str,
) -> None:
    env = {"EVENTSCHED_POSTGRES__DSN": empty_database, "EVENTSCHED_LOGGING__LEVEL": "info"}
    up = _eventsched("migrate", "up", env=env)
    assert up.returncode == 0, up.stderr
    versions = sorted(int(p.name.split("_", 1)[0]) for p in (REPO / "sql").glob("*.up.sql"))
    latest = versions[-1]
    assert up.stdout == f"applied: {', '.join(map(str, versions))}\n"
    lines = [json.loads(line) for line in up.stderr.splitlines()]
    assert {line["event"] for line in lines} >= {"migration_applied"}
    assert all(line["level"] != "debug" for line in lines), lines

    quiet = _eventsched("migrate", "version", env={**env, "EVENTSCHED_LOGGING__LEVEL": "warning"})
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == (f"{latest}\n", "")


def test_a_library_traceback_survives_the_stdlib_bridge() -> None:
    from eventsched.core.runtime.logs import configure_logging

    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        try:
            1 / 0  # noqa: B018 - the error is the point
        except ZeroDivisionError:
            logging.getLogger("some.library").exception("library step failed")
        (line,) = [json.loads(text) for text in out.getvalue().splitlines()]
    finally:
        configure_logging("info", "json")
    assert line["event"] == "library step failed"
    assert line["logger"] == "some.library"
    assert "Traceback" in line["exception"] and "ZeroDivisionError" in line["exception"]


def test_a_logger_used_before_a_reconfiguration_follows_it() -> None:
    """Loggers are cached on first use; configuring again (the CLI does, a test suite does)
    must still reach them, or their lines go to the old stream and escape capture."""
    from structlog.testing import capture_logs

    from eventsched.core.runtime.logs import configure_logging, get_logger

    log = get_logger("tests.cached")
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging("info", "json", stream=first)
        log.warning("cached_here")
        configure_logging("info", "json", stream=second)
        with capture_logs() as captured:
            log.warning("after_reconfiguration")
    finally:
        configure_logging("info", "json")
    assert [entry["event"] for entry in captured] == ["after_reconfiguration"]
    assert "cached_here" in first.getvalue()
