"""Recurring schedules end to end: settings and store, the schedule leader, the log.

Real PostgreSQL, Redis and broker. What is counted is handler invocations (the ``scripted``
handler of :mod:`tests.support.command_handlers`: in-process starts, or a journal file
written by executor processes), not only rows. Waits are bounded by the schedule itself:
an every-1s schedule needs its seconds to pass; the misfire test instead puts the watermark
30 s in the past and runs one leader pass at a chosen instant (the same code path as 30 s
without an executor: the leader finds occurrences after the watermark and before now).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio

from eventsched.core.domain.schedulefields import definition_hash, spec_from_fields
from eventsched.core.domain.schedules import ScheduleSpec, occurrence_key
from eventsched.core.kafka import KafkaProducer, ensure_topics
from eventsched.core.operations import schedules as ops
from eventsched.core.runtime.settings import Settings
from eventsched.core.store import schedules as store
from eventsched.core.store.pool import Database
from eventsched.plugins.executor.attempt import CLAIM_AHEAD
from eventsched.plugins.executor.schedules import ScheduleLeader
from tests.support import command_handlers
from tests.support.clients import delete_queue_keys, query, read_topic
from tests.support.exec_handlers import read_journal
from tests.support.execution import executor_env
from tests.support.ingest import running
from tests.support.proc import AppProcess
from tests.support.servers import Names
from tests.support.waiting import wait_until

HANDLER = "tests.support.command_handlers:scripted"


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    # Three partitions: the occurrences of one schedule spread over them by key.
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 1})
    return names


@pytest.fixture(autouse=True)
def _clean(redis_url: str, names: Names) -> Iterator[None]:
    command_handlers.reset()
    yield
    delete_queue_keys(redis_url, names.queue)


def settings_for(make_settings: Any, **scheduler: Any) -> Settings:
    return make_settings(  # type: ignore[no-any-return]
        executor={"concurrency": 8},
        handlers={"default": HANDLER},
        reconciler={"enabled": False},
        scheduler={"interval": "200ms", "lookahead": "1s", **scheduler},
    )


def every(name: str, seconds: float = 1.0, **fields: Any) -> ScheduleSpec:
    return spec_from_fields(name, {"type": "tick", "every": seconds, **fields})


def keys_by_event(dsn: str) -> dict[str, tuple[str, datetime, str]]:
    """Event id -> (idempotency key, due time, status)."""
    rows = query(dsn, "SELECT id::text, idempotency_key, execute_at, status FROM events")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def cancels_applied(dsn: str, keys: Iterable[str]) -> dict[str, datetime]:
    """Idempotency key -> when the first cancel command for it was applied (keys whose
    cancel the consumer has not applied yet are absent)."""
    rows = query(
        dsn,
        "SELECT idempotency_key, min(applied_at) FROM event_commands"
        " WHERE op = 'cancel' AND idempotency_key = ANY(%s) GROUP BY idempotency_key",
        [list(keys)],
    )
    return dict(rows)


def started_keys(dsn: str) -> list[str]:
    """The keys of the events the in-process handler started, one per invocation."""
    keys = keys_by_event(dsn)
    return [keys[event_id][0] for event_id, _, _ in command_handlers.STARTS]


@asynccontextmanager
async def roles(settings: Settings, names: list[str]) -> AsyncIterator[tuple[Database, Any]]:
    """Run the roles ``names`` (none: no runtime) in this process; yield a pool and a
    producer of the test's own (on a trio-asyncio loop of its own: the runtime's loop
    serves the runtime's tasks only)."""
    async with trio_asyncio.open_loop():
        db = await Database.open(settings.postgres.dsn, max_size=2)
        try:
            config = {"bootstrap.servers": settings.kafka.bootstrap_servers}
            async with KafkaProducer.open(config, flush_timeout=5.0) as producer:
                if not names:
                    yield db, producer
                    return
                async with running(settings, names):
                    yield db, producer
        finally:
            await db.close()


def whole_second(offset: float = 0.0) -> datetime:
    return datetime.fromtimestamp(math.floor(time.time() + offset), UTC)


# -- exactly once ------------------------------------------------------------------------------


def test_two_executors_and_a_restart_run_each_occurrence_once(
    make_settings: Any,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    names: Names,
    tmp_path: Path,
) -> None:
    """An every-1s schedule over 20 s, two executor processes, one of them replaced
    halfway (its leadership moves): 20 events, each handler invoked once."""
    journal_path = str(tmp_path / "journal")
    env = executor_env(
        names, database, redis_url, kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT=HANDLER, EVENTSCHED_RECONCILER__ENABLED="false",
        EVENTSCHED_SCHEDULER__INTERVAL="300ms", EVENTSCHED_SCHEDULER__LOOKAHEAD="2s",
        TEST_HANDLER_JOURNAL=journal_path,
    )  # fmt: skip
    args = ["run", "--role", "executor", "--port", "0"]
    executors = [AppProcess(args, env=env), AppProcess(args, env=env)]
    expected: list[str] = []

    async def main() -> None:
        async with roles(make_settings(reconciler={"enabled": False}), ["consumer"]) as (db, _):
            first = whole_second(2.0)
            spec = every("tick", start=first, end=first + timedelta(seconds=19))
            expected.extend(occurrence_key("tick", first + timedelta(seconds=i)) for i in range(20))
            assert await store.insert(db, spec) is not None
            # Halfway, one executor stops (SIGTERM) and a new one starts.
            await trio.sleep(max(0.0, first.timestamp() + 9 - time.time()))
            await trio.to_thread.run_sync(executors[0].stop)
            executors.append(AppProcess(args, env=env))
            await wait_until(lambda: len(read_journal(journal_path)) >= 20, limit=30)
            await trio.sleep(1.5)  # a duplicate would start within the claim of its due time

    try:
        for app in executors:
            app.wait_event("role_ready", timeout=30)
        trio.run(main)
    finally:
        for app in executors:
            app.stop()
    events = keys_by_event(database)
    started = [events[str(line["event"])][0] for line in read_journal(journal_path)]
    assert sorted(started) == sorted(expected)  # each occurrence once, none other
    assert len(events) == 20


# -- settings ----------------------------------------------------------------------------------


def test_settings_schedules_are_applied_at_start(
    make_settings: Any, topics: Names, database: str
) -> None:
    """Created from the file; an unchanged file keeps an API pause; a changed definition is
    overwritten; one removed from the file is deleted; an API schedule is left alone."""
    base = {"type": "report", "cron": "0 3 * * *", "timezone": "Europe/Berlin"}

    async def start(schedules: dict[str, Any]) -> None:
        settings = make_settings(
            handlers={"default": HANDLER}, reconciler={"enabled": False}, schedules=schedules
        )
        async with running(settings, ["executor"]):
            await wait_until(lambda: _applied(database, schedules), limit=10)

    trio.run(start, {"nightly": base, "hourly": {"type": "t", "every": "1h"}})
    rows = dict(query(database, "SELECT name, source FROM schedules"))
    assert rows == {"nightly": "settings", "hourly": "settings"}
    query(database, "UPDATE schedules SET paused = true WHERE name = 'nightly'")
    query(
        database,
        "INSERT INTO schedules (name, type, every_ms, source) VALUES ('mine', 't', 1000, 'api')",
    )
    trio.run(start, {"nightly": base, "hourly": {"type": "t", "every": "2h"}})
    rows = {r[0]: r[1:] for r in query(database, "SELECT name, paused, every_ms FROM schedules")}
    assert rows == {
        "nightly": (True, None),  # unchanged in the file: the pause stays
        "hourly": (False, 7_200_000),  # changed: overwritten
        "mine": (False, 1000),
    }
    trio.run(start, {"nightly": {**base, "paused": False, "cron": "0 4 * * *"}})
    rows = {r[0]: r[1:] for r in query(database, "SELECT name, paused, cron FROM schedules")}
    assert rows == {"nightly": (False, "0 4 * * *"), "mine": (False, None)}


def _applied(database: str, schedules: dict[str, Any]) -> bool:
    """The settings schedules in PostgreSQL are exactly these definitions."""
    rows = query(database, "SELECT name, definition_hash FROM schedules WHERE source = 'settings'")
    wanted = {n: definition_hash(spec_from_fields(n, f)) for n, f in schedules.items()}
    return dict(rows) == wanted


# -- pause, resume, misfire, delete --------------------------------------------------------


def test_pause_stops_materialising_and_resume_skips_the_paused_time(
    make_settings: Any, topics: Names, database: str
) -> None:
    async def main() -> None:
        async with roles(settings_for(make_settings), ["consumer", "executor"]) as (db, _):
            await store.insert(db, every("beat"))
            await wait_until(lambda: len(command_handlers.STARTS) >= 2, limit=10)
            paused_at = datetime.now(UTC)
            assert await store.set_paused(db, "beat", True) is not None
            # A pass in flight may still publish up to its lookahead (1 s); after that,
            # nothing new is materialised, and everything materialised runs.
            await trio.sleep(2.5)
            due = sorted(e[1] for e in keys_by_event(database).values())
            assert due[-1] <= paused_at + timedelta(seconds=1.5)
            assert len(command_handlers.STARTS) == len(due)
            resumed = await store.set_paused(db, "beat", False)
            assert resumed is not None and resumed.materialised_through is not None
            back = resumed.materialised_through
            count, last = len(due), due[-1]
            await wait_until(lambda: len(command_handlers.STARTS) >= count + 2, limit=10)
            due = sorted(e[1] for e in keys_by_event(database).values())
            assert back - last >= timedelta(seconds=1)  # the paused time, without events:
            assert not [at for at in due if last < at <= back]  # skipped, not caught up
            started = started_keys(database)
            assert len(started) == len(set(started))

    trio.run(main)


@pytest.mark.parametrize(
    ("misfire", "limit", "missed"),
    [("run_all", 100, 30), ("run_all", 5, 5), ("run_once", 100, 1), ("skip", 100, 0)],
)
def test_misfire_policies_after_30_s_without_a_leader(
    make_settings: Any, topics: Names, database: str, misfire: str, limit: int, missed: int
) -> None:
    """The watermark 30 s before the pass: 30 occurrences were never materialised."""
    now = whole_second()
    pass_at = now + timedelta(milliseconds=500)
    expected = [now - timedelta(seconds=i) for i in range(missed)] + [now + timedelta(seconds=1)]

    async def main() -> None:
        settings = settings_for(make_settings, enabled=False)
        async with roles(settings, ["consumer", "executor"]) as (db, producer):
            spec = every("late", misfire=misfire, misfire_limit=limit)
            row = await store.insert(db, spec)
            assert row is not None
            assert await store.advance(db, "late", row.revision, now - timedelta(seconds=30))
            leader = ScheduleLeader(settings=settings, db=db, producer=producer, specs={})
            assert await leader.materialise_once(pass_at) == len(expected)
            assert await leader.materialise_once(pass_at) == 0  # the watermark moved
            await wait_until(lambda: len(command_handlers.STARTS) >= len(expected), limit=10)
            await trio.sleep(0.5)

    trio.run(main)
    assert sorted(started_keys(database)) == sorted(occurrence_key("late", at) for at in expected)


def test_delete_cancels_the_materialised_future_occurrences(
    make_settings: Any, topics: Names, database: str
) -> None:
    async def main() -> None:
        settings = settings_for(make_settings, lookahead="5s")
        async with roles(settings, ["consumer", "executor"]) as (db, _):
            await store.insert(db, every("doomed"))

            def materialised() -> bool:
                return sum(s == "scheduled" for _, _, s in keys_by_event(database).values()) >= 4

            await wait_until(materialised, limit=10)
            deleted = await trio.to_thread.run_sync(ops.delete_schedule, settings, "doomed")
            deleted_at = datetime.now(UTC)
            due = {k: at for k, at, _ in keys_by_event(database).values() if at > deleted_at}
            assert len(due) >= 3 and len(deleted.cancelled) >= 3
            # Every occurrence due after the delete gets a cancel on the log (a leader pass
            # in flight may have published beyond the deleted watermark: it cancels those
            # itself). The consumer applies each after its event, a moment later.
            await wait_until(lambda: cancels_applied(database, due).keys() == due.keys(), limit=10)
            applied = cancels_applied(database, due)
            # A cancel applied before its event's claim (up to CLAIM_AHEAD before the due
            # time) stops it; an occurrence due before its cancel was applied may still run
            # (docs/schedules.md), which happens when one falls due just after the delete.
            ahead = timedelta(seconds=CLAIM_AHEAD + 0.001)
            future = {k for k, at in due.items() if applied[k] < at - ahead}
            assert len(future) >= 2, (due, applied)

            def cancelled() -> bool:
                by_key = {k: s for k, _, s in keys_by_event(database).values()}
                return all(by_key[k] == "cancelled" for k in future)

            await wait_until(cancelled, limit=10)
            assert await store.get(db, "doomed") is None
            last = max(at for _, at, _ in keys_by_event(database).values())
            await trio.sleep(last.timestamp() - time.time() + 0.5)
            ran = set(started_keys(database))
            final = list(keys_by_event(database).values())
            assert ran  # the ones due before the delete ran
            # None of those the delete's cancels reached in time ran; those that ran were
            # due before the delete or before their cancel was applied.
            assert not ran & future
            assert ran <= {k for k, at, _ in final if at <= deleted_at} | (due.keys() - future)
            # What did not run was cancelled (an occurrence materialised after the delete
            # would have no cancel: it would run, failing the line above, or stay scheduled).
            assert all(status == "cancelled" for k, _, status in final if k not in ran)

    trio.run(main)


def test_a_schedule_deleted_during_a_pass_cancels_what_the_pass_published(
    make_settings: Any, topics: Names, kafka_bootstrap: str
) -> None:
    """The leader read the schedule, the delete ran (its watermark said nothing was
    materialised), then the pass published: the pass notices when it cannot move the
    watermark and sends a cancel for each future occurrence it published."""
    now = whole_second() + timedelta(milliseconds=500)

    async def main() -> None:
        settings = settings_for(make_settings, enabled=False, lookahead="3s")
        async with roles(settings, []) as (db, producer):
            await store.insert(db, every("racing"))
            (row,) = await store.list_schedules(db)
            assert await store.delete(db, "racing") is not None
            leader = ScheduleLeader(settings=settings, db=db, producer=producer, specs={})
            assert await leader._materialise(row, now) == 3

    trio.run(main)
    records = read_topic(kafka_bootstrap, topics.topic)
    values = [json.loads(r.value or b"{}") for r in records]
    published = sorted(v["idempotency_key"] for v in values if "op" not in v)
    cancelled = sorted(v["idempotency_key"] for v in values if v.get("op") == "cancel")
    assert (
        published
        == cancelled
        == [occurrence_key("racing", now + timedelta(seconds=s)) for s in (0.5, 1.5, 2.5)]
    )
