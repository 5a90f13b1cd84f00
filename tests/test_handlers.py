"""Specification of the built-in handlers (simulate, log, webhook) and of handler loading.

The webhook handler is tested against a real HTTP server on a thread, both called directly
(on the asyncio side, where the executor runs handlers) and through a running executor.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import outcome
import pytest
import structlog
import trio
import trio_asyncio

from eventsched.core.config import Settings, build_settings
from eventsched.core.errors import PluginError
from eventsched.core.kafka import ensure_topics
from eventsched.core.plugins import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    handler_factory,
    load_handler,
)
from eventsched.plugins.handlers import SimulatedFailure, Webhook, WebhookError
from tests.conftest import Names
from tests.support.execution import (
    all_finished,
    attempt_rows,
    delete_queue_keys,
    insert_events,
    new_events,
    query,
    running_executor,
    wait_until,
)

BUILTIN = "eventsched.plugins.handlers"


# -- a receiver -----------------------------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """Answers POST /<status>[/...] with that status (a 3xx with ``Location: /200``; /slow
    sleeps 2 s); records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append((self.path, dict(self.headers), json.loads(body)))
        if self.path == "/slow":
            time.sleep(2)
        first = self.path.split("?")[0].strip("/").split("/")[0]
        status = int(first) if first.isdigit() else 200
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/200")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


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


def settings_with(**sections: Any) -> Settings:
    return build_settings(sections, "test")


def event(type_: str = "order.placed", attempt: int = 1, **payload: Any) -> HandlerEvent:
    return HandlerEvent(
        id="01890a5d-ac96-774b-bcce-b302099a8057",
        type=type_,
        payload=payload,
        execute_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
        attempt=attempt,
    )


async def on_asyncio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run an asyncio coroutine function the way the executor runs handlers; its exception
    comes out plain (not inside the loop nursery's group)."""
    async with trio_asyncio.open_loop():
        result = await outcome.acapture(trio_asyncio.aio_as_trio(fn), *args)
    return result.unwrap()


def context(settings: Settings, clients: list[httpx.AsyncClient] | None = None) -> HandlerContext:
    made = clients if clients is not None else []

    def client() -> httpx.AsyncClient:
        if not made:
            made.append(httpx.AsyncClient())
        return made[0]

    return HandlerContext(settings, "handlers.default", client)


async def call_webhook(settings: Settings, ev: HandlerEvent) -> None:
    clients: list[httpx.AsyncClient] = []
    handler = load_handler("handlers.default", f"{BUILTIN}:webhook", context(settings, clients))

    async def run() -> None:
        try:
            await handler(ev)
        finally:
            for client in clients:
                await client.aclose()

    await on_asyncio(run)


# -- loading ------------------------------------------------------------------------------------


@handler_factory
def greeting_factory(context: HandlerContext) -> Handler:
    prefix = context.settings.env

    async def greet(event: HandlerEvent) -> None:
        raise PermanentError(f"{prefix}:{event.id}")

    return greet


@handler_factory
def broken_factory(context: HandlerContext) -> Handler:
    raise ValueError("no such thing")


@handler_factory
def sync_factory(context: HandlerContext) -> Any:
    return lambda event: None


def test_a_handler_factory_is_called_with_the_context() -> None:
    handler = load_handler(
        "handlers.x", "tests.test_handlers:greeting_factory", context(settings_with())
    )
    with pytest.raises(PermanentError, match="test:01890a5d"):
        trio.run(on_asyncio, handler, event())


@pytest.mark.parametrize(
    ("target", "ctx", "problem"),
    [
        ("tests.test_handlers:greeting_factory", False, "is a handler factory; it needs a HandlerContext"),
        ("tests.test_handlers:broken_factory", True, "handler factory failed: ValueError('no such thing')"),
        ("tests.test_handlers:sync_factory", True, "must be an async function taking one HandlerEvent"),
    ],
)  # fmt: skip
def test_bad_handler_factories(target: str, ctx: bool, problem: str) -> None:
    with pytest.raises(PluginError) as info:
        load_handler("handlers.x", target, context(settings_with()) if ctx else None)
    assert info.value.problem == problem


def test_every_builtin_loads_from_settings_names() -> None:
    for name in ("simulate", "log", "webhook"):
        assert callable(
            load_handler("handlers.default", f"{BUILTIN}:{name}", context(settings_with()))
        )


# -- simulate and log ------------------------------------------------------------------------------


async def test_simulate_sleeps_then_fails_at_its_error_rate() -> None:
    always = load_handler(
        "handlers.default",
        f"{BUILTIN}:simulate",
        context(settings_with(executor={"simulate": {"duration": "20ms", "error_rate": 1.0}})),
    )
    never = load_handler(
        "handlers.default",
        f"{BUILTIN}:simulate",
        context(settings_with(executor={"simulate": {"duration": "20ms", "error_rate": 0.0}})),
    )
    started = time.perf_counter()
    await on_asyncio(never, event())
    assert time.perf_counter() - started >= 0.02
    with pytest.raises(SimulatedFailure, match=r"simulated failure \(error_rate=1\)"):
        await on_asyncio(always, event())


async def test_log_logs_the_event() -> None:
    handler = load_handler("handlers.default", f"{BUILTIN}:log")
    with structlog.testing.capture_logs() as logs:
        await on_asyncio(handler, event(attempt=2, order=7))
    assert logs == [
        {
            "event": "event_executed",
            "event_id": "01890a5d-ac96-774b-bcce-b302099a8057",
            "type": "order.placed",
            "attempt": 2,
            "execute_at": "2024-05-01T10:00:00.000Z",
            "payload": {"order": 7},
            "log_level": "info",
            "logger_name": "eventsched.plugins.handlers",
        }
    ]


# -- webhook -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("webhooks", "allow", "payload", "expected"),
    [
        ({"order.placed": "http://a/x", "default": "http://d/"}, True, {}, "http://a/x"),
        ({"default": "http://d/"}, True, {}, "http://d/"),
        ({"default": "http://d/"}, True, {"webhook_url": "https://p/y"}, "https://p/y"),
        ({"default": "http://d/"}, False, {"webhook_url": "https://p/y"}, "http://d/"),
        ({"default": "http://d/"}, None, {"webhook_url": "https://p/y"}, "http://d/"),
    ],
)
def test_webhook_url_comes_from_the_payload_or_the_settings(
    webhooks: dict[str, str], allow: bool | None, payload: dict[str, Any], expected: str
) -> None:
    # None: the default, which is "no" (a payload must not choose targets unless allowed).
    hook = {} if allow is None else {"allow_payload_url": allow, "allowed_hosts": ["p"]}
    settings = settings_with(webhooks=webhooks, executor={"webhook": hook})
    assert Webhook(context(settings)).url_for(event(**payload)) == expected


@pytest.mark.parametrize(
    ("webhooks", "payload", "problem"),
    [
        ({}, {}, "no webhook URL for event type 'order.placed'"),
        ({"other": "http://o/"}, {}, "no webhook URL for event type 'order.placed'"),
        ({}, {"webhook_url": "ftp://x"}, "payload webhook_url is not an http(s) URL: 'ftp://x'"),
        ({}, {"webhook_url": 5}, "payload webhook_url is not an http(s) URL: 5"),
    ],
)
def test_webhook_without_a_usable_url_is_permanent(
    webhooks: dict[str, str], payload: dict[str, Any], problem: str
) -> None:
    hook = {"allow_payload_url": True, "allowed_hosts": ["*"]}
    settings = settings_with(webhooks=webhooks, executor={"webhook": hook})
    with pytest.raises(PermanentError) as info:
        Webhook(context(settings)).url_for(event(**payload))
    assert str(info.value) == problem


async def test_webhook_posts_the_event_with_an_idempotency_key(receiver: Receiver) -> None:
    settings = settings_with(webhooks={"order.placed": f"{receiver.base}/204"})
    await call_webhook(settings, event(attempt=2, order=7))
    ((path, headers, body),) = receiver.requests
    assert path == "/204"
    assert headers["Idempotency-Key"] == "01890a5d-ac96-774b-bcce-b302099a8057"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("eventsched/")
    assert body == {
        "id": "01890a5d-ac96-774b-bcce-b302099a8057",
        "type": "order.placed",
        "payload": {"order": 7},
        "execute_at": "2024-05-01T10:00:00.000Z",
        "attempt": 2,
    }


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("503", WebhookError, "HTTP 503 Service Unavailable"),
        ("429", WebhookError, "HTTP 429 Too Many Requests"),
        ("408", WebhookError, "HTTP 408 Request Timeout"),
        ("400", PermanentError, "HTTP 400 Bad Request"),
        ("404", PermanentError, "HTTP 404 Not Found"),
        ("301", PermanentError, "HTTP 301 Moved Permanently"),
    ],
)
async def test_webhook_status_decides_retry_or_dead(
    receiver: Receiver, path: str, error: type[Exception], message: str
) -> None:
    settings = settings_with(webhooks={"default": f"{receiver.base}/{path}"})
    with pytest.raises(error, match=message):
        await call_webhook(settings, event())


async def test_webhook_timeouts_and_refused_connections_are_retried(receiver: Receiver) -> None:
    slow = settings_with(
        webhooks={"default": f"{receiver.base}/slow"}, executor={"webhook": {"timeout": "300ms"}}
    )
    with pytest.raises(WebhookError, match=r"POST .*/slow: "):
        await call_webhook(slow, event())
    with trio.socket.socket() as sock:  # a port with nobody listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = settings_with(webhooks={"default": f"http://127.0.0.1:{port}/"})
    with pytest.raises(WebhookError, match="ConnectError"):
        await call_webhook(refused, event())


async def test_webhook_through_the_executor_succeeds_retries_and_dies(
    receiver: Receiver,
    make_settings: Any,
    database: str,
    kafka_bootstrap: str,
    names: Names,
    redis_url: str,
) -> None:
    ensure_topics(kafka_bootstrap, {names.dlq_topic: 1})
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
