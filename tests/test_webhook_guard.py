"""Payload-chosen webhook URLs: refused targets, no port-scan signal, no secrets in errors.

Every connection these tests make goes to loopback: the receivers listen on 127.0.0.1, and
the refused targets are loopback spellings (the guard refuses them before connecting, which
the receivers' request/connection counts show). Called directly (on the asyncio side, as the
executor runs handlers) and through a running executor, where the error texts end up in
``events.last_error``, ``event_attempts.error``, the DLQ ``dlq-error`` header and log lines.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from eventsched.core.config import build_settings
from eventsched.core.errors import ConfigError
from eventsched.core.plugins import PermanentError
from eventsched.plugins.handlers import WebhookError
from tests.conftest import Names
from tests.support.execution import (
    all_finished,
    attempt_rows,
    delete_queue_keys,
    insert_events,
    new_events,
    query,
    read_topic,
    running_executor,
    wait_until,
)
from tests.test_handlers import BUILTIN, Receiver, call_webhook, event, settings_with

SECRET = "pw-s3cr3t"
TOKEN = "TOKENs3cr3tabcdefghijklmnop"  # a path part of 27 token characters
QSECRET = "q-s3cr3t"
SECRETS = (SECRET, TOKEN, QSECRET)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class NotHttp:
    """A loopback TCP port that accepts, writes a non-HTTP banner and closes; counts accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def not_http() -> Iterator[NotHttp]:
    server = NotHttp()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def payload_settings(*allowed: str, **webhook: Any) -> Any:
    return settings_with(
        webhooks={"default": "http://127.0.0.1:9/never"},
        executor={
            "webhook": {"allow_payload_url": True, "allowed_hosts": list(allowed), **webhook}
        },
    )


async def failure(settings: Any, url: str) -> Exception:
    with pytest.raises((PermanentError, WebhookError)) as info:
        await call_webhook(settings, event(webhook_url=url))
    return info.value


def without_port(text: str, port: int) -> str:
    return text.replace(f":{port}", ":PORT")


# -- settings ----------------------------------------------------------------------------------


def test_payload_urls_are_off_by_default_and_need_an_allow_list() -> None:
    assert build_settings({}).executor.webhook.allow_payload_url is False
    with pytest.raises(ConfigError) as info:
        build_settings({"executor": {"webhook": {"allow_payload_url": True}}})
    assert info.value.key == "executor.webhook.allowed_hosts"
    with pytest.raises(ConfigError) as info:
        build_settings(
            {"executor": {"webhook": {"allow_payload_url": True, "allowed_hosts": ["a b"]}}}
        )
    assert info.value.key == "executor.webhook.allowed_hosts"
    with pytest.raises(ConfigError) as info:
        build_settings({"executor": {"webhook": {"secret_path_patterns": ["("]}}})
    assert info.value.key == "executor.webhook.secret_path_patterns"


# -- refused before connecting -------------------------------------------------------------------


async def test_a_payload_url_is_ignored_unless_allowed(receiver: Receiver) -> None:
    settings = settings_with(webhooks={"default": f"{receiver.base}/204"})
    await call_webhook(settings, event(webhook_url=f"{receiver.base}/500"))
    assert [path for path, _, _ in receiver.requests] == ["/204"]


@pytest.mark.parametrize(
    ("allowed", "host"),
    [
        (["hooks.example.com"], "127.0.0.1"),  # not listed
        (["*"], "127.0.0.1"),  # listed by the wildcard, but loopback
        (["*"], "2130706433"),
        (["*"], "0x7f.1"),
        (["*"], "127.1"),
        (["*"], "[::ffff:127.0.0.1]"),
        (["localhost"], "localhost"),  # a listed name does not make loopback addresses ok
        (["*", "10.0.0.0/8"], "localhost"),
    ],
)
async def test_loopback_is_refused_before_any_connection(
    receiver: Receiver, allowed: list[str], host: str
) -> None:
    port = receiver.server_address[1]
    err = await failure(payload_settings(*allowed), f"http://{host}:{port}/204")
    assert isinstance(err, PermanentError)
    assert "not allowed" in str(err) or "non-public" in str(err)
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("allowed", "host"),
    [(["127.0.0.1"], "127.0.0.1"), (["localhost", "127.0.0.0/8"], "localhost")],
)
async def test_loopback_is_reached_when_listed(
    receiver: Receiver, allowed: list[str], host: str
) -> None:
    port = receiver.server_address[1]
    await call_webhook(payload_settings(*allowed), event(webhook_url=f"http://{host}:{port}/204"))
    ((path, headers, _),) = receiver.requests
    assert path == "/204"
    assert headers["Host"] == f"{host}:{port}"


async def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    err = await failure(payload_settings("127.0.0.1"), f"{receiver.base}/302")
    assert isinstance(err, PermanentError)
    assert str(err).endswith("HTTP 302 Found")
    assert [path for path, _, _ in receiver.requests] == ["/302"]


# -- no port-scan signal ---------------------------------------------------------------------------


async def test_a_refused_host_gives_the_same_error_for_closed_and_open_ports(
    not_http: NotHttp, closed_port: int
) -> None:
    settings = payload_settings("*")
    closed = await failure(settings, f"http://0x7f.1:{closed_port}/x")
    open_ = await failure(settings, f"http://0x7f.1:{not_http.port}/x")
    assert type(closed) is type(open_) is PermanentError
    assert without_port(str(closed), closed_port) == without_port(str(open_), not_http.port)
    assert not_http.accepted == 0


async def test_an_allowed_host_gives_the_same_error_for_closed_and_non_http_ports(
    not_http: NotHttp, closed_port: int, receiver: Receiver
) -> None:
    settings = payload_settings("127.0.0.1", timeout="300ms")
    closed = await failure(settings, f"http://127.0.0.1:{closed_port}/x")
    open_ = await failure(settings, f"http://127.0.0.1:{not_http.port}/x")
    slow = await failure(settings, f"{receiver.base}/slow")
    assert not_http.accepted == 1
    assert type(closed) is type(open_) is type(slow) is WebhookError
    assert without_port(str(closed), closed_port) == without_port(str(open_), not_http.port)
    assert without_port(str(open_), not_http.port) == without_port(
        str(slow), receiver.server_address[1]
    ).replace("/slow", "/x")


# -- secrets ---------------------------------------------------------------------------------------


async def test_a_configured_url_with_credentials_and_tokens_fails_without_them(
    receiver: Receiver, closed_port: int
) -> None:
    port = receiver.server_address[1]
    for url in (
        f"http://user:{SECRET}@127.0.0.1:{port}/503/services/{TOKEN}?token={QSECRET}",
        f"http://user:{SECRET}@127.0.0.1:{closed_port}/services/{TOKEN}?token={QSECRET}",
    ):
        settings = settings_with(webhooks={"default": url})
        with pytest.raises(WebhookError) as info:
            await call_webhook(settings, event())
        text = str(info.value)
        assert "user:***@127.0.0.1" in text and "token=***" in text
        assert not any(s in text for s in SECRETS), text
    assert receiver.requests[0][1]["Authorization"].startswith("Basic ")


async def test_configured_secret_path_patterns_are_hidden(receiver: Receiver) -> None:
    settings = settings_with(
        webhooks={"default": f"{receiver.base}/503/hook/k-{SECRET}"},
        executor={"webhook": {"secret_path_patterns": ["k-.*"]}},
    )
    with pytest.raises(WebhookError) as info:
        await call_webhook(settings, event())
    assert str(info.value) == f"POST {receiver.base}/503/hook/***: HTTP 503 Service Unavailable"


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
    settings = make_settings(
        executor={
            "concurrency": 8,
            "max_retries": 2,
            "retry_backoff": {"base": "100ms", "jitter": 0.0},
            "webhook": {"allow_payload_url": True, "allowed_hosts": ["127.0.0.1"]},
        },
        handlers={"default": f"{BUILTIN}:webhook"},
        reconciler={"enabled": False},
    )
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
    published = {m.key().decode(): dict(m.headers())["dlq-error"].decode() for m in messages}

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
