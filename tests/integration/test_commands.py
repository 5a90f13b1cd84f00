"""Commands on events (cancel, reschedule, retry) applied by the consumer, end to end.

Real PostgreSQL, Redis and broker. The consumer and the executor run in this process
(``tests.support.ingest.running``), except in the race test, where two executor processes
run beside an in-process consumer. What is counted is handler invocations (the ``scripted``
handler of :mod:`tests.support.command_handlers` records each start with its time), not
only rows: a ``succeeded`` row does not prove that a handler ran once, nor a ``cancelled``
one that it never ran.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio_asyncio

from eventsched import Client
from eventsched.core.domain.commands import Command, command_headers, encode_command, new_command
from eventsched.core.domain.event import Event
from eventsched.core.domain.wire import new_event
from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime import metrics
from eventsched.core.runtime.settings import Settings
from eventsched.core.store import executions, migrations, recovery
from eventsched.core.store.commands import CommandRow, apply_commands
from eventsched.core.store.executions import Claimed, ClaimRequest, Outcome
from eventsched.core.store.pool import Database
from eventsched.core.store.recovery import Candidate
from eventsched.plugins.executor.attempt import CLAIM_AHEAD
from tests.support import command_handlers
from tests.support.clients import delete_queue_keys, query
from tests.support.eventkeys import EVENT_RETAIN_FROM, REGISTER_KEYS
from tests.support.exec_handlers import read_journal
from tests.support.execution import (
    executor_env,
    insert_events,
    new_events,
    running_executor,
    saq_score,
)
from tests.support.ingest import RawMessage, event_message, produce, running
from tests.support.proc import AppProcess
from tests.support.servers import Names
from tests.support.waiting import wait_until

HANDLER = "tests.support.command_handlers:scripted"
FAST_RETRY = {"base": "100ms", "factor": 2.0, "max": "1s", "jitter": 0.0}
#: The executor's claim-ahead window (and 1 ms for clock rounding): an attempt may be
#: claimed this much before its due time (its handler starts at the due time, never before).
AHEAD = CLAIM_AHEAD + 0.001


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return names


@pytest.fixture(autouse=True)
def _clean(redis_url: str, names: Names) -> Iterator[None]:
    command_handlers.reset()
    yield
    delete_queue_keys(redis_url, names.queue)


def settings_for(make_settings: Any, **executor: Any) -> Settings:
    return make_settings(  # type: ignore[no-any-return]
        executor={"concurrency": 8, "max_retries": 3, "retry_backoff": FAST_RETRY, **executor},
        handlers={"default": HANDLER},
        reconciler={"enabled": False},
    )


def ev(due_in: float, key: str, **payload: Any) -> Event:
    due = datetime.now(UTC) + timedelta(seconds=due_in)
    return new_event("cmd.test", payload, due, idempotency_key=key)


def moved_to(redis_url: str, queue: str, key: str, due: float) -> bool:
    """The job ``key`` waits in SAQ's schedule at ``due`` (epoch seconds, to the ms)."""
    score = saq_score(redis_url, queue, key)
    return score is not None and abs(score - due) <= 0.001


def at_ms(unix_ms: int) -> datetime:
    """The aware UTC datetime of a whole number of Unix milliseconds (no float rounding)."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=unix_ms)


def cmd(op: Any, *, key: str | None = None, event_id: Any = None, at: Any = None) -> Command:
    return new_command(op, idempotency_key=key, event_id=event_id, execute_at=at, requested_by="t")


def message(command: Command) -> RawMessage:
    return RawMessage(encode_command(command), command.kafka_key, command_headers(), 0)


def tombstone(key: str) -> RawMessage:
    return RawMessage(None, key.encode(), None, 0)


async def send(kafka: str, topic: str, messages: list[RawMessage]) -> None:
    await trio.to_thread.run_sync(produce, kafka, topic, messages)


def commands(dsn: str) -> dict[str, dict[str, Any]]:
    """event_commands by command id."""
    rows = query(
        dsn,
        "SELECT command_id::text, op, event_id::text, idempotency_key, result, status_before,"
        " detail, extract(epoch FROM applied_at)::float8, requested_by, kafka_offset"
        " FROM event_commands",
    )
    names = ("op", "event_id", "key", "result", "before", "detail", "applied_at", "by", "offset")
    return {row[0]: dict(zip(names, row[1:], strict=True)) for row in rows}


def event_row(dsn: str, event_id: Any) -> dict[str, Any]:
    ((row),) = query(
        dsn,
        "SELECT status, attempts, attempt_base, extract(epoch FROM execute_at)::float8,"
        " extract(epoch FROM next_attempt_at)::float8, finished_at IS NOT NULL,"
        " cancel_requested_at IS NOT NULL, dead_reason FROM events WHERE id = %s",
        [str(event_id)],
    )
    names = ("status", "attempts", "base", "execute_at", "next_at", "finished", "requested", "dr")
    return dict(zip(names, row, strict=True))


def status(dsn: str, event: Event) -> str | None:
    """The event's status (None while the consumer has not stored it)."""
    rows = query(dsn, "SELECT status FROM events WHERE id = %s", [str(event.id)])
    return str(rows[0][0]) if rows else None


def starts(event: Event) -> list[tuple[int, float]]:
    """(attempt, start time) of every invocation of the event's handler, in order."""
    return [(a, t) for i, a, t in command_handlers.STARTS if i == str(event.id)]


def attempts_of(dsn: str, event: Event) -> list[tuple[int, str | None, float, float]]:
    """(attempt, outcome, scheduled_for, started_at) of the event's attempt rows."""
    return query(  # type: ignore[no-any-return]
        dsn,
        "SELECT attempt, outcome, extract(epoch FROM scheduled_for)::float8,"
        " extract(epoch FROM started_at)::float8 FROM event_attempts WHERE event_id = %s"
        " ORDER BY attempt",
        [str(event.id)],
    )


def counted(op: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "eventsched_commands_total", {"op": op, "result": result}
    )
    return value or 0.0


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_before_due_never_runs_and_every_cancel_is_recorded(
    make_settings: Any, topics: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> None:
    settings = settings_for(make_settings)
    d = ev(0.0, "d")  # scheduled and cancelled in one batch, due at once: never runs
    e = ev(0.0, "e")  # its cancel comes BEFORE its schedule in the log: unknown, it runs
    b = ev(0.0, "b")  # finished before its cancel: not applicable
    cancel_e, cancel_d = cmd("cancel", key="e"), cmd("cancel", key="d")
    # Sent before the consumer starts, so that they arrive as one batch.
    await send(kafka_bootstrap, topics.topic, [
        message(cancel_e), event_message(e, 0), event_message(d, 0), message(cancel_d),
        event_message(b, 0),
    ])  # fmt: skip
    repeated_before = counted("cancel", "repeated")
    cancel_a, cancel_b = cmd("cancel", key="a"), cmd("cancel", event_id=b.id)
    unknown = cmd("cancel", key="no-such-key")
    async with running(settings, ["consumer", "executor"]):
        await wait_until(lambda: {status(database, b), status(database, e)} == {"succeeded"})
        a = ev(3.0, "a")  # cancelled by a command delivered twice
        c = ev(3.0, "c")  # cancelled by a tombstone
        await send(kafka_bootstrap, topics.topic, [event_message(a, 0), event_message(c, 0)])
        await wait_until(lambda: {status(database, a), status(database, c)} == {"scheduled"})
        await send(kafka_bootstrap, topics.topic, [
            message(cancel_a), message(cancel_a), tombstone("c"), message(unknown),
            message(cancel_b),
        ])  # fmt: skip
        await wait_until(lambda: len(commands(database)) == 6)
        await wait_until(lambda: counted("cancel", "repeated") > repeated_before)
        for cancelled in (a, c, d):
            row = event_row(database, cancelled.id)
            assert (row["status"], row["finished"], row["attempts"]) == ("cancelled", True, 0)
            assert saq_score(redis_url, topics.queue, str(cancelled.id)) is None
        # Past the due times: the cancelled events stayed cancelled and never ran.
        await trio.sleep(max(0.0, a.execute_at.timestamp() - time.time()) + 1.0)

    assert {str(x.id): len(starts(x)) for x in (a, b, c, d, e)} == {
        str(a.id): 0, str(b.id): 1, str(c.id): 0, str(d.id): 0, str(e.id): 1,
    }  # fmt: skip
    assert {status(database, x) for x in (a, c, d)} == {"cancelled"}
    rows = commands(database)
    assert (rows[str(cancel_a.command_id)]["result"], rows[str(cancel_a.command_id)]["before"]) == (
        "applied",
        "scheduled",
    )
    assert rows[str(cancel_d.command_id)]["result"] == "applied"
    assert rows[str(cancel_e.command_id)]["result"] == "unknown_event"
    assert rows[str(cancel_e.command_id)]["event_id"] is None
    assert rows[str(unknown.command_id)]["result"] == "unknown_event"
    assert rows[str(unknown.command_id)]["key"] == "no-such-key"
    assert rows[str(cancel_b.command_id)]["result"] == "not_applicable"
    assert rows[str(cancel_b.command_id)]["before"] == "succeeded"
    (by_tombstone,) = [r for r in rows.values() if r["by"] == "kafka-tombstone"]
    assert (by_tombstone["event_id"], by_tombstone["result"]) == (str(c.id), "applied")
    assert status(database, b) == "succeeded"


async def test_cancel_while_running_lets_the_attempt_finish_and_no_retry_follows(
    make_settings: Any, topics: Names, database: str, kafka_bootstrap: str
) -> None:
    settings = settings_for(make_settings, max_retries=3)
    fails = ev(0.0, "fails", sleep=1.5, fail_until=99)
    succeeds = ev(0.0, "succeeds", sleep=1.5)
    await send(kafka_bootstrap, topics.topic, [event_message(fails, 0), event_message(succeeds, 0)])
    async with running(settings, ["consumer", "executor"]):
        await wait_until(lambda: bool(starts(fails)) and bool(starts(succeeds)))
        cancels = [cmd("cancel", key="fails"), cmd("cancel", key="succeeds")]
        await send(kafka_bootstrap, topics.topic, [message(c) for c in cancels])
        await wait_until(
            lambda: (
                {status(database, fails), status(database, succeeds)} == {"cancelled", "succeeded"}
            )
        )
        await trio.sleep(1.0)  # a retry would come after 100 ms

    assert [r["result"] for r in commands(database).values()] == ["cancel_requested"] * 2
    failed = event_row(database, fails.id)
    assert (failed["status"], failed["attempts"], failed["finished"], failed["dr"]) == (
        "cancelled",
        1,
        True,
        None,
    )
    assert [(n, outcome) for n, outcome, _, _ in attempts_of(database, fails)] == [(1, "cancelled")]
    assert [n for n, _ in starts(fails)] == [1]
    assert [n for n, _ in starts(succeeds)] == [1]
    assert [(n, outcome) for n, outcome, _, _ in attempts_of(database, succeeds)] == [
        (1, "succeeded")
    ]


async def test_a_job_that_outlived_its_cancelled_event_runs_nothing(
    make_settings: Any, database: str, redis_url: str, dlq_topic: Names
) -> None:
    # A job a worker had already taken when the cancel removed the others: its claim loses.
    settings = settings_for(make_settings)
    (event,) = new_events(1, due=time.time())
    insert_events(database, [event], status="cancelled", finished_at=datetime.now(UTC))
    async with running_executor(settings) as harness:
        assert await harness.enqueue([event]) == 1
        await wait_until(lambda: saq_score(redis_url, dlq_topic.queue, event.id) is None)
        await trio.sleep(0.5)
    assert command_handlers.STARTS == []
    assert query(database, "SELECT count(*) FROM event_attempts") == [(0,)]
    assert event_row(database, event.id)["status"] == "cancelled"


def test_an_outcome_after_a_cancel_request_ends_cancelled_even_when_resent(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        ids = [str(uuid.uuid4()) for _ in range(3)]
        for event_id, requested in zip(ids, (True, True, False), strict=True):
            conn.execute(
                "INSERT INTO events (id, idempotency_key, type, payload, execute_at, status,"
                " attempts, created_at, cancel_requested_at) VALUES (%s, %s, 't', '{}', now(),"
                " 'running', 1, now(), CASE WHEN %s THEN now() END)",
                [event_id, event_id, requested],
            )
            conn.execute(REGISTER_KEYS)
            conn.execute(
                "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
                " lateness_ms, worker_id, event_retain_from)"
                f" VALUES (%s, 1, now(), now(), 0, 'w', {EVENT_RETAIN_FROM})",
                [event_id, event_id],
            )
        now = time.time()
        outcomes = [
            Outcome(ids[0], 1, "retrying", "boom", now, next_attempt_at=now + 1),
            Outcome(ids[1], 1, "succeeded", None, now),
            Outcome(ids[2], 1, "dead", "boom", now, dead_reason="retries_exhausted"),
        ]
        assert executions.finish_outcomes(conn, outcomes) == ["cancelled", "succeeded", "dead"]
        # Re-sent after a lost answer: recognised as recorded.
        assert executions.finish_outcomes(conn, outcomes[:1]) == ["cancelled"]
        assert executions.finish_batch(conn, outcomes[:1]) == [True]
        rows = dict(conn.execute(
            "SELECT event_id::text, outcome FROM event_attempts WHERE event_id = ANY(%s::uuid[])",
            [ids],
        ).fetchall())  # fmt: skip
    assert rows == {ids[0]: "cancelled", ids[1]: "succeeded", ids[2]: "dead"}
    assert event_row(database, ids[0])["next_at"] is None


async def test_the_reconciler_takeover_of_a_stale_attempt_honours_a_cancel_request(
    database: str,
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        ids = [str(uuid.uuid4()) for _ in range(2)]
        for event_id, requested in zip(ids, (True, False), strict=True):
            conn.execute(
                "INSERT INTO events (id, idempotency_key, type, payload, execute_at, status,"
                " attempts, created_at, updated_at, cancel_requested_at) VALUES (%s, %s, 't',"
                " '{}', now(), 'running', 1, now(), now() - interval '1 hour',"
                " CASE WHEN %s THEN now() END)",
                [event_id, event_id, requested],
            )
            conn.execute(REGISTER_KEYS)
            conn.execute(
                "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
                " lateness_ms, worker_id, event_retain_from)"
                f" VALUES (%s, 1, now(), now(), 0, 'w', {EVENT_RETAIN_FROM})",
                [event_id, event_id],
            )
        seen = dict(
            conn.execute(
                "SELECT id::text, updated_at FROM events WHERE id = ANY(%s::uuid[])", [ids]
            ).fetchall()
        )
    async with trio_asyncio.open_loop():
        db = await Database.open(database)
        try:
            taken = await recovery.take_over(
                db,
                [Candidate(i, 1, seen[i]) for i in ids],
                stale_after=60,
                max_attempts=3,
                error="worker lost",
            )
        finally:
            await db.close()
    assert {t.event_id: t.status for t in taken} == {ids[0]: "cancelled", ids[1]: "retrying"}
    assert event_row(database, ids[0])["finished"] is True
    ((outcome,),) = query(
        database, "SELECT outcome FROM event_attempts WHERE event_id = %s", [ids[0]]
    )
    assert outcome == "cancelled"


async def test_a_cancel_between_the_claim_and_the_due_time_lets_the_attempt_run(
    database: str,
) -> None:
    """The executor claims an attempt up to the claim-ahead window (40 ms) before its due
    time and starts the handler at the due time. A cancel applied in between finds the event
    `running`: `cancel_requested`, and the attempt is not stopped (a success stays
    `succeeded`; a failure would end `cancelled`), as for a cancel while the handler runs."""
    (event,) = new_events(1, due=time.time() + 1.0)
    insert_events(database, [event])
    with psycopg.connect(database, autocommit=True) as conn:
        request = ClaimRequest(event.id, 0, event.execute_at - 0.005)  # inside the window
        (claim,) = executions.claim_batch(conn, [request], worker_id="w", ahead=AHEAD - 0.001)
    assert isinstance(claim, Claimed)
    async with trio_asyncio.open_loop():
        db = await Database.open(database)
        try:
            (applied,) = await apply_commands(db, [CommandRow(cmd("cancel", event_id=event.id))])
        finally:
            await db.close()
    assert time.time() < event.execute_at, "too slow: the cancel came after the due time"
    assert (applied.result, applied.status) == ("cancel_requested", "running")
    with psycopg.connect(database, autocommit=True) as conn:
        done = Outcome(event.id, 1, "succeeded", None, time.time(), started=event.execute_at)
        assert executions.finish_outcomes(conn, [done]) == ["succeeded"]


# -- reschedule ----------------------------------------------------------------------------


async def test_reschedule_earlier_and_later_runs_once_at_the_new_time_never_the_old(
    make_settings: Any, topics: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> None:
    settings = settings_for(make_settings)
    done = ev(0.0, "done")
    await send(kafka_bootstrap, topics.topic, [event_message(done, 0)])
    async with running(settings, ["consumer", "executor"]):
        await wait_until(lambda: status(database, done) == "succeeded")
        earlier = ev(5.0, "earlier")
        later = ev(2.0, "later")
        stale = ev(2.0, "stale")  # moved in PostgreSQL only: its job stays at the old time
        await send(kafka_bootstrap, topics.topic, [
            event_message(x, 0) for x in (earlier, later, stale)
        ])  # fmt: skip
        await wait_until(
            lambda: {status(database, x) for x in (earlier, later, stale)} == {"scheduled"}
        )
        # Whole milliseconds: due times are kept to the millisecond (rounded up), so a float
        # of seconds could land 1 ms away from what PostgreSQL holds.
        now_ms = time.time_ns() // 1_000_000
        new_ms = {"earlier": now_ms + 1500, "later": now_ms + 4000, "stale": now_ms + 4000}
        new = {key: ms / 1000 for key, ms in new_ms.items()}
        moves = [
            cmd("reschedule", key="earlier", at=at_ms(new_ms["earlier"])),
            cmd("reschedule", event_id=later.id, at=at_ms(new_ms["later"])),
            cmd("reschedule", key="done", at=at_ms(now_ms + 5000)),
        ]
        await send(kafka_bootstrap, topics.topic, [message(m) for m in moves])
        query(
            database,
            "UPDATE events SET execute_at = to_timestamp(%s) WHERE id = %s RETURNING id",
            [new["stale"], str(stale.id)],
        )
        await wait_until(lambda: len(commands(database)) == 3)
        # The jobs move in Redis right after the commands' PostgreSQL transaction.
        await wait_until(
            lambda: (
                moved_to(redis_url, topics.queue, str(earlier.id), new["earlier"])
                and moved_to(redis_url, topics.queue, str(later.id), new["later"])
            ),
            limit=5,
        )
        await wait_until(
            lambda: {status(database, x) for x in (earlier, later, stale)} == {"succeeded"},
            limit=15,
        )

    for event, key in ((earlier, "earlier"), (later, "later"), (stale, "stale")):
        due = new[key]
        ((_, started),) = starts(event)
        assert started >= due, (key, started - due)
        ((n, outcome, scheduled_for, started_at),) = attempts_of(database, event)
        assert (n, outcome) == (1, "succeeded")
        assert scheduled_for == pytest.approx(due, abs=0.001)  # lateness from the new time
        assert -0.001 <= (started_at - due) * 1000 < 2000  # to_timestamp keeps µs
        assert event_row(database, event.id)["execute_at"] == pytest.approx(due, abs=0.001)
    results = {r["key"] or r["event_id"]: r["result"] for r in commands(database).values()}
    assert results == {"earlier": "applied", str(later.id): "applied", "done": "refused"}
    assert len(starts(done)) == 1


async def test_commands_on_a_retrying_event_act_on_its_next_attempt(
    make_settings: Any, topics: Names, database: str, redis_url: str, kafka_bootstrap: str
) -> None:
    settings = make_settings(
        executor={"concurrency": 4, "max_retries": 3,
                  "retry_backoff": {"base": "4s", "factor": 1.0, "max": "4s", "jitter": 0.0}},
        handlers={"default": HANDLER}, reconciler={"enabled": False},
    )  # fmt: skip
    sooner = ev(0.0, "sooner", fail_until=2)  # attempt 2 moved from +4 s to +1 s
    never = ev(0.0, "never", fail_until=2)  # cancelled while it waits for attempt 2
    await send(kafka_bootstrap, topics.topic, [event_message(x, 0) for x in (sooner, never)])
    async with running(settings, ["consumer", "executor"]):
        await wait_until(
            lambda: {status(database, sooner), status(database, never)} == {"retrying"}
        )
        retry_keys = [f"{x.id}#2" for x in (sooner, never)]
        assert all(saq_score(redis_url, topics.queue, key) for key in retry_keys)
        due_ms = time.time_ns() // 1_000_000 + 1000
        due = due_ms / 1000
        await send(kafka_bootstrap, topics.topic, [
            message(cmd("reschedule", key="sooner", at=at_ms(due_ms))),
            message(cmd("cancel", key="never")),
        ])  # fmt: skip
        await wait_until(lambda: len(commands(database)) == 2)
        # The jobs move in Redis right after the commands' PostgreSQL transaction.
        await wait_until(
            lambda: (
                moved_to(redis_url, topics.queue, retry_keys[0], due)
                and saq_score(redis_url, topics.queue, retry_keys[1]) is None
            ),
            limit=5,
        )
        await wait_until(lambda: status(database, sooner) == "succeeded")
        assert time.time() < due + 2.5  # well before the old retry time
        await trio.sleep(max(0.0, due + 3.5 - time.time()))  # past the old retry time

    assert [n for n, _ in starts(sooner)] == [1, 2]
    ((_, second),) = [(n, t) for n, t in starts(sooner) if n == 2]
    assert second >= due
    assert attempts_of(database, sooner)[1][2] == pytest.approx(due, abs=0.001)
    assert [n for n, _ in starts(never)] == [1]
    row = event_row(database, never.id)
    assert (row["status"], row["attempts"], row["finished"]) == ("cancelled", 1, True)
    assert {r["result"] for r in commands(database).values()} == {"applied"}


# -- retry ---------------------------------------------------------------------------------


async def test_retry_reruns_dead_and_cancelled_events_once_and_refuses_others(
    make_settings: Any, topics: Names, database: str, kafka_bootstrap: str
) -> None:
    settings = settings_for(make_settings, max_retries=2)
    first = ev(0.0, "first", fail_until=3)  # dead after attempts 1 and 2, attempt 3 succeeds
    second = ev(0.0, "second", fail_until=3)
    waiting = ev(60.0, "waiting")  # scheduled: a retry is refused
    stopped = ev(30.0, "stopped")  # cancelled before it ran, then retried: runs once
    await send(kafka_bootstrap, topics.topic, [
        event_message(x, 0) for x in (first, second, waiting, stopped)
    ])  # fmt: skip
    async with running(settings, ["consumer", "executor"]):
        await wait_until(lambda: {status(database, first), status(database, second)} == {"dead"})
        await send(kafka_bootstrap, topics.topic, [message(cmd("cancel", key="stopped"))])
        await wait_until(lambda: status(database, stopped) == "cancelled")

        def retry_all() -> None:
            with Client.from_settings(settings, requested_by="operator") as client:
                client.retry("first")
                client.retry(uuid.UUID(str(second.id)))
                client.retry("waiting")
                client.retry("stopped", at=datetime.now(UTC) + timedelta(seconds=1))

        await trio.to_thread.run_sync(retry_all)
        await wait_until(
            lambda: {status(database, x) for x in (first, second, stopped)} == {"succeeded"},
            limit=15,
        )
        await trio.sleep(0.5)

    for event in (first, second):
        assert [n for n, _ in starts(event)] == [1, 2, 3]
        row = event_row(database, event.id)
        assert (row["attempts"], row["base"], row["dr"]) == (3, 2, None)
        assert [o for _, o, _, _ in attempts_of(database, event)] == [
            "retried",
            "dead",
            "succeeded",
        ]
    assert [n for n, _ in starts(stopped)] == [1]
    assert starts(waiting) == []
    assert status(database, waiting) == "scheduled"
    results = {
        (r["key"] or r["event_id"], r["op"]): (r["result"], r["by"])
        for r in commands(database).values()
    }
    assert results == {
        ("first", "retry"): ("applied", "operator"),
        (str(second.id), "retry"): ("applied", "operator"),
        ("waiting", "retry"): ("refused", "operator"),
        ("stopped", "retry"): ("applied", "operator"),
        ("stopped", "cancel"): ("applied", "t"),
    }


# -- the schema ----------------------------------------------------------------------------


def test_migration_5_down_keeps_cancelled_events_as_dead_ones(database: str) -> None:
    event_id = str(uuid.uuid4())
    query(
        database,
        "INSERT INTO events (id, idempotency_key, type, payload, execute_at, status,"
        " finished_at, created_at) VALUES (%s, %s, 't', '{}', now(), 'cancelled', now(), now())"
        " RETURNING id",
        [event_id, event_id],
    )
    # Down to version 4, through every later migration (they come after 5).
    later = [m.version for m in migrations.list_migrations(migrations.default_sql_dir())]
    later = [v for v in later if v >= 5]
    reverted = migrations.down(database, migrations.default_sql_dir(), len(later))
    assert reverted == sorted(later, reverse=True)
    ((row),) = query(
        database,
        "SELECT status, dead_reason, dlq_published_at IS NOT NULL FROM events WHERE id = %s",
        [event_id],
    )
    assert row == ("dead", "cancelled", True)
    assert migrations.up(database, migrations.default_sql_dir()) == later


# -- the race ------------------------------------------------------------------------------

# 500 events due over 4 s: the same density (125 a second) as 1,000 over 8 s, so each
# event's cancel races its due time under the same load. Two runs: ~370 cancels applied and
# ~130 too late (not_applicable or cancel_requested), far above the test's thresholds.
RACE_EVENTS = 500


def test_cancels_racing_due_times_never_let_a_cancelled_event_run(
    make_settings: Any,
    topics: Names,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    names: Names,
    tmp_path: Path,
) -> None:
    """Two executor processes; 500 events due 2-6 s ahead, each cancelled at a random
    time from well before to just after its due time. Every event either never ran and its
    cancel says ``applied``, or ran exactly once and its cancel was too late
    (``not_applicable``, or ``cancel_requested`` while it ran); no run starts after its
    event's cancel was applied."""
    journal_path = str(tmp_path / "journal")
    env = executor_env(
        names, database, redis_url, kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT=HANDLER, EVENTSCHED_EXECUTOR__CONCURRENCY="20",
        EVENTSCHED_RECONCILER__ENABLED="false", TEST_HANDLER_JOURNAL=journal_path,
    )  # fmt: skip
    rng = random.Random(7)
    events: list[Event] = []
    executors = [AppProcess(["run", "--role", "executor", "--port", "0"], env=env)]
    executors.append(AppProcess(["run", "--role", "executor", "--port", "0"], env=env))
    try:
        for app in executors:
            app.wait_event("role_ready", timeout=30)
        settings = make_settings(reconciler={"enabled": False})
        trio.run(race, settings, events, database, kafka_bootstrap, topics.topic, rng)
    finally:
        for app in executors:
            app.stop()

    journal = read_journal(journal_path)
    runs: dict[str, list[float]] = {}
    for line in journal:
        runs.setdefault(str(line["event"]), []).append(float(str(line["t"])))
    rows = {r["event_id"]: r for r in commands(database).values()}
    final = dict(query(database, "SELECT id::text, status FROM events"))
    claims = dict(
        query(database, "SELECT event_id::text, extract(epoch FROM claimed_at) FROM event_attempts")
    )
    outcomes: dict[str, int] = {}
    in_window = 0
    for event in events:
        event_id = str(event.id)
        row = rows[event_id]
        started = runs.get(event_id, [])
        outcomes[row["result"]] = outcomes.get(row["result"], 0) + 1
        if row["result"] == "applied":
            assert started == [], (event_id, row, started)
            assert final[event_id] == "cancelled"
        else:
            assert row["result"] in ("not_applicable", "cancel_requested"), row
            assert len(started) == 1, (event_id, row, started)
            # It was claimed before the cancel came (not_applicable: its whole run), at most
            # AHEAD before its due time; its handler started at the due time, never before.
            began = claims[event_id] if row["result"] == "cancel_requested" else started[0]
            assert began <= row["applied_at"], (event_id, row, started)
            assert float(claims[event_id]) >= event.execute_at.timestamp() - AHEAD
            assert started[0] >= event.execute_at.timestamp()
            assert final[event_id] == "succeeded"
            if row["applied_at"] < event.execute_at.timestamp():
                in_window += 1  # a cancel between the claim and the due time: it ran
    print("race outcomes:", outcomes, "cancels between claim and due:", in_window)
    # The race went both ways.
    assert outcomes.get("applied", 0) > 100 and outcomes.get("not_applicable", 0) > 10, outcomes


async def race(
    settings: Settings,
    events: list[Event],
    database: str,
    kafka: str,
    topic: str,
    rng: random.Random,
) -> None:
    """Run the consumer; once it has its partition, schedule RACE_EVENTS events (into
    ``events``) due 2-6 s ahead and send their cancels from 1.5 s before to 0.3 s after
    each due time; return when every command is applied and every event is finished."""
    async with running(settings, ["consumer"]):
        warm_up = ev(0.0, "race-warm-up")
        await send(kafka, topic, [event_message(warm_up, 0)])
        await wait_until(lambda: status(database, warm_up) is not None)
        start = time.time()
        events += [
            new_event(
                "race",
                {"sleep": 0.05},
                datetime.fromtimestamp(start + 2.0 + 4.0 * rng.random(), UTC),
                idempotency_key=f"race-{i}",
            )
            for i in range(RACE_EVENTS)
        ]
        plan = sorted(
            (e.execute_at.timestamp() + rng.uniform(-1.5, 0.3), i) for i, e in enumerate(events)
        )
        await send(kafka, topic, [event_message(e, 0) for e in events])

        def send_cancels() -> None:
            # Those due within 20 ms of each other go together (one producer per call).
            pending = list(plan)
            while pending:
                delay = pending[0][0] - time.time()
                if delay > 0:
                    time.sleep(delay)
                now = time.time() + 0.02
                due = [i for at, i in pending if at <= now]
                del pending[: len(due)]
                produce(kafka, topic, [message(cmd("cancel", key=f"race-{i}")) for i in due])

        sender = threading.Thread(target=send_cancels, daemon=True)
        sender.start()
        await wait_until(lambda: len(commands(database)) >= RACE_EVENTS, limit=40)
        unfinished = "SELECT count(*) FROM events WHERE status NOT IN ('succeeded', 'cancelled')"
        await wait_until(lambda: query(database, unfinished)[0][0] == 0, limit=20)
        await trio.to_thread.run_sync(sender.join)
