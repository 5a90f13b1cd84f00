"""Event handlers for the execution tests: real plugins with scripted behaviour.

In-process tests read :data:`CALLS` to see which attempts ran; child processes (loaded by
settings) only use what they can do alone (``slow``: sleep, then succeed; ``journal``: the
same, writing each invocation's start and end to a file the test reads).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

from eventsched.core.runtime.contracts import HandlerEvent, PermanentError
from tests.support.journal import append_line

# (event id, attempt) of every call, in call order (in-process tests only).
CALLS: list[tuple[str, int]] = []
PER_EVENT: Counter[str] = Counter()
# (event id, attempt) -> time.time() on the first line of ``observe`` (in-process tests only).
OBSERVED: dict[tuple[str, int], float] = {}


def reset() -> None:
    CALLS.clear()
    PER_EVENT.clear()
    OBSERVED.clear()


def _record(event: HandlerEvent) -> None:
    CALLS.append((event.id, event.attempt))
    PER_EVENT[event.id] += 1


async def ok(event: HandlerEvent) -> None:
    _record(event)


async def observe(event: HandlerEvent) -> None:
    """Notes the time on its first line (as an outside observer of the executor would)."""
    OBSERVED[event.id, event.attempt] = time.time()
    _record(event)


async def flaky(event: HandlerEvent) -> None:
    """Fails the first two attempts, succeeds on the third."""
    _record(event)
    if event.attempt < 3:
        raise RuntimeError(f"flaky failure on attempt {event.attempt}")


async def always_fails(event: HandlerEvent) -> None:
    _record(event)
    raise RuntimeError("always fails")


async def permanent(event: HandlerEvent) -> None:
    _record(event)
    raise PermanentError(f"bad payload: {dict(event.payload)}")


async def slow(event: HandlerEvent) -> None:
    """Sleeps ``payload["sleep"]`` seconds (else $TEST_HANDLER_SLEEP, else 1 s)."""
    _record(event)
    seconds = event.payload.get("sleep", float(os.environ.get("TEST_HANDLER_SLEEP", "1")))
    await asyncio.sleep(float(seconds))


# -- a journal of invocations, across processes ------------------------------------------------


def _journal(what: str, event: HandlerEvent) -> None:
    record = {"what": what, "event": event.id, "attempt": event.attempt}
    line = json.dumps({**record, "pid": os.getpid(), "t": time.time()})
    append_line(os.environ["TEST_HANDLER_JOURNAL"], line)


async def journal(event: HandlerEvent) -> None:
    """Appends ``start`` to the file $TEST_HANDLER_JOURNAL, sleeps ``payload["sleep"]``
    seconds (default 0; a list: one value per attempt, the last for the rest), then appends
    ``done`` (its side effect) and succeeds. A run that is cancelled or killed leaves a
    ``start`` without ``done``."""
    _record(event)
    _journal("start", event)
    sleep = event.payload.get("sleep", 0)
    if isinstance(sleep, list):
        sleep = sleep[min(event.attempt, len(sleep)) - 1]
    await asyncio.sleep(float(sleep))
    _journal("done", event)


def read_journal(path: str) -> list[dict[str, object]]:
    """The journal's lines, in the order they were written."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
