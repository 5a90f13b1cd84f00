"""Child processes: eventsched run as a real process, its JSON log lines, free ports.

:class:`AppProcess` collects a child's output on a thread (tests read every line);
bench/ keeps its children's logs in files and shares :data:`REPO` and :func:`free_port`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback TCP port that nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AppProcess:
    """`python -m eventsched ARGS` with JSON logs collected from stdout on a thread."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "EVENTSCHED_LOGGING__FORMAT": "json",
            **(env or {}),
        }
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventsched", *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):  # not every line is a log line
                    self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"log line not seen; output:\n{self.tail()}")
                self._cond.wait(min(remaining, 0.2))

    def tail(self, lines: int = 40) -> str:
        """The last output lines, without librdkafka's configuration warnings."""
        kept = [line for line in self.raw if "CONFWARN" not in line]
        return "".join(kept[-lines:])

    def wait_event(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda line: line.get("event") == event, timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own; return its exit code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._close()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self._close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
