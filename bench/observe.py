"""The benchmarks' handler: it notes the time on its first line, as a user's handler would.

Lateness in the benchmarks is measured here, where an outsider sees it: ``time.time()`` is
the handler's first statement; the line ``<event id> <attempt> <observed> <due>`` (epoch
seconds, ``repr`` of the floats) is then appended to ``$BENCH_OBSERVE_FILE`` (one
``O_APPEND`` write, so executors in several processes can share the file), and the event is
logged as by ``eventsched.plugins.handlers:log``. Without ``$BENCH_OBSERVE_FILE`` it only
logs. :func:`read_observed` reads the file back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from eventsched import HandlerEvent
from eventsched.plugins.handlers import log

ENV = "BENCH_OBSERVE_FILE"
_fd: int | None = None


def _file() -> int | None:
    global _fd  # one descriptor per process, opened on the first event
    if _fd is None and os.environ.get(ENV):
        _fd = os.open(os.environ[ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


async def observed(event: HandlerEvent) -> None:
    """Note when it was invoked, then log the event and succeed."""
    now = time.time()
    fd = _file()
    if fd is not None:
        due = event.execute_at.timestamp()
        os.write(fd, f"{event.id} {event.attempt} {now!r} {due!r}\n".encode())
    await log(event)


def read_observed(path: Path) -> dict[tuple[str, int], float]:
    """(event id, attempt) -> when the handler observed its start (epoch seconds); the
    earliest, should an attempt have been observed twice."""
    out: dict[tuple[str, int], float] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue  # a line cut by a killed process
        key = (parts[0], int(parts[1]))
        t = float(parts[2])
        out[key] = min(t, out.get(key, t))
    return out
