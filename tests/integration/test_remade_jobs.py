"""Jobs re-made for an event carry what the first one did: the commands' (reschedule,
retry) and ``dlq replay``'s, as the reconciler's (``test_reconciler``).

* The event's lane (its type's limits and priority): the lane mark in Redis, which the
  consumer set when it first enqueued the event, is gone after Redis lost its data; a job
  placed without its lane would run outside its type's limits.
* The payload's size: the executor's payload budget reserves it for the job; without it,
  the largest message (1 MB), which holds a drain of such jobs to 64 claims in flight."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import trio_asyncio

from eventsched.core.domain.commands import new_command
from eventsched.core.domain.policies import Policies
from eventsched.core.operations.dlq import _Reruns
from eventsched.core.store.commands import CommandRow, apply_commands
from eventsched.core.store.pool import Database
from eventsched.plugins.consumer.commands import Commands
from tests.support.clients import delete_queue_keys
from tests.support.execution import insert_events, new_events
from tests.support.servers import Names

TYPES = {"a": {"concurrency": 1}}


def lane_marks(url: str, queue: str) -> dict[str, str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return client.hgetall(f"saq:{queue}:lanes")  # type: ignore[return-value]
    finally:
        client.close()


def job_size(url: str, queue: str, key: str) -> int | None:
    client = redis.Redis.from_url(url)
    try:
        record = json.loads(client.get(f"saq:job:{queue}:{key}") or b"{}")
    finally:
        client.close()
    size: int | None = record.get("meta", {}).get("size")
    return size


async def test_a_commands_job_has_its_events_lane_and_size(
    make_settings: Any, database: str
) -> None:
    settings = make_settings(types=TYPES)
    limited, free = new_events(1, due=time.time() - 60, type="a") + new_events(
        1, due=time.time() - 60, type="z"
    )
    insert_events(database, [limited, free], status="dead", attempts=1)
    async with trio_asyncio.open_loop():
        db = await Database.open(database, max_size=1)
        try:
            applied = await apply_commands(
                db,
                [
                    CommandRow(new_command("retry", event_id=e.id, requested_by="t"))
                    for e in (limited, free)
                ],
            )
        finally:
            await db.close()
    commands = Commands(
        db=db, queue=None, job_timeout=60, retrying=None, log=None,
        lane_of=Policies(settings).lane_of,
    )  # fmt: skip
    assert [(a.result, a.type) for a in applied] == [("applied", "a"), ("applied", "z")]
    jobs = [commands.job_for(a) for a in applied]
    assert [job.lane for job in jobs] == ["a", ""]
    # PostgreSQL's text of the jsonb: the same bytes as Python's json.dumps for these.
    assert [job.size for job in jobs] == [len(json.dumps(e.payload)) for e in (limited, free)]


async def test_dlq_replay_enqueues_a_rerun_with_its_events_lane_and_size(
    make_settings: Any, database: str, redis_url: str, names: Names
) -> None:
    settings = make_settings(types=TYPES)
    limited, free = new_events(1, due=time.time() - 60, type="a") + new_events(
        1, due=time.time() - 60, type="z"
    )
    dead_since = datetime.now(UTC) - timedelta(minutes=1)
    insert_events(database, [limited, free], status="dead", attempts=1, finished_at=dead_since)
    reruns = _Reruns(settings, dry_run=False)
    try:
        async with trio_asyncio.open_loop():
            try:
                assert await reruns.rerun(limited.id, 1) is None  # None: re-run
                assert await reruns.rerun(free.id, 1) is None
            finally:
                await reruns.close()
        assert lane_marks(redis_url, names.queue) == {limited.id: "a"}
        assert [job_size(redis_url, names.queue, e.id) for e in (limited, free)] == [
            len(json.dumps(e.payload)) for e in (limited, free)
        ]
    finally:
        delete_queue_keys(redis_url, names.queue)
