"""The webhook handler through a running executor, against a real HTTP receiver on a thread.

The unit tier (tests/unit/test_handlers.py) specifies the built-in handlers called directly.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from eventsched.core.kafka import ensure_topics
from tests.support.clients import delete_queue_keys, query
from tests.support.execution import (
    all_finished,
    attempt_rows,
    insert_events,
    new_events,
    running_executor,
)
from tests.support.servers import Names
from tests.support.waiting import wait_until
from tests.support.webhook import (
    Receiver,
    loopback_webhook_executor,
)


async def test_webhook_through_the_executor_succeeds_retries_and_dies(
    receiver: Receiver,
    make_settings: Any,
    database: str,
    kafka_bootstrap: str,
    names: Names,
    redis_url: str,
) -> None:
    ensure_topics(kafka_bootstrap, {names.dlq_topic: 1})
    settings = loopback_webhook_executor(make_settings)
    now = time.time()
    ok, busy, bad = (
        new_events(1, due=now, webhook_url=f"{receiver.base}/{status}")[0]
        for status in (200, 503, 400)
    )
    await trio.to_thread.run_sync(insert_events, database, [ok, busy, bad])
    try:
        async with running_executor(settings) as harness:
            await harness.enqueue([ok, busy, bad])
            await wait_until(all_finished(database, 3), limit=15)
    finally:
        delete_queue_keys(redis_url, names.queue)

    status = dict(
        await trio.to_thread.run_sync(
            query,
            database,
            "SELECT id::text, status || '/' || coalesce(dead_reason, '') FROM events",
        )
    )
    assert status == {
        ok.id: "succeeded/",
        busy.id: "dead/retries_exhausted",
        bad.id: "dead/permanent_error",
    }
    rows = await trio.to_thread.run_sync(attempt_rows, database)
    errors = {(r.event_id, r.attempt): r.error for r in rows}
    assert (
        errors[(busy.id, 2)]
        == f"WebhookError: POST {receiver.base}/503: HTTP 503 Service Unavailable"
    )
    assert errors[(bad.id, 1)] == f"PermanentError: POST {receiver.base}/400: HTTP 400 Bad Request"
    seen = sorted((path, h["Idempotency-Key"], b["attempt"]) for path, h, b in receiver.requests)
    assert seen == sorted(
        [("/200", ok.id, 1), ("/503", busy.id, 1), ("/503", busy.id, 2), ("/400", bad.id, 1)]
    )
