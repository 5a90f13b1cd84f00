"""A handler for the command tests: every start is recorded with its time.

In-process tests read :data:`STARTS`; child processes write the same to the file named by
$TEST_HANDLER_JOURNAL (one ``start`` line per invocation, as :mod:`tests.support.exec_handlers`
does). The payload scripts the run: ``sleep`` seconds, then fail while ``attempt <
fail_until`` (``fail_until`` absent: never fails).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from eventsched.core.runtime.contracts import HandlerEvent

#: (event id, attempt, start time) of every invocation, in order (in-process tests only).
STARTS: list[tuple[str, int, float]] = []


def reset() -> None:
    STARTS.clear()


async def scripted(event: HandlerEvent) -> None:
    started = time.time()
    STARTS.append((event.id, event.attempt, started))
    path = os.environ.get("TEST_HANDLER_JOURNAL")
    if path:
        line = json.dumps({"what": "start", "event": event.id, "attempt": event.attempt,
                           "t": started, "pid": os.getpid()})  # fmt: skip
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    await asyncio.sleep(float(event.payload.get("sleep", 0)))
    fail_until = event.payload.get("fail_until")
    if fail_until is not None and event.attempt < int(fail_until):
        raise RuntimeError(f"scripted failure of attempt {event.attempt}")
