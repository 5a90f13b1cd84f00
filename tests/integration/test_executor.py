"""Specification of the executor: on time, once, retried with backoff, dead-lettered.

Events are inserted straight into PostgreSQL (as the consumer records them) and their first
SAQ job enqueued as the consumer would; the executor runs in this process (or as a child
process where a signal or a kill is the point). Real PostgreSQL, Redis and broker.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import signal
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import trio
import trio_asyncio
from psycopg import sql

from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event, uuid7
from eventsched.core.domain.jobcontract import make_job, saq_timeout
from eventsched.core.jobqueue.budget import payload_bytes
from eventsched.core.runtime.settings import Settings
from eventsched.core.store import executions
from eventsched.core.store.executions import Claimed, ClaimRequest, NotClaimed, Outcome
from eventsched.plugins.executor.attempt import CLAIM_AHEAD
from tests.support import exec_handlers
from tests.support.clients import query, read_topic, status_counts
from tests.support.execution import (
    all_finished,
    attempt_rows,
    executor_env,
    insert_events,
    max_overlap,
    new_events,
    queue_client,
    running_executor,
    saq_job,
    saq_score,
    statuses,
)
from tests.support.metrics import metric_value as counter
from tests.support.proc import AppProcess
from tests.support.servers import Names
from tests.support.waiting import wait_until

HANDLERS = "tests.support.exec_handlers"
FAST_RETRY = {"base": "200ms", "factor": 2.0, "max": "5s", "jitter": 0.0}


pytestmark = pytest.mark.usefixtures("executor_state")


def executor_settings(make_settings: Any, handler: str = "ok", **sections: Any) -> Settings:
    executor = {"concurrency": 20, "max_retries": 3, "retry_backoff": FAST_RETRY}
    executor.update(sections.pop("executor", {}))
    return make_settings(  # type: ignore[no-any-return]
        executor=executor,
        handlers={"default": f"{HANDLERS}:{handler}", **sections.pop("handlers", {})},
        reconciler={"enabled": False, **sections.pop("reconciler", {})},
        **sections,
    )


# -- pure parts ------------------------------------------------------------------------------


def test_saq_timeout_leaves_room_for_our_own_timeout(make_settings: Any) -> None:
    settings = make_settings(executor={"job_timeout": "2.5s"})
    assert saq_timeout(settings) == 3 + 30


# -- the SQL: compare-and-set, idempotent re-sends -----------------------------------------------


def test_claims_and_outcomes_are_compare_and_set_and_safe_to_resend(database: str) -> None:
    first, second, retry = new_events(3, due=time.time() - 1)
    insert_events(database, [first, second])
    insert_events(database, [retry], status="retrying", attempts=1,
                  next_attempt_at=datetime.fromtimestamp(time.time() - 0.5, UTC))  # fmt: skip
    with psycopg.connect(database, autocommit=True) as conn:
        started = time.time()
        requests = [
            ClaimRequest(first.id, 0, started),
            ClaimRequest(second.id, 2, started),  # a retry job, but the event is `scheduled`
            ClaimRequest(retry.id, 2, started),
            ClaimRequest(str(uuid7()), 0, started),  # no such event
        ]
        won, lost, retried, missing = executions.claim_batch(conn, requests, worker_id="w1")
        assert isinstance(won, Claimed) and (won.attempt, won.type) == (1, "test.event")
        assert won.scheduled_for == pytest.approx(first.execute_at)
        assert lost == NotClaimed(second.id, "test.event", "scheduled", 0)
        assert isinstance(retried, Claimed) and retried.attempt == 2
        assert missing == NotClaimed(requests[3].event_id, None, None, None)
        # The answer was lost, the claim is sent again: recognised as ours, not a duplicate.
        assert executions.claim_batch(conn, requests[:1], worker_id="w1") == [won]
        # Another worker (or the same job delivered twice) does not get it.
        (other,) = executions.claim_batch(
            conn, [ClaimRequest(first.id, 0, time.time())], worker_id="w2"
        )
        assert other == NotClaimed(first.id, "test.event", "running", 1)

        done = Outcome(first.id, 1, "succeeded", None, time.time())
        assert executions.finish_batch(
            conn, [done, Outcome(second.id, 1, "succeeded", None, 0)]
        ) == [True, False]
        assert executions.finish_batch(conn, [done]) == [True]  # re-sent: already recorded
        stale = Outcome(retry.id, 1, "succeeded", None, time.time())  # attempt 1 is over
        assert executions.finish_batch(conn, [stale]) == [False]
    rows = {(r.event_id, r.attempt): r for r in attempt_rows(database)}
    assert set(rows) == {(first.id, 1), (retry.id, 2)}
    assert rows[(first.id, 1)].outcome == "succeeded" and rows[(first.id, 1)].worker_id == "w1"
    assert rows[(retry.id, 2)].outcome is None


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _nodes(child))]


def _scans_of(plan: dict[str, Any], relation: str) -> list[dict[str, Any]]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan that read ``relation``, with the index
    scans under its bitmap heap scans."""
    found: list[dict[str, Any]] = []
    for node in _nodes(plan):
        # The log is partitioned (sql/000008): the plan reads partitions, <table>_p<day>.
        if re.fullmatch(rf"{relation}_(p[0-9]{{8}}|default)", node.get("Relation Name", "")):
            found.append(node)
            if node["Node Type"] == "Bitmap Heap Scan":
                found += [n for n in _nodes(node)[1:] if "Index Name" in n]
    return found


#: The only index of `events` whose scan is bounded by the batch, not by the table (a
#: partition's primary key: events_p<day>_pkey).
BOUNDED_INDEX = re.compile(r"events_p[0-9]{8}_pkey")


@pytest.mark.parametrize("which", ["claim", "finish"])
def test_claims_and_outcomes_read_only_the_events_of_their_batch(database: str, which: str) -> None:
    """Every read of `events` must go through its primary key. The planner guesses 100 rows
    for the batch (json_to_recordset) whatever it holds; on a table of a few thousand events
    that once made it scan every scheduled event per claim (bench.pg_statements: 2.3x the
    PostgreSQL CPU at batch 1). And when the partial indexes of scheduled, retrying or
    running events look small in the statistics, it ANDed a scan of all their entries (dead
    ones included) into the lookup: ~7,000 entries read per claimed event in a 1,000/s
    benchmark run.

    And each statement names the partition of its events (a constant range of today's, from
    `event_keys`), so it is pruned at plan time in the generic plan too: only today's
    partition of `events` is planned and read, not the nine the log has (today, seven days
    ahead, the default)."""
    insert_events(database, new_events(3000, due=time.time() - 60), status="succeeded")
    scheduled = new_events(5, due=time.time() - 1)
    insert_events(database, scheduled)
    running = new_events(5, due=time.time() - 1)
    insert_events(database, running, status="running", attempts=1)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")
        conn.execute("ANALYZE event_attempts")
        now = time.time()
        if which == "claim":
            text = executions._CLAIM_SQL.replace("%(req)s", "$1").replace("%(worker)s", "$2")
            text = text.replace("%(ahead)s", "0.01")
            args = [[{"id": scheduled[0].id, "attempt": 0, "claimed": now}], "w1"]
        else:
            text = executions._FINISH_SQL.replace("%(req)s", "$1")
            args = [[{"id": running[0].id, "attempt": 1, "status": "succeeded", "error": None,
                      "finished": now, "next_at": None, "reason": None}]]  # fmt: skip
        today = (datetime.now(UTC).date(),)
        conn.execute(f"PREPARE probe AS {executions._in_days(text, today)}")
        literals = sql.SQL(", ").join(
            sql.Literal(json.dumps(a) if isinstance(a, list) else a) for a in args
        )
        # The custom plan (first executions) and the generic one, which a prepared
        # statement runs from the sixth execution on.
        for mode in ("force_custom_plan", "force_generic_plan"):
            conn.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(mode)))
            query = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE probe({})").format(literals)
            row = conn.execute(query).fetchone()
            assert row is not None
            scans = _scans_of(row[0][0]["Plan"], "events")
            assert scans, row[0]
            for node in scans:
                assert node["Node Type"] != "Seq Scan", (mode, node)
                if "Index Name" in node:
                    assert BOUNDED_INDEX.fullmatch(node["Index Name"]), (mode, node)
            read = {n["Relation Name"] for n in scans if "Relation Name" in n}
            assert read == {f"events_p{today[0]:%Y%m%d}"}, (mode, read)


# -- on time, once -----------------------------------------------------------------------------


async def test_events_run_after_their_due_time_once_each(make_settings: Any, database: str) -> None:
    settings = executor_settings(make_settings)
    start = time.time()
    events = new_events(60, due=lambda i: start + 1.0 + 2.0 * i / 60)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 60
        await wait_until(all_finished(database, 60), limit=15)
        stats = harness.executor.store_stats

    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 60}
    assert sorted(r.event_id for r in rows) == sorted(e.id for e in events)  # one attempt each
    due = {e.id: e.execute_at for e in events}
    for row in rows:
        assert row.attempt == 1 and row.outcome == "succeeded" and row.error is None
        assert row.scheduled_for == pytest.approx(due[row.event_id], abs=1e-6)
        assert row.started_at >= row.scheduled_for  # never early
        assert row.lateness_ms == pytest.approx((row.started_at - row.scheduled_for) * 1000, abs=1)
        assert row.lateness_ms < 500  # on time (loosely: a shared 2-core test box)
        assert row.finished_at is not None and row.finished_at >= row.started_at
    assert sorted(exec_handlers.PER_EVENT.values()) == [1] * 60
    assert stats["claim"][1] >= 60 and stats["finish"][1] >= 60


#: How much earlier than the handler's own first line the recorded start may be: the two are
#: taken on one clock, a call apart (a loaded 2-core box may preempt in between).
START_TOLERANCE = 0.002


async def test_the_attempt_row_records_the_handlers_start_and_the_claim_apart(
    make_settings: Any, database: str
) -> None:
    """``started_at`` and ``lateness_ms`` are the handler's invocation (what its first line
    sees), not the claim: the claim (``claimed_at``) comes first, within the claim-ahead
    window before the due time."""
    settings = executor_settings(make_settings, "observe", executor={"concurrency": 10})
    rng = random.Random(18)
    start = time.time()
    events = new_events(200, due=lambda i: start + 1.0 + 2.0 * rng.random())
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 200
        await wait_until(all_finished(database, 200), limit=20)

    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert len(rows) == 200
    for row in rows:
        seen = exec_handlers.OBSERVED[row.event_id, row.attempt]
        assert seen - START_TOLERANCE <= row.started_at <= seen + 1e-6  # to_timestamp: µs
        assert row.started_at >= row.scheduled_for  # never early
        assert row.lateness_ms == pytest.approx((row.started_at - row.scheduled_for) * 1000,
                                                abs=0.002)  # fmt: skip
        assert row.lateness_ms == pytest.approx((seen - row.scheduled_for) * 1000,
                                                abs=START_TOLERANCE * 1000)  # fmt: skip
        assert row.claimed_at is not None and row.claimed_at <= row.started_at
        assert row.claimed_at >= row.scheduled_for - CLAIM_AHEAD - 0.001  # within the window
    # The claim's round trip is off the start: most claims are made before the due time.
    ahead = sum(1 for r in rows if r.claimed_at is not None and r.claimed_at < r.scheduled_for)
    assert ahead > len(rows) // 2, ahead


async def test_the_handler_never_starts_before_its_due_time(
    make_settings: Any, database: str
) -> None:
    """1,000 events due at random (millisecond) times over 4 s, 10 slots: the handler's first
    line never runs before the due time, on the clock of the process that runs it."""
    settings = executor_settings(make_settings, "observe", executor={"concurrency": 10})
    rng = random.Random(7)
    start = time.time()
    events = new_events(1000, due=lambda i: start + 1.5 + 4.0 * rng.random())
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 1000
        await wait_until(all_finished(database, 1000), limit=30)

    seen = exec_handlers.OBSERVED
    assert len(seen) == 1000
    late_ms = sorted((seen[e.id, 1] - e.execute_at) * 1000 for e in events)
    assert late_ms[0] >= 0, [x for x in late_ms if x < 0]
    assert late_ms[len(late_ms) // 2] < 50  # on time (loosely: a shared 2-core test box)


async def test_concurrency_bounds_the_handlers_running_at_once_not_the_claims(
    make_settings: Any, database: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """``executor.concurrency`` handlers run at once, however many jobs are claimed ahead
    of their due time and wait for it (those use slots of their own); the rest wait for a
    handler slot, never starting early."""
    journal_path = str(tmp_path / "journal")
    monkeypatch.setenv("TEST_HANDLER_JOURNAL", journal_path)
    settings = executor_settings(make_settings, "journal", executor={"concurrency": 2})
    events = new_events(8, due=time.time() + 1.0, sleep=0.2)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 8
        await wait_until(all_finished(database, 8), limit=15)

    journal = exec_handlers.read_journal(journal_path)
    starts = {str(x["event"]): float(str(x["t"])) for x in journal if x["what"] == "start"}
    ends = {str(x["event"]): float(str(x["t"])) for x in journal if x["what"] == "done"}
    assert len(starts) == len(ends) == 8
    assert max_overlap((starts[e], ends[e]) for e in starts) == 2
    assert min(starts.values()) >= events[0].execute_at  # never early
    # Four rounds of two 0.2 s handlers: the last pair starts about 0.6 s after the due time.
    assert max(starts.values()) - events[0].execute_at >= 0.55


async def test_the_same_job_delivered_again_after_success_runs_nothing(
    make_settings: Any, database: str
) -> None:
    settings = executor_settings(make_settings)
    events = new_events(3, due=time.time())
    await trio.to_thread.run_sync(insert_events, database, events)
    skipped = counter("eventsched_executions_total", type="other", outcome="skipped_duplicate")
    async with running_executor(settings) as harness:
        await harness.enqueue(events)
        await wait_until(all_finished(database, 3))
        # SAQ allows the finished key again at once: the claim CAS is what refuses it.
        assert await harness.enqueue(events) == 3
        await wait_until(
            lambda: (
                counter("eventsched_executions_total", type="other", outcome="skipped_duplicate")
                >= skipped + 3
            )
        )
    assert sorted(exec_handlers.PER_EVENT.values()) == [1, 1, 1]
    assert len(await trio.to_thread.run_sync(attempt_rows, database)) == 3


# -- retries, dead, DLQ ------------------------------------------------------------------------


async def test_a_flaky_handler_is_retried_with_backoff_until_it_succeeds(
    make_settings: Any, database: str
) -> None:
    settings = executor_settings(make_settings, "flaky")
    events = new_events(2, due=time.time() + 0.2)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        await harness.enqueue(events)
        await wait_until(all_finished(database, 2), limit=15)

    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert await trio.to_thread.run_sync(statuses, database) == {e.id: "succeeded" for e in events}
    for event in events:
        mine = [r for r in rows if r.event_id == event.id]
        assert [(r.attempt, r.outcome) for r in mine] == [
            (1, "retried"),
            (2, "retried"),
            (3, "succeeded"),
        ]
        assert mine[0].error == "RuntimeError: flaky failure on attempt 1"
        for previous, retry, delay in ((mine[0], mine[1], 0.2), (mine[1], mine[2], 0.4)):
            assert previous.finished_at is not None
            # Due exactly one backoff after the failure, and not started before it.
            assert retry.scheduled_for - previous.finished_at == pytest.approx(delay, abs=0.002)
            assert retry.started_at >= retry.scheduled_for
    (attempts, last_error, next_at) = (
        await trio.to_thread.run_sync(
            query,
            database,
            "SELECT attempts, last_error, next_attempt_at IS NOT NULL FROM events LIMIT 1",
        )
    )[0]
    assert (attempts, last_error, next_at) == (3, "RuntimeError: flaky failure on attempt 2", True)


async def test_a_handler_that_always_fails_goes_dead_with_one_dlq_message(
    make_settings: Any, database: str, dlq_topic: Names, kafka_bootstrap: str
) -> None:
    settings = executor_settings(make_settings, "always_fails")
    (event,) = new_events(1, due=time.time(), type="order.placed", order=7)
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with running_executor(settings) as harness:
        await harness.enqueue([event])
        await wait_until(all_finished(database, 1), limit=15)
        await wait_until(
            lambda: bool(query(database, "SELECT 1 FROM events WHERE dlq_published_at IS NOT NULL"))
        )

    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "retried"), (2, "retried"), (3, "dead")]
    ((status, reason, error),) = await trio.to_thread.run_sync(
        query, database, "SELECT status, dead_reason, last_error FROM events"
    )
    assert (status, reason, error) == ("dead", "retries_exhausted", "RuntimeError: always fails")

    (message,) = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, dlq_topic.dlq_topic)
    headers = message.headers
    assert headers["dlq-reason"] == b"retries_exhausted"
    assert headers["dlq-error"] == b"RuntimeError: always fails"
    assert headers["attempts"] == b"3"
    assert headers["event-id"] == event.id.encode()
    assert headers["schema-version"] == b"1"
    assert "source-topic" not in headers  # inserted directly, not consumed from Kafka
    assert message.key == event.id.encode()  # the idempotency key
    decoded: Event = decode_event(message.value, now=datetime.now(UTC), limits=DecodeLimits())
    assert str(decoded.id) == event.id
    assert (decoded.type, decoded.payload) == ("order.placed", {"n": 0, "order": 7})
    assert decoded.execute_at.timestamp() == pytest.approx(event.execute_at)


@pytest.mark.parametrize(
    ("handlers", "reason", "error"),
    [
        (
            {"default": f"{HANDLERS}:permanent"},
            "permanent_error",
            "PermanentError: bad payload: {'n': 0}",
        ),
        (
            {"other.type": f"{HANDLERS}:ok"},
            "no_handler",
            "no handler for event type 'test.event' and no default handler",
        ),
    ],
    ids=["permanent-error", "no-handler"],
)
async def test_permanent_errors_go_dead_at_once(
    make_settings: Any,
    database: str,
    dlq_topic: Names,
    kafka_bootstrap: str,
    handlers: dict[str, str],
    reason: str,
    error: str,
) -> None:
    settings = make_settings(
        executor={"concurrency": 4}, handlers=handlers, reconciler={"enabled": False}
    )
    (event,) = new_events(1, due=time.time() + 1.0)  # claimed ahead of its due time
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with running_executor(settings) as harness:
        await harness.enqueue([event])
        await wait_until(all_finished(database, 1))
        await wait_until(
            lambda: bool(query(database, "SELECT 1 FROM events WHERE dlq_published_at IS NOT NULL"))
        )
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome, r.error) for r in rows] == [(1, "dead", error)]
    # Given up at (or after) the due time, even with no handler to invoke: never early.
    assert rows[0].started_at >= rows[0].scheduled_for and rows[0].lateness_ms >= 0
    (message,) = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, dlq_topic.dlq_topic)
    assert message.headers["dlq-reason"] == reason.encode()


async def test_a_handler_running_past_job_timeout_fails_and_is_retried(
    make_settings: Any, database: str
) -> None:
    settings = executor_settings(
        make_settings, "slow", executor={"job_timeout": "300ms", "max_retries": 2}
    )
    (event,) = new_events(1, due=time.time(), sleep=5)
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with running_executor(settings) as harness:
        await harness.enqueue([event])
        await wait_until(all_finished(database, 1), limit=10)
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome, r.error) for r in rows] == [
        (1, "retried", "handler timed out after 0.3s"),
        (2, "dead", "handler timed out after 0.3s"),
    ]


async def test_jobs_cut_off_by_the_shutdown_deadline_record_their_attempt_and_retry_later(
    make_settings: Any, database: str, redis_url: str, names: Names
) -> None:
    settings = executor_settings(make_settings, "slow", shutdown={"grace": "500ms"})
    (event,) = new_events(1, due=time.time(), sleep=30)
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with running_executor(settings) as harness:
        await harness.enqueue([event])
        await wait_until(lambda: status_counts(database) == {"running": 1})
    # The grace expired with the handler still running: the job was cancelled, and its
    # attempt recorded on the way out; the next attempt waits in SAQ under its own key.
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome, r.error) for r in rows] == [
        (1, "retried", "interrupted: the executor stopped before the handler finished")
    ]
    assert await trio.to_thread.run_sync(status_counts, database) == {"retrying": 1}
    pending = await trio.to_thread.run_sync(saq_score, redis_url, names.queue, f"{event.id}#2")
    assert pending is not None  # 0: due now, in `queued`
    # The retry's job names the event's partition day, from the claim: no lookup for it.
    job = await trio.to_thread.run_sync(saq_job, redis_url, names.queue, f"{event.id}#2")
    [(day, payload)] = query(
        database, "SELECT (retain_from AT TIME ZONE 'UTC')::date, payload FROM events"
    )
    assert job is not None and job["kwargs"]["day"] == day.isoformat()
    # ... and its payload's size, so the payload budget reserves that, not the largest message.
    assert job["meta"]["size"] == payload_bytes(payload)


async def test_a_retrys_job_carries_the_payload_size_for_the_payload_budget(
    make_settings: Any, database: str, redis_url: str, names: Names
) -> None:
    # A failed attempt's retry is enqueued with its payload's size (from the claim), like
    # the consumer's jobs: a burst of retries is not held to the budget's worst case.
    backoff = {"base": "1m", "factor": 1.0, "max": "1m", "jitter": 0.0}
    settings = executor_settings(make_settings, "always_fails", executor={"retry_backoff": backoff})
    events = new_events(2, due=time.time(), blob="x" * 3000)
    await trio.to_thread.run_sync(insert_events, database, events)
    async with running_executor(settings) as harness:
        await harness.enqueue(events)
        await wait_until(lambda: status_counts(database) == {"retrying": 2})
    payloads = dict(query(database, "SELECT id::text, payload FROM events"))
    for event in events:
        job = await trio.to_thread.run_sync(saq_job, redis_url, names.queue, f"{event.id}#2")
        assert job is not None and job["kwargs"]["attempt"] == 2
        assert job["meta"]["size"] == payload_bytes(payloads[event.id]) > 3000


async def test_a_job_with_a_kwarg_this_version_does_not_know_still_runs(
    make_settings: Any, database: str
) -> None:
    """A newer enqueuer may add a hint kwarg to the job contract (as ``day`` was added): the
    job function ignores kwargs it does not know, so roles can be upgraded in any order."""
    settings = executor_settings(make_settings, "ok")
    (event,) = new_events(1, due=time.time())
    await trio.to_thread.run_sync(insert_events, database, [event])
    async with running_executor(settings) as harness:
        job = make_job(event.id, 1, event.execute_at, saq_timeout(settings))
        await harness.jobs.enqueue_many(
            [dataclasses.replace(job, kwargs={**job.kwargs, "hint_from_the_future": 1})]
        )
        await wait_until(all_finished(database, 1), limit=10)
    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 1}


# -- several processes -----------------------------------------------------------------------------


async def test_two_executor_processes_run_5000_events_once_each(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, dlq_topic: Names
) -> None:
    env = executor_env(
        names,
        database,
        redis_url,
        kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT="eventsched.plugins.handlers:log",
        EVENTSCHED_EXECUTOR__CONCURRENCY="50",
    )
    apps = [AppProcess(["run", "--role", "executor", "--port", "0"], env=env) for _ in range(2)]
    try:
        for app in apps:
            app.wait_event("role_ready", timeout=30)
        start = time.time()
        events = new_events(5000, due=lambda i: start + 1.0 + i / 5000)
        await trio.to_thread.run_sync(insert_events, database, events)
        async with trio_asyncio.open_loop(), queue_client(redis_url, names.queue) as jobs:
            timeout = 60
            for chunk in range(0, 5000, 1000):
                await jobs.enqueue_many(
                    [make_job(e.id, 1, e.execute_at, timeout) for e in events[chunk : chunk + 1000]]
                )
        await wait_until(all_finished(database, 5000), limit=60, interval=0.5)
        for app in apps:
            app.proc.send_signal(signal.SIGTERM)
        assert [app.wait(30) for app in apps] == [0, 0]
    finally:
        for app in apps:
            app.kill()
    per_event = await trio.to_thread.run_sync(
        query,
        database,
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded'), max(attempt),"
        " count(DISTINCT worker_id) FROM event_attempts GROUP BY event_id",
    )
    assert len(per_event) == 5000
    assert {(total, ok, attempt) for total, ok, attempt, _ in per_event} == {(1, 1, 1)}
    workers = await trio.to_thread.run_sync(
        query, database, "SELECT count(DISTINCT worker_id) FROM event_attempts"
    )
    assert workers == [(2,)]  # both processes took part


# -- signals -------------------------------------------------------------------------------------


async def test_sigterm_lets_running_jobs_finish_and_records_them(
    database: str, redis_url: str, kafka_bootstrap: str, names: Names, dlq_topic: Names
) -> None:
    env = executor_env(
        names,
        database,
        redis_url,
        kafka_bootstrap,
        EVENTSCHED_HANDLERS__DEFAULT=f"{HANDLERS}:slow",
        EVENTSCHED_EXECUTOR__CONCURRENCY="8",
        EVENTSCHED_SHUTDOWN__GRACE="5s",
        TEST_HANDLER_SLEEP="1.5",
    )
    app = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    try:
        app.wait_event("role_ready", timeout=30)
        events = new_events(5, due=time.time())
        await trio.to_thread.run_sync(insert_events, database, events)
        async with trio_asyncio.open_loop(), queue_client(redis_url, names.queue) as jobs:
            await jobs.enqueue_many([make_job(e.id, 1, e.execute_at, 60) for e in events])
        await wait_until(lambda: status_counts(database).get("running", 0) == 5)
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(15) == 0
    finally:
        app.kill()
    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 5}
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "succeeded")] * 5
    assert any(line.get("event") == "executor_drained" for line in app.lines)
    complete = [line for line in app.lines if line.get("event") == "shutdown_complete"]
    assert complete and complete[0]["drained"] is True
