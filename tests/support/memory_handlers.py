"""Sizes and the handler of the executor memory tests; the handler is loaded by a child executor process through settings.

Every call appends one line ``<event id> <attempt> <payload blob length>`` to the file named
by $TEST_CALLS_FILE (one ``O_APPEND`` write per call, so lines of concurrent calls never
mix), then holds the payload for $TEST_HANDLER_SLEEP seconds (default 0.05) like a handler
doing some work with it.
"""

from __future__ import annotations

import asyncio
import os

from eventsched.core.runtime.contracts import HandlerEvent
from tests.support.journal import append_line

MB = 1024 * 1024


async def record(event: HandlerEvent) -> None:
    blob = event.payload.get("blob", "")
    append_line(os.environ["TEST_CALLS_FILE"], f"{event.id} {event.attempt} {len(blob)}")
    await asyncio.sleep(float(os.environ.get("TEST_HANDLER_SLEEP", "0.05")))
