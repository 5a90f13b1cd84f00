"""Pyroscope: profiles reach a server; an unreachable server costs one warning, not the app."""

from __future__ import annotations

import gzip
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest

from tests.support.proc import AppProcess


class _Recorder(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        if body[:2] == b"\x1f\x8b":  # the agent may gzip the whole request body
            body = gzip.decompress(body)
        self.received.append((urlsplit(self.path).path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def fake_pyroscope() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    _Recorder.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.received
    finally:
        server.shutdown()
        server.server_close()


def _app(tmp_path: Path, server: str) -> AppProcess:
    return AppProcess(
        ["run", "--role", "producer", "--port", "0"],
        env={
            "EVENTSCHED_PLUGINS__PRODUCER": "tests.support.roles:BusyRole",
            "EVENTSCHED_PYROSCOPE__ENABLED": "true",
            "EVENTSCHED_PYROSCOPE__SERVER": server,
            "EVENTSCHED_PYROSCOPE__UPLOAD_INTERVAL": "1s",
        },
    )


def test_profiles_are_pushed_with_the_role_name(
    tmp_path: Path, fake_pyroscope: tuple[str, list[tuple[str, bytes]]]
) -> None:
    url, received = fake_pyroscope
    app = _app(tmp_path, url)
    try:
        app.wait_event("pyroscope_started")
        app.wait_event("role_ready")
        time.sleep(2)  # let the agent take samples; stopping flushes them to the server
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait() == 0
    finally:
        app.kill()
    # pyroscope-io pushes protobuf over Connect (push.v1.PusherService/Push); the series
    # labels inside carry the application name and our tags as plain strings.
    pushes = [body for path, body in received if path.endswith("/Push")]
    assert pushes, f"no profile pushed; saw {[path for path, _ in received]}"
    assert b"eventsched-producer" in pushes[0]
    assert b"producer" in pushes[0] and b"role" in pushes[0]
    assert not any(line.get("event") == "pyroscope_unreachable" for line in app.lines)


def test_unreachable_server_logs_one_warning_and_the_app_runs(tmp_path: Path) -> None:
    app = _app(tmp_path, "http://127.0.0.1:9")  # discard port: nothing listens
    try:
        app.wait_event("role_ready")
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait() == 0
    finally:
        app.kill()
    warnings = [line for line in app.lines if line.get("event") == "pyroscope_unreachable"]
    assert len(warnings) == 1
