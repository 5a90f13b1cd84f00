"""The benchmarks' handler: it notes the time on its first line, as a user's handler would.

Lateness in the benchmarks is measured here, where an outsider sees it: ``time.time()`` is
the handler's first statement; the line ``<event id> <attempt> <observed> <due>`` (epoch
seconds, ``repr`` of the floats) is then appended to ``$BENCH_OBSERVE_FILE``, and the
event is logged as by ``eventsched.plugins.handlers:log``. Without ``$BENCH_OBSERVE_FILE`` it
only logs. :func:`read_observed` reads the file back.

Lines are written in batches: one ``O_APPEND`` write of whole lines (so executors in several
processes can share the file) :data:`FLUSH_AFTER` seconds after the first unwritten line, or
at :data:`FLUSH_LINES` lines, and at exit. A write per event cost a system call per job
(~0.01-0.02 ms of CPU here), counted in the executor's CPU per job as if it were ours.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from pathlib import Path

from eventsched import HandlerEvent
from eventsched.plugins.handlers import log

ENV = "BENCH_OBSERVE_FILE"
#: Seconds an observation may wait for its batch's write; the harness reads the file once
#: the outcomes are recorded, which are written behind by about as long.
FLUSH_AFTER = 0.02
#: Lines that are written at once, however young.
FLUSH_LINES = 512
_fd: int | None = None
_lines: list[str] = []
_flush_timer: asyncio.TimerHandle | None = None


def _file() -> int | None:
    global _fd  # one descriptor per process, opened on the first event
    if _fd is None and os.environ.get(ENV):
        _fd = os.open(os.environ[ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


async def observed(event: HandlerEvent) -> None:
    """Note when it was invoked, then log the event and succeed."""
    global _flush_timer
    now = time.time()
    if _file() is not None:
        due = event.execute_at.timestamp()
        _lines.append(f"{event.id} {event.attempt} {now!r} {due!r}\n")
        if len(_lines) >= FLUSH_LINES:
            _flush()
        elif _flush_timer is None:
            _flush_timer = asyncio.get_running_loop().call_later(FLUSH_AFTER, _flush)
    await log(event)


def _flush() -> None:
    global _flush_timer
    if _flush_timer is not None:
        _flush_timer.cancel()
        _flush_timer = None
    if _lines and _fd is not None:
        os.write(_fd, "".join(_lines).encode())
        _lines.clear()


atexit.register(_flush)


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
