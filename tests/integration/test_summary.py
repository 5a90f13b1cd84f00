"""The live summary's lateness, against real PostgreSQL: on-time punctuality is not mixed
with events that arrived after their due time or were due before the run started."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trio_asyncio

from eventsched.core.operations.summary import Lateness, Snapshot, lateness_by_kind
from eventsched.core.store.pool import Database
from tests.support.clients import query
from tests.support.eventkeys import EVENT_RETAIN_FROM
from tests.support.execution import insert_events, new_events


def attempt(
    dsn: str, event_id: str, scheduled_for: datetime, lateness_ms: float, held_by: str | None = None
) -> None:
    started = scheduled_for + timedelta(milliseconds=lateness_ms)
    query(
        dsn,
        "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
        " lateness_ms, worker_id, held_by, event_retain_from)"
        f" VALUES (%s, 1, %s, %s, %s, 'w', %s, {EVENT_RETAIN_FROM})",
        (event_id, scheduled_for, started, lateness_ms, held_by, event_id),
    )


async def test_lateness_is_split_into_on_time_overdue_at_ingest_and_catch_up(
    database: str,
) -> None:
    now = datetime.now(UTC)
    started = now - timedelta(seconds=30)  # this run started 30 s ago
    # On time: recorded 20 s before due, due after the run started; 1-3 ms late.
    on_time = new_events(3, due=(now - timedelta(seconds=5)).timestamp(), type="on")
    insert_events(database, on_time, recorded_at=now - timedelta(seconds=25))
    for i, e in enumerate(on_time):
        attempt(database, e.id, datetime.fromtimestamp(e.execute_at, UTC), 1.0 + i)
    # Overdue at ingest: recorded 500 ms after its due time, ran at once (509 ms late).
    (overdue,) = new_events(1, due=(now - timedelta(seconds=2)).timestamp(), type="over")
    due = datetime.fromtimestamp(overdue.execute_at, UTC)
    insert_events(database, [overdue], recorded_at=due + timedelta(milliseconds=500))
    attempt(database, overdue.id, due, 509.0)
    # Catch-up: recorded in time, but due 45 s before the run started (downtime).
    (down,) = new_events(1, due=(started - timedelta(seconds=45)).timestamp(), type="down")
    due = datetime.fromtimestamp(down.execute_at, UTC)
    insert_events(database, [down], recorded_at=due - timedelta(seconds=60))
    attempt(database, down.id, due, 44_891.0)
    # Held by its type's rate limit for 1.2 s: the limit's wait, not lateness.
    (held,) = new_events(1, due=(now - timedelta(seconds=3)).timestamp(), type="held")
    due = datetime.fromtimestamp(held.execute_at, UTC)
    insert_events(database, [held], recorded_at=due - timedelta(seconds=10))
    attempt(database, held.id, due, 1_200.0, held_by="rate")
    # Started more than a minute ago: not in the live view at all.
    (old,) = new_events(1, due=(now - timedelta(minutes=5)).timestamp(), type="old")
    insert_events(database, [old], recorded_at=now - timedelta(minutes=6))
    attempt(database, old.id, datetime.fromtimestamp(old.execute_at, UTC), 7.0)

    async with trio_asyncio.open_loop():
        db = await Database.open(database, max_size=1)
        try:
            figures = await lateness_by_kind(db, started)
        finally:
            await db.close()

    assert set(figures) == {"on_time", "overdue_at_ingest", "catch_up", "held"}
    assert figures["held"] == Lateness(1_200.0, 1_200.0, 1)
    on = figures["on_time"]
    assert on.count == 3 and on.p50_ms == 2.0 and 2.9 < on.p99_ms <= 3.0
    assert figures["overdue_at_ingest"] == Lateness(509.0, 509.0, 1)
    assert figures["catch_up"] == Lateness(44_891.0, 44_891.0, 1)
    line = Snapshot(statuses={"cancelled": 2}, lateness=figures).line()
    assert "on time p50 2.0 ms p99 3.0 ms (3 runs)" in line
    assert "overdue at ingest p50 509.0 ms" in line and "catch-up p50 44891.0 ms" in line
    assert "cancelled 2" in line
