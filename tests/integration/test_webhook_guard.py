"""Payload-chosen webhook URLs through a running executor: the error texts that end up in
``events.last_error``, ``event_attempts.error``, the DLQ ``dlq-error`` header and log lines carry
no secret and no port-scan signal.

The unit tier (tests/unit/test_webhook_guard.py) calls the handler directly.
"""

from __future__ import annotations

import re
import time
from typing import Any

import trio
from structlog.testing import capture_logs

from tests.support.clients import delete_queue_keys, query, read_topic
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
    QSECRET,
    SECRET,
    SECRETS,
    TOKEN,
    NotHttp,
    Receiver,
    loopback_webhook_executor,
    without_port,
)


async def test_through_the_executor_errors_rows_headers_and_logs_carry_no_secret_or_port_signal(
    receiver: Receiver,
    not_http: NotHttp,
    closed_port: int,
    make_settings: Any,
    database: str,
    kafka_bootstrap: str,
    dlq_topic: Names,
    redis_url: str,
) -> None:
    settings = loopback_webhook_executor(make_settings)
    secret_url = (
        f"http://user:{SECRET}@127.0.0.1:{receiver.server_address[1]}"
        f"/503/services/{TOKEN}?token={QSECRET}"
    )
    now = time.time()
    secret, refused_closed, refused_open = (
        new_events(1, due=now, webhook_url=url)[0]
        for url in (
            secret_url,
            f"http://2130706433:{closed_port}/x",
            f"http://2130706433:{not_http.port}/x",
        )
    )
    events = [secret, refused_closed, refused_open]
    await trio.to_thread.run_sync(insert_events, database, events)
    try:
        with capture_logs() as logs:
            async with running_executor(settings) as harness:
                await harness.enqueue(events)
                await wait_until(all_finished(database, 3), limit=15)
                await wait_until(
                    lambda: (
                        query(
                            database,
                            "SELECT count(*) FROM events WHERE dlq_published_at IS NOT NULL",
                        )[0][0]
                        == 3
                    ),
                    limit=15,
                )
    finally:
        delete_queue_keys(redis_url, dlq_topic.queue)

    assert not_http.accepted == 0
    rows = dict(
        await trio.to_thread.run_sync(
            query, database, "SELECT id::text, dead_reason || ' ' || last_error FROM events"
        )
    )
    attempts = {
        (r.event_id, r.attempt): r.error
        for r in await trio.to_thread.run_sync(attempt_rows, database)
    }
    messages = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, dlq_topic.dlq_topic)
    # The message key is the idempotency key, which insert_events sets to the event id.
    published = {m.key.decode(): m.headers["dlq-error"].decode() for m in messages}

    texts = [*rows.values(), *attempts.values(), *published.values(), repr(logs)]
    for text in texts:
        assert not any(s in text for s in SECRETS), text
    assert rows[secret.id] == (
        f"retries_exhausted WebhookError: POST http://user:***@127.0.0.1:"
        f"{receiver.server_address[1]}/503/services/***?token=***: HTTP 503 Service Unavailable"
    )
    assert published[secret.id] == rows[secret.id].split(" ", 1)[1]
    assert (secret.id, 2) in attempts and set(published) == {e.id for e in events}
    # Closed and open (non-HTTP) ports of a refused host: the same text but for the port.
    assert without_port(rows[refused_closed.id], closed_port) == without_port(
        rows[refused_open.id], not_http.port
    )
    assert without_port(published[refused_closed.id], closed_port) == without_port(
        published[refused_open.id], not_http.port
    )
    assert rows[refused_open.id].startswith("permanent_error PermanentError: POST http://")
    assert re.search(r"not allowed", rows[refused_open.id])
