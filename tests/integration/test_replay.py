"""``dlq replay`` of the executor's dead letters re-runs the event, once, with a fresh budget.

A real executor (in this process) runs events into the DLQ; the replay then runs as the CLI
runs it (:func:`eventsched.core.operations.dlq.dlq_replay`, in a thread of its own) against the
same PostgreSQL, Redis and broker. Handler calls are counted, not only rows.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio_asyncio

from eventsched.core.domain.deadletter import dlq_headers
from eventsched.core.domain.wire import kafka_headers
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations import dlq
from eventsched.core.runtime.settings import Settings
from eventsched.core.store import recovery
from eventsched.core.store.pool import Database
from eventsched.plugins.executor.retry import Failure, decide
from tests.support import replay_handlers
from tests.support.clients import query, read_topic
from tests.support.execution import (
    attempt_rows,
    insert_events,
    new_events,
    running_executor,
    saq_score,
)
from tests.support.ingest import RawMessage, produce
from tests.support.servers import Names
from tests.support.waiting import wait_until

HANDLERS = "tests.support.replay_handlers"
FAST_RETRY = {"base": "100ms", "factor": 2.0, "max": "1s", "jitter": 0.0}

pytestmark = pytest.mark.usefixtures("executor_state")


@pytest.fixture(autouse=True)
def _calls() -> None:
    replay_handlers.CALLS.clear()


def calls() -> list[tuple[str, int]]:
    """(event id, attempt) of every handler call so far."""
    return list(replay_handlers.CALLS)


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return names


def settings_for(make_settings: Any, handler: str, max_retries: int) -> Settings:
    return make_settings(  # type: ignore[no-any-return]
        executor={"concurrency": 4, "max_retries": max_retries, "retry_backoff": FAST_RETRY},
        handlers={"default": f"{HANDLERS}:{handler}"},
        reconciler={"enabled": False},
    )


async def replay(settings: Settings, *args: str, **options: Any) -> str:
    """Run the replay as the CLI does; its summary line without the group."""
    result = await trio.to_thread.run_sync(lambda: dlq.dlq_replay(settings, **options))
    lines = dlq.render_replay(result).splitlines()
    return lines[0].split(" (group")[0] + "".join(f" |{line.strip()}" for line in lines[1:])


def event_state(database: str, event_id: str) -> tuple[str, int]:
    ((status, attempts),) = query(
        database, "SELECT status, attempts FROM events WHERE id = %s", [event_id]
    )
    return status, attempts


def dead_and_published(database: str, event_id: str, attempts: int) -> Any:
    def check() -> bool:
        rows = query(
            database,
            "SELECT 1 FROM events WHERE id = %s AND status = 'dead' AND attempts = %s"
            " AND dlq_published_at IS NOT NULL",
            [event_id, attempts],
        )
        return bool(rows)

    return check


async def test_replaying_a_dead_letter_runs_the_event_again_once_with_a_fresh_budget(
    make_settings: Any, database: str, redis_url: str, kafka_bootstrap: str, topics: Names
) -> None:
    settings = settings_for(make_settings, "fails_before_5", max_retries=3)
    (event,) = new_events(1, due=time.time() - 60)
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with running_executor(settings) as harness:
        await harness.enqueue([event])
        await wait_until(dead_and_published(database, event.id, 3))
        assert calls() == [(event.id, 1), (event.id, 2), (event.id, 3)]

        # The same letter twice in the DLQ (the reconciler may publish a death again).
        (letter,) = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topics.dlq_topic)
        copy = RawMessage(letter.value, letter.key, letter.header_list, 0)
        await trio.to_thread.run_sync(produce, kafka_bootstrap, topics.dlq_topic, [copy])
        assert await replay(settings, dry_run=True) == (
            "would re-run 1, would re-send 0, would skip 1 |1 event is scheduled, not dead"
        )

        replayed_at = time.time()
        summary = await replay(settings)
        # The copy found the event scheduled or already running again.
        assert summary.startswith("re-run 1, re-sent 0, skipped 1 |1 event is "), summary
        # Attempt 4 fails too and is retried (a fresh budget of 3), attempt 5 succeeds.
        await wait_until(lambda: event_state(database, event.id) == ("succeeded", 5))
        assert calls() == [(event.id, n) for n in range(1, 6)]

        # Replayed again: nothing left in the group; a group that sees the letter again
        # (another reason filter) skips it: the event is not dead any more.
        assert await replay(settings) == "re-run 0, re-sent 0, skipped 0"
        assert (
            await replay(settings, reason="retries_exhausted")
            == "re-run 0, re-sent 0, skipped 2 |2 event is succeeded, not dead"
        )
        await trio.sleep(1.0)
    assert calls() == [(event.id, n) for n in range(1, 6)]
    assert event_state(database, event.id) == ("succeeded", 5)
    assert saq_score(redis_url, settings.redis.queue, event.id) is None

    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome) for r in rows] == [
        (1, "retried"), (2, "retried"), (3, "dead"), (4, "retried"), (5, "succeeded"),
    ]  # fmt: skip
    # The re-run was due when it was replayed, not at the event's old due time.
    assert rows[3].scheduled_for == pytest.approx(replayed_at, abs=5)
    assert rows[3].lateness_ms < 5_000
    ((base, reason, published),) = await trio.to_thread.run_sync(
        query,
        database,
        "SELECT attempt_base, dead_reason, dlq_published_at FROM events WHERE id = %s",
        [event.id],
    )
    assert (base, reason, published) == (3, None, None)


async def test_each_letter_re_runs_its_own_death_once_and_decode_errors_are_re_sent(
    make_settings: Any, database: str, kafka_bootstrap: str, topics: Names
) -> None:
    settings = settings_for(make_settings, "always_fails", max_retries=2)
    (event,) = new_events(1, due=time.time() - 1)
    await trio.to_thread.run_sync(insert_events, database, [event])
    # A consumer-side letter (a message that failed to decode) next to the executor's; its
    # producer's own event-id header does not make it an executor letter.
    consumer_letter = RawMessage(
        b"{oops",
        b"k-1",
        dlq_headers(
            reason="invalid_json",
            error="bad",
            source_topic=topics.topic,
            source_partition=0,
            source_offset=7,
            source_timestamp_ms=None,
            consumer_id="c",
            failed_at=_now(),
            original=[*kafka_headers(), ("event-id", b"a header of the producer")],
        ),
        0,
    )
    await trio.to_thread.run_sync(produce, kafka_bootstrap, topics.dlq_topic, [consumer_letter])
    async with running_executor(settings) as harness:
        await harness.enqueue([event])
        await wait_until(dead_and_published(database, event.id, 2))

        assert (
            await replay(settings, dry_run=True) == "would re-run 1, would re-send 1, would skip 0"
        )
        assert event_state(database, event.id) == ("dead", 2)
        assert calls() == [(event.id, 1), (event.id, 2)]

        # A group of its own (--reason) re-runs the first death: attempts 3 and 4.
        assert await replay(settings, reason="retries_exhausted") == (
            "re-run 1, re-sent 0, skipped 1 |1 dlq-reason is not retries_exhausted"
        )
        await wait_until(dead_and_published(database, event.id, 4))
        assert calls() == [(event.id, n) for n in range(1, 5)]
        # ... and goes on with the second death's letter: attempts 5 and 6.
        assert (
            await replay(settings, reason="retries_exhausted") == "re-run 1, re-sent 0, skipped 0"
        )
        await wait_until(dead_and_published(database, event.id, 6))
        assert calls() == [(event.id, n) for n in range(1, 7)]

        # The default group reads every letter: the decode error is re-sent, the first two
        # deaths were re-run already (skipped), the third is re-run: attempts 7 and 8.
        assert await replay(settings) == (
            "re-run 1, re-sent 1, skipped 2"
            " |2 event went dead again after this letter (its newer letter re-runs it)"
        )
        await wait_until(dead_and_published(database, event.id, 8))
    assert calls() == [(event.id, n) for n in range(1, 9)]
    resent = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, topics.topic)
    assert [(m.value, m.key) for m in resent] == [(b"{oops", b"k-1")]


def _now() -> datetime:
    return datetime.now(UTC)


# -- the budget in the executor's decisions ----------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "base", "status", "delay_of"),
    [(3, 0, "dead", None), (4, 3, "retrying", 1), (5, 3, "retrying", 2), (6, 3, "dead", None)],
)
def test_decide_counts_the_budget_from_its_base(
    attempt: int, base: int, status: str, delay_of: int | None
) -> None:
    outcome = decide(
        "e", attempt, Failure("boom"), max_attempts=3, now=100.0, delay=lambda n: n * 10.0,
        base=base,
    )  # fmt: skip
    assert outcome.status == status
    assert outcome.next_attempt_at == (None if delay_of is None else 100.0 + delay_of * 10.0)


async def test_a_lost_re_run_attempt_is_retried_within_its_fresh_budget(database: str) -> None:
    lost, last = new_events(2, due=time.time() - 600)
    seen = datetime.now(UTC) - timedelta(minutes=5)
    await trio.to_thread.run_sync(
        functools.partial(
            insert_events, database, [lost], status="running", attempts=4, attempt_base=3,
            updated_at=seen,
        )
    )  # fmt: skip
    await trio.to_thread.run_sync(
        functools.partial(
            insert_events, database, [last], status="running", attempts=6, attempt_base=3,
            updated_at=seen,
        )
    )  # fmt: skip
    stale = [recovery.Candidate(lost.id, 4, seen), recovery.Candidate(last.id, 6, seen)]
    async with trio_asyncio.open_loop():
        db = await Database.open(database, max_size=1)
        try:
            taken = await recovery.take_over(
                db, stale, stale_after=60, max_attempts=3, error="lost"
            )
        finally:
            await db.close()
    assert sorted((t.event_id, t.status) for t in taken) == sorted(
        [(lost.id, "retrying"), (last.id, "dead")]
    )
