"""The runtime as a real process: readiness, two-phase shutdown on signals, exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.support.proc import AppProcess

ROLE = "tests.support.roles:DrainingRole"


def _app(tmp_path: Path, drain: float = 0.0, grace: str = "5s") -> AppProcess:
    return AppProcess(
        ["run", "--role", "producer", "--port", "0"],
        env={
            "EVENTSCHED_PLUGINS__PRODUCER": ROLE,
            "EVENTSCHED_SHUTDOWN__GRACE": grace,
            "TEST_DRAIN_SECONDS": str(drain),
            "TEST_MARKER": str(tmp_path / "drained"),
        },
    )


def test_sigterm_drains_in_flight_work_and_exits_zero(tmp_path: Path) -> None:
    app = _app(tmp_path, drain=0.5)
    try:
        port = app.wait_event("http_listening")["port"]
        app.wait_event("role_ready")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["roles"] == {"producer": True}
        assert b"eventsched_role_ready" in httpx.get(f"http://127.0.0.1:{port}/metrics").content
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait() == 0
    finally:
        app.kill()
    assert (tmp_path / "drained").read_text() == "drained producer\n"
    complete = [line for line in app.lines if line.get("event") == "shutdown_complete"]
    assert complete and complete[0]["drained"] is True
    for line in app.lines:
        assert {"ts", "level", "event", "logger"} <= line.keys()
        assert line["role"] == "producer"


def test_sigint_is_handled_like_sigterm(tmp_path: Path) -> None:
    app = _app(tmp_path)
    try:
        app.wait_event("role_ready")
        app.proc.send_signal(signal.SIGINT)
        assert app.wait() == 0
    finally:
        app.kill()
    assert (tmp_path / "drained").exists()


def test_drain_deadline_cancels_and_still_exits_zero(tmp_path: Path) -> None:
    app = _app(tmp_path, drain=30, grace="500ms")
    try:
        app.wait_event("role_ready")
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(timeout=10) == 0
    finally:
        app.kill()
    assert any(line.get("event") == "shutdown_deadline_exceeded" for line in app.lines)
    assert not (tmp_path / "drained").exists()


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    app = _app(tmp_path, drain=30, grace="30s")
    try:
        app.wait_event("role_ready")
        app.proc.send_signal(signal.SIGTERM)
        app.wait_event("shutdown_requested")
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(10) == 130
    finally:
        app.kill()
    assert any(line.get("event") == "shutdown_now" for line in app.lines)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EVENTSCHED_PLUGINS__PRODUCER": "nope:Nope"},
            "eventsched: error: invalid plugin plugins.producer = 'nope:Nope': cannot import module 'nope': No module named 'nope'",
        ),
        (
            {"EVENTSCHED_PRODUCER__INTERVAL": "-1s"},
            "eventsched: error: invalid setting producer.interval: expected a duration like 500ms, 2s or 1m, got '-1s'",
        ),
        (
            {"EVENTSCHED_ENV": "production"},
            "eventsched: error: invalid setting kafka.bootstrap_servers: required (set EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS)",
        ),
    ],
)
def test_bad_start_up_exits_2_with_one_line(env: dict[str, str], message: str) -> None:
    app = AppProcess(["run", "--role", "producer"], env=env)
    assert app.wait() == 2
    assert "".join(app.raw).strip() == message


def test_unknown_role_is_a_usage_error() -> None:
    app = AppProcess(["run", "--role", "janitor"])
    assert app.wait() == 2
    assert "Invalid value for '--role'" in "".join(app.raw)


def test_a_failing_role_exits_1_with_a_logged_error(tmp_path: Path) -> None:
    app = AppProcess(
        ["run", "--role", "consumer", "--port", "0"],
        env={
            "EVENTSCHED_PLUGINS__CONSUMER": "tests.support.roles:FailingRole",
        },
    )
    assert app.wait() == 1
    failed = [line for line in app.lines if line.get("event") == "runtime_failed"]
    assert failed and failed[0]["error"] == "RuntimeError: role broke on purpose"
