"""Handlers for the replay tests: every call is recorded (in-process executor only)."""

from __future__ import annotations

from eventsched.core.runtime.contracts import HandlerEvent

#: (event id, attempt) of every call, in call order.
CALLS: list[tuple[str, int]] = []


async def fails_before_5(event: HandlerEvent) -> None:
    """Fails attempts 1-4, succeeds from attempt 5 on (a fix deployed meanwhile)."""
    CALLS.append((event.id, event.attempt))
    if event.attempt < 5:
        raise RuntimeError(f"broken on attempt {event.attempt}")


async def always_fails(event: HandlerEvent) -> None:
    CALLS.append((event.id, event.attempt))
    raise RuntimeError("always fails")
