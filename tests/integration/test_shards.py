"""Specification of sharded job queues: two real Redis servers, each event's jobs on the shard
its id hashes to.

Covers the routing of enqueues and command edits, a shard added to a running system (jobs
left on their old shard), 5,000 events through the consumer and two executor processes
(one serving a subset of the shards) with every handler run counted, a FLUSHALL of one shard
repaired by the reconciler while the other shard's events stay on time, limits divided
among the shards, and a shard down: the consumer, the reconciler, the gauges per shard,
``eventsched status`` and /readyz.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import trio_asyncio

from eventsched.core.domain.jobcontract import make_job
from eventsched.core.domain.wire import new_event
from eventsched.core.jobqueue import ShardedQueue, shard_of
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.status import render_status, status
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.settings import Settings
from tests.support import exec_handlers
from tests.support.clients import query, status_counts
from tests.support.exec_handlers import read_journal
from tests.support.execution import (
    all_finished,
    attempt_rows,
    executor_env,
    flush_redis,
    insert_events,
    max_overlap,
    new_events,
    running_executor,
)
from tests.support.ingest import event_message, produce, running
from tests.support.metrics import metric_value as sample
from tests.support.proc import AppProcess
from tests.support.servers import Names, own_redis_servers
from tests.support.waiting import wait_until

HANDLERS = "tests.support.exec_handlers"
RECONCILE_FAST = {"interval": "300ms", "grace": "300ms", "stale_after": "1s"}

pytestmark = pytest.mark.usefixtures("executor_state")


def sharded_settings(make_settings: Any, urls: list[str], **sections: Any) -> Settings:
    return make_settings(  # type: ignore[no-any-return]
        redis={"url": "", "shards": urls},
        executor={"concurrency": 40, "max_retries": 3, **sections.pop("executor", {})},
        handlers={
            "default": f"{HANDLERS}:{sections.pop('handler', 'ok')}",
            **sections.pop("handlers", {}),
        },
        reconciler={**RECONCILE_FAST, **sections.pop("reconciler", {})},
        **sections,
    )


def job_keys(url: str, queue: str) -> set[str]:
    """The job keys (event ids, ``<id>#<n>``) with a record on this server."""
    client = redis.Redis.from_url(url)
    prefix = f"saq:job:{queue}:"
    try:
        return {k.decode()[len(prefix) :] for k in client.scan_iter(f"{prefix}*", count=1000)}
    finally:
        client.close()


def pending(url: str, queue: str) -> set[str]:
    client = redis.Redis.from_url(url)
    prefix = f"saq:job:{queue}:"
    try:
        return {m.decode()[len(prefix) :] for m in client.zrange(f"saq:{queue}:incomplete", 0, -1)}
    finally:
        client.close()


def marker(url: str, queue: str) -> str | None:
    client = redis.Redis.from_url(url)
    try:
        value = client.get(f"saq:{queue}:eventsched:epoch")
    finally:
        client.close()
    return None if value is None else value.decode()


# -- routing -------------------------------------------------------------------------------------


async def test_enqueues_and_edits_go_to_the_event_s_shard(shards: list[str], names: Names) -> None:
    far = time.time() + 600
    events = new_events(200, due=far)
    async with trio_asyncio.open_loop():
        queue = ShardedQueue(shards, names.queue)
        await queue.connect()
        try:
            jobs = [make_job(e.id, 1, e.execute_at, 60) for e in events]
            assert await queue.enqueue_many(jobs) == 200
            home = {e.id: shard_of(e.id, 2) for e in events}
            assert 60 < Counter(home.values())[0] < 140  # both shards hold a fair share
            for index, url in enumerate(shards):
                assert pending(url, names.queue) == {e for e, s in home.items() if s == index}
            assert await queue.pending_keys([e.id for e in events]) == set(home)

            # A retry's job (key <id>#2) goes where the event's first job went.
            retry = make_job(events[0].id, 2, far, 60)
            assert await queue.place_job(retry) == "added"
            assert retry.key in pending(shards[home[events[0].id]], names.queue)

            # Cancel: removed from the event's shard, the other shard untouched.
            removed = await queue.remove_jobs([events[1].id, events[2].id])
            assert sorted(removed.removed) == sorted([events[1].id, events[2].id])
            counts = await queue.shard_counts()
            assert sum(c["scheduled"] for c in counts if isinstance(c, dict)) == 199
            assert (await queue.counts())["scheduled"] == 199
        finally:
            await queue.close()


async def test_after_a_shard_is_added_jobs_on_their_old_shard_are_found_and_edited(
    shards: list[str], names: Names
) -> None:
    """One shard, then two: the ids the new list gives the new shard keep their jobs on the
    old one; lookups find them there, a cancel removes them there, and a reschedule moves
    them to their new home (no copy left behind)."""
    far = time.time() + 600
    events = new_events(100, due=far)
    async with trio_asyncio.open_loop():
        before = ShardedQueue(shards[:1], names.queue)
        after = ShardedQueue(shards, names.queue)
        await before.connect()
        await after.connect()
        try:
            await before.enqueue_many([make_job(e.id, 1, e.execute_at, 60) for e in events])
            moved = [e for e in events if shard_of(e.id, 2) == 1]
            assert moved and pending(shards[1], names.queue) == set()
            assert await after.pending_keys([e.id for e in events]) == {e.id for e in events}
            # So the reconciler, which asks before it enqueues, adds no copy on the new shard.
            assert await after.job_exists(moved[0].id)

            cancelled = await after.remove_jobs([moved[1].id])
            assert cancelled.removed == [moved[1].id]
            assert moved[1].id not in pending(shards[0], names.queue)

            assert await after.place_job(make_job(moved[2].id, 1, far + 60, 60)) == "added"
            assert moved[2].id in pending(shards[1], names.queue)
            assert moved[2].id not in pending(shards[0], names.queue)
        finally:
            await before.close()
            await after.close()


# -- the consumer with a shard down ---------------------------------------------------------------


def test_the_consumer_enqueues_on_the_shard_that_answers_and_retries_the_other(
    make_settings: Any, tmp_path: Path, names: Names, database: str, kafka_bootstrap: str
) -> None:
    """Shard 1 is down while a batch arrives: shard 0's jobs are enqueued (and counted) at
    once, the batch's offsets wait, and shard 1 gets its jobs once it is back."""
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    with own_redis_servers(tmp_path / "s0", tmp_path / "s1") as (first, second):
        urls = [first.url, second.url]
        settings = sharded_settings(make_settings, urls)
        now = datetime.now(UTC)
        events = [new_event("t", {"n": i}, now + timedelta(minutes=10)) for i in range(40)]
        home = {str(e.id): shard_of(str(e.id), 2) for e in events}
        scheduled = sample("eventsched_jobs_scheduled_total")

        async def run() -> None:
            async with running(settings, ["consumer"]):
                await trio.to_thread.run_sync(second.stop)
                await trio.to_thread.run_sync(
                    produce, kafka_bootstrap, names.topic, [event_message(e) for e in events]
                )
                on_0 = {i for i, s in home.items() if s == 0}
                await wait_until(lambda: pending(urls[0], names.queue) == on_0, limit=15)
                await wait_until(
                    lambda: sample("eventsched_jobs_scheduled_total") == scheduled + len(on_0),
                    limit=5,
                )
                await trio.to_thread.run_sync(second.start)
                on_1 = {i for i, s in home.items() if s == 1}
                await wait_until(lambda: pending(urls[1], names.queue) == on_1, limit=30)
                await wait_until(
                    lambda: sample("eventsched_jobs_scheduled_total") == scheduled + 40, limit=5
                )

        trio.run(run)


async def test_edits_of_events_on_a_shard_that_answers_go_on_while_another_is_down(
    tmp_path: Path, names: Names
) -> None:
    far = time.time() + 600
    events = new_events(40, due=far)
    with own_redis_servers(tmp_path / "s0", tmp_path / "s1") as (first, second):
        async with trio_asyncio.open_loop():
            queue = ShardedQueue([first.url, second.url], names.queue, op_timeout=3.0)
            await queue.connect()
            try:
                await queue.enqueue_many([make_job(e.id, 1, e.execute_at, 60) for e in events])
                await trio.to_thread.run_sync(second.stop)
                on_0 = [e.id for e in events if shard_of(e.id, 2) == 0]
                on_1 = [e.id for e in events if shard_of(e.id, 2) == 1]
                removed = await queue.remove_jobs(on_0[:2])
                assert sorted(removed.removed) == sorted(on_0[:2])
                # A cancel removes the next attempt's job too, usually not there: the other
                # shards are asked for it, and the one that is down is skipped.
                assert (await queue.remove_jobs([f"{on_0[3]}#2"])).removed == []
                assert await queue.place_job(make_job(on_0[2], 1, far + 60, 60)) == "moved"
                with pytest.raises(DependencyError, match=r"redis\[1\]"):
                    await queue.remove_jobs(on_1[:1])  # its own shard must answer
            finally:
                await queue.close()


# -- 5,000 events, two shards, two executors -----------------------------------------------------

EVENTS = 5000


def test_5000_events_across_two_shards_and_two_executors_each_run_once(
    make_settings: Any,
    shards: list[str],
    database: str,
    kafka_bootstrap: str,
    names: Names,
    tmp_path: Path,
) -> None:
    """The consumer (in this process) records and enqueues 5,000 events due 4-12 s ahead;
    executor A serves shard 0 only, executor B every shard. Each event's job is on the
    shard of its id, each handler runs exactly once (the journal: one start and one done per
    event), never early, and A ran none of shard 1's events."""
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 1})
    journal_path = str(tmp_path / "journal")
    env = executor_env(
        names, database, "", kafka_bootstrap,
        EVENTSCHED_REDIS__SHARDS=json.dumps(shards), EVENTSCHED_EXECUTOR__CONCURRENCY="20",
        EVENTSCHED_HANDLERS__DEFAULT=f"{HANDLERS}:journal", TEST_HANDLER_JOURNAL=journal_path,
    )  # fmt: skip
    a = AppProcess(["run", "--role", "executor", "--port", "0"],
                   env={**env, "EVENTSCHED_EXECUTOR__SHARDS": "[0]"})  # fmt: skip
    b = AppProcess(["run", "--role", "executor", "--port", "0"], env=env)
    now = datetime.now(UTC)
    events = [  # due 4-12 s from now
        new_event("test.event", {"n": i}, now + timedelta(seconds=4 + i * 8.0 / EVENTS))
        for i in range(EVENTS)
    ]
    try:
        started_a = a.wait_event("executor_started", timeout=30)
        started_b = b.wait_event("executor_started", timeout=30)
        assert (started_a["shards"], started_b["shards"]) == ([0], [0, 1])
        settings = sharded_settings(make_settings, shards)

        async def ingest() -> None:
            async with running(settings, ["consumer"]):
                await trio.to_thread.run_sync(
                    produce, kafka_bootstrap, names.topic, [event_message(e) for e in events]
                )
                await wait_until(all_finished(database, EVENTS), limit=90)

        trio.run(ingest)
        # Every job record (kept for the job ttl after it finished) is on its event's shard.
        ids = {str(e.id) for e in events}
        on = [job_keys(url, names.queue) & ids for url in shards]
        assert on[0] == {i for i in ids if shard_of(i, 2) == 0}
        assert on[1] == {i for i in ids if shard_of(i, 2) == 1}
        assert 2000 < len(on[0]) < 3000
    finally:
        for app in (a, b):
            app.stop()

    assert status_counts(database) == {"succeeded": EVENTS}
    journal = read_journal(journal_path)
    starts = Counter(str(x["event"]) for x in journal if x["what"] == "start")
    dones = Counter(str(x["event"]) for x in journal if x["what"] == "done")
    assert set(starts) == set(dones) == ids
    assert set(starts.values()) == set(dones.values()) == {1}
    by_pid: dict[int, set[str]] = {}
    for x in journal:
        by_pid.setdefault(int(str(x["pid"])), set()).add(str(x["event"]))
    assert len(by_pid) == 2
    assert set(by_pid.get(a.proc.pid, set())) <= on[0]  # A serves shard 0 only
    assert on[1] <= by_pid[b.proc.pid]
    due = dict(query(database, "SELECT id::text, extract(epoch FROM execute_at) FROM events"))
    started = {str(x["event"]): float(str(x["t"])) for x in journal if x["what"] == "start"}
    assert min(started[i] - float(due[i]) for i in ids) >= 0  # never early


# -- one shard flushed ---------------------------------------------------------------------------


async def test_flushall_of_one_shard_is_restored_while_the_other_stays_on_time(
    make_settings: Any, database: str, shards: list[str], names: Names
) -> None:
    settings = sharded_settings(make_settings, shards, executor={"concurrency": 50})
    now = time.time()
    events = new_events(1000, due=lambda i: now + 3.0 + i / 500)  # due over 3-5 s
    lost = [e for e in events if shard_of(e.id, 2) == 1]
    await trio.to_thread.run_sync(insert_events, database, events)
    restored = sample("eventsched_reconciler_requeued_total", reason="redis_lost")
    overdue = sample("eventsched_reconciler_requeued_total", reason="overdue")
    async with running_executor(settings) as harness:
        assert await harness.enqueue(events) == 1000
        # The leader's first pass leaves a marker on each shard; a flush after that is seen.
        await wait_until(
            lambda: [marker(url, names.queue) for url in shards] == ["ok", "ok"], limit=5
        )
        kept = await trio.to_thread.run_sync(pending, shards[0], names.queue)
        await trio.to_thread.run_sync(flush_redis, shards[1])
        assert await trio.to_thread.run_sync(pending, shards[1], names.queue) == set()
        await wait_until(all_finished(database, 1000), limit=20)
        assert [marker(url, names.queue) for url in shards] == ["ok", "ok"]
        # The other shard's jobs were neither touched nor enqueued again.
        assert kept == {e.id for e in events if shard_of(e.id, 2) == 0}
        await wait_until(
            lambda: (
                sample("eventsched_queue_shard_jobs", shard="1", state="scheduled") == 0
                and sample("eventsched_queue_shard_up", shard="1") == 1
            ),
            limit=5,
        )

    assert await trio.to_thread.run_sync(status_counts, database) == {"succeeded": 1000}
    assert sorted(exec_handlers.PER_EVENT.values()) == [1] * 1000
    assert sample("eventsched_reconciler_requeued_total", reason="redis_lost") == restored + len(
        lost
    )
    assert sample("eventsched_reconciler_requeued_total", reason="overdue") == overdue
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    lateness = {r.event_id: r.started_at - r.scheduled_for for r in rows}
    assert min(lateness.values()) >= 0
    # Both shards on time: shard 0 never noticed, shard 1 restored before its jobs were due
    # (not grace late, as the overdue path would have them).
    assert max(lateness[e.id] for e in events if e not in lost) < 0.3
    assert max(lateness[e.id] for e in lost) < 0.3


# -- limits divided among the shards ------------------------------------------------------------


async def test_a_limit_holds_across_shards_each_enforcing_its_share(
    make_settings: Any, database: str, shards: list[str]
) -> None:
    """``a``: concurrency 2 over two shards (1 each); ``b``: 4 starts/s, burst 2 (2/s and 1
    each). Together the shards never exceed the type's limit, and both shares are used."""
    settings = sharded_settings(
        make_settings, shards, handlers={"a": f"{HANDLERS}:slow"},
        types={"a": {"concurrency": 2}, "b": {"rate": 4, "burst": 2}},
    )  # fmt: skip
    due = time.time() + 1.0
    a = new_events(16, due=due, type="a", sleep=0.25)
    b = new_events(12, due=due, type="b")
    assert {shard_of(e.id, 2) for e in a} == {0, 1}
    await trio.to_thread.run_sync(insert_events, database, a + b)
    async with running_executor(settings) as harness:
        await harness.enqueue(a + b)
        await wait_until(all_finished(database, len(a) + len(b)), limit=20)
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    ids_a = {e.id for e in a}
    a_rows = [r for r in rows if r.event_id in ids_a]
    assert max_overlap((r.started_at, r.finished_at or float("inf")) for r in a_rows) == 2
    # b: at most burst + rate x t starts by t after the due time, over both shards.
    starts = sorted(r.started_at for r in rows if r.event_id not in ids_a)
    assert [s >= due + (k - 1) / 4 - 0.001 for k, s in enumerate(starts)] == [True] * 12, starts
    assert all(r.started_at >= r.scheduled_for for r in rows)


# -- a shard down --------------------------------------------------------------------------------


async def test_a_shard_down_shows_on_readyz_and_in_status_and_the_others_are_repaired(
    make_settings: Any,
    tmp_path: Path,
    shards: list[str],
    names: Names,
    kafka_bootstrap: str,
    database: str,
) -> None:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    with own_redis_servers(tmp_path / "shard2") as (third,):
        settings = sharded_settings(make_settings, [*shards, third.url])
        async with running(settings, ["executor"]) as runtime:
            await wait_until(lambda: runtime.health.readiness()[0], limit=10)
            await trio.to_thread.run_sync(third.stop)
            await wait_until(lambda: not runtime.health.readiness()[0], limit=10)
            _, body = runtime.health.readiness()
            assert body["failing"] == ["redis[2]"]
            assert body["dependencies"]["redis[0]"] == body["dependencies"]["redis[1]"] == "ok"
            await wait_until(lambda: sample("eventsched_queue_shard_up", shard="2") == 0, limit=10)

            report = await trio.to_thread.run_sync(status, settings)
            queue = report.queue
            assert [s["shard"] for s in queue["shards"]] == [0, 1, 2]
            assert "error" in queue["shards"][2] and "redis[2]" in queue["error"]
            assert queue["shards"][0]["scheduled"] == 0 and queue["scheduled"] == 0
            assert not report.ok
            text = render_status(report)
            assert "shard 2: down" in text and "shard 0: queued 0" in text

            # Events whose jobs were lost (in PostgreSQL, not in Redis) are repaired on the
            # shards that answer; those of the shard that is down wait for it.
            events = new_events(60, due=time.time() - 1)
            await trio.to_thread.run_sync(insert_events, database, events)
            up = {e.id for e in events if shard_of(e.id, 3) != 2}
            assert 0 < len(up) < 60

            def statuses() -> dict[str, str]:
                return dict(query(database, "SELECT id::text, status FROM events"))

            await wait_until(
                lambda: {i for i, st in statuses().items() if st == "succeeded"} == up, limit=15
            )
            await trio.sleep(1.0)  # a few more passes: still nothing of shard 2 ran
            assert {st for i, st in statuses().items() if i not in up} == {"scheduled"}
