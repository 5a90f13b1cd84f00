"""Event handlers for the execution tests: real plugins with scripted behaviour.

In-process tests read :data:`CALLS` to see which attempts ran; child processes (loaded by
settings) only use what they can do alone (``slow``: sleep, then succeed).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

from eventsched.core.plugins import HandlerEvent, PermanentError

# (event id, attempt) of every call, in call order (in-process tests only).
CALLS: list[tuple[str, int]] = []
PER_EVENT: Counter[str] = Counter()


def reset() -> None:
    CALLS.clear()
    PER_EVENT.clear()


def _record(event: HandlerEvent) -> None:
    CALLS.append((event.id, event.attempt))
    PER_EVENT[event.id] += 1


async def ok(event: HandlerEvent) -> None:
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
